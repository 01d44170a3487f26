"""The generator: the range-uncovery set loss, its gradient, training, classifying, fitting, the sample grid."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.train import resolve_config, to_float
from conftest import fit_steps
from models import create_model
from models.generator import NearestInRange, RangeUncovery, image_points, range_uncovery_points


def sparse_images(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 28, 28) images with ~15% ink pixels of random grey levels, no ink on the outer 2-pixel rim."""
    g = torch.Generator().manual_seed(seed)
    ink = (torch.rand(n, 1, 28, 28, generator=g) < 0.15).float() * torch.rand(n, 1, 28, 28, generator=g)
    ink[..., :2, :] = ink[..., -2:, :] = ink[..., :, :2] = ink[..., :, -2:] = 0
    return ink


def stroke(shift: int = 0) -> torch.Tensor:
    """A vertical stroke, 2 pixels wide, moved `shift` pixels to the right: (1, 1, 28, 28)."""
    x = torch.zeros(1, 1, 28, 28)
    x[..., 6:22, 10 + shift:12 + shift] = 1.0
    return x


def test_set_loss_is_zero_for_identical_sets_and_symmetric():
    loss = RangeUncovery()
    a, b = sparse_images(4, 0), sparse_images(4, 1)
    assert torch.equal(loss(a, a), torch.zeros(4))
    torch.testing.assert_close(loss(a, b), loss(b, a))
    assert (loss(a, b) > 0.1).all()  # unrelated speckle is mostly uncovered
    assert (loss.uncovered(a, b) != loss.uncovered(b, a)).any()  # the one-sided shares differ; L averages them


@pytest.mark.parametrize("tolerance", [(1.0, 1.0, 0.25), (1.5, 0.8, 0.4)])
def test_grid_loss_equals_the_point_set_definition_in_any_point_order(tolerance):
    a, b = sparse_images(2, 2)
    points_a, weights_a = image_points(a[0])
    points_b, weights_b = image_points(b[0])
    reference = range_uncovery_points(points_a, weights_a, points_b, weights_b, tolerance)
    torch.testing.assert_close(RangeUncovery(tolerance)(a[None], b[None])[0], reference)
    g = torch.Generator().manual_seed(3)
    pa, pb = torch.randperm(784, generator=g), torch.randperm(784, generator=g)  # shuffle both point lists
    shuffled = range_uncovery_points(points_a[pa], weights_a[pa], points_b[pb], weights_b[pb], tolerance)
    torch.testing.assert_close(shuffled, reference)


def test_set_loss_grows_as_ink_moves_away_where_pixel_losses_saturate():
    loss = RangeUncovery()
    by_shift = [loss(stroke(), stroke(s)).item() for s in (0, 1, 2, 4, 8)]
    assert by_shift[0] == 0.0
    assert by_shift[0] < by_shift[1] < by_shift[2] < by_shift[3] <= by_shift[4] <= 1.0
    mse = [(stroke() - stroke(s)).pow(2).mean().item() for s in (2, 4)]
    assert mse[0] == mse[1]  # once the strokes no longer overlap, a pixel loss cannot tell near from far
    fainter = loss(stroke(), 0.7 * stroke()).item()  # grey levels count too, within the grey tolerance
    assert 0 < fainter < loss(stroke(), 0.2 * stroke()).item()


def test_custom_backward_matches_numerical_gradients():
    g = torch.Generator().manual_seed(4)  # continuous random greys: no two partners tie, where the min has a kink
    a = torch.rand(1, 1, 28, 28, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(1, 1, 28, 28, generator=g, dtype=torch.float64, requires_grad=True)
    ranges = RangeUncovery((1.0, 1.5, 0.3))
    assert torch.autograd.gradcheck(lambda a, b: NearestInRange.apply(a, b, ranges.offsets, ranges.radius,
                                                                      ranges.tol_grey), (a, b), eps=1e-6, atol=1e-5,
                                    fast_mode=True)


@pytest.fixture(scope="module")
def digits(mnist):
    return to_float(mnist.train_images[:512]), torch.from_numpy(mnist.train_labels[:512])


def test_a_few_training_steps_lower_the_loss(digits):
    torch.manual_seed(0)
    x, y = digits
    model = create_model("generator", embed_dim=256, hidden=128)  # small, for speed; same objective
    assert resolve_config("generator").optimizer == "adamw"  # trains through the ordinary loop's optimizers

    def held_loss():
        torch.manual_seed(1)  # the same reparameterisation noise for both measurements
        with torch.no_grad():
            return model.training_loss(x[:128], y[:128]).item()

    before = held_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batches = (torch.arange(step * 64, (step + 1) * 64) % len(x) for step in range(30))
    fit_steps(model, model.training_loss, ((x[batch], y[batch]) for batch in batches), optimizer)
    assert held_loss() < 0.8 * before


def test_classifier_view_fit_and_checkpoint_round_trip(digits, tmp_path):
    torch.manual_seed(0)
    x, y = digits[0][:12], digits[1][:12]
    model = create_model("generator", loss="mse", tolerance=[1.5, 1.5, 0.3]).eval()  # lists, as from meta.json
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (12, 10)
        torch.testing.assert_close(model(x, chunk=5), logits)  # chunking is only a memory bound
    guess = model.fit_styles(x, y, steps=0)
    fitted = model.fit_styles(x, y, steps=10)
    assert (fitted <= guess).all() and (fitted < guess).float().mean() > 0.5
    clone = create_model("generator", loss="mse", tolerance=(1.5, 1.5, 0.3))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    clone.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    torch.testing.assert_close(clone.eval()(x), logits)
    with pytest.raises(ValueError, match="expected one of uncovery, mse, bce"):
        create_model("generator", loss="l1")


def test_write_figures_draws_ten_digits_by_eight_styles(tmp_path):
    """Row c, column s of samples.png is the decoder's rendering of digit c in style code s, the codes drawn
    with the grid's fixed seed (0): the same eight styles in every row."""
    torch.manual_seed(0)
    model = create_model("generator", embed_dim=256, hidden=128).eval()
    (path,) = model.write_figures(tmp_path)
    assert path == tmp_path / "samples.png"
    grid = np.asarray(Image.open(path))[..., 0] / 255  # grey, written as RGB
    assert grid.shape == (10 * 30 + 2, 8 * 30 + 2)  # make_grid: 28-pixel tiles, 2-pixel padding
    tiles = np.array([[grid[2 + 30 * c:30 + 30 * c, 2 + 30 * s:30 + 30 * s] for s in range(8)] for c in range(10)])
    styles = torch.randn(8, model.style_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rendered = np.array([[torch.sigmoid(model.decode(torch.tensor([c]), styles[[s]]))[0, 0].numpy()
                              for s in range(8)] for c in range(10)])
    np.testing.assert_allclose(tiles, rendered, rtol=0, atol=0.5 / 255 + 1e-6)  # 8-bit PNG rounding
    # even untrained, any two rules (rows) and any two styles (columns) render differently, on average by more
    # than twice that tolerance: the comparison above tells a grid with rows or columns mixed up
    assert min(np.abs(tiles[a] - tiles[b]).mean() for a, b in combinations(range(10), 2)) > 1 / 255
    assert min(np.abs(tiles[:, a] - tiles[:, b]).mean() for a, b in combinations(range(8), 2)) > 1 / 255

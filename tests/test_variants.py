"""The model variants of issue 4: MLP-Mixer, SoftOrdering point sets and active-attention glimpses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.config import TrainConfig
from benchmark.train import random_distortion, resolve_config, to_float, training_loss
from conftest import fit_steps
from models import REGISTRY, create_model
from models.glimpse import (discounted_gains, gain_calibration, glimpse_paths, per_step_accuracy, plot_glimpse_paths,
                            read_pixels, step_cross_entropy)
from models.softorder import SoftHistogram, image_points

VARIANTS = {  # name -> model kwargs of every configuration the tests build
    "mixer": [{}, {"patch": 7, "dim": 32, "depth": 2}],
    "softorder": [{}, {"pool": "max"}, {"points": "all", "features": 16, "bins": 4},
                  {"head_width": 32, "head_layers": 3}],
    "glimpse": [{}, {"glimpses": 2}, {"glimpses": 3, "policy": "grid", "explore": 1.0, "encoder_width": 32}],
}


def fabricated_digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 1, 28, 28) in [0, 1] of 10 classes: a smooth random template per class plus noise.

    Templates are 7x7 noise upsampled and thresholded, so about a quarter of the pixels carry ink and the
    rest are exactly 0, like MNIST; the classes are learnable from a few pixels.
    """
    gen = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.rand(10, 1, 7, 7, generator=gen), size=28, mode="bilinear", align_corners=False)
    labels = torch.arange(n) % 10
    noisy = templates[labels] + 0.1 * torch.randn(n, 1, 28, 28, generator=gen)
    return ((noisy - 0.6) * 3).clamp(0, 1), labels


@pytest.mark.parametrize("name,kwargs", [(n, k) for n, ks in VARIANTS.items() for k in ks])
def test_variant_maps_images_to_logits(name, kwargs):
    model = create_model(name, **kwargs).eval()
    x, _ = fabricated_digits(5)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name,kwargs", [
    ("cnn", {}), ("cnn", {"deskew": True}), ("mlp", {}), ("mixer", {}), ("softorder", {"points": "all"}),
    ("glimpse", {}), ("glimpse", {"explore": 2.0, "quantise": True}),
    ("glimpse", {"glimpses": 3, "policy": "grid", "explore": 1.0, "canvas": True, "probe": 1}),
    ("glimpse", {"glimpses": 3, "policy": "grid", "explore": 1.0, "discount": 1.0, "gain": "entropy"}),
    ("cowmask", {"second_view": True}), ("cowmask", {"mode": "erase", "readable": True}), ("generator", {})])
def test_a_model_trains_and_predicts_with_every_tensor_on_its_device(name, kwargs):
    """The `--device cuda` path without a GPU: on PyTorch's "meta" device (shapes only), an op mixing a
    tensor made on the CPU inside the model with the model's own raises, as it would on CUDA. (softorder's
    default ink-only points size a tensor by a count read back from the data, which meta cannot do.)"""
    model = create_model(name, **kwargs).to("meta").train()
    x, y = torch.rand(6, 1, 28, 28, device="meta"), torch.arange(6, device="meta")
    unlabelled = {"unlabelled": x, "second_view": x} if kwargs.get("second_view") else {"unlabelled": x}
    loss = training_loss(model, x, y, 0.1, **(unlabelled if name == "cowmask" else {}))
    loss.backward()
    assert loss.device.type == "meta" and loss.shape == ()
    assert all(p.grad is None or p.grad.device.type == "meta" for p in model.parameters())
    with torch.no_grad():
        logits = model.eval()(x)
    assert logits.device.type == "meta" and logits.shape == (6, 10)


def test_random_distortion_runs_on_the_images_device():
    x = torch.rand(4, 1, 28, 28, device="meta")
    for cfg in (TrainConfig(), TrainConfig(elastic=36.0, elastic_sigma=6.0)):
        assert random_distortion(x, cfg, torch.Generator().manual_seed(0)).device.type == "meta"


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_is_registered_with_valid_training_defaults(name):
    entry = REGISTRY[name]
    assert entry.description
    cfg = resolve_config(name)  # raises on a default that is not a TrainConfig field
    assert cfg.epochs >= 1 and cfg.optimizer in ("sgd", "adamw")


def test_mixer_patches_are_the_image_tiles():
    mixer = create_model("mixer", patch=7)
    x = torch.arange(784.0).reshape(1, 1, 28, 28)
    tokens = mixer.patches(x)
    assert tokens.shape == (1, 16, 49)
    # token 5 is grid cell (1, 1): rows 7..13, columns 7..13
    assert torch.equal(tokens[0, 5], x[0, 0, 7:14, 7:14].flatten())


def test_image_points_keeps_exactly_the_ink_pixels():
    x, _ = fabricated_digits(3)
    points, mask = image_points(x, "ink")
    for n in range(3):
        ink = x[n, 0] > 0
        assert int(mask[n].sum()) == int(ink.sum())
        rows = ((points[n, mask[n], 0] + 1) * 13.5).round().long()
        cols = ((points[n, mask[n], 1] + 1) * 13.5).round().long()
        assert ink[rows, cols].all()
        assert torch.allclose(points[n, mask[n], 2], x[n, 0, rows, cols])
    points_all, mask_all = image_points(x, "all")
    assert points_all.shape == (3, 784, 3) and mask_all.all()


def test_soft_histogram_memberships_form_a_distribution():
    pool = SoftHistogram(features=4, bins=5)
    h = torch.randn(2, 30, 4) * 3  # some values beyond the outer centres
    mask = torch.rand(2, 30) < 0.7
    hist = pool(h, mask).reshape(2, 4, 5)
    assert (hist >= 0).all()
    assert torch.allclose(hist.sum(2), torch.ones(2, 4))
    # a value exactly on a centre belongs to that bin alone (centres start at -2, -1, 0, 1, 2)
    on_centre = pool(torch.full((1, 1, 4), 1.0), torch.ones(1, 1, dtype=torch.bool)).reshape(4, 5)
    assert torch.allclose(on_centre, F.one_hot(torch.tensor([3] * 4), 5).float())


@pytest.mark.parametrize("pool", ["hist", "max"])
def test_softorder_output_ignores_point_order(pool):
    model = create_model("softorder", pool=pool).eval()
    x, _ = fabricated_digits(4)
    points, mask = image_points(x)
    gen = torch.Generator().manual_seed(1)
    order = torch.stack([torch.randperm(points.shape[1], generator=gen) for _ in range(4)])  # per image
    shuffled = torch.gather(points, 1, order.unsqueeze(2).expand_as(points))
    with torch.no_grad():
        assert torch.allclose(model.forward_points(points, mask),
                              model.forward_points(shuffled, torch.gather(mask, 1, order)), atol=1e-5)


def test_softorder_points_listed_in_any_pixel_order_give_the_image_logits():
    """Build the point set independently of `image_points`, in a random pixel order, from the raw image."""
    model = create_model("softorder").eval()
    x, _ = fabricated_digits(1, seed=3)
    rng = np.random.default_rng(0)
    pixels = rng.permutation(np.flatnonzero(x[0, 0].numpy().ravel() > model.ink_threshold))
    rows, cols = pixels // 28, pixels % 28
    points = torch.tensor(np.stack([rows / 13.5 - 1, cols / 13.5 - 1, x[0, 0].numpy()[rows, cols]], 1),
                          dtype=torch.float32).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(model.forward_points(points, torch.ones(1, len(pixels), dtype=torch.bool)),
                              model(x), atol=1e-5)


@pytest.mark.parametrize("pool", ["hist", "max"])
def test_softorder_padding_does_not_change_the_output(pool):
    model = create_model("softorder", pool=pool).eval()
    x, _ = fabricated_digits(6)
    points, mask = image_points(x, model.points, model.ink_threshold)
    junk = torch.randn(6, 40, 3) * 5  # padded slots with arbitrary content
    padded = torch.cat([points, junk], 1), torch.cat([mask, torch.zeros(6, 40, dtype=torch.bool)], 1)
    with torch.no_grad():
        alone = model.forward_points(points, mask)
        assert torch.allclose(model.forward_points(*padded), alone, atol=1e-5)
        # in a batch each image is padded to the largest ink count; alone it is not padded at all
        assert torch.allclose(torch.cat([model(x[n:n + 1]) for n in range(6)]), alone, atol=1e-5)


def test_bilinear_read_is_the_pixel_on_pixels_and_a_blend_between():
    x, _ = fabricated_digits(2)
    on_pixels = torch.tensor([[3.0, 20.0], [27.0, 0.0]])
    assert torch.allclose(read_pixels(x, on_pixels), torch.stack([x[0, 0, 3, 20], x[1, 0, 27, 0]]))
    between = torch.tensor([[3.5, 20.0], [26.25, 0.0]])
    expected = torch.stack([(x[0, 0, 3, 20] + x[0, 0, 4, 20]) / 2, 0.75 * x[1, 0, 26, 0] + 0.25 * x[1, 0, 27, 0]])
    assert torch.allclose(read_pixels(x, between), expected)


def test_bilinear_read_gradient_is_the_image_slope():
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    ramp = (0.02 * rows - 0.01 * cols + 0.3).reshape(1, 1, 28, 28).expand(3, 1, 28, 28)
    coords = torch.tensor([[5.3, 7.9], [12.0, 0.5], [26.7, 26.2]], requires_grad=True)
    read_pixels(ramp, coords).sum().backward()
    assert torch.allclose(coords.grad, torch.tensor([[0.02, -0.01]] * 3), atol=1e-6)


def test_glimpse_policy_learns_through_the_bilinear_read():
    """With the embedding blind to the coordinates and no pull to pixel centres, the only path from loss to
    policy is the grey value read: the policy gets a gradient on digits, and none on a flat image (slope 0)."""
    model = create_model("glimpse", glimpses=4, snap=0.0)
    with torch.no_grad():  # the first layer sees (row, col, grey, Fourier waves of row and col)
        model.embed.mlp[0].weight[:, :2] = 0
        model.embed.mlp[0].weight[:, 3:] = 0
    x, y = fabricated_digits(32)

    def policy_gradient(images):
        return torch.autograd.grad(model.training_loss(images, y, 0.0), model.policy[-1].weight)[0]

    assert policy_gradient(x).abs().sum() > 0
    assert policy_gradient(torch.full_like(x, 0.5)).abs().sum() == 0


def test_glimpse_steps_paths_and_per_step_accuracy(tmp_path):
    model = create_model("glimpse", glimpses=5).eval()
    x, y = fabricated_digits(6)
    with torch.no_grad():
        logits = model.step_logits(x)
        assert logits.shape == (5, 6, 10)
        assert torch.equal(logits[-1], model(x))
    paths = glimpse_paths(model, x)
    assert paths.shape == (6, 5, 2)
    assert ((paths >= 0) & (paths <= 27)).all()
    assert torch.allclose(paths[:, 0], paths[0, 0].expand(6, 2))  # before any reading all images look alike
    accuracy = per_step_accuracy(model, x, y.numpy(), rounded=False, batch_size=4)
    assert len(accuracy) == 5
    assert accuracy[-1] == pytest.approx((logits[-1].argmax(1) == y).float().mean().item())
    png = plot_glimpse_paths(model, x, y.numpy(), tmp_path / "paths.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def noise_except_at(x: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
    """Images x (B, 1, 28, 28) kept at the whole pixels `visited` (B, K, 2) = (row, col), random noise elsewhere:
    a glimpse model that reads only those pixels cannot tell the two apart."""
    seen = torch.zeros_like(x, dtype=torch.bool)
    seen[torch.arange(len(x)).unsqueeze(1), 0, visited[..., 0].long(), visited[..., 1].long()] = True
    return torch.where(seen, x, torch.rand(x.shape, generator=torch.Generator().manual_seed(2)))


def test_rounded_glimpses_see_only_the_pixels_they_visit():
    model = create_model("glimpse", glimpses=6).eval()
    with torch.no_grad():
        model.base.fill_(3.0)  # move every glimpse off its start pixel, to between pixels
    x, _ = fabricated_digits(4)
    visited = glimpse_paths(model, x, rounded=True)
    assert torch.equal(visited, visited.round())
    other = noise_except_at(x, visited)
    with torch.no_grad():
        assert torch.allclose(model.step_logits(other, rounded=True), model.step_logits(x, rounded=True))
        # bilinear glimpses between pixels also see the neighbours, so they notice the change
        assert not torch.allclose(model.step_logits(other), model.step_logits(x))


def random_batches(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0, size: int = 64):
    """`steps` batches of `size` pairs of (x, y), each drawn at random (seeded) from the whole set."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randperm(len(x), generator=gen)[:size]
        yield x[batch], y[batch]


# The glimpse net starts slower: its loss averages K steps and the first glimpses see one or two pixels.
@pytest.mark.parametrize("name,kwargs,steps", [("mixer", {"dim": 64, "depth": 2}, 30), ("softorder", {}, 30),
                                               ("softorder", {"pool": "max"}, 30), ("glimpse", {"glimpses": 12}, 100)])
def test_a_few_training_steps_reduce_the_loss(name, kwargs, steps):
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    x, y = fabricated_digits(256)

    def full_loss():
        model.eval()
        with torch.no_grad():
            return training_loss(model, x, y, 0.0).item()

    before = full_loss()
    fit_steps(model, lambda xb, yb: training_loss(model, xb, yb, 0.0), random_batches(x, y, steps),
              torch.optim.Adam(model.parameters(), lr=2e-3))
    assert full_loss() < 0.7 * before


def test_exploring_glimpses_learn_by_reinforce_and_the_exploration_fades():
    """With `explore`, the positions get a REINFORCE gradient (not the read slope) and sigma anneals to 0."""
    model = create_model("glimpse", glimpses=3, explore=2.0, explore_steps=4).train()
    x, y = fabricated_digits(32)
    sigmas = [model.exploration()]
    torch.manual_seed(0)
    out = model.run(x)
    # the reads are at the explored samples, cut off from the coordinates: the loss reaches them only by REINFORCE
    read_path = torch.autograd.grad(step_cross_entropy(out.logits, y).mean(), model.base, allow_unused=True)[0]
    assert read_path is None or read_path.abs().sum() == 0
    torch.manual_seed(0)  # the same samples again
    assert torch.autograd.grad(model.training_loss(x, y, 0.0), model.base)[0].abs().sum() > 0
    for _ in range(4):
        sigmas.append(model.exploration())
        model.training_loss(x, y, 0.0)
    assert sigmas == [2.0, 1.5, 1.0, 0.5, 0.0]
    assert model.eval().exploration() == 0.0  # evaluation reads at the coordinates themselves


def test_quantised_exploring_glimpses_sit_on_pixel_centres():
    """With `quantise`, every coordinate the policy commits to is a pixel centre, so reading it bilinearly
    or rounded gives the same grey levels, and the policy still learns (straight-through)."""
    model = create_model("glimpse", glimpses=4, explore=2.0, quantise=True)
    with torch.no_grad():
        model.base.normal_(0, 3)  # start between pixels
    x, y = fabricated_digits(16)
    model.train().training_loss(x, y, 0.0).backward()
    assert model.base.grad.abs().sum() > 0
    paths = glimpse_paths(model, x)
    assert torch.equal(paths, paths.round())
    assert torch.equal(model.step_logits(x), model.step_logits(x, rounded=True))
    with pytest.raises(ValueError, match="quantise acts on exploring glimpses only"):
        create_model("glimpse", glimpses=4, quantise=True)


def test_glimpses_start_on_the_given_pixels():
    """`start` (row-major pixel indices, e.g. the best pair of `bench bound`) replaces the sunflower starts."""
    x, _ = fabricated_digits(3)
    paths = glimpse_paths(create_model("glimpse", glimpses=2, start=(406, 409)), x)
    torch.testing.assert_close(paths, torch.tensor([[14.0, 14.0], [14.0, 17.0]]).expand(3, 2, 2))
    with pytest.raises(ValueError, match=r"expected 2 pixel indices in 0..783"):
        create_model("glimpse", glimpses=2, start=(406,))
    with pytest.raises(ValueError, match=r"expected 2 pixel indices in 0..783"):
        create_model("glimpse", glimpses=2, start=(406, 784))


@pytest.mark.parametrize("canvas", [False, True])
def test_a_pixel_policy_reads_distinct_whole_pixels_and_sees_nothing_else(canvas):
    torch.manual_seed(0)
    model = create_model("glimpse", glimpses=6, policy="grid", explore=1.0, canvas=canvas).eval()
    with torch.no_grad():  # a preference over pixels that depends on what was read (state, and canvas if on)
        model.policy[-1].bias.normal_(std=0.1)
        model.policy[-1].weight.normal_()
    x, _ = fabricated_digits(10)
    visited = glimpse_paths(model, x)
    assert torch.equal(visited, visited.round())
    pixels = visited[..., 0] * 28 + visited[..., 1]
    assert all(len(set(row.tolist())) == 6 for row in pixels)  # never the same pixel twice
    other = noise_except_at(x, visited)
    assert len({tuple(row) for row in pixels.tolist()}) > 1  # the paths depend on what was read
    assert torch.equal(glimpse_paths(model, other), visited)
    with torch.no_grad():
        assert torch.equal(model.step_logits(x), model.step_logits(x, rounded=True))
        assert torch.allclose(model.step_logits(other), model.step_logits(x))
    for bad in [dict(explore=0.0), dict(explore=1.5), dict(explore=1.0, start=(406, 409))]:
        with pytest.raises(ValueError, match="policy='grid' learns from glimpses at random pixels"):
            create_model("glimpse", glimpses=2, policy="grid", **bad)
    with pytest.raises(ValueError, match="canvas .* needs policy='grid'"):
        create_model("glimpse", glimpses=2, canvas=True)


def train_pixel_policy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.nn.Module:
    """A few hundred Adam steps on batches of 64 of (x, y): enough for the toy tasks below."""
    fit_steps(model, lambda xb, yb: model.training_loss(xb, yb, 0.0), random_batches(x, y, steps, seed=1),
              torch.optim.Adam(model.parameters(), lr=3e-3))
    return model.eval()


def test_a_pixel_policy_learns_where_the_label_is_written():
    """The right half of every image holds its label (0 / 1) in every pixel, the left half coin-flip noise.
    Untrained, every glimpse goes to pixel 0 (all estimates tie); after a short training the first glimpse
    reads the right half on most images."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (512,), generator=gen)
    x = torch.randint(0, 2, (512, 1, 28, 28), generator=gen).float()
    x[:, 0, :, 14:] = y.float().view(512, 1, 1)
    model = create_model("glimpse", glimpses=1, policy="grid", explore=1.0, explore_steps=100)
    assert (glimpse_paths(model, x[:100])[:, 0] == 0).all()
    first = glimpse_paths(train_pixel_policy(model, x, y, 200), x[:100])[:, 0]
    assert (first[:, 1] >= 14).float().mean() > 0.9


@pytest.mark.parametrize("canvas", [False, True])
def test_a_pixel_policy_looks_where_its_first_reading_points(canvas):
    """Four classes y = 2c + d. The left half holds c in every pixel; d is written in the top right quarter
    when c = 0 and in the bottom right quarter when c = 1, the other quarter being coin-flip noise. Reading
    the left half first is worth ln 2 nats, a right pixel half that, so the greedy policy reads c first; the
    second glimpse must then go to the quarter that c points to."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    c, d = torch.randint(0, 2, (2, 1024), generator=gen)
    x = torch.randint(0, 2, (1024, 1, 28, 28), generator=gen).float()
    x[:, 0, :, :14] = c.float().view(-1, 1, 1)
    top = c == 0
    x[top, 0, :14, 14:] = d[top].float().view(-1, 1, 1)
    x[~top, 0, 14:, 14:] = d[~top].float().view(-1, 1, 1)
    model = create_model("glimpse", glimpses=2, policy="grid", explore=1.0, explore_steps=200, canvas=canvas)
    first, second = glimpse_paths(train_pixel_policy(model, x, 2 * c + d, 300), x[:200]).unbind(1)
    assert (first[:, 1] < 14).float().mean() > 0.9
    right, upper = second[:, 1] >= 14, second[:, 0] < 14
    assert torch.where(top[:200], right & upper, right & ~upper).float().mean() > 0.9


def test_discounted_gains_credit_each_read_with_what_later_reads_gained():
    drops = torch.tensor([[0.5, 1.0], [0.25, 0.0], [0.125, 2.0]])  # (K = 3 steps, B = 2 images)
    torch.testing.assert_close(discounted_gains(drops, 0.0), drops)
    torch.testing.assert_close(discounted_gains(drops, 1.0), torch.tensor([[0.875, 3.0], [0.375, 2.0], [0.125, 2.0]]))
    torch.testing.assert_close(discounted_gains(drops, 0.5), torch.tensor([[0.65625, 1.5], [0.3125, 1.0], [0.125, 2.0]]))
    assert torch.equal(drops[0], torch.tensor([0.5, 1.0]))  # the input is left as it was
    with pytest.raises(ValueError, match="discount=1.5: a number in"):
        create_model("glimpse", policy="grid", explore=1.0, discount=1.5)
    with pytest.raises(ValueError, match="for policy='grid' only"):
        create_model("glimpse", discount=0.5)


def test_grid_policy_probes_regress_random_unread_pixels_estimates_on_their_counterfactual_drops():
    """probe = P: each training step also reads P random pixels not read yet, without changing the path or training
    the classifier on them; their estimates learn the drops in cross-entropy their readings would have given."""
    torch.manual_seed(0)
    model = create_model("glimpse", glimpses=3, policy="grid", explore=0.5, probe=2).train()
    with torch.no_grad():  # each pixel's estimate is its own index, so the estimates name the pixels
        model.policy[-1].bias.copy_(torch.arange(784.0))
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(1)
    out = model.run(x)
    assert out.probe_logits.shape == (3, 2, 4, 10) and out.probe_terms.shape == (3, 2, 4)
    read, probed = out.policy_terms.long(), out.probe_terms.long()  # (steps, images), (steps, probes, images)
    for t in range(3):  # a step's probes are two different pixels, neither read at that step or before
        assert (probed[t, 0] != probed[t, 1]).all()
        assert not (probed[t].unsqueeze(1) == read[:t + 1].unsqueeze(0)).any()
    assert not out.probe_logits.requires_grad and out.probe_terms.requires_grad
    ce = F.cross_entropy(out.logits.flatten(0, 1), y.repeat(3), reduction="none").view(3, 4)
    before = torch.cat([torch.full((1, 4), math.log(10)), ce[:-1]])
    probe_drops = torch.stack([before - F.cross_entropy(out.probe_logits[:, p].flatten(0, 1), y.repeat(3),
                                                        reduction="none").view(3, 4) for p in range(2)], dim=1)
    expected = ce.mean() + F.mse_loss(out.policy_terms, before - ce) + F.mse_loss(out.probe_terms, probe_drops)
    torch.manual_seed(1)
    torch.testing.assert_close(model.training_loss(x, y, 0.0), expected)
    assert not torch.allclose(out.probe_logits[:, 0], out.probe_logits[:, 1])  # two different pixels
    # a probe is a counterfactual: once the exploration is over (greedy reads), the path and the logits are those of
    # the same model without it
    model.steps_taken = model.explore_steps
    probed = model.run(x)
    model.probe = False
    plain = model.run(x)
    assert plain.probe_logits is None and probed.probe_logits is not None
    assert torch.equal(probed.coords, plain.coords) and torch.equal(probed.logits, plain.logits)
    for bad in ({"probe": 1}, {"policy": "grid", "explore": 1.0, "discount": 0.5, "probe": 1},
                {"policy": "grid", "explore": 1.0, "probe": -1}, {"policy": "grid", "explore": 1.0, "probe": 760}):
        with pytest.raises(ValueError, match="the number of random unread pixels also read at each step"):
            create_model("glimpse", **bad)


def test_gain_calibration_follows_the_policy_and_reads_random_unread_pixels_beside_it(mnist):
    torch.manual_seed(0)
    model = create_model("glimpse", glimpses=4, policy="grid", explore=1.0, encoder_width=32).eval()
    # the policy reads pixels 783, 782, 781, 780, each estimated far above any other pixel
    estimates = torch.linspace(0, 1, 784)
    estimates[780:] += 1000.0
    with torch.no_grad():
        model.policy[-1].bias.copy_(estimates)
    x, y = to_float(mnist.train_images[:60]), mnist.train_labels[:60]
    table = gain_calibration(model, x, y, candidates=5, batch_size=25)
    assert list(table["step"]) == [1, 2, 3, 4]
    np.testing.assert_allclose(table["accuracy"], per_step_accuracy(model, x, y), atol=1e-6)
    np.testing.assert_allclose(table["chosen_estimate"], estimates[[783, 782, 781, 780]], atol=1e-6)
    assert (table["chosen_ink"] == 0).all()  # the bottom-right corner is blank in MNIST
    # the drops of the pixels read add up to the fall from the uniform guess to the last step's cross-entropy
    last = F.cross_entropy(model.step_logits(x)[-1], torch.from_numpy(y).long())
    assert table["chosen_drop"].sum() == pytest.approx(math.log(10) - last.item(), abs=1e-5)
    # random pixels are unread ones: a read pixel among the 5 would lift their mean estimate by at least 200
    assert (table["random_estimate"] < 1).all()
    assert table["random_correlation"].notna().all()  # their estimates differ, so the correlation is defined
    assert table["beaten"].between(0, 1).all()
    with pytest.raises(ValueError, match="needs a glimpse model with policy='grid'"):
        gain_calibration(create_model("glimpse", glimpses=2), x, y)


def test_grid_policy_with_gain_entropy_regresses_on_the_drop_in_the_models_own_entropy():
    """gain='entropy': each read pixel's estimate learns the drop in the entropy of the class probabilities (from
    log 10, the uniform guess's), not in the cross-entropy with the label."""
    torch.manual_seed(0)
    model = create_model("glimpse", glimpses=3, policy="grid", explore=0.5, gain="entropy").train()
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(1)
    logits, _, estimates, _, _ = model.run(x)  # the same random reads as the loss below
    entropy = -(logits.softmax(2) * logits.log_softmax(2)).sum(2)
    before = torch.cat([torch.full((1, 4), math.log(10)), entropy[:-1]])
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(3), reduction="none").view(3, 4)
    expected = ce.mean() + F.mse_loss(estimates, before - entropy)
    for gain, matches in (("entropy", True), ("cross_entropy", False)):
        model.gain, model.steps_taken = gain, 0
        torch.manual_seed(1)
        assert torch.allclose(model.training_loss(x, y, 0.0), expected) == matches
    with pytest.raises(ValueError, match="for policy='grid' only"):
        create_model("glimpse", gain="entropy")

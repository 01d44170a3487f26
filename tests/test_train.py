"""The training loop: configuration merging, subsets, augmentation, determinism, run folders."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.errors import BenchError, first_line
from benchmark.runs import load_model, load_run, save_run
from benchmark.train import (TrainConfig, balanced_subset, make_optimizer, pick_device, random_distortion,
                             resolve_config, to_float, train_model, training_loss)
from conftest import fit_steps
from models import create_model, parameter_count
from models.cnn import deskew


def test_config_layers_defaults_model_and_overrides():
    cfg = resolve_config("cnn", epochs=3, lr=None)
    assert cfg.epochs == 3  # explicit override wins
    assert cfg.augment is True  # the cnn's registered default
    assert resolve_config("mlp").schedule == "constant"
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        resolve_config("nope")
    for option, value in [("epochs", 0), ("batch_size", 0), ("lr", -1.0), ("train_subset", -5)]:
        with pytest.raises(BenchError, match=f"--{option.replace('_', '-')} {value}: expected a positive number"):
            resolve_config("cnn", **{option: value})


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BenchError, match="expected auto, cpu or cuda"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match="no CUDA device"):
            pick_device("cuda")


def test_balanced_subset_has_equal_classes_and_is_seeded():
    labels = np.repeat(np.arange(10), 50)
    picked = balanced_subset(labels, 100, seed=1)
    assert np.bincount(labels[picked], minlength=10).tolist() == [10] * 10
    assert len(np.unique(picked)) == 100
    np.testing.assert_array_equal(picked, balanced_subset(labels, 100, seed=1))
    assert not np.array_equal(picked, balanced_subset(labels, 100, seed=2))
    assert np.bincount(labels[balanced_subset(labels, 23, 0)], minlength=10).tolist() == [3, 3, 3] + [2] * 7
    assert len(balanced_subset(labels, 500, 0)) == 500
    with pytest.raises(BenchError, match="between 10 and 400 .the rarest digit has 40"):
        balanced_subset(labels[10:], 410, 0)  # 40 zeros left: 41 of each digit cannot be drawn


def test_random_distortion_identity_and_shift():
    x = torch.zeros(16, 1, 28, 28)
    x[:, 0, 10:18, 12:16] = 1.0  # a bar that stays inside the image when moved 2.5 pixels
    still = TrainConfig(max_rotation=0, max_scale=0, max_shear=0, max_shift=0)
    torch.testing.assert_close(random_distortion(x, still, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)
    shift_only = TrainConfig(max_rotation=0, max_scale=0, max_shear=0, max_shift=2.5)
    moved = random_distortion(x, shift_only, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape
    # bilinear resampling of a translation keeps the ink (none created, none lost) and moves its centre by the shift
    torch.testing.assert_close(moved.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.01, atol=0)
    (row_before, col_before, _), (row_after, col_after, _) = ink_centre_and_slant(x), ink_centre_and_slant(moved)
    offsets = torch.stack([row_after - row_before, col_after - col_before], 1)  # (16, 2) in pixels
    assert offsets.abs().max() <= 2.5 + 1e-4  # at most max_shift along each axis
    assert (offsets.abs().amax(1) > 1e-3).all()  # every image moved
    assert len({tuple(o) for o in offsets.round(decimals=3).tolist()}) == 16  # each by a shift of its own


def test_elastic_distortion_is_a_smooth_field_of_the_stated_strength():
    # A horizontal ramp (grey = column / 27) read back after resampling gives each pixel's horizontal
    # displacement exactly (bilinear sampling is exact on a linear ramp), away from the borders.
    ramp = (torch.arange(28.0) / 27).expand(64, 1, 28, 28).contiguous()
    cfg = TrainConfig(max_rotation=0, max_scale=0, max_shear=0, max_shift=0, elastic=34.0, elastic_sigma=4.0)
    shifted = random_distortion(ramp, cfg, torch.Generator().manual_seed(0))
    dx = ((shifted - ramp) * 27)[:, 0, 6:22, 6:22]  # pixels; interior, where no sample falls outside
    # uniform [-1, 1] noise (sd 1/sqrt(3)) smoothed by a unit-sum Gaussian of sd s keeps sd / (2 sqrt(pi) s)
    expected_sd = 34.0 / math.sqrt(3) / (2 * math.sqrt(math.pi) * 4.0)
    assert 0.7 * expected_sd < dx.std().item() < 1.3 * expected_sd
    neighbours = torch.corrcoef(torch.stack([dx[:, :, :-1].flatten(), dx[:, :, 1:].flatten()]))[0, 1]
    assert neighbours > 0.9  # smooth, unlike per-pixel noise (correlation 0)
    assert not torch.equal(dx[0], dx[1])  # each image gets its own field


def ink_centre_and_slant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image of x (B, 1, 28, 28): the ink's centre row, centre column and slant cov(row, col) / var(row)."""
    ink = x[:, 0].double()
    rows, cols = torch.meshgrid(torch.arange(28.0).double(), torch.arange(28.0).double(), indexing="ij")
    mass = ink.sum((1, 2))
    r0, c0 = (ink * rows).sum((1, 2)) / mass, (ink * cols).sum((1, 2)) / mass
    dr, dc = rows - r0.view(-1, 1, 1), cols - c0.view(-1, 1, 1)
    return r0, c0, (ink * dr * dc).sum((1, 2)) / (ink * dr * dr).sum((1, 2))


def test_deskew_stands_digits_upright_and_undoes_shears_and_shifts(mnist):
    x = to_float(mnist.test_images[:200])
    straight = deskew(x)
    r0, c0, slant = ink_centre_and_slant(straight)
    assert ink_centre_and_slant(x)[2].abs().mean() > 0.1  # MNIST digits lean
    assert slant.abs().max() < 0.02 and (r0 - 13.5).abs().max() < 0.05 and (c0 - 13.5).abs().max() < 0.05
    # the same digits sheared and shifted come out as (nearly) the same straightened images
    for shear, shift in [(0.4, 0.0), (-0.4, 0.2)]:
        theta = torch.tensor([[1.0, shear, shift], [0.0, 1.0, -shift]]).expand(len(x), 2, 3)
        moved = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
        assert (moved - x).abs().mean() > 0.1
        assert (deskew(moved) - straight).abs().mean() < 0.02
    blank = torch.zeros(1, 1, 28, 28)
    assert torch.equal(deskew(blank), blank)
    # cnn --set deskew=True is the plain cnn (same weights) reading the straightened images
    plain, straightening = create_model("cnn", width=4).eval(), create_model("cnn", width=4, deskew=True).eval()
    straightening.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(straightening(x[:8]), plain(straight[:8]))
        assert not torch.allclose(straightening(x[:8]), plain(x[:8]))


@pytest.fixture(scope="module")
def smoke(mnist):
    cfg = resolve_config("mlp", epochs=2, train_subset=2000)
    return [train_model("mlp", cfg, mnist, seed=3, device=torch.device("cpu"), show_progress=False)
            for _ in range(2)]


def test_training_learns_and_is_deterministic(smoke, mnist):
    first, second = smoke
    assert len(first.history) == 2 and first.history[1]["loss"] < first.history[0]["loss"]
    np.testing.assert_array_equal(first.test_probs, second.test_probs)
    assert first.test_probs.shape == (10000, 10) and first.val_probs.shape == (5000, 10)
    np.testing.assert_allclose(first.test_probs.sum(1), 1.0, atol=1e-5)
    test_error = (first.test_probs.argmax(1) != mnist.test_labels).mean()
    assert test_error < 0.25  # 2,000 images, 2 epochs: far better than chance (0.9)


def test_cnn_a_few_steps_reduce_the_loss(mnist):
    torch.manual_seed(0)
    cfg = resolve_config("cnn", lr=0.02, schedule="constant")
    model = create_model("cnn")
    assert parameter_count(model) > 100_000
    opt, sched = make_optimizer(model, cfg, steps=20)
    x, y = to_float(mnist.train_images[:128]), torch.from_numpy(mnist.train_labels[:128])
    losses = fit_steps(model, lambda x, y: training_loss(model, x, y, cfg.label_smoothing), [(x, y)] * 20, opt, sched)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_run_folder_round_trip(smoke, tmp_path):
    result = smoke[0]
    meta = {"name": "mlp-s3", "model": "mlp", "config": {"model_kwargs": {}}}
    save_run(tmp_path, "mlp-s3", meta, result.test_probs, result.val_probs, result.model.state_dict())
    run = load_run(tmp_path, "mlp-s3")
    assert json.loads((run.path / "meta.json").read_text())["model"] == "mlp"
    np.testing.assert_array_equal(run.test_probs, result.test_probs.astype(np.float32))
    model = load_model(run)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(model(x), result.model.eval()(x))
    # a run the current code cannot rebuild (another architecture, an option since removed) is a user error
    for config in ({"model_kwargs": {"hidden": 37}}, {"model_kwargs": {"no_such_option": 1}}):
        save_run(tmp_path, "mlp-old", {**meta, "config": config}, result.test_probs, None, result.model.state_dict())
        with pytest.raises(BenchError, match="run 'mlp-old' cannot be rebuilt with the current code .*train it again"):
            load_model(load_run(tmp_path, "mlp-old"))
    # overwriting keeps exactly one complete folder and no staging leftovers
    save_run(tmp_path, "mlp-s3", meta, result.test_probs)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mlp-old", "mlp-s3"]


def test_first_line_of_an_exception_for_one_line_errors():
    assert first_line(RuntimeError("size mismatch\n  for hidden.weight")) == "RuntimeError: size mismatch"
    assert first_line(KeyError("kept_weights")) == "KeyError: 'kept_weights'"
    assert first_line(RuntimeError()) == "RuntimeError"  # no message: no IndexError either


def test_missing_run_lists_what_exists(tmp_path, smoke):
    save_run(tmp_path, "a-run", {"model": "mlp"}, smoke[0].test_probs)
    with pytest.raises(BenchError, match=r"run 'b-run' not found .*a-run"):
        load_run(tmp_path, "b-run")


@pytest.mark.parametrize("keep_best", [False, True])
def test_keep_best_ends_with_the_weights_of_the_best_validation_epoch(mnist, monkeypatch, keep_best):
    import benchmark.train as train_module

    real_predict, states, calls = train_module.predict_probs, [], []

    def predict(model, images, device, batch_size=1000):  # during training only the validation set is predicted
        probs = real_predict(model, images, device, batch_size)
        calls.append(len(images))
        if len(calls) <= 3:  # the per-epoch validation passes: make epoch 2 look perfect
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            if len(calls) == 2:
                probs = np.eye(10, dtype=np.float32)[mnist.train_labels[mnist.validation_split()[1]]]
        return probs

    monkeypatch.setattr(train_module, "predict_probs", predict)
    cfg = resolve_config("mlp", epochs=3, train_subset=500, keep_best=keep_best)
    result = train_model("mlp", cfg, mnist, seed=0, device=torch.device("cpu"), show_progress=False)
    assert [row["val_errors"] for row in result.history][1] == 0
    assert result.kept_epoch == (2 if keep_best else 3)
    for key, value in result.model.state_dict().items():
        torch.testing.assert_close(value, states[result.kept_epoch - 1][key])
    assert not all(torch.equal(states[1][k], states[2][k]) for k in states[1])  # epochs 2 and 3 differ


class ConstantTeacher(torch.nn.Module):
    """Says 3 to every image, and keeps the images it was asked about."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.full((len(x), 10), -10.0).index_fill_(1, torch.tensor([3]), 10.0)


def test_a_student_learns_the_teachers_answers_on_exactly_the_unlabelled_images(mnist):
    cfg = resolve_config("mlp", epochs=3, labels=10, train_subset=300)
    teacher = ConstantTeacher()
    student = train_model("mlp", replace(cfg, teacher="constant"), mnist, seed=0, device=torch.device("cpu"),
                          show_progress=False, teacher=teacher)
    fit_idx = mnist.validation_split()[0]
    unlabelled = np.delete(fit_idx, balanced_subset(mnist.train_labels[fit_idx], 10, seed=0))[:300]
    torch.testing.assert_close(torch.cat(teacher.seen), to_float(mnist.train_images[unlabelled]))
    # 300 of its 310 targets say 3: so does the student; on its 10 labels alone it would say 3 about 1 in 10
    alone = train_model("mlp", cfg, mnist, seed=0, device=torch.device("cpu"), show_progress=False)
    assert (student.val_probs.argmax(1) == 3).mean() > 0.9
    assert (alone.val_probs.argmax(1) == 3).mean() < 0.5


def test_distillation_needs_the_teacher_and_a_labelled_subset(mnist):
    cfg = resolve_config("mlp", epochs=1, train_subset=100)
    with pytest.raises(BenchError, match="needs both --teacher RUN and --labels N"):
        train_model("mlp", replace(cfg, teacher="constant"), mnist, 0, torch.device("cpu"), False, ConstantTeacher())
    with pytest.raises(BenchError, match="has its own training loss"):
        train_model("glimpse", replace(cfg, labels=10, teacher="constant"), mnist, 0, torch.device("cpu"), False,
                    ConstantTeacher())


def test_all_train_fits_on_all_60000_images_and_holds_none_out(mnist, monkeypatch, tmp_path):
    import benchmark.train as train_module
    from typer.testing import CliRunner

    from benchmark.cli import app

    real_to_float, converted = train_module.to_float, []
    monkeypatch.setattr(train_module, "to_float", lambda images: converted.append(images) or real_to_float(images))
    cfg = resolve_config("mlp", epochs=1, batch_size=1000, all_train=True)
    result = train_model("mlp", cfg, mnist, seed=0, device=torch.device("cpu"), show_progress=False)
    fit_idx, val_idx = mnist.validation_split()
    # the training images are the 55,000 fit images and then the 5,000 validation images, each once
    np.testing.assert_array_equal(converted[0], mnist.train_images[np.concatenate([fit_idx, val_idx])])
    assert result.history[0]["steps"] == 60 and result.history[0]["val_errors"] is None
    assert result.val_probs is None and len(result.val_indices) == 0 and result.test_probs.shape == (10000, 10)
    for clash in ({"keep_best": True}, {"labels": 100}):  # both select on, or carve from, the held-out split
        with pytest.raises(BenchError, match="--all-train .* cannot be combined with --labels or --keep-best"):
            train_model("mlp", replace(cfg, **clash), mnist, seed=0, device=torch.device("cpu"), show_progress=False)
    # the command names the run -all and saves no validation probabilities (nothing may be selected on them)
    cli = CliRunner()
    common = ["--workspace", str(tmp_path), "--data-dir", str(mnist.source)]
    trained = cli.invoke(app, ["train", "--model", "mlp", "--epochs", "1", "--all-train", *common])
    assert trained.exit_code == 0, trained.output
    run = load_run(tmp_path, "mlp-all-s0")
    assert run.val_probs is None and run.meta["val_errors"] is None and run.meta["config"]["all_train"]
    assert "no validation held out" in trained.output


# The three kinds of state a resume must restore: plain weights and optimizer (cnn, with augmentation drawing from
# the seeded generator), a model-internal step count and the global torch RNG (the grid glimpse net's exploration
# and probes), and a second stream of unlabelled batches and a moving-average teacher (cowmask).
@pytest.mark.parametrize("model, overrides, kwargs", [
    ("cnn", {"train_subset": 300}, {"width": 4}),
    ("glimpse", {"train_subset": 300}, {"glimpses": 3, "policy": "grid", "explore": 1.0, "explore_steps": 6,
                                        "probe": True, "encoder_width": 16}),
    ("cowmask", {"train_subset": 200, "labels": 20}, {"width": 4, "calibrate": False}),
])
def test_a_run_stopped_after_an_epoch_resumes_to_the_same_weights(mnist, monkeypatch, tmp_path, model, overrides,
                                                                   kwargs):
    import benchmark.train as train_module

    cfg = resolve_config(model, epochs=3, batch_size=64, keep_best=True, **overrides)
    cfg.model_kwargs = kwargs
    cpu = torch.device("cpu")
    whole = train_model(model, cfg, mnist, seed=1, device=cpu, show_progress=False)

    real_predict, calls = train_module.predict_probs, []

    def stop_in_epoch_2(*args, **kw):  # the validation pass of epoch 2: after epoch 1's checkpoint, before epoch 2's
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_predict(*args, **kw)

    checkpoint = tmp_path / "checkpoints" / "run.pt"
    monkeypatch.setattr(train_module, "predict_probs", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_model(model, cfg, mnist, seed=1, device=cpu, show_progress=False, checkpoint=checkpoint)
    monkeypatch.setattr(train_module, "predict_probs", real_predict)
    saved = checkpoint.read_bytes()

    with pytest.raises(BenchError, match="holds epoch 1 of .*add --resume to continue it"):
        train_model(model, cfg, mnist, seed=1, device=cpu, show_progress=False, checkpoint=checkpoint)
    with pytest.raises(BenchError, match=r"another recipe \(epochs 3 -> 4\)"):
        train_model(model, replace(cfg, epochs=4), mnist, seed=1, device=cpu, show_progress=False,
                    checkpoint=checkpoint, resume=True)
    with pytest.raises(BenchError, match="another recipe"):
        train_model(model, cfg, mnist, seed=2, device=cpu, show_progress=False, checkpoint=checkpoint, resume=True)
    assert checkpoint.read_bytes() == saved  # the refusals left it as it was
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(saved[:len(saved) // 2])
    with pytest.raises(BenchError, match="damaged.pt is not a readable checkpoint .*delete it to start over"):
        train_model(model, cfg, mnist, seed=1, device=cpu, show_progress=False, checkpoint=damaged, resume=True)
    older = torch.load(checkpoint, weights_only=True)  # as an older version of the code would have written it
    del older["kept_weights"]
    torch.save(older, tmp_path / "older.pt")
    with pytest.raises(BenchError, match="older.pt cannot be resumed by this version of bench .KeyError"):
        train_model(model, cfg, mnist, seed=1, device=cpu, show_progress=False, checkpoint=tmp_path / "older.pt",
                    resume=True)

    resumed = train_model(model, cfg, mnist, seed=1, device=cpu, show_progress=False, checkpoint=checkpoint,
                          resume=True)
    assert resumed.resumed_after == [1] and whole.resumed_after == []
    assert [row["val_errors"] for row in resumed.history] == [row["val_errors"] for row in whole.history]
    assert resumed.kept_epoch == whole.kept_epoch
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    np.testing.assert_array_equal(resumed.test_probs, whole.test_probs)

"""CowMask masks and the Mean Teacher: kept proportion, smoothness, the moving average, a training step."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

from benchmark.errors import BenchError
from benchmark.train import make_optimizer, resolve_config, train_model
from models import create_model, parameter_count
from models.cowmask import cow_masks


@pytest.mark.parametrize("proportion", [0.0, 0.1, 0.5, 0.8, 1.0])
def test_masks_keep_the_requested_proportion(proportion):
    masks = cow_masks(64, 28, proportion, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (64, 1, 28, 28)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    kept = masks.mean((1, 2, 3))
    assert (kept - proportion).abs().max() <= (0.02 if 0 < proportion < 1 else 0.0)  # none or all: exactly


@pytest.mark.parametrize("option, message", [("proportion_range=0.5", "expected two numbers"),
                                             ("proportion_range=(0.9,0.2)", "expected LO <= HI, both in [0.0, 1.0]"),
                                             ("second_view_elastic=(-1,4)", "both in [0.0, inf]"),
                                             ("sharpen=0", "sharpen=0: above 0")])
def test_bad_cowmask_options_are_refused_before_training(option, message):
    from models.registry import parse_model_options

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_model_options("cowmask", [option, "second_view=True"])


def test_per_image_proportions():
    wanted = torch.tensor([0.2, 0.4, 0.6, 0.9])
    kept = cow_masks(4, 28, wanted, generator=torch.Generator().manual_seed(1)).mean((1, 2, 3))
    assert torch.allclose(kept, wanted, atol=0.02)


def neighbour_agreement(masks: torch.Tensor) -> float:
    """Share of horizontally and vertically adjacent pixel pairs with the same mask value."""
    horizontal = (masks[..., :, 1:] == masks[..., :, :-1]).float().mean()
    vertical = (masks[..., 1:, :] == masks[..., :-1, :]).float().mean()
    return float((horizontal + vertical) / 2)


def test_masks_are_smooth_not_white_noise():
    masks = cow_masks(64, 28, 0.5, generator=torch.Generator().manual_seed(2))
    white = (torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    assert neighbour_agreement(white) == pytest.approx(0.5, abs=0.02)  # chance level for p = 0.5
    assert neighbour_agreement(masks) > 0.85
    # larger sigma, larger blobs: agreement grows with the smoothing scale
    small = cow_masks(64, 28, 0.5, sigma_range=(1.0, 1.0), generator=torch.Generator().manual_seed(3))
    large = cow_masks(64, 28, 0.5, sigma_range=(8.0, 8.0), generator=torch.Generator().manual_seed(3))
    assert neighbour_agreement(large) > neighbour_agreement(small)


def test_teacher_is_the_moving_average_of_the_student():
    torch.manual_seed(0)
    model = create_model("cowmask", ema_decay=0.9)
    assert parameter_count(model) == parameter_count(create_model("cnn"))  # teacher not trainable
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    buffers_before = [b.clone() for b in model.teacher.buffers()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
        model.student.train()(torch.rand(8, 1, 28, 28))  # moves the student's batch-norm statistics only
    model.after_step()
    for before, t, s in zip(teacher_before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t, 0.9 * before + 0.1 * s)
    for before, t, s in zip(buffers_before, model.teacher.buffers(), model.student.buffers()):
        torch.testing.assert_close(t, s)  # the statistics are copied, not averaged...
        assert not torch.equal(t, before)  # ...so the teacher's are the student's new ones


@pytest.mark.parametrize("mode", ["mix", "erase"])
def test_training_step_updates_student_not_teacher_directly(mode):
    torch.manual_seed(0)
    model = create_model("cowmask", mode=mode, confidence=0.0).train()
    cfg = resolve_config("cowmask")
    opt, _ = make_optimizer(model, cfg, steps=1)
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.student.parameters()}  # the teacher is not the optimizer's
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    student_before = copy.deepcopy(model.student.state_dict())
    x, xu = torch.rand(8, 1, 28, 28), torch.rand(8, 1, 28, 28)
    loss = model.training_loss(x, torch.arange(8) % 10, 0.0, unlabelled=xu)
    supervised_only = model.training_loss(x, torch.arange(8) % 10, 0.0)
    assert loss.item() > supervised_only.item()  # the consistency term adds to the loss
    loss.backward()
    opt.step()
    for key, value in model.teacher.state_dict().items():  # weights and batch-norm statistics: untouched
        assert torch.equal(value, teacher_before[key]), key
    assert any(not torch.equal(value, student_before[key]) for key, value in model.student.state_dict().items()
               if value.is_floating_point() and "running" not in key)


def test_semi_supervised_loop_uses_unlabelled_images(mnist, tmp_path):
    cfg = resolve_config("cowmask", labels=20, epochs=1, train_subset=256, batch_size=64,
                         model_kwargs={"width": 4})
    result = train_model("cowmask", cfg, mnist, seed=0, device=torch.device("cpu"), show_progress=False)
    assert len(result.history) == 1 and result.test_probs.shape == (10000, 10)
    assert result.history[0]["steps"] == 4  # an epoch is one pass over the 256 unlabelled images, not the 20
    result.model.write_figures(tmp_path)
    assert (tmp_path / "cowmasks.png").stat().st_size > 1000
    with pytest.raises(BenchError, match="semi-supervised: give --labels"):
        no_labels = dataclasses.replace(resolve_config("cowmask", epochs=1), labels=None)
        train_model("cowmask", no_labels, mnist, 0, torch.device("cpu"), show_progress=False)


@pytest.mark.parametrize("mode", ["mix", "erase"])
def test_an_unsure_teacher_adds_no_consistency_and_the_weight_ramps_up(mode):
    torch.manual_seed(0)
    model = create_model("cowmask", mode=mode, rampup_steps=10)
    x, y, unlabelled = torch.rand(8, 1, 28, 28), torch.arange(8) % 10, torch.rand(8, 1, 28, 28)
    for p in model.teacher.parameters():  # a teacher of zeros answers uniformly: never confident
        p.data.zero_()
    supervised = model.training_loss(x, y, 0.0)
    assert torch.allclose(model.training_loss(x, y, 0.0, unlabelled), supervised)
    assert model.consistency_ramp() == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    for _ in range(10):
        model.steps_taken += 1
    assert model.consistency_ramp() == 1.0


class FixedTeacher(torch.nn.Module):
    """A stand-in teacher with logits answer(images) (N, 10): the targets it gives are known by construction."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def forward(self, images):
        return self.answer(images)


def left_half_mask() -> torch.Tensor:
    """(1, 1, 28, 28): keeps the left 14 columns."""
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :14] = 1.0
    return mask


def loss_pair(model, teacher: torch.nn.Module, mask: torch.Tensor, x, y, unlabelled):
    """Give `model` this teacher and `mask` as every image's CowMask; its training loss with and without the
    unlabelled images (the consistency term is their difference), without gradients."""
    model.teacher = teacher
    model.sample_masks = lambda n, device: mask.expand(n, 1, 28, 28)
    with torch.no_grad():
        return model.training_loss(x, y, 0.0, unlabelled), model.training_loss(x, y, 0.0)


def test_mix_target_follows_the_visible_ink_not_the_pixel_share():
    """Both images have ink only on the left; the mask keeps the left of image a: the mix shows a alone."""
    torch.manual_seed(0)
    model = create_model("cowmask", mode="mix", confidence=0.0, rampup_steps=0, consistency_weight=1.0).eval()
    left = left_half_mask()
    # an untrained teacher answers almost alike for any image; this one is sure image a is a 3 and image b a 7
    sure = FixedTeacher(lambda images: torch.eye(10)[[3, 7]] * 20.0)
    unlabelled = torch.rand(2, 1, 28, 28) * left  # ink on the left half only
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    loss, supervised = loss_pair(model, sure, left, x, y, unlabelled)
    with torch.no_grad():
        teacher = F.softmax(sure(unlabelled), dim=1)
        mixed = left * unlabelled  # a's left half + b's (blank) right half
        student = F.softmax(model.student(mixed), dim=1)
    expected = supervised + ((student - teacher) ** 2).sum(1).mean()  # share 1: the target is p(a)
    pixel_share = supervised + ((student - (teacher + teacher.roll(1, 0)) / 2) ** 2).sum(1).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert (loss - pixel_share).abs() > 1e-3


def test_calibration_re_estimates_the_teachers_batch_norm_statistics_on_clean_images():
    """`calibrate`: before each evaluation the teacher's batch-norm statistics become the plain average
    over the given images' batches (what a fresh copy measures with momentum None), not the statistics
    copied from the student; without it they stay as they were."""
    torch.manual_seed(0)
    images = torch.rand(64, 1, 28, 28)
    for calibrate in (False, True):
        model = create_model("cowmask", calibrate=calibrate)
        before = [b.clone() for b in model.teacher.buffers()]
        reference = copy.deepcopy(model.teacher)
        model.before_eval(images, "cpu", batch_size=16)
        after = list(model.teacher.buffers())
        if not calibrate:
            assert all(torch.equal(a, b) for a, b in zip(after, before))
            continue
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
        reference.train()
        with torch.no_grad():
            for start in range(0, 64, 16):
                reference(images[start:start + 16])
        for a, r in zip(after, reference.buffers()):
            torch.testing.assert_close(a, r)
        assert not model.teacher.training
        assert all(m.momentum == 0.1 for m in model.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("mode", ["mix", "erase"])
def test_readable_counts_only_perturbations_the_teacher_still_reads_as_their_sources(mode):
    """`readable`: a perturbed image counts only if the teacher reads it as (one of) its source digits.
    This teacher calls an image whose two halves hold the same ink a 3 and any other a 5. The clean images
    are uniform grey (3); the mask keeps the left half of each, so erasing leaves half an image and mixing
    joins halves of different greys: every perturbed image reads as 5, and no consistency is added."""
    torch.manual_seed(0)

    def halves(images):
        uneven = (images[..., :14].sum((1, 2, 3)) - images[..., 14:].sum((1, 2, 3))).abs() > 1e-3
        return torch.where(uneven[:, None], torch.eye(10)[5], torch.eye(10)[3]) * 20.0

    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    unlabelled = torch.tensor([0.2, 0.4, 0.2, 0.4]).view(4, 1, 1, 1).expand(4, 1, 28, 28)
    losses = {}
    for readable in (False, True):
        model = create_model("cowmask", mode=mode, readable=readable, confidence=0.5, rampup_steps=0).eval()
        losses[readable] = loss_pair(model, FixedTeacher(halves), left_half_mask(), x, y, unlabelled)
    assert losses[False][0] > losses[False][1] + 1e-3  # the consistency term counts without the gate
    torch.testing.assert_close(losses[True][0], losses[True][1])  # and is gated off with it


@pytest.mark.parametrize("mode", ["mix", "erase"])
def test_the_student_is_perturbed_from_the_second_view_and_the_teacher_reads_the_first(mode):
    torch.manual_seed(0)
    model = create_model("cowmask", mode=mode, rampup_steps=0, confidence=0.0, width=4)
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    first, second = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)

    def loss(unlabelled, second_view=None):
        torch.manual_seed(1)  # the same masks every call
        return model.training_loss(x, y, 0.0, unlabelled, second_view).item()

    assert loss(first, first) == pytest.approx(loss(first))  # a second view equal to the first changes nothing
    with_second = loss(first, second)
    assert with_second != pytest.approx(loss(first))  # the student's images come from the second view...
    assert with_second != pytest.approx(loss(second))  # ...and the teacher's targets from the first


def test_the_loop_passes_an_independent_second_augmentation_only_when_asked(mnist, monkeypatch):
    seen = []
    original = type(create_model("cowmask")).training_loss

    def spy(self, x, y, label_smoothing=0.0, unlabelled=None, second_view=None):
        seen.append((unlabelled, second_view))
        return original(self, x, y, label_smoothing, unlabelled, second_view)

    monkeypatch.setattr(type(create_model("cowmask")), "training_loss", spy)
    for second_view in (False, True):
        seen.clear()
        cfg = resolve_config("cowmask", labels=20, epochs=1, train_subset=128, batch_size=64,
                             model_kwargs={"width": 4, "second_view": second_view})
        train_model("cowmask", cfg, mnist, seed=0, device=torch.device("cpu"), show_progress=False)
        assert len(seen) == 2
        for unlabelled, second in seen:
            if second_view:  # same images, different random affines: close in ink, not equal pixel by pixel
                assert second.shape == unlabelled.shape and not torch.allclose(second, unlabelled)
                assert torch.allclose(second.sum((1, 2, 3)), unlabelled.sum((1, 2, 3)), rtol=0.5)
            else:
                assert second is None
    with pytest.raises(BenchError, match="second_view needs augmentation"):
        cfg = resolve_config("cowmask", labels=20, epochs=1, train_subset=128, augment=False,
                             model_kwargs={"second_view": True})
        train_model("cowmask", cfg, mnist, 0, torch.device("cpu"), show_progress=False)


def test_sharpened_targets_are_gated_on_the_teachers_unsharpened_confidence():
    """Erase mode, a teacher 60 % sure: gate 0.7 drops it even when sharpening would make it surer; with no
    gate the student is pulled to softmax(logits / T)."""
    torch.manual_seed(0)
    logits = torch.zeros(10)
    logits[4] = math.log(0.6 * 9 / 0.4)  # p(4) = 0.6, the rest share 0.4

    unsure = FixedTeacher(lambda images: logits.expand(len(images), 10))
    x, y, unlabelled = torch.rand(4, 1, 28, 28), torch.arange(4), torch.rand(4, 1, 28, 28)

    def loss(confidence, sharpen):
        model = create_model("cowmask", mode="erase", rampup_steps=0, confidence=confidence, sharpen=sharpen,
                             width=4).eval()
        erase_nothing = torch.ones(1, 1, 28, 28)
        with_unlabelled, supervised = loss_pair(model, unsure, erase_nothing, x, y, unlabelled)
        with torch.no_grad():
            student = F.softmax(model.student(unlabelled), dim=1)
        return with_unlabelled, supervised, student

    gated, supervised, _ = loss(confidence=0.7, sharpen=0.1)
    assert torch.allclose(gated, supervised)
    sharpened, supervised, student = loss(confidence=0.0, sharpen=0.5)
    target = F.softmax(logits / 0.5, dim=0)
    assert target[4] > 0.8  # sharper than the teacher's 0.6
    assert torch.allclose(sharpened, supervised + ((student - target) ** 2).sum(1).mean(), atol=1e-6)


def test_only_the_second_view_gets_the_elastic_distortion_asked_for(mnist, monkeypatch):
    import benchmark.train

    strengths = []  # (alpha, sigma) of every distortion the loop draws, in order
    original = benchmark.train.random_distortion

    def spy(x, cfg, gen):
        strengths.append((cfg.elastic, cfg.elastic_sigma))
        return original(x, cfg, gen)

    monkeypatch.setattr(benchmark.train, "random_distortion", spy)
    cfg = resolve_config("cowmask", labels=20, epochs=1, train_subset=128, batch_size=64,
                         model_kwargs={"width": 4, "second_view": True, "second_view_elastic": (34, 4)})
    train_model("cowmask", cfg, mnist, seed=0, device=torch.device("cpu"), show_progress=False)
    # per step: the labelled batch, the teacher's view, the student's view
    assert strengths == [(0.0, 4.0), (0.0, 4.0), (34.0, 4.0)] * 2
    with pytest.raises(ValueError, match="also give second_view=True"):
        create_model("cowmask", second_view_elastic=(34, 4))

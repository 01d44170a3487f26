"""Semi-supervised Mean Teacher with CowMask consistency (French, Oliver & Salimans, 2020).

A *student* ConvNet (`models.cnn.ConvNet`) learns by gradient descent; a *teacher* of the same shape holds an
exponential moving average of the student's weights (and copies of its batch-norm statistics) and is the
model that predicts. Each training step sees a labelled batch (cross-entropy on the student) and an
unlabelled batch (the training loop passes it as `unlabelled=`), on which the student must agree with the
teacher under a CowMask perturbation:

  erase: the student sees the image with the masked-out pixels set to 0 (the MNIST background); the teacher
         sees the clean image; only images the teacher is confident about (max prob >= `confidence`) count.
  mix:   two unlabelled images are combined through the mask, x = m * a + (1 - m) * b; the target is the
         teacher's probabilities mixed in proportion to the ink each image shows, p = s * p(a) + (1 - s) * p(b)
         with s = sum(m * a) / (sum(m * a) + sum((1 - m) * b));
         only pairs where the teacher is confident about both images count.
Consistency is the squared difference of probability vectors, weighted by `consistency_weight`, which ramps
up over the first `rampup_steps` steps. The kept share of image a's mask is drawn from `proportion_range`,
by default (0.8, 1.0) (mild masks, see below). Options:
  calibrate: (on by default) before each evaluation, re-estimate the teacher's batch-norm statistics on
             10,000 clean unlabelled training images (`before_eval`).
  readable:  a perturbed image counts only if the teacher still reads it as (one of) its source digit(s).
  second_view: the student's perturbed images are made from a second, independent augmentation of the
             unlabelled batch (the training loop draws it), not from the one the teacher reads.
  second_view_elastic: (alpha, sigma) in pixels: the second view is also elastically distorted
             (`benchmark.train.random_distortion`), a strong view for the student as in FixMatch.
  sharpen:   the temperature T of the teacher's targets, softmax(logits / T) (MixMatch, UDA); T < 1 pushes the
             student towards the teacher's answer on the images it is unsure of. 1 (default) is off.

What the runs on 1,000 labels showed (validation errors of 5,000 after each of 6 epochs). Until the last
probes below the defaults were proportion_range (0.25, 0.75) and no calibration, and "default" in this
history means those. With weight 10,
114 173 77 87 135 129; with weight 1 (the default since), 83 56 68 96 90 120; weight 1 with the
ink-proportional mix target, 102 114 67 106 89 98. Every run is best
around the end of the ramp and then gets worse, ending behind the supervised-only cnn on the same labels
(73), so the consistency term as it stands hurts once at full weight. Erase mode at weight 10 was worse
still (142, 363 after two epochs). Keeping the mixed batch out of the student's batch-norm running
averages (which the teacher copies and uses on clean images) did not fix it: 75 85 66 91 85 89. The
final 89 against 98 is within one run's epoch-to-epoch spread, no clear gain, so the simpler code stays
(that run made 195 test errors). A ramp over the whole run (2,500 steps): 105 69 68 78 85 99; a
stricter teacher (confidence 0.97): 116 95 85 107 100 105 - the same rise once the term is at full weight,
and both final figures no better than the default's 98. The same run with the consistency term off
(`consistency_weight=0`: supervised on the 1,000 labels, predicting with the moving average) gives
174 73 81 74 69 66 and 96 test errors: no rise, so the rise comes from the consistency term, and this
supervised-only variant (more steps than the 120-epoch cnn, plus the weight average) is the stronger
baseline - 129 test errors for `cnn --labels 1000` overstates what the labels alone give. A tenth of the weight
(0.1): 97 83 78 67 72 77, 113 test errors - between the two.

Why the term hurts on MNIST: two centred digits joined through a blob mask make a chimera that often looks
like a real digit of a third class. A supervised-only teacher (the weight-0 run) reads 21.8 % of the
chimeras of two different validation digits (kept proportion 0.25-0.75) as a third digit, half of those
with probability >= 0.9; the mix target, a blend of the two sources, then contradicts what the image shows.
With kept proportion 0.8-1.0 (image a dominates), 6.4 %. What followed from that, same 6 epochs:
  - mild masks (`proportion_range=(0.8, 1.0)`): 78 82 148 58 62 65, 120 test errors: the rise is gone, but
    no gain over the weight-0 run either (65 vs 66 on validation);
  - the `readable` gate (default masks): 73 109 67 75 75 81, 170 test errors: the rise is smaller, not gone;
  - hard targets (cross-entropy to the teacher's argmax, FixMatch-style; mixed one-hots by ink share):
    81 107 139 in mix mode, 163 519 in erase mode; both stopped after 3 and 2 epochs, code removed.
  - the teacher's own batch-norm statistics from its forward pass on the clean unlabelled batch, instead of
    copies of the student's: 75 60 69 71 86 100, 195 test errors; not kept.
Batch-norm statistics do matter at evaluation: re-estimating the teacher's on clean (unaugmented) unlabelled
images after training lowered the final validation errors of every run tried: default 98 -> 82, weight 0
66 -> 57, mild masks 65 -> 51, `readable` 81 -> 64, own statistics 100 -> 73 (so most of the gain is
augmented vs clean images, not mixed batches). Hence `calibrate`. With it, mild masks give 67 52 48 40 40 46
and 77 test errors, the best CowMask run so far (0.60 of `cnn --labels 1000`'s 129; half would be 64). The
same calibration with the consistency term off gives 70 66 63 59 56 56 and 102 test errors, so with both
sides calibrated the term helps (46 vs 56 on validation). On top of mild masks and calibration:
  - weight 4: 62 55 50 46 49 59, 92 test errors: the late rise is back, weight 1 stays;
  - `second_view` (the student's mix is made from its own, independent random affine of the unlabelled
    images, so the term also asks for agreement across augmentations): 73 56 45 42 38 45, 74 test errors,
    level with the single view (46, 77). With 5,000 validation images one run's count has a standard error of
    about sqrt(40) ~ 6, so differences this small are noise;
  - a slower teacher (`ema_decay=0.999`, with `second_view`): 678 100 71 63, stopped after 4 epochs;
  - twice the schedule (12 epochs): 83 55 44 45 42 37 40 36 40 42 39 41, 82 test errors: validation sits
    near 40 from epoch 6 on, so more of the same training does not close the gap;
  - the second-view run ending at its best validation epoch (`--keep-best`, epoch 5, val 38): 73 test errors.
The supervised `cnn --labels 1000`, re-run on the same machine and thread count: 152 test errors (129 on the
first machine), so CowMask with these options sits at about half of it there, but not robustly. Paired seed
for seed (seed S draws both the 1,000 labels and the initialisation; one torch thread, one machine), supervised
152 / 102 / 104 against second-view CowMask 74 / 79 / 84 test errors for seeds 0 / 1 / 2: 0.49, 0.77, 0.81,
0.66 on the means. Seed 0's labels make a weak supervised model; CowMask's own figure moves far less.
Where that teacher errs (seed 1, its 54,000 unlabelled images): 472 errors, only 73 with probability >= 0.9, so
the gate keeps the consistency term off nearly every image it gets wrong; the errors are unsure ones, not
confident ones reinforced. Probes on seed 1 aimed at them (validation, test errors; second view 49, 79): gate 0.7
40, 72; gate 0.5 43, 70; gate 0.7 with `sharpen` 0.5 44, 69; gate 0.7 with `second_view_elastic` (34, 4) 50, 62:
all within about 1.5 standard errors on validation. Gate 0.7 on seeds 0 / 1 / 2: 72 / 72 / 80 test errors, 0.63
of the supervised on the means (0.66 at gate 0.9), validation means 44 against 46: noise, so the gate stays 0.9.
The peak learning rate, seed 1 with the second view: 0.1 gives 51, 70; 0.025 gives 54, 76; 0.05 stays (49, 79).

What reaches half the supervised errors is one round of self-training after it: the gate-0.7 teacher's
probabilities on the 54,000 unlabelled images become the targets of a fresh `cnn` trained on all 55,000 with the
full-data recipe (`bench train --model cnn --labels 1000 --seed S --teacher RUN`): seeds 0 / 1 / 2 make 43 / 39 /
44 test errors (val 25 / 30 / 33), 0.35 of the supervised on the means. The student reproduces most of its
teacher's mistakes on the images it trained on (seed 0: 277 of the teacher's 451), so it does not gain from
corrected pseudo-labels; it gains from learning on 55,000 real, unmixed digits under the full-data recipe, where
the mean teacher learns on masked chimeras and a labelled stream of 1,000.

CowMask (`cow_masks`): per-pixel Gaussian noise, smoothed by a Gaussian filter whose sigma is drawn
log-uniformly per image, thresholded at that image's own quantile so exactly the requested proportion of
pixels is kept. Generated for the whole batch at once: per-image kernels run as one grouped, separable
convolution, and the per-image thresholds come from one sort of the batch.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from models.cnn import ConvNet
from models.registry import register_model


def smooth_noise(noise: torch.Tensor, sigma: torch.Tensor, radius: int, padding: int) -> torch.Tensor:
    """Filter each of n noise fields (n, H, W) with its own Gaussian of sd `sigma` (n,) pixels, truncated at
    `radius` and of unit sum: (n, H + 2 padding - 2 radius, W + ...).

    Separable (rows, then columns), one grouped convolution for the whole batch. `padding` zeros are added on
    each side: `radius` keeps the size, 0 keeps only the part every tap covers (draw the noise with a margin).
    Also the elastic distortion of `benchmark.train.random_distortion`: the same field, unthresholded.
    """
    n = noise.shape[0]
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)  # (n, 2r+1)
    smooth = F.conv2d(noise.unsqueeze(0), kernels.view(n, 1, 1, -1), padding=(0, padding), groups=n)
    return F.conv2d(smooth, kernels.view(n, 1, -1, 1), padding=(padding, 0), groups=n).squeeze(0)


def interval(name: str, value, low: float, high: float, ordered: bool = True) -> tuple[float, float]:
    """A model option that is a pair of numbers (lo, hi), both in [low, high] (and lo <= hi if `ordered`);
    ValueError naming the option otherwise."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected two numbers, e.g. {name}=(LO,HI)") from None
    if not (low <= lo <= high and low <= hi <= high and (lo <= hi or not ordered)):
        raise ValueError(f"{name}={value!r}: expected {'LO <= HI, ' if ordered else ''}both in [{low}, {high}]")
    return lo, hi


def cow_masks(n: int, size: int = 28, proportion: float | torch.Tensor = 0.5,
              sigma_range: tuple[float, float] = (3.0, 12.0), generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """`n` CowMasks, float (n, 1, size, size) of 0/1, with `proportion` (scalar or (n,)) of pixels equal to 1.

    Sigma is drawn log-uniformly from `sigma_range` per mask; larger sigma gives larger blobs.
    """
    log_lo, log_hi = math.log(sigma_range[0]), math.log(sigma_range[1])
    sigma = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, generator=generator))
    noise = torch.randn(n, size, size, generator=generator)
    radius = int(math.ceil(3 * sigma_range[1]))
    smooth = smooth_noise(noise, sigma, radius, padding=radius).view(n, -1)
    # Threshold each mask at its own order statistic so that exactly round(p * size^2) pixels are kept.
    keep = torch.as_tensor(proportion, dtype=torch.float32).expand(n)
    dropped = ((1 - keep) * size * size).round().long().clamp(0, size * size)
    # the threshold is the (dropped + 1)-th smallest value; past the last one, +inf drops every pixel
    ordered = torch.cat([smooth.sort(dim=1).values, torch.full((n, 1), math.inf)], dim=1)
    threshold = ordered.gather(1, dropped[:, None])
    return (smooth >= threshold).float().view(n, 1, size, size).to(device)


class MeanTeacher(nn.Module):
    uses_unlabelled = True  # the training loop feeds an unlabelled batch to training_loss

    def __init__(self, width: int = 32, ema_decay: float = 0.99, mode: str = "mix",
                 consistency_weight: float = 1.0, confidence: float = 0.9,
                 proportion_range: tuple[float, float] = (0.8, 1.0), sigma_range: tuple[float, float] = (3.0, 12.0),
                 rampup_steps: int = 1000, readable: bool = False, calibrate: bool = True,
                 second_view: bool = False, sharpen: float = 1.0,
                 second_view_elastic: tuple[float, float] | None = None):
        super().__init__()
        self.rampup_steps, self.steps_taken = rampup_steps, 0
        if mode not in ("mix", "erase"):
            raise ValueError(f"mode {mode!r}: expected mix or erase")
        if not (0 <= ema_decay <= 1 and 0 <= confidence <= 1 and sharpen > 0 and rampup_steps >= 0):
            raise ValueError(f"ema_decay={ema_decay}, confidence={confidence}: expected values in [0, 1]; "
                             f"sharpen={sharpen}: above 0; rampup_steps={rampup_steps}: 0 or more")
        proportion_range = interval("proportion_range", proportion_range, 0.0, 1.0)
        sigma_range = interval("sigma_range", sigma_range, 0.1, math.inf)
        self.student = ConvNet(width)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False).eval()  # it only ever predicts
        self.ema_decay, self.mode, self.confidence = ema_decay, mode, confidence
        self.readable, self.calibrate = readable, calibrate
        self.second_view = second_view  # the training loop then passes a second augmentation of the batch
        if second_view_elastic is not None:  # ...distorted by these TrainConfig fields on top of the affine map
            if not second_view:
                raise ValueError("second_view_elastic distorts the second view: also give second_view=True")
            alpha, sigma = interval("second_view_elastic", second_view_elastic, 0.0, math.inf, ordered=False)
            self.second_view_distortion = {"elastic": alpha, "elastic_sigma": sigma}
        self.consistency_weight, self.sharpen = consistency_weight, sharpen
        self.proportion_range, self.sigma_range = proportion_range, sigma_range

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher only ever predicts; its BN statistics come from the student
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    def sample_masks(self, n: int, device) -> torch.Tensor:
        """Masks (n, 1, 28, 28), each keeping a proportion of pixels drawn uniformly from `proportion_range`."""
        lo, hi = self.proportion_range
        return cow_masks(n, 28, lo + (hi - lo) * torch.rand(n), self.sigma_range, device=device)

    def training_loss(self, x, y, label_smoothing: float = 0.0, unlabelled: torch.Tensor | None = None,
                      second_view: torch.Tensor | None = None):
        """Cross-entropy on the labelled (x (B, 1, 28, 28), y (B,)) plus the weighted consistency term on
        `unlabelled` (U, 1, 28, 28), which the teacher reads. The student's masked or mixed images are made
        from `second_view` (the same U images, augmented independently) when given, else from `unlabelled`.
        """
        loss = F.cross_entropy(self.student(x), y, label_smoothing=label_smoothing)
        if unlabelled is None:
            return loss
        with torch.no_grad():
            teacher_logits = self.teacher(unlabelled)
        teacher_probs = F.softmax(teacher_logits, dim=1)
        student_view = unlabelled if second_view is None else second_view
        masks = self.sample_masks(len(unlabelled), unlabelled.device)
        # Only targets the teacher is confident about count (judged before sharpening). A uniform guess is
        # never confident, so the collapse to one answer for every image (always consistent) earns nothing.
        confident = (teacher_probs.max(1).values >= self.confidence).float()
        if self.sharpen != 1.0:
            teacher_probs = F.softmax(teacher_logits / self.sharpen, dim=1)
        answers = teacher_probs.argmax(1)
        if self.mode == "erase":
            perturbed, targets, sources = student_view * masks, teacher_probs, answers[:, None]
        else:
            partner = torch.roll(torch.arange(len(unlabelled), device=unlabelled.device), 1)
            perturbed = masks * student_view + (1 - masks) * student_view[partner]
            # Image a's share of the mix is its share of the visible ink, not of the pixels: MNIST is mostly
            # blank background, so a mask keeping half the pixels of a can keep almost none of its strokes.
            # (With the pixel share, validation errors rose once the consistency weight was fully ramped up.)
            ink_a = (masks * student_view).sum((1, 2, 3))
            ink = ink_a + ((1 - masks) * student_view[partner]).sum((1, 2, 3))
            share = torch.where(ink > 0, ink_a / ink.clamp(min=1e-12), masks.mean((1, 2, 3)))[:, None]
            targets = share * teacher_probs + (1 - share) * teacher_probs[partner]
            confident = confident * confident[partner]
            sources = torch.stack([answers, answers[partner]], dim=1)
        if self.readable:  # the teacher must still read the perturbed image as (one of) its source digit(s)
            with torch.no_grad():
                read = self.teacher(perturbed).argmax(1)
            confident = confident * (read[:, None] == sources).any(1).float()
        student_logits = self.student(perturbed)
        per_image = ((F.softmax(student_logits, dim=1) - targets) ** 2).sum(1) * confident
        return loss + self.consistency_ramp() * self.consistency_weight * per_image.mean()

    def consistency_ramp(self) -> float:
        """exp(-5 (1 - t)^2) with t = steps taken / rampup_steps, capped at 1 (Laine & Aila 2017).

        Without it the consistency term, at full weight from the first step, pulls the untrained student to
        the one answer that is always consistent - the same prediction for every image - before the labels
        can teach it anything (1,000 labels: 88 % validation error after 200 steps, against 1.8 % without
        the term).
        """
        t = min(1.0, self.steps_taken / self.rampup_steps) if self.rampup_steps > 0 else 1.0
        return math.exp(-5.0 * (1.0 - t) ** 2)

    @torch.no_grad()
    def after_step(self):
        """Teacher <- decay * teacher + (1 - decay) * student; batch-norm statistics are copied."""
        self.steps_taken += 1
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(self.ema_decay).add_(s.detach(), alpha=1 - self.ema_decay)
        for t, s in zip(self.teacher.buffers(), self.student.buffers()):
            t.copy_(s)

    @torch.no_grad()
    def before_eval(self, images: torch.Tensor, device, count: int = 10000, batch_size: int = 500):
        """With `calibrate`: re-estimate the teacher's batch-norm statistics on the first `count` of `images`
        (N, 1, 28, 28), clean training images, as a plain average over batches.

        Why: the statistics the teacher copies from the student were gathered on the student's weights, not
        the teacher's averaged ones, and partly on masked or mixed batches, never on clean images alone.
        """
        if self.calibrate:  # reset, then a cumulative average (momentum None) over the batches; momenta restored
            batches = images[:count].split(batch_size)
            update_bn(batches, self.teacher, device=torch.device(device))

    def write_figures(self, folder: Path):
        """A grid of sample CowMasks (the kind this model trained with) as cowmasks.png."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from torchvision.utils import make_grid

        masks = self.sample_masks(32, "cpu")
        grid = make_grid(masks, nrow=8, padding=2, pad_value=0.5)[0].numpy()
        fig, ax = plt.subplots(figsize=(8, 4.4))
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"CowMask samples ({self.mode}); kept proportion {self.proportion_range}, sigma {self.sigma_range}")
        ax.axis("off")
        fig.savefig(Path(folder) / "cowmasks.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


@register_model("cowmask", "Mean Teacher with CowMask consistency (semi-supervised, needs --labels)",
                epochs=6, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                schedule="onecycle", label_smoothing=0.0, augment=True, labels=1000)
def build_cowmask(width: int = 32, ema_decay: float = 0.99, mode: str = "mix", consistency_weight: float = 1.0,
                  confidence: float = 0.9, rampup_steps: int = 1000,
                  proportion_range: tuple[float, float] = (0.8, 1.0), readable: bool = False,
                  calibrate: bool = True, second_view: bool = False, sharpen: float = 1.0,
                  second_view_elastic: tuple[float, float] | None = None) -> nn.Module:
    return MeanTeacher(width, ema_decay, mode, consistency_weight, confidence, proportion_range,
                       rampup_steps=rampup_steps, readable=readable, calibrate=calibrate, second_view=second_view,
                       sharpen=sharpen, second_view_elastic=second_view_elastic)

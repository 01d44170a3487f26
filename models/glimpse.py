"""Active attention: classify a digit from K single-pixel glimpses whose positions the network chooses.

The model starts from an empty state and a uniform class guess. At each step t = 1..K:
  1. policy    - an MLP maps (state code z, current class probabilities) to an offset that is added to the
                 step's learned base position; a sigmoid scales the result to a continuous coordinate
                 (i, j) in [0, 27] x [0, 27] (row, column).
  2. read      - the grey level at (i, j) by bilinear interpolation of the 4 neighbouring pixels. The value
                 is differentiable in i and j, so the policy learns by plain backpropagation (no REINFORCE).
  3. update    - the reading (i, j, grey) is embedded by a point MLP and added to a recurrent SoftOrdering
                 histogram (`models.softorder.SoftHistogram` of one point: soft bin memberships of every
                 embedded feature). The state is the running mean of these histograms, so it is an
                 order-invariant summary of the readings so far; an MLP encodes it (with t / K) into z.
  4. predict   - a linear head on z gives the step's logits; their softmax is the next step's "current
                 class probabilities".
Every step's prediction is trained (the loss is the mean cross-entropy over the K steps), so the first
glimpses learn to be informative on their own and `per_step_accuracy` reports a meaningful curve.

What backpropagation through pixel reads needs, as found in short CPU runs (validation split only):
  - spread-out starting points: the gradient of a read is local (zero over blank background), so glimpses
    that all start at the centre stay there. Each step's position starts on the pixel nearest a sunflower
    spiral over the digit area (`sunflower`); a learned per-step base and the state-dependent policy offset
    move it, both starting at zero.
  - slow moves (`move_scale`): base and offset enter the coordinate multiplied by move_scale = 0.1. Adam
    moves every parameter by about its learning rate per step whatever the gradient's size, and the
    gradient of a read is noisy, so at full scale the positions random-walked away from their starts
    (K = 25, 15 epochs: into a band at the bottom of the image, 61.8 % test accuracy).
  - Fourier features of (i, j) in the point embedding (`models.softorder.PointEmbedding`): a plain MLP on
    raw coordinates tells 25 nearby positions apart only slowly (K = 25, 2 epochs: 67 % -> 79 % validation).
  - a detached policy input, as in RAM's location network: each coordinate is trained for what its own
    reading adds, not through the chain of later moves, which made the 25-step recurrence unstable.
  - agreement of bilinear and rounded reading. A read between pixels blends up to four of them, more than
    one pixel's worth, and a policy trained on bilinear reads learns to sit between pixels: rounding then
    cost 4-5 points (K = 2: 37.7 % bilinear, 32.7 % rounded). So training reads the pixel nearest the
    coordinate, with the bilinear slope there as the coordinate's gradient (straight-through), and the
    loss adds `snap` * mean sin^2(pi * coordinate), zero at pixel centres, which keeps the continuous
    coordinates on the pixels they read. The pull must be strong: most pixels are exactly 0 and the model
    learns to treat a faint grey as "a stroke is near", so even coordinates 0.01-0.1 pixel off centre,
    whose bilinear read lets a bright neighbour leak in, moved the first glimpse's validation accuracy by
    2 points. With snap = 10 the 15-epoch K = 25 run's bilinear and rounded validation accuracies differed
    by 0.72 points, with snap = 100 by 0.02 (K = 2: 0.86 and 0.00), at the same rounded accuracy.
  - a coarse-to-fine read does not help: reading a Gaussian-blurred image (sigma 3 px, falling linearly to
    0 over the first 2,000 steps, snap off while blurred, move_scale 1) left K = 2's glimpses exactly on
    their start pixels and its validation errors unchanged (3,342 vs 3,343 of 5,000); tried and removed.
Limitations: the state-dependent offsets stay well under a pixel, so the learned policy is close to a fixed
set of K positions (the sunflower's pixels): in 2- and 5-epoch runs, K = 2 and K = 25 validation accuracies
equal those of fixed positions (move_scale = 0) within 0.2 points. Local read gradients rarely reward a
large move.

Exploration (`explore` = sigma > 0, off by default): a policy that can jump. During training each glimpse is
read at the pixel nearest a Gaussian sample around the policy's coordinate, and the coordinate learns by
REINFORCE (return: minus the cross-entropy of this and later steps, batch-mean baseline) instead of the read
slope; sigma falls linearly to 0 over `explore_steps`, then the classifier trains on the pixels at the
coordinates themselves. There is no snap (any pull to pixel centres, even 2, pinned the glimpses to their
starts). K = 2, explore 2 px, move_scale 1, 15 epochs: the second glimpse now depends on the first reading
(spread 2.4 px across test images) and validation accuracy is 38.74 % bilinear, 35.92 % rounded, against
33.1 % for the default - but the two readings differ by 2.8 points, well over the 0.5 asked, because the
coordinates end between pixels. Pulling them to centres after the exploration (snap 5, 20, 100) closed the
gap only by losing the gain (33.4 %, 31.7 %, 31.4 % rounded). With `quantise` the policy commits to the pixel
centre nearest its coordinate (rounded in the forward pass, straight-through for the REINFORCE gradient)
and explores around it, so both readings are the same pixel by construction: K = 2 validation 35.68,
31.04 and 36.98 % for seeds 0, 1 and 2 (the policy found depends on the seed); K = 25 83.50 %, worse than
unquantised (90.40 % bilinear, 88.82 % rounded) and the default. Wider or longer exploration (quantised, K = 2,
seeds 0-2, validation): sigma 3 px over 8,000 steps 35.54 / 34.54 / 34.88 %, sigma 4 px over 5,000 steps
33.96 / 35.98 / 35.38 % - the seeds agree better, the mean barely moves; the latter over 30 epochs instead of
15 (the classifier trains longer on the settled positions) fell to 30.02 % for seed 0. A state-dependent
REINFORCE baseline (the return the remaining steps would get at the cross-entropy from before the look) on the
latter gave 34.78 / 33.86 / 35.46 %: no gain over the batch mean, not kept.

Where the glimpses start (`start`: K pixel indices, row-major) decides which of these seed-dependent
policies is found. Started on the best pair of the exhaustive two-pixel search over the training images,
(406, 409) (`bench bound --subset train`), the sigma-2 quantised K = 2 runs reach 36.18 / 35.94 / 34.92 %
validation and 36.64 / 36.24 / 36.55 % test for seeds 0-2, and the second glimpse still moves with the
first reading (2 to 10 distinct pixels per seed).

A policy over pixels (`policy="grid"`, a departure from the continuous coordinate the issue asks for): every
step the policy MLP gives one number per pixel, its estimate of how much reading that pixel now would lower
the cross-entropy (the conditional mutual information of pixel and label given the readings so far, in the
discriminative form of Gadgil, Covert and Lee 2024, "Estimating conditional mutual information for dynamic
feature selection"), and the glimpse reads the best pixel not read yet: a greedy information-maximising
policy that can go anywhere in one step and never repeats a pixel. The estimates learn by regression on the
drop in cross-entropy each reading actually gave, for the pixel read; to visit every pixel, a share
`explore` of the glimpses (falling linearly to 0 over `explore_steps`) reads a random unread pixel instead.
Readings are whole pixels, so bilinear and rounded readings are the same pixel by construction.
Measured (explore 1 over 4,000 steps, 15 epochs, validation): K = 25 reaches 89.52 % for seeds 0 and 1, level
with the coordinate policy's 89.60 %, but far sooner (seed 0: 50.9 % test after 3 glimpses against 38.4 %);
its glimpses depend on the readings (3 distinct second pixels, ~70 distinct 25th). A plain MLP given the same
25 readings reaches ~91 %: the encoder costs 1-2 points, which `encoder_width` 512 wins back (91.06 %, test
91.00 %), and the rest of the gap is in the pixels chosen, the late choices being the weak ones (some blank
corner pixels). Twice the schedule (30 epochs, 512 wide) reaches 92.52 % validation, 92.24 % test; four times (60
epochs) 92.50 % and 92.56 %, no gain on validation; a 2 x 1,024 encoder was behind the 512-wide one after 9 of 15
epochs (validation errors 674 against 590) and was stopped. K = 2 is worse than the coordinate policy (27.8 %
against 33-36 %): the estimates settle on whichever few pixels were best when the random reads stopped. A first
design, Covert et al.'s (2023) relaxed choice (straight-through Gumbel-softmax over pixels), learned too slowly:
the scores must grow far beyond the Gumbel noise before a choice repeats, and until then the classifier reads
random pixels.
`canvas` (grid only): the policy also sees the readings as an image, the grey levels read so far and a 0/1 mask
of where, as the selector of Covert et al. and the value network of Gadgil et al. see their masked input. With
the 256-wide encoder it learned more slowly (K = 25, validation errors after epoch 4: 1,571 against 1,188
without it; stopped there); with the 512-wide encoder, over the full 15 epochs, it was better over the first
glimpses (test 50.97 % after 3 against 46.27 %) but level at 25 (91.02 % test, 90.58 % validation against 91.00 /
91.06 %), so it stays off by default. It is kept because the one published reference on raw MNIST pixels that
reaches the issue's target is of this kind: the MNIST notebook of Covert et al.'s code (github iancovert/dynamic-selection,
notebooks/mnist.ipynb) prints 95.12 / 96.08 % test accuracy with 20 / 25 pixels, from MLPs on the masked image
and mask (2 x 512, dropout 0.3), a predictor pretrained on random masks for 53 epochs and ~150 more epochs of
joint training on a GPU - some ten times the 15 epochs a run gets here.
`discount` (grid only, default 0): each read is credited with its own drop plus `discount` times the credit
of the next read (`discounted_gains`), so with 1 a read is worth what it and all later reads gained under the
current policy, and a look that only tells where to look next gets the value of that next look. K = 2, seeds
0-2, validation after glimpse 2: 33.98 / 28.90 / 32.58 % with discount 1, 27.80 / 30.34 / 30.40 % one-step:
about 2 points on the means, within the seed spread. At K = 25 (512-wide encoder) it trailed the one-step value
from the first epoch (validation errors after epoch 3: 2,079 against 1,510) and was stopped there.
`gain` (grid only): what a read's estimate regresses on, the drop in the cross-entropy with the label (default,
as Gadgil et al.) or, with "entropy", the drop in the entropy of the model's own class probabilities. Both have
the conditional mutual information of pixel and label as their mean when the probabilities are calibrated (the
classifier's training and validation accuracies agree within a point at K = 25), but the entropy drop does not
depend on which label the image happens to have, so it should be the less noisy target for the rare uncertain
images that decide the late glimpses. Measured (K = 25, 512 wide): worse from the first epoch, validation errors
1,333 against 875 after epoch 6, stopped there; perhaps because the model is confidently wrong on the images whose
reads matter most, so their entropy drops look like nothing. The default stays the cross-entropy.
`probe` (grid only, default 0): the estimates learn only for the pixels read, and after the random reads stop only
for the greedy choices, so nothing tells the policy that a pixel it ranks low is worth reading. `bench glimpse-gains`
measures this (30-epoch K = 25 model, 500 validation images, 16 random unread pixels per step): the estimate of
the pixel read matches the drop it gives at every step (0.278 / 0.269 at step 1, 0.064 / 0.055 at step 10), but
over random unread pixels the correlation of estimate and drop is within +-0.06 of zero at every step, and from
step ~15 the pixels read are mostly blank (ink in 7-21 % of images, against 41-57 % over the first three steps).
With `probe` = P, each training step also reads P random unread pixels counterfactually (no gradient into the
classifier, the path unchanged) and regresses their estimates on the drops they would have given. Measured (P = 1,
K = 25, 512 wide, 15 epochs): the unread pixels' estimates become calibrated in mean, correlate with their drops
at 0.06-0.21 over steps 2-7, and the late glimpses read ink 2-3 times as often, but validation accuracy is 90.52 %
against 91.06 % without (test 90.71 / 91.00 %), at 1.4x the time: the pixels read late still lower the
cross-entropy by about nothing, so the late plateau is as much the classifier's as the ranking's. Off by default.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model
from models.softorder import PointEmbedding, SoftHistogram

SIDE = 28
GOLDEN_ANGLE = math.pi * (3 - math.sqrt(5))


def sunflower(points: int, radius: float = 10.0) -> torch.Tensor:
    """(points, 2) coordinates (row, col) spread evenly over a disc about the image centre (Vogel's spiral).

    Point t sits at radius `radius * sqrt((t - 1) / points)` and angle t * golden angle: the first look goes
    to the centre (MNIST digits are centred by their centre of mass), later points spiral out and every
    prefix of the sequence covers the disc about evenly.
    """
    t = torch.arange(1, points + 1, dtype=torch.float32)
    r, angle = radius * torch.sqrt((t - 1) / points), t * GOLDEN_ANGLE
    return (SIDE - 1) / 2 + torch.stack([r * torch.sin(angle), r * torch.cos(angle)], dim=1)


def read_pixels(images: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Grey levels (B,) of images (B, 1, 28, 28) at coordinates (B, 2) = (row, col) in [0, 27].

    Bilinear interpolation of the 4 neighbouring pixels, differentiable in the coordinates; at integer
    coordinates it is exactly that pixel's grey level.
    """
    flat = images.reshape(images.shape[0], SIDE * SIDE)
    corner = coords.detach().floor().clamp(max=SIDE - 2)  # top-left neighbour; at 27 the weight moves to 27
    fi, fj = (coords - corner).unbind(1)
    top_left = (corner[:, 0] * SIDE + corner[:, 1]).long().unsqueeze(1)
    neighbours = top_left + torch.tensor([0, 1, SIDE, SIDE + 1], device=images.device)
    v00, v01, v10, v11 = flat.gather(1, neighbours).unbind(1)
    return (1 - fi) * ((1 - fj) * v00 + fj * v01) + fi * ((1 - fj) * v10 + fj * v11)


def pixel_coords(pixels: torch.Tensor) -> torch.Tensor:
    """Row-major pixel indices (B,) -> their (row, col) coordinates (B, 2)."""
    return torch.stack([pixels // SIDE, pixels % SIDE], dim=1)


class GlimpseRun(NamedTuple):
    """What `GlimpseNet.run` gives for B images and K glimpses."""
    logits: torch.Tensor  # (K, B, 10): each step's class logits
    coords: torch.Tensor  # (K, B, 2): where each glimpse looked, (row, col)
    # (K, B) or None: with policy="grid" each read pixel's estimated gain; training a coordinate policy with
    # exploration, the (scaled) log-likelihood of each explored sample
    policy_terms: torch.Tensor | None
    # with P probes per step (training with `probe` = P, or `run(probes=P)`), else None: (K, P, B, 10) the logits had
    # each probed pixel been read instead, and (K, P, B) the probed pixels' estimated gains
    probe_logits: torch.Tensor | None
    probe_terms: torch.Tensor | None


class GlimpseNet(nn.Module):
    def __init__(self, glimpses: int = 25, features: int = 64, bins: int = 8, hidden: int = 256,
                 snap: float = 100.0, move_scale: float = 0.1, radius: float = 10.0, explore: float = 0.0,
                 explore_steps: int = 4000, quantise: bool = False, start: tuple[int, ...] | None = None,
                 policy: str = "coordinate", encoder_width: int = 256, discount: float = 0.0,
                 gain: str = "cross_entropy", canvas: bool = False, probe: int = 0):
        super().__init__()
        if glimpses < 1:
            raise ValueError(f"glimpses={glimpses}: need at least one glimpse")
        if policy not in ("coordinate", "grid"):
            raise ValueError(f"policy={policy!r}: expected 'coordinate' or 'grid'")
        if policy == "grid" and not (0 < explore <= 1 and start is None and glimpses <= SIDE * SIDE):
            raise ValueError("policy='grid' learns from glimpses at random pixels: give explore in (0, 1] (their "
                             f"first share), no start, and at most {SIDE * SIDE} glimpses")
        if not 0 <= discount <= 1 or (discount > 0 and policy != "grid"):
            raise ValueError(f"discount={discount}: a number in [0, 1], for policy='grid' only")
        if gain not in ("cross_entropy", "entropy") or (gain == "entropy" and policy != "grid"):
            raise ValueError(f"gain={gain!r}: 'cross_entropy' or, for policy='grid' only, 'entropy'")
        if canvas and policy != "grid":
            raise ValueError("canvas shows the policy the whole pixels read so far: it needs policy='grid'")
        if probe < 0 or (probe > 0 and (policy != "grid" or discount > 0 or probe > SIDE * SIDE - glimpses)):
            raise ValueError(f"probe={probe}: the number of random unread pixels also read at each step to train the "
                             f"gain estimates; it needs policy='grid', discount 0 (a probe has no later reads) and at most "
                             f"{SIDE * SIDE} - glimpses probes")
        if quantise and explore <= 0:
            raise ValueError("quantise acts on exploring glimpses only: give explore > 0 with it")
        if explore > 0 and explore_steps < 1:
            raise ValueError(f"explore_steps={explore_steps}: the exploration fades over this many training steps; "
                             f"give 1 or more")
        if start is None:
            start_pixels = sunflower(glimpses, radius).round()
        else:  # pixel indices, row-major: (row, col) = divmod(p, 28)
            if len(start) != glimpses or not all(0 <= p < SIDE * SIDE for p in start):
                raise ValueError(f"start={start}: expected {glimpses} pixel indices in 0..{SIDE * SIDE - 1}")
            start_pixels = torch.tensor([divmod(p, SIDE) for p in start], dtype=torch.float32)
        self.glimpses, self.snap, self.move_scale = glimpses, snap, move_scale
        self.explore, self.explore_steps, self.quantise, self.steps_taken = explore, explore_steps, quantise, 0
        self.grid, self.discount, self.gain, self.canvas = policy == "grid", discount, gain, canvas
        self.probe = int(probe)  # True is one probe
        self.embed = PointEmbedding(hidden, features)
        self.histogram = SoftHistogram(features, bins)
        self.state_size = features * bins
        # The state is a mean over the readings, linear in the set: how readings combine is up to the encoder
        # (as for softorder's head), so it may need to be wider than the per-point network.
        self.encoder = nn.Sequential(nn.Linear(self.state_size + 1, encoder_width), nn.ReLU(),
                                     nn.Linear(encoder_width, encoder_width), nn.ReLU())
        self.head = nn.Linear(encoder_width, 10)
        # with `canvas` the policy also sees the readings as an image: grey levels read so far, and where
        policy_inputs = encoder_width + 10 + (2 * SIDE * SIDE if canvas else 0)
        self.policy = nn.Sequential(nn.Linear(policy_inputs, hidden), nn.ReLU(),
                                    nn.Linear(hidden, SIDE * SIDE if self.grid else 2))
        # Step t looks first at its start pixel (sigmoid-logit space; an edge pixel just inside the edge); the
        # learned base and the policy's offset start at zero.
        self.register_buffer("start", torch.logit(start_pixels / (SIDE - 1), eps=1e-3))
        self.base = nn.Parameter(torch.zeros(glimpses, 2))
        nn.init.zeros_(self.policy[-1].weight)
        nn.init.zeros_(self.policy[-1].bias)

    def run(self, x: torch.Tensor, rounded: bool = False, probes: int | None = None) -> GlimpseRun:
        """Images (B, 1, 28, 28) -> a `GlimpseRun`: the logits of every step, the glimpse coordinates and what
        the policy's loss needs. `probes` random unread pixels are also read at each step, counterfactually (grid
        policy; default: `probe` in training, none in evaluation).

        The coordinates are the continuous ones the policy chose. Training and `rounded` read (and embed)
        the pixel nearest to each; evaluation without `rounded` reads the bilinear blend at the coordinate
        itself, which differs only as far as the coordinates sit off pixel centres.
        """
        b = x.shape[0]
        probes = (self.probe if self.training else 0) if probes is None else probes
        x_probed = x.repeat(probes, 1, 1, 1) if probes else None  # probes read P * B images in one batch
        hist_sum = x.new_zeros(b, self.state_size)
        z = self.encoder(x.new_zeros(b, self.state_size + 1))  # code of the empty state
        probs = x.new_full((b, 10), 0.1)  # the uniform first guess
        all_logits, all_coords, all_policy_terms, all_probe_logits, all_probe_terms = [], [], [], [], []
        if self.grid:
            unread = torch.ones(b, SIDE * SIDE, dtype=torch.bool, device=x.device)
        if self.canvas:
            seen = x.new_zeros(b, SIDE * SIDE)  # the canvas: grey levels of the pixels read so far, 0 elsewhere
        for t in range(1, self.glimpses + 1):
            # detach: the policy reads the state but does not backpropagate into it (see the module notes)
            policy_input = [z, probs, seen, (~unread).to(x.dtype)] if self.canvas else [z, probs]
            where = self.policy(torch.cat(policy_input, dim=1).detach())
            if self.grid:  # `where` is the estimated drop in cross-entropy of reading each pixel now
                choice = self.choose_pixel(where, unread)
                unread = unread.scatter(1, choice.unsqueeze(1), False)
                all_policy_terms.append(where.gather(1, choice.unsqueeze(1)).squeeze(1))
                coords = read_at = pixel_coords(choice).to(x.dtype)
                if probes:  # what `probes` random unread pixels would have given instead
                    others = torch.rand(unread.shape, device=x.device).masked_fill(~unread, -1).topk(probes).indices
                    all_probe_terms.append(where.gather(1, others).T)  # (P, B)
                    with torch.no_grad():  # probes train the estimates only, not the classifier
                        logits = self.read_and_predict(x_probed, pixel_coords(others.T.flatten()).to(x.dtype),
                                                       hist_sum.repeat(probes, 1), t)[2]
                        all_probe_logits.append(logits.view(probes, b, 10))
            else:
                offset = self.move_scale * (self.base[t - 1] + where)
                coords = (SIDE - 1) * torch.sigmoid(self.start[t - 1] + offset)
                if self.explore > 0 and self.quantise:  # commit to the nearest pixel centre (straight-through)
                    coords = coords + (coords.round() - coords).detach()
                if self.training and self.explore > 0:  # positions learn from REINFORCE only, not the read slope
                    sigma = self.exploration()
                    sample = (coords.detach() + sigma * torch.randn_like(coords)).clamp(0, SIDE - 1)
                    # log-likelihood of the sample times (sigma / explore)^2: unscaled, its gradient
                    # (sample - mean) / sigma^2 grows without bound as sigma anneals to 0 and the positions
                    # random-walk; scaled, the moves fade out with the exploration
                    all_policy_terms.append(-((sample - coords) ** 2).sum(1) / (2 * self.explore ** 2))
                    read_at = sample.round()
                elif rounded or self.training:
                    # the nearest pixel; straight-through, so the coordinate still gets the bilinear slope
                    read_at = coords + (coords.round() - coords).detach()
                else:
                    read_at = coords
            value, hist_sum, logits, z = self.read_and_predict(x, read_at, hist_sum, t)
            if self.canvas:
                seen = seen.scatter(1, choice.unsqueeze(1), value.unsqueeze(1))
            probs = F.softmax(logits, dim=1)
            all_logits.append(logits)
            all_coords.append(coords)

        def stacked(tensors):
            return torch.stack(tensors) if tensors else None

        return GlimpseRun(torch.stack(all_logits), torch.stack(all_coords), stacked(all_policy_terms),
                          stacked(all_probe_logits), stacked(all_probe_terms))

    def read_and_predict(self, x: torch.Tensor, read_at: torch.Tensor, hist_sum: torch.Tensor, t: int):
        """Step t's reading at coordinates (B, 2): the grey level (B,), the new histogram sum (B, S), the
        step's logits (B, 10) and state code z (B, encoder_width)."""
        value = read_pixels(x, read_at)
        # The same point encoding as models.softorder.image_points: row, col in [-1, 1], grey in [0, 1].
        point = torch.cat([read_at / ((SIDE - 1) / 2) - 1, value.unsqueeze(1)], dim=1)
        hist_sum = hist_sum + self.histogram(self.embed(point).unsqueeze(1), x.new_ones(len(x), 1, dtype=torch.bool))
        z = self.encoder(torch.cat([hist_sum / t, x.new_full((len(x), 1), t / self.glimpses)], dim=1))
        return value, hist_sum, self.head(z), z

    def choose_pixel(self, gains: torch.Tensor, unread: torch.Tensor) -> torch.Tensor:
        """`policy="grid"`: the pixel (B,) each image reads next, from the estimated gains (B, 784) of the
        `unread` pixels (B, 784, bool): the best, or, in training, a random unread one for a share
        `exploration()` of the images."""
        choice = gains.detach().masked_fill(~unread, -math.inf).argmax(1)
        if self.training:
            random_pixel = torch.rand(unread.shape, device=unread.device).masked_fill(~unread, -1).argmax(1)
            explore = torch.rand(len(choice), device=choice.device) < self.exploration()
            choice = torch.where(explore, random_pixel, choice)
        return choice

    def step_logits(self, x: torch.Tensor, rounded: bool = False) -> torch.Tensor:
        """Images (B, 1, 28, 28) -> logits after every glimpse, (K, B, 10)."""
        return self.run(x, rounded).logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) -> logits after the last glimpse (B, 10), with bilinear reading."""
        return self.step_logits(x)[-1]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """Mean over the K steps of each step's cross-entropy, plus `snap` times the pull to pixel centres.

        With exploration, no pull (it pins the positions) but a REINFORCE term: each glimpse's return is
        minus the summed cross-entropy of its own and all later steps, less the batch mean (the baseline).
        With `policy="grid"`, the squared error of the read pixels' estimated gains (and with `probe`, of the
        probed pixels').
        """
        out = self.run(x)

        def uncertainty(logits):  # what a read's gain is a drop in
            if self.gain == "entropy":  # the model's own uncertainty: no label in it, so a less noisy target
                return -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
            return step_cross_entropy(logits, y, label_smoothing)

        ce = step_cross_entropy(out.logits, y, label_smoothing)
        loss = ce.mean()
        if self.explore <= 0:
            snap_penalty = torch.sin(math.pi * out.coords).square().mean()  # 0 at pixel centres, 1 half-way between
            return loss + self.snap * snap_penalty
        if self.grid:  # each read pixel's estimated gain regresses on the drop in uncertainty it gave
            after = ce if self.gain == "cross_entropy" else uncertainty(out.logits)
            before = uncertainty_before(after).detach()
            loss = loss + F.mse_loss(out.policy_terms, discounted_gains(before - after.detach(), self.discount))
            if self.probe:  # and the probed pixels' estimates, on the drops they would have given
                loss = loss + F.mse_loss(out.probe_terms, before.unsqueeze(1) - uncertainty(out.probe_logits))
        elif self.exploration() > 0:
            returns = -ce.detach().flip(0).cumsum(0).flip(0)
            loss = loss - ((returns - returns.mean(1, keepdim=True)) * out.policy_terms).mean()
        self.steps_taken += 1
        return loss

    def exploration(self) -> float:
        """Sigma (pixels) of the exploring glimpse positions now, or with `policy="grid"` the share of glimpses
        read at random pixels: `explore` falling linearly to 0 over `explore_steps` training steps; 0 outside
        training."""
        if not self.training or self.explore <= 0:
            return 0.0
        return self.explore * max(0.0, 1 - self.steps_taken / self.explore_steps)


def step_cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with labels y (B,) of logits (..., B, 10), e.g. every step's (K, B, 10) or every probe's
    (K, P, B, 10): shape (..., B)."""
    return F.cross_entropy(logits.reshape(-1, 10), y.expand(logits.shape[:-1]).reshape(-1),
                           label_smoothing=label_smoothing, reduction="none").view(logits.shape[:-1])


def uncertainty_before(after: torch.Tensor) -> torch.Tensor:
    """Each step's uncertainty before its read (K, B), from the uncertainty after every read (K, B): the step
    before's, and for the first read the uniform guess's, whose cross-entropy and entropy are both log 10."""
    return torch.cat([after.new_full((1, after.shape[1]), math.log(10)), after[:-1]])


def discounted_gains(drops: torch.Tensor, discount: float) -> torch.Tensor:
    """What each read is credited with (K, B), from the drops in uncertainty of every step (K, B; cross-entropy, or
    entropy with gain="entropy"): its own drop plus `discount` times the credit of the next read. Discount 0 is the
    one-step greedy value; 1 credits a read with everything the glimpses from it to the last gained, so a read that
    only tells where to look next is worth what that look gains."""
    gains = drops.clone()
    for t in range(len(gains) - 2, -1, -1):
        gains[t] += discount * gains[t + 1]
    return gains


@torch.inference_mode()
def glimpse_paths(model: GlimpseNet, images: torch.Tensor, rounded: bool = False) -> torch.Tensor:
    """Coordinates (B, K, 2) = (row, col) of the K glimpses the model reads on images (B, 1, 28, 28).

    With `rounded` the glimpses are read, and returned, at the nearest pixels (and later steps follow from
    those readings).
    """
    model.eval()
    coords = model.run(images, rounded).coords.transpose(0, 1)
    return coords.round() if rounded else coords


@torch.inference_mode()
def per_step_accuracy(model: GlimpseNet, images: torch.Tensor, labels, rounded: bool = False,
                      batch_size: int = 1000) -> list[float]:
    """Accuracy after each glimpse 1..K on images (N, 1, 28, 28) with labels (N,): a list of K floats."""
    model.eval()
    labels = torch.as_tensor(np.asarray(labels))
    correct = torch.zeros(model.glimpses)
    for start in range(0, len(images), batch_size):
        logits = model.step_logits(images[start:start + batch_size], rounded)
        correct += (logits.argmax(2) == labels[start:start + batch_size]).sum(1)
    return (correct / len(images)).tolist()


@torch.inference_mode()
def gain_calibration(model: GlimpseNet, images: torch.Tensor, labels, candidates: int = 32,
                     batch_size: int = 250):
    """How well a grid policy's gain estimates predict what reading a pixel gives, step by step, on images
    (N, 1, 28, 28) with labels (N,) (the validation split: this is a diagnostic for choices).

    The glimpses follow the policy; at every step `candidates` random unread pixels are also read counterfactually.
    A read's drop is the fall in cross-entropy with the label it gives (the training target of the default
    gain="cross_entropy", without label smoothing). One row per step 1..K: accuracy, the mean estimate and drop of
    the pixel read (`chosen_estimate`, `chosen_drop`), the share of images with ink there (`chosen_ink`), the same
    means over the random pixels, the correlation of estimate and drop over the random pixels (`random_correlation`:
    how well the policy ranks pixels it does not read), and the share of images for which some random pixel gave a
    larger drop than the chosen one (`beaten`; with the label's noise in every drop, this is high even for a good
    policy, but it compares steps).
    Returns a pandas DataFrame.
    """
    import pandas as pd

    if not model.grid:
        raise ValueError("gain_calibration needs a glimpse model with policy='grid' (one estimate per pixel)")
    if not 1 <= candidates <= SIDE * SIDE - model.glimpses:  # the last step must have that many unread pixels
        raise ValueError(f"candidates={candidates}: expected 1 to {SIDE * SIDE - model.glimpses} (the pixels left "
                         f"unread after {model.glimpses} glimpses)")
    model.eval()
    labels = torch.as_tensor(np.asarray(labels)).long()
    parts = []
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        out = model.run(x, probes=candidates)
        ce = step_cross_entropy(out.logits, y)
        before = uncertainty_before(ce)
        probe_ce = step_cross_entropy(out.probe_logits, y)  # (K, P, B)
        chosen = (out.coords[..., 0] * SIDE + out.coords[..., 1]).long()  # (K, B) pixel indices
        parts.append({"correct": (out.logits.argmax(2) == y).float(), "chosen_estimate": out.policy_terms,
                      "chosen_drop": before - ce, "chosen_ink": (x.flatten(1).T.gather(0, chosen) > 0).float(),
                      "random_estimate": out.probe_terms, "random_drop": before.unsqueeze(1) - probe_ce})
    whole = {key: torch.cat([part[key] for part in parts], dim=-1) for key in parts[0]}
    rows = []
    for t in range(model.glimpses):
        estimates, drops = whole["random_estimate"][t].flatten(), whole["random_drop"][t].flatten()
        rows.append({"step": t + 1, "accuracy": whole["correct"][t].mean().item(),
                     "chosen_estimate": whole["chosen_estimate"][t].mean().item(),
                     "chosen_drop": whole["chosen_drop"][t].mean().item(),
                     "chosen_ink": whole["chosen_ink"][t].mean().item(),
                     "random_estimate": estimates.mean().item(), "random_drop": drops.mean().item(),
                     "random_correlation": torch.corrcoef(torch.stack([estimates, drops]))[0, 1].item(),
                     "beaten": (whole["random_drop"][t].amax(0) > whole["chosen_drop"][t]).float().mean().item()})
    return pd.DataFrame(rows)


def plot_glimpse_paths(model: GlimpseNet, images: torch.Tensor, labels, path: Path, columns: int = 4) -> Path:
    """Write a PNG of each image (N, 1, 28, 28) with its K glimpses drawn over it, coloured by step.

    Panel titles give the true label and the final prediction (bilinear reading, as at training).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

    coords = glimpse_paths(model, images).numpy()
    with torch.inference_mode():
        predicted = model(images).argmax(1).numpy()
    labels = np.asarray(labels)
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    fig = Figure(figsize=(2.6 * columns, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    steps = np.arange(1, model.glimpses + 1)
    for n, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if n >= len(images):
            continue
        ax.imshow(images[n, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        row, col = coords[n].T  # imshow puts pixel (i, j) at x = j, y = i
        ax.plot(col, row, color="white", alpha=0.4, linewidth=0.8)
        dots = ax.scatter(col, row, c=steps, cmap="plasma", s=18, vmin=1, vmax=model.glimpses, edgecolors="black",
                          linewidths=0.3)
        ax.set_title(f"label {labels[n]}, predicted {predicted[n]}", fontsize=9)
    fig.colorbar(dots, ax=axes, shrink=0.6, label="glimpse step")
    fig.suptitle(f"glimpse paths, K = {model.glimpses}")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# No weight decay: it would also pull the learned base positions towards the image centre. No augmentation:
# the bottleneck is K pixels, not overfitting.
@register_model("glimpse", "active attention: K single-pixel bilinear glimpses, recurrent soft-histogram state",
                epochs=15, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.0,
                schedule="onecycle", label_smoothing=0.0, augment=False)
def build_glimpse(glimpses: int = 25, features: int = 64, bins: int = 8, hidden: int = 256,
                  snap: float = 100.0, move_scale: float = 0.1, radius: float = 10.0, explore: float = 0.0,
                  explore_steps: int = 4000, quantise: bool = False, start: tuple[int, ...] | None = None,
                  policy: str = "coordinate", encoder_width: int = 256, discount: float = 0.0,
                  gain: str = "cross_entropy", canvas: bool = False, probe: int = 0) -> nn.Module:
    return GlimpseNet(glimpses, features, bins, hidden, snap, move_scale, radius, explore, explore_steps, quantise,
                      start, policy, encoder_width, discount, gain, canvas, probe)

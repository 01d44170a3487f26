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

What backpropagation through pixel reads needs, as found in short CPU runs:
  - spread-out starting points: the gradient of a read is local (zero over blank background), so glimpses
    that all start at the centre stay there. Each step's base position starts on a sunflower spiral over
    the digit area (`sunflower`) and is learned; the state-dependent offset starts at zero.
  - a detached policy input, as in RAM's location network: each coordinate is trained for what its own
    reading adds, not through the chain of later moves, which made the 25-step recurrence unstable.
  - agreement of bilinear and rounded reading. A read between pixels blends up to four of them, more than
    one pixel's worth, and an unconstrained policy learns to sit between pixels; early steps, which must
    split ten classes on one grey level, are so sensitive that rounding then cost 4-7 points of accuracy.
    Two measures: the loss adds `snap` * mean sin^2(pi * coordinate), zero at pixel centres, which pulls
    the coordinates onto pixels; and in training a random `round_share` of the glimpses is read at the
    rounded coordinate (straight-through), so the model knows both reading modes. Short runs still left
    a gap of 2-5 points (bilinear better); `per_step_accuracy(..., rounded=True)` measures it.
Limitations seen in those runs: the state-dependent offsets stay well under a pixel, so the learned policy
is close to a fixed, learned set of K positions - local read gradients rarely reward a large move, and
without the pull to pixel centres (snap = 0 or 0.1) the offsets wandered and accuracy fell (K = 2: 15-20%
instead of 32%). With the pull, each base position stays on the pixel nearest its start, so the start matters:
in 3-epoch K = 2 runs the first glimpse, started 5 pixels off centre, stayed at (17, 10) (19-20 % validation
accuracy after one glimpse) and, started at the centre, settled at (13, 13) (23 %; the best single pixel,
(14, 14), scores 24.6 % with a lookup table fitted on the fit split). A surrogate coordinate gradient from a
blurred image (sigma 1.5-3 px) and Fourier features of the grey level did not help in such runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model
from models.softorder import SoftHistogram

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


class GlimpseNet(nn.Module):
    def __init__(self, glimpses: int = 25, features: int = 64, bins: int = 8, hidden: int = 256,
                 snap: float = 1.0, round_share: float = 0.5):
        super().__init__()
        if glimpses < 1:
            raise ValueError(f"glimpses={glimpses}: need at least one glimpse")
        self.glimpses, self.snap, self.round_share = glimpses, snap, round_share
        self.embed = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.LayerNorm(features))
        self.histogram = SoftHistogram(features, bins)
        self.state_size = features * bins
        self.encoder = nn.Sequential(nn.Linear(self.state_size + 1, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)
        self.policy = nn.Sequential(nn.Linear(hidden + 10, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        # Per-step base positions (in sigmoid-logit space) start on a sunflower spiral; offsets start at zero.
        self.base = nn.Parameter(torch.logit(sunflower(glimpses) / (SIDE - 1)))
        nn.init.zeros_(self.policy[-1].weight)
        nn.init.zeros_(self.policy[-1].bias)

    def run(self, x: torch.Tensor, rounded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 1, 28, 28) -> logits of every step (K, B, 10) and the glimpse coordinates (K, B, 2).

        The coordinates are the continuous ones the policy chose; `rounded` reads (and embeds) the pixel
        nearest to each instead of the bilinear blend there.
        """
        b = x.shape[0]
        hist_sum = x.new_zeros(b, self.state_size)
        z = self.encoder(x.new_zeros(b, self.state_size + 1))  # code of the empty state
        probs = x.new_full((b, 10), 0.1)  # the uniform first guess
        all_logits, all_coords = [], []
        for t in range(1, self.glimpses + 1):
            # detach: the policy reads the state but does not backpropagate into it (see the module notes)
            where = self.policy(torch.cat([z, probs], dim=1).detach())
            coords = (SIDE - 1) * torch.sigmoid(self.base[t - 1] + where)
            if rounded:
                read_at = coords.round()
            elif self.training:
                # Read a random share of the glimpses at the rounded coordinate (straight-through: the
                # gradient still flows to the coordinate), so that both evaluation modes are familiar.
                snapped = torch.rand(b, 1, device=x.device) < self.round_share
                read_at = coords + ((coords.round() - coords) * snapped).detach()
            else:
                read_at = coords
            value = read_pixels(x, read_at)
            # The same point encoding as models.softorder.image_points: row, col in [-1, 1], grey in [0, 1].
            point = torch.cat([read_at / ((SIDE - 1) / 2) - 1, value.unsqueeze(1)], dim=1)
            hist_sum = hist_sum + self.histogram(self.embed(point).unsqueeze(1), x.new_ones(b, 1, dtype=torch.bool))
            z = self.encoder(torch.cat([hist_sum / t, x.new_full((b, 1), t / self.glimpses)], dim=1))
            logits = self.head(z)
            probs = F.softmax(logits, dim=1)
            all_logits.append(logits)
            all_coords.append(coords)
        return torch.stack(all_logits), torch.stack(all_coords)

    def step_logits(self, x: torch.Tensor, rounded: bool = False) -> torch.Tensor:
        """Images (B, 1, 28, 28) -> logits after every glimpse, (K, B, 10)."""
        return self.run(x, rounded)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) -> logits after the last glimpse (B, 10), with bilinear reading."""
        return self.step_logits(x)[-1]

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """Mean over the K steps of each step's cross-entropy, plus `snap` times the pull to pixel centres."""
        logits, coords = self.run(x)
        snap_penalty = torch.sin(math.pi * coords).square().mean()  # 0 at pixel centres, 1 half-way between
        return (F.cross_entropy(logits.flatten(0, 1), y.repeat(self.glimpses), label_smoothing=label_smoothing)
                + self.snap * snap_penalty)


@torch.inference_mode()
def glimpse_paths(model: GlimpseNet, images: torch.Tensor, rounded: bool = False) -> torch.Tensor:
    """Coordinates (B, K, 2) = (row, col) of the K glimpses the model reads on images (B, 1, 28, 28).

    With `rounded` the glimpses are read, and returned, at the nearest pixels (and later steps follow from
    those readings).
    """
    model.eval()
    coords = model.run(images, rounded)[1].transpose(0, 1)
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
                  snap: float = 1.0, round_share: float = 0.5) -> nn.Module:
    return GlimpseNet(glimpses, features, bins, hidden, snap, round_share)

"""Active attention: classify a digit from K single-pixel glimpses whose positions the network chooses.

The model starts from an empty state and a uniform class guess. At each step t = 1..K:
  1. policy    - an MLP maps (state code z, current class probabilities) to a continuous coordinate (i, j)
                 in [0, 27] x [0, 27] (row, column; a sigmoid scaled to the image).
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

Rounding. Bilinear reading lets a glimpse between pixels see a blend of four of them, more than one pixel's
worth. During training each coordinate is jittered by up to +-`jitter` pixels (uniformly) before reading, so
the policy cannot rely on sub-pixel positions; evaluating with coordinates rounded to the nearest pixel
(`rounded=True`: a plain pixel read) is then a perturbation the model has been trained to tolerate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model
from models.softorder import SoftHistogram

SIDE = 28


def read_pixels(images: torch.Tensor, coords: torch.Tensor, rounded: bool = False) -> torch.Tensor:
    """Grey levels (B,) of images (B, 1, 28, 28) at coordinates (B, 2) = (row, col) in [0, 27].

    Bilinear interpolation of the 4 neighbouring pixels (differentiable in the coordinates), or, with
    `rounded`, the nearest pixel.
    """
    flat = images.reshape(images.shape[0], SIDE * SIDE)
    if rounded:
        i, j = coords.round().long().unbind(1)
        return flat.gather(1, (i * SIDE + j).unsqueeze(1)).squeeze(1)
    corner = coords.detach().floor().clamp(max=SIDE - 2)  # top-left neighbour; at 27 the weight moves to 27
    fi, fj = (coords - corner).unbind(1)
    top_left = (corner[:, 0] * SIDE + corner[:, 1]).long().unsqueeze(1)
    v00, v01, v10, v11 = flat.gather(1, top_left + torch.tensor([0, 1, SIDE, SIDE + 1], device=images.device)).unbind(1)
    return (1 - fi) * ((1 - fj) * v00 + fj * v01) + fi * ((1 - fj) * v10 + fj * v11)


class GlimpseNet(nn.Module):
    def __init__(self, glimpses: int = 25, features: int = 64, bins: int = 8, hidden: int = 256,
                 jitter: float = 0.5):
        super().__init__()
        if glimpses < 1:
            raise ValueError(f"glimpses={glimpses}: need at least one glimpse")
        self.glimpses, self.jitter = glimpses, jitter
        self.embed = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.LayerNorm(features))
        self.histogram = SoftHistogram(features, bins)
        self.state_size = features * bins
        self.encoder = nn.Sequential(nn.Linear(self.state_size + 1, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)
        self.policy = nn.Sequential(nn.Linear(hidden + 10, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def run(self, x: torch.Tensor, rounded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 1, 28, 28) -> logits of every step (K, B, 10) and the glimpse coordinates (K, B, 2).

        `rounded` reads (and embeds) the nearest pixel instead of the bilinear blend; coordinates returned
        are the ones actually read.
        """
        b = x.shape[0]
        hist_sum = x.new_zeros(b, self.state_size)
        z = self.encoder(x.new_zeros(b, self.state_size + 1))  # code of the empty state
        probs = x.new_full((b, 10), 0.1)  # the uniform first guess
        all_logits, all_coords = [], []
        for t in range(1, self.glimpses + 1):
            coords = (SIDE - 1) * torch.sigmoid(self.policy(torch.cat([z, probs], dim=1)))
            if self.training and self.jitter > 0:
                coords = (coords + (torch.rand_like(coords) * 2 - 1) * self.jitter).clamp(0, SIDE - 1)
            if rounded:
                coords = coords.round()
            value = read_pixels(x, coords, rounded)
            # The same point encoding as models.softorder.image_points: row, col in [-1, 1], grey in [0, 1].
            point = torch.cat([coords / ((SIDE - 1) / 2) - 1, value.unsqueeze(1)], dim=1)
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
        """Mean over the K steps of the cross-entropy of each step's prediction."""
        logits = self.step_logits(x)
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(self.glimpses), label_smoothing=label_smoothing)


@torch.inference_mode()
def glimpse_paths(model: GlimpseNet, images: torch.Tensor, rounded: bool = False) -> torch.Tensor:
    """Coordinates (B, K, 2) = (row, col) of the K glimpses the model takes on images (B, 1, 28, 28)."""
    model.eval()
    return model.run(images, rounded)[1].transpose(0, 1)


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


@register_model("glimpse", "active attention: K single-pixel bilinear glimpses, recurrent soft-histogram state",
                epochs=10, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.01,
                schedule="onecycle", label_smoothing=0.0, augment=False)
def build_glimpse(glimpses: int = 25, features: int = 64, bins: int = 8, hidden: int = 256,
                  jitter: float = 0.5) -> nn.Module:
    return GlimpseNet(glimpses, features, bins, hidden, jitter)

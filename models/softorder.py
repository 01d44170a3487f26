"""SoftOrdering: the digit as an unordered set of points (row, column, grey), pooled by a learnable soft histogram.

Pipeline, for one image:
  1. points     - every pixel becomes a point (row, col, grey) with row and col scaled to [-1, 1]; with
                  `points="ink"` only pixels brighter than `ink_threshold` are kept (about 135 of 784 at the
                  default 0.1, which drops the faint residue that affine augmentation smears around strokes),
                  with `points="all"` all 784. Images of a batch have different point counts, so the sets are
                  padded to the longest and carry a boolean mask; padded points never reach the output.
  2. embedding  - one network shared by all points (`PointEmbedding`: Fourier features of the position, an
                  MLP, a per-point LayerNorm that keeps the outputs on the scale of the bin centres) maps
                  each point to `features` numbers.
  3. pooling    - `pool="hist"`: every feature value is spread over `bins` soft bins (triangular memberships
                  between learnable, evenly spaced bin centres, see `SoftHistogram`); averaging the
                  memberships over the valid points gives, per feature, a normalised histogram of how the
                  feature is distributed over the digit. `pool="max"` keeps only the largest value of each
                  feature, as PointNet does - the special case to compare against: a max tells whether some
                  point reaches a value, a histogram also tells what share of the points do.
  4. head       - an MLP (`head_layers` hidden layers of `head_width`, default 2 x 1024) classifies the pooled
                  vector (features * bins numbers, or features for max).

Why the head is wide. A histogram of shares is a mean over the points of a per-point function, so the pooled
vector is linear in the point set: all the interaction between strokes has to happen in the head (a max is
already non-linear in the set). Probes, 3 epochs on the first 20,000 fit images, validation errors of 5,000:
head 1 x 128 (the earlier default) 221, 2 x 512 165, 3 x 512 167, 2 x 1024 149, 2 x 2048 145; max pooling with
the 1 x 128 head 171. Tried and not kept: 4 or 16 bins (262, 227), and log(1 + count) instead of shares
(580: point counts depend on a digit's size and stroke width, and the augmentation shifts them, so the
batch-norm statistics of augmented training batches do not fit clean images).

Both poolings are symmetric functions of the point set, so the output cannot depend on the order in which
pixels are listed; `forward_points` takes the set directly so tests can shuffle it.
"""

import math

import torch
import torch.nn as nn

from models.registry import register_model


def image_points(x: torch.Tensor, keep: str = "ink", ink_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images (B, 1, 28, 28) in [0, 1] -> points (B, P, 3) as (row, col, grey) and a mask (B, P).

    row and col are scaled to [-1, 1], grey stays in [0, 1]. `keep="all"` gives P = 784 and an all-true mask;
    `keep="ink"` keeps pixels with grey > ink_threshold, packed to the front (in raster order) and padded with
    zeros to P = the largest count in the batch (at least 1, so an empty batch still has a shape).
    """
    b = x.shape[0]
    grey = x.reshape(b, 784)
    coords = torch.linspace(-1, 1, 28, device=x.device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([rows.reshape(784).expand(b, 784), cols.reshape(784).expand(b, 784), grey], dim=2)
    if keep == "all":
        return points, torch.ones(b, 784, dtype=torch.bool, device=x.device)
    if keep != "ink":
        raise ValueError(f"points={keep!r}: expected 'ink' or 'all'")
    ink = grey > ink_threshold
    count = max(int(ink.sum(1).max()), 1)
    # A stable sort of "not ink" puts the ink pixels first, in raster order; keep the first `count` slots.
    order = torch.sort((~ink).to(torch.uint8), dim=1, stable=True).indices[:, :count]
    mask = torch.gather(ink, 1, order)
    points = torch.gather(points, 1, order.unsqueeze(2).expand(b, count, 3)) * mask.unsqueeze(2)
    return points, mask


class SoftHistogram(nn.Module):
    """Learnable soft histogram of each feature over a set: (B, P, F) and mask (B, P) -> (B, F * bins).

    Feature f has `bins` evenly spaced centres, offset_f + spacing_f * (k - (bins - 1) / 2), whose position
    and spacing are learned. A value's membership in bin k is the triangular kernel
    max(0, 1 - |value - centre_k| / spacing_f): it is shared by the two nearest centres (linear
    interpolation, memberships sum to 1; values beyond the outer centres fall wholly into the outer bin).
    Only two bins per value are non-zero, so the pooling scatters two weights per (point, feature) instead of
    materialising a (B, P, F, bins) tensor - which, for ~200 points, is what made a softmax-over-bins
    version an order of magnitude slower on the CPU.
    """

    def __init__(self, features: int, bins: int, span: float = 2.0):
        super().__init__()
        if bins < 2:
            raise ValueError(f"bins={bins}: a histogram needs at least 2 bins")
        self.bins = bins
        # Start with centres evenly over [-span, span], where LayerNorm-ed features mostly live.
        self.offset = nn.Parameter(torch.zeros(features))
        self.log_spacing = nn.Parameter(torch.full((features,), math.log(2 * span / (bins - 1))))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Features (B, P, F) of P points, validity mask (B, P) -> histograms (B, F * bins), each summing to 1."""
        # Position of each value on the bin axis, 0 .. bins-1: (B, F, P), features first for the scatter.
        position = ((h - self.offset) / self.log_spacing.exp() + (self.bins - 1) / 2).transpose(1, 2)
        position = position.clamp(0, self.bins - 1)
        lower = position.detach().floor().clamp(max=self.bins - 2).long()
        upper_share = position - lower  # in [0, 1]; carries the gradient to the value
        weight = (mask.to(h.dtype) / mask.sum(1, keepdim=True).clamp(min=1)).unsqueeze(1)  # mean over valid points
        hist = h.new_zeros(h.shape[0], h.shape[2], self.bins)
        hist = hist.scatter_add(2, lower, weight * (1 - upper_share)).scatter_add(2, lower + 1, weight * upper_share)
        return hist.flatten(1)


class PointEmbedding(nn.Module):
    """The shared per-point network: points (..., 3) as (row, col, grey) -> features (..., F).

    Row and column first pass through Fourier features sin/cos(pi * 2^k * coordinate), k < `octaves`: a
    plain ReLU MLP on raw coordinates is biased towards smooth functions of position and learns to tell
    nearby places apart only slowly (Tancik et al. 2020, "Fourier features let networks learn high
    frequency functions"). Coordinates span [-1, 1] over 27 pixels, so octave k has a period of 2^(1 - k) * 13.5
    pixels, the finest (k = octaves - 1) 2^(2 - octaves) * 13.5: 3.4 pixels with the default 4 octaves.
    """

    def __init__(self, hidden: int, features: int, octaves: int = 4):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(octaves), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(3 + 4 * octaves, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, features), nn.LayerNorm(features))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        angles = points[..., :2, None] * self.frequencies  # (..., 2, octaves)
        waves = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)
        return self.mlp(torch.cat([points, waves], dim=-1))


def masked_max(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PointNet pooling: (B, P, F), mask (B, P) -> (B, F), the max over valid points (0 for an empty set)."""
    pooled = h.masked_fill(~mask.unsqueeze(2), float("-inf")).amax(dim=1)
    return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))


class SoftOrder(nn.Module):
    def __init__(self, points: str = "ink", pool: str = "hist", bins: int = 8, features: int = 128,
                 hidden: int = 128, ink_threshold: float = 0.1, head_width: int = 1024, head_layers: int = 2):
        super().__init__()
        if points not in ("ink", "all"):
            raise ValueError(f"points={points!r}: expected 'ink' or 'all'")
        if pool not in ("hist", "max"):
            raise ValueError(f"pool={pool!r}: expected 'hist' or 'max'")
        self.points, self.ink_threshold = points, ink_threshold
        self.embed = PointEmbedding(hidden, features)
        self.pool = SoftHistogram(features, bins) if pool == "hist" else None
        pooled = features * bins if pool == "hist" else features
        # Histogram bins differ in scale by orders of magnitude: the share of points in a bin where most
        # points fall is near 1, in a bin that only a stroke at one place reaches it is ~1 / P. So each pooled
        # number is standardised on its own (BatchNorm; a LayerNorm over the whole vector left the rare bins
        # tiny: 365 against 214 validation errors in a 3-epoch probe on 20,000 images). Max-pooled features
        # share one scale and keep a LayerNorm.
        norm = nn.BatchNorm1d(pooled) if pool == "hist" else nn.LayerNorm(pooled)
        widths = [pooled] + [head_width] * head_layers
        layers = [norm]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        self.head = nn.Sequential(*layers, nn.Linear(widths[-1], 10))

    def forward_points(self, points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Point sets (B, P, 3) as (row, col, grey), validity mask (B, P) -> logits (B, 10).

        The result does not depend on the order of the P points, nor on the values at masked positions.
        """
        h = self.embed(points)
        pooled = self.pool(h, mask) if self.pool is not None else masked_max(h, mask)
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_points(*image_points(x, self.points, self.ink_threshold))


@register_model("softorder", "point set (row, col, grey) -> shared point MLP -> learnable soft-histogram pooling",
                epochs=15, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.05,
                schedule="onecycle", label_smoothing=0.1, augment=True)
def build_softorder(points: str = "ink", pool: str = "hist", bins: int = 8, features: int = 128,
                    hidden: int = 128, ink_threshold: float = 0.1, head_width: int = 1024,
                    head_layers: int = 2) -> nn.Module:
    return SoftOrder(points, pool, bins, features, hidden, ink_threshold, head_width, head_layers)

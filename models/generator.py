"""The rules of writing a digit: a class-conditional generator compared to real images by *range uncovery*.

Model. Ten learned embeddings (`rules`, one per digit, `embed_dim` = 1024 features by default) are the
"rules of writing" each digit. A decoder turns a rule plus a small per-image style code z (`style_dim`
numbers: slant, width, stroke weight, ...) into an image. An encoder guesses z from an image; it does not see
the class, and the KL term of a variational autoencoder makes z carry no more than the class leaves
unexplained, so style codes transfer across digits (the sample grid shows the same z under every rule).
Training (`training_loss`, through the ordinary loop of `benchmark.train`) reconstructs each image from the
rule of its TRUE class and its encoded style; no classifier is involved.

Comparison: range uncovery. An image is an unordered set of points P = {(r, c, g)}, one per pixel, at row r,
column c with grey level g in [0, 1]; each point carries ink weight w = g (blank pixels weigh nothing to be
covered, but they still cover faint ink). With tolerance ranges tau = (tau_r, tau_c, tau_g):

    k(a, b)     = exp(-1/2 [ ((r_a - r_b)/tau_r)^2 + ((c_a - c_b)/tau_c)^2 + ((g_a - g_b)/tau_g)^2 ]),
                  set to 0 when the position part ((r_a - r_b)/tau_r)^2 + ((c_a - c_b)/tau_c)^2 exceeds 3^2
    cover(a, B) = max_{b in B} k(a, b)                                   in [0, 1]
    U(A | B)    = sum_{a in A} w_a (1 - cover(a, B)) / sum_{a in A} w_a  the share of A's ink B leaves uncovered
    L(A, B)     = (U(A | B) + U(B | A)) / 2                              range uncovery, in [0, 1]

A point is covered fully by an exact counterpart, by 0.61 at one tolerance away and not at all beyond three
(where the position kernel is cut off, so each pixel only looks at a small window). L is 0 for identical
sets, symmetric, independent of the order of the points (sums and maxima over sets), and grows as ink moves
away. It is soft: the Gaussian ranges replace a hard "within range" test, and L is differentiable in the
grey levels of both images (through the weights and the kernel; the max passes its gradient to the best
covering point, as max-pooling does), so it trains the generator. `range_uncovery_points` computes the
definition on explicit point lists; `RangeUncovery` computes the same number on 28 x 28 grids with a sliding
window, batched, and is what training and comparison use. Plain pixel losses (`loss="mse"` or `"bce"`) stay
available in its place for comparison.

Using the generator. `forward` makes it a classifier on its own: each of the 10 rules renders the image
with the encoder's style guess, and the logits are -(comparison loss) / temperature (the temperature only
shapes the probabilities, not the ranking). `fit_styles` is analysis by synthesis for the assist
(`benchmark.assist`): for given (image, candidate class) pairs it refines the encoder's guess of z by a few
gradient steps on the comparison loss plus the prior penalty, so candidates compete on how well their rule,
in its most fitting style, explains the image.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from models.registry import register_model

SIDE = 28
CUTOFF = 3.0  # the position kernel is cut off at 3 tolerances: cover < e^-4.5 ~ 0.011 counts as none
OUTSIDE = 1e4  # grey level of the padding around the grid: no point there, so it covers nothing
LOSSES = ("uncovery", "mse", "bce")


def range_uncovery_points(points_a: torch.Tensor, weights_a: torch.Tensor, points_b: torch.Tensor,
                          weights_b: torch.Tensor, tolerance=(1.0, 1.0, 0.25)) -> torch.Tensor:
    """L(A, B) of the module docstring on explicit point lists: the definition, O(|A| |B|).

    points_* (N, 3) as (row, col, grey) in pixels and grey levels; weights_* (N,) ink weights. Returns a scalar.
    """

    def uncovered(pa, wa, pb):
        position_sq = (((pa[:, None, :2] - pb[None, :, :2]) / pa.new_tensor(tolerance[:2])) ** 2).sum(-1)
        grey_sq = ((pa[:, None, 2] - pb[None, :, 2]) / tolerance[2]) ** 2
        kernel = torch.where(position_sq <= CUTOFF ** 2, torch.exp(-0.5 * (position_sq + grey_sq)), 0.0)  # k(a, b)
        cover = kernel.amax(1)
        return (wa * (1 - cover)).sum() / wa.sum().clamp_min(1e-6)

    return (uncovered(points_a, weights_a, points_b) + uncovered(points_b, weights_b, points_a)) / 2


def image_points(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (28, 28) in [0, 1] -> its point list (784, 3) as (row, col, grey) and ink weights (784,)."""
    rows, cols = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    grey = image.reshape(-1)
    return torch.stack([rows.reshape(-1).to(grey), cols.reshape(-1).to(grey), grey], 1), grey


class NearestInRange(torch.autograd.Function):
    """E_p = min over window offsets o of [ position_sq(o) + ((a_p - b_{p+o}) / tol_grey)^2 ] for every pixel p.

    The squared distance, in tolerance units, from each point of a to its nearest point of b (so
    cover(p, B) = exp(-E_p / 2)). Written as a Function because autograd through a chain of 29 `minimum`s
    costs ten times the forward pass; here the forward remembers which offset won and the backward routes
    each pixel's gradient to that one pair only (the subgradient of a min, as max-pooling does).
    """

    @staticmethod
    def forward(ctx, a, b, offsets, radius, tol_grey):
        ra, rc = radius
        padded = F.pad(b, (rc, rc, ra, ra), value=OUTSIDE)
        track = any(ctx.needs_input_grad[:2])
        best = best_k = None
        for k, (dr, dc, position_sq) in enumerate(offsets):
            near = padded[:, :, ra + dr:ra + dr + SIDE, rc + dc:rc + dc + SIDE]
            candidate = ((a - near) / tol_grey).square() + position_sq
            if best is None:
                best, best_k = candidate, torch.zeros_like(a, dtype=torch.long)
                continue
            if track:
                best_k = torch.where(candidate < best, k, best_k)
            best = torch.minimum(best, candidate)
        if track:
            ctx.save_for_backward(a, padded, best_k)
            ctx.radius, ctx.tol_grey = radius, tol_grey
            # offset k's partner of pixel (0, 0), as a flat index into the padded b
            width = padded.shape[3]
            ctx.shifts = torch.tensor([(ra + dr) * width + rc + dc for dr, dc, _ in offsets], device=a.device)
        return best

    @staticmethod
    def backward(ctx, grad):
        a, padded, k = ctx.saved_tensors
        n, _, height, width = padded.shape
        pixel = torch.arange(SIDE, device=a.device)
        corner = (pixel[:, None] * width + pixel[None, :]).view(1, 1, SIDE, SIDE)  # pixel (r, c) -> r * width + c
        partner = (corner + ctx.shifts[k]).view(n, -1)  # flat index in the padded b of each pixel's nearest point
        near = padded.view(n, -1).gather(1, partner).view_as(a)
        grad_a = grad * 2 * (a - near) / ctx.tol_grey ** 2
        grad_b = None
        if ctx.needs_input_grad[1]:
            ra, rc = ctx.radius
            padded_grad = grad.new_zeros(n, height * width).scatter_add_(1, partner, -grad_a.view(n, -1))
            grad_b = padded_grad.view(n, 1, height, width)[:, :, ra:ra + SIDE, rc:rc + SIDE]
        return grad_a if ctx.needs_input_grad[0] else None, grad_b, None, None, None


class RangeUncovery(nn.Module):
    """Range uncovery L(A, B) on batches of 28 x 28 images: forward(a, b) with (N, 1, 28, 28) -> (N,).

    Every pixel compares itself only with the pixels of the other image inside the cutoff ellipse around it
    (29 offsets at tolerance 1 pixel), visited by shifting the padded image (`NearestInRange`); exp is
    monotone, so the max of the kernel is exp(-1/2 min of the exponent). The result equals
    `range_uncovery_points` on the images' point lists.
    """

    def __init__(self, tolerance=(1.0, 1.0, 0.25)):
        super().__init__()
        self.tol_grey = float(tolerance[2])
        self.radius = tuple(math.floor(CUTOFF * t) for t in tolerance[:2])
        self.offsets = [(dr, dc, (dr / tolerance[0]) ** 2 + (dc / tolerance[1]) ** 2)
                        for dr in range(-self.radius[0], self.radius[0] + 1)
                        for dc in range(-self.radius[1], self.radius[1] + 1)
                        if (dr / tolerance[0]) ** 2 + (dc / tolerance[1]) ** 2 <= CUTOFF ** 2]

    def uncovered(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """U(A | B) for images a, b (N, 1, 28, 28): the share of a's ink that b leaves uncovered, (N,)."""
        cover = torch.exp(-0.5 * NearestInRange.apply(a, b, self.offsets, self.radius, self.tol_grey))
        return (a * (1 - cover)).sum((1, 2, 3)) / a.sum((1, 2, 3)).clamp_min(1e-6)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.uncovered(a, b) + self.uncovered(b, a)) / 2


class DigitGenerator(nn.Module):
    """Rules (10, embed_dim) + style code z (style_dim) -> decoder -> image logits (N, 1, 28, 28).

    loss: the comparison ("uncovery", "mse" or "bce"); pixel_weight adds that much mean pixel BCE to it. The
    set loss alone lets faint haze through: haze is covered by blank pixels within the grey tolerance, so
    spreading it lowers the uncovered *share* of the generated ink. The BCE keeps the background dark;
    kl_weight weighs the style code's KL term in training and its prior penalty 1/2 |z|^2 when fitting.
    """

    def __init__(self, embed_dim: int = 1024, style_dim: int = 8, hidden: int = 512, loss: str = "uncovery",
                 pixel_weight: float = 1.0, kl_weight: float = 0.005, tolerance=(1.0, 1.0, 0.25),
                 temperature: float = 0.02):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}: expected one of {', '.join(LOSSES)}")
        self.style_dim, self.loss = style_dim, loss
        self.pixel_weight, self.kl_weight, self.temperature = pixel_weight, kl_weight, temperature
        self.rules = nn.Embedding(10, embed_dim)
        self.rule_in = nn.Linear(embed_dim, hidden)  # projected down at once: the decoder works at `hidden` width
        self.style_in = nn.Linear(style_dim, hidden)
        self.decoder = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, SIDE * SIDE))
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 2 * style_dim))
        self.uncovery = RangeUncovery(tolerance)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 1, 28, 28) -> style posterior mean and log-variance, each (N, style_dim)."""
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var.clamp(-10, 10)

    def decode(self, classes: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Classes (N,) and style codes (N, style_dim) -> image logits (N, 1, 28, 28); sigmoid gives grey."""
        h = self.rule_in(self.rules.weight)[classes] + self.style_in(z)  # project the 10 rules, then pick
        return self.decoder(h).view(-1, 1, SIDE, SIDE)

    def image_loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """How badly rendered logits (N, 1, 28, 28) explain images x (N, 1, 28, 28): (N,), lower is better."""
        recon = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").mean((1, 2, 3))
        if self.loss == "uncovery":
            compared = self.uncovery(x, recon)
        elif self.loss == "mse":
            compared = (recon - x).pow(2).mean((1, 2, 3))
        else:
            compared = bce
        return compared + self.pixel_weight * bce

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean over the batch of image_loss(x, render(y, z)) + kl_weight * KL(q(z | x) || N(0, I)).

        x (B, 1, 28, 28), y (B,) true classes; z is sampled from the encoder's posterior (reparameterised).
        label_smoothing belongs to classifiers and is ignored.
        """
        mean, log_var = self.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1)
        return (self.image_loss(x, self.decode(y, z)) + self.kl_weight * kl).mean()

    def forward(self, x: torch.Tensor, chunk: int = 100) -> torch.Tensor:
        """The generator alone as a classifier: images (B, 1, 28, 28) -> logits (B, 10).

        Every rule renders the image in the encoder's style guess (10 decodes per image, no refinement);
        logit_c = -image_loss / temperature. Works in chunks of `chunk` images to bound memory.
        """
        classes = torch.arange(10, device=x.device)
        logits = []
        for part in x.split(chunk):
            z = self.encode(part)[0].repeat_interleave(10, 0)  # the same style guess under every rule
            rendered = self.decode(classes.repeat(len(part)), z)
            logits.append(-self.image_loss(part.repeat_interleave(10, 0), rendered).view(-1, 10) / self.temperature)
        return torch.cat(logits)

    def fit_styles(self, x: torch.Tensor, classes: torch.Tensor, steps: int = 20, lr: float = 0.1) -> torch.Tensor:
        """Analysis by synthesis: images x (P, 1, 28, 28) each paired with a candidate class (P,) -> losses (P,).

        Starting from the encoder's guess, Adam refines each pair's style code for `steps` steps on
        image_loss + kl_weight * |z|^2 / 2 (the prior keeps the style plausible, so a wrong rule cannot
        explain the image by an absurd style); returns the lowest value each pair reached. The pairs are
        independent (Adam's update is per coordinate), so they are fitted in one batch.
        """
        with torch.no_grad():
            z = self.encode(x)[0]
        z.requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=lr)
        best = torch.full((len(x),), math.inf, device=x.device)
        for step in range(steps + 1):
            objective = self.image_loss(x, self.decode(classes, z)) + self.kl_weight * 0.5 * z.pow(2).sum(1)
            best = torch.minimum(best, objective.detach())
            if step == steps:
                break
            (z.grad,) = torch.autograd.grad(objective.sum(), z)
            optimizer.step()
        return best

    def write_figures(self, folder: Path) -> list[Path]:
        """Write `samples.png` into `folder` (see `save_sample_grid`); returns the paths written."""
        return [save_sample_grid(self, Path(folder) / "samples.png")]


@torch.no_grad()
def save_sample_grid(model: DigitGenerator, path: Path, styles: int = 8, seed: int = 0) -> Path:
    """PNG grid: one row per digit 0-9, one column per style code z ~ N(0, I) (the same codes in every row)."""
    z = torch.randn(styles, model.style_dim, generator=torch.Generator().manual_seed(seed))
    classes = torch.arange(10).repeat_interleave(styles)
    images = torch.sigmoid(model.decode(classes, z.repeat(10, 1)))
    save_image(make_grid(images, nrow=styles, padding=2, pad_value=0.5), path)
    return path


@register_model("generator", "rules of writing (class embeddings) + style VAE, range-uncovery loss; classifies by "
                "rendering",
                epochs=12, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=0.0, schedule="onecycle",
                label_smoothing=0.0, augment=False)
def build_generator(embed_dim: int = 1024, style_dim: int = 8, hidden: int = 512, loss: str = "uncovery",
                    pixel_weight: float = 1.0, kl_weight: float = 0.005, tolerance=(1.0, 1.0, 0.25),
                    temperature: float = 0.02) -> nn.Module:
    return DigitGenerator(embed_dim, style_dim, hidden, loss, pixel_weight, kl_weight, tuple(tolerance), temperature)

"""The report's figures, drawn with matplotlib's object API (no pyplot, so no GUI backend and no global
state) and returned as PNG bytes for embedding as data URIs. Each function takes the same table that is
written as the figure's CSV, so the picture and the numbers cannot drift apart.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

DPI = 110
COLUMNS_PER_ROW = 3


def literal(name: str) -> str:
    """A run, group or annotator name as matplotlib text: a pair of "$" in it would be read as mathematics."""
    return name.replace("$", r"\$")


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def digit_png(image: np.ndarray) -> bytes:
    """One uint8 (28, 28) image as a greyscale PNG at its own size (the page scales it up, pixelated)."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def confusion_grid(matrices: dict[str, np.ndarray], column_labels: list[str], title: str) -> bytes:
    """Small confusion matrices side by side, rows = dataset label 0-9, columns = `column_labels`.

    The colour scale covers only the off-diagonal cells (the mistakes); the diagonal is drawn grey, so a
    handful of confusions stays visible next to thousands of correct answers. Every non-zero count is
    printed in its cell. matrices: {panel title: int array (10, len(column_labels))}.
    """
    rows = math.ceil(len(matrices) / COLUMNS_PER_ROW)
    cols = min(len(matrices), COLUMNS_PER_ROW)
    fig = Figure(figsize=(3.6 * cols, 3.7 * rows + 0.4))
    fig.suptitle(literal(title))
    for position, (name, matrix) in enumerate(matrices.items(), start=1):
        ax = fig.add_subplot(rows, cols, position)
        off_diagonal = matrix.astype(float)
        np.fill_diagonal(off_diagonal, np.nan)
        scale = max(1.0, np.nanmax(off_diagonal))
        ax.imshow(np.where(np.eye(*matrix.shape, dtype=bool), 0.35, np.nan), cmap="Greys", vmin=0, vmax=1)
        ax.imshow(off_diagonal, cmap="Reds", vmin=0, vmax=scale)
        for (label, column), count in np.ndenumerate(matrix):
            if count:
                dark = label != column and count > 0.6 * scale
                ax.text(column, label, str(count), ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "black")
        ax.set_title(literal(name), fontsize=9)
        ax.set_xticks(range(len(column_labels)), column_labels, fontsize=7)
        ax.set_yticks(range(10), [str(d) for d in range(10)], fontsize=7)
        ax.set_xlabel("answer", fontsize=8)
        ax.set_ylabel("dataset label", fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def errors_by_group(runs: pd.DataFrame) -> bytes:
    """Test errors per group of seeds: one dot per run, a bar at the mean with the sample std as error bar."""
    groups = sorted(runs["group"].unique(), key=lambda g: runs.loc[runs["group"] == g, "test_errors"].mean())
    fig = Figure(figsize=(max(4.5, 1.1 * len(groups) + 2), 3.4))
    ax = fig.add_subplot()
    for x, group in enumerate(groups):
        errors = runs.loc[runs["group"] == group, "test_errors"].to_numpy(dtype=float)
        spread = errors.std(ddof=1) if len(errors) > 1 else 0.0
        ax.bar(x, errors.mean(), yerr=spread, color="#9ecae1", edgecolor="#3182bd", capsize=4, width=0.6)
        ax.plot(np.full(len(errors), x), errors, "o", color="#08519c", markersize=4)
    ax.set_xticks(range(len(groups)), [literal(g) for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test errors (of 10,000)")
    ax.set_title("Test errors per model: mean ± std over seeds, dots are runs", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return png_bytes(fig)


def net_gain_over_tau(sweep: pd.DataFrame) -> bytes:
    """Net gain (fixed - introduced) of the generator assist against the threshold tau, one line per run."""
    fig = Figure(figsize=(5.5, 3.4))
    ax = fig.add_subplot()
    for run, points in sweep.groupby("run", sort=True):
        points = points.sort_values("tau")
        ax.plot(points["tau"], points["net_gain"], "o-", markersize=3, label=literal(run))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("tau (consult the generator below this confidence)")
    ax.set_ylabel("net gain (errors fixed − introduced)")
    ax.set_title("Generator assist over the tau sweep", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def accuracy_per_step(curves: pd.DataFrame, bounds: pd.DataFrame) -> bytes:
    """Glimpse models' test accuracy after each step, against the pixel bounds as accuracies.

    curves: long table run, step (1-based), accuracy. bounds: one row per subset with single_accuracy
    (best single pixel) and adaptive_accuracy (adaptive pair), drawn as horizontal lines.
    """
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    for run, curve in curves.groupby("run", sort=True):
        ax.plot(curve["step"], curve["accuracy"], "o-", markersize=3, label=literal(run))
    for (_, bound), colour in zip(bounds.iterrows(), ["#d95f02", "#7570b3", "#e7298a", "#66a61e"]):
        ax.axhline(bound["single_accuracy"], color=colour, linestyle=":",
                   label=f"best single pixel ({bound['subset']})")
        ax.axhline(bound["adaptive_accuracy"], color=colour, linestyle="--",
                   label=f"adaptive pixel pair ({bound['subset']})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("glimpse step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy per glimpse step vs the pixel bounds", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return png_bytes(fig)

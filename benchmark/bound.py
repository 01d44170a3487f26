"""The exhaustive two-pixel upper bound: how many digits can a lookup table on two fixed pixels name?

The question. Write down two pixel positions a < b (row-major, 0..783). For a random image you are told the
two grey levels (ga, gb) and answer with a lookup table. The best table answers, for every observed cell
(ga, gb), the most common label among the images in that cell, so

    correct(a, b) = sum over observed cells (ga, gb) of  max_label  #{images with a = ga, b = gb, label}.

The count is in-sample (table fitted and scored on the same images), so it is an upper bound for any
classifier that sees only those two pixels. On all 70,000 MNIST images the best pair is (406, 409) =
(14, 14) and (14, 17) with 34,711 correct. Every arg-max over pixels breaks ties towards the lowest index
(lowest a, then lowest b).

Around it, on the same data:
  best_single  the same bound with one pixel (the diagonal of the pair matrix).
  adaptive     a two-glimpse ceiling: pixel a is fixed, the second pixel may depend on a's grey level g;
               correct = sum over g of max over b of (best single-pixel table for b on the images with a = g).
  heldout      the honest version: tables fitted on the 60,000 training images, scored on the 10,000 test
               images. The table answers the most common training label in the cell (ties: lowest label);
               a cell (ga, gb) no training image shows answers the most common training label among images
               with a = ga (pair a < b, so the lower pixel), and if no training image has a = ga either,
               the most common training label overall. Reported: the test score of the pair with the best
               in-sample *training* count (honest: nothing is chosen on the test set), and, clearly labelled
               as an oracle ceiling, the best test score over all pairs (chosen on the test set itself).

How the search is fast (exact, no sampling). The naive way builds a 65,536 x 10 joint histogram per pair
with np.bincount (~2 ms a pair, ~11 minutes for 306,936 pairs). Here most grey levels are 0 (an image has
~150 of 784 pixels non-zero), so every count is split by which of the two pixels is zero:

    correct(a, b) = Y[a, b] + D[a, b] + D[b, a] + Z[a, b]
    Y[a, b]  cells with ga != 0, gb != 0: found by walking, for every image with a != 0, only its
             non-zero pixels b (sum over images of nnz^2 ~ 1.7e9 steps in total, not N * 784^2);
    D[a, b]  cells (ga != 0, gb = 0): per grey level g of a, the label counts of the images with a = g minus
             those with b != 0 (which the same walk counts);
    Z[a, b]  the cell (0, 0): inclusion-exclusion, n - A[a] - A[b] + AB[a, b] per label, where A counts
             images with a non-zero pixel and AB with both non-zero.
For each (a, g) the walk keeps every cell's running label maximum, so the sum of maxima updates in O(1) per
step and scratch memory is reset only where it was touched. One numba kernel does this for every pixel a in
parallel (per-thread scratch); the same walk scores held-out images against the fitted tables. With CUDA a
torch path (batched bincount) computes the in-sample counts with identical results.

Outputs of `run_bound` in the output folder: summary.json, pairs.npy (784 x 784 int64, symmetric, diagonal =
single-pixel counts), top100_pairs.csv and heatmap.png (28 x 28: each pixel's best pair count).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

SUBSETS = ("all", "train", "test")
LEVELS = 256  # grey levels of a uint8 pixel
SIDE = 28


@dataclass
class BoundConfig:
    naive_sample_pairs: int = 400  # pairs timed with the naive bincount for the extrapolation (~1 s)
    top_pairs: int = 100  # rows of top100_pairs.csv
    progress_steps: int = 32  # kernel calls per search, one progress-bar update each
    seed: int = 0  # which pairs the naive benchmark samples


@dataclass
class PairCounts:
    """Result of one exhaustive search over all pixel pairs of (N, P) images.

    pairs     (P, P) int64 in-sample correct counts of the best table, symmetric; diagonal = single pixel.
    adaptive  (P,) int64: correct count of the adaptive two-glimpse table with first pixel a.
    heldout   (P, P) int64 or None: images of the scored set the fitted pair table names correctly
              (symmetric; diagonal = single pixel); None when no scored set was given.
    """

    pairs: np.ndarray
    adaptive: np.ndarray
    heldout: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------------
# numba kernels


@njit(cache=True)
def _sparse_layout(images, is_score):
    """Both sparse views of the non-zero pixels of uint8 images (N, P).

    Row view (per image, pixels ascending): row_ptr (N+1,), row_pix (nnz,), row_val (nnz,).
    Column view (per pixel, sorted by grey level, then fitted before scored images, then image index):
    col_ptr (P+1,), col_img (nnz,), col_val (nnz,). A counting sort, O(N * P).
    """
    n, p = images.shape
    row_ptr = np.zeros(n + 1, np.int64)
    bucket = np.zeros(p * LEVELS * 2 + 1, np.int64)  # bucket (pixel, grey, scored) -> start
    for i in range(n):
        for j in range(p):
            v = images[i, j]
            if v != 0:
                row_ptr[i + 1] += 1
                bucket[(j * LEVELS + v) * 2 + is_score[i] + 1] += 1
    row_ptr = np.cumsum(row_ptr)
    bucket = np.cumsum(bucket)
    nnz = row_ptr[n]
    row_pix = np.empty(nnz, np.int32)
    row_val = np.empty(nnz, np.uint8)
    col_img = np.empty(nnz, np.int32)
    col_val = np.empty(nnz, np.uint8)
    fill = bucket[:-1].copy()
    q = 0
    for i in range(n):
        for j in range(p):
            v = images[i, j]
            if v != 0:
                row_pix[q] = j
                row_val[q] = v
                q += 1
                k = (j * LEVELS + v) * 2 + is_score[i]
                col_img[fill[k]] = i
                col_val[fill[k]] = v
                fill[k] += 1
    col_ptr = bucket[:: LEVELS * 2].copy()
    return row_ptr, row_pix, row_val, col_ptr, col_img, col_val


@njit(cache=True)
def _grey_label_counts(images, labels, n_labels):
    """(P, 256, n_labels) int64: how many images show grey level g at pixel p with each label."""
    n, p = images.shape
    counts = np.zeros((p, LEVELS, n_labels), np.int64)
    for i in range(n):
        for j in range(p):
            counts[j, images[i, j], labels[i]] += 1
    return counts


@njit(cache=True)
def _argmax(values):
    """Index of the first maximum (numba's np.argmax agrees, this states the tie rule)."""
    best = 0
    for k in range(1, values.shape[0]):
        if values[k] > values[best]:
            best = k
    return best


@njit(cache=True)
def _fallback(row_major, first, g_first, other, g_other):
    """Answer for a cell no fitted image shows: the majority of the pair's lower pixel at its grey level."""
    return row_major[first, g_first] if first < other else row_major[other, g_other]


@njit(parallel=True, cache=True)
def _scan_kernel(pixels, n_labels, stride, row_ptr, row_pix, row_val, col_ptr, col_img, col_val, labels,
                 is_score, row_major, fit_y, fit_d, fit_ab, adapt_nonzero, held_y, held_d, score_ab,
                 hist, cells, csum, nzl_fit, nzl_score, touched, flag):
    """Walk every image with pixel a != 0 for each a in `pixels` (see the module docstring).

    Writes rows a of: fit_y, fit_d (P, P) (the Y and D terms of the fitted images), fit_ab (P, P, L)
    (fitted images with a and b non-zero, per label), adapt_nonzero (P,) (the adaptive count summed over
    a's non-zero grey levels), held_y, held_d (P, P) and score_ab (P, P, L) (the same for scored images,
    scored against the tables of the fitted ones). Rows of different a are independent, so threads write
    disjoint memory. Scratch, one row per thread, all zero on entry and on exit:
    hist (T, P * 256 * stride) label counts of each cell (b, gb) in slots 0..L-1, their maximum in slot L;
    cells (T, P * 256) touched cells; csum (T, P) sum over cells of maxima; nzl_fit, nzl_score (T, P * L)
    images with b != 0 per label; touched (T, P) and flag (T, P) pixels b seen in the current group.
    """
    n_pixels = fit_y.shape[0]
    for k in prange(pixels.shape[0]):
        w = numba.get_thread_id()
        a = pixels[k]
        gcount_fit = np.zeros(n_labels, np.int64)
        gcount_score = np.zeros(n_labels, np.int64)
        t_cell = np.zeros(n_labels, np.int64)
        d_base = 0  # D[a, b] of a pixel b no image of the group shows non-zero, summed over groups
        hd_base = 0
        adapt = 0
        start, end = col_ptr[a], col_ptr[a + 1]
        while start < end:
            g = col_val[start]  # one group: the images with a == g (fitted ones first)
            stop = start
            while stop < end and col_val[stop] == g:
                stop += 1
            gcount_fit[:] = 0
            gcount_score[:] = 0
            n_cells = 0
            n_touched = 0
            for j in range(start, stop):
                i = col_img[j]
                label = labels[i]
                scored = is_score[i] != 0
                if scored:
                    gcount_score[label] += 1
                else:
                    gcount_fit[label] += 1
                for q in range(row_ptr[i], row_ptr[i + 1]):
                    b = row_pix[q]
                    gb = row_val[q]
                    base = (b * LEVELS + gb) * stride
                    if flag[w, b] == 0:
                        flag[w, b] = 1
                        touched[w, n_touched] = b
                        n_touched += 1
                    if scored:  # all fitted images of the group are already counted
                        if hist[w, base + n_labels] > 0:
                            pred = _argmax(hist[w, base:base + n_labels])
                        else:
                            pred = _fallback(row_major, a, g, b, gb)
                        if pred == label:
                            held_y[a, b] += 1
                        nzl_score[w, b * n_labels + label] += 1
                        score_ab[a, b, label] += 1
                    else:
                        h = hist[w, base + label] + 1
                        hist[w, base + label] = h
                        if h > hist[w, base + n_labels]:  # the cell's maximum grows by one
                            if h == 1:
                                cells[w, n_cells] = base
                                n_cells += 1
                            hist[w, base + n_labels] = h
                            csum[w, b] += 1
                        nzl_fit[w, b * n_labels + label] += 1
                        fit_ab[a, b, label] += 1
            # Close the group. A pixel b no image of the group shows non-zero has one cell (g, 0) holding
            # the whole group: the same value for every such b, added once per row through d_base.
            group_max = gcount_fit.max()
            d_base += group_max
            n_fit = gcount_fit.sum()
            n_score = gcount_score.sum()
            if n_score > 0:
                if n_fit > 0:
                    hd_base += gcount_score[_argmax(gcount_fit)]
                else:  # no fitted image has a == g: the answer is each pair's fallback, per b
                    for b in range(n_pixels):
                        held_d[a, b] += gcount_score[_fallback(row_major, a, g, b, 0)]
            best = group_max
            for u in range(n_touched):
                b = touched[w, u]
                zero_max = 0  # best label count of the cell (g, 0): the group minus b != 0
                for c in range(n_labels):
                    t_cell[c] = gcount_fit[c] - nzl_fit[w, b * n_labels + c]
                    zero_max = max(zero_max, t_cell[c])
                fit_y[a, b] += csum[w, b]
                fit_d[a, b] += zero_max - group_max
                best = max(best, csum[w, b] + zero_max)
                if n_score > 0:
                    if n_fit > 0:
                        pred_all = _argmax(gcount_fit)
                    else:
                        pred_all = _fallback(row_major, a, g, b, 0)
                    pred = _argmax(t_cell) if t_cell.sum() > 0 else _fallback(row_major, a, g, b, 0)
                    held_d[a, b] += (gcount_score[pred] - nzl_score[w, b * n_labels + pred]
                                     - gcount_score[pred_all])
                csum[w, b] = 0
                flag[w, b] = 0
                for c in range(n_labels):
                    nzl_fit[w, b * n_labels + c] = 0
                    nzl_score[w, b * n_labels + c] = 0
            adapt += best
            for u in range(n_cells):
                base = cells[w, u]
                hist[w, base:base + stride] = 0
            start = stop
        for b in range(n_pixels):
            fit_d[a, b] += d_base
            held_d[a, b] += hd_base
        adapt_nonzero[a] = adapt


# --------------------------------------------------------------------------------------------------------
# the search


def _check_images(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, ...) uint8 images -> (N, P) C-contiguous uint8; labels -> (N,) int64 >= 0."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 grey levels, got {images.dtype}")
    images = np.ascontiguousarray(images.reshape(len(images), int(np.prod(images.shape[1:]))))
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),) or (labels < 0).any():
        raise ValueError("labels must be one non-negative integer per image")
    return images, labels


def scan_pairs(fit_images: np.ndarray, fit_labels: np.ndarray, score_images: np.ndarray | None = None,
               score_labels: np.ndarray | None = None, progress: bool = False,
               cfg: BoundConfig = BoundConfig()) -> PairCounts:
    """Exact counts for every pixel pair on the CPU (numba, all threads).

    fit_images (N, ...) uint8 and fit_labels (N,) int: the images the tables are fitted on (in-sample counts
    `pairs`, `adaptive`). score_images (M, ...) / score_labels (M,), optional: held-out images scored
    against those tables (`heldout`, fallback as in the module docstring). progress shows a rich bar.
    """
    fit_images, fit_labels = _check_images(fit_images, fit_labels)
    scored = score_images is not None
    if scored:
        score_images, score_labels = _check_images(score_images, score_labels)
        if score_images.shape[1] != fit_images.shape[1]:
            raise ValueError("fitted and scored images must have the same number of pixels")
    else:
        score_images = np.zeros((0, fit_images.shape[1]), np.uint8)
        score_labels = np.zeros(0, np.int64)
    images = np.concatenate([fit_images, score_images])
    labels = np.concatenate([fit_labels, score_labels])
    is_score = np.repeat(np.array([0, 1], np.uint8), [len(fit_labels), len(score_labels)])
    n_pixels = images.shape[1]
    n_labels = int(labels.max()) + 1 if len(labels) else 1
    row_ptr, row_pix, row_val, col_ptr, col_img, col_val = _sparse_layout(images, is_score)

    fit_counts = _grey_label_counts(fit_images, fit_labels, n_labels)  # (P, 256, L)
    fit_per_label = fit_counts[0].sum(0)  # (L,)
    # the held-out fallback: majority label of the fitted images at (pixel, grey), else overall
    row_major = np.where(fit_counts.sum(2) > 0, fit_counts.argmax(2), fit_per_label.argmax())

    fit_y, fit_d, held_y, held_d = (np.zeros((n_pixels, n_pixels), np.int64) for _ in range(4))
    fit_ab, score_ab = (np.zeros((n_pixels, n_pixels, n_labels), np.int32) for _ in range(2))
    adapt_nonzero = np.zeros(n_pixels, np.int64)
    threads = numba.get_num_threads()
    stride = -(-(n_labels + 1) // 16) * 16  # a cell's label counts and maximum fill whole cache lines
    hist = np.zeros((threads, n_pixels * LEVELS * stride), np.int32)
    cells = np.zeros((threads, n_pixels * LEVELS), np.int64)
    csum, touched = (np.zeros((threads, n_pixels), np.int64) for _ in range(2))
    nzl_fit, nzl_score = (np.zeros((threads, n_pixels * n_labels), np.int64) for _ in range(2))
    flag = np.zeros((threads, n_pixels), np.uint8)

    # Heaviest pixels first and one pixel per scheduling chunk, so both threads finish together.
    work = np.bincount(row_pix, weights=np.repeat(np.diff(row_ptr), np.diff(row_ptr)), minlength=n_pixels)
    order = np.argsort(-work, kind="stable")
    steps = [s for s in np.array_split(order, cfg.progress_steps) if len(s)]
    old_chunksize = numba.get_parallel_chunksize()
    numba.set_parallel_chunksize(1)
    try:
        with _progress_bar(progress, work.sum(), "pixel pairs") as advance:
            for step in steps:
                _scan_kernel(step, n_labels, stride, row_ptr, row_pix, row_val, col_ptr, col_img, col_val,
                             labels, is_score, row_major, fit_y, fit_d, fit_ab, adapt_nonzero, held_y,
                             held_d, score_ab, hist, cells, csum, nzl_fit, nzl_score, touched, flag)
                advance(work[step].sum())
    finally:
        numba.set_parallel_chunksize(old_chunksize)

    nonzero_fit = np.diagonal(fit_ab).T.astype(np.int64)  # (P, L): b = a is non-zero exactly when a is
    zero_zero = (fit_per_label - nonzero_fit[:, None, :] - nonzero_fit[None, :, :] + fit_ab)  # (P, P, L)
    z = zero_zero.max(2)
    pairs = fit_y + fit_d + fit_d.T + z
    # With a == 0 the second pixel b sees the cells (0, gb): D[b, a] for gb != 0 and Z[a, b] for gb = 0.
    adaptive = adapt_nonzero + (fit_d.T + z).max(1)
    heldout = None
    if scored:
        score_per_label = np.bincount(score_labels, minlength=n_labels)
        nonzero_score = np.diagonal(score_ab).T.astype(np.int64)
        score_zz = score_per_label - nonzero_score[:, None, :] - nonzero_score[None, :, :] + score_ab
        lower = np.minimum.outer(np.arange(n_pixels), np.arange(n_pixels))
        pred = np.where(zero_zero.sum(2) > 0, zero_zero.argmax(2), row_major[lower, 0])
        heldout = held_y + held_d + held_d.T + np.take_along_axis(score_zz, pred[..., None], 2)[..., 0]
    return PairCounts(pairs=pairs, adaptive=adaptive, heldout=heldout)


def scan_pairs_torch(images: np.ndarray, labels: np.ndarray, device: str = "cuda",
                     block: int = 32) -> PairCounts:
    """The in-sample counts (`pairs`, `adaptive`) with torch: per first pixel a, one bincount of the joint
    (ga, gb, label) histogram for a block of second pixels at once. Meant for CUDA; on the CPU it is
    correct but slow (tests use it on tiny data to check it agrees with `scan_pairs`).
    Memory per call: block * 256 * 256 * L int64 (~170 MB for block 32, L 10).
    """
    import torch

    images, labels = _check_images(images, labels)
    n_pixels = images.shape[1]
    n_labels = int(labels.max()) + 1 if len(labels) else 1
    x = torch.from_numpy(images).to(device).long().T.contiguous()  # (P, N)
    y = torch.from_numpy(labels).to(device)
    pairs = torch.zeros((n_pixels, n_pixels), dtype=torch.long, device=device)
    adaptive = torch.zeros(n_pixels, dtype=torch.long, device=device)
    cell_bins = LEVELS * LEVELS * n_labels
    for a in range(n_pixels):
        best_per_grey = torch.zeros(LEVELS, dtype=torch.long, device=device)  # max over b of C_b(a == g)
        for b0 in range(0, n_pixels, block):
            bs = torch.arange(b0, min(b0 + block, n_pixels), device=device)
            keys = (x[a] * LEVELS + x[bs]) * n_labels + y + (bs - b0)[:, None] * cell_bins  # (B, N)
            hist = torch.bincount(keys.flatten(), minlength=len(bs) * cell_bins)
            per_grey = hist.view(len(bs), LEVELS, LEVELS, n_labels).amax(3).sum(2)  # (B, 256 grey of a)
            pairs[a, bs] = per_grey.sum(1)
            best_per_grey = torch.maximum(best_per_grey, per_grey.amax(0))
        adaptive[a] = best_per_grey.sum()
    return PairCounts(pairs=pairs.cpu().numpy(), adaptive=adaptive.cpu().numpy())


def naive_pair_count(images_by_pixel: np.ndarray, labels: np.ndarray, a: int, b: int, n_labels: int) -> int:
    """The straightforward count for one pair: np.bincount of the 65,536 x L joint histogram, sum of row
    maxima. images_by_pixel (P, N) uint8 (pixel-major, so a column read is contiguous); labels (N,) int64."""
    keys = (images_by_pixel[a].astype(np.int64) * LEVELS + images_by_pixel[b]) * n_labels + labels
    return int(np.bincount(keys, minlength=LEVELS * LEVELS * n_labels).reshape(-1, n_labels).max(1).sum())


# --------------------------------------------------------------------------------------------------------
# the command


def best_pair(matrix: np.ndarray) -> tuple[int, int, int]:
    """(a, b, value) of the largest entry with a < b; ties go to the lowest (a, b)."""
    rows, cols = np.triu_indices(len(matrix), 1)  # row-major order, so argmax's first hit is the lowest
    k = int(np.argmax(matrix[rows, cols]))
    return int(rows[k]), int(cols[k]), int(matrix[rows[k], cols[k]])


def subset_data(mnist, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of `all` (train then test, 70,000), `train` or `test`."""
    if subset == "train":
        return mnist.train_images, mnist.train_labels
    if subset == "test":
        return mnist.test_images, mnist.test_labels
    return (np.concatenate([mnist.train_images, mnist.test_images]),
            np.concatenate([mnist.train_labels, mnist.test_labels]))


def _progress_bar(enabled: bool, total: float, what: str):
    """Context manager yielding advance(amount); a transient rich bar on stderr when enabled."""
    from contextlib import contextmanager

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    @contextmanager
    def bar():
        if not enabled:
            yield lambda amount: None
            return
        with Progress(TextColumn(f"searching {what}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), console=Console(stderr=True), transient=True) as prog:
            task = prog.add_task(what, total=float(total))
            yield lambda amount: prog.advance(task, float(amount))

    return bar()


def _pixel(p: int) -> dict:
    return {"pixel": p, "row": p // SIDE, "col": p % SIDE}


def _warm_up(engine: str, device: str) -> float:
    """Compile (or load from numba's cache) the kernels on a tiny problem; returns the seconds it took."""
    start = time.perf_counter()
    tiny = np.random.default_rng(0).integers(0, 3, size=(8, 4), dtype=np.uint8)
    tiny_labels = np.arange(8) % 3
    scan_pairs(tiny, tiny_labels, tiny, tiny_labels)
    if engine == "torch":
        scan_pairs_torch(tiny, tiny_labels, device)
    return time.perf_counter() - start


def time_naive(images: np.ndarray, labels: np.ndarray, pairs: np.ndarray, cfg: BoundConfig) -> dict:
    """Time the naive per-pair bincount on a seeded sample of pairs and extrapolate to all pairs.

    Also checks that every sampled naive count equals the search's `pairs` entry (raises if not).
    """
    images, labels = _check_images(images, labels)
    by_pixel = np.ascontiguousarray(images.T)
    n_labels = int(labels.max()) + 1
    n_pixels = by_pixel.shape[0]
    rows, cols = np.triu_indices(n_pixels, 1)
    sample = np.random.default_rng(cfg.seed).choice(len(rows), size=min(cfg.naive_sample_pairs, len(rows)),
                                                    replace=False)
    start = time.perf_counter()
    naive = [naive_pair_count(by_pixel, labels, rows[k], cols[k], n_labels) for k in sample]
    seconds = time.perf_counter() - start
    if not np.array_equal(naive, pairs[rows[sample], cols[sample]]):
        raise RuntimeError("the fast search disagrees with the naive count on a sampled pair")
    per_pair = seconds / len(sample)
    return {"naive_pairs_timed": int(len(sample)), "naive_seconds_per_pair": per_pair,
            "naive_extrapolated_seconds": per_pair * len(rows), "naive_agrees_on_sample": True}


def run_bound(mnist, subset: str, out: Path, device: str = "cpu", benchmark: bool = False,
              cfg: BoundConfig = BoundConfig(), progress: bool = True) -> dict:
    """Search all pairs of `subset`, compute the held-out figures, write the outputs into `out`.

    mnist: a `benchmark.data.Mnist`; subset in SUBSETS; device "cpu" (numba) or "cuda" (torch for the
    in-sample search; the held-out pass always runs on the CPU). Returns the summary dict (also
    `out/summary.json`).
    """
    import pandas as pd

    from benchmark.runs import machine_description

    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}")
    engine = "torch" if device.startswith("cuda") else "numba"
    images, labels = subset_data(mnist, subset)
    total = len(labels)
    load_before = os.getloadavg()[0]
    jit_seconds = _warm_up(engine, device)

    start = time.perf_counter()
    if engine == "torch":
        counts = scan_pairs_torch(images, labels, device)
    else:
        counts = scan_pairs(images, labels, progress=progress, cfg=cfg)
    search_seconds = time.perf_counter() - start

    start = time.perf_counter()
    held = scan_pairs(mnist.train_images, mnist.train_labels, mnist.test_images, mnist.test_labels,
                      progress=progress, cfg=cfg)
    heldout_seconds = time.perf_counter() - start

    a, b, correct = best_pair(counts.pairs)
    singles = np.diagonal(counts.pairs)
    single = int(np.argmax(singles))
    first = int(np.argmax(counts.adaptive))
    ta, tb, train_correct = best_pair(held.pairs)
    oa, ob, oracle_correct = best_pair(held.heldout)
    n_test = len(mnist.test_labels)
    summary = {
        "subset": subset, "total": total,
        "best_pair": {"pixels": [a, b], "coords": [[a // SIDE, a % SIDE], [b // SIDE, b % SIDE]],
                      "correct": correct, "accuracy": correct / total},
        "best_single": {**_pixel(single), "correct": int(singles[single]), "accuracy": singles[single] / total},
        "adaptive": {"first_pixel": first, "row": first // SIDE, "col": first % SIDE,
                     "correct": int(counts.adaptive[first]), "accuracy": counts.adaptive[first] / total},
        "heldout": {
            "fit": f"train ({len(mnist.train_labels)})", "scored": f"test ({n_test})",
            "fallback": "unseen (ga, gb) cell: majority training label with pixel a == ga (a < b), "
                        "else the overall training majority",
            "train_best_pair": {"pixels": [ta, tb], "train_correct": train_correct,
                                "test_correct": int(held.heldout[ta, tb]),
                                "test_accuracy": held.heldout[ta, tb] / n_test,
                                "note": "honest: pair chosen by in-sample training count"},
            "oracle_best_pair": {"pixels": [oa, ob], "test_correct": oracle_correct,
                                 "test_accuracy": oracle_correct / n_test,
                                 "note": "oracle ceiling: pair chosen by its test score, not an estimate"},
            "seconds": heldout_seconds,
        },
        "seconds": search_seconds,
        "engine": f"numba, {numba.get_num_threads()} threads" if engine == "numba" else f"torch on {device}",
        "jit_seconds": jit_seconds,
        "timing_note": "seconds: pairs + singles + adaptive from the raw images, numba compile/cache load "
                       "excluded (jit_seconds, done before the clock starts); held-out pass timed separately",
        "machine": machine_description(device), "load_average_1min": load_before,
    }
    if benchmark:
        naive = time_naive(images, labels, counts.pairs, cfg)
        summary["benchmark"] = {**naive, "search_seconds": search_seconds,
                                "speedup": naive["naive_extrapolated_seconds"] / search_seconds}

    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "pairs.npy", counts.pairs)
    rows, cols = np.triu_indices(len(counts.pairs), 1)
    values = counts.pairs[rows, cols]
    top = np.lexsort((cols, rows, -values))[:cfg.top_pairs]  # by count, ties to the lowest (a, b)
    pd.DataFrame({"rank": np.arange(1, len(top) + 1), "a": rows[top], "b": cols[top],
                  "a_row": rows[top] // SIDE, "a_col": rows[top] % SIDE, "b_row": cols[top] // SIDE,
                  "b_col": cols[top] % SIDE, "correct": values[top],
                  "accuracy": values[top] / total}).to_csv(out / "top100_pairs.csv", index=False)
    _heatmap(counts.pairs, (a, b), total, subset, out / "heatmap.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _heatmap(pairs: np.ndarray, best: tuple[int, int], total: int, subset: str, path: Path) -> None:
    """28 x 28 image: for each pixel the count of its best partner (max over b != a), best pair marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off_diagonal = pairs.copy()
    np.fill_diagonal(off_diagonal, -1)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(off_diagonal.max(1).reshape(SIDE, SIDE), cmap="viridis")
    ax.scatter([p % SIDE for p in best], [p // SIDE for p in best], marker="x", color="red", s=60,
               label=f"best pair {best[0]}, {best[1]}")
    ax.set_title(f"best two-pixel table per pixel ({subset}, {total:,} images)")
    ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(im, ax=ax, label="images named correctly")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(summary: dict):
    """A rich Table of the headline figures of a `run_bound` summary."""
    from rich.table import Table

    held = summary["heldout"]
    table = Table(title=f"two-pixel bound on {summary['subset']} ({summary['total']:,} images)")
    for col in ("bound", "pixels", "correct", "accuracy"):
        table.add_column(col)
    pair, single, adaptive = summary["best_pair"], summary["best_single"], summary["adaptive"]
    table.add_row("best single pixel", str(single["pixel"]), f"{single['correct']:,}", f"{single['accuracy']:.2%}")
    table.add_row("best pair", f"{pair['pixels'][0]}, {pair['pixels'][1]}", f"{pair['correct']:,}",
                  f"{pair['accuracy']:.2%}")
    table.add_row("adaptive second pixel", f"{adaptive['first_pixel']}, then by grey level",
                  f"{adaptive['correct']:,}", f"{adaptive['accuracy']:.2%}")
    for key, name in (("train_best_pair", "held-out, pair chosen on train"),
                      ("oracle_best_pair", "held-out oracle ceiling (chosen on test)")):
        row = held[key]
        table.add_row(name, f"{row['pixels'][0]}, {row['pixels'][1]}", f"{row['test_correct']:,} / test",
                      f"{row['test_accuracy']:.2%}")
    return table

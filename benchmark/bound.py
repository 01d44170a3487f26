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
    Y[a, b]  cells with ga != 0, gb != 0: for each grey level g != 0 of a, walk the images with a = g and,
             in each, only its non-zero pixels b >= a (Y is symmetric; about half of the sum over images
             of nnz^2 ~ 1.7e9, against 784^2 / 2 * 70,000 ~ 2.2e10 pixel reads for the naive way);
    D[a, b]  cells (ga != 0, gb = 0): the label counts of the images with a = g minus those with b != 0
             (which the same walk counts, the pixels b < a included), best label, summed over g;
    Z[a, b]  the cell (0, 0): inclusion-exclusion, n - A[a] - A[b] + AB[a, b] per label, where A counts
             images with a non-zero pixel and AB with both non-zero (also from the walk).
The same per-(a, g) counts give the adaptive bound (best b per g) and score held-out images. The adaptive
bound needs second pixels on both sides of a; the half below a comes from the lower pixel's walk, which sums
the same cells' maxima (a separate 16-bit count per cell) and hands them over in packed uint16 triangles
(`_scan_pixels`, `_adaptive_lower`). The walk is a numba kernel, parallel over first pixels a with
per-thread scratch, that prefetches the next image's row. Its table has one uint32 per cell (b, gb), indexed
by the sparse row entry itself: the count of the label being walked (each group's images come label by label)
and the cell's best label count, each stored on a base that grows through the walk, so a value left by an
earlier label or group reads as zero and the table is cleared only once per first pixel. A cell's maximum
grows by one exactly when the current label's count passes it, so each pixel's sum of cell maxima is kept up
to date step by step: one read-modify-write per step, no second pass over the cells. Each group is then
closed for all second pixels at once, in loops over b that the compiler vectorises.
With CUDA, a torch path (batched bincount) computes the in-sample counts with identical results.

Outputs of `run_bound` in the output folder: summary.json, pairs.npy (784 x 784 int64, symmetric, diagonal =
single-pixel counts), top100_pairs.csv and heatmap.png (28 x 28: each pixel's best pair count).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

SUBSETS = ("all", "train", "test")
LEVELS = 256  # grey levels of a uint8 pixel
MAX_LABELS = 16  # the walk keeps its per-label counts of a group in arrays of this size
# A cell (b, gb) of the walk is one uint32: the current run's label count (on its base) in the low 16 bits, the
# cell's best label count (on its base) in the high 16 (see `_scan_pixels`).
BEST_SHIFT = 16
COUNT_MASK = (1 << 16) - 1  # also the most fitted images one (pixel, non-zero grey) may have
SIDE = 28


@dataclass
class BoundConfig:
    naive_sample_pairs: int = 400  # pairs timed with the naive bincount for the extrapolation (~1 s)
    top_pairs: int = 100  # rows of top100_pairs.csv
    seed: int = 0  # which pairs the naive benchmark samples
    kernel_calls: int = 20  # the search's pixels in this many parallel calls (and progress bar updates)
    min_parallel_steps: int = 10_000_000  # smaller searches run on one thread


@dataclass
class PairCounts:
    """Result of one exhaustive search over all pixel pairs of (N, P) images.

    pairs     (P, P) int64 in-sample correct counts of the best table, symmetric; diagonal = single pixel.
    adaptive  (P,) int64: correct count of the adaptive two-glimpse table with first pixel a (None when
              not asked for).
    heldout   (P, P) int64 or None: images of the scored set the fitted pair table names correctly
              (symmetric; diagonal = single pixel); None when no scored set was given.
    """

    pairs: np.ndarray
    adaptive: np.ndarray | None
    heldout: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------------
# numba kernels


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the CPU to load the cache line of array[index] (LLVM's prefetch: read, keep in all levels)."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]], wraparound=False)
        byte_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        # declare_intrinsic names it for the pointer type: llvm.prefetch.p0 (opaque) or .p0i8 (older LLVM)
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", [byte_pointer.type], ir.FunctionType(ir.VoidType(), [byte_pointer.type, i32, i32, i32]))
        builder.call(function, [byte_pointer, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(array, index), codegen


@njit(parallel=True, cache=True)
def _sparse_layout(images, order, segment_start):
    """Both sparse views of the non-zero pixels of uint8 images (N, P), taken in segments: image i of the
    layout is images[order[i]], and segment s = scored * L + label holds layout images
    segment_start[s]:segment_start[s + 1] (S = 2L segments).

    Row view: image i's non-zero pixels, ascending, are row_ent[row_ptr[i]:row_ptr[i + 1]], each uint32
    pixel << 8 | grey, which is also the index of its cell (pixel, grey) in the walk's cell arrays.
    Column view: col_img (nnz,) int32 image indices bucketed by (pixel, grey, segment); bucket
    k = (pixel * 256 + grey) * S + s holds col_img[col_ptr[k]:col_ptr[k + 1]], and col_pos (nnz,) int32 the
    position of that pixel's entry in the image's row (where its higher pixels start).
    Also work (P,) int64: the cost of each first pixel's walk, counted as 2 per cell step (the entries from
    the pixel's own on) and 1 per count (those before it), over the images with that pixel non-zero.
    The row passes run in parallel over images, the bucketing over segments: a segment's images fill only
    its own buckets, so a counting sort per segment needs no coordination.
    """
    n, p = images.shape
    n_segments = segment_start.shape[0] - 1
    row_len = np.zeros(n, np.int64)
    for i in prange(n):
        row_len[i] = np.count_nonzero(images[order[i]])
    row_ptr = np.zeros(n + 1, np.int64)
    row_ptr[1:] = np.cumsum(row_len)
    row_ent = np.empty(row_ptr[n], np.uint32)
    for i in prange(n):
        q = row_ptr[i]
        for j in range(p):
            v = images[order[i], j]
            if v != 0:
                row_ent[q] = (j << 8) | v
                q += 1
    # prange splits into contiguous blocks per thread: interleave fitted and scored segments to balance them
    half = n_segments // 2
    counts = np.zeros((n_segments, p * LEVELS), np.int64)  # per segment and cell; then its bucket's fill point
    work_by_segment = np.zeros((n_segments, p), np.int64)
    for t in prange(n_segments):
        s = (t % 2) * half + t // 2
        for i in range(segment_start[s], segment_start[s + 1]):
            for q in range(row_ptr[i], row_ptr[i + 1]):
                counts[s, row_ent[q]] += 1
                work_by_segment[s, row_ent[q] >> 8] += 2 * row_ptr[i + 1] - row_ptr[i] - q
    col_ptr = np.empty(p * LEVELS * n_segments + 1, np.int64)
    total = 0
    for e in range(p * LEVELS):
        for s in range(n_segments):
            col_ptr[e * n_segments + s] = total
            total += counts[s, e]
            counts[s, e] = col_ptr[e * n_segments + s]
    col_ptr[-1] = total
    col_img = np.empty(total, np.int32)
    col_pos = np.empty(total, np.int32)
    for t in prange(n_segments):
        s = (t % 2) * half + t // 2
        for i in range(segment_start[s], segment_start[s + 1]):
            for q in range(row_ptr[i], row_ptr[i + 1]):
                k = counts[s, row_ent[q]]
                col_img[k] = i
                col_pos[k] = q
                counts[s, row_ent[q]] = k + 1
    return row_ptr, row_ent, col_ptr, col_img, col_pos, work_by_segment.sum(0)


@njit(cache=True)
def _argmax(values, start, count):
    """Offset of the first maximum of values[start:start + count] (ties to the lowest label)."""
    best = 0
    for c in range(1, count):
        if values[start + c] > values[start + best]:
            best = c
    return best


@njit(cache=True)
def _fallback(row_major, first, g_first, other, g_other):
    """Answer for a cell no fitted image shows: the majority of the pair's lower pixel at its grey level."""
    return row_major[first, g_first] if first < other else row_major[other, g_other]


@njit(cache=True)
def _count_lower(row_ent, start, stop, counts, mark, touched):
    """The pixels b of row entries start..stop (those below the first pixel): count the image in counts[b]
    (the row of its label) and, if `mark`, mark b touched; no cells, since their pairs are walked from b."""
    for entry in row_ent[start:stop]:  # iterating a slice: no negative-index fix-up per step
        b = np.int64(entry) >> 8
        counts[b] += 1
        if mark:
            touched[b] = 1


@njit(cache=True)
def _at_least(value, floor):
    """max(value, floor) by arithmetic: LLVM turns a max of a freshly loaded value into a branch, which the
    cells' random counts mispredict."""
    gap = np.int64(value) - floor
    return floor + (gap & ~(gap >> 63))


@njit(cache=True)
def _clear(values, start):
    """values[start:] = 0, as a loop: a slice assignment inside the `prange` body gave wrong counts when
    tried (the tests caught it)."""
    for e in range(start, values.shape[0]):
        values[e] = 0


@njit(cache=True)
def _step_cells(row_ent, start, stop, label, run_base, run_offset, group_base, cells, cell_summed, cell_label,
                adaptive, scoring, sums, label_counts, touched):
    """One fitted image's steps on the cells of its row entries start..stop (the pixels b >= a); see
    `_scan_pixels`."""
    for entry in row_ent[start:stop]:  # iterating a slice: no negative-index fix-up per step
        e = np.int64(entry)
        word = np.int64(cells[e])
        count = _at_least(word & COUNT_MASK, run_base) + 1
        best = _at_least(word >> BEST_SHIFT, group_base)
        raised = _at_least(count - run_offset, best)
        cells[e] = (raised << BEST_SHIFT) | count
        grew = raised - best
        if adaptive:
            cell_summed[e] += grew
        if scoring and grew:  # ties keep the earlier (lower) label
            cell_label[e] = label
        b = e >> 8
        sums[b] += grew
        label_counts[b] += 1
        if scoring:
            touched[b] = 1


@njit(cache=True)
def _close_fitted(a, group_max, gcount_fit, fit_labels, nz_fit, sums, zero_max, fit_d_row, fit_y_row, fit_ab_row,
                  lower_best):
    """Close group (a, g) for the fitted images, for every second pixel b at once (plain loops over b that
    LLVM vectorises; a pixel no image of the group shows non-zero adds its cell (g, 0) = the whole group).

    zero_max (P,) scratch: the best label count of the cell (g, 0), the group minus the images with b != 0,
    added to the D term fit_d_row (P,); the labels' nz_fit rows (L, P) go into fit_ab_row (L, P) and are
    cleared; the sums of cell maxima of b >= a into fit_y_row (P,) (and cleared); lower_best (a,) or empty
    gets zero_max of the pixels below a (the adaptive hand-over). Returns the best count of a second pixel
    b >= a on the group (at least the group's best label: a pixel that is zero throughout).
    """
    n_pixels = sums.shape[0]
    for b in range(n_pixels):
        zero_max[b] = 0
    for c in fit_labels:
        for b in range(n_pixels):
            zero_max[b] = max(zero_max[b], gcount_fit[c] - nz_fit[c, b])
            fit_ab_row[c, b] += nz_fit[c, b]
            nz_fit[c, b] = 0
    for b in range(n_pixels):
        fit_d_row[b] += zero_max[b]
    best = group_max
    for b in range(a, n_pixels):
        fit_y_row[b] += sums[b]
        best = max(best, sums[b] + zero_max[b])
        sums[b] = 0
    for b in range(lower_best.shape[0]):
        lower_best[b] = zero_max[b]
    return best


@njit(cache=True)
def _close_scored(a, g, row_major, gcount_fit, gcount_score, fit_labels, score_labels, pred_all, n_fit, nz_fit,
                  nz_score, touched, t_cell, held_d_row, score_ab_row):
    """Close group (a, g) for its scored images, pixel by pixel over the pixels b the group showed (fitted
    or scored): the held-out D term held_d_row (P,) gets the answer of cell (g, 0) (the best fitted label of
    the group minus the images with b != 0, else the fallback) against the answer the untouched pixels got;
    the scored nz rows go into score_ab_row (P, L) and are cleared, touched too. nz_fit is only read."""
    for b in range(touched.shape[0]):
        if touched[b] == 0:
            continue
        touched[b] = 0
        zero_max = 0
        t_cell[:] = 0
        for c in fit_labels:
            t_cell[c] = gcount_fit[c] - nz_fit[c, b]
            zero_max = max(zero_max, t_cell[c])
        untouched = pred_all if n_fit > 0 else _fallback(row_major, a, g, b, 0)
        pred = _argmax(t_cell, 0, t_cell.shape[0]) if zero_max > 0 else _fallback(row_major, a, g, b, 0)
        held_d_row[b] += gcount_score[pred] - nz_score[pred, b] - gcount_score[untouched]
        for c in score_labels:
            score_ab_row[b, c] += nz_score[c, b]
            nz_score[c, b] = 0


@njit(parallel=True, cache=True)
def _scan_pixels(pixels, row_ptr, row_ent, col_ptr, col_img, col_pos, n_labels, row_major, group_index,
                 fit_y, fit_d, fit_ab, group_best, adaptive, transposed, transposed_start, zero_best, zero_start,
                 held_y, held_d, score_ab, cell_words, cell_sums, cell_labels, nzl_fit, nzl_score,
                 touched_rows, csum):
    """For each first pixel a in `pixels`, walk the images with a != 0, one grey level g of a at a time.

    Y is symmetric, so the walk of a builds the cells (ga, gb) of the pairs with b >= a only (the row entries
    from a's own on); the lower pixels b < a of each image are only counted (images with b != 0 per label, for
    the D and Z terms). Writes rows a of: fit_y (P, P) (the Y term for b >= a; zero below the diagonal),
    fit_d (P, P) (the D term, all b), fit_ab (P, L, P) (fitted images with a and b non-zero, per label),
    group_best (P, 256) (per non-zero grey g of a, the best single-pixel count of a second pixel b >= a on
    the images with a == g), held_y (b >= a), held_d and score_ab (the same for scored images, answered by
    the fitted tables). Rows of different a are independent, so threads write disjoint memory.

    With `adaptive`, the adaptive bound also gets second pixels b < a: for group k = (a, g) and b < a it is
    (sum over gb != 0 of the cell maxima) + (the best count of cell (g, 0)). The first part is the same cells
    seen from b's walk, so each cell word of b's walk also sums its maxima over b's grey levels; after b's
    walk, transposed[transposed_start[b] + k] holds it for every group k of a pixel above b. The second part
    comes from a's counts: zero_best[zero_start[k] + b] for b < a. Both are packed uint16 triangles written
    in disjoint ranges per first pixel; `_adaptive_lower` adds them.

    A group (a, g) visits its fitted images label by label (one run per label), then its scored images. Each
    non-zero pixel b >= a of an image is one step on its cell (b, gb), indexed by the row entry itself, in the
    per-thread arrays (T, P * 256): cell_words uint32 (low 16 bits the count of the current run's label, high
    16 the cell's best label count in the group), cell_sums uint16 (the adaptive sum above; empty without
    `adaptive`) and cell_labels uint8 (the best label, for scored images; empty without them). Counts are stored
    on top of a base that grows through the walk of a, by each run's length (the count) and each group's
    largest label count (the best), so a value written by an earlier run or group is at most the current base
    and max(stored, base) - base is the live count: no clearing between runs or groups, and no test of who
    wrote the cell. A walk whose bases would pass 16 bits (more than 65,535 fitted images with a != 0) clears
    its cells and starts its bases afresh. When the current label's count passes the cell's best,
    the cell's maximum grew by one, so the pixel's sum of cell maxima grows by one: the sum is exact after the
    last fitted image without a pass over the cells. Scored images read the best label of a cell whose best
    is above the group's base (one this group wrote), else the fallback.
    Other scratch, one row per thread: nzl_fit, nzl_score (T, L, P) images with b != 0 per label;
    touched_rows (T, P) uint8 the pixels b the group showed; csum (T, P) sums of cell maxima.
    """
    n_pixels = fit_y.shape[0]
    for idx in prange(pixels.shape[0]):
        w = numba.get_thread_id()
        cells, cell_summed, cell_label = cell_words[w], cell_sums[w], cell_labels[w]
        nz_fit, nz_score, touched, sums = nzl_fit[w], nzl_score[w], touched_rows[w], csum[w]
        scoring = cell_label.shape[0] > 0
        a = pixels[idx]
        run_base, group_base = 0, 0  # the cells were cleared for this walk
        gcount_fit = np.zeros(MAX_LABELS, np.int64)
        gcount_score = np.zeros(MAX_LABELS, np.int64)
        t_cell = np.zeros(MAX_LABELS, np.int64)  # `_close_scored`'s scratch
        fit_labels_seen = np.zeros(MAX_LABELS, np.int64)
        score_labels_seen = np.zeros(MAX_LABELS, np.int64)
        zero_max = np.zeros(n_pixels, np.int64)
        no_lower = np.zeros(0, np.uint16)
        hd_base = 0  # the held-out D[a, b] of a pixel b no image of the group shows non-zero, summed over groups
        for g in range(1, LEVELS):
            k0 = (a * LEVELS + g) * 2 * n_labels  # the group's buckets: fitted by label, then scored by label
            if col_ptr[k0] == col_ptr[k0 + 2 * n_labels]:
                continue
            for c in range(n_labels):
                gcount_fit[c] = col_ptr[k0 + c + 1] - col_ptr[k0 + c]
                gcount_score[c] = col_ptr[k0 + n_labels + c + 1] - col_ptr[k0 + n_labels + c]
            group_max = gcount_fit.max()
            n_fit = gcount_fit.sum()
            n_score = gcount_score.sum()
            # the labels the group has (small groups have few): only their counts can be non-zero
            n_fit_labels, n_score_labels = 0, 0
            for c in range(n_labels):
                if gcount_fit[c] > 0:
                    fit_labels_seen[n_fit_labels] = c
                    n_fit_labels += 1
                if gcount_score[c] > 0:
                    score_labels_seen[n_score_labels] = c
                    n_score_labels += 1
            pred_all = _argmax(gcount_fit, 0, n_labels)
            group = group_index[a * LEVELS + g]
            if n_score > 0:
                if n_fit > 0:
                    hd_base += gcount_score[pred_all]
                else:  # no fitted image has a == g: the answer is each pair's fallback, per b
                    for b in range(n_pixels):
                        held_d[a, b] += gcount_score[_fallback(row_major, a, g, b, 0)]
            if run_base + n_fit > COUNT_MASK:  # the bases would overflow a cell's 16-bit fields: start afresh
                _clear(cells, a * LEVELS)
                run_base, group_base = 0, 0
            fit_end = col_ptr[k0 + n_labels]
            for label in range(n_labels):
                run_offset = run_base - group_base
                for j in range(col_ptr[k0 + label], col_ptr[k0 + label + 1]):
                    if j + 1 < fit_end:  # the next image's row is a random read: ask for it now
                        following = col_img[j + 1]
                        for q in range(row_ptr[following], row_ptr[following + 1], 16):
                            _prefetch(row_ent, q)
                    i = col_img[j]
                    _count_lower(row_ent, row_ptr[i], col_pos[j], nz_fit[label], scoring, touched)
                    _step_cells(row_ent, col_pos[j], row_ptr[i + 1], label, run_base, run_offset, group_base,
                                cells, cell_summed, cell_label, adaptive, scoring, sums, nz_fit[label],
                                touched)
                run_base += col_ptr[k0 + label + 1] - col_ptr[k0 + label]
            for label in range(n_labels):  # scored images: every fitted image of the group is counted
                for j in range(col_ptr[k0 + n_labels + label], col_ptr[k0 + n_labels + label + 1]):
                    i = col_img[j]
                    _count_lower(row_ent, row_ptr[i], col_pos[j], nz_score[label], True, touched)
                    for q in range(col_pos[j], row_ptr[i + 1]):
                        e = np.int64(row_ent[q])
                        b = e >> 8
                        if (np.int64(cells[e]) >> BEST_SHIFT) > group_base:
                            pred = cell_label[e]
                        else:
                            pred = _fallback(row_major, a, g, b, e & 255)
                        held_y[a, b] += pred == label
                        nz_score[label, b] += 1
                        touched[b] = 1
            group_base += group_max
            if n_score > 0:
                _close_scored(a, g, row_major, gcount_fit, gcount_score, fit_labels_seen[:n_fit_labels],
                              score_labels_seen[:n_score_labels], pred_all, n_fit, nz_fit, nz_score, touched, t_cell,
                              held_d[a], score_ab[a])
            lower_best = zero_best[zero_start[group]:zero_start[group] + a] if adaptive and n_fit > 0 else no_lower
            group_best[a, g] = _close_fitted(a, group_max, gcount_fit, fit_labels_seen[:n_fit_labels], nz_fit, sums,
                                             zero_max, fit_d[a], fit_y[a], fit_ab[a], lower_best)
        for b in range(n_pixels):
            held_d[a, b] += hd_base
        # Hand the summed cell maxima of the higher pixels' groups to their adaptive bound, then clear the
        # cells this walk wrote (those of the pixels from a on).
        if adaptive:
            for e in range((a + 1) * LEVELS, n_pixels * LEVELS):
                if group_index[e] >= 0:
                    transposed[transposed_start[a] + group_index[e]] = cell_summed[e]
            _clear(cell_summed, a * LEVELS)
        _clear(cells, a * LEVELS)


@njit(parallel=True, cache=True)
def _adaptive_lower(group_pixel, group_grey, transposed, transposed_start, zero_best, zero_start, group_best):
    """Raise group_best[a, g] to the best second pixel b < a of group k = (a, g): the packed
    transposed[transposed_start[b] + k] + zero_best[zero_start[k] + b] (see `_scan_pixels`). Blocks of 64
    consecutive groups, so the reads of both triangles stay in cache."""
    n_groups = group_pixel.shape[0]
    for block in prange((n_groups + 63) // 64):
        start, end = block * 64, min(n_groups, block * 64 + 64)
        best = np.empty(end - start, np.int64)
        for k in range(start, end):
            best[k - start] = group_best[group_pixel[k], group_grey[k]]
        first = start  # groups come in pixel order: those of pixels above b are the block's tail from here
        for b in range(group_pixel[end - 1]):
            while group_pixel[first] <= b:
                first += 1
            row = transposed_start[b]
            for k in range(first, end):
                lower = np.int64(transposed[row + k]) + np.int64(zero_best[zero_start[k] + b])
                best[k - start] = max(best[k - start], lower)
        for k in range(start, end):
            group_best[group_pixel[k], group_grey[k]] = best[k - start]


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
               score_labels: np.ndarray | None = None, progress: str | None = None,
               cfg: BoundConfig = BoundConfig(), adaptive: bool = True) -> PairCounts:
    """Exact counts for every pixel pair on the CPU (numba, all threads).

    fit_images (N, ...) uint8 and fit_labels (N,) int: the images the tables are fitted on (in-sample counts
    `pairs`, `adaptive`). score_images (M, ...) / score_labels (M,), optional: held-out images scored
    against those tables (`heldout`, fallback as in the module docstring). progress: if given, the
    description of a rich progress bar on stderr. adaptive=False skips the adaptive bound (its hand-over
    triangles take 4 bytes per group and pixel below it, ~230 MB for all of MNIST); `adaptive` is then None.
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
    images = np.concatenate([fit_images, score_images]) if scored else fit_images
    labels = np.concatenate([fit_labels, score_labels])
    n_pixels = images.shape[1]
    n_labels = int(labels.max()) + 1 if len(labels) else 1
    if n_labels > MAX_LABELS:
        raise ValueError(f"labels must be below {MAX_LABELS}, got {n_labels - 1}")
    if n_pixels >= 1 << 24:
        raise ValueError(f"at most {(1 << 24) - 1} pixels per image")  # a row entry is pixel << 8 | grey, uint32
    # the layout takes the images by segment (scored, label), so each bucket lists its images in that order
    segment = np.repeat([0, n_labels], [len(fit_labels), len(score_labels)]) + labels
    segment_start = np.concatenate([[0], np.cumsum(np.bincount(segment, minlength=2 * n_labels))])
    row_ptr, row_ent, col_ptr, col_img, col_pos, work = _sparse_layout(
        images, np.argsort(segment, kind="stable"), segment_start)
    fit_per_label = np.bincount(fit_labels, minlength=n_labels)  # (L,)
    # (P, 256, L) fitted images per pixel, grey and label: the fitted buckets, and grey 0 for the rest
    fit_counts = np.diff(col_ptr).reshape(n_pixels, LEVELS, 2, n_labels)[:, :, 0, :].copy()
    fit_counts[:, 0, :] = fit_per_label - fit_counts.sum(1)
    fitted_per_grey = fit_counts.sum(2)  # (P, 256): fitted images per (pixel, grey)
    group_sizes = np.where(np.arange(LEVELS) > 0, fitted_per_grey, 0)  # grey 0 is not walked
    if group_sizes.max(initial=0) > COUNT_MASK:
        raise ValueError(f"at most {COUNT_MASK} fitted images may show the same non-zero grey level at one pixel "
                         f"(a cell keeps its counts in 16 bits); got {group_sizes.max()}")
    # the held-out fallback: majority label of the fitted images at (pixel, grey), else overall
    row_major = np.where(fitted_per_grey > 0, fit_counts.argmax(2), fit_per_label.argmax())
    # the walked groups (pixel, non-zero grey with fitted images), numbered in row-entry order
    group_cells = np.flatnonzero(group_sizes.ravel())
    group_index = np.full(n_pixels * LEVELS, -1, np.int64)
    group_index[group_cells] = np.arange(len(group_cells))
    group_pixel, group_grey = np.divmod(group_cells, LEVELS)
    # the adaptive bound's hand-over triangles (`_scan_pixels`): pixel b's row holds the groups of the pixels
    # above b, group k's row the pixels below its own; counts <= COUNT_MASK
    groups_above = len(group_cells) - np.searchsorted(group_pixel, np.arange(1, n_pixels + 1))  # (P,)
    transposed_start = np.concatenate([[0], np.cumsum(groups_above)[:-1]]) - (len(group_cells) - groups_above)
    zero_start = np.concatenate([[0], np.cumsum(group_pixel)[:-1]]).astype(np.int64)
    transposed = np.zeros(groups_above.sum() if adaptive else 0, np.uint16)
    zero_best = np.zeros(group_pixel.sum() if adaptive else 0, np.uint16)

    fit_y, fit_d, held_y, held_d = (np.zeros((n_pixels, n_pixels), np.int64) for _ in range(4))
    fit_ab = np.zeros((n_pixels, n_labels, n_pixels), np.int32)
    score_ab = np.zeros((n_pixels, n_pixels if scored else 0, n_labels), np.int32)  # only scored groups fill it
    group_best = np.zeros((n_pixels, LEVELS), np.int64)
    threads = numba.get_num_threads()
    cell_words = np.zeros((threads, n_pixels * LEVELS), np.uint32)
    cell_sums = np.zeros((threads, n_pixels * LEVELS if adaptive else 0), np.uint16)
    cell_labels = np.zeros((threads, n_pixels * LEVELS if scored else 0), np.uint8)
    nzl_fit, nzl_score = (np.zeros((threads, n_labels, n_pixels), np.int32) for _ in range(2))
    touched = np.zeros((threads, n_pixels), np.uint8)
    csum = np.zeros((threads, n_pixels), np.int64)

    # Heaviest first pixels first (`work` from the layout), one per scheduling chunk, so the threads finish
    # together.
    order = np.argsort(-work, kind="stable")
    # Several kernel calls (one per progress update), each dealing its pixels to the threads round-robin:
    # numba splits a prange into one contiguous block per thread, so one call over the sorted order would
    # give one thread all the heavy pixels (measured: 2 threads, one call, as slow as one thread).
    steps = [np.concatenate([s[t::threads] for t in range(threads)])
             for s in np.array_split(order, cfg.kernel_calls) if len(s)]
    old_threads = numba.get_num_threads()
    if work.sum() < cfg.min_parallel_steps:
        numba.set_num_threads(1)  # waking the other threads costs more than a small search
    try:
        with _progress_bar(progress, work.sum()) as advance:
            for step in steps:
                _scan_pixels(step, row_ptr, row_ent, col_ptr, col_img, col_pos, n_labels, row_major, group_index,
                             fit_y, fit_d, fit_ab, group_best, adaptive, transposed, transposed_start,
                             zero_best, zero_start, held_y, held_d, score_ab, cell_words, cell_sums,
                             cell_labels, nzl_fit, nzl_score, touched, csum)
                advance(work[step].sum())
            if adaptive:
                _adaptive_lower(group_pixel, group_grey, transposed, transposed_start, zero_best, zero_start,
                                group_best)
    finally:
        numba.set_num_threads(old_threads)
    fit_y += np.triu(fit_y, 1).T  # the walk filled b >= a; Y is symmetric
    held_y += np.triu(held_y, 1).T

    # (P, L): b = a is non-zero exactly when a is
    nonzero_fit = np.diagonal(fit_ab, axis1=0, axis2=2).T.astype(np.int64)
    zero_zero = (fit_per_label - nonzero_fit[:, None, :] - nonzero_fit[None, :, :]
                 + fit_ab.transpose(0, 2, 1))  # (P, P, L)
    z = zero_zero.max(2)
    pairs = fit_y + fit_d + fit_d.T + z
    # With a == 0 the second pixel b sees the cells (0, gb): D[b, a] for gb != 0 and Z[a, b] for gb = 0.
    adaptive_counts = group_best.sum(1) + (fit_d.T + z).max(1) if adaptive else None
    heldout = None
    if scored:
        score_per_label = np.bincount(score_labels, minlength=n_labels)
        nonzero_score = np.diagonal(score_ab).T.astype(np.int64)
        score_zz = score_per_label - nonzero_score[:, None, :] - nonzero_score[None, :, :] + score_ab
        lower = np.minimum.outer(np.arange(n_pixels), np.arange(n_pixels))
        pred = np.where(zero_zero.sum(2) > 0, zero_zero.argmax(2), row_major[lower, 0])
        heldout = held_y + held_d + held_d.T + np.take_along_axis(score_zz, pred[..., None], 2)[..., 0]
    return PairCounts(pairs=pairs, adaptive=adaptive_counts, heldout=heldout)


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


@contextmanager
def _progress_bar(description: str | None, total: float):
    """Yields advance(amount); shows a transient rich bar on stderr when a description is given."""
    if description is None:
        yield lambda amount: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(description), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=float(total))
        yield lambda amount: bar.advance(task, float(amount))


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
    """Time the naive per-pair bincount on a seeded sample of pairs and extrapolate to all pairs, in wall
    and in CPU seconds. Also checks that every sampled naive count equals the search's `pairs` entry.
    """
    images, labels = _check_images(images, labels)
    by_pixel = np.ascontiguousarray(images.T)
    n_labels = int(labels.max()) + 1
    n_pixels = by_pixel.shape[0]
    rows, cols = np.triu_indices(n_pixels, 1)
    sample = np.random.default_rng(cfg.seed).choice(len(rows), size=min(cfg.naive_sample_pairs, len(rows)),
                                                    replace=False)
    start, cpu_start = time.perf_counter(), time.process_time()
    naive = [naive_pair_count(by_pixel, labels, rows[k], cols[k], n_labels) for k in sample]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if not np.array_equal(naive, pairs[rows[sample], cols[sample]]):
        raise RuntimeError("the fast search disagrees with the naive count on a sampled pair")
    return {"naive_pairs_timed": int(len(sample)), "naive_seconds_per_pair": seconds / len(sample),
            "naive_extrapolated_seconds": seconds / len(sample) * len(rows),
            "naive_extrapolated_cpu_seconds": cpu_seconds / len(sample) * len(rows),
            "naive_agrees_on_sample": True}


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

    start, cpu_start = time.perf_counter(), time.process_time()
    if engine == "torch":
        counts = scan_pairs_torch(images, labels, device)
    else:
        counts = scan_pairs(images, labels, progress="searching all pairs" if progress else None, cfg=cfg)
    search_seconds, search_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    start = time.perf_counter()
    held = scan_pairs(mnist.train_images, mnist.train_labels, mnist.test_images, mnist.test_labels,
                      progress="held-out pass (fit train, score test)" if progress else None, cfg=cfg,
                      adaptive=False)
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
        "cpu_seconds": search_cpu_seconds,
        "engine": f"numba, {numba.get_num_threads()} threads" if engine == "numba" else f"torch on {device}",
        "jit_seconds": jit_seconds,
        "timing_note": "seconds (wall) and cpu_seconds (all threads): pairs + singles + adaptive from the raw "
                       "images; numba compile or cache load excluded (jit_seconds, done before the clock "
                       "starts); the held-out pass is timed separately",
        "machine": machine_description(device), "load_average_1min": load_before,
    }
    if benchmark:
        naive = time_naive(images, labels, counts.pairs, cfg)
        summary["benchmark"] = {
            **naive, "search_seconds": search_seconds, "search_cpu_seconds": search_cpu_seconds,
            "speedup": naive["naive_extrapolated_seconds"] / search_seconds,
            "speedup_cpu": naive["naive_extrapolated_cpu_seconds"] / search_cpu_seconds,
            "load_average_1min_after": os.getloadavg()[0],
            "note": "speedup: wall-clock (the naive loop on one thread, the search on all); speedup_cpu: "
                    "CPU seconds, which does not credit the search's threads and is less sensitive to load"}

    # Write everything into a staging folder first, then move file by file into `out` (each move atomic,
    # summary.json last): an interrupted run never leaves a half-written file, and other files in a
    # user-chosen --out folder are left alone.
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    np.save(staging / "pairs.npy", counts.pairs)
    rows, cols = np.triu_indices(len(counts.pairs), 1)
    values = counts.pairs[rows, cols]
    top = np.lexsort((cols, rows, -values))[:cfg.top_pairs]  # by count, ties to the lowest (a, b)
    pd.DataFrame({"rank": np.arange(1, len(top) + 1), "a": rows[top], "b": cols[top],
                  "a_row": rows[top] // SIDE, "a_col": rows[top] % SIDE, "b_row": cols[top] // SIDE,
                  "b_col": cols[top] % SIDE, "correct": values[top],
                  "accuracy": values[top] / total}).to_csv(staging / "top100_pairs.csv", index=False)
    _heatmap(counts.pairs, (a, b), total, subset, staging / "heatmap.png")
    (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("pairs.npy", "top100_pairs.csv", "heatmap.png", "summary.json"):
        os.replace(staging / name, out / name)
    staging.rmdir()
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

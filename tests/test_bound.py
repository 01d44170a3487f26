"""The two-pixel bound: every count of the fast search against a plain dictionary count, the known figure on
real MNIST, and the `bench bound` command."""

import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from benchmark.bound import best_pair, naive_pair_count, scan_pairs, scan_pairs_torch
from benchmark.cli import app
from conftest import assert_one_line_error


def majority(counter: Counter) -> int:
    """Most common label, ties to the lowest."""
    top = max(counter.values())
    return min(label for label, n in counter.items() if n == top)


def brute_force(fit_x, fit_y, score_x, score_y):
    """Dictionary counts straight from the definitions: (pairs, adaptive, heldout) with heldout's fallback:
    unseen cell -> majority of fitted images with the lower pixel at its grey level, else overall majority."""
    n_pixels = fit_x.shape[1]
    pairs = np.zeros((n_pixels, n_pixels), np.int64)
    heldout = np.zeros((n_pixels, n_pixels), np.int64)
    adaptive = np.zeros(n_pixels, np.int64)
    overall = majority(Counter(fit_y.tolist()))
    by_grey = defaultdict(Counter)  # (pixel, grey) -> label counts
    for x, y in zip(fit_x, fit_y):
        for p in range(n_pixels):
            by_grey[p, x[p]][y] += 1
    for a in range(n_pixels):
        per_grey_best = defaultdict(int)  # grey of a -> best single-pixel count for the second pixel
        for b in range(n_pixels):
            cells = defaultdict(Counter)
            for x, y in zip(fit_x, fit_y):
                cells[x[a], x[b]][y] += 1
            pairs[a, b] = sum(max(c.values()) for c in cells.values())
            per_grey = defaultdict(int)
            for (ga, _), c in cells.items():
                per_grey[ga] += max(c.values())
            for ga, n in per_grey.items():
                per_grey_best[ga] = max(per_grey_best[ga], n)
            low, g_low = (a, 0) if a <= b else (b, 1)
            for x, y in zip(score_x, score_y):
                cell = (x[a], x[b])
                if cell in cells:
                    answer = majority(cells[cell])
                elif (low, cell[g_low]) in by_grey:
                    answer = majority(by_grey[low, cell[g_low]])
                else:
                    answer = overall
                heldout[a, b] += answer == y
        adaptive[a] = sum(per_grey_best.values())
    return pairs, adaptive, heldout


def dataset(draw, n_pixels, n_labels, min_size):
    """Images (n, n_pixels) uint8 drawn mostly zero, from a few grey levels (so cells and ties repeat)."""
    n = draw(st.integers(min_size, 40))
    greys = draw(st.lists(st.integers(1, 255), min_size=1, max_size=4))
    zero_share = draw(st.floats(0.0, 0.95))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.choice(np.array(greys, np.uint8), size=(n, n_pixels))
    images = np.where(rng.random((n, n_pixels)) < zero_share, 0, values).astype(np.uint8)
    return images, rng.integers(0, n_labels, size=n)


@st.composite
def problems(draw, min_pixels=2, max_pixels=7):
    n_pixels = draw(st.integers(min_pixels, max_pixels))
    n_labels = draw(st.integers(1, 4))
    fit = dataset(draw, n_pixels, n_labels, 1)
    score = dataset(draw, n_pixels, n_labels, 0)
    return fit, score


def assert_counts_are_brute_force(fit_x, fit_y, score_x, score_y):
    """scan_pairs's three count tables equal the dictionary counts of `brute_force`; returns those pair counts."""
    pairs, adaptive, heldout = brute_force(fit_x, fit_y, score_x, score_y)
    counts = scan_pairs(fit_x, fit_y, score_x, score_y)
    np.testing.assert_array_equal(counts.pairs, pairs)
    np.testing.assert_array_equal(counts.adaptive, adaptive)
    np.testing.assert_array_equal(counts.heldout, heldout)
    return pairs


def check_against_brute_force(problem):
    (fit_x, fit_y), (score_x, score_y) = problem
    pairs = assert_counts_are_brute_force(fit_x, fit_y, score_x, score_y)
    # scoring the fitted images themselves gives back the in-sample counts (no fallback is ever needed);
    # without the adaptive bound the other counts are the same
    without_adaptive = scan_pairs(fit_x, fit_y, fit_x, fit_y, adaptive=False)
    assert without_adaptive.adaptive is None
    np.testing.assert_array_equal(without_adaptive.heldout, pairs)
    np.testing.assert_array_equal(without_adaptive.pairs, pairs)
    by_pixel = np.ascontiguousarray(fit_x.T)
    a, b = 0, fit_x.shape[1] - 1
    assert naive_pair_count(by_pixel, fit_y, a, b, int(fit_y.max()) + 1) == pairs[a, b]


@settings(max_examples=150, deadline=None)
@given(problems())
def test_every_count_matches_brute_force(problem):
    check_against_brute_force(problem)


@settings(max_examples=25, deadline=None)
@given(problems(min_pixels=60, max_pixels=90))
def test_every_count_matches_brute_force_across_bitmask_words(problem):
    """Wider images than one 64-bit word of the seen-pixel mask, so pixels b >= 64 are closed too."""
    check_against_brute_force(problem)


@settings(max_examples=20, deadline=None)
@given(problems())
def test_torch_path_gives_identical_counts(problem):
    (fit_x, fit_y), _ = problem
    fast, torch_counts = scan_pairs(fit_x, fit_y), scan_pairs_torch(fit_x, fit_y, device="cpu", block=3)
    np.testing.assert_array_equal(torch_counts.pairs, fast.pairs)
    np.testing.assert_array_equal(torch_counts.adaptive, fast.adaptive)


def test_best_pair_breaks_ties_towards_lowest_pair():
    m = np.array([[9, 5, 7, 7], [5, 9, 1, 7], [7, 1, 9, 2], [7, 7, 2, 9]])
    assert best_pair(m) == (0, 2, 7)


@pytest.mark.slow
def test_known_figure_on_all_70000_images(mnist):
    images = np.concatenate([mnist.train_images, mnist.test_images])
    labels = np.concatenate([mnist.train_labels, mnist.test_labels])
    counts = scan_pairs(images, labels)
    assert best_pair(counts.pairs) == (406, 409, 34711)
    np.testing.assert_array_equal(counts.pairs, counts.pairs.T)
    # spot-check entries the search never singled out against the naive bincount
    by_pixel = np.ascontiguousarray(images.reshape(len(images), -1).T)
    for a, b in [(406, 409), (0, 783), (100, 500), (350, 351), (406, 406)]:
        assert counts.pairs[a, b] == naive_pair_count(by_pixel, labels, a, b, 10)
    assert (counts.adaptive >= counts.pairs.max(1)).all()  # fixing the second pixel is one adaptive choice


def heldout_pair_reference(fit_x, fit_y, score_x, score_y, a, b):
    """Test images one pair's table (fitted on fit_x) names correctly, straight from the definition (a < b)."""
    fit_x, score_x = fit_x.reshape(len(fit_x), -1).astype(np.int64), score_x.reshape(len(score_x), -1)
    cells = np.zeros((256 * 256, 10), np.int64)
    np.add.at(cells, (fit_x[:, a] * 256 + fit_x[:, b], fit_y), 1)
    rows = np.zeros((256, 10), np.int64)
    np.add.at(rows, (fit_x[:, a], fit_y), 1)
    overall = np.bincount(fit_y, minlength=10).argmax()
    ga, gb = score_x[:, a].astype(np.int64), score_x[:, b]
    answer = np.where(cells[ga * 256 + gb].sum(1) > 0, cells[ga * 256 + gb].argmax(1),
                      np.where(rows[ga].sum(1) > 0, rows[ga].argmax(1), overall))
    return int((answer == score_y).sum())


@pytest.mark.slow
def test_cli_writes_summary_matching_the_search(mnist, mnist_dir, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")  # a user's file in --out must survive
    result = CliRunner().invoke(app, ["bound", "--subset", "test", "--out", str(tmp_path / "b"), "--device", "cpu",
                                      "--benchmark", "--data-dir", str(mnist_dir), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert "best pair" in result.output and "naive bincount" in result.output
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    timing = summary["benchmark"]  # the naive counts on the sampled pairs agreed with the search (else an error)
    assert timing["naive_agrees_on_sample"] and timing["naive_pairs_timed"] == 400
    assert timing["speedup"] == pytest.approx(timing["naive_extrapolated_seconds"] / summary["seconds"])
    counts = scan_pairs(mnist.test_images, mnist.test_labels)
    a, b, n = best_pair(counts.pairs)
    assert summary["subset"] == "test" and summary["total"] == 10000
    assert summary["best_pair"]["pixels"] == [a, b] and summary["best_pair"]["correct"] == n
    single = int(np.argmax(np.diagonal(counts.pairs)))
    assert summary["best_single"]["pixel"] == single
    assert summary["best_single"]["correct"] == counts.pairs[single, single]
    assert summary["adaptive"]["first_pixel"] == int(np.argmax(counts.adaptive))
    assert summary["adaptive"]["correct"] == counts.adaptive.max()
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "pairs.npy"), counts.pairs)
    top = (tmp_path / "b" / "top100_pairs.csv").read_text().splitlines()
    assert len(top) == 101 and top[1].startswith(f"1,{a},{b},")
    assert (tmp_path / "b" / "heatmap.png").stat().st_size > 0
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging folder left behind
    # held-out figures: each reported pair's numbers against the plain definition
    train_x, train_y = mnist.train_images, mnist.train_labels
    by_pixel = np.ascontiguousarray(train_x.reshape(len(train_x), -1).T)
    for key in ("train_best_pair", "oracle_best_pair"):
        ta, tb = summary["heldout"][key]["pixels"]
        assert summary["heldout"][key]["test_correct"] == heldout_pair_reference(
            train_x, train_y, mnist.test_images, mnist.test_labels, ta, tb)
    honest, oracle = summary["heldout"]["train_best_pair"], summary["heldout"]["oracle_best_pair"]
    assert honest["train_correct"] == naive_pair_count(by_pixel, train_y, *honest["pixels"], 10)
    assert oracle["test_correct"] >= honest["test_correct"]


@pytest.mark.parametrize("args, message", [(["--subset", "foo"], "--subset foo"),
                                           (["--device", "tpu"], "--device tpu"),
                                           (["--out", "a-file"], "a-file is a file; give a folder")])
def test_bad_options_give_one_line_error(tmp_path, args, message):
    (tmp_path / "a-file").write_text("not a folder")
    args = [str(tmp_path / a) if a == "a-file" else a for a in args]
    assert_one_line_error(CliRunner().invoke(app, ["bound", *args, "--workspace", str(tmp_path)]), message)


def test_inputs_beyond_the_limits_are_refused():
    """Label 16 (the walk sizes its per-label scratch for 16 labels) and a pixel showing one grey level in
    65,536 fitted images (a cell keeps its counts in 16 bits) must be refused, not silently wrapped."""
    images = np.array([[1, 2], [3, 4]], np.uint8)
    with pytest.raises(ValueError, match="labels must be below 16"):
        scan_pairs(images, np.array([0, 16]))
    assert scan_pairs(images, np.array([0, 15])).pairs[0, 1] == 2
    every_third = (np.arange(65_536) % 3 == 0).astype(np.int64)  # label 1 for 21,846 images, 0 for the rest
    with pytest.raises(ValueError, match="at most 65535 fitted images may show the same non-zero grey level"):
        scan_pairs(np.ones((65_536, 2), np.uint8), every_third)
    fullest = scan_pairs(np.ones((65_535, 2), np.uint8), every_third[:65_535])  # one cell holds every image
    assert fullest.pairs[0, 1] == fullest.adaptive[1] == 65_535 - 21_845
    widest = scan_pairs(np.ones((3, 2048), np.uint8), np.array([0, 1, 1]))  # no limit on the pixel count
    assert widest.pairs[0, 2047] == 2 and widest.adaptive[2047] == 2


def test_a_walk_past_16_bits_of_counts_restarts_its_cells():
    """A first pixel non-zero in more than 65,535 fitted images makes its cells' bases pass 16 bits, so the
    walk clears its cells and starts afresh mid-way: every count must still equal the brute force."""
    rng = np.random.default_rng(3)
    images = np.where(rng.random((75_000, 3)) < 0.1, 0, rng.integers(1, 9, size=(75_000, 3))).astype(np.uint8)
    labels = rng.integers(0, 3, size=75_000)
    assert (images != 0).sum(0).min() > 65_535
    assert_counts_are_brute_force(images, labels, images[:300], labels[:300])

"""The decision-tree reference for the glimpse model (`bench tree`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.data import Mnist
from benchmark.runs import load_run
from benchmark.tree_reference import tree_reference
from conftest import assert_one_line_error


def three_pixel_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose label (0-7) is spelled in binary by three pixels: 4 * ink(3, 3) + 2 * ink(10, 20) +
    ink(24, 5). Only a reader of all three can name every image; one pixel leaves 4 labels equally likely."""
    images = rng.integers(0, 120, size=(n, 28, 28), dtype=np.uint8)  # faint noise, never ink
    labels = rng.integers(0, 8, size=n)
    for bit, (row, col) in zip((4, 2, 1), ((3, 3), (10, 20), (24, 5))):
        images[:, row, col] = np.where(labels & bit, 255, 0)
    return images, labels


def test_the_tree_cut_at_each_depth_reads_one_more_bit(tmp_path):
    rng = np.random.default_rng(0)
    train_images, train_labels = three_pixel_digits(7000, rng)
    test_images, test_labels = three_pixel_digits(1000, rng)
    mnist = Mnist(train_images, train_labels, test_images, test_labels, Path("."), {})
    meta = tree_reference(mnist, tmp_path, max_depth=5)
    steps = meta["step_accuracy"]
    assert len(steps) == len(meta["val_step_accuracy"]) == 5
    assert 0.2 < steps[0] < 0.3 and 0.45 < steps[1] < 0.55  # one bit: 2 of 8 labels, two bits: 4 of 8
    assert steps[2:] == [1.0, 1.0, 1.0]  # three pixels name every image; the paths end at depth 3
    assert meta["config"]["chosen_depth"] == 3 and meta["test_errors"] == meta["val_errors"] == 0
    run = load_run(tmp_path, "tree-d5-s0")
    assert run.test_probs.shape == (1000, 10) and np.allclose(run.test_probs.sum(1), 1)
    assert (run.test_predictions == test_labels).all()


def test_bench_tree_refuses_a_bad_depth_in_one_line_and_reads_one_pixel(tmp_path, mnist_dir):
    result = CliRunner().invoke(app, ["tree", "--depth", "0", "--data-dir", str(mnist_dir),
                                      "--workspace", str(tmp_path)])
    assert_one_line_error(result, "--depth 0: expected 1 to 100")
    assert not (tmp_path / "runs").exists()
    result = CliRunner().invoke(app, ["tree", "--depth", "1", "--data-dir", str(mnist_dir),
                                      "--workspace", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "depth   1: test accuracy" in result.output and "depth   2" not in result.output
    assert len(load_run(tmp_path, "tree-d1-s0").meta["step_accuracy"]) == 1

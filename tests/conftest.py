"""Shared fixtures: tiny IDX writers, the real MNIST folder (from BENCH_DATA_DIR) and fabricated runs."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.data import MNIST_FILES, load_mnist
from benchmark.runs import save_run


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode uint8 images (N, 28, 28) or labels (N,) in the IDX format."""
    if array.ndim == 3:
        header = struct.pack(">IIII", 2051, array.shape[0], array.shape[1], array.shape[2])
    else:
        header = struct.pack(">II", 2049, array.shape[0])
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Test tensors are small: threads gain nothing there, and on a loaded 2-core machine spin-waiting
    threads cost up to 30x. Subprocesses (the real `bench`) keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """BENCH_DATA_DIR, else the copy `make demo` downloaded into ./workspace; the real-data tests skip without."""
    cache = Path("workspace") / "data" / "mnist"
    for folder in (os.environ.get("BENCH_DATA_DIR"), cache, cache / "MNIST" / "raw"):
        if folder and Path(folder).is_dir() and any(Path(folder).glob("t10k-labels-idx1-ubyte*")):
            return Path(folder)
    pytest.skip("no MNIST files: set BENCH_DATA_DIR to the folder with the four IDX files (or run `make demo`)")


@pytest.fixture(scope="session")
def mnist(mnist_dir, tmp_path_factory):
    return load_mnist(mnist_dir, tmp_path_factory.mktemp("ws"))


def fabricated_probs(labels: np.ndarray, wrong: np.ndarray, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Probabilities (N, 10) that put 0.9 on the true label, except at indices `wrong` (then on label+1).

    `seed` may be a Generator: a fixture that draws everything from one stream passes its own.
    """
    rng = np.random.default_rng(seed)  # a Generator is used as it is, not copied
    probs = rng.dirichlet(np.ones(10), size=len(labels)).astype(np.float32) * 0.1
    predicted = labels.copy()
    predicted[wrong] = (labels[wrong] + 1) % 10
    probs[np.arange(len(labels)), predicted] += 0.9
    return probs / probs.sum(1, keepdims=True)


@pytest.fixture
def fabricate_run():
    """Make a run folder with chosen wrong test indices: fabricate_run(ws, name, labels, wrong)."""

    def make(workspace: Path, name: str, labels: np.ndarray, wrong, seed: int = 0):
        probs = fabricated_probs(labels, np.asarray(wrong, dtype=int), seed)
        meta = {"name": name, "model": "mlp", "seed": seed, "config": {}, "test_errors": len(wrong)}
        return save_run(workspace, name, meta, probs)

    return make


def assert_one_line_error(result, message: str) -> None:
    """A user error as the README promises it: exactly one non-empty line, `error: ...` containing `message`,
    no traceback; and exit code 2 when `result` is a CliRunner result or a finished subprocess rather than
    the text alone (then its output, or for a subprocess its stderr, is the text checked)."""
    if isinstance(result, str):
        text = result
    elif hasattr(result, "exit_code"):  # typer's CliRunner: output holds stdout and stderr as printed
        assert result.exit_code == 2, result.output
        text = result.output
    else:  # subprocess.CompletedProcess
        assert result.returncode == 2, result.stderr
        text = result.stderr
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert message in lines[0], text
    assert "Traceback" not in text, text


def fit_steps(model: torch.nn.Module, loss_fn, batches, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[float]:
    """One optimiser step on loss_fn(x, y) per (x, y) of `batches`, with the model in training mode; the
    scheduler, if given, steps after each. Returns every step's loss, as measured before that step.

    The caller builds the optimizer, so each test keeps the optimizer and learning rate it is about."""
    losses = []
    for x, y in batches:
        model.train()
        loss = loss_fn(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


__all__ = ["MNIST_FILES", "idx_bytes", "write_idx", "fabricated_probs", "assert_one_line_error", "fit_steps"]

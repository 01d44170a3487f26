"""MNIST: find the four IDX files, verify them byte for byte, and expose them as arrays.

Where the files are looked for, in order:
  1. the `--data-dir` option (must exist and hold the files: a mistyped folder is an error, not a fall-back),
  2. the `BENCH_DATA_DIR` environment variable (the same),
  3. the workspace cache `<workspace>/data/mnist` (and torchvision's `MNIST/raw` below it),
and if none of them holds any MNIST file, torchvision downloads the set into the workspace cache.
The first place holding at least one of the files is the one used; every file must then be there
(gzipped `.gz` or raw) and pass the checks, so a half-copied folder is reported, not silently skipped.

Checks on every decoded file: the IDX header (magic number, item count, 28 x 28), the exact length the
header implies (catches truncation), then the canonical SHA-256 of the decompressed bytes.

Outputs: `Mnist` with uint8 images (N, 28, 28) and int64 labels (N,). `validation_split` carves a fixed,
seeded 5,000-image validation set from the 60,000 training images: every selection decision
(epochs, thresholds, hyperparameters) is made on it; the test set is only ever evaluated.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark.errors import BenchError

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
SIDE = 28
VALIDATION_SIZE = 5000
SPLIT_SEED = 20260101  # fixed once for the project: every run sees the same validation images


@dataclass(frozen=True)
class IdxSpec:
    """What one IDX file must be: its stem, magic number, item count and SHA-256 of the raw bytes."""

    stem: str
    magic: int
    count: int
    sha256: str | None  # None: header checks only (tests build tiny files with no canonical digest)


MNIST_FILES = {
    "train_images": IdxSpec("train-images-idx3-ubyte", IMAGE_MAGIC, 60000,
                            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train_labels": IdxSpec("train-labels-idx1-ubyte", LABEL_MAGIC, 60000,
                            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "test_images": IdxSpec("t10k-images-idx3-ubyte", IMAGE_MAGIC, 10000,
                           "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "test_labels": IdxSpec("t10k-labels-idx1-ubyte", LABEL_MAGIC, 10000,
                           "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}


@dataclass
class Mnist:
    """The verified data set. Images uint8 (N, 28, 28); labels int64 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: Path
    digests: dict[str, str]

    def validation_split(self, size: int = VALIDATION_SIZE, seed: int = SPLIT_SEED):
        """Indices into the 60,000 training images: (fit_indices (60000-size,), val_indices (size,)), sorted."""
        order = np.random.default_rng(seed).permutation(len(self.train_labels))
        return np.sort(order[size:]), np.sort(order[:size])


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """The file for `stem` in `folder`, raw or gzipped (raw preferred), or None."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, spec: IdxSpec) -> tuple[np.ndarray, str]:
    """Decode and verify one IDX file.

    Returns (array, sha256 hex of the decoded bytes): uint8 (count, 28, 28) for images, int64 (count,) for
    labels. Raises BenchError naming the file and the problem (unreadable gzip, wrong magic, wrong count,
    wrong shape, truncated or too long, digest mismatch).
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a damaged stream, zlib.error
        raise BenchError(f"{path}: cannot be read or decompressed ({exc}); replace the file") from None
    is_images = spec.magic == IMAGE_MAGIC
    header_len = 16 if is_images else 8
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic is not None and magic != spec.magic:
        raise BenchError(f"{path}: wrong magic number {magic} (expected {spec.magic}); "
                         f"not an MNIST {'image' if is_images else 'label'} file")
    if len(raw) < header_len:
        raise BenchError(f"{path}: truncated, only {len(raw)} bytes (no complete IDX header); replace the file")
    header = np.frombuffer(raw[:header_len], dtype=">u4")
    if int(header[1]) != spec.count:
        raise BenchError(f"{path}: header says {int(header[1])} items, expected {spec.count}; replace the file")
    if is_images and (int(header[2]), int(header[3])) != (SIDE, SIDE):
        raise BenchError(f"{path}: images are {int(header[2])}x{int(header[3])}, expected 28x28")
    expected_len = header_len + spec.count * (SIDE * SIDE if is_images else 1)
    if len(raw) != expected_len:
        problem = "truncated" if len(raw) < expected_len else "too long"
        raise BenchError(f"{path}: {problem}, {len(raw)} bytes instead of {expected_len}; replace the file")
    digest = hashlib.sha256(raw).hexdigest()
    if spec.sha256 is not None and digest != spec.sha256:
        raise BenchError(f"{path}: altered, SHA-256 {digest[:16]}... does not match the canonical "
                         f"{spec.sha256[:16]}...; replace the file")
    body = np.frombuffer(raw, dtype=np.uint8, offset=header_len)
    array = body.reshape(spec.count, SIDE, SIDE).copy() if is_images else body.astype(np.int64)
    return array, digest


def candidate_dirs(data_dir: Path | None, workspace: Path) -> list[tuple[Path, bool]]:
    """Folders to look in, in order, each with whether it was named explicitly (then it must exist)."""
    dirs: list[tuple[Path, bool]] = []
    if data_dir is not None:
        dirs.append((Path(data_dir), True))
    if os.environ.get("BENCH_DATA_DIR"):
        dirs.append((Path(os.environ["BENCH_DATA_DIR"]), True))
    cache = workspace / "data" / "mnist"
    dirs += [(cache, False), (cache / "MNIST" / "raw", False)]
    return dirs


def locate_mnist(data_dir: Path | None, workspace: Path) -> Path:
    """The folder holding the MNIST files (see the module docstring for the order); downloads if needed."""
    for folder, explicit in candidate_dirs(data_dir, workspace):
        if any(find_idx_file(folder, spec.stem) for spec in MNIST_FILES.values()):
            return folder
        if explicit:  # a mistyped folder should not silently fall back to the cache or a download
            problem = "holds none of the MNIST IDX files" if folder.is_dir() else "does not exist"
            raise BenchError(f"data folder {folder} {problem}; point --data-dir or BENCH_DATA_DIR at the folder "
                             f"holding the four MNIST IDX files")
    return download_mnist(workspace / "data" / "mnist")


def download_mnist(cache: Path) -> Path:
    """Download MNIST with torchvision into `cache`; returns the folder with the raw IDX files."""
    from torchvision.datasets import MNIST

    try:
        MNIST(str(cache), train=True, download=True)
        MNIST(str(cache), train=False, download=True)
    except Exception as exc:  # any network or mirror failure ends the same way for the user
        raise BenchError(f"MNIST not found locally and the download failed ({type(exc).__name__}); "
                         f"put the four IDX files in a folder and pass --data-dir or set BENCH_DATA_DIR") from None
    return cache / "MNIST" / "raw"


def load_mnist(data_dir: Path | None = None, workspace: Path = Path("workspace")) -> Mnist:
    """Find, verify and decode the four MNIST files. Raises BenchError on any missing or bad file."""
    folder = locate_mnist(data_dir, workspace)
    arrays, digests = {}, {}
    for key, spec in MNIST_FILES.items():
        path = find_idx_file(folder, spec.stem)
        if path is None:
            raise BenchError(f"{folder / spec.stem}(.gz): missing; copy all four MNIST IDX files into {folder}")
        arrays[key], digests[spec.stem] = read_idx(path, spec)
    return Mnist(**arrays, source=folder.resolve(), digests=digests)

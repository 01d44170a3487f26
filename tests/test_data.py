"""The MNIST loader: header and digest checks on tiny IDX files, the search order, the real files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from benchmark.data import IMAGE_MAGIC, LABEL_MAGIC, IdxSpec, load_mnist, locate_mnist, read_idx
from benchmark.errors import BenchError
from conftest import idx_bytes, write_idx


@pytest.fixture
def tiny_images():
    return np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


def spec_for(array: np.ndarray, digest: str | None = None) -> IdxSpec:
    magic = IMAGE_MAGIC if array.ndim == 3 else LABEL_MAGIC
    return IdxSpec("tiny", magic, len(array), digest)


@pytest.mark.parametrize("gz", [True, False])
def test_valid_tiny_file_round_trips(tmp_path, tiny_images, gz):
    digest = hashlib.sha256(idx_bytes(tiny_images)).hexdigest()
    path = write_idx(tmp_path / ("tiny.gz" if gz else "tiny"), tiny_images, gz=gz)
    images, got = read_idx(path, spec_for(tiny_images, digest))
    assert got == digest
    assert images.dtype == np.uint8 and images.shape == (5, 28, 28)
    np.testing.assert_array_equal(images, tiny_images)


def test_labels_decode_as_int64(tmp_path):
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    decoded, _ = read_idx(write_idx(tmp_path / "l.gz", labels), spec_for(labels))
    assert decoded.dtype == np.int64
    assert decoded.tolist() == [5, 0, 4, 1, 9]


def test_truncated_file_is_named(tmp_path, tiny_images):
    path = tmp_path / "tiny"
    path.write_bytes(idx_bytes(tiny_images)[:-100])
    with pytest.raises(BenchError, match="tiny: truncated, 3836 bytes instead of 3936"):
        read_idx(path, spec_for(tiny_images))


def test_truncated_gzip_stream_is_reported(tmp_path, tiny_images):
    path = write_idx(tmp_path / "tiny.gz", tiny_images)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(BenchError, match="cannot be read or decompressed"):
        read_idx(path, spec_for(tiny_images))


def test_damaged_gzip_body_is_reported(tmp_path, tiny_images):
    path = write_idx(tmp_path / "tiny.gz", tiny_images)
    damaged = bytearray(path.read_bytes())
    damaged[12:40] = bytes(b ^ 0xFF for b in damaged[12:40])  # the deflate stream, past the 10-byte header
    path.write_bytes(bytes(damaged))
    with pytest.raises(BenchError, match="cannot be read or decompressed"):  # zlib.error, not an OSError
        read_idx(path, spec_for(tiny_images))


def test_wrong_magic(tmp_path, tiny_images):
    labels = np.zeros(5, dtype=np.uint8)
    path = write_idx(tmp_path / "tiny.gz", labels)  # a label file where images are expected
    with pytest.raises(BenchError, match="wrong magic number 2049"):
        read_idx(path, spec_for(tiny_images))


def test_wrong_count(tmp_path, tiny_images):
    path = write_idx(tmp_path / "tiny.gz", tiny_images)
    with pytest.raises(BenchError, match="header says 5 items, expected 6"):
        read_idx(path, IdxSpec("tiny", IMAGE_MAGIC, 6, None))


def test_wrong_digest(tmp_path, tiny_images):
    good = hashlib.sha256(idx_bytes(tiny_images)).hexdigest()
    altered = tiny_images.copy()
    altered[0, 0, 0] ^= 1
    path = write_idx(tmp_path / "tiny.gz", altered)
    with pytest.raises(BenchError, match="altered, SHA-256"):
        read_idx(path, spec_for(tiny_images, good))


def test_explicit_missing_or_empty_folder_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(BenchError, match="does not exist"):
        locate_mnist(tmp_path / "nowhere", tmp_path / "ws")
    (tmp_path / "empty").mkdir()
    cache = tmp_path / "ws" / "data" / "mnist"  # a cached copy is not used instead of the folder asked for
    cache.mkdir(parents=True)
    write_idx(cache / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(BenchError, match="empty holds none of the MNIST IDX files"):
        locate_mnist(tmp_path / "empty", tmp_path / "ws")
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(BenchError, match="empty holds none of the MNIST IDX files"):
        locate_mnist(None, tmp_path / "ws")


def test_incomplete_folder_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_DATA_DIR", raising=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(10000, dtype=np.uint8))
    with pytest.raises(BenchError, match="train-images-idx3-ubyte.*missing"):
        load_mnist(tmp_path, tmp_path / "ws")


def test_search_order_prefers_data_dir_over_env(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    monkeypatch.setenv("BENCH_DATA_DIR", str(second))
    assert locate_mnist(first, tmp_path / "ws") == first
    assert locate_mnist(None, tmp_path / "ws") == second
    monkeypatch.delenv("BENCH_DATA_DIR")
    cache = tmp_path / "ws" / "data" / "mnist"
    cache.mkdir(parents=True)
    write_idx(cache / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8), gz=False)
    assert locate_mnist(None, tmp_path / "ws") == cache


def test_real_mnist(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == np.uint8
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_labels.dtype == np.int64 and mnist.train_labels[0] == 5 and mnist.test_labels[0] == 7
    scaled = mnist.train_images / 255.0
    assert abs(scaled.mean() - 0.1307) < 1e-4 and abs(scaled.std() - 0.3081) < 1e-4


def test_validation_split_is_fixed_and_disjoint(mnist):
    fit, val = mnist.validation_split()
    fit2, val2 = mnist.validation_split()
    assert len(val) == 5000 and len(fit) == 55000
    np.testing.assert_array_equal(val, val2)
    # pinned: every validation figure in the README was measured on exactly these images
    assert val[:5].tolist() == [21, 37, 54, 66, 68] and int(val.sum()) == 150882999
    assert len(np.intersect1d(fit, val)) == 0 and len(np.union1d(fit, val)) == 60000
    # every digit is represented in the validation split in roughly its share
    counts = np.bincount(mnist.train_labels[val], minlength=10)
    assert counts.min() > 350


def test_real_files_raw_and_gz_agree(mnist_dir, tmp_path):
    import gzip

    for name in ("t10k-labels-idx1-ubyte",):
        (tmp_path / name).write_bytes(gzip.decompress((Path(mnist_dir) / f"{name}.gz").read_bytes()))
    from benchmark.data import MNIST_FILES

    raw, digest_raw = read_idx(tmp_path / "t10k-labels-idx1-ubyte", MNIST_FILES["test_labels"])
    gz, digest_gz = read_idx(Path(mnist_dir) / "t10k-labels-idx1-ubyte.gz", MNIST_FILES["test_labels"])
    assert digest_raw == digest_gz == MNIST_FILES["test_labels"].sha256
    np.testing.assert_array_equal(raw, gz)

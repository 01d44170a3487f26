"""The workspace and the run folders in it.

Workspace: `--workspace`, else `BENCH_WORKSPACE`, else `./workspace`. A trained run lives in
`<workspace>/runs/<name>/` (name `<model>-s<seed>` unless given) and holds:
  model.pt        the state dict (load with `load_model`, which uses `weights_only=True`)
  meta.json       model, hyperparameters, seed, data digests, versions, machine, wall time, error counts
  val_probs.npy   (5000, 10) float32 probabilities on the validation split (for selection decisions)
  test_probs.npy  (10000, 10) float32 probabilities on the test set (only ever evaluated)
Files are written to a temporary folder and renamed into place, so an interrupted run never leaves a
half-written run folder, and an existing run is replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark.errors import BenchError, first_line


# A run or hard-set name is one folder name inside the workspace: never a path, never hidden (".x.tmp" is staging).
NAME_PATTERN = re.compile(r"\w[\w.+-]*")


def resolve_workspace(workspace: Path | None = None) -> Path:
    """`workspace`, else BENCH_WORKSPACE, else ./workspace; BenchError if that path is a file."""
    path = Path(workspace or os.environ.get("BENCH_WORKSPACE") or "workspace")
    if path.exists() and not path.is_dir():
        raise BenchError(f"workspace {path} is a file, not a folder: give --workspace DIR (or BENCH_WORKSPACE) a "
                         f"folder")
    return path


def machine_description(device="cpu") -> str:
    """A short label such as '2-core CPU (AMD EPYC)' or 'NVIDIA H100', for results tables."""
    import torch  # here, not at the top: commands that only read runs should not pay torch's import time

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu})"


def versions() -> dict[str, str]:
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__}


@dataclass
class Run:
    name: str
    path: Path
    meta: dict
    test_probs: np.ndarray  # (10000, 10)
    val_probs: np.ndarray | None  # (5000, 10), absent for runs that were not trained on the split

    @property
    def test_predictions(self) -> np.ndarray:
        return self.test_probs.argmax(1)


def replace_folder_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Fill a staging folder next to `final` with write(staging), then swap it in for `final`.

    A crash or a failing `write` leaves any earlier `final` untouched (a half-written staging folder is
    removed on the next attempt), so nothing already saved is damaged. Returns `final`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging, old = final.parent / f".{final.name}.tmp", final.parent / f".{final.name}.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write(staging)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
    return final


def refuse_to_replace(saved: Path, differences: Callable[[dict], list[str]], what: str) -> None:
    """Before replacing the folder of `saved` (its meta.json or hardset.json): if `differences(its content)` lists
    anything (["epochs 15 -> 30", ...]), stop with BenchError "`what` (the differences): give --name ...". A missing
    or damaged file holds nothing worth keeping, so its folder may be replaced."""
    if not saved.is_file():
        return
    try:
        content = json.loads(saved.read_text())
    except ValueError:
        return
    changed = differences(content) if isinstance(content, dict) else []
    if changed:
        raise BenchError(f"{what} ({'; '.join(changed)}): give --name to keep both, or delete {saved.parent} to "
                         f"replace it")


def save_run(workspace: Path, name: str, meta: dict, test_probs: np.ndarray,
             val_probs: np.ndarray | None = None, state_dict: dict | None = None) -> Path:
    """Write a run folder atomically; returns its path."""
    import torch

    def write(folder: Path) -> None:
        if state_dict is not None:
            torch.save(state_dict, folder / "model.pt")
        np.save(folder / "test_probs.npy", test_probs.astype(np.float32))
        if val_probs is not None:
            np.save(folder / "val_probs.npy", val_probs.astype(np.float32))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))

    return replace_folder_atomically(workspace / "runs" / name, write)


def run_names(workspace: Path) -> list[str]:
    runs = workspace / "runs"
    if not runs.is_dir():
        return []
    return sorted(p.name for p in runs.iterdir() if (p / "meta.json").is_file() and not p.name.startswith("."))


def load_run(workspace: Path, name: str) -> Run:
    """Load a run's meta and probabilities. BenchError if the name is not a run name, or the run is missing or
    malformed."""
    if not NAME_PATTERN.fullmatch(name):  # "../runs/x" would read, and later commands write, outside runs/
        raise BenchError(f"run {name!r}: a run name is a folder name in {workspace / 'runs'} (letters, digits and "
                         f". _ + -), not a path; `bench report` lists the runs")
    path = workspace / "runs" / name
    if not (path / "meta.json").is_file() or not (path / "test_probs.npy").is_file():
        known = ", ".join(run_names(workspace)) or "none yet"
        raise BenchError(f"run {name!r} not found in {workspace / 'runs'} (runs there: {known}); "
                         f"train one with `bench train --model NAME`")
    try:
        meta = json.loads((path / "meta.json").read_text())
        test_probs = np.load(path / "test_probs.npy")
        val_probs = np.load(path / "val_probs.npy") if (path / "val_probs.npy").is_file() else None
    except (OSError, ValueError) as exc:
        raise BenchError(f"run {name!r} in {path} is damaged ({first_line(exc)}); train it again") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("model"), str) and isinstance(meta.get("config", {}), dict)):
        raise BenchError(f"run {name!r}: {path / 'meta.json'} is damaged (no model name, or a config that is not a "
                         f"mapping); train it again")
    meta.setdefault("config", {})  # readers look options up in it; a run saved without one had none
    if test_probs.ndim != 2 or test_probs.shape[1] != 10:
        raise BenchError(f"{path / 'test_probs.npy'}: expected shape (N, 10), got {test_probs.shape}")
    return Run(name, path, meta, test_probs, val_probs)


def load_model(run: Run):
    """Rebuild a run's model from the registry and load its weights (weights_only=True)."""
    import torch

    from models import create_model

    if not (run.path / "model.pt").is_file():
        raise BenchError(f"run {run.name!r} has no model.pt (it may be an ensemble of other runs)")
    try:
        weights = torch.load(run.path / "model.pt", map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:  # truncated, or not a state dict
        raise BenchError(f"run {run.name!r}: {run.path / 'model.pt'} is damaged or not a weights file "
                         f"({type(exc).__name__}); train the run again") from None
    try:
        model = create_model(run.meta["model"], **run.meta["config"].get("model_kwargs", {}))
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # renamed model or option, other shapes
        raise BenchError(f"run {run.name!r} cannot be rebuilt with the current code ({first_line(exc)}); train it "
                         f"again") from None
    return model.eval()

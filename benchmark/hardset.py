"""The hard set: the MNIST test images that one or more runs classify wrongly.

`<workspace>/hardsets/<name>/` holds
  items.csv     one row per image, ordered by test index: `test_index`, `label`, and for each run
                `<run>_pred` (its prediction) and `<run>_top3` ("digit:prob digit:prob digit:prob")
  images.npy    uint8 (n, 28, 28), row i is the image of items.csv row i
  hardset.json  the runs, the mode (union: wrong for any run; intersection: wrong for all) and the count
It is what the labelling session, the assist measurement and the report read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.errors import BenchError
from benchmark.runs import Run, refuse_to_replace, replace_folder_atomically


def top3_text(probs: np.ndarray) -> list[str]:
    """(n, 10) probabilities -> per row "d:p d:p d:p" for the three most probable digits."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    return [" ".join(f"{d}:{row[d]:.3f}" for d in top) for row, top in zip(probs, order)]


def hardset_table(runs: list[Run], test_labels: np.ndarray, mode: str) -> pd.DataFrame:
    """The items.csv table for `runs` on the test set (labels (N,)), wrong under `mode`."""
    if mode not in ("union", "intersection"):
        raise BenchError(f"--mode {mode}: expected union or intersection")
    for run in runs:
        if len(run.test_probs) != len(test_labels):
            raise BenchError(f"run {run.name!r} has {len(run.test_probs)} test predictions, "
                             f"expected {len(test_labels)}; train it again")
    wrong = np.stack([run.test_predictions != test_labels for run in runs])
    selected = np.flatnonzero(wrong.any(0) if mode == "union" else wrong.all(0))
    table = pd.DataFrame({"test_index": selected, "label": test_labels[selected]})
    for run in runs:
        table[f"{run.name}_pred"] = run.test_predictions[selected]
        table[f"{run.name}_top3"] = top3_text(run.test_probs[selected])
    return table


def write_hardset(workspace: Path, name: str, runs: list[Run], mode: str, test_images: np.ndarray,
                  test_labels: np.ndarray) -> tuple[Path, pd.DataFrame]:
    """Gather and write the hard set atomically; returns (folder, items table). A hard set of this name gathered
    from other runs or in another mode is not replaced (BenchError): people may be labelling it, and their answers
    would no longer match; the same gathering again is a re-run and replaces it."""
    names = [r.name for r in runs]
    refuse_to_replace(workspace / "hardsets" / name / "hardset.json",
                      lambda saved: [f"{key} {saved.get(key)} -> {now}" for key, now in (("runs", names), ("mode", mode))
                                     if saved.get(key) != now],
                      f"hard set {name} is already gathered from other runs or another mode, so answers given on it "
                      f"would no longer match")
    table = hardset_table(runs, test_labels, mode)

    def write(folder: Path) -> None:
        table.to_csv(folder / "items.csv", index=False)
        np.save(folder / "images.npy", test_images[table["test_index"].to_numpy()])
        (folder / "hardset.json").write_text(json.dumps(
            {"name": name, "runs": names, "mode": mode, "count": len(table),
             "errors_per_run": {r.name: int((r.test_predictions != test_labels).sum()) for r in runs}}, indent=2))

    final = replace_folder_atomically(workspace / "hardsets" / name, write)
    return final, table


def load_hardset(workspace: Path, name: str) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """(items table, images uint8 (n, 28, 28), hardset.json) of a gathered hard set."""
    folder = workspace / "hardsets" / name
    if not (folder / "items.csv").is_file():
        known = sorted(p.name for p in (workspace / "hardsets").glob("[!.]*")) if (workspace / "hardsets").is_dir() else []
        raise BenchError(f"hard set {name!r} not found in {workspace / 'hardsets'} (there: {', '.join(known) or 'none'}); "
                         f"gather one with `bench errors --run RUN`")
    return (pd.read_csv(folder / "items.csv"), np.load(folder / "images.npy"),
            json.loads((folder / "hardset.json").read_text()))

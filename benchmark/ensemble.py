"""Ensembles: average the probabilities of several trained runs and save the result as one more run.

The ensemble run folder has `meta.json`, `val_probs.npy` and `test_probs.npy` like any run (no `model.pt`),
so `bench errors`, the assist measurement and the report treat it as one more model. Its meta records the
members, each member's test errors, their mean, spread (sample standard deviation), min and max, and how the
members' errors overlap: the test images every member gets wrong, those every member gets wrong with the same
answer (no average of these members can fix them) and those at least one gets wrong (no average of them can err
anywhere else); see `error_overlap`.
"""

from __future__ import annotations

import time

import numpy as np

from benchmark.errors import BenchError
from benchmark.runs import Run, machine_description, save_run


def average_runs(members: list[Run]) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean test probabilities (N, 10) and mean validation probabilities (V, 10) or None if any lacks them."""
    if not members:
        raise BenchError("an ensemble needs at least one member run")
    shapes = {m.test_probs.shape for m in members}
    if len(shapes) != 1:
        raise BenchError(f"ensemble members disagree on the test-probability shape: {sorted(shapes)}")
    test = np.mean([m.test_probs for m in members], axis=0)
    val = None if any(m.val_probs is None for m in members) else np.mean([m.val_probs for m in members], axis=0)
    return test, val


def error_overlap(predictions: np.ndarray, labels: np.ndarray) -> dict:
    """How members' errors spread and overlap, from their predicted classes (members, N) and the labels (N,).

    Returns {"member_spread": {"mean", "std" (ddof=1; 0 for one member), "min", "max"} of the members' error
    counts, "wrong_for_all_members", "same_wrong_answer_for_all_members", "wrong_for_some_member": image counts}.
    These bound every average of the members' probabilities, whatever its (non-negative) weights: where all
    members are right each gives the label more than any other class, so the average does too, and where all
    give the same wrong class the average gives it too. So an average's errors are at least the "same wrong
    answer" count and at most the "some member" count; an image all members get wrong in different ways can
    still come out right.
    """
    wrong = predictions != labels
    counts = wrong.sum(1)
    spread = {"mean": float(counts.mean()), "std": float(counts.std(ddof=1)) if len(counts) > 1 else 0.0,
              "min": int(counts.min()), "max": int(counts.max())}
    return {"member_spread": spread,
            "wrong_for_all_members": int(wrong.all(0).sum()),
            "same_wrong_answer_for_all_members": int((wrong.all(0) & (predictions == predictions[0]).all(0)).sum()),
            "wrong_for_some_member": int(wrong.any(0).sum())}


def build_ensemble(workspace, name: str, members: list[Run], test_labels: np.ndarray,
                   val_labels: np.ndarray | None = None) -> dict:
    """Average `members`, save the ensemble as run `name`, return its meta.json content."""
    test_probs, val_probs = average_runs(members)
    predictions = np.array([m.test_predictions for m in members])  # (members, N)
    meta = {
        "name": name, "model": "ensemble", "members": [m.name for m in members],
        "member_models": sorted({m.meta.get("model", "?") for m in members}),
        "seed": [m.meta.get("seed") for m in members], "config": {"members": [m.name for m in members]},
        "parameters": sum(int(m.meta.get("parameters", 0)) for m in members),
        "train_seconds": round(sum(float(m.meta.get("train_seconds", 0)) for m in members), 1),
        "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
        "test_errors": int((test_probs.argmax(1) != test_labels).sum()), "test_size": len(test_labels),
        "member_test_errors": {m.name: int((p != test_labels).sum()) for m, p in zip(members, predictions)},
        **error_overlap(predictions, test_labels),
    }
    if val_probs is not None and val_labels is not None:
        meta["val_errors"] = int((val_probs.argmax(1) != val_labels).sum())
        meta["val_size"] = len(val_labels)
    save_run(workspace, name, meta, test_probs, val_probs)
    return meta

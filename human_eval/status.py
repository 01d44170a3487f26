"""Each annotator's progress per hard set and, once they have finished, their score against the labels.

Progress counts items whose every phase (quick, and considered with --think) has a final answer. The
score is only computed for finished annotators, so nobody is shown a running score they could react to.
Hard-set items and controls are scored apart: errors are answers that name the wrong digit; "cannot
tell" is counted separately and is not an error; controls report how many were answered right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from human_eval.store import AnnotationStore, load_answers

STATUS_COLUMNS = ["hardset", "annotator", "answered", "total", "finished", "errors", "cannot_tell",
                  "considered_errors", "considered_cannot_tell", "controls_right", "controls", "median_seconds"]


def progress(workspace: Path, db_path: Path, data_dir: Path | None = None) -> pd.DataFrame:
    """One row per (hard set, annotator) with columns STATUS_COLUMNS; score columns are NaN until finished
    (and the considered ones without --think, the control ones without controls)."""
    from benchmark.hardset import load_hardset

    answers = load_answers(db_path)
    with AnnotationStore(db_path) as store:
        plans = store.plans().set_index(["hardset", "annotator"])
    pairs = sorted(set(plans.index) | set(zip(answers["hardset"], answers["annotator"])))
    hardsets = {name: load_hardset(workspace, name)[0] for name in sorted({h for h, _ in pairs})}
    rows, test_labels = [], None
    for hardset, annotator in pairs:
        labels = dict(zip(hardsets[hardset]["test_index"], hardsets[hardset]["label"]))
        mine = answers[(answers["hardset"] == hardset) & (answers["annotator"] == annotator)]
        quick, considered = (mine[mine["phase"] == p].set_index("test_index") for p in ("quick", "considered"))
        think = bool(plans.loc[(hardset, annotator), "think"]) if (hardset, annotator) in plans.index else False
        # Without a plan (a Label Studio import) the items are the hard set plus whatever controls were answered.
        total = int(plans.loc[(hardset, annotator), "items"]) if (hardset, annotator) in plans.index \
            else len(labels) + int(quick["is_control"].sum())
        answered = len(quick.index.intersection(considered.index)) if think else len(quick)
        row = {"hardset": hardset, "annotator": annotator, "answered": answered, "total": total,
               "finished": answered >= total, "median_seconds": float(quick["seconds"].median())}
        if row["finished"]:
            if quick["is_control"].any() and test_labels is None:
                from benchmark.data import load_mnist

                test_labels = load_mnist(data_dir, workspace).test_labels
            row.update(score(quick, labels, test_labels))
            if think:
                considered_score = score(considered, labels, test_labels)
                row.update(considered_errors=considered_score["errors"],
                           considered_cannot_tell=considered_score["cannot_tell"])
        rows.append(row)
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


def score(answers: pd.DataFrame, labels: dict[int, int], test_labels: np.ndarray | None) -> dict[str, int]:
    """Errors and cannot-tell on hard-set items, right answers on controls, for answers indexed by test_index."""
    hard = answers[~answers["is_control"]]
    truth = hard.index.map(labels).to_numpy()
    given = hard["answer"]
    result = {"errors": int((given.notna() & (given != truth)).sum()), "cannot_tell": int(given.isna().sum())}
    controls = answers[answers["is_control"]]
    if len(controls):
        right = controls["answer"] == test_labels[controls.index.to_numpy()]
        result.update(controls_right=int(right.fillna(False).sum()), controls=len(controls))
    return result

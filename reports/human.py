"""Scoring the human answers: errors per annotator and phase, the majority vote, controls and agreement.

Input is the `human_eval.store.load_answers` table (hardset, test_index, annotator, phase, answer (Int64,
<NA> = cannot tell), reason, seconds, is_control) and the MNIST test labels (10000,). Definitions used
throughout the report:
  final answer   an annotator's considered answer for an image if there is one, else the quick one.
  majority       per hard-set image, the digit given most often among the annotators' final answers,
                 "cannot tell" counting as an abstention; a tie for first place (or only abstentions)
                 gives no majority.
  wrong          a digit that differs from the dataset label. "Cannot tell" and "no majority" are counted
                 apart as undecided, never as right or wrong.
  controls       easy images mixed into a session to check attention; scored apart and excluded from
                 every hard-set figure.
  agreement      Cohen's kappa per pair of annotators and Fleiss' kappa over all, on the final answers to
                 the images every rater in question answered, with "cannot tell" as an eleventh category.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score

ITEM = ["hardset", "test_index"]
UNDECIDED = -1  # "cannot tell" / "no majority" as an integer code, and as a category for agreement
CATEGORIES = list(range(10)) + [UNDECIDED]


def coded(answer: pd.Series) -> np.ndarray:
    """Int64 answers with <NA> -> int64 array with UNDECIDED for <NA>."""
    return answer.astype("Int64").fillna(UNDECIDED).to_numpy(dtype=np.int64)


def score(answer: np.ndarray, label: np.ndarray) -> dict:
    """Coded answers (n,) against labels (n,): images, wrong (a digit other than the label), undecided."""
    decided = answer != UNDECIDED
    wrong = int((answer[decided] != label[decided]).sum())
    return {"images": len(answer), "wrong": wrong, "undecided": int((~decided).sum()),
            "error_rate": wrong / len(answer) if len(answer) else np.nan}


def final_answers(answers: pd.DataFrame) -> pd.DataFrame:
    """One row per (hardset, test_index, annotator) on hard-set images: considered if given, else quick."""
    hard = answers[~answers["is_control"]]
    considered_last = hard.assign(rank=(hard["phase"] == "considered").astype(int)).sort_values("rank", kind="stable")
    return (considered_last.drop_duplicates(ITEM + ["annotator"], keep="last").drop(columns="rank")
            .sort_values(ITEM + ["annotator"]).reset_index(drop=True))


def majority_vote(final: pd.DataFrame) -> pd.DataFrame:
    """Per hard-set image: annotators, the votes as text ("7:2 ?:1") and the majority (Int64, <NA> = none)."""
    rows = []
    for (hardset, test_index), votes in final.groupby(ITEM, sort=True):
        tally = pd.Series(coded(votes["answer"])).value_counts()  # descending counts
        digits = tally.drop(UNDECIDED, errors="ignore")
        tied = len(digits) > 1 and digits.iloc[0] == digits.iloc[1]
        rows.append({"hardset": hardset, "test_index": test_index, "annotators": len(votes),
                     "votes": " ".join(f"{'?' if d == UNDECIDED else d}:{n}" for d, n in tally.items()),
                     "majority": pd.NA if digits.empty or tied else int(digits.index[0])})
    return pd.DataFrame(rows, columns=ITEM + ["annotators", "votes", "majority"]).astype({"majority": "Int64"})


def hardset_errors(answers: pd.DataFrame, test_labels: np.ndarray,
                   model_predictions: dict[str, np.ndarray]) -> pd.DataFrame:
    """Errors on the hard-set images humans labelled, per hard set, for every kind of answerer.

    Rows: each annotator's quick and considered answers (on the images answered in that phase), the final
    answers of annotators who gave considered ones, the human majority over the images with any final
    answer, and each model of `model_predictions` ({run: test predictions (10000,)}) on those same images.
    Columns: hardset, who, kind, images, wrong, undecided (cannot tell / no majority), error_rate,
    median_seconds (per answer, for the human phases).
    """
    final = final_answers(answers)
    majority = majority_vote(final)
    reconsidering = final[final["phase"] == "considered"]["annotator"].unique()
    answered = pd.concat([answers[~answers["is_control"]],
                          final[final["annotator"].isin(reconsidering)].assign(phase="final", seconds=np.nan)])
    answered["phase"] = pd.Categorical(answered["phase"], ["quick", "considered", "final"])  # rows in this order
    rows = []
    for hardset, on_set in answered.groupby("hardset", sort=True):
        for (annotator, phase), given in on_set.groupby(["annotator", "phase"], sort=True, observed=True):
            rows.append({"hardset": hardset, "who": annotator, "kind": phase,
                         **score(coded(given["answer"]), test_labels[given["test_index"]]),
                         "median_seconds": given["seconds"].median()})
        voted = majority[majority["hardset"] == hardset]
        shown = voted["test_index"].to_numpy()
        rows.append({"hardset": hardset, "who": "human majority", "kind": "majority",
                     **score(coded(voted["majority"]), test_labels[shown]), "median_seconds": np.nan})
        for run, predictions in model_predictions.items():
            rows.append({"hardset": hardset, "who": run, "kind": "model",
                         **score(predictions[shown], test_labels[shown]), "median_seconds": np.nan})
    return pd.DataFrame(rows, columns=["hardset", "who", "kind", "images", "wrong", "undecided", "error_rate",
                                       "median_seconds"])


def reconsidered(answers: pd.DataFrame, test_labels: np.ndarray) -> pd.DataFrame:
    """Quick vs considered per (hardset, annotator), on the images answered in both phases.

    Columns: hardset, annotator, both, changed, fixed (quick wrong or cannot tell, considered right),
    broken (quick right, considered wrong or cannot tell).
    """
    hard = answers[~answers["is_control"]]
    key = ITEM + ["annotator"]
    both = (hard[hard["phase"] == "quick"][key + ["answer"]]
            .merge(hard[hard["phase"] == "considered"][key + ["answer"]], on=key, suffixes=("_quick", "_considered")))
    label = test_labels[both["test_index"]]
    quick, considered = coded(both["answer_quick"]), coded(both["answer_considered"])
    both = both.assign(changed=quick != considered, fixed=(quick != label) & (considered == label),
                       broken=(quick == label) & (considered != label))
    table = both.groupby(["hardset", "annotator"], sort=True).agg(
        both=("test_index", "size"), changed=("changed", "sum"), fixed=("fixed", "sum"), broken=("broken", "sum"))
    return table.reset_index()


def control_accuracy(answers: pd.DataFrame, test_labels: np.ndarray) -> pd.DataFrame:
    """Per (hardset, annotator, phase) on control images: controls, correct, cannot_tell, accuracy."""
    controls = answers[answers["is_control"]]
    answer, label = coded(controls["answer"]), test_labels[controls["test_index"]]
    scored = controls.assign(correct=answer == label, cannot_tell=answer == UNDECIDED)
    table = scored.groupby(["hardset", "annotator", "phase"], sort=True).agg(
        controls=("test_index", "size"), correct=("correct", "sum"), cannot_tell=("cannot_tell", "sum"))
    return table.assign(accuracy=table["correct"] / table["controls"]).reset_index()


def answer_grids(final: pd.DataFrame):
    """Per hard set (sorted by name), its final answers coded as in `coded`, in a (test index x annotator) table:
    yields (hard set, table), NaN where an annotator gave no answer."""
    for hardset, on_set in final.groupby("hardset", sort=True):
        yield hardset, on_set.assign(code=coded(on_set["answer"])).pivot(index="test_index", columns="annotator",
                                                                         values="code")


def pairwise_kappa(final: pd.DataFrame) -> pd.DataFrame:
    """Cohen's kappa per hard set and pair of annotators on the images both answered (final answers).

    Columns: hardset, annotator_a, annotator_b, shared, agreement (fraction of identical answers),
    cohen_kappa (NaN when undefined: both used one and the same category throughout).
    """
    rows = []
    for hardset, wide in answer_grids(final):
        for a, b in itertools.combinations(sorted(wide.columns), 2):
            pair = wide[[a, b]].dropna().astype(int)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UndefinedMetricWarning)
                kappa = cohen_kappa_score(pair[a], pair[b], labels=CATEGORIES) if len(pair) else np.nan
            rows.append({"hardset": hardset, "annotator_a": a, "annotator_b": b, "shared": len(pair),
                         "agreement": (pair[a] == pair[b]).mean() if len(pair) else np.nan, "cohen_kappa": kappa})
    return pd.DataFrame(rows, columns=["hardset", "annotator_a", "annotator_b", "shared", "agreement", "cohen_kappa"])


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of a (subjects N, categories k) table of how many raters put each subject in each category.

    Every subject must have the same number of raters n >= 2. With p_j = sum_i n_ij / (N n) the share of all
    ratings in category j, P_i = (sum_j n_ij^2 - n) / (n (n - 1)) the agreement on subject i, P = mean_i P_i
    and Pe = sum_j p_j^2 the agreement expected by chance: kappa = (P - Pe) / (1 - Pe)  (Fleiss, 1971).
    NaN when undefined (no subjects, or Pe = 1: all ratings in one category).
    """
    counts = np.asarray(counts, dtype=float)
    if len(counts) == 0:
        return np.nan
    raters = counts.sum(1)
    if raters[0] < 2 or not np.all(raters == raters[0]):
        return np.nan
    n = raters[0]
    p_category = counts.sum(0) / counts.sum()
    p_subject = ((counts ** 2).sum(1) - n) / (n * (n - 1))
    chance = (p_category ** 2).sum()
    return float((p_subject.mean() - chance) / (1 - chance)) if chance < 1 else np.nan


def fleiss_table(final: pd.DataFrame) -> pd.DataFrame:
    """Fleiss' kappa per hard set over all its annotators, on the images every one of them answered.

    Columns: hardset, annotators, images, fleiss_kappa (NaN with fewer than two annotators).
    """
    rows = []
    for hardset, wide in answer_grids(final):
        complete = wide.dropna().astype(int)
        counts = np.stack([(complete.to_numpy() == c).sum(1) for c in CATEGORIES], axis=1)  # (images, 11)
        rows.append({"hardset": hardset, "annotators": wide.shape[1], "images": len(complete),
                     "fleiss_kappa": fleiss_kappa(counts) if wide.shape[1] >= 2 else np.nan})
    return pd.DataFrame(rows, columns=["hardset", "annotators", "images", "fleiss_kappa"])

"""Generator assist: when a classifier doubts, the rules of writing re-rank its top candidates.

For an image whose classifier probabilities p are in doubt,

    doubtful  = max_c p(c) < tau   or   p(first) - p(second) < delta

its k most probable classes (k = 2 or 3) are the candidates. The generator (`models.generator`) fits a style
code to the image for each candidate (analysis by synthesis) and its comparison score s(c) = -(fitted loss)
says how well that digit's rule explains the image. The assisted prediction is

    argmax over candidates c of   log p(c) + lambda * s(c)

and confident images keep the classifier's answer. Selection is on the validation split only: tau and delta
come from a grid of validation quantiles (the top probability and the top-two margin below which a given
share of validation images falls, so the grid suits sharp and label-smoothed classifiers alike), k from
{2, 3} and lambda from a log grid; the setting with the largest net gain on validation wins (ties: fewer
images consulted, then smaller k and lambda). The generator scores of the validation images are fitted once,
for the top 3 classes of every image doubtful under the loosest setting, and reused across the grid. The
test set is then evaluated once with the chosen setting, and once per tau of the grid (other parameters
fixed) for the report's curve.

Accounting against the labels: consulted (doubtful images), errors_before, fixed (wrong before, right after),
introduced (right before, wrong after), net_gain = fixed - introduced, errors_after.

Output `<workspace>/assist/<run>/`: assist.json (the summary, keys below) and assist.csv (one row per
consulted test image: test_index, label, before, after, candidates, scores).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from benchmark.errors import BenchError

MAX_CANDIDATES = 3
SHARES = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)  # shares of validation images below the tau and delta grid points
LAMBDAS = tuple(np.geomspace(1.0, 1000.0, 13))  # generator scores differ by ~0.01-0.5; log-probs by ~0.1-5

# scores for (images uint8 (P, 28, 28), classes (P,)) -> (P,), higher = the class explains the image better
PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Setting:
    tau: float
    delta: float
    k: int
    lam: float

    def as_json(self) -> dict:
        return {"tau": self.tau, "delta": self.delta, "k": self.k, "lambda": self.lam}


@dataclass
class Split:
    """One evaluation split: classifier probabilities (N, 10), labels (N,), uint8 images (N, 28, 28)."""

    probs: np.ndarray
    labels: np.ndarray
    images: np.ndarray


def candidates(probs: np.ndarray, k: int = MAX_CANDIDATES) -> np.ndarray:
    """The k most probable classes of each row of probs (N, 10), most probable first: (N, k).

    Ties keep the lower class first, as `argmax` does, so column 0 is the classifier's prediction.
    """
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def doubtful(probs: np.ndarray, tau: float, delta: float) -> np.ndarray:
    """Rows of probs (N, 10) whose top probability is below tau or whose top two are closer than delta: (N,) bool."""
    top2 = np.sort(probs, axis=1)[:, -2:]
    return (top2[:, 1] < tau) | (top2[:, 1] - top2[:, 0] < delta)


def assisted_predictions(probs: np.ndarray, scores: np.ndarray, setting: Setting) -> tuple[np.ndarray, np.ndarray]:
    """Predictions after the assist (N,) and the consulted mask (N,).

    probs (N, 10); scores (N, >= k) are the generator scores of `candidates(probs)` in that order (NaN is
    allowed where the image is not consulted).
    """
    consulted = doubtful(probs, setting.tau, setting.delta)
    top = candidates(probs, setting.k)
    after = top[:, 0].copy()
    rows = np.flatnonzero(consulted)
    if len(rows):
        s = scores[rows, :setting.k]
        if np.isnan(s).any():
            raise ValueError("generator scores are missing for consulted images")
        log_p = np.log(np.clip(np.take_along_axis(probs[rows], top[rows], 1), 1e-12, None))
        after[rows] = top[rows, np.argmax(log_p + setting.lam * s, axis=1)]
    return after, consulted


def accounting(probs: np.ndarray, scores: np.ndarray, labels: np.ndarray, setting: Setting) -> dict:
    """consulted, errors_before, fixed, introduced, net_gain, errors_after of `setting` (inputs as above)."""
    before = candidates(probs, 1)[:, 0]
    after, consulted = assisted_predictions(probs, scores, setting)
    wrong_before, wrong_after = before != labels, after != labels
    fixed, introduced = int((wrong_before & ~wrong_after).sum()), int((~wrong_before & wrong_after).sum())
    return {"consulted": int(consulted.sum()), "errors_before": int(wrong_before.sum()), "fixed": fixed,
            "introduced": introduced, "net_gain": fixed - introduced, "errors_after": int(wrong_after.sum())}


def setting_grid(val_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tau and delta grids from validation quantiles (see module docstring); delta also has 0 (test off)."""
    top2 = np.sort(val_probs, axis=1)[:, -2:]
    taus = np.unique(np.quantile(top2[:, 1], SHARES))
    deltas = np.unique(np.concatenate([[0.0], np.quantile(top2[:, 1] - top2[:, 0], SHARES)]))
    return taus, deltas


def choose_setting(val_probs: np.ndarray, val_scores: np.ndarray, val_labels: np.ndarray) -> tuple[Setting, dict]:
    """The grid setting with the largest validation net gain (ties: fewer consulted, smaller k, smaller lambda).

    val_scores (N, 3) must hold the scores of every image doubtful under the loosest tau and delta.
    Returns the setting and its validation accounting.
    """
    taus, deltas = setting_grid(val_probs)
    best = None
    for tau, delta, k, lam in itertools.product(taus, deltas, (2, 3), LAMBDAS):
        setting = Setting(float(tau), float(delta), k, float(lam))
        counts = accounting(val_probs, val_scores, val_labels, setting)
        key = (counts["net_gain"], -counts["consulted"], -k, -lam)
        if best is None or key > best[0]:
            best = (key, setting, counts)
    return best[1], best[2]


def candidate_scores(split: Split, rows: np.ndarray, k: int, score_pairs: PairScorer, label: str,
                     show_progress: bool = True, chunk: int = 1024) -> np.ndarray:
    """Generator scores (N, 3) of the top-k candidates of the images `rows` (indices); NaN elsewhere."""
    top = candidates(split.probs, k)[rows]
    pair_rows, pair_classes = np.repeat(rows, k), top.reshape(-1)
    flat = np.empty(len(pair_rows))
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), disable=not show_progress)
    with progress:
        task = progress.add_task(f"fitting styles, {label} ({len(rows)} images x {k})", total=len(pair_rows))
        for start in range(0, len(pair_rows), chunk):
            part = slice(start, start + chunk)
            flat[part] = score_pairs(split.images[pair_rows[part]], pair_classes[part])
            progress.update(task, advance=len(flat[part]))
    scores = np.full((len(split.probs), MAX_CANDIDATES), np.nan)
    scores[rows, :k] = flat.reshape(len(rows), k)
    return scores


def assist(val: Split, test: Split, score_pairs: PairScorer, show_progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """Choose the setting on `val`, evaluate it once on `test`; returns (summary, per-consulted-image table).

    summary: chosen, the test accounting, tau_sweep (test accounting per grid tau, other parameters fixed).
    The table has one row per consulted test image: test_index, label, before, after, candidates, scores.
    """
    taus, deltas = setting_grid(val.probs)
    loosest = np.flatnonzero(doubtful(val.probs, taus.max(), deltas.max()))
    val_scores = candidate_scores(val, loosest, MAX_CANDIDATES, score_pairs, "validation", show_progress)
    chosen, _ = choose_setting(val.probs, val_scores, val.labels)

    swept = np.flatnonzero(doubtful(test.probs, taus.max(), chosen.delta))  # every image any swept tau consults
    test_scores = candidate_scores(test, swept, chosen.k, score_pairs, "test", show_progress)
    summary = {"chosen": chosen.as_json(), **accounting(test.probs, test_scores, test.labels, chosen)}
    summary["tau_sweep"] = []
    for tau in taus:
        at_tau = Setting(float(tau), chosen.delta, chosen.k, chosen.lam)
        counts = accounting(test.probs, test_scores, test.labels, at_tau)
        summary["tau_sweep"].append({"tau": float(tau), "consulted": counts["consulted"], "fixed": counts["fixed"],
                                     "introduced": counts["introduced"], "net_gain": counts["net_gain"]})

    after, consulted = assisted_predictions(test.probs, test_scores, chosen)
    rows = np.flatnonzero(consulted)
    top = candidates(test.probs, chosen.k)
    table = pd.DataFrame({
        "test_index": rows, "label": test.labels[rows], "before": top[rows, 0], "after": after[rows],
        "candidates": [" ".join(map(str, top[i])) for i in rows],
        "scores": [" ".join(f"{s:.4f}" for s in test_scores[i, :chosen.k]) for i in rows]})
    return summary, table


def generator_scorer(model: torch.nn.Module, device: torch.device, steps: int, lr: float = 0.1) -> PairScorer:
    """score(images, classes) = -(the generator's loss after fitting a style code for each pair)."""
    from benchmark.train import to_float

    model = model.to(device).eval().requires_grad_(False)  # frozen: only the style codes are fitted

    def score(images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        x = to_float(images).to(device)
        return -model.fit_styles(x, torch.from_numpy(classes).to(device), steps, lr).cpu().numpy()

    return score


def run_assist(workspace: Path, run_name: str, generator_name: str, data_dir: Path | None, device: torch.device,
               steps: int = 20, show_progress: bool = True) -> tuple[dict, Path]:
    """Load the classifier and generator runs and MNIST, assist, write assist.json and assist.csv.

    Returns (the assist.json content, its folder).
    """
    from benchmark.data import load_mnist
    from benchmark.runs import load_model, load_run, replace_folder_atomically

    start = time.perf_counter()
    classifier, generator_run = load_run(workspace, run_name), load_run(workspace, generator_name)
    if generator_run.meta.get("model") != "generator":
        raise BenchError(f"run {generator_name!r} is a {generator_run.meta.get('model')!r} run, not a generator; "
                         f"train one with `bench train --model generator`")
    if classifier.val_probs is None:
        raise BenchError(f"run {run_name!r} has no validation probabilities (val_probs.npy), and the assist "
                         f"chooses its settings on them; use a run trained with `bench train`")
    mnist = load_mnist(data_dir, workspace)
    _, val_idx = mnist.validation_split()
    expected = {"val": (classifier.val_probs, len(val_idx)), "test": (classifier.test_probs, len(mnist.test_labels))}
    for what, (probs, n) in expected.items():
        if probs.shape != (n, 10):
            raise BenchError(f"run {run_name!r}: {what}_probs has shape {probs.shape}, expected ({n}, 10); "
                             f"train it again")
    val = Split(classifier.val_probs, mnist.train_labels[val_idx], mnist.train_images[val_idx])
    test = Split(classifier.test_probs, mnist.test_labels, mnist.test_images)

    scorer = generator_scorer(load_model(generator_run), device, steps)
    summary, table = assist(val, test, scorer, show_progress)
    result = {"run": run_name, "generator_run": generator_name, **summary,
              "generator_alone": {"test_errors": int((generator_run.test_predictions != mnist.test_labels).sum()),
                                  "test_size": len(mnist.test_labels)},
              "seconds": round(time.perf_counter() - start, 1)}

    def write(folder: Path) -> None:
        (folder / "assist.json").write_text(json.dumps(result, indent=2))
        table.to_csv(folder / "assist.csv", index=False)

    return result, replace_folder_atomically(workspace / "assist" / run_name, write)

"""Read every artefact of a workspace into arrays and pandas tables, tolerating absent and damaged parts.

What is read (each part may be missing; the report then lists it as "not run yet"):
  runs/<name>/                 meta.json + test_probs.npy (10000, 10), via `benchmark.runs.load_run`
  hardsets/<name>/             items.csv, images.npy uint8 (n, 28, 28), hardset.json, via `load_hardset`
  human/annotations.sqlite     the answers, only through `human_eval.store.load_answers`
  assist/<run>/assist.json     fixed / introduced / net gain of the generator assist, with a tau sweep
  bound/<subset>/summary.json  the pixel bounds, with heatmap.png beside it
A damaged artefact (unreadable JSON, wrong shapes) is skipped and named in `Workspace.problems`, so one bad
file costs its own row, never the whole report.

Model errors are recounted from each run's test probabilities against the MNIST test labels (never taken
on trust from meta.json); the labels are passed in, so tests can fabricate them.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.config import saved_config
from benchmark.ensemble import error_overlap
from benchmark.errors import BenchError
from benchmark.hardset import load_hardset
from benchmark.runs import Run, load_run, run_names
from human_eval.store import load_answers

ANSWERS_DB = Path("human") / "annotations.sqlite"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class HardSet:
    name: str
    items: pd.DataFrame  # items.csv: test_index, label, <run>_pred, <run>_top3
    images: np.ndarray  # uint8 (n, 28, 28), row i is items row i
    meta: dict  # hardset.json


@dataclass
class Bound:
    summary: dict  # summary.json
    heatmap_png: bytes | None  # heatmap.png beside it, if present and a PNG


@dataclass
class Workspace:
    root: Path
    test_labels: np.ndarray | None  # (10000,) int64; may be None only when `needs_test_labels` is False
    runs: list[Run] = field(default_factory=list)
    hardsets: list[HardSet] = field(default_factory=list)
    answers: pd.DataFrame | None = None  # load_answers(); None when no annotation database exists
    assist: list[dict] = field(default_factory=list)  # assist.json contents
    bounds: list[Bound] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # damaged artefacts that were skipped


def needs_test_labels(root: Path) -> bool:
    """Whether anything in the workspace is scored against the MNIST test labels (runs, control items)."""
    return bool(run_names(root)) or (root / ANSWERS_DB).is_file()


def read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({exc}); skipped")
        return None


def collect(root: Path, test_labels: np.ndarray | None) -> Workspace:
    """Everything the report shows from workspace `root`; `test_labels` (10000,) as in load_mnist."""
    if test_labels is None and needs_test_labels(root):
        raise ValueError(f"{root} holds runs or human answers: pass the MNIST test labels to score them")
    ws = Workspace(root, test_labels)
    for name in run_names(root):
        try:
            run = load_run(root, name)
        except BenchError as exc:
            ws.problems.append(str(exc))
            continue
        if len(run.test_probs) != len(test_labels):
            ws.problems.append(f"run {name!r}: {len(run.test_probs)} test predictions, expected "
                               f"{len(test_labels)}; skipped")
            continue
        ws.runs.append(run)

    hardsets = root / "hardsets"
    for folder in sorted(hardsets.glob("[!.]*")) if hardsets.is_dir() else []:
        try:
            items, images, meta = load_hardset(root, folder.name)
        except (BenchError, OSError, ValueError) as exc:
            ws.problems.append(f"hard set {folder.name!r}: {exc}; skipped")
            continue
        if len(images) != len(items):
            ws.problems.append(f"hard set {folder.name!r}: {len(images)} images for {len(items)} items; skipped")
            continue
        ws.hardsets.append(HardSet(folder.name, items, images, meta))

    if (root / ANSWERS_DB).exists():
        try:
            ws.answers = load_answers(root / ANSWERS_DB)
        except (BenchError, sqlite3.Error, pd.errors.DatabaseError) as exc:
            ws.problems.append(f"{ANSWERS_DB}: not a readable annotation store ({exc}); human answers skipped")

    for path in sorted((root / "assist").glob("*/assist.json")):
        if (result := read_json(path, ws.problems)) is not None:
            ws.assist.append(result)

    for path in sorted((root / "bound").glob("*/summary.json")):
        if (summary := read_json(path, ws.problems)) is None:
            continue
        heatmap = path.with_name("heatmap.png")
        png = heatmap.read_bytes() if heatmap.is_file() else None
        ws.bounds.append(Bound(summary, png if png and png.startswith(PNG_SIGNATURE) else None))
    return ws


def runs_table(ws: Workspace) -> pd.DataFrame:
    """One row per run: identity, size, cost and errors (test errors recounted from the probabilities).

    `group` names runs that differ only in their seed (same model, same config): "<model>" when the model
    has one configuration in the workspace, else "<model> (key=value, ...)" with the keys that differ. A run
    saved before a training option existed has that option's default.
    """
    rows = []
    for run in ws.runs:
        meta = run.meta
        config = meta.get("config") or {}
        if "history" in meta:  # trained by `bench train`: options added since count as their defaults
            config = saved_config(config)
        config = {k: v for k, v in config.items() if k != "seed"}
        rows.append({
            "run": run.name, "model": meta.get("model", "?"), "seed": meta.get("seed"),
            "config_key": json.dumps(config, sort_keys=True, default=str), "config": config,
            "parameters": meta.get("parameters"), "train_seconds": meta.get("train_seconds"),
            "machine": meta.get("machine"), "date": meta.get("date"),
            "val_errors": meta.get("val_errors"), "val_size": meta.get("val_size"),
            "test_errors": int((run.test_predictions != ws.test_labels).sum()), "test_size": len(run.test_probs),
            "members": " + ".join(meta.get("members") or []),
        })
    table = pd.DataFrame(rows, columns=["run", "model", "seed", "config_key", "config", "parameters",
                                        "train_seconds", "machine", "date", "val_errors", "val_size",
                                        "test_errors", "test_size", "members"])
    table["test_accuracy"] = 1 - table["test_errors"] / table["test_size"]
    table["group"] = table["model"]
    for model, same_model in table.groupby("model"):
        configs = same_model.drop_duplicates("config_key")["config"].tolist()
        differing = sorted(k for k in set().union(*configs)
                           if len({json.dumps(c.get(k), default=str) for c in configs}) > 1)
        if not differing:
            continue
        for index, row in same_model.iterrows():
            table.loc[index, "group"] = f"{model} (" + ", ".join(f"{k}={row['config'].get(k)}" for k in differing) + ")"
    return table.drop(columns=["config_key", "config"])


def ensembles_table(ws: Workspace) -> pd.DataFrame:
    """One row per ensemble run: its test errors against the bounds its members set on any average of them.

    Recounted from the members' saved test probabilities (`benchmark.ensemble.error_overlap`): the members' mean,
    best and worst test errors; images wrong for every member, wrong for every member with the same answer (no
    average of them fixes these) and wrong for at least one (no average of them errs elsewhere). An ensemble
    whose members are not all in the workspace gets its own count and the names of the missing members only.
    """
    columns = ["run", "members", "test_errors", "members_mean_test_errors", "best_member_test_errors",
               "worst_member_test_errors", "wrong_for_all_members", "same_wrong_answer_for_all_members",
               "wrong_for_some_member", "missing_members"]
    by_name = {run.name: run for run in ws.runs}
    rows = []
    for run in ws.runs:
        if run.meta.get("model") != "ensemble":
            continue
        names = list(run.meta.get("members") or [])
        row = {"run": run.name, "members": len(names),
               "test_errors": int((run.test_predictions != ws.test_labels).sum()),
               "missing_members": " ".join(n for n in names if n not in by_name)}
        if names and not row["missing_members"]:
            overlap = error_overlap(np.array([by_name[n].test_predictions for n in names]), ws.test_labels)
            spread = overlap.pop("member_spread")
            row |= overlap | {"members_mean_test_errors": spread["mean"], "best_member_test_errors": spread["min"],
                              "worst_member_test_errors": spread["max"]}
        rows.append(row)
    counts = [c for c in columns if c not in ("run", "missing_members", "members_mean_test_errors")]
    return pd.DataFrame(rows, columns=columns).astype({c: "Int64" for c in counts})  # counts stay whole (2, not 2.0) beside blanks


def seed_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """Per group of seeds: how many runs, mean and sample standard deviation (ddof=1) of test errors, range."""
    grouped = runs.groupby("group", sort=True)["test_errors"]
    table = grouped.agg(runs="count", mean_test_errors="mean", std_test_errors="std",
                        min_test_errors="min", max_test_errors="max").reset_index()
    return table.sort_values("mean_test_errors", kind="stable").reset_index(drop=True)


def assist_tables(ws: Workspace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per assisted classifier, the tau sweep in long form: run, tau, consulted, fixed, ...)."""
    summary_columns = ["run", "errors_before", "consulted", "fixed", "introduced", "net_gain", "errors_after"]
    summary = pd.DataFrame([{k: a.get(k) for k in summary_columns}
                            | {"generator_alone_test_errors": (a.get("generator_alone") or {}).get("test_errors")}
                            for a in ws.assist], columns=summary_columns + ["generator_alone_test_errors"])
    sweep = pd.DataFrame([{"run": a.get("run")} | point for a in ws.assist for point in a.get("tau_sweep") or []],
                         columns=["run", "tau", "consulted", "fixed", "introduced", "net_gain"])
    return summary, sweep


def bounds_table(ws: Workspace) -> pd.DataFrame:
    """One row per subset: best single pixel, best pair, adaptive pair, as correct counts and accuracies.

    Pixels are flat indices into the 28 x 28 image (row = p // 28, column = p % 28).
    """
    def accuracy(part: dict) -> float:
        return part["correct"] / s["total"] if "correct" in part and s.get("total") else np.nan

    rows = []
    for bound in ws.bounds:
        s = bound.summary
        single, pair, adaptive = s.get("best_single") or {}, s.get("best_pair") or {}, s.get("adaptive") or {}
        rows.append({
            "subset": s.get("subset"), "total": s.get("total"),
            "single_pixel": single.get("pixel"), "single_correct": single.get("correct"),
            "single_accuracy": accuracy(single),
            "pair_pixels": " ".join(str(p) for p in pair.get("pixels") or []),
            "pair_correct": pair.get("correct"), "pair_accuracy": accuracy(pair),
            "adaptive_first_pixel": adaptive.get("first_pixel"), "adaptive_correct": adaptive.get("correct"),
            "adaptive_accuracy": accuracy(adaptive), "seconds": s.get("seconds"),
        })
    return pd.DataFrame(rows, columns=["subset", "total", "single_pixel", "single_correct", "single_accuracy",
                                       "pair_pixels", "pair_correct", "pair_accuracy", "adaptive_first_pixel",
                                       "adaptive_correct", "adaptive_accuracy", "seconds"])


def flat_numbers(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested dict of figures flattened to {"a.b.c": value}, for free-form parts such as `heldout`."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_numbers(value, name + ".")
        else:
            flat[name] = value if not isinstance(value, list) else " ".join(map(str, value))
    return flat

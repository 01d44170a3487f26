"""Generator assist: the doubt rule, exact accounting, validation-only selection, outputs and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from benchmark.assist import Setting, Split, accounting, assist, candidates, choose_setting, doubtful, setting_grid
from benchmark.cli import app
from benchmark.runs import load_run, save_run
from conftest import assert_one_line_error, fabricated_probs
from models import create_model


def probs_table(rows: list[dict[int, float]]) -> np.ndarray:
    """One probability row per dict {class: p}; the remaining mass is spread evenly over the other classes."""
    probs = np.zeros((len(rows), 10))
    for i, row in enumerate(rows):
        rest = [c for c in range(10) if c not in row]
        probs[i, rest] = (1 - sum(row.values())) / len(rest)
        probs[i, list(row)] = list(row.values())
    return probs


# Seven images built so that every outcome is known by hand. scores follow candidates(probs): top 3 in order.
CASES = [  # (label, probabilities, scores of the top-3 candidates, what happens if consulted)
    (3, {3: 0.50, 5: 0.40}, [0, 1, 0]),         # 0: right, the generator prefers 5 -> introduced
    (5, {3: 0.50, 5: 0.45}, [0, 1, 0]),         # 1: wrong, the generator prefers the label 5 -> fixed
    (7, {7: 0.99}, [0, 1, 1]),                  # 2: right and confident -> only consulted at tau = 1
    (1, {2: 0.55, 1: 0.30}, [1, 0, 0]),         # 3: wrong, the generator agrees with the mistake -> stays wrong
    (4, {9: 0.50, 7: 0.30, 4: 0.15}, [0, 0, 1]),  # 4: wrong, label third -> fixed only with k = 3
    (0, {0: 0.92, 6: 0.07}, [0, 1, 0]),         # 5: right, top 0.92, margin 0.85 -> introduced at tau = 1
    (8, {8: 0.60, 3: 0.38}, [0, 1, 0]),         # 6: right, margin 0.22 -> introduced when consulted
]
LABELS = np.array([c[0] for c in CASES])
PROBS = probs_table([c[1] for c in CASES])
SCORES = np.array([c[2] for c in CASES], dtype=float)


def test_candidates_and_doubt_rule():
    assert candidates(PROBS)[4].tolist() == [9, 7, 4]
    assert candidates(PROBS)[2].tolist() == [7, 0, 1]  # ties among the rest: lower class first, like argmax
    assert (candidates(PROBS, 1)[:, 0] == PROBS.argmax(1)).all()
    assert doubtful(PROBS, 0.9, 0.0).tolist() == [True, True, False, True, True, False, True]
    assert doubtful(PROBS, 0.0, 0.21).tolist() == [True, True, False, False, True, False, False]


@pytest.mark.parametrize("setting, expected", [  # (consulted, errors_before, fixed, introduced, net, errors_after)
    (Setting(0.9, 0.0, 2, 100.0), (5, 3, 1, 2, -1, 4)),  # images 0 1 3 4 6; fixes 1; breaks 0 and 6
    (Setting(0.9, 0.0, 3, 100.0), (5, 3, 2, 2, 0, 3)),  # k = 3 also fixes 4
    (Setting(0.0, 0.21, 3, 100.0), (3, 3, 2, 1, 1, 2)),  # the margin alone: images 0 1 4
    (Setting(1.0, 0.0, 2, 100.0), (7, 3, 1, 4, -3, 6)),  # everything: 2 and 5 break too
    (Setting(1.0, 0.0, 3, 0.0), (7, 3, 0, 0, 0, 3)),  # lambda 0: the classifier decides alone
])
def test_accounting_is_exact_on_hand_made_cases(setting, expected):
    keys = ("consulted", "errors_before", "fixed", "introduced", "net_gain", "errors_after")
    assert accounting(PROBS, SCORES, LABELS, setting) == dict(zip(keys, expected))


def test_lambda_trades_log_probability_against_generator_score():
    probs, labels = PROBS[[1]], LABELS[[1]]  # 3: 0.50 vs 5: 0.45, log ratio 0.105
    scores = np.array([[0.0, 0.1, 0.0]])  # the generator prefers 5 by 0.1
    assert accounting(probs, scores, labels, Setting(1.0, 0.0, 2, 1.0))["fixed"] == 0  # 0.10 < 0.105
    assert accounting(probs, scores, labels, Setting(1.0, 0.0, 2, 1.1))["fixed"] == 1  # 0.11 > 0.105


def test_missing_scores_for_a_consulted_image_are_an_error():
    scores = SCORES.copy()
    scores[1] = np.nan
    with pytest.raises(ValueError, match="missing"):
        accounting(PROBS, scores, LABELS, Setting(0.9, 0.0, 2, 1.0))
    # tau 0 and no margin consult no image, so image 1's missing scores are never read
    assert accounting(PROBS, scores, LABELS, Setting(0.0, 0.0, 2, 1.0)) == {
        "consulted": 0, "errors_before": 3, "fixed": 0, "introduced": 0, "net_gain": 0, "errors_after": 3}


def fabricated_split(n: int, seed: int, oracle: bool = True) -> Split:
    """Random classifier probabilities with ~15% errors, labels, and images carrying their own label.

    image[0, 0] is the label and image[0, 1] says whether `scorer` should favour it (oracle) or any other class.
    """
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(10, 0.15), size=n)
    labels = probs.argmax(1)
    flip = rng.random(n) < 0.15
    labels[flip] = candidates(probs[flip], 3)[np.arange(flip.sum()), rng.integers(1, 3, flip.sum())]
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = labels, oracle
    return Split(probs, labels, images)


def scorer(images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """1 for the true class under an oracle image, 1 for every other class under an anti-oracle one."""
    is_label = classes == images[:, 0, 0]
    return np.where(images[:, 0, 1] == 1, is_label, ~is_label).astype(float)


def scorer_scores(split: Split) -> np.ndarray:
    """`scorer` applied to the top-3 candidates of every image of `split`: (N, 3)."""
    top = candidates(split.probs)
    return scorer(np.repeat(split.images, 3, 0), top.reshape(-1)).reshape(-1, 3)


def test_choice_reaches_the_best_validation_gain():
    val = fabricated_split(3000, 0)
    top = candidates(val.probs)
    setting, counts = choose_setting(val.probs, scorer_scores(val), val.labels)
    # The oracle can at best fix every error whose label is among the top 3 of an image doubtful under the loosest
    # grid point (largest tau and delta), introducing nothing; the chosen setting must reach exactly that.
    taus, deltas = setting_grid(val.probs)
    in_top3_but_wrong = (top == val.labels[:, None]).any(1) & (top[:, 0] != val.labels)
    fixable = doubtful(val.probs, taus.max(), deltas.max()) & in_top3_but_wrong
    assert counts["net_gain"] == fixable.sum() > 0 and counts["introduced"] == 0
    assert setting.k == 3  # some fixable labels are third


def test_selection_never_looks_at_the_test_split():
    val = fabricated_split(3000, 1)
    helpful, harmful = fabricated_split(2000, 2), fabricated_split(2000, 3, oracle=False)
    first, table = assist(val, helpful, scorer, show_progress=False)
    second, _ = assist(val, harmful, scorer, show_progress=False)
    assert first["chosen"] == second["chosen"]  # a harmful test split would pull the choice if it were consulted
    assert first["net_gain"] > 0 > second["net_gain"]  # ... and it was evaluated: the outcomes differ

    chosen = Setting(**{("lam" if k == "lambda" else k): v for k, v in first["chosen"].items()})
    counts = accounting(helpful.probs, scorer_scores(helpful), helpful.labels, chosen)
    assert {key: first[key] for key in counts} == counts
    assert len(table) == first["consulted"]
    assert ((table["before"] != table["label"]) & (table["after"] == table["label"])).sum() == first["fixed"]
    swept = {row["tau"]: row for row in first["tau_sweep"]}
    assert swept[chosen.tau]["net_gain"] == first["net_gain"]
    assert [row["consulted"] for row in first["tau_sweep"]] == sorted(row["consulted"] for row in first["tau_sweep"])


@pytest.fixture
def assist_workspace(tmp_path, mnist):
    """A classifier run with fabricated probabilities and a tiny untrained generator run."""
    _, val_idx = mnist.validation_split()
    rng = np.random.default_rng(0)
    test_wrong, val_wrong = rng.choice(10000, 300, replace=False), rng.choice(5000, 150, replace=False)
    save_run(tmp_path, "clf", {"name": "clf", "model": "mlp", "config": {}},
             fabricated_probs(mnist.test_labels, test_wrong),
             fabricated_probs(mnist.train_labels[val_idx], val_wrong, 1))
    torch.manual_seed(0)
    kwargs = {"embed_dim": 16, "hidden": 32, "style_dim": 2}
    save_run(tmp_path, "gen", {"name": "gen", "model": "generator", "config": {"model_kwargs": kwargs}},
             fabricated_probs(mnist.test_labels, test_wrong[:40]),
             state_dict=create_model("generator", **kwargs).state_dict())
    return tmp_path


def test_cli_assist_end_to_end(assist_workspace, mnist_dir, mnist):
    ws = assist_workspace
    result = CliRunner().invoke(app, ["assist", "--run", "clf", "--generator", "gen", "--steps", "1", "--device", "cpu",
                                      "--workspace", str(ws), "--data-dir", str(mnist_dir)])
    assert result.exit_code == 0, result.output
    summary = json.loads((ws / "assist" / "clf" / "assist.json").read_text())
    assert list(summary) == ["run", "generator_run", "chosen", "consulted", "errors_before", "fixed", "introduced",
                             "net_gain", "errors_after", "tau_sweep", "generator_alone", "seconds"]
    assert set(summary["chosen"]) == {"tau", "delta", "k", "lambda"}
    assert summary["errors_before"] == 300 and summary["generator_alone"] == {"test_errors": 40, "test_size": 10000}
    table = pd.read_csv(ws / "assist" / "clf" / "assist.csv")
    assert list(table.columns) == ["test_index", "label", "before", "after", "candidates", "scores"]
    # the table holds exactly the images doubtful under the chosen setting, and the counts follow from it
    probs, chosen = load_run(ws, "clf").test_probs, summary["chosen"]
    consulted = np.flatnonzero(doubtful(probs, chosen["tau"], chosen["delta"]))
    assert table["test_index"].tolist() == consulted.tolist() and summary["consulted"] == len(consulted) > 0
    assert (table["before"] == probs[consulted].argmax(1)).all()
    true = mnist.test_labels[consulted]
    assert (table["label"] == true).all()
    assert summary["fixed"] == int(((table["before"] != true) & (table["after"] == true)).sum())
    assert summary["introduced"] == int(((table["before"] == true) & (table["after"] != true)).sum())
    assert summary["errors_after"] == 300 - summary["fixed"] + summary["introduced"]
    assert "net gain" in result.output


def test_cli_assist_errors_are_one_line(assist_workspace, mnist_dir):
    refit = load_run(assist_workspace, "clf")  # as an --all-train run: no validation split to choose on
    save_run(assist_workspace, "clf-all", refit.meta, refit.test_probs)
    for args, message in ((["--run", "clf"], "run 'generator-s0' not found"),
                          (["--run", "clf", "--generator", "clf"], "not a generator"),
                          (["--run", "nope", "--generator", "gen"], "run 'nope' not found"),
                          (["--run", "clf-all", "--generator", "gen"], "has no validation probabilities")):
        result = CliRunner().invoke(app, ["assist", *args, "--workspace", str(assist_workspace),
                                          "--data-dir", str(mnist_dir)])
        assert_one_line_error(result, message)

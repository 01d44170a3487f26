"""`bench report`: numbers from a fabricated workspace, an empty workspace, escaping, and a headless browser.

The workspace is fabricated with known errors, human answers (through the real AnnotationStore), a bound
summary and an assist result; test labels are random and injected (`build_report(test_labels=...)`), so
no MNIST files are needed. Expectations are recomputed here from the fabricated inputs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.hardset import write_hardset
from benchmark.runs import load_run, save_run
from conftest import fabricated_probs
from human_eval.store import AnnotationStore
from reports.build import COMMANDS, build_report, markdown_escape
from reports.human import fleiss_kappa

EVIL = "<script>alert('x')</script>"
HARDSET = "hs<b>"  # a hard-set name with markup in it: escaped in the page, sanitised in file names
ANNOTATORS = ["alice", f"{EVIL}$x^$bob", "carol"]  # $..$ would be mathtext (an error) in a figure
N_TEST = 10000

# name: (model, seed, config, number of test errors, validation errors). cnn-s0 is best on validation,
# mlp-s1 on the test set: the headline must name cnn-s0 (the test set chooses nothing).
RUNS = {
    "mlp-s0": ("mlp", 0, {"epochs": 2}, 40, 50),
    "mlp-s1": ("mlp", 1, {"epochs": 2}, 15, 60),
    "cnn-s0": ("cnn", 0, {"epochs": 3}, 25, 20),
    "glimpse-s0": ("glimpse", 0, {"model_kwargs": {"glimpses": 5}}, 300, 400),
}
MISCOUNTED = "cnn-s0"  # its meta.json claims no test errors: the report must recount them from the probabilities
STEP_ACCURACY = [0.30, 0.45, 0.80, 0.95, 0.97]
STEP_ACCURACY_ROUNDED = [0.29, 0.44, 0.79, 0.95, 0.96]
BOUND = {"subset": "all", "total": 70000, "best_pair": {"pixels": [350, 489], "correct": 34711},
         "best_single": {"pixel": 378, "correct": 20017}, "adaptive": {"first_pixel": 378, "correct": 40123},
         "heldout": {"pair": {"fit_correct": 30000, "test_correct": 4711}}, "seconds": 12.5}
ASSIST = {"run": "cnn-s0", "consulted": 100, "errors_before": 25, "fixed": 8, "introduced": 3, "net_gain": 5,
          "errors_after": 20, "generator_alone": {"test_errors": 120},
          "tau_sweep": [{"tau": t, "consulted": c, "fixed": f, "introduced": i, "net_gain": f - i}
                        for t, c, f, i in [(0.5, 40, 5, 1), (0.7, 100, 8, 3), (0.9, 300, 9, 12)]]}


def human_answer(position: int, annotator: str, label: int) -> tuple[int | None, int | None]:
    """(quick, considered) answers of an annotator for the hard-set item at `position` (None = cannot tell,
    considered None when not given). Built to contain errors, fixes, cannot-tell, disagreements and ties."""
    if annotator == "alice":
        if position % 7 == 0:
            return (label + 2) % 10, label  # wrong at first, right after thinking
        return (None if position % 11 == 0 else label), None
    if annotator == "carol" and position % 4 == 0:
        return None, None  # where the other two disagree, a tie: no majority
    if position % 5 == 0:
        return (label + 3) % 10, None  # two agree on another digit: a suspected label error
    return label, None


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    """(workspace, test labels, hard-set items, answers as a list of dicts) with the report built in ws/report."""
    ws = tmp_path_factory.mktemp("ws")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, N_TEST)
    wrong = {}
    for name, (model, seed, config, n_wrong, val_errors) in RUNS.items():
        wrong[name] = rng.choice(N_TEST, n_wrong, replace=False)
        meta = {"name": name, "model": model, "seed": seed, "config": config, "parameters": 1000 + seed,
                "machine": "test machine", "date": "2026-01-01", "train_seconds": 1.5,
                "val_errors": val_errors, "val_size": 5000, "test_errors": 0 if name == MISCOUNTED else n_wrong,
                "test_size": N_TEST}
        if model == "glimpse":
            meta["step_accuracy"] = STEP_ACCURACY
            meta["step_accuracy_rounded"] = STEP_ACCURACY_ROUNDED
        save_run(ws, name, meta, fabricated_probs(labels, wrong[name], rng))
    images = rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8)
    _, items = write_hardset(ws, HARDSET, [load_run(ws, "mlp-s0"), load_run(ws, "cnn-s0")], "union",
                             images, labels)

    answers = []
    with AnnotationStore(ws / "human" / "annotations.sqlite") as store:
        for annotator in ANNOTATORS:
            for position, (test_index, label) in enumerate(zip(items["test_index"], items["label"])):
                quick, considered = human_answer(position, annotator, int(label))
                seconds = 1.0 + position % 3
                reason = f"{EVIL} looks odd" if position == 1 else ""
                for phase, answer in (("quick", quick), ("considered", considered)):
                    if phase == "considered" and considered is None:
                        continue
                    store.add_answer(HARDSET, int(test_index), annotator, phase, answer, reason,
                                     shown_at=100.0, answered_at=100.0 + seconds, is_control=False)
                    answers.append({"annotator": annotator, "phase": phase, "test_index": int(test_index),
                                    "answer": answer, "label": int(label), "seconds": seconds})
            outside = np.setdiff1d(np.arange(N_TEST), items["test_index"])[:4]
            for k, test_index in enumerate(outside):  # controls: carol gets the last one wrong
                answer = int(labels[test_index]) if annotator != "carol" or k < 3 else int(labels[test_index] + 1) % 10
                store.add_answer(HARDSET, int(test_index), annotator, "quick", answer, "", shown_at=0.0,
                                 answered_at=1.0, is_control=True)

    bound = ws / "bound" / "all"
    bound.mkdir(parents=True)
    (bound / "summary.json").write_text(json.dumps(BOUND))
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(bound / "heatmap.png")
    (ws / "assist" / "cnn-s0").mkdir(parents=True)
    (ws / "assist" / "cnn-s0" / "assist.json").write_text(json.dumps(ASSIST))

    html_path = build_report(ws, test_labels=labels)
    return ws, labels, wrong, items, pd.DataFrame(answers), html_path


def final_answers(answers: pd.DataFrame) -> dict[tuple[str, int], int | None]:
    """{(annotator, test_index): considered answer if given, else quick}."""
    final = {}
    for row in answers.itertuples():
        if row.phase == "considered" or (row.annotator, row.test_index) not in final:
            final[row.annotator, row.test_index] = None if pd.isna(row.answer) else int(row.answer)
    return final


def majority(votes: list[int | None]) -> int | None:
    counts = Counter(v for v in votes if v is not None).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def test_models_table_and_seed_groups(fabricated):
    ws, labels, wrong, *_ = fabricated
    models = pd.read_csv(ws / "report" / "models.csv").set_index("run")
    assert load_run(ws, MISCOUNTED).meta["test_errors"] == 0  # what the table must not copy
    for name, (_, _, _, n_wrong, val_errors) in RUNS.items():
        assert models.loc[name, "test_errors"] == len(set(wrong[name])) == n_wrong
        assert models.loc[name, "test_accuracy"] == pytest.approx(1 - n_wrong / N_TEST)
        assert models.loc[name, "val_errors"] == val_errors
    groups = pd.read_csv(ws / "report" / "model_groups.csv").set_index("group")
    mlp = [RUNS["mlp-s0"][3], RUNS["mlp-s1"][3]]
    assert groups.loc["mlp", "runs"] == 2
    assert groups.loc["mlp", "mean_test_errors"] == pytest.approx(np.mean(mlp))
    assert groups.loc["mlp", "std_test_errors"] == pytest.approx(np.std(mlp, ddof=1))
    assert groups.loc["cnn", "runs"] == 1


def test_runs_saved_before_a_training_option_existed_group_with_runs_at_its_default(tmp_path):
    """A run trained before `all_train` existed has no such key in meta.json: it is the same recipe as a newer
    run with all_train false, and a different one from a newer run with all_train true."""
    from dataclasses import asdict

    from benchmark.config import TrainConfig
    from reports.collect import collect, runs_table

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, N_TEST)
    old = {k: v for k, v in asdict(TrainConfig(epochs=2)).items() if k != "all_train"}
    configs = {"cnn-s0": old, "cnn-s1": asdict(TrainConfig(epochs=2)), "cnn-all-s0": asdict(TrainConfig(epochs=2,
                                                                                                     all_train=True))}
    for seed, (name, config) in enumerate(configs.items()):
        meta = {"name": name, "model": "cnn", "seed": seed, "config": config, "history": [{"epoch": 1}]}
        save_run(tmp_path, name, meta, fabricated_probs(labels, rng.choice(N_TEST, 5 + seed, replace=False), rng))
    groups = runs_table(collect(tmp_path, labels)).set_index("run")["group"]
    assert groups["cnn-s0"] == groups["cnn-s1"] == "cnn (all_train=False)"
    assert groups["cnn-all-s0"] == "cnn (all_train=True)"


def test_ensembles_table_recounts_the_bounds_from_the_members(tmp_path):
    from benchmark.ensemble import build_ensemble

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, N_TEST)
    wrong = {"a": [0, 1, 2, 3], "b": [0, 1, 5], "c": [0, 7], "d": [9]}  # image 0 wrong for a, b, c (label + 1)
    for name, indices in wrong.items():
        save_run(tmp_path, name, {"name": name, "model": "mlp"}, fabricated_probs(labels, np.array(indices), rng))
    build_ensemble(tmp_path, "ens-abc", [load_run(tmp_path, n) for n in "abc"], labels)
    build_ensemble(tmp_path, "ens-ad", [load_run(tmp_path, n) for n in "ad"], labels)
    shutil.rmtree(tmp_path / "runs" / "d")  # ens-ad loses a member: no bounds for it, the member is named
    build_report(tmp_path, test_labels=labels)
    table = pd.read_csv(tmp_path / "report" / "ensembles.csv").set_index("run")
    abc = table.loc["ens-abc"]
    assert (abc["members"], abc["test_errors"]) == (3, 2)  # 0, 1: wrong for two of three
    assert (abc["best_member_test_errors"], abc["worst_member_test_errors"]) == (2, 4)
    assert abc["members_mean_test_errors"] == pytest.approx(3)
    assert (abc["wrong_for_all_members"], abc["same_wrong_answer_for_all_members"], abc["wrong_for_some_member"]) \
        == (1, 1, 6)  # 0; 0; 0, 1, 2, 3, 5, 7
    ad = table.loc["ens-ad"]
    assert ad["missing_members"] == "d" and pd.isna(ad["wrong_for_all_members"]) and ad["test_errors"] >= 1
    assert pd.isna(abc["missing_members"])


def test_confusion_matrix_counts(fabricated):
    ws, labels, wrong, *_ = fabricated
    confusion = pd.read_csv(ws / "report" / "confusion_test.csv")
    cnn = confusion[confusion["run"] == "cnn-s0"]
    assert cnn["count"].sum() == N_TEST
    off_diagonal = cnn[cnn["label"] != cnn["answer"]]
    assert off_diagonal["count"].sum() == RUNS["cnn-s0"][3]
    # every error of the fabricated probabilities is label -> label + 1
    moved = Counter(int(labels[i]) for i in wrong["cnn-s0"])
    for label, count in moved.items():
        cell = off_diagonal[(off_diagonal["label"] == label) & (off_diagonal["answer"] == (label + 1) % 10)]
        assert int(cell["count"].iloc[0]) == count


def test_human_errors_majority_and_headline(fabricated):
    ws, labels, wrong, items, answers, html_path = fabricated
    report = ws / "report"
    errors = pd.read_csv(report / "human_errors.csv")
    for annotator in ANNOTATORS:
        quick = answers[(answers["annotator"] == annotator) & (answers["phase"] == "quick")]
        committed = quick.dropna(subset=["answer"])
        row = errors[(errors["who"] == annotator) & (errors["kind"] == "quick")].iloc[0]
        assert row["images"] == len(quick)
        assert row["wrong"] == int((committed["answer"].astype(int) != committed["label"]).sum())
        assert row["undecided"] == int(quick["answer"].isna().sum())
        assert row["median_seconds"] == pytest.approx(quick["seconds"].median())
    alice = errors[(errors["who"] == "alice")].set_index("kind")
    assert alice.loc["quick", "wrong"] > 0 and alice.loc["considered", "wrong"] == 0

    final = final_answers(answers)
    label_of = dict(zip(items["test_index"], items["label"]))
    voted = {t: majority([final.get((a, t)) for a in ANNOTATORS]) for t in items["test_index"]}
    suspected = {t for t, m in voted.items() if m is not None and m != label_of[t]}
    undecided = sum(m is None for m in voted.values())
    assert suspected and undecided  # the fabrication exercises both
    row = errors[errors["kind"] == "majority"].iloc[0]
    assert (row["wrong"], row["undecided"], row["images"]) == (len(suspected), undecided, len(items))
    cnn_row = errors[errors["who"] == "cnn-s0"].iloc[0]
    assert cnn_row["wrong"] == len(set(wrong["cnn-s0"]))  # every cnn error is in the union hard set

    gallery = pd.read_csv(next(report.glob("gallery_hs*.csv")))
    assert len(gallery) == len(items)
    assert set(gallery.loc[gallery["suspected label error"], "test_index"]) == suspected
    assert gallery["suspected label error"].iloc[: len(suspected)].all()  # listed first

    page = html_path.read_text()
    headline = re.search(r'<p class="headline">(.*?)</p>', page).group(1)
    assert "cnn-s0" in headline and "mlp-s1" not in headline  # chosen on validation, not test
    assert f"{RUNS['cnn-s0'][3]} errors on all 10,000 test images" in headline
    assert f"On the {len(items)} images of hard set hs&lt;b&gt; that humans labelled, cnn-s0 makes " \
           f"{RUNS['cnn-s0'][3]} errors and the human majority makes {len(suspected)} errors" in headline
    assert f"no majority on {undecided}" in headline


def test_controls_agreement_and_kappa(fabricated):
    ws, labels, wrong, items, answers, _ = fabricated
    controls = pd.read_csv(ws / "report" / "controls.csv").set_index("annotator")
    assert controls.loc["alice", "accuracy"] == 1.0
    assert (controls.loc["carol", "correct"], controls.loc["carol", "controls"]) == (3, 4)

    code = {key: 10 if answer is None else answer for key, answer in final_answers(answers).items()}  # 10: cannot tell
    a, c = (np.array([code[who, t] for t in items["test_index"]]) for who in ("alice", "carol"))
    observed = np.mean(a == c)
    chance = sum(np.mean(a == k) * np.mean(c == k) for k in range(11))
    pairs = pd.read_csv(ws / "report" / "agreement_pairs.csv")
    pair = pairs[(pairs["annotator_a"] == "alice") & (pairs["annotator_b"] == "carol")].iloc[0]
    assert pair["shared"] == len(items)
    assert pair["agreement"] == pytest.approx(observed)
    assert pair["cohen_kappa"] == pytest.approx((observed - chance) / (1 - chance))
    fleiss = pd.read_csv(ws / "report" / "agreement_all.csv").iloc[0]
    assert (fleiss["annotators"], fleiss["images"]) == (3, len(items))
    # every annotator answered every item: the (items, 11 categories) table of how many chose each
    counts = np.array([np.bincount([code[who, t] for who in ANNOTATORS], minlength=11) for t in items["test_index"]])
    assert fleiss["fleiss_kappa"] == pytest.approx(fleiss_kappa(counts))


def test_fleiss_kappa_matches_the_published_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories, kappa = 0.210
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(np.array(counts)) == pytest.approx(0.210, abs=5e-4)
    assert fleiss_kappa(np.array([[3, 0], [0, 3]])) == pytest.approx(1.0)
    assert np.isnan(fleiss_kappa(np.zeros((0, 11))))


def test_assist_and_bounds(fabricated):
    ws, *_ , html_path = fabricated
    report = ws / "report"
    assist = pd.read_csv(report / "assist.csv").iloc[0]
    assert (assist["fixed"], assist["introduced"], assist["net_gain"]) == (8, 3, 5)
    assert assist["generator_alone_test_errors"] == 120
    sweep = pd.read_csv(report / "assist_tau_sweep.csv")
    assert sweep["net_gain"].tolist() == [p["fixed"] - p["introduced"] for p in ASSIST["tau_sweep"]]
    bounds = pd.read_csv(report / "bounds.csv").iloc[0]
    assert bounds["pair_correct"] == 34711
    assert bounds["pair_accuracy"] == pytest.approx(34711 / 70000)
    assert bounds["adaptive_accuracy"] == pytest.approx(40123 / 70000)
    assert bounds["single_accuracy"] == pytest.approx(20017 / 70000)
    heldout = pd.read_csv(report / "bounds_heldout.csv")
    assert heldout.set_index("figure").loc["pair.test_correct", "value"] == 4711
    steps = pd.read_csv(report / "glimpse_steps.csv")
    assert steps["run"].tolist() == ["glimpse-s0"] * 5 + ["glimpse-s0 (rounded)"] * 5
    assert steps["accuracy"].tolist() == STEP_ACCURACY + STEP_ACCURACY_ROUNDED
    assert steps["step"].tolist() == [1, 2, 3, 4, 5] * 2
    page = html_path.read_text()
    assert "Not run yet" not in page  # every part has its artefacts
    for figure in ("confusion_test", "test_errors_by_model", "assist_tau_sweep", "glimpse_steps", "heatmap_all"):
        assert (report / "figures" / f"{figure}.png").read_bytes().startswith(b"\x89PNG")


def test_workspace_strings_are_escaped(fabricated):
    ws, *_, html_path = fabricated
    page = html_path.read_text()
    markdown = (ws / "report" / "report.md").read_text()
    assert "<script" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;$x^$bob" in page  # annotator name, as text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; looks odd" in page  # reason
    assert "hs&lt;b&gt;" in page  # hard-set name
    assert "<script" not in markdown.lower() and "<b>" not in markdown
    assert "&lt;script&gt;" in markdown
    assert markdown_escape("a|b *c* [d](e) <f>") == r"a\|b \*c\* \[d\](e) &lt;f&gt;"
    # self-contained: every src and href is inline or an anchor on the page
    for target in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert target.startswith(("data:image/png;base64,", "#")), target
    assert all(p.suffix == ".csv" or p.name in ("report.html", "report.md", "figures")
               for p in (ws / "report").iterdir())


def test_empty_workspace_lists_every_part_as_not_run(tmp_path):
    result = CliRunner().invoke(app, ["report", "--workspace", str(tmp_path / "empty")])
    assert result.exit_code == 0, result.output
    html_path = tmp_path / "empty" / "report" / "report.html"
    assert str(html_path) in " ".join(result.output.split())
    page, markdown = html_path.read_text(), (html_path.parent / "report.md").read_text()
    sections = re.split(r"<h2[^>]*>", page)[1:]
    assert len(sections) == 6 and all("Not run yet" in s for s in sections)
    for command in COMMANDS.values():
        assert command in page or command.replace("<", "&lt;") in page
        assert f"`{command}`" in markdown


def test_partial_workspace_reports_what_exists(tmp_path):
    ws = tmp_path / "ws"
    labels = np.random.default_rng(1).integers(0, 10, N_TEST)
    # a run without validation errors or any optional key, only control answers, a bare assist and bound
    probs = fabricated_probs(labels, np.arange(7), seed=2)
    save_run(ws, "bare", {"name": "bare", "model": "mlp"}, probs)
    with AnnotationStore(ws / "human" / "annotations.sqlite") as store:
        store.add_answer("later", 5, "ann", "quick", int(labels[5]), "", shown_at=float("nan"), answered_at=1.0,
                         is_control=True)
    (ws / "assist" / "bare").mkdir(parents=True)
    (ws / "assist" / "bare" / "assist.json").write_text(json.dumps({"run": "bare"}))
    (ws / "bound" / "x").mkdir(parents=True)
    (ws / "bound" / "x" / "summary.json").write_text(json.dumps({"subset": "x", "total": 10}))
    page = build_report(ws, test_labels=labels).read_text()
    not_run = re.findall(r'class="notrun">(.*?)</p>', page)
    assert len(not_run) == 4  # human confusions, hard set, hard-set answers, glimpse model
    assert any(COMMANDS["hardset"] in n for n in not_run) and any(COMMANDS["glimpse"] in n for n in not_run)
    assert pd.read_csv(ws / "report" / "models.csv")["test_errors"].tolist() == [7]
    assert pd.read_csv(ws / "report" / "controls.csv")["accuracy"].tolist() == [1.0]
    assert pd.read_csv(ws / "report" / "assist.csv")["run"].tolist() == ["bare"]


def test_the_report_replaces_an_earlier_one_whole_and_never_a_foreign_folder(fabricated, tmp_path):
    ws, labels, *_ = fabricated
    out = tmp_path / "report"
    out.mkdir()
    build_report(ws, out, test_labels=labels)
    (out / "stale.csv").write_text("from a run since deleted")
    build_report(ws, out, test_labels=labels)
    assert not (out / "stale.csv").exists() and (out / "report.html").is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (out / "notes.txt").write_text("precious too")  # a report's folder with a file no report writes
    for target, what in ((tmp_path / "mine", "a folder with other files in it"), (out / "report.md", "a file"),
                         (out, "a folder with other files in it")):
        result = CliRunner().invoke(app, ["report", "--workspace", str(ws), "--out", str(target)])
        assert result.exit_code == 2 and what in " ".join(result.output.split()), result.output
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert (out / "notes.txt").read_text() == "precious too"


def test_damaged_artefacts_are_skipped_not_fatal(tmp_path):
    ws = tmp_path / "ws"
    (ws / "bound" / "all").mkdir(parents=True)
    (ws / "bound" / "all" / "summary.json").write_text("{not json")
    (ws / "runs" / "broken").mkdir(parents=True)
    (ws / "runs" / "broken" / "meta.json").write_text("{}")  # no test_probs.npy
    (ws / "human").mkdir()
    (ws / "human" / "annotations.sqlite").write_bytes(b"not a database " * 100)
    page = build_report(ws, test_labels=np.zeros(N_TEST, dtype=np.int64)).read_text()
    assert page.count('class="problem"') == 3
    assert "broken" in page and "summary.json" in page and "annotations.sqlite: not a readable annotation" in page


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (`.ci/run` installs it when it can); skipped without it: a test installs nothing."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed; install Debian's `chromium` package to run the browser check")
    return binary


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def test_report_opens_in_chromium_without_broken_images(fabricated, chromium, tmp_path):
    _, _, _, items, _, html_path = fabricated
    # A test-only copy with a script that counts images that failed to decode once the page has loaded.
    probe = ("<script>window.addEventListener('load', () => { const broken = [...document.images]"
             ".filter(i => !i.complete || i.naturalWidth === 0).length; document.body.insertAdjacentHTML("
             "'beforeend', `<pre id=probe>images=${document.images.length} broken=${broken}</pre>`); });</script>")
    wrapper = tmp_path / "probe.html"
    wrapper.write_text(html_path.read_text().replace("</body>", probe + "</body>"))
    result = run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
                          wrapper.as_uri())
    found = re.search(r"images=(\d+) broken=(\d+)", result.stdout)
    assert found, result.stderr[-2000:]
    images, broken = map(int, found.groups())
    assert images >= len(items) + 5  # the gallery plus the figures
    assert broken == 0

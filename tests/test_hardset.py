"""`bench errors`: the hard set from fabricated predictions, through the function and the CLI."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from benchmark.cli import app
from benchmark.errors import BenchError
from benchmark.hardset import hardset_table, load_hardset, top3_text
from benchmark.runs import load_run, replace_folder_atomically
from conftest import assert_one_line_error


def test_top3_text_orders_by_probability():
    probs = np.array([[0.05, 0.6, 0.0, 0.3, 0.05, 0, 0, 0, 0, 0]])
    assert top3_text(probs) == ["1:0.600 3:0.300 0:0.050"]


def test_replace_folder_atomically_keeps_the_old_folder_when_writing_fails(tmp_path):
    final = tmp_path / "hardsets" / "x"
    replace_folder_atomically(final, lambda folder: (folder / "items.csv").write_text("old"))

    def crash(folder):
        (folder / "items.csv").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_folder_atomically(final, crash)
    assert (final / "items.csv").read_text() == "old"
    replace_folder_atomically(final, lambda folder: (folder / "items.csv").write_text("new"))
    assert (final / "items.csv").read_text() == "new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["x"]  # no staging or old folder left behind


def test_union_and_intersection(tmp_path, fabricate_run):
    labels = np.arange(20) % 10
    fabricate_run(tmp_path, "a", labels, [1, 4, 7])
    fabricate_run(tmp_path, "b", labels, [4, 7, 9, 12])
    runs = [load_run(tmp_path, "a"), load_run(tmp_path, "b")]
    union = hardset_table(runs, labels, "union")
    inter = hardset_table(runs, labels, "intersection")
    assert union["test_index"].tolist() == [1, 4, 7, 9, 12]
    assert inter["test_index"].tolist() == [4, 7]
    assert (union["label"] == labels[union["test_index"]]).all()
    row = union.set_index("test_index").loc[9]
    assert row["a_pred"] == labels[9] and row["b_pred"] == (labels[9] + 1) % 10
    assert row["b_top3"].startswith(f"{(labels[9] + 1) % 10}:")
    with pytest.raises(BenchError, match="expected union or intersection"):
        hardset_table(runs, labels, "xor")


def test_cli_errors_writes_the_hard_set(tmp_path, fabricate_run, mnist, mnist_dir):
    wrong = [3, 18, 247, 9999]
    fabricate_run(tmp_path, "fake-s0", mnist.test_labels, wrong)
    result = CliRunner().invoke(app, ["errors", "--run", "fake-s0", "--workspace", str(tmp_path),
                                      "--data-dir", str(mnist_dir)])
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output
    table, images, info = load_hardset(tmp_path, "fake-s0")
    assert table["test_index"].tolist() == wrong
    np.testing.assert_array_equal(images, mnist.test_images[wrong])
    assert info["count"] == 4 and info["errors_per_run"] == {"fake-s0": 4}
    assert pd.read_csv(tmp_path / "hardsets" / "fake-s0" / "items.csv").columns.tolist() == \
        ["test_index", "label", "fake-s0_pred", "fake-s0_top3"]


def test_cli_errors_unknown_run_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["errors", "--run", "ghost", "--workspace", str(tmp_path)])
    assert_one_line_error(result, "run 'ghost' not found")


def test_ensemble_of_identical_runs_equals_the_run(tmp_path, fabricate_run):
    from benchmark.ensemble import build_ensemble

    labels = np.arange(30) % 10
    for name in ("m-s0", "m-s1", "m-s2"):
        fabricate_run(tmp_path, name, labels, [2, 5, 11], seed=0)
    members = [load_run(tmp_path, n) for n in ("m-s0", "m-s1", "m-s2")]
    meta = build_ensemble(tmp_path, "ens", members, labels)
    ensemble = load_run(tmp_path, "ens")
    np.testing.assert_allclose(ensemble.test_probs, members[0].test_probs, rtol=0, atol=1e-7)
    assert meta["test_errors"] == 3 and meta["member_spread"] == {"mean": 3.0, "std": 0.0, "min": 3, "max": 3}
    assert meta["wrong_for_all_members"] == meta["wrong_for_some_member"] == 3


def test_ensemble_averages_and_can_fix_errors(tmp_path, fabricate_run):
    from benchmark.ensemble import build_ensemble

    labels = np.arange(30) % 10
    fabricate_run(tmp_path, "a", labels, [1, 2], seed=1)
    fabricate_run(tmp_path, "b", labels, [2, 3], seed=2)
    fabricate_run(tmp_path, "c", labels, [4], seed=3)
    members = [load_run(tmp_path, n) for n in "abc"]
    meta = build_ensemble(tmp_path, "abc", members, labels)
    expected = np.mean([m.test_probs for m in members], axis=0)
    np.testing.assert_allclose(load_run(tmp_path, "abc").test_probs, expected, atol=1e-7)
    assert meta["test_errors"] == int((expected.argmax(1) != labels).sum()) == 1  # only 2 is wrong twice
    assert meta["member_test_errors"] == {"a": 2, "b": 2, "c": 1}
    assert meta["member_spread"]["mean"] == pytest.approx(5 / 3)
    assert meta["wrong_for_all_members"] == 0 and meta["wrong_for_some_member"] == 4  # images 1, 2, 3, 4
    two = build_ensemble(tmp_path, "ab", members[:2], labels)
    assert two["wrong_for_all_members"] == 1 and two["wrong_for_some_member"] == 3  # 2; 1, 2, 3


def test_ensemble_errors_lie_between_the_same_wrong_answer_and_the_some_member_counts(tmp_path):
    """All members wrong is not a floor: members wrong in different ways can be outvoted by the label they all
    rank second. All members wrong with the same answer is one, and some member wrong a ceiling, for any weights."""
    from benchmark.ensemble import build_ensemble, error_overlap
    from benchmark.runs import save_run

    labels = np.arange(30) % 10
    for name, wrong_answer in (("a", 1), ("b", 2)):
        probs = np.full((30, 10), 0.005)
        probs[np.arange(30), labels] = 0.955
        probs[0] = 0.005
        probs[0, labels[0]], probs[0, (labels[0] + wrong_answer) % 10] = 0.45, 0.51  # wrong, label second
        probs[1, labels[1]], probs[1, (labels[1] + 1) % 10] = 0.005, 0.955  # wrong alike
        save_run(tmp_path, name, {"name": name, "model": "mlp"}, probs)
    meta = build_ensemble(tmp_path, "ab", [load_run(tmp_path, n) for n in "ab"], labels)
    assert (meta["wrong_for_all_members"], meta["same_wrong_answer_for_all_members"]) == (2, 1)
    assert meta["test_errors"] == 1 and load_run(tmp_path, "ab").test_predictions[0] == labels[0]

    # three members' answers on five images, counted by hand
    predictions = np.array([[0, 2, 0, 3, 5],   # wrong on 1, 2, 4
                            [0, 2, 1, 3, 5],   # wrong on 1, 2, 4
                            [1, 2, 0, 3, 6]])  # wrong on 0, 1, 2, 4
    overlap = error_overlap(predictions, np.array([0, 1, 2, 3, 4]))
    # wrong for all: 1, 2, 4; with the same answer: 1 only (image 2 gets 0, 1, 0 and image 4 gets 5, 5, 6, so
    # comparing any two members is not enough); wrong for some member: 0, 1, 2, 4
    assert (overlap["wrong_for_all_members"], overlap["same_wrong_answer_for_all_members"],
            overlap["wrong_for_some_member"]) == (3, 1, 4)
    assert overlap["member_spread"] == {"mean": pytest.approx(10 / 3), "std": pytest.approx(np.sqrt(1 / 3)),
                                        "min": 3, "max": 4}

    rng = np.random.default_rng(0)
    outvoted = 0
    for _ in range(200):  # random members, labels and weights: the bounds hold image by image for every weighting
        probs = rng.dirichlet(np.ones(3), size=(2, 40))  # 2 members, 40 images, 3 classes: many errors
        y = rng.integers(0, 3, 40)
        predictions = probs.argmax(2)
        wrong_for_all, some = (predictions != y).all(0), (predictions != y).any(0)
        alike = wrong_for_all & (predictions[0] == predictions[1])
        ensemble_wrong = np.einsum("m,mnk->nk", rng.random(2), probs).argmax(1) != y
        assert not (alike & ~ensemble_wrong).any() and not (ensemble_wrong & ~some).any()
        outvoted += (wrong_for_all & ~ensemble_wrong).sum()
    assert outvoted > 0  # images wrong for both members that the average gets right: no floor


def test_ensemble_command_never_replaces_another_run_and_counts_each_member_once(tmp_path, fabricate_run, mnist):
    labels = mnist.test_labels
    fabricate_run(tmp_path, "m-s0", labels, [1, 2])
    fabricate_run(tmp_path, "m-s1", labels, [2, 3], seed=1)

    def ensemble(*args):
        return CliRunner().invoke(app, ["ensemble", *args, "--workspace", str(tmp_path)])

    built = ensemble("--members", "m", "--seeds", "2")
    # no validation figures at the end: the fabricated members have none
    assert built.exit_code == 0 and " ".join(built.output.split()).endswith(
        "wrong for every member 1 (1 with the same answer), for at least one 3")
    assert load_run(tmp_path, "ensemble-m-x2").meta["members"] == ["m-s0", "m-s1"]
    assert ensemble("--members", "m", "--seeds", "2").exit_code == 0  # the same ensemble again: a re-run
    assert_one_line_error(ensemble("--run", "m-s0", "--run", "m-s0"), "names a member more than once")
    assert_one_line_error(ensemble("--run", "m-s0", "--run", "m-s1", "--name", "m-s0"),
                          "already saved with another recipe (model mlp -> ensemble)")
    assert load_run(tmp_path, "m-s0").meta["model"] == "mlp"  # the trained run is untouched
    assert_one_line_error(ensemble("--run", "m-s1", "--name", "ensemble-m-x2"), "members ['m-s0', 'm-s1'] -> ['m-s1']")
    assert_one_line_error(ensemble("--run", "m-s0", "--run", "m-s1", "--name", "../elsewhere"),
                          "--name '../elsewhere': use letters, digits")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ensemble-m-x2", "m-s0", "m-s1"]


def test_ensemble_validation_figure_is_the_members_mean_and_only_when_all_have_one(tmp_path):
    """The report's headline picks the best run by validation errors, ensembles included."""
    from benchmark.ensemble import build_ensemble
    from benchmark.runs import save_run
    from conftest import fabricated_probs

    test_labels, val_labels = np.arange(30) % 10, np.arange(20) % 10
    for name, val_wrong, seed in (("a", [1, 2], 1), ("b", [2, 3, 4], 2)):
        save_run(tmp_path, name, {"name": name, "model": "mlp"}, fabricated_probs(test_labels, np.array([5]), seed),
                 fabricated_probs(val_labels, np.array(val_wrong), seed))
    save_run(tmp_path, "c", {"name": "c", "model": "mlp"}, fabricated_probs(test_labels, np.array([5])))
    members = [load_run(tmp_path, n) for n in "ab"]
    meta = build_ensemble(tmp_path, "ab", members, test_labels, val_labels)
    expected = np.mean([m.val_probs for m in members], axis=0)
    np.testing.assert_allclose(load_run(tmp_path, "ab").val_probs, expected, atol=1e-7)
    assert meta["val_errors"] == int((expected.argmax(1) != val_labels).sum()) >= 1  # 2 is wrong for both
    assert meta["val_size"] == 20
    without = build_ensemble(tmp_path, "abc", [*members, load_run(tmp_path, "c")], test_labels, val_labels)
    assert "val_errors" not in without and load_run(tmp_path, "abc").val_probs is None

"""Human labelling without a terminal: the store, the session state machine, controls, the terminal
drawing, the window UI (Agg, synthetic key events), status scoring and the Label Studio round trip."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.errors import BenchError
from conftest import assert_one_line_error
from human_eval.session import LabelSession, choose_controls, open_session, render, stable_seed
from human_eval.store import ANSWER_COLUMNS, AnnotationStore, default_db_path, load_answers

LABELS = (3, 5, 8, 1, 7)


def make_hardset(workspace: Path, name: str = "tiny", labels=LABELS) -> pd.DataFrame:
    """Write a hard set folder of len(labels) synthetic images (a bar at a different height each) whose
    fake run predicted label + 1. Returns its items table."""
    n = len(labels)
    images = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        images[i, 4 + 4 * i: 8 + 4 * i, 6:22] = 250 - 20 * i
    labels = np.asarray(labels)
    table = pd.DataFrame({"test_index": 100 + 7 * np.arange(n), "label": labels, "fake_pred": (labels + 1) % 10,
                          "fake_top3": ["1:0.900 2:0.050 3:0.010"] * n})
    folder = workspace / "hardsets" / name
    folder.mkdir(parents=True)
    table.to_csv(folder / "items.csv", index=False)
    np.save(folder / "images.npy", images)
    (folder / "hardset.json").write_text(json.dumps({"name": name, "runs": ["fake"], "mode": "union", "count": n,
                                                     "errors_per_run": {"fake": n}}))
    return table


class FakeClock:
    """Unix seconds that advance only when told to."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ws(tmp_path) -> Path:
    make_hardset(tmp_path)
    return tmp_path


def start(ws: Path, annotator: str = "ann", think: bool | None = None, clock=None) -> LabelSession:
    store = AnnotationStore(default_db_path(ws))
    return open_session(ws, store, "tiny", annotator, "test", think=think, clock=clock or FakeClock())


def press(session: LabelSession, *keys: str) -> None:
    for key in keys:
        session.press(key)


# The store ---------------------------------------------------------------------------------------------------


def test_load_answers_on_no_database_is_empty_with_the_contract_columns(tmp_path):
    empty = load_answers(tmp_path / "missing.sqlite")
    assert list(empty.columns) == ANSWER_COLUMNS and empty.empty
    assert str(empty["answer"].dtype) == "Int64" and empty["is_control"].dtype == bool
    assert not (tmp_path / "missing.sqlite").exists()  # reading never creates a database


def test_final_answer_is_the_latest_uncorrected_one_and_history_is_kept(tmp_path):
    db = tmp_path / "h" / "a.sqlite"
    store = AnnotationStore(db)
    first = store.add_answer("hs", 3, "al", "quick", 7, "", 10.0, 12.5)
    store.add_answer("hs", 3, "al", "quick", None, "", 20.0, 21.0, True)
    retired = store.add_answer("hs", 3, "al", "quick", 4, shown_at=30.0, answered_at=31.0)
    store.retire(retired)
    store.add_answer("hs", 3, "al", "considered", 9, "loop is closed", 22.0, 26.0)
    store.add_answer("hs", 3, "bo", "quick", 1, shown_at=0.0, answered_at=3.0)
    answers = load_answers(db).set_index(["annotator", "phase"])
    assert len(answers) == 3
    assert pd.isna(answers.loc[("al", "quick"), "answer"])  # the retired 4 does not count, the later ? does
    assert answers.loc[("al", "quick"), "seconds"] == 1.0 and answers.loc[("al", "quick"), "is_control"]
    assert answers.loc[("al", "considered"), "reason"] == "loop is closed"
    assert answers.loc[("bo", "quick"), "answer"] == 1
    raw = sqlite3.connect(db).execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    assert raw == 5 and first == 1  # nothing was deleted
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("bad, message", [({"phase": "slow"}, "phase 'slow'"), ({"answer": 10}, "answer 10"),
                                          ({"answered_at": None}, "both required")])
def test_add_answer_rejects_bad_values(tmp_path, bad, message):
    args = {"hardset": "hs", "test_index": 1, "annotator": "al", "phase": "quick", "answer": 3, "shown_at": 0.0,
            "answered_at": 1.0} | bad
    with pytest.raises(ValueError, match=message):
        AnnotationStore(tmp_path / "a.sqlite").add_answer(**args)


# Controls and order --------------------------------------------------------------------------------------------


def test_controls_are_right_for_every_model_and_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    predictions = np.stack([np.where(rng.random(500) < 0.2, (labels + 1) % 10, labels) for _ in range(3)])
    picked = choose_controls(predictions, labels, 40, seed=5)
    assert len(set(picked)) == 40 and (predictions[:, picked] == labels[picked]).all()
    assert np.array_equal(picked, choose_controls(predictions, labels, 40, seed=5))
    assert not np.array_equal(picked, choose_controls(predictions, labels, 40, seed=6))
    all_right = int((predictions == labels).all(0).sum())
    with pytest.raises(BenchError, match=f"only {all_right} test images"):
        choose_controls(predictions, labels, all_right + 1, seed=5)


def test_order_is_fixed_per_annotator_and_differs_between_annotators(ws):
    first = [item.test_index for item in start(ws, "ann").items]
    again = [item.test_index for item in start(ws, "ann").items]
    others = {tuple(item.test_index for item in start(ws, f"other{i}").items) for i in range(6)}
    assert first == again and sorted(first) == list(100 + 7 * np.arange(5))
    assert len(others | {tuple(first)}) > 1  # six more annotators do not all share one order
    assert stable_seed("order", "ann", "tiny") == 6512383970273950378  # not Python's hash(), salted per process
    assert stable_seed("order", "ann", "tiny") != stable_seed("order", "ann", "x")


def test_items_carry_nothing_but_index_and_image(ws):
    session = start(ws)
    item = session.items[0]
    assert set(vars(item)) == {"test_index", "is_control", "image"}  # blind: no label, no prediction
    images = np.load(ws / "hardsets" / "tiny" / "images.npy")
    row = (item.test_index - 100) // 7
    assert np.array_equal(item.image, images[row]) and np.array_equal(session.view().image, images[row])


def test_resume_refuses_a_changed_think_setting(ws):
    start(ws, think=True)
    assert start(ws).phases == ("quick", "considered")  # left out: the stored choice
    with pytest.raises(BenchError, match="started hard set 'tiny' with --think;"):
        start(ws, think=False)


def test_controls_come_from_the_test_set_and_every_run_gets_them_right(tmp_path, mnist_dir, mnist, fabricate_run):
    from benchmark.hardset import write_hardset
    from benchmark.runs import load_run

    labels = mnist.test_labels
    fabricate_run(tmp_path, "a", labels, [5, 9, 40])
    fabricate_run(tmp_path, "b", labels, [9, 77], seed=1)
    runs = [load_run(tmp_path, "a"), load_run(tmp_path, "b")]
    write_hardset(tmp_path, "ab", runs, "union", mnist.test_images, labels)
    store = AnnotationStore(default_db_path(tmp_path))
    session = open_session(tmp_path, store, "ab", "ann", "test", controls=3, data_dir=mnist_dir)
    controls = [item for item in session.items if item.is_control]
    assert len(session.items) == 4 + 3 and len(controls) == 3
    for item in controls:
        assert all(run.test_predictions[item.test_index] == labels[item.test_index] for run in runs)
        assert np.array_equal(item.image, mnist.test_images[item.test_index])
    other = open_session(tmp_path, store, "ab", "other", "test", controls=3, data_dir=mnist_dir)
    assert {i.test_index for i in other.items if i.is_control} == {i.test_index for i in controls}

    from human_eval.status import progress

    wrong_control = controls[0].test_index
    for item in session.items:  # the true digit everywhere except on one control
        press(session, str((labels[item.test_index] + (item.test_index == wrong_control)) % 10))
    row = progress(tmp_path, default_db_path(tmp_path), mnist_dir).set_index("annotator").loc["ann"]
    assert row["finished"] and row["errors"] == 0 and (row["controls_right"], row["controls"]) == (2, 3)


# The session flow ---------------------------------------------------------------------------------------------


def test_answers_times_cannot_tell_bad_key_and_undo(ws):
    clock = FakeClock()
    session = start(ws, clock=clock)
    order = [item.test_index for item in session.items]
    clock.now += 2.5
    press(session, "4")
    press(session, "x")
    assert "does nothing here" in session.view().hint and len(session.live) == 1  # nothing recorded
    clock.now += 1.0
    press(session, "?")
    assert session.view().position == 3 and session.view().answered == 2
    press(session, "u")  # withdraws the "?" on item 2, which is shown again
    assert session.view().position == 2 and "withdrawn" in session.view().hint
    clock.now += 4.0
    press(session, "9")
    answers = load_answers(default_db_path(ws)).set_index("test_index")
    assert answers.loc[order[0], "answer"] == 4 and answers.loc[order[0], "seconds"] == 2.5
    assert answers.loc[order[1], "answer"] == 9 and answers.loc[order[1], "seconds"] == 4.0  # shown again at undo
    corrections = sqlite3.connect(default_db_path(ws)).execute(
        "SELECT a.answer FROM corrections c JOIN answers a ON a.id = c.answer_id").fetchall()
    assert corrections == [(None,)]  # the undone cannot-tell is kept, marked as corrected


def test_finishing_then_undo_and_quit(ws):
    session = start(ws)
    press(session, *"31817")
    assert session.view().mode == "finished" and session.view().image is None
    press(session, "5")
    assert "all answered" in session.view().hint
    press(session, "u")
    assert session.view().mode == "answer" and session.view().position == 5
    press(session, "2", "q")
    assert session.quit_requested
    assert load_answers(default_db_path(ws)).set_index("test_index").loc[session.items[-1].test_index, "answer"] == 2


def test_think_flow_stores_quick_and_considered_answers_with_reason(ws):
    clock = FakeClock()
    session = start(ws, think=True, clock=clock)
    first = session.items[0].test_index
    clock.now += 1.0
    press(session, "1")
    assert session.view().phase == "considered" and session.view().quick_answer == "1"
    press(session, "tab", "tab")
    assert session.view().rendering == "high contrast"
    clock.now += 3.0
    press(session, "7")
    clock.now += 20.0  # typing the reason is not thinking time
    press(session, *"top bar", "backspace", "r", "enter")
    answers = load_answers(default_db_path(ws)).set_index(["test_index", "phase"])
    assert answers.loc[(first, "quick"), "answer"] == 1 and answers.loc[(first, "quick"), "seconds"] == 1.0
    assert answers.loc[(first, "considered"), "answer"] == 7
    assert answers.loc[(first, "considered"), "seconds"] == 3.0
    assert answers.loc[(first, "considered"), "reason"] == "top bar"
    second = session.items[1].test_index
    press(session, "?", "enter", "escape", "8", "enter")  # Enter keeps the quick "?", Escape goes back
    answers = load_answers(default_db_path(ws)).set_index(["test_index", "phase"])
    assert answers.loc[(second, "considered"), "answer"] == 8
    press(session, "u")  # undo from the next item's quick phase withdraws that considered answer
    assert session.view().phase == "considered" and session.view().position == 2


def test_quitting_while_typing_a_reason_keeps_the_considered_answer(ws):
    clock = FakeClock()
    session = start(ws, think=True, clock=clock)
    first = session.items[0].test_index
    press(session, "4")
    clock.now += 2.0
    press(session, "9", *"open lo", "ctrl-c")  # the considered answer's key was pressed, its reason half typed
    assert session.quit_requested
    session.close()  # what the CLI does for Ctrl-C, a closed window or a terminated process
    answers = load_answers(default_db_path(ws)).set_index(["test_index", "phase"])
    assert answers.loc[(first, "considered"), "answer"] == 9 and answers.loc[(first, "considered"), "reason"] == "open lo"
    assert answers.loc[(first, "considered"), "seconds"] == 2.0
    resumed = start(ws, think=True, clock=clock)
    assert resumed.view().position == 2 and resumed.view().phase == "quick"


def test_renderings():
    image = np.array([[0, 16, 128, 255]], np.uint8)
    assert render(image, "inverted").tolist() == [[255, 239, 127, 0]]
    contrast = render(image, "high contrast")
    assert contrast[0, 0] == 0 and contrast[0, 3] == 255 and contrast[0, 1] > 64  # faint ink lifted
    assert np.array_equal(render(image, "pixel grid"), image)


# The terminal drawing -----------------------------------------------------------------------------------------


def test_colour_mode_follows_the_environment():
    from human_eval.terminal import colour_mode

    assert colour_mode({"TERM": "xterm-256color", "COLORTERM": "truecolor"}) == "truecolor"
    assert colour_mode({"TERM": "xterm", "COLORTERM": "24bit"}) == "truecolor"
    assert colour_mode({"TERM": "xterm-256color"}) == "256"
    assert colour_mode({"TERM": "xterm", "COLORTERM": "truecolor", "NO_COLOR": "1"}) == "ascii"
    assert colour_mode({"TERM": "dumb"}) == "ascii"


def test_half_blocks_carry_two_pixel_rows_per_text_row():
    from human_eval.terminal import image_rows

    image = np.array([[0, 255], [255, 120], [40, 40]], np.uint8)  # odd height: padded with black
    true = image_rows(image, "truecolor")
    assert len(true) == 2
    assert true[0].startswith("\x1b[38;2;0;0;0m\x1b[48;2;255;255;255m\u2580"  # top pixel black, bottom white
                              "\x1b[38;2;255;255;255m\x1b[48;2;120;120;120m")
    assert "\x1b[38;2;40;40;40m\x1b[48;2;0;0;0m" in true[1]
    grey = image_rows(image, "256")
    # 0 -> black 16, 255 -> white 231, 120 -> the ramp's nearest grey 118 = colour 232 + 11
    assert grey[0].startswith("\x1b[38;5;16m\x1b[48;5;231m\u2580\x1b[38;5;231m\x1b[48;5;243m")
    assert image_rows(image, "ascii") == ["=#", "  "]  # the mean of the two rows picks the shade


@pytest.mark.parametrize("mode", ["truecolor", "256", "ascii"])
def test_every_screen_fits_80_by_24(ws, mode):
    from human_eval.terminal import frame

    def visible_width(line: str) -> int:  # without the colour escape sequences
        return len(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line))

    session = start(ws, think=True)
    screens = []
    long_reason = list("a fairly long reason " * 8)
    for keys in ([], ["z"], ["3"], ["tab"] * 3, ["4"], long_reason, ["enter"], ["3", "3", "enter"] * 4):
        press(session, *keys)
        screens.append(frame(session.view(), mode))
    assert session.view().mode == "finished"
    for n, lines in enumerate(screens):
        assert len(lines) <= 24 and max(visible_width(line) for line in lines) <= 80
        if n < len(screens) - 1:  # every screen but the closing one shows the image in the chosen colours
            colour = "".join(lines)
            assert ("\x1b[38;2;" in colour) == (mode == "truecolor") and ("\x1b[38;5;" in colour) == (mode == "256")
            assert (mode == "ascii") == ("\x1b" not in colour)


def test_split_keys():
    from human_eval.terminal import split_keys

    assert split_keys("12?u") == ["1", "2", "?", "u"]
    assert split_keys("\x1b[A7\r\x7f\x1b") == ["unknown", "7", "enter", "backspace", "escape"]
    assert split_keys("\x03\t\x01é") == ["ctrl-c", "tab", "unknown", "é"]


# The window UI ------------------------------------------------------------------------------------------------


def test_window_ui_without_a_display_is_a_one_line_error(ws, monkeypatch):
    import matplotlib
    from typer.testing import CliRunner

    from benchmark.cli import app

    monkeypatch.setattr(matplotlib, "get_backend", lambda: "agg")  # what matplotlib falls back to with no display
    result = CliRunner().invoke(app, ["human-label", "--hardset", "tiny", "--annotator", "ann", "--ui", "window",
                                      "--workspace", str(ws)])
    assert_one_line_error(result, "no window can open (matplotlib backend agg")
    assert not (ws / "human").exists()  # refused before any session was started


def test_window_ui_with_synthetic_key_events(ws):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import KeyEvent

    from human_eval.window import WindowUI

    session = start(ws, think=True)
    figure = plt.figure()
    ui = WindowUI(session, figure)

    def key(name):
        figure.canvas.callbacks.process("key_press_event", KeyEvent("key_press_event", figure.canvas, name))

    assert np.array_equal(figure.axes[0].images[0].get_array(), session.items[0].image)
    for name in ["6", "shift", "l", "tab", "6", "s", "o", "enter"]:  # l, s: matplotlib's log-scale / save keys
        key(name)
    assert "item 2 / 5" in figure.get_suptitle()
    answers = load_answers(default_db_path(ws))
    assert answers["answer"].tolist() == [6, 6] and answers["reason"].tolist() == ["", "so"]
    key("9")
    assert len(figure.axes) == 4  # the second look shows the four renderings
    assert {ax.get_title() for ax in figure.axes} == {"as written", "inverted", "high contrast", "pixel grid"}
    key("f1")
    assert "does nothing here" in " ".join(t.get_text() for t in figure.texts)
    key("u")
    key("u")
    assert "item 1 / 5" in figure.get_suptitle() and session.view().phase == "considered"
    key("q")
    assert session.quit_requested and not plt.fignum_exists(figure.number)
    assert len(load_answers(default_db_path(ws))) == 1  # only the first quick answer is still live
    del ui


# Status -------------------------------------------------------------------------------------------------------


def test_status_scores_only_finished_annotators_and_counts_cannot_tell_apart(ws):
    from human_eval.status import progress

    session = start(ws, "done")
    truth = dict(zip(100 + 7 * np.arange(5), LABELS))
    given = {}
    for n, item in enumerate(session.items):
        given[item.test_index] = "?" if n == 0 else str((truth[item.test_index] + (n == 1)) % 10)
        press(session, given[item.test_index])
    press(start(ws, "halfway"), "1", "2")
    rows = progress(ws, default_db_path(ws)).set_index("annotator")
    assert rows.loc["done", "finished"] and rows.loc["done", ["answered", "total"]].tolist() == [5, 5]
    assert rows.loc["done", "errors"] == 1 and rows.loc["done", "cannot_tell"] == 1
    assert not rows.loc["halfway", "finished"] and rows.loc["halfway", "answered"] == 2
    assert np.isnan(rows.loc["halfway", "errors"])


# Label Studio -------------------------------------------------------------------------------------------------


def test_label_studio_round_trip(ws, tmp_path):
    from PIL import Image

    from human_eval.labelstudio import LABEL_CONFIG, export_csv, export_labelstudio, import_labelstudio

    out = tmp_path / "ls"
    tasks_file, count = export_labelstudio(ws, "tiny", out, 0, None, "/data/local-files/?d=images/")
    tasks = json.loads(tasks_file.read_text())
    store = AnnotationStore(default_db_path(ws))
    # blind: a task holds its image and an opaque id, no test index (it looks up the label), hard set or label
    assert count == 5 and all(set(t["data"]) == {"image", "item"} for t in tasks)
    located = {t["data"]["item"]: store.crowd_item(t["data"]["item"]) for t in tasks}
    assert sorted(test_index for _, test_index in located.values()) == list(100 + 7 * np.arange(5))
    assert {hardset for hardset, _ in located.values()} == {"tiny"}
    # the item id is random (not derived from the test index), and it alone names the image
    assert all(re.fullmatch(r"[0-9a-f]{16}", t["data"]["item"]) for t in tasks)
    assert all(t["data"]["image"] == f"/data/local-files/?d=images/{t['data']['item']}.png" for t in tasks)
    images = np.load(ws / "hardsets" / "tiny" / "images.npy")
    item = tasks[0]["data"]["item"]
    png = np.asarray(Image.open(out / "images" / f"{item}.png"))
    assert np.array_equal(png[::8, ::8], images[(located[item][1] - 100) // 7])
    again = json.loads(export_labelstudio(ws, "tiny", tmp_path / "again", 0, None, "")[0].read_text())
    assert {t["data"]["item"] for t in again} == set(located)  # an item keeps its id across exports
    choices = re.findall(r'<Choice value="([^"]+)"/>', (out / "label_config.xml").read_text())
    assert choices == [str(d) for d in range(10)] + ["cannot tell"]
    assert '<Image name="image" value="$image"/>' in LABEL_CONFIG

    # Fabricate what Label Studio exports after two people labelled the tasks (user 10 skipped one).
    rng = np.random.default_rng(1)
    truth = {}
    for n, task in enumerate(tasks):
        task["id"] = 500 + n
        task["annotations"] = []
        for user in (10, 11):
            choice = "cannot tell" if rng.random() < 0.2 else str(rng.integers(0, 10))
            key = (f"labelstudio-{user}", located[task["data"]["item"]][1])
            truth[key] = None if choice == "cannot tell" else int(choice)
            task["annotations"].append({
                "id": 1000 + 2 * n + user, "completed_by": user, "was_cancelled": False, "lead_time": 2.0 + n,
                "created_at": f"2024-05-01T10:{n:02d}:0{user - 10}.5Z",
                "result": [{"from_name": "digit", "to_name": "image", "type": "choices",
                            "value": {"choices": [choice]}}]})
    tasks[0]["annotations"].append({"id": 99, "completed_by": 12, "was_cancelled": True, "result": [],
                                    "created_at": "2024-05-01T11:00:00Z", "lead_time": 1.0})
    export_file = tmp_path / "export.json"
    export_file.write_text(json.dumps(tasks + tasks[-1:]))  # a task listed twice counts once
    summary = import_labelstudio(store, export_file, "completed_by", ws)
    assert (summary.imported, summary.skipped, summary.already_there) == (10, 1, 2)
    assert sorted(summary.annotators) == ["labelstudio-10", "labelstudio-11"]
    answers = load_answers(default_db_path(ws))
    got = {(a, t): (None if pd.isna(v) else int(v))
           for a, t, v in answers[["annotator", "test_index", "answer"]].itertuples(index=False)}
    assert got == truth
    first = answers[answers["test_index"] == located[tasks[0]["data"]["item"]][1]]
    assert (first["seconds"] == 2.0).all() and not answers["is_control"].any()
    assert import_labelstudio(store, export_file, "completed_by", ws).already_there == 12  # re-import adds nothing
    assert len(load_answers(default_db_path(ws))) == 10

    # user 10 changes an answer in Label Studio: same annotation id, a new updated_at; the change is the final
    # answer, the first one stays in the store
    changed = tasks[1]["annotations"][0]
    new_choice = str(((truth["labelstudio-10", located[tasks[1]["data"]["item"]][1]] or 0) + 1) % 10)
    changed.update(updated_at="2024-05-02T09:00:00Z", result=[{"from_name": "digit", "type": "choices",
                                                               "value": {"choices": [new_choice]}}])
    export_file.write_text(json.dumps(tasks))
    summary = import_labelstudio(store, export_file, "completed_by", ws)
    assert (summary.imported, summary.already_there) == (1, 9)
    truth["labelstudio-10", located[tasks[1]["data"]["item"]][1]] = int(new_choice)
    answers = load_answers(default_db_path(ws))
    assert {(a, t): (None if pd.isna(v) else int(v))
            for a, t, v in answers[["annotator", "test_index", "answer"]].itertuples(index=False)} == truth
    assert store.conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 11
    csv_path, rows = export_csv(default_db_path(ws), tmp_path / "csv", "tiny")
    assert rows == 10 and pd.read_csv(csv_path)["answer"].isna().sum() == sum(v is None for v in truth.values())


@pytest.mark.parametrize("tasks, message", [
    ([{"id": 1, "data": {"image": "x.png"}, "annotations": []}], "task 1 names no item this workspace exported"),
    ([{"id": 1, "data": {"item": "0badc0ffee"}}], "task 1 names no item this workspace exported"),
    (["not a task"], "task 1 is not in Label Studio's JSON export format"),
    (None, "annotation 7: time 'yesterday' is not an ISO 8601 date"),
    ("no-time", "task 1 is not in Label Studio's JSON export format (KeyError: 'created_at')")])
def test_label_studio_import_rejects_a_foreign_file_in_one_line(ws, tmp_path, tasks, message):
    from human_eval.labelstudio import export_labelstudio, import_labelstudio

    if not isinstance(tasks, list):  # a real export whose annotation time is unreadable or missing
        tasks = json.loads(export_labelstudio(ws, "tiny", tmp_path / "ls", 0, None, "")[0].read_text())[:1]
        tasks[0]["annotations"] = [{"id": 7, "completed_by": 1, "created_at": "yesterday", "result": [
            {"from_name": "digit", "type": "choices", "value": {"choices": ["3"]}}]}]
        if message.endswith("'created_at')"):
            del tasks[0]["annotations"][0]["created_at"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tasks))
    with pytest.raises(BenchError, match=re.escape(message)) as refused:
        import_labelstudio(AnnotationStore(default_db_path(ws)), bad, "completed_by", ws)
    assert "\n" not in str(refused.value)  # the command prints it as its one `error:` line
    assert load_answers(default_db_path(ws)).empty


# The command line ---------------------------------------------------------------------------------------------


def test_cli_help_status_export_and_import(ws, tmp_path):
    from typer.testing import CliRunner

    from benchmark.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["human-label", "--help"]).output
    for word in ("--hardset", "--annotator", "--ui", "--controls", "--think", "status", "export", "import"):
        assert word in help_text
    missing = runner.invoke(app, ["human-label", "--workspace", str(ws)])
    assert_one_line_error(missing, "--hardset NAME and --annotator ID")

    session = start(ws, "ann")
    press(session, *[str(label) for label in LABELS])  # in shown order, so some are wrong
    status = runner.invoke(app, ["human-label", "status", "--workspace", str(ws)])
    truth = dict(zip(100 + 7 * np.arange(5), LABELS))
    errors = sum(str(truth[item.test_index]) != label for item, label in zip(session.items, map(str, LABELS)))
    assert status.exit_code == 0 and re.search(rf"│ ann\s*│ 5/5 done\s*│ {errors}\s*│ 0\s*│", status.output)

    out = tmp_path / "export"
    result = runner.invoke(app, ["human-label", "export", "--hardset", "tiny", "--format", "labelstudio", "--out",
                                 str(out), "--workspace", str(ws)])
    assert result.exit_code == 0 and len(json.loads((out / "tasks.json").read_text())) == 5
    assert len(list((out / "images").glob("*.png"))) == 5 and (out / "label_config.xml").is_file()
    tasks = json.loads((out / "tasks.json").read_text())
    for n, task in enumerate(tasks):
        task["annotations"] = [{"id": n, "completed_by": {"id": 3, "email": "x@lab.org"}, "lead_time": 1.5,
                                "created_at": "2024-05-01T10:00:00+00:00", "result": [
                                    {"from_name": "digit", "type": "choices", "value": {"choices": ["2"]}}]}]
    (tmp_path / "done.json").write_text(json.dumps(tasks))
    result = runner.invoke(app, ["human-label", "import", str(tmp_path / "done.json"), "--annotator-from",
                                 "completed_by", "--workspace", str(ws)])
    assert result.exit_code == 0 and "imported 5 answers from labelstudio-x@lab.org" in result.output
    result = runner.invoke(app, ["human-label", "export", "--format", "csv", "--out", str(out), "--workspace", str(ws)])
    table = pd.read_csv(out / "all-answers.csv")
    assert result.exit_code == 0 and len(table) == 10 and list(table.columns) == ANSWER_COLUMNS


@pytest.mark.parametrize("damage", ["folder", "not sqlite"])
def test_an_unreadable_annotation_store_is_a_one_line_error_and_is_left_as_it_is(tmp_path, damage):
    from typer.testing import CliRunner

    from benchmark.cli import app

    db = default_db_path(tmp_path)
    db.parent.mkdir(parents=True)
    if damage == "folder":
        db.mkdir()
    else:
        db.write_bytes(b"not a database " * 100)
    runner = CliRunner()
    for command in (["status"], ["export", "--format", "csv", "--out", str(tmp_path / "out")]):
        result = runner.invoke(app, ["human-label", *command, "--workspace", str(tmp_path)])
        assert_one_line_error(result, f"the annotation store {db} cannot be opened")
    with pytest.raises(BenchError, match="cannot be opened"):
        AnnotationStore(db)
    assert db.is_dir() if damage == "folder" else db.read_bytes() == b"not a database " * 100


def test_csv_export_of_a_hard_set_without_answers_says_so(tmp_path):
    from typer.testing import CliRunner

    from benchmark.cli import app

    store = AnnotationStore(default_db_path(tmp_path))
    store.close()
    result = CliRunner().invoke(app, ["human-label", "export", "--format", "csv", "--hardset", "nosuch",
                                      "--out", str(tmp_path / "out"), "--workspace", str(tmp_path)])
    assert_one_line_error(result, "--hardset nosuch: no answers for it")
    assert not (tmp_path / "out").exists()

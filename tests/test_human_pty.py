"""The real `bench human-label` in a pseudo-terminal (pexpect): keys, undo, quit and resume, SIGKILL in the
middle, two annotators at once, and the error for a standard input that is not a terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pexpect
import pytest

from human_eval.store import AnnotationStore, default_db_path, load_answers
from test_human_session import make_hardset

BENCH = str(Path(sys.executable).parent / "bench")
pytestmark = pytest.mark.slow


def spawn(ws: Path, annotator: str, *extra: str, colour: str = "truecolor") -> pexpect.spawn:
    env = {**os.environ, "TERM": "xterm-256color", "COLORTERM": colour}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(BENCH, ["human-label", "--hardset", "tiny", "--annotator", annotator, "--workspace", str(ws),
                                  *extra], env=env, dimensions=(24, 80), encoding="utf-8", timeout=30)
    child.expect("item 1 / 5|item \\d / 5")  # the first frame is on screen: keys are read from now on
    return child


def answer(child: pexpect.spawn, key: str, then: str) -> None:
    """Press `key` and wait for the frame that shows `then` (so the answer has been committed)."""
    child.send(key)
    child.expect(then)


def plan_order(ws: Path, annotator: str) -> list[int]:
    with AnnotationStore(default_db_path(ws)) as store:
        return [test_index for test_index, _ in store.plan("tiny", annotator)[2]]


def final(ws: Path, annotator: str) -> dict[int, int | None]:
    answers = load_answers(default_db_path(ws))
    mine = answers[(answers["annotator"] == annotator) & (answers["phase"] == "quick")]
    return {int(t): (None if pd.isna(a) else int(a)) for t, a in zip(mine["test_index"], mine["answer"])}


def test_keys_quit_resume_and_sigkill_lose_nothing(tmp_path):
    make_hardset(tmp_path)
    child = spawn(tmp_path, "alice")
    child.expect("save and quit")
    assert "\x1b[38;2;" in child.before and "\x1b[38;5;" not in child.before  # COLORTERM=truecolor: 24-bit grey
    answer(child, "z", "does nothing here")
    answer(child, "4", "item 2 / 5")
    answer(child, "?", "item 3 / 5")
    answer(child, "u", "withdrawn")
    child.expect("item 2 / 5")
    answer(child, "6", "item 3 / 5")
    answer(child, "q", pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "saved: alice has answered 2 of 5 items of tiny" in child.before
    order = plan_order(tmp_path, "alice")
    assert final(tmp_path, "alice") == {order[0]: 4, order[1]: 6}  # the undone "?" is not a final answer

    child = spawn(tmp_path, "alice")  # the same command resumes at the first unanswered item
    assert "item 3 / 5" in child.after
    answer(child, "?", "item 4 / 5")
    os.kill(child.pid, signal.SIGKILL)  # no chance to clean up: the answer must already be committed
    child.expect(pexpect.EOF)
    child.close()
    assert child.signalstatus == signal.SIGKILL
    assert final(tmp_path, "alice") == {order[0]: 4, order[1]: 6, order[2]: None}

    child = spawn(tmp_path, "alice")
    assert "item 4 / 5" in child.after
    answer(child, "7", "item 5 / 5")
    answer(child, "8", "All 5 items are answered")
    answer(child, "q", pexpect.EOF)
    assert final(tmp_path, "alice") == {order[0]: 4, order[1]: 6, order[2]: None, order[3]: 7, order[4]: 8}


def test_two_annotators_at_once(tmp_path):
    make_hardset(tmp_path)
    carol, dave = spawn(tmp_path, "carol", colour=""), spawn(tmp_path, "dave", colour="")
    carol.expect("save and quit")
    assert "\x1b[38;5;" in carol.before and "\x1b[38;2;" not in carol.before  # no COLORTERM: the 256-colour ramp
    for n in range(5):
        then = f"item {n + 2} / 5" if n < 4 else "All 5 items"
        answer(carol, str(n), then)
        answer(dave, str(9 - n), then)
    answer(carol, "q", pexpect.EOF)
    answer(dave, "q", pexpect.EOF)
    for name, digits in (("carol", range(5)), ("dave", range(9, 4, -1))):
        assert final(tmp_path, name) == dict(zip(plan_order(tmp_path, name), digits))


def test_stdin_not_a_terminal_is_a_one_line_error(tmp_path):
    make_hardset(tmp_path)
    result = subprocess.run([BENCH, "human-label", "--hardset", "tiny", "--annotator", "eve", "--workspace",
                             str(tmp_path)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: standard input is not a terminal")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_sigterm_while_a_reason_is_typed_keeps_the_considered_answer(tmp_path):
    make_hardset(tmp_path)
    child = spawn(tmp_path, "bob", "--think")
    answer(child, "3", "Second look")  # the quick answer, then the second look
    answer(child, "5", "Why")  # the considered answer's key: its reason is typed next
    child.send("loop")
    child.expect("loop_")
    os.kill(child.pid, signal.SIGTERM)
    child.expect(pexpect.EOF)
    child.close()
    answers = load_answers(default_db_path(tmp_path)).set_index("phase")
    assert answers.loc["quick", "answer"] == 3
    assert answers.loc["considered", "answer"] == 5 and answers.loc["considered", "reason"] == "loop"

"""The labelling session as a state machine, independent of any screen: the terminal and the window UI both
feed it key names (`LabelSession.press`) and draw what `LabelSession.view()` describes.

The flow for one annotator on one hard set:
  plan      fixed on the first start and stored: the hard-set items plus `controls` test images every
            model of the hard set got right, shuffled with a seed derived from (annotator, hard set), so a
            resumed session shows the same order. Each item carries only its test index, whether it is a
            control, and its image: neither the label nor any model prediction reaches a UI (blind).
  steps     one step per item and phase: "quick" only, or "quick" then "considered" with `--think`.
  state     the database is the state: the current step is the first one without a live answer, so
            resuming after quitting, Ctrl-C or kill -9 starts exactly at the first unanswered item, and
            `u` (undo) retires the answer of the step before, which then becomes current again.
Keys: "0"-"9" answer, "?" cannot tell, "u" undo, "q" save and quit; in the considered phase also "tab"
(next rendering) and "enter" (keep the quick answer), then a short reason typed and ended with "enter"
("escape" goes back to choosing). Anything else shows a hint and records nothing.
Times: shown_at is when a step became current; answered_at when the answer key was pressed (for the
considered answer that is before the reason is typed, so reason typing does not count as thinking time).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from benchmark.errors import BenchError
from human_eval.store import AnnotationStore

RENDERINGS = ("as written", "inverted", "high contrast", "pixel grid")
MAX_REASON = 120  # characters: a short reason, not an essay
CANNOT_TELL = "?"
DIGITS = tuple("0123456789")
KEY_HINT = "keys: 0-9 answer, ? cannot tell, u undo, q save and quit"
THINK_HINT = "keys: 0-9 or ? answer, Enter keep, Tab next view, u undo, q quit"
REASON_HINT = "type a short reason; Enter saves it, Escape changes the answer"
DONE_HINT = "all answered: u undo the last answer, q quit"


def stable_seed(*parts: str) -> int:
    """A 63-bit seed from strings that is the same on every machine and Python run (unlike hash())."""
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "big") >> 1


def choose_controls(predictions: np.ndarray, labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Pick `count` test indices that every model classifies correctly, at random with `seed`.

    predictions: int (runs, N) predicted digits of each run; labels: (N,) true digits. Returns sorted indices.
    """
    correct = np.flatnonzero((np.asarray(predictions) == np.asarray(labels)[None, :]).all(0))
    if count > len(correct):
        raise BenchError(f"--controls {count}: only {len(correct)} test images are right for every run; ask for fewer")
    return np.sort(np.random.default_rng(seed).choice(correct, size=count, replace=False))


def render(image: np.ndarray, rendering: str) -> np.ndarray:
    """An alternative view of a uint8 (28, 28) image for the second look, uint8 of the same shape.

    "inverted" shows dark ink on white paper (how digits are usually written); "high contrast" lifts faint
    strokes with a gamma of 0.4 so a broken or light stroke becomes visible. "pixel grid" returns the image
    unchanged: each UI draws the grid its own way (lines in the window, a checkerboard in the terminal).
    """
    if rendering == "inverted":
        return 255 - image
    if rendering == "high contrast":
        return np.round(255 * (image / 255.0) ** 0.4).astype(np.uint8)
    return image


@dataclass(frozen=True)
class Item:
    """What the annotator may see of a test image: no label, no prediction."""

    test_index: int
    is_control: bool
    image: np.ndarray  # uint8 (28, 28)


@dataclass
class View:
    """Everything a UI draws for the current state."""

    hardset: str
    annotator: str
    position: int  # 1-based number of the item shown (the last item once finished)
    total: int
    answered: int  # items with every phase answered
    elapsed: float  # seconds since this session started
    mode: str  # "answer", "reason" or "finished"
    phase: str | None  # "quick" or "considered"; None once finished
    image: np.ndarray | None  # uint8 (28, 28) as written; UIs apply `render(image, rendering)`
    rendering: str  # the rendering chosen with Tab during the second look
    quick_answer: str | None  # the quick answer ("7" or "?"), shown during the second look
    pending: str | None  # the considered answer being given a reason
    reason: str
    hint: str


def answer_text(answer: int | None) -> str:
    return CANNOT_TELL if answer is None else str(answer)


class LabelSession:
    """One annotator labelling one hard set; see the module docstring for the flow.

    items: in showing order; think: ask a considered answer after each quick one; clock: Unix seconds
    (tests pass a fake one).
    """

    def __init__(self, store: AnnotationStore, session_id: int, hardset: str, annotator: str, items: list[Item],
                 think: bool, clock: Callable[[], float] = time.time):
        self.store, self.session_id, self.hardset, self.annotator = store, session_id, hardset, annotator
        self.items, self.clock = items, clock
        self.phases = ("quick", "considered") if think else ("quick",)
        self.started_at = clock()
        self.quit_requested = False
        self.hint = ""
        self.pending_at = 0.0  # when the considered answer key was pressed (its reason is typed after)
        self.sync()

    # State -------------------------------------------------------------------------------------------------

    def step_key(self, step: int) -> tuple[int, str]:
        """(test index, phase) of step number `step`."""
        return self.items[step // len(self.phases)].test_index, self.phases[step % len(self.phases)]

    @property
    def steps(self) -> int:
        return len(self.items) * len(self.phases)

    def sync(self) -> None:
        """Re-read the live answers and make the first unanswered step current (a fresh showing)."""
        self.live = self.store.final_answers(self.hardset, self.annotator)  # {(test_index, phase): (id, answer)}
        self.step = next((s for s in range(self.steps) if self.step_key(s) not in self.live), self.steps)
        self.mode = "finished" if self.step == self.steps else "answer"
        self.rendering = 0  # index into RENDERINGS, cycled with Tab during the second look
        self.reason = ""
        self.pending: int | None = None  # the considered answer (None = cannot tell) while its reason is typed
        self.shown_at = self.clock()

    def record(self, answer: int | None, answered_at: float, reason: str = "") -> None:
        item = self.items[self.step // len(self.phases)]
        self.store.add_answer(self.hardset, item.test_index, self.annotator, self.step_key(self.step)[1], answer,
                              reason, shown_at=self.shown_at, answered_at=answered_at,
                              is_control=item.is_control, session_id=self.session_id)
        self.sync()

    def undo(self) -> None:
        """Retire the live answer of the step before the current one; that step becomes current again."""
        if self.step == 0:
            self.hint = "nothing to undo"
            return
        answer_id, answer = self.live[self.step_key(self.step - 1)]
        self.store.retire(answer_id, self.session_id)
        self.sync()
        self.hint = f"undone: your answer {answer_text(answer)} was withdrawn; answer again"

    # Input -------------------------------------------------------------------------------------------------

    def press(self, key: str) -> None:
        """Handle one key: a printable character, or "enter", "backspace", "escape", "tab", "ctrl-c",
        "unknown" (a key the UI could not name)."""
        self.hint = ""
        if key == "ctrl-c":
            self.quit_requested = True
        elif self.mode == "reason":
            self.press_in_reason(key)
        elif key == "q":
            self.quit_requested = True
        elif key == "u":
            self.undo()
        elif self.mode == "finished":
            self.hint = DONE_HINT
        elif key in DIGITS or key == CANNOT_TELL or (key == "enter" and self.considering):
            answer = self.quick_answer() if key == "enter" else None if key == CANNOT_TELL else int(key)
            if self.considering:
                self.mode, self.pending, self.pending_at = "reason", answer, self.clock()
            else:
                self.record(answer, self.clock())
        elif key == "tab" and self.considering:
            self.rendering = (self.rendering + 1) % len(RENDERINGS)
        else:
            what = "that key" if key == "unknown" else repr(key)
            self.hint = f"{what} does nothing here; " + (THINK_HINT if self.considering else KEY_HINT)

    def press_in_reason(self, key: str) -> None:
        if key == "enter":
            self.record(self.pending, self.pending_at, self.reason.strip())
        elif key == "escape":
            self.mode, self.pending, self.reason = "answer", None, ""
        elif key == "backspace":
            self.reason = self.reason[:-1]
        elif len(key) == 1 and key.isprintable():
            if len(self.reason) < MAX_REASON:
                self.reason += key
            else:
                self.hint = f"a reason is at most {MAX_REASON} characters; Enter to save it"
        else:
            self.hint = REASON_HINT

    @property
    def considering(self) -> bool:
        return self.mode == "answer" and self.step_key(self.step)[1] == "considered"

    def quick_answer(self) -> int | None:
        return self.live[(self.step_key(self.step)[0], "quick")][1]

    # Output ------------------------------------------------------------------------------------------------

    def view(self) -> View:
        finished = self.mode == "finished"
        item = self.items[min(self.step, self.steps - 1) // len(self.phases)]
        phase = None if finished else self.step_key(self.step)[1]
        return View(
            hardset=self.hardset, annotator=self.annotator,
            position=min(self.step // len(self.phases) + 1, len(self.items)), total=len(self.items),
            answered=self.step // len(self.phases), elapsed=self.clock() - self.started_at, mode=self.mode,
            phase=phase, image=None if finished else item.image, rendering=RENDERINGS[self.rendering],
            quick_answer=answer_text(self.quick_answer()) if phase == "considered" else None,
            pending=None if self.mode != "reason" else answer_text(self.pending), reason=self.reason,
            hint=self.hint or (DONE_HINT if finished else ""))

    def close(self) -> None:
        """End the session. A considered answer whose reason is still being typed (Ctrl-C, the window closed, the
        process terminated) is saved with the reason typed so far: its key was pressed, so it is an answer."""
        if self.mode == "reason":
            self.record(self.pending, self.pending_at, self.reason.strip())
        self.store.end_session(self.session_id)


def open_session(workspace: Path, store: AnnotationStore, hardset: str, annotator: str, ui: str,
                 think: bool | None = None, controls: int | None = None, data_dir: Path | None = None,
                 clock: Callable[[], float] = time.time) -> LabelSession:
    """Start or resume `annotator` on `hardset`: load the stored plan (or make it), gather the images.

    think / controls: None means "as stored" (or off / 0 for a new plan); a value that contradicts the stored
    plan is an error, since changing them halfway would mix two different measurements.
    """
    from benchmark.data import load_mnist
    from benchmark.hardset import load_hardset

    if not annotator.strip():
        raise BenchError("--annotator must not be empty; give a short id such as your initials")
    if controls is not None and controls < 0:
        raise BenchError(f"--controls {controls}: expected 0 or more")
    table, images, meta = load_hardset(workspace, hardset)
    if table.empty:
        raise BenchError(f"hard set {hardset!r} holds no images; gather it from runs that make errors")
    plan = store.plan(hardset, annotator)
    if plan is not None:
        for differs, setting in ((think is not None and think != plan[0], "--think" if plan[0] else "--no-think"),
                                 (controls is not None and controls != plan[1], f"--controls {plan[1]}")):
            if differs:
                raise BenchError(f"{annotator} started hard set {hardset!r} with {setting}; resume with the same "
                                 f"setting (or leave it out), or label under another --annotator id")
    control_count = plan[1] if plan is not None else controls or 0
    mnist = load_mnist(data_dir, workspace) if control_count else None  # controls are plain MNIST test images
    if plan is None:
        control_indices = hardset_controls(workspace, hardset, meta["runs"], control_count, mnist.test_labels) \
            if control_count else []
        entries = [(int(t), False) for t in table["test_index"]] + [(int(t), True) for t in control_indices]
        order = np.random.default_rng(stable_seed("order", annotator, hardset)).permutation(len(entries))
        plan = store.create_plan(hardset, annotator, bool(think), control_count, [entries[i] for i in order])
    row_of = {int(t): i for i, t in enumerate(table["test_index"])}
    missing = [t for t, is_control in plan[2] if not is_control and t not in row_of]
    if missing:
        raise BenchError(f"hard set {hardset!r} was gathered again and no longer holds test images {missing[:5]} that "
                         f"{annotator} was given; label it under a new --annotator id or restore the hard set")
    items = [Item(t, c, mnist.test_images[t] if c else images[row_of[t]]) for t, c in plan[2]]
    session_id = store.start_session(annotator, hardset, ui)
    return LabelSession(store, session_id, hardset, annotator, items, think=plan[0], clock=clock)


def hardset_controls(workspace: Path, hardset: str, runs: list[str], count: int, test_labels: np.ndarray) -> np.ndarray:
    """`count` test indices every run of the hard set gets right, seeded by the hard-set name so every
    annotator of a hard set (and its Label Studio export) sees the same controls."""
    from benchmark.runs import load_run

    predictions = np.stack([load_run(workspace, name).test_predictions for name in runs])
    return choose_controls(predictions, test_labels, count, stable_seed("controls", hardset))

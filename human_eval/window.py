"""The window UI: the same session in a matplotlib figure, driven by key-press events.

Quick phase: one large image. Second look (`--think`): all four renderings at once (as written, inverted,
high contrast, and with a pixel grid drawn as lines between the pixels); Tab marks one in bold, as it
switches the one view in the terminal. The keys and the flow are the
session's (see human_eval/session.py); matplotlib's own keyboard shortcuts are switched off for this
figure, since several of them (q, s, l, g, ...) would otherwise close, save or rescale it.
"""

from __future__ import annotations

import numpy as np

from benchmark.errors import BenchError
from human_eval.session import KEY_HINT, RENDERINGS, THINK_HINT, LabelSession, render

MPL_KEYS = {"enter": "enter", "return": "enter", "backspace": "backspace", "escape": "escape", "tab": "tab",
            "ctrl+c": "ctrl-c"}
MODIFIERS = {"shift", "control", "ctrl", "alt", "super", "cmd", "meta", "caps_lock", "num_lock"}


def key_name(mpl_key: str | None) -> str | None:
    """A matplotlib key string -> the session's key name; None for a lone modifier (not a key press)."""
    if mpl_key is None or mpl_key in MODIFIERS:
        return None
    if len(mpl_key) == 1:
        return mpl_key
    return MPL_KEYS.get(mpl_key, "unknown")


class WindowUI:
    """Binds a LabelSession to a matplotlib figure; every key event updates the session and redraws."""

    def __init__(self, session: LabelSession, figure):
        self.session, self.figure = session, figure
        canvas = figure.canvas
        manager = canvas.manager
        if manager is not None and getattr(manager, "key_press_handler_id", None) is not None:
            canvas.mpl_disconnect(manager.key_press_handler_id)
        canvas.mpl_connect("key_press_event", self.on_key)
        canvas.mpl_connect("close_event", self.on_close)
        self.timer = canvas.new_timer(interval=1000)  # the elapsed-time clock
        self.timer.add_callback(self.draw)
        self.timer.start()
        self.draw()

    def on_key(self, event) -> None:
        name = key_name(event.key)
        if name is None:
            return
        self.session.press(name)
        if self.session.quit_requested:
            import matplotlib.pyplot as plt

            self.timer.stop()
            plt.close(self.figure)
        else:
            self.draw()

    def on_close(self, event) -> None:
        """Closing the window saves and quits, like q (every given answer is already committed)."""
        self.timer.stop()
        self.session.quit_requested = True

    def draw(self) -> None:
        view = self.session.view()
        fig = self.figure
        fig.clear()
        minutes, seconds = divmod(int(view.elapsed), 60)
        fig.suptitle(f"hard set {view.hardset} · annotator {view.annotator} · item {view.position} / {view.total}"
                     f" · answered {view.answered} · elapsed {minutes:02d}:{seconds:02d}", fontsize=10)
        if view.mode == "finished":
            prompt = f"All {view.total} items are answered and saved. Thank you!\nu: undo the last answer   q: quit"
        elif view.phase == "considered":
            for ax, rendering in zip(fig.subplots(2, 2).flat, RENDERINGS):
                self.show(ax, render(view.image, rendering), rendering, selected=rendering == view.rendering)
            if view.mode == "reason":
                prompt = (f"considered answer {view.pending}. Why? {view.reason}_\n"
                          "Enter: save   Escape: change the answer")
            else:
                prompt = f"Second look. Your quick answer: {view.quick_answer}.\n{THINK_HINT}"
        else:
            self.show(fig.subplots(), view.image, "", selected=False)
            prompt = f"Which digit is this?\n{KEY_HINT}"
        fig.text(0.5, 0.06, prompt, ha="center", va="center", fontsize=10)
        fig.text(0.5, 0.01, view.hint, ha="center", va="bottom", fontsize=9, color="firebrick")
        fig.subplots_adjust(bottom=0.14, top=0.92)
        fig.canvas.draw_idle()

    @staticmethod
    def show(ax, image: np.ndarray, title: str, selected: bool) -> None:
        """Draw a uint8 (28, 28) image; the rendering chosen with Tab gets a bold title."""
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=9, fontweight="bold" if selected else "normal")
        ax.set_xticks([])
        ax.set_yticks([])
        if title == "pixel grid":
            edges = np.arange(-0.5, image.shape[0], 1.0)
            ax.set_xticks(edges, minor=True)
            ax.set_yticks(edges, minor=True)
            ax.tick_params(which="minor", length=0)
            ax.grid(which="minor", color="tab:orange", linewidth=0.4)


def require_display() -> None:
    """BenchError unless matplotlib has an interactive backend (it falls back to Agg without a display)."""
    import matplotlib
    from matplotlib.backends import BackendFilter, backend_registry

    backend = matplotlib.get_backend().lower()
    if backend in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE):
        raise BenchError(f"no window can open (matplotlib backend {backend}: no display?); use --ui terminal, or "
                         f"set MPLBACKEND to an interactive backend such as TkAgg")


def run_window(session: LabelSession) -> None:
    """Open the labelling window and block until it is closed. BenchError if no window can open."""
    import matplotlib.pyplot as plt

    require_display()
    figure = plt.figure(f"bench human-label: {session.hardset}", figsize=(7, 7.5))
    ui = WindowUI(session, figure)  # noqa: F841  (matplotlib holds callbacks weakly: keep their owner alive)
    plt.show()

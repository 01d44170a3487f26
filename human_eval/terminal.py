"""The terminal UI: draws a `View` in an 80 x 24 terminal and feeds single key presses to the session.

Images use the upper-half block "▀": its foreground colour is one pixel row and its background the row
below, so a 28 x 28 digit takes 28 columns by 14 rows and its pixels stay square. Colour, best first:
  truecolor  24-bit grey (COLORTERM=truecolor or 24bit)
  256        the xterm grey ramp (232-255, plus black 16 and white 231): any other colour terminal
  ascii      plain shade characters, two pixel rows averaged per character (NO_COLOR set, or TERM=dumb)
Frames are redrawn in place (cursor home, overwrite each line, clear its rest), never by clearing the
screen, so there is no flicker; the elapsed-time clock ticks once a second. On a dumb terminal, which
cannot move the cursor, each frame is printed below the last and only after a key press.
Keys are read raw (no echo, no line buffering, Ctrl-C arriving as a key that saves and quits like q).
"""

from __future__ import annotations

import codecs
import os
import re
import select
import signal
import sys
import termios
import textwrap
from typing import Mapping, TextIO

import numpy as np
from PIL import Image

from benchmark.errors import BenchError
from human_eval.session import RENDERINGS, LabelSession, View, render

WIDTH, HEIGHT = 80, 24
LARGE_SIDE = 42  # pixels of the second-look image: 21 text rows, the most an 80 x 24 screen can spare
ASCII_SHADES = " .:-=+*#%@"
UPPER_HALF = "\u2580"
RESET = "\x1b[0m"
# The xterm 256-colour greys: 16 is black, 232-255 run from 8 to 238 in steps of 10, 231 is white.
GREY_LEVELS = np.array([0] + [8 + 10 * k for k in range(24)] + [255])
GREY_CODES = np.array([16] + list(range(232, 256)) + [231])


def colour_mode(env: Mapping[str, str]) -> str:
    """"truecolor", "256" or "ascii" for a terminal described by environment variables `env`."""
    if env.get("NO_COLOR") or env.get("TERM", "") == "dumb":  # no-color.org: any non-empty value
        return "ascii"
    return "truecolor" if env.get("COLORTERM", "").lower() in ("truecolor", "24bit") else "256"


def image_rows(image: np.ndarray, mode: str) -> list[str]:
    """uint8 (H, W) -> ceil(H / 2) strings of W visible characters each, in colour mode `mode`."""
    if len(image) % 2:
        image = np.vstack([image, np.zeros((1, image.shape[1]), image.dtype)])
    top, bottom = image[0::2].astype(int), image[1::2].astype(int)
    if mode == "ascii":
        shade = ((top + bottom) * len(ASCII_SHADES)) // 512  # mean of the two rows, 0..9
        return ["".join(ASCII_SHADES[s] for s in row) for row in shade]
    if mode == "256":
        nearest = lambda v: GREY_CODES[np.abs(v[..., None] - GREY_LEVELS).argmin(-1)]  # noqa: E731
        top, bottom = nearest(top), nearest(bottom)
        cell = "\x1b[38;5;{}m\x1b[48;5;{}m" + UPPER_HALF
        return ["".join(cell.format(t, b) for t, b in zip(tr, br)) + RESET for tr, br in zip(top, bottom)]
    cell = "\x1b[38;2;{0};{0};{0}m\x1b[48;2;{1};{1};{1}m" + UPPER_HALF
    return ["".join(cell.format(t, b) for t, b in zip(tr, br)) + RESET for tr, br in zip(top, bottom)]


def checkerboard(image: np.ndarray) -> np.ndarray:
    """The "pixel grid" for a terminal, which cannot draw lines between cells: every other pixel is pulled
    18% towards mid grey, so each pixel's cell is visible without hiding the stroke."""
    rows, cols = np.indices(image.shape)
    odd = (rows + cols) % 2 == 1
    return np.where(odd, np.round(0.82 * image + 23), image).astype(np.uint8)


def large_image(image: np.ndarray, rendering: str) -> np.ndarray:
    """The second-look picture, uint8 (LARGE_SIDE, LARGE_SIDE): the rendering enlarged (Lanczos), or the
    pixel grid at 1:1 in a black frame (resampling would smear the grid)."""
    if rendering == "pixel grid":
        margin = (LARGE_SIDE - image.shape[0]) // 2
        return np.pad(checkerboard(image), margin)
    return np.asarray(Image.fromarray(render(image, rendering)).resize((LARGE_SIDE, LARGE_SIDE), Image.LANCZOS))


def side_by_side(picture: list[str], picture_width: int, text: list[str], height: int) -> list[str]:
    """`height` lines: the picture rows (each `picture_width` wide) from the top, `text` to their right,
    vertically centred text cut to the screen width."""
    left = 2
    room = WIDTH - left - picture_width - 3
    top = max(0, (len(picture) - len(text)) // 2)
    lines = []
    for i in range(height):
        row = picture[i] if i < len(picture) else " " * picture_width
        words = text[i - top][:room] if 0 <= i - top < len(text) else ""
        lines.append(" " * left + row + "   " + words)
    return lines


def side_text(view: View) -> list[str]:
    """The instructions beside the picture for the current mode and phase."""
    if view.mode == "reason":
        wrapped = textwrap.wrap(view.reason + "_", 32) or ["_"]
        return [f"Considered answer: {view.pending}", "", "Why? Type a short reason:", *wrapped, "",
                "Enter   save", "Esc     change the answer"]
    if view.phase == "considered":
        number = RENDERINGS.index(view.rendering) + 1
        return ["Second look", f"view {number}/{len(RENDERINGS)}: {view.rendering}", "Tab     next view", "",
                f"Your quick answer: {view.quick_answer}", "", "0-9     considered answer", "?       cannot tell",
                f"Enter   keep {view.quick_answer}", "u       undo", "q       save and quit"]
    return ["Which digit is this?", "", "0-9   answer", "?     cannot tell", "u     undo the previous answer",
            "q     save and quit"]


def frame(view: View, mode: str) -> list[str]:
    """The screen for `view`: at most HEIGHT lines of at most WIDTH visible characters."""
    minutes, seconds = divmod(int(view.elapsed), 60)
    header = [f" digit-bench   hard set {view.hardset}   annotator {view.annotator}"[:WIDTH],
              f" item {view.position} / {view.total}   answered {view.answered}   elapsed {minutes:02d}:{seconds:02d}"]
    if view.mode == "finished":
        body = ["", f"  All {view.total} items are answered and saved. Thank you!", "",
                "  u   undo the last answer", "  q   quit"]
    elif view.phase == "considered":
        picture = large_image(view.image, view.rendering)
        body = side_by_side(image_rows(picture, mode), picture.shape[1], side_text(view), LARGE_SIDE // 2)
    else:
        body = [""] + side_by_side(image_rows(view.image, mode), view.image.shape[1], side_text(view), 14)
    lines = header + body
    lines += [""] * (HEIGHT - 1 - len(lines))
    return lines + [(" " + view.hint)[:WIDTH]]


def split_keys(text: str) -> list[str]:
    """Key names (see `LabelSession.press`) from what the terminal sent; one read may hold several keys."""
    names, i = [], 0
    special = {"\r": "enter", "\n": "enter", "\x7f": "backspace", "\x08": "backspace", "\t": "tab", "\x03": "ctrl-c"}
    while i < len(text):
        char = text[i]
        if char == "\x1b" and i + 1 < len(text) and text[i + 1] in "[O":
            match = re.compile(r"[@-~]").search(text, i + 2)  # arrow and function keys: ESC [ ... final byte
            i = match.end() if match else len(text)
            names.append("unknown")
            continue
        names.append("escape" if char == "\x1b" else special.get(char, "unknown" if char < " " else char))
        i += 1
    return names


def require_terminal(stdin: TextIO) -> None:
    if not os.isatty(stdin.fileno()):
        raise BenchError("standard input is not a terminal: labelling reads single key presses; run "
                         "`bench human-label` in an interactive terminal, or use --ui window")


def run_terminal(session: LabelSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
                 env: Mapping[str, str] = os.environ) -> None:
    """Run the session in this terminal until the annotator quits. BenchError if stdin is not a terminal."""
    require_terminal(stdin)
    fd = stdin.fileno()
    mode, dumb = colour_mode(env), env.get("TERM", "") == "dumb"
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG)
    raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    previous_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # restore the terminal on kill
    try:
        termios.tcsetattr(fd, termios.TCSANOW, raw)  # TCSANOW keeps keys typed before the first frame
        if not dumb:
            stdout.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hidden cursor
        while not session.quit_requested:
            lines = frame(session.view(), mode)
            if dumb:
                stdout.write("\n" + "\n".join(line.rstrip() for line in lines) + "\n")
            else:
                stdout.write("\x1b[H" + "\x1b[K\r\n".join(lines) + "\x1b[K\x1b[J")
            stdout.flush()
            ready, _, _ = select.select([fd], [], [], None if dumb else 1.0)  # 1 s: let the clock tick
            if not ready:
                continue
            data = os.read(fd, 256)
            if not data:  # the terminal went away
                break
            for key in split_keys(decoder.decode(data)):
                session.press(key)
                if session.quit_requested:
                    break
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGTERM, previous_term)
        if not dumb:
            stdout.write("\x1b[?25h\x1b[?1049l")
        stdout.flush()

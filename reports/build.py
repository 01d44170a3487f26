"""`bench report`: one self-contained HTML page, a Markdown summary and the CSV behind every table and figure.

Sections, each built from whatever the workspace holds (`reports.collect`); a part whose artefacts do not
exist yet is listed as "not run yet" with the command that produces it:
  1. Models             every run, and mean / spread of test errors over the seeds of one configuration;
                        each ensemble against the bounds its members set on any average of them
  2. Confusion matrices each run on the test set; each annotator and the human majority on the hard set
  3. Hard-set gallery   every image with label, model predictions, human answers and majority; suspected
                        label errors (human majority != dataset label) flagged and listed first
  4. Human vs model     errors per annotator and phase, controls, agreement, and the headline
  5. Generator assist   fixed / introduced / net per classifier and the net gain over the tau sweep
  6. Pixel bounds       the bounds per subset, held-out figures, heatmaps, glimpse accuracy per step

Written into `out` (default `<workspace>/report/`), which is replaced as a whole once the new report is complete:
  report.html        inline CSS, images as base64 data URIs; no script, font or any other external resource
  report.md          the same text and tables; figures linked from figures/, galleries reduced to their flagged
                     rows once there are human answers (until then, every row)
  <table>.csv        the numbers behind every table and figure (raw values, not the rounded display)
  figures/<name>.png the figures, for report.md
Every string from the workspace (run, hard-set and annotator names, reasons) is escaped: html.escape in the
page; in report.md, Markdown punctuation is backslash-escaped and < > & become entities, so neither markup
nor raw HTML survives.

The "best model" of the headline is the run with the fewest validation errors: the test set chooses nothing.
"""

from __future__ import annotations

import base64
import html
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from benchmark.errors import BenchError
from benchmark.runs import replace_folder_atomically
from reports import figures
from reports.collect import (HardSet, Workspace, assist_tables, bounds_table, collect, ensembles_table,
                             flat_numbers, needs_test_labels, runs_table, seed_groups)
from reports.human import (UNDECIDED, coded, control_accuracy, fleiss_table, final_answers, hardset_errors,
                           majority_vote, pairwise_kappa, reconsidered)

COMMANDS = {
    "runs": "bench train --model cnn",
    "hardset": "bench errors --run RUN",
    "human": "bench human-label --hardset NAME --annotator ID",
    "assist": "bench assist --run RUN",
    "bound": "bench bound --subset all",
    "glimpse": "bench train --model glimpse",
}
DIGITS = [str(d) for d in range(10)]


# Blocks: what a section is made of. Each renders to HTML and to Markdown; tables and figures also to files.

@dataclass
class Text:
    text: str  # plain text, escaped on output
    headline: bool = False


@dataclass
class NotRun:
    what: str
    command: str


@dataclass
class Table:
    name: str  # file stem of its CSV
    frame: pd.DataFrame  # raw values; columns holding PNG bytes are images (HTML only, not in CSV or Markdown)
    caption: str
    flagged: pd.Series | None = None  # bool per row: highlighted, and the only rows a gallery shows in Markdown


@dataclass
class Picture:
    name: str  # file stem of its PNG and CSV
    png: bytes
    caption: str
    data: pd.DataFrame | None  # the numbers drawn; None for images made elsewhere (the bound heatmaps)


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)


# Sections ----------------------------------------------------------------------------------------------

def models_section(runs: pd.DataFrame, ensembles: pd.DataFrame) -> Section:
    section = Section("1. Models")
    if runs.empty:
        section.blocks.append(NotRun("no trained runs in this workspace", COMMANDS["runs"]))
        return section
    groups = seed_groups(runs)
    section.blocks += [
        Table("models", runs[["run", "group", "seed", "parameters", "train_seconds", "machine", "date",
                              "val_errors", "test_errors", "test_accuracy", "members"]],
              "Every run. Test errors are recounted from the saved test probabilities against the MNIST test "
              "labels; validation errors (5,000 held-out training images) are the ones used for any choice."),
        Table("model_groups", groups,
              "Runs that differ only in their seed, grouped: mean, sample standard deviation (ddof=1) and range "
              "of the test errors."),
        Picture("test_errors_by_model", figures.errors_by_group(runs), "Test errors per model and seed.",
                runs[["group", "run", "test_errors"]]),
    ]
    if not ensembles.empty:
        section.blocks.append(Table(
            "ensembles", ensembles,
            "Each ensemble against what its members allow. Any average of the members' probabilities is right "
            "wherever every member is right, and wrong wherever every member gives the same wrong answer, so its test "
            "errors lie between same_wrong_answer_for_all_members and wrong_for_some_member. Recounted from the "
            "members' saved predictions; empty where a member is not in this workspace."))
    return section


def human_confusions(answers: pd.DataFrame, test_labels: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """{hardset: {annotator or "human majority": (10, 11) counts, columns 0-9 then "?" (cannot tell / none)}}."""
    def matrix(answer: np.ndarray, label: np.ndarray) -> np.ndarray:
        return confusion_matrix(label, np.where(answer == UNDECIDED, 10, answer), labels=range(11))[:10]

    final = final_answers(answers)
    majority = majority_vote(final)
    by_set = {}
    for hardset, on_set in final.groupby("hardset", sort=True):
        panels = {annotator: matrix(coded(given["answer"]), test_labels[given["test_index"]])
                  for annotator, given in on_set.groupby("annotator", sort=True)}
        voted = majority[majority["hardset"] == hardset]
        panels["human majority"] = matrix(coded(voted["majority"]), test_labels[voted["test_index"]])
        by_set[hardset] = panels
    return by_set


def long_confusion(panels: dict[str, np.ndarray], columns: list[str], who: str) -> pd.DataFrame:
    """Confusion matrices as one long table: <who>, label, answer, count."""
    return pd.DataFrame([{who: name, "label": label, "answer": columns[col], "count": int(count)}
                         for name, matrix in panels.items() for (label, col), count in np.ndenumerate(matrix)])


def confusion_section(ws: Workspace) -> Section:
    section = Section("2. Confusion matrices")
    if ws.runs:
        panels = {run.name: confusion_matrix(ws.test_labels, run.test_predictions, labels=range(10))
                  for run in ws.runs}
        section.blocks.append(Picture(
            "confusion_test", figures.confusion_grid(panels, DIGITS, "Models on the 10,000 test images"),
            "Rows: dataset label; columns: the model's answer. Colour marks the mistakes only (the grey "
            "diagonal holds the correct answers); every count is printed.",
            long_confusion(panels, DIGITS, "run")))
    else:
        section.blocks.append(NotRun("model confusion matrices: no trained runs", COMMANDS["runs"]))
    if ws.answers is not None and not final_answers(ws.answers).empty:
        for hardset, panels in human_confusions(ws.answers, ws.test_labels).items():
            section.blocks.append(Picture(
                f"confusion_humans_{hardset}",
                figures.confusion_grid(panels, DIGITS + ["?"], f"Humans on hard set {hardset}"),
                f"Hard set {hardset}: each annotator's final answer (considered if given, else quick) and the "
                f"human majority. Column ? = cannot tell / no majority.",
                long_confusion(panels, DIGITS + ["?"], "annotator")))
    else:
        section.blocks.append(NotRun("human confusion matrices: no human answers", COMMANDS["human"]))
    return section


def gallery_table(hardset: HardSet, answers: pd.DataFrame | None) -> pd.DataFrame:
    """One row per hard-set image: image (PNG bytes), test_index, label, "model <run>" ("7 (0.93)": prediction
    and its probability), "human <annotator>" ("quick / considered", ? = cannot tell, – = not answered),
    reasons, votes, human majority, suspected label error. Suspected label errors first, then by test index.
    """
    items = hardset.items
    table = pd.DataFrame({"image": [figures.digit_png(image) for image in hardset.images],
                          "test_index": items["test_index"], "label": items["label"]})
    for column in items.columns:
        if column.endswith("_pred") and f"{column[:-5]}_top3" in items:
            top_probability = items[f"{column[:-5]}_top3"].astype(str).str.split(" ").str[0].str.split(":").str[1]
            table[f"model {column[:-5]}"] = items[column].astype(str) + " (" + top_probability + ")"
    on_set = (answers[(answers["hardset"] == hardset.name) & ~answers["is_control"]]
              if answers is not None else pd.DataFrame())
    if on_set.empty:
        return table
    answer_text = pd.Series(coded(on_set["answer"]), index=on_set.index).astype(str).replace(str(UNDECIDED), "?")
    for annotator, given in on_set.assign(text=answer_text).groupby("annotator", sort=True):
        phases = given.pivot(index="test_index", columns="phase", values="text").reindex(items["test_index"])
        cell = phases["quick"].fillna("–") if "quick" in phases else pd.Series("–", index=phases.index)
        if "considered" in phases:
            cell = cell + " / " + phases["considered"].fillna("–")
        table[f"human {annotator}"] = cell.to_numpy()
    reasons = on_set[on_set["reason"].str.strip() != ""]
    reason_text = (reasons["annotator"] + " (" + reasons["phase"] + "): " + reasons["reason"]).groupby(
        reasons["test_index"]).agg("; ".join)
    table["reasons"] = table["test_index"].map(reason_text).fillna("").to_numpy()
    voted = majority_vote(final_answers(on_set)).set_index("test_index")
    table["votes"] = table["test_index"].map(voted["votes"]).fillna("").to_numpy()
    table["human majority"] = pd.array(table["test_index"].map(voted["majority"]), dtype="Int64")
    table["suspected label error"] = (table["human majority"] != table["label"]).fillna(False).astype(bool)
    return table.sort_values(["suspected label error", "test_index"], ascending=[False, True]).reset_index(drop=True)


def gallery_section(ws: Workspace) -> Section:
    section = Section("3. Hard-set gallery")
    if not ws.hardsets:
        section.blocks.append(NotRun("no hard set gathered", COMMANDS["hardset"]))
    for hardset in ws.hardsets:
        table = gallery_table(hardset, ws.answers)
        runs = ", ".join(hardset.meta.get("runs", []))
        summary = (f"Hard set {hardset.name}: {len(table)} test images ({hardset.meta.get('mode', '?')} of the "
                   f"errors of {runs}).")
        if "human majority" in table:
            flagged = int(table["suspected label error"].sum())
            summary += (f" {flagged} suspected label errors (the human majority names a digit other than the "
                        f"dataset label), shown first and highlighted; {int(table['human majority'].isna().sum())} "
                        f"images without a human majority.")
            section.blocks.append(Text(summary))
        else:
            section.blocks += [Text(summary), NotRun(f"no human answers on {hardset.name}", COMMANDS["human"])]
        section.blocks.append(Table(f"gallery_{hardset.name}", table,
                                    "model: prediction (its probability); human: quick / considered answer.",
                                    table.get("suspected label error")))
    return section


def headline(hardset: str, errors: pd.DataFrame, runs: pd.DataFrame, test_labels: np.ndarray) -> str:
    """The comparison that matters: the best model (by validation errors) on the whole test set, and that
    model against the human majority on the same images, the hard-set images humans labelled."""
    majority = errors[(errors["hardset"] == hardset) & (errors["kind"] == "majority")].iloc[0]
    humans = (f"the human majority makes {majority['wrong']} errors (each a suspected label error, see the "
              f"gallery) and has no majority on {majority['undecided']}")
    chosen = runs.dropna(subset=["val_errors"])
    if chosen.empty:
        return (f"On the {majority['images']} images of hard set {hardset} that humans labelled, {humans}. No run "
                f"records validation errors, so no best model is named (the test set chooses nothing).")
    best = chosen.sort_values(["val_errors", "run"]).iloc[0]
    same = errors[(errors["hardset"] == hardset) & (errors["kind"] == "model") & (errors["who"] == best["run"])].iloc[0]
    outside = best["test_errors"] - same["wrong"]
    return (f"Best model by validation errors: {best['run']}, {best['test_errors']} errors on all "
            f"{len(test_labels):,} test images. On the {same['images']} images of hard set {hardset} that humans "
            f"labelled, {best['run']} makes {same['wrong']} errors and {humans}. "
            + (f"The model's other {outside} errors lie outside these images, where no human was asked."
               if outside else "All of the model's errors are among these images."))


def human_section(ws: Workspace, runs: pd.DataFrame) -> Section:
    section = Section("4. Human vs model")
    if ws.answers is None or ws.answers.empty:
        section.blocks.append(NotRun("no human answers", COMMANDS["human"]))
        return section
    final = final_answers(ws.answers)
    if final.empty:
        section.blocks.append(NotRun("no answers on hard-set images yet (only controls)", COMMANDS["human"]))
    else:
        errors = hardset_errors(ws.answers, ws.test_labels, {run.name: run.test_predictions for run in ws.runs})
        section.blocks += [Text(headline(h, errors, runs, ws.test_labels), headline=True)
                           for h in errors["hardset"].unique()]
        section.blocks.append(Table(
            "human_errors", errors,
            "Errors against the dataset label on the hard-set images, per annotator and phase (final: considered "
            "if given, else quick), for the human majority and for every model on the same images. Undecided: "
            "cannot tell / no majority, not counted as errors. The hard set was chosen by model errors, so models "
            "look worse here than on random images; the headline compares on the whole test set."))
        changes = reconsidered(ws.answers, ws.test_labels)
        if not changes.empty:
            section.blocks.append(Table("quick_vs_considered", changes,
                                        "Images answered quickly and again after thinking: answers changed, fixed "
                                        "(wrong or cannot tell, then right) and broken (right, then not)."))
    controls = control_accuracy(ws.answers, ws.test_labels)
    section.blocks.append(Table("controls", controls, "Control images (easy test images mixed in to check "
                                                      "attention), scored apart from the hard set.")
                          if not controls.empty else Text("No control images were shown."))
    if not final.empty:
        section.blocks += [
            Table("agreement_pairs", pairwise_kappa(final),
                  "Cohen's kappa per pair of annotators on the images both answered (final answers, cannot tell "
                  "as a category); empty when undefined or with a single annotator."),
            Table("agreement_all", fleiss_table(final),
                  "Fleiss' kappa over all annotators of a hard set, on the images every one of them answered."),
        ]
    return section


def assist_section(ws: Workspace) -> Section:
    section = Section("5. Generator assist")
    if not ws.assist:
        section.blocks.append(NotRun("no assist measurement", COMMANDS["assist"]))
        return section
    summary, sweep = assist_tables(ws)
    section.blocks.append(Table("assist", summary, "Per classifier on the test set: errors before, images on "
                                                   "which the generator was consulted, errors fixed, introduced, "
                                                   "net gain (fixed − introduced) and errors after."))
    if not sweep.empty:
        section.blocks.append(Picture("assist_tau_sweep", figures.net_gain_over_tau(sweep),
                                      "Net gain for each threshold tau of the sweep.", sweep))
    return section


def bounds_section(ws: Workspace) -> Section:
    section = Section("6. Pixel bounds")
    bounds = bounds_table(ws)
    if bounds.empty:
        section.blocks.append(NotRun("no pixel bound computed", COMMANDS["bound"]))
    else:
        section.blocks.append(Table(
            "bounds", bounds, "How many images a classifier that sees only one pixel, the best fixed pair, or an "
                              "adaptive pair (the second pixel chosen after seeing the first) can get right at "
                              "most. Pixels are flat indices: row = p // 28, column = p % 28."))
        extra = pd.DataFrame([{"subset": b.summary.get("subset"), "part": part, "figure": key, "value": value}
                              for b in ws.bounds for part in ("heldout", "benchmark")
                              for key, value in flat_numbers(b.summary.get(part) or {}).items()],
                             columns=["subset", "part", "figure", "value"])
        if not extra.empty:
            section.blocks.append(Table("bounds_heldout", extra, "Held-out and benchmark figures as recorded."))
        section.blocks += [Picture(f"heatmap_{b.summary.get('subset')}", b.heatmap_png,
                                   f"Heatmap of subset {b.summary.get('subset')} (bound/{b.summary.get('subset')}"
                                   f"/heatmap.png).", None) for b in ws.bounds if b.heatmap_png]
    # each glimpse run twice: reading bilinearly at its coordinates, and at the nearest pixels
    curves = pd.DataFrame([{"run": run.name + suffix, "step": step, "accuracy": accuracy} for run in ws.runs
                           for key, suffix in (("step_accuracy", ""), ("step_accuracy_rounded", " (rounded)"))
                           for step, accuracy in enumerate(run.meta.get(key) or [], start=1)],
                          columns=["run", "step", "accuracy"])
    if curves.empty:
        section.blocks.append(NotRun("no glimpse model run (a run whose meta.json records step_accuracy)",
                                     COMMANDS["glimpse"]))
    else:
        section.blocks.append(Picture("glimpse_steps", figures.accuracy_per_step(curves, bounds),
                                      "Test accuracy of each glimpse model after each step, read bilinearly "
                                      "and rounded to pixels; a tree-d* run (`bench tree`) is a decision tree "
                                      "cut at depth = step, which reads at most that many pixels; dotted: best "
                                      "single pixel, dashed: adaptive pair (in-sample bounds: accuracy = correct "
                                      "/ total of the subset).",
                                      curves))
    return section


# Rendering ---------------------------------------------------------------------------------------------

MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]|#~])")


def markdown_escape(text: str) -> str:
    """Plain text made inert in Markdown: punctuation backslash-escaped, < > & as entities, one line."""
    return html.escape(MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split())), quote=False)


def cell_text(value) -> str:
    """A table value for display: "–" when missing, 4 significant digits for fractions, "yes" for True."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def image_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if len(frame) and isinstance(frame[c].iloc[0], bytes)]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_block(block) -> str:
    match block:
        case Text(text, True):
            return f'<p class="headline">{html.escape(text)}</p>'
        case Text(text):
            return f"<p>{html.escape(text)}</p>"
        case NotRun(what, command):
            return f'<p class="notrun">Not run yet: {html.escape(what)}. Run <code>{html.escape(command)}</code></p>'
        case Picture(name, png, caption, _):
            return (f'<figure><img src="{data_uri(png)}" alt="{html.escape(name)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        case Table(name, frame, caption, flagged):
            images = image_columns(frame)
            head = "".join(f"<th>{html.escape(str(c).replace('_', ' '))}</th>" for c in frame.columns)
            rows = []
            for i, row in enumerate(frame.itertuples(index=False)):
                cells = "".join(
                    f'<td><img class="digit" src="{data_uri(v)}" alt="test image"></td>' if c in images
                    else f"<td>{html.escape(cell_text(v))}</td>" for c, v in zip(frame.columns, row))
                marked = flagged is not None and bool(flagged.iloc[i])
                rows.append(f'<tr class="flag">{cells}</tr>' if marked else f"<tr>{cells}</tr>")
            return (f'<div class="table"><table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr>'
                    f'</thead><tbody>{"".join(rows)}</tbody></table></div>')
    raise TypeError(f"unknown block {block!r}")


def markdown_block(block, files: dict[int, str]) -> str:
    match block:
        case Text(text, True):
            return f"**{markdown_escape(text)}**"
        case Text(text):
            return markdown_escape(text)
        case NotRun(what, command):  # commands are the fixed COMMANDS, never workspace strings
            return f"*Not run yet:* {markdown_escape(what)}. Run `{command}`"
        case Picture(_, _, caption, _):
            return f"![{markdown_escape(caption)}](figures/{files[id(block)]}.png)"
        case Table(_, frame, caption, flagged):
            images = image_columns(frame)
            note = f"*{markdown_escape(caption)}* (data: `{files[id(block)]}.csv`)"
            if images and flagged is not None:
                frame = frame[flagged.to_numpy()]
                note += f" Showing the {len(frame)} highlighted rows; the page shows all with their images."
            frame = frame.drop(columns=images)
            if frame.empty:
                return note
            lines = ["| " + " | ".join(markdown_escape(str(c).replace("_", " ")) for c in frame.columns) + " |",
                     "|" + "---|" * len(frame.columns)]
            lines += ["| " + " | ".join(markdown_escape(cell_text(v)) for v in row) + " |"
                      for row in frame.itertuples(index=False)]
            return note + "\n\n" + "\n".join(lines)
    raise TypeError(f"unknown block {block!r}")


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.meta, figcaption, caption { color: #555; font-size: 0.9em; }
caption { caption-side: top; text-align: left; padding-bottom: 0.4em; }
.headline { font-size: 1.1em; background: #eef5fb; border-left: 4px solid #3182bd; padding: 0.6em 0.8em; }
.notrun { background: #f6f6f6; border-left: 4px solid #aaa; padding: 0.5em 0.8em; }
.problem { color: #a50f15; }
code { background: #f0f0f0; padding: 0.1em 0.3em; border-radius: 3px; }
.table { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: left; vertical-align: middle; }
th { background: #f4f4f4; }
tr.flag td { background: #fde0dd; }
img.digit { width: 56px; height: 56px; image-rendering: pixelated; display: block; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
"""


def render_html(title: str, subtitle: str, problems: list[str], sections: list[Section]) -> str:
    contents = "".join(f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections))
    body = "".join(f'<p class="problem">Skipped: {html.escape(p)}</p>' for p in problems)
    for i, section in enumerate(sections):
        body += f'<h2 id="s{i}">{html.escape(section.title)}</h2>' + "\n".join(map(html_block, section.blocks))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="meta">{html.escape(subtitle)}</p><ul>{contents}</ul>{body}</body></html>\n')


def render_markdown(title: str, subtitle: str, problems: list[str], sections: list[Section],
                    files: dict[int, str]) -> str:
    parts = [f"# {markdown_escape(title)}", markdown_escape(subtitle)]
    parts += [f"Skipped: {markdown_escape(p)}" for p in problems]
    for section in sections:
        parts.append(f"## {markdown_escape(section.title)}")
        parts += [markdown_block(block, files) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def file_stems(sections: list[Section]) -> dict[int, str]:
    """A unique, filesystem-safe stem for every table and picture (names may hold user strings)."""
    stems, used = {}, set()
    for block in (b for s in sections for b in s.blocks if isinstance(b, (Table, Picture))):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", block.name).strip("._") or "part"
        candidate, n = stem, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{stem}-{n}"
        used.add(candidate.lower())
        stems[id(block)] = candidate
    return stems


def build_report(workspace: Path, out: Path | None = None, data_dir: Path | None = None,
                 test_labels: np.ndarray | None = None) -> Path:
    """Write report.html, report.md, the CSVs and figures for `workspace` into `out`; returns the HTML path.

    test_labels (10000,): the MNIST test labels; loaded with `load_mnist(data_dir, workspace)` when not
    given and the workspace holds something to score (tests pass fabricated ones).
    The report replaces an earlier one in `out` as a whole, once it is complete (no stale tables from runs
    since deleted); `out` must be new, empty or such an earlier report, so nothing else is ever deleted.
    """
    workspace = Path(workspace)
    out = Path(out) if out is not None else workspace / "report"
    # an earlier report holds only what `write` below makes: the folder is replaced whole, so anything else in it
    # (a user's notes beside a report.html) would be deleted with it
    earlier_report = out.is_dir() and all(
        entry.name in ("report.html", "report.md") or (entry.suffix == ".csv" and entry.is_file())
        or (entry.name == "figures" and entry.is_dir()) for entry in out.iterdir())
    if out.exists() and not earlier_report:
        what = "a folder with other files in it" if out.is_dir() else "a file"
        raise BenchError(f"--out {out} is {what}; give a new or empty folder, or the folder of an earlier report")
    if test_labels is None and needs_test_labels(workspace):
        from benchmark.data import load_mnist

        test_labels = load_mnist(data_dir, workspace).test_labels
    ws = collect(workspace, test_labels)
    runs = runs_table(ws)
    sections = [models_section(runs, ensembles_table(ws)), confusion_section(ws), gallery_section(ws),
                human_section(ws, runs), assist_section(ws), bounds_section(ws)]

    stems = file_stems(sections)
    title = "digit-bench report"
    subtitle = f"Workspace {workspace.resolve()}, written {time.strftime('%Y-%m-%d %H:%M')}."

    def write(folder: Path) -> None:
        (folder / "figures").mkdir()
        for block in (b for s in sections for b in s.blocks):
            if isinstance(block, Picture):
                (folder / "figures" / f"{stems[id(block)]}.png").write_bytes(block.png)
            data = block.frame if isinstance(block, Table) else getattr(block, "data", None)
            if data is not None:
                data.drop(columns=image_columns(data)).to_csv(folder / f"{stems[id(block)]}.csv", index=False)
        (folder / "report.md").write_text(render_markdown(title, subtitle, ws.problems, sections, stems))
        (folder / "report.html").write_text(render_html(title, subtitle, ws.problems, sections))

    return replace_folder_atomically(out, write) / "report.html"

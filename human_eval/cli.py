"""`bench human-label`: the labelling session and its status, export and import commands.

Registered in benchmark/cli.py with `app.add_typer(human_app, name="human-label")`; the shared options and
error handling come from benchmark.cli_common.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from benchmark.cli_common import DataDirOpt, WorkspaceOpt, console, user_errors, workspace_path
from benchmark.errors import BenchError

human_app = typer.Typer(pretty_exceptions_enable=False)


def say(message: str) -> None:
    """Print plain text: no rich markup (paths and ids may hold brackets), no number highlighting."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


class UI(str, Enum):
    terminal = "terminal"
    window = "window"


class ExportFormat(str, Enum):
    labelstudio = "labelstudio"
    csv = "csv"


@human_app.callback(invoke_without_command=True)
@user_errors
def label(ctx: typer.Context,
          hardset: Optional[str] = typer.Option(None, "--hardset", help="Hard set to label (made by `bench errors`)."),
          annotator: Optional[str] = typer.Option(None, "--annotator",
                                                  help="Your annotator id; the same id resumes where you stopped."),
          ui: UI = typer.Option(UI.terminal, "--ui", help="Label in this terminal or in a matplotlib window."),
          controls: Optional[int] = typer.Option(None, "--controls", help="Mix in N test images every run got "
                                                 "right, scored apart (default 0; a resumed session keeps its N)."),
          think: Optional[bool] = typer.Option(None, "--think/--no-think", help="After each quick answer, a second "
                                               "look (larger, inverted, high contrast, pixel grid) to revise it and "
                                               "give a reason (default off; a resumed session keeps its choice)."),
          data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Label hard-set images blind (no label, no model prediction shown), one key per image.

    Keys: 0-9 answer, ? cannot tell, u undo, q save and quit. Each answer is saved at once; rerun to resume.
    """
    if ctx.invoked_subcommand is not None:
        return
    if not hardset or not annotator:
        raise BenchError("give --hardset NAME and --annotator ID to label, or a command (status, export, import); "
                         "see `bench human-label --help`")
    from human_eval.session import open_session
    from human_eval.store import AnnotationStore, default_db_path
    from human_eval.terminal import require_terminal, run_terminal
    from human_eval.window import require_display, run_window

    if ui == UI.terminal:
        require_terminal(sys.stdin)
    else:
        require_display()
    ws = workspace_path(workspace)
    with AnnotationStore(default_db_path(ws)) as store:
        session = open_session(ws, store, hardset, annotator, ui.value, think, controls, data_dir)
        try:
            (run_terminal if ui == UI.terminal else run_window)(session)
        finally:
            session.close()
        view = session.view()
    if view.mode == "finished":
        say(f"{annotator} has answered all {view.total} items of {hardset}; scores: `bench human-label status`")
    else:
        say(f"saved: {annotator} has answered {view.answered} of {view.total} items of {hardset}; "
            f"run the same command to resume")


@human_app.command()
@user_errors
def status(data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Each annotator's progress per hard set; once finished, their errors against the dataset labels."""
    from human_eval.status import progress
    from human_eval.store import default_db_path

    ws = workspace_path(workspace)
    db = default_db_path(ws)
    if not db.exists():
        say(f"no annotations yet ({db} does not exist); start with `bench human-label --hardset NAME "
            f"--annotator ID`")
        return
    rows = progress(ws, db, data_dir)
    count = lambda column: rows[column].map(lambda v: "" if v != v else f"{v:.0f}")  # noqa: E731  NaN: not scored
    shown = {"hard set": rows["hardset"], "annotator": rows["annotator"],
             "answered": [f"{a}/{t}" + (" done" if f else "") for a, t, f in zip(rows["answered"], rows["total"],
                                                                                 rows["finished"])],
             "errors": count("errors"), "?": count("cannot_tell"),
             "think errors": count("considered_errors"), "think ?": count("considered_cannot_tell"),
             "controls right": [f"{r:.0f}/{c:.0f}" if c == c else "" for r, c in zip(rows["controls_right"],
                                                                                   rows["controls"])],
             "median s": rows["median_seconds"].map("{:.1f}".format)}
    shown = {name: list(values) for name, values in shown.items() if any(v != "" for v in values)}  # unused: drop
    table = Table(title=f"human labelling ({escape(str(db))})")
    for name in shown:
        table.add_column(name)
    for cells in zip(*shown.values()):
        table.add_row(*map(escape, cells))
    console.print(table)
    say("errors: wrong digit on hard-set items; ?: cannot tell (not an error); think: the considered answers "
        "(--think); scores appear once an annotator has answered every item")


@human_app.command()
@user_errors
def export(out: Path = typer.Option(..., "--out", help="Folder to write into."),
           hardset: Optional[str] = typer.Option(None, "--hardset", help="Hard set (required for labelstudio; "
                                                 "for csv, only its answers; default all)."),
           format: ExportFormat = typer.Option(ExportFormat.labelstudio, "--format",
                                               help="labelstudio: PNGs, tasks.json, label_config.xml; "
                                                    "csv: the final answers."),
           controls: int = typer.Option(0, "--controls", help="labelstudio: mix in N control images (the same as "
                                                             "a terminal session with --controls N)."),
           image_url: str = typer.Option("/data/local-files/?d=images/", "--image-url",
                                         help="labelstudio: URL prefix of the PNGs as Label Studio will see them "
                                              "(default: its local-file serving with document root --out)."),
           data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Export a hard set as a Label Studio project, or the answers as CSV."""
    from human_eval.labelstudio import export_csv, export_labelstudio
    from human_eval.store import default_db_path

    ws = workspace_path(workspace)
    if format == ExportFormat.csv:
        path, count = export_csv(default_db_path(ws), out, hardset)
        say(f"{count} final answers written to {path}")
        return
    if not hardset:
        raise BenchError("--format labelstudio needs --hardset NAME")
    tasks, count = export_labelstudio(ws, hardset, out, controls, data_dir, image_url)
    say(f"{count} tasks written to {tasks}; set up the Label Studio project with "
                  f"{out / 'label_config.xml'} and serve {out / 'images'} at {image_url}")


@human_app.command("import")
@user_errors
def import_(file: Path = typer.Argument(..., help="A Label Studio JSON export of a project made with `export`."),
            annotator_from: str = typer.Option("completed_by", "--annotator-from",
                                               help="Annotation field that names the annotator."),
            workspace: Optional[Path] = WorkspaceOpt):
    """Read a Label Studio JSON export into the annotation database (re-importing adds nothing twice)."""
    from human_eval.labelstudio import import_labelstudio
    from human_eval.store import AnnotationStore, default_db_path

    ws = workspace_path(workspace)
    with AnnotationStore(default_db_path(ws)) as store:
        summary = import_labelstudio(store, file, annotator_from, ws)
    say(f"imported {summary.imported} answers from {', '.join(summary.annotators) or 'nobody'}; "
                  f"{summary.already_there} were already there, {summary.skipped} skipped (cancelled or empty)")

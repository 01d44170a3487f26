"""What every `bench` sub-command shares: the consoles, the workspace and data-dir options, and the
decorator that turns a `BenchError` into one line on stderr and exit code 2 (no traceback)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from benchmark.errors import BenchError

console = Console()
err_console = Console(stderr=True)

WorkspaceOpt = typer.Option(None, "--workspace", envvar="BENCH_WORKSPACE",
                            help="Workspace folder for all artefacts (default: ./workspace).")
DataDirOpt = typer.Option(None, "--data-dir", help="Folder with the four MNIST IDX files (.gz or raw); "
                                                   "else BENCH_DATA_DIR, the workspace cache, or a download.")


def user_errors(command):
    """Turn BenchError, and an OSError from the file system (a read-only folder, a file where a folder should be,
    a full disk), into `error: ...` on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BenchError as exc:
            message = str(exc)
        except OSError as exc:
            message = (f"{exc.filename or 'a file'}: {exc.strerror or type(exc).__name__}; check that --workspace "
                       f"(or --out) is a folder you can write to")
        err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)

    return wrapper


def check_name(name: str, kind: str) -> str:
    """A name given with --name: it names a folder in <workspace>/<kind> (runs, hardsets), so it must be one
    path part, not hidden."""
    from benchmark.runs import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(name):
        raise BenchError(f"--name {name!r}: use letters, digits and . _ + - only, starting with a letter or digit "
                         f"(it names the folder <workspace>/{kind}/NAME)")
    return name


def workspace_path(workspace: Optional[Path]) -> Path:
    from benchmark.runs import resolve_workspace

    return resolve_workspace(workspace)

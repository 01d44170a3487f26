"""The one exception type the CLI turns into a one-line message and exit code 2.

Raise `BenchError` for anything the user can fix (a missing file, a bad option, an unknown run); the CLI
prints `error: <message>` without a traceback. Programming errors stay ordinary exceptions.
"""


class BenchError(Exception):
    """A problem with the user's input or files; the message says what is wrong and what to do."""


def first_line(exc: BaseException) -> str:
    """"Type: first line of the message" (at most 200 characters) of an exception caught to be reported inside a
    one-line BenchError; just the type when the message is empty."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__

"""The one exception type the CLI turns into a one-line message and exit code 2.

Raise `BenchError` for anything the user can fix (a missing file, a bad option, an unknown run); the CLI
prints `error: <message>` without a traceback. Programming errors stay ordinary exceptions.
"""


class BenchError(Exception):
    """A problem with the user's input or files; the message says what is wrong and what to do."""

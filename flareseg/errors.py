"""The one exception type the project raises for bad input or a failed check.

Command-line entry points turn it into a one-line message and exit code 2.
"""


class FlareSegError(Exception):
    """A user-facing error: the message names the file or value and the problem."""

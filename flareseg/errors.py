"""The one exception type the project raises for bad input or a failed check.

Command-line entry points turn it into a one-line message and exit code 2.
"""

from __future__ import annotations


class FlareSegError(Exception):
    """A user-facing error: the message names the file or value and the problem, on one line.

    A message that quotes another library's error may carry that error's line breaks
    (pydicom lists each decoder's failure on a line of its own); they become "; ".
    """

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        if "\n" in text:
            parts = [part.strip() for part in text.splitlines() if part.strip()]
            text = "".join(
                p + ("" if i == len(parts) - 1 else " " if p.endswith(":") else "; ") for i, p in enumerate(parts)
            )
        super().__init__(text, *args)

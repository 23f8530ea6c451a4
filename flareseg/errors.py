"""The one exception type the project raises for bad input or a failed check.

Command-line entry points turn it into a one-line message and exit code 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence


class FlareSegError(Exception):
    """A user-facing error: the message names the file or value and the problem, on one line.

    A message that quotes another library's error may carry that error's line breaks
    (pydicom lists each decoder's failure on a line of its own); they become "; ".
    """

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        if "\n" in text:
            parts = [part.strip() for part in text.splitlines() if part.strip()]
            text = parts[0] if parts else ""
            for part in parts[1:]:
                # After a colon, a space; before closing punctuation, nothing; else "; ".
                text += (" " if text.endswith(":") else "" if part[0] in ")]}" else "; ") + part
        super().__init__(text, *args)


@contextlib.contextmanager
def gpu_memory_errors(where: object, batch: int, way_out: str) -> Iterator[None]:
    """A GPU running out of memory (foreseeable on a small or shared GPU) becomes one line with the way out.

    The failed batch's cached blocks go back to the driver once its error (and the frames holding its tensors)
    is gone, so that the next case of a folder, or another process, finds the memory free.
    """
    first: str | None = None
    try:
        yield
    except RuntimeError as exc:
        if not no_room(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:160]
    if first is not None:
        import torch

        torch.cuda.empty_cache()
        raise FlareSegError(f"{where}: the GPU ran out of memory at batch size {batch} ({first}); {way_out}")


@contextlib.contextmanager
def interrupts_kept(wrapped_in: type[Exception] = Exception) -> Iterator[None]:
    """Ctrl-C or SIGTERM that a library wrapped in an error of its own unwinds as itself.

    torch.onnx.export catches everything while it traces: an interrupt that lands in one of
    its lazy imports comes out as a TorchExportError (with a second error from the
    half-imported module) instead of the KeyboardInterrupt the command turns into exit 130.
    An extension module (torch, ONNX Runtime, OpenVINO) reports one in its set-up as
    ``ImportError("initialization failed")``. ``wrapped_in``: the errors looked into (a
    command's edge looks into ImportError only: an error of our own raised while a stop
    was being handled stays that error).
    """
    try:
        yield
    except wrapped_in as exc:
        stop = wrapped_interrupt(exc)
        if stop is not None:
            raise stop from None
        raise


def wrapped_interrupt(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM among an error's causes (see :func:`interrupts_kept`), or None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def no_room(exc: BaseException) -> bool:
    """Whether an error is a GPU allocation failure: torch's allocator's (``torch.OutOfMemoryError``), or cuDNN's
    or cuBLAS's own, which reach Python as a plain RuntimeError naming their status."""
    import torch  # asked only where torch already runs

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        status in text for status in ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA out of memory")
    )


def first_few(names: Sequence[str], shown: int = 3) -> str:
    """Names for a one-line message: the first ``shown``, and how many more there are."""
    rest = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {rest} more" if rest > 0 else "")

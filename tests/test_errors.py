"""An interrupt that lands in an extension module's initialisation stays an interrupt.

pybind11 modules (ONNX Runtime, OpenVINO, TensorRT) report any error in their
initialisation, a KeyboardInterrupt included, as ``ImportError("initialization failed")``
with the interrupt as its cause. Each optional import used to read that as "not
installed": a Ctrl-C or a SIGTERM from a service manager ended in exit 2 and advice to
reinstall a package. The import is simulated here (the real one cannot be interrupted on
cue); what is under test is our handling of its error.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

import pytest

from flareseg.errors import FlareSegError


def _importers() -> dict[str, tuple[str, Callable[[], Any]]]:
    from flareseg import volume
    from flareseg.bench import backends, measure, report
    from flareseg.export import int8, tensorrt
    from flareseg.runtime import memory
    from flareseg.runtime.runners import onnxrt, openvino

    return {
        "onnxruntime": ("onnxruntime", onnxrt.import_onnxruntime),
        "openvino": ("openvino", openvino.import_openvino),
        "tensorrt": ("tensorrt", tensorrt.import_tensorrt),
        "tensorrt preload": ("tensorrt", onnxrt._preload_tensorrt),
        "nncf": ("nncf", int8.import_nncf),
        "isal": ("isal", volume._import_isal),
        "rapidgzip": ("rapidgzip", lambda: volume.check_read_threads(2)),
        "matplotlib": ("matplotlib.figure", lambda: report._figure((1.0, 1.0))),
        "fvcore": ("fvcore.nn", lambda: measure.count_flops(None, 1, (16, 16))),
        "nvml": ("pynvml", lambda: memory.nvml_used_mb(_Device())),
        "nvml sampler": ("pynvml", measure.NvmlSampler),
        "openvino capabilities": ("openvino", backends.openvino_cpu_capabilities),
    }


class _Device:
    index = 0


def _failing_import(monkeypatch: pytest.MonkeyPatch, name: str, cause: BaseException | None) -> None:
    real = builtins.__import__

    def fake(module: str, *args: Any, **kwargs: Any) -> Any:
        if module == name:
            if cause is None:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            raise ImportError("initialization failed") from cause
        return real(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


@pytest.mark.parametrize("what", list(_importers()))
def test_an_interrupt_during_an_optional_import_stays_an_interrupt(monkeypatch, what):
    module, load = _importers()[what]
    _failing_import(monkeypatch, module, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        load()


@pytest.mark.parametrize("what", ["onnxruntime", "openvino", "nncf", "rapidgzip", "fvcore"])
def test_a_missing_package_is_still_said_as_such(monkeypatch, what):
    module, load = _importers()[what]
    _failing_import(monkeypatch, module, None)
    with pytest.raises(FlareSegError, match=r"(not installed|needs \w+)"):
        load()


def test_an_interrupt_an_error_was_raised_while_handling_is_found_too():
    # Implicit chaining (no `from`): the stop is the error's __context__ only.
    from flareseg.errors import wrapped_interrupt

    stop = KeyboardInterrupt()
    try:
        try:
            raise stop
        except KeyboardInterrupt:
            raise ImportError("initialization failed")  # noqa: B904
    except ImportError as exc:
        assert exc.__cause__ is None and exc.__context__ is stop
        assert wrapped_interrupt(exc) is stop

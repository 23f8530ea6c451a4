"""Static post-training INT8 quantisation of the deploy graph, written as a QDQ ONNX.

Weights are quantised per output channel, symmetric int8; activations get ranges
calibrated on normalised CT slices (the training cases given, or the phantom). The
result is an ordinary ONNX graph with QuantizeLinear/DequantizeLinear pairs, which both
ONNX Runtime and OpenVINO run with integer kernels.

Two quantisers can write that graph: ONNX Runtime's ``quantize_static`` (always
installed with ONNX Runtime) and NNCF's ``nncf.quantize`` (optional). The default was
picked by measurement (benchmarks/cpu_paths.md). The quantised model is verified before
it is written: its labels must agree with the fp32 PyTorch model on held-out slices,
never the calibration ones.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flareseg.checkpoint import ModelInfo
from flareseg.errors import FlareSegError, interrupts_kept
from flareseg.export.options import (
    DEFAULT_CALIBRATION_SLICES,
    DEFAULT_HELD_OUT_SLICES,
    FLOAT_LAYERS,
    FloatLayer,
    Quantizer,
)

# Defined in flareseg.export.options since flare-export's parser needs them without torch; kept importable here.
from flareseg.export.options import DEFAULT_FLOAT_LADDER as DEFAULT_FLOAT_LADDER
from flareseg.export.options import DEFAULT_MIN_AGREEMENT as DEFAULT_MIN_AGREEMENT
from flareseg.export.options import DEFAULT_QUANTIZER as DEFAULT_QUANTIZER
from flareseg.preprocess import network_batch, normalize_volume

log = logging.getLogger(__name__)

#: Operators of the deploy graph that the quantisation path knows.
QUANTIZABLE_GRAPH_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Relu",
        "MaxPool",
        "Concat",
        "Resize",
        "Shape",
        "ArgMax",
        "Cast",
        "Constant",
        "Gather",
        "Slice",
        "Unsqueeze",
    }
)
_MAX_CALIBRATION_CASES = 8
_NNCF_CALL = threading.Lock()


@dataclass(frozen=True)
class CalibrationSlices:
    """Normalised slices (N, H, W) at their own size: some to calibrate on, others held out to verify."""

    calibration: np.ndarray
    held_out: np.ndarray
    source: str


def _usable(slices: np.ndarray) -> np.ndarray:
    """Indices of slices that carry an image (not constant, e.g. padding outside the scan)."""
    flat = slices.reshape(len(slices), -1)
    return np.flatnonzero(flat.max(axis=1) - flat.min(axis=1) > 1e-3)


def calibration_slices(
    info: ModelInfo,
    folder: str | os.PathLike[str] | None,
    *,
    count: int = DEFAULT_CALIBRATION_SLICES,
    held_out: int = DEFAULT_HELD_OUT_SLICES,
    seed: int = 0,
) -> CalibrationSlices:
    """Calibration and held-out slices from the cases of ``folder`` (NIfTI files, or else DICOM series: one in the
    folder itself, or one per subfolder), or from phantoms when None.

    Slices are taken evenly through each volume and dealt alternately to the two sets, so
    that both cover the whole body while no slice is in both. With a folder, at most
    eight cases (evenly spread over the folder) are read.
    """
    if count < 1 or held_out < 1:
        raise FlareSegError(f"INT8 needs at least one calibration and one held-out slice, got {count} and {held_out}")
    total = count + held_out
    if folder is None:
        from flareseg.export.inputs import PHANTOM_DESCRIPTION, phantom_ct

        volumes = [normalize_volume(phantom_ct(seed + k), info.normalization) for k in range(2)]
        source = f"synthetic phantoms (2 x {PHANTOM_DESCRIPTION})"
        pool = _slices_from(volumes, total)
    else:
        from flareseg.export.inputs import read_ct_normalized
        from flareseg.volume import find_cases

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise FlareSegError(f"{folder}: is a file; --calibration takes a folder of CT NIfTI files or DICOM series")
        if not folder.is_dir():
            raise FlareSegError(f"{folder}: calibration folder not found (expected CT NIfTI files or DICOM series)")
        cases = list(find_cases(folder).values())
        kind = "case(s)"
        if not cases:
            cases, kind = _series_cases(folder), "DICOM series"
        elif _holds_series(folder):  # flare-infer would segment both kinds: say which one calibrates
            log.warning("%s: calibrating on its NIfTI files; the DICOM series beside them are left out", folder)
        if not cases:
            raise FlareSegError(
                f"{folder}: no NIfTI files (.nii or .nii.gz) nor DICOM series (in it or its subfolders) to calibrate on"
            )
        spread = np.linspace(0, len(cases) - 1, _MAX_CALIBRATION_CASES).round().astype(int)
        chosen = [cases[i] for i in np.unique(spread)]
        per_case = -(-total // len(chosen))
        slices: list[np.ndarray] = []
        for path in chosen:
            volume = read_ct_normalized(path, info.normalization, "--calibration")
            # A case without usable slices adds none; cases may differ in in-plane size.
            slices.extend(_slices_from([volume], per_case))
        pool = _pool(slices)
        source = f"{len(chosen)} {kind} of {folder}"
    if len(pool) < 2:
        raise FlareSegError(
            f"{folder or 'phantom'}: {len(pool)} usable slice(s) to calibrate on (constant slices are skipped); "
            "INT8 needs at least 2 (one to calibrate, one held out)"
        )
    # Held-out slices evenly spread over the pool (so both sets span the body); the rest calibrate. A pool short of
    # both counts gives the held-out set what calibration leaves, and at least half of the pool.
    n_held = min(held_out, max(len(pool) - count, len(pool) // 2))
    mask = np.zeros(len(pool), bool)
    mask[((np.arange(n_held) + 0.5) * len(pool) / n_held).astype(int)] = True
    held = pool[mask]
    calib = pool[~mask][:count]
    if len(calib) < count or len(held) < held_out:
        log.warning(
            "INT8: %d calibration and %d held-out slice(s) from %s, fewer than the %d and %d asked (constant slices "
            "are skipped): the agreement is measured on those %d",
            len(calib),
            len(held),
            source,
            count,
            held_out,
            len(held),
        )
    return CalibrationSlices(calibration=calib, held_out=held, source=source)


def _holds_series(folder: Path) -> bool:
    """Whether ``folder`` or one of its subfolders holds a DICOM image series (judged by a look at their first
    files; DICOM SEG results are none, as flare-infer's folder listing passes them over)."""
    from flareseg.dicom import holds_image_series

    try:
        return holds_image_series(folder) or any(sub.is_dir() and holds_image_series(sub) for sub in folder.iterdir())
    except OSError:  # the calibration reads what it can, and says the rest
        return False


def _series_cases(folder: Path) -> list[Path]:
    """The DICOM series to calibrate on where ``folder`` holds no NIfTI file: itself, or its subfolders' series."""
    from flareseg.dicom import find_series, is_series_dir

    # Names that clash matter to outputs only: calibration writes none.
    return [folder] if is_series_dir(folder) else list(find_series(folder, keep_clashes=True).values())


def _slices_from(volumes: Sequence[np.ndarray], count: int) -> np.ndarray:
    """Up to ``count`` usable slices spread evenly over the volumes (same size within one volume)."""
    out = []
    per_volume = -(-count // len(volumes))
    for volume in volumes:
        usable = _usable(volume)
        if len(usable) == 0:
            continue
        idx = usable[np.unique(np.linspace(0, len(usable) - 1, min(per_volume, len(usable))).round().astype(int))]
        out.append(volume[idx])
    return _pool([s for v in out for s in v])


def _pool(slices: Sequence[np.ndarray]) -> np.ndarray:
    """(N, H, W) slices as one array: stacked when they share a size, else a 1-D object array of slices.

    Slices of different in-plane sizes cannot stack; network_inputs resizes each to the network size.
    """
    if not slices:
        return np.empty((0, 1, 1), np.float32)
    if len({s.shape for s in slices}) == 1:
        return np.stack(slices)
    # Filled one by one: np.asarray(..., dtype=object) broadcasts, and fails, when only the widths differ.
    pool = np.empty(len(slices), dtype=object)
    for i, s in enumerate(slices):
        pool[i] = s
    return pool


def network_inputs(slices: np.ndarray, info: ModelInfo, channels: int) -> np.ndarray:
    """(N, H, W) slices (possibly of mixed sizes) -> (N, channels, h, w) float32 network input."""
    batches = [network_batch(np.asarray(s, dtype=np.float32)[None], info.slice_size, channels).numpy() for s in slices]
    return np.concatenate(batches)


def float_layer_nodes(model: Any, keep: Sequence[FloatLayer]) -> dict[str, list[str]]:
    """Node names of the requested float layers, by role, in the exported deploy graph."""
    graph = model.graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if not convs:
        raise FlareSegError("cannot quantise this model: its graph has no convolution")
    found: dict[str, list[str]] = {}
    for layer in keep:
        if layer == "first-conv":
            found[layer] = [convs[0].name]
        elif layer == "last-conv":
            found[layer] = [convs[-1].name]
        elif layer == "resize":
            found[layer] = [n.name for n in graph.node if n.op_type == "Resize"]
        else:
            raise FlareSegError(f"unknown float layer {layer!r}; expected one of {', '.join(FLOAT_LAYERS)}")
    return found


def check_quantizable(model: Any) -> None:
    """Refuse, before calibrating, a graph with operators the quantisation path does not know."""
    ops = {n.op_type for n in model.graph.node}
    unknown = sorted(ops - QUANTIZABLE_GRAPH_OPS)
    if unknown:
        raise FlareSegError(f"cannot quantise this model to INT8: unsupported operators {', '.join(unknown)}")
    if any(i.type.tensor_type.elem_type != 1 for i in model.graph.input):  # 1 = FLOAT
        raise FlareSegError("cannot quantise this model to INT8: its input is not float32")
    if any(init.data_type != 1 for init in model.graph.initializer if init.name.endswith("weight")):
        raise FlareSegError("cannot quantise this model to INT8: its weights are not float32 (quantise fp32 models)")


class _PreprocessingAdvice(logging.Filter):
    """Drops quantize_static's advice to run its pre-processing script (shape inference and
    graph optimisation): the exported graph is already optimised and shape-inferred."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """ONNX Runtime logs that advice on the root logger; filter it for the call only, then restore."""
    advice = _PreprocessingAdvice()
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _temp_folder_full(model: Any) -> str:
    """What to add to a failed ONNX Runtime quantisation whose temporary folder had no room for its copies of the
    model: its shape inference cuts its file short on a full disk without a word, and the load after it then
    reports a corrupt model."""
    folder = tempfile.gettempdir()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    needed = 3 * model.ByteSize()  # the model saved, shape-inferred and quantised there
    if free >= needed:
        return ""
    return (
        f" (the temporary folder {folder} has {free / 2**20:.1f} MB free, and the quantiser writes about "
        f"{needed / 2**20:.1f} MB there: free space, or set TMPDIR)"
    )


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Raise a library logger's level for a block, then restore it (the exporter and NNCF report what is not
    actionable here)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _nncf_quiet() -> Iterator[None]:
    """NNCF logs on stdout and draws progress bars on rich's shared console (stdout too), among the command's
    result lines that scripts read; the export's own bar shows this step. Both are quiet for the call only, and
    nothing else's stdout is touched (a service may export from one thread while others write). One NNCF call at a
    time in a process: two that overlapped would each restore what the other set."""
    import rich

    with _NNCF_CALL:
        console = rich.get_console()
        quiet = console.quiet
        console.quiet = True
        try:
            with quiet_logger("nncf"):
                yield
        finally:
            console.quiet = quiet


def quantizer_version(quantizer: Quantizer) -> str:
    if quantizer == "nncf":
        return f"nncf {import_nncf().__version__}"
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def import_nncf() -> Any:
    try:
        with interrupts_kept():
            import nncf
    except ImportError:
        raise FlareSegError("NNCF is not installed: `pip install nncf` (or use --quantizer onnxruntime)") from None
    return nncf


def quantize(
    model: Any, inputs: np.ndarray, exclude: Sequence[str], quantizer: Quantizer, input_name: str = "image"
) -> tuple[Any, dict[str, Any]]:
    """A QDQ INT8 copy of the fp32 ONNX ``model``, calibrated on ``inputs`` (N, C, h, w); and its settings."""
    import onnx

    check_quantizable(model)
    feeds = [{input_name: inputs[i : i + 1]} for i in range(len(inputs))]
    try:
        if quantizer == "nncf":
            nncf = import_nncf()
            settings: dict[str, Any] = {
                "preset": "performance (symmetric weights and activations)",
                "weights": "int8 per-channel symmetric",
                "activations": "int8 per-tensor symmetric",
                "subset_size": len(feeds),
                "fast_bias_correction": True,
            }
            scope = nncf.IgnoredScope(names=list(exclude)) if exclude else None
            kwargs: dict[str, Any] = {"ignored_scope": scope} if scope else {}
            with _nncf_quiet():
                quantized = nncf.quantize(
                    model,
                    nncf.Dataset(feeds),
                    preset=nncf.QuantizationPreset.PERFORMANCE,
                    subset_size=len(feeds),
                    fast_bias_correction=True,
                    **kwargs,
                )
        elif quantizer == "onnxruntime":
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

            class _Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._it = iter(feeds)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(self._it, None)

            # uint8 activations with a zero point: ONNX Runtime's x86 integer kernels (u8 x s8, VNNI) ran this
            # graph 1.4x faster than with symmetric int8 activations (benchmarks/cpu_paths.md).
            settings = {
                "format": "QDQ",
                "weights": "int8 per-channel symmetric",
                "activations": "uint8 per-tensor asymmetric",
                "calibration": "MinMax",
            }
            with tempfile.TemporaryDirectory(prefix="flareseg-int8-") as tmp, _without_preprocessing_advice():
                # quantize_static works on files: it re-saves the model to run its shape inference.
                src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
                onnx.save(model, str(src))
                quantize_static(
                    str(src),
                    str(dst),
                    _Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(exclude),
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                )
                quantized = onnx.load(str(dst))
        else:
            raise FlareSegError(f"quantizer must be onnxruntime or nncf, got {quantizer!r}")
    except FlareSegError:
        raise
    except Exception as exc:  # the quantisers raise many types; the user needs one line
        text = str(exc).strip().splitlines()
        raise FlareSegError(
            f"cannot quantise this model to INT8 with {quantizer}: {type(exc).__name__}: {text[0] if text else ''}"
            + (_temp_folder_full(model) if quantizer == "onnxruntime" else "")
        ) from None
    if not any(n.op_type == "QuantizeLinear" for n in quantized.graph.node):
        raise FlareSegError(f"cannot quantise this model to INT8: {quantizer} quantised no layer")
    return quantized, settings

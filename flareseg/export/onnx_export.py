"""Export a checkpoint to a verified ONNX deploy graph (fp32, and optionally fp16 and INT8).

The export verifies itself before anything is written: the ONNX model runs in ONNX
Runtime on random slices and on real CT slices, and its outputs are compared with the
PyTorch training network (3-channel replicated input, eval mode) on the same slices. The
INT8 model is verified by label agreement on held-out slices (never its calibration
slices). Every requested model is verified before the first one is written, so a
failure writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from flareseg.atomic import (
    atomic_outputs,
    check_writable_folder,
    missing_folders,
    remove_empty_folders,
    written_meanwhile,
)
from flareseg.checkpoint import ModelInfo, read_checkpoint_and_digest, software_versions
from flareseg.errors import FlareSegError, interrupts_kept
from flareseg.export.inputs import PHANTOM_DESCRIPTION, checked_network, phantom_ct, read_ct_normalized
from flareseg.export.int8 import CalibrationSlices, quiet_logger
from flareseg.export.metadata import (
    FILE_SHA256_KEY,
    ExportMetadata,
    OutputKind,
    Precision,
    embed_in_onnx,
    sidecar_path,
    sidecar_text,
)
from flareseg.export.options import DEFAULT_OPSET as DEFAULT_OPSET  # importable here as before the move
from flareseg.export.options import MIN_OPSET as MIN_OPSET
from flareseg.export.options import ExportOptions, LabelDType
from flareseg.export.options import max_opset as max_opset
from flareseg.labels import LABELS, ORGANS
from flareseg.network import FlareUNet, build_deploy_network
from flareseg.preprocess import network_batch, normalize_volume
from flareseg.shapes import check_slice_size

log = logging.getLogger(__name__)

#: fp32 ONNX against PyTorch: max |difference| over max |reference logit|.
FP32_RELATIVE_TOLERANCE = 1e-4
#: fp32 label outputs against PyTorch's argmax (ties may flip at float rounding).
FP32_MIN_AGREEMENT = 0.999
#: fp16 against fp32: fraction of voxels of real CT slices with the same label.
FP16_MIN_AGREEMENT = 0.995
#: How verification names the slices it drew from a phantom, where no CT was given (``real_source``).
PHANTOM_SOURCE = "synthetic phantom"


def onnx_opset(model: Any) -> int:
    """The default-domain opset a model imports (what its operators follow), 0 if it names none."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class Int8AgreementError(FlareSegError):
    """The INT8 model missed its label-agreement threshold with every float-layer set tried; nothing was written."""

    def __init__(self, message: str, best_agreement: float) -> None:
        super().__init__(message)
        self.best_agreement = best_agreement


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    metadata: ExportMetadata


class _ExportGraph(nn.Module):
    """The deploy network, optionally with the argmax inside the graph (labels out, not logits)."""

    def __init__(self, net: nn.Module, output_kind: OutputKind, label_dtype: LabelDType) -> None:
        super().__init__()
        self.net = net
        self.labels = output_kind == "labels"
        self.label_dtype = torch.uint8 if label_dtype == "uint8" else torch.int32

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.net(image)
        return logits.argmax(dim=1).to(self.label_dtype) if self.labels else logits


def _to_onnx(module: nn.Module, channels: int, size: tuple[int, int], max_batch: int, opset: int) -> Any:
    """Trace ``module`` with torch.export into an ONNX ModelProto with a dynamic batch axis."""
    import onnx

    example = torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(0))  # not the global one
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    # The exporter logs its fallbacks (optional torchvision ops, the C API's opset conversion): not actionable here.
    with (
        interrupts_kept(),
        warnings.catch_warnings(),
        quiet_logger("torch.onnx"),
        quiet_logger("onnxscript.version_converter"),
    ):
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not actionable here
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["image"],
            output_names=["labels" if getattr(module, "labels", False) else "logits"],
            dynamic_shapes={"image": {0: batch}},
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise FlareSegError("torch.onnx.export returned no program")
    model = program.model_proto
    _drop_exporter_notes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _drop_exporter_notes(model: Any) -> None:
    """Remove the notes the exporter leaves on each node (the Python stack that made it, with this install's file
    paths and line numbers, its FX node, its module scope): no runtime reads them, and they made each install's
    export of one checkpoint differ, and named the exporting machine's folders in a file sent elsewhere."""
    pending = [model.graph.node, *(function.node for function in model.functions)]
    while pending:
        for node in pending.pop():
            del node.metadata_props[:]
            for attribute in node.attribute:  # the branches of an If, a Loop's body
                if attribute.HasField("g"):
                    pending.append(attribute.g.node)
                pending.extend(graph.node for graph in attribute.graphs)


def _ort_session(model: Any) -> Any:
    from flareseg.runtime.runners.onnxrt import import_onnxruntime

    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own types (e.g. an opset newer than it supports)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise FlareSegError(
            f"ONNX Runtime {ort.__version__} cannot load the exported opset {onnx_opset(model)} model "
            f"({type(exc).__name__}: {first}); nothing written"
        ) from None


def verification_slices(
    info: ModelInfo, volume_path: str | os.PathLike[str] | None, count: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """(random slices, real normalised CT slices, description of the real source); both (N, H, W)."""

    def spread(n: int) -> list[int]:
        return np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int)).tolist()

    if volume_path is not None:
        real = read_ct_normalized(volume_path, info.normalization, "--verify-volume", spread)
        source = str(volume_path)
    else:
        volume = phantom_ct(seed)
        real = normalize_volume(volume, info.normalization)[spread(volume.shape[0])]
        source = f"{PHANTOM_SOURCE} ({PHANTOM_DESCRIPTION})"
    rng = np.random.default_rng(seed)
    random = rng.standard_normal((min(count, 4), *real.shape[1:])).astype(np.float32)
    return random, real, source


def _compare(
    ref_logits: np.ndarray, got: np.ndarray, output_kind: OutputKind, organs: bool = False
) -> dict[str, float]:
    """How ``got`` (logits, or labels) matches the reference logits; ``organs``: each organ's Dice too."""
    ref_labels = ref_logits.argmax(axis=1)
    scale = float(np.max(np.abs(ref_logits))) or 1.0
    figures: dict[str, float] = {}
    if output_kind == "labels":
        got_labels = got.astype(np.int64)
        # Where PyTorch's best class leads the next by more than two fp32 tolerances, no rounding within the
        # tolerance can change the label: a graph that does differs beyond it (agreement overall is as blunt as
        # 99.9 % of voxels, which lets a bias of 0.08 on one class's logit through).
        top2 = np.partition(ref_logits, -2, axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * FP32_RELATIVE_TOLERANCE * scale
        figures["decisive_voxels"] = float(np.mean(decisive))
        figures["decisive_agreement"] = (
            float(np.mean(got_labels[decisive] == ref_labels[decisive])) if decisive.any() else 1.0
        )
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, which _check_finite refuses
            diff = float(np.max(np.abs(got - ref_logits)))
        figures.update(max_abs_logit_diff=diff, max_rel_logit_diff=diff / scale)
        got_labels = got.argmax(axis=1)
    figures["argmax_agreement"] = float(np.mean(got_labels == ref_labels))
    if organs:
        figures.update(organ_dice(ref_labels, got_labels))
    return figures


def organ_dice(reference: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``dice_<organ>`` of ``labels`` against ``reference``, for each organ either holds.

    Voxel agreement is mostly background (about nine voxels in ten of an abdominal slice): 99 % of them can hide
    a pancreas a quarter wrong. These say what a lower precision does to each organ.
    """
    from flareseg.metrics import dice  # scipy: for the export's checks alone, not on import

    return {
        f"dice_{LABELS[organ]}": dice(reference == organ, labels == organ)
        for organ in ORGANS
        if np.any(reference == organ) or np.any(labels == organ)
    }


class _Reference:
    """The PyTorch network's logits on each slice set, computed once however many models are held to them
    (fp32, fp16 and each INT8 attempt): at full width each forward pass costs seconds on a CPU."""

    def __init__(self, net: FlareUNet, info: ModelInfo, batch: int, source: object = None) -> None:
        self.net, self.info, self.batch, self.source = net, info, batch, source
        self._logits: dict[str, np.ndarray] = {}

    def logits(self, name: str, data: np.ndarray) -> np.ndarray:
        if name not in self._logits:
            refs = []
            for start in range(0, len(data), self.batch):
                x = network_batch(data[start : start + self.batch], self.info.slice_size, self.info.network.in_channels)
                with torch.inference_mode():
                    refs.append(self.net(x).numpy())
            ref = np.concatenate(refs)
            if not np.isfinite(ref).all():
                raise FlareSegError(
                    f"the PyTorch network's logits on the {_slices_name(name, self.source)} slices are not finite "
                    "(NaN or infinity); nothing written"
                )
            self._logits[name] = ref
        return self._logits[name]


def _verify(
    model: Any, reference: _Reference, channels: int, output_kind: OutputKind, slices: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Run the ONNX model on the slices the PyTorch reference ran on; figures per slice set."""
    session = _ort_session(model)
    batch, size = reference.batch, reference.info.slice_size
    figures: dict[str, dict[str, float]] = {}
    for name, data in slices.items():
        ref = reference.logits(name, data)
        gots = [
            session.run(None, {"image": network_batch(data[start : start + batch], size, channels).numpy()})[0]
            for start in range(0, len(data), batch)
        ]
        # Organs are there to be scored on real CT slices only: random ones hold noise.
        figures[name] = _compare(ref, np.concatenate(gots), output_kind, organs=name != "random")
        figures[name]["slices"] = float(len(data))
    return figures


def _check_fp16_range(
    graph: nn.Module, info: ModelInfo, channels: int, slices: dict[str, np.ndarray], batch: int, source: object = None
) -> None:
    """Refuse an fp16 export whose activations leave float16's range on the verification slices.

    ONNX Runtime's CPU provider runs an fp16 model's operators in float32 (it casts around them, and drops the casts
    between them), so its check never sees a value that fp16 arithmetic (a GPU, TensorRT) turns into infinity. The
    fp32 graph's activations are measured on the same slices instead, as the ONNX file holds them: a BatchNorm folded
    into the convolution before it, and a negative overflow ahead of a ReLU harmless (it ends at 0).
    """
    limit = float(np.finfo(np.float16).max)
    leaves = [(name, m) for name, m in graph.named_modules() if not list(m.children())]
    largest: dict[str, tuple[float, str]] = {}
    current = [""]

    def measure(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            value = float(output.detach().abs().max()) if output.numel() else 0.0
            if value > largest.get(name, (-1.0, ""))[0]:
                largest[name] = (value, current[0])

        return hook

    handles = []
    for (name, module), (_, after) in zip(leaves, [*leaves[1:], ("", None)], strict=True):
        if isinstance(module, nn.Conv2d) and isinstance(after, nn.BatchNorm2d):
            continue  # folded: the BatchNorm's output is the one stored
        if isinstance(module, nn.BatchNorm2d) and isinstance(after, nn.ReLU):
            continue  # the ReLU's output holds what can overflow upwards
        handles.append(module.register_forward_hook(measure(name)))
    try:
        for set_name, data in slices.items():
            current[0] = set_name
            for start in range(0, len(data), batch):
                with torch.inference_mode():
                    graph(network_batch(data[start : start + batch], info.slice_size, channels))
    finally:
        for handle in handles:
            handle.remove()
    name, (value, set_name) = max(largest.items(), key=lambda item: item[1][0])
    if not value < limit:  # NaN too
        raise FlareSegError(
            f"fp16: the network's {name} output reaches {value:.4g} on the {_slices_name(set_name, source)} slices, "
            f"beyond float16's largest value ({limit:.0f}): fp16 arithmetic (a GPU, TensorRT) would make it infinite; "
            "export without --fp16; nothing written"
        )


def _slices_name(name: str, source: object) -> str:
    """A slice set as messages name it: the "real" set is a phantom's where no CT was given to verify on."""
    return "phantom" if name == "real" and str(source).startswith(PHANTOM_SOURCE) else name.replace("_", "-")


def _check_finite(figures: dict[str, dict[str, float]], precision: Precision, source: object = None) -> None:
    """Refuse non-finite logits: NaN compares as no difference at all, so every tolerance would pass."""
    for name, f in figures.items():
        if "max_abs_logit_diff" in f and not math.isfinite(f["max_abs_logit_diff"]):
            raise FlareSegError(
                f"{precision} ONNX logits on the {_slices_name(name, source)} slices are not finite (NaN or "
                "infinity) where PyTorch's are; nothing written"
            )


def _check(
    figures: dict[str, dict[str, float]], precision: Precision, output_kind: OutputKind, source: object = None
) -> None:
    _check_finite(figures, precision, source)
    for name, f in figures.items():
        if precision == "fp32" and output_kind == "logits" and f["max_rel_logit_diff"] > FP32_RELATIVE_TOLERANCE:
            raise FlareSegError(
                f"fp32 ONNX differs from PyTorch on {_slices_name(name, source)} slices: relative logit difference "
                f"{f['max_rel_logit_diff']:.2e} > {FP32_RELATIVE_TOLERANCE:.0e}; nothing written"
            )
        if precision == "fp32" and output_kind == "labels" and f.get("decisive_agreement", 1.0) < 1.0:
            raise FlareSegError(
                f"fp32 ONNX labels differ from PyTorch's on {_slices_name(name, source)} slices where no rounding "
                f"within the fp32 tolerance ({FP32_RELATIVE_TOLERANCE:.0e}) could change them: agreement there "
                f"{100 * f['decisive_agreement']:.3f}%, expected 100%; nothing written"
            )
        if precision == "fp32" and output_kind == "labels" and f["argmax_agreement"] < FP32_MIN_AGREEMENT:
            raise FlareSegError(
                f"fp32 ONNX labels agree with PyTorch on {100 * f['argmax_agreement']:.3f}% of "
                f"{_slices_name(name, source)} voxels, "
                f"expected >= {100 * FP32_MIN_AGREEMENT:.1f}%; nothing written"
            )
    real = figures["real"]
    if precision == "fp16" and real["argmax_agreement"] < FP16_MIN_AGREEMENT:
        raise FlareSegError(
            f"fp16 ONNX agrees with fp32 PyTorch on {100 * real['argmax_agreement']:.3f}% of "
            f"{_slices_name('real', source)}-slice voxels, "
            f"expected >= {100 * FP16_MIN_AGREEMENT:.1f}%; nothing written"
        )


def export_onnx(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ExportOptions | None = None,
    *,
    verify_volume: str | os.PathLike[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[ExportedModel]:
    """Export, verify and write ``{name}_fp32.onnx`` (and ``_fp16``, ``_int8`` with ``options.fp16``, ``.int8``).

    ``calibration`` is a folder of CT NIfTI files (or DICOM series) whose slices calibrate the INT8
    activation ranges (default: phantoms). Each model gets its metadata embedded and a
    ``.json`` sidecar beside it. Every model is verified before the first is written.
    Returns what was written, fp32 first. ``options`` default: :class:`ExportOptions`'s defaults.
    ``progress``: a bar over the steps, on a terminal.

    A folder that holds an earlier export of the same name is refused before any work, unless
    ``overwrite``: the new set then replaces it, and the earlier set's other members (an fp16
    model this export does not make, an engine built from the old models) are removed, so
    that the folder never mixes two exports.
    """
    options = options if options is not None else ExportOptions()

    from flareseg.export.int8 import calibration_slices

    if calibration is not None and not options.int8:
        raise FlareSegError("a calibration folder is only used by the INT8 export (add --int8)")
    out = Path(out_dir)
    _check_destination(out, options.name, overwrite)
    payload, checkpoint_sha256 = read_checkpoint_and_digest(checkpoint)  # the only reader that records the hash
    net, info = checked_network(payload, checkpoint)
    del payload  # its weights, copied into the network: not held through the export
    trained = info.slice_size
    if options.slice_size is not None:
        info = dataclasses.replace(info, slice_size=check_slice_size(options.slice_size))
    resized = trained if info.slice_size != trained else None
    if resized is not None:  # the verification runs PyTorch at the new size too: it cannot see what this costs
        log.warning(
            "%s was trained on %dx%d slices and is exported for %dx%d: slices are resized to that, so the network "
            "sees organs at another scale than in training (the verification compares with PyTorch at the same "
            "size and cannot show it); score its labels with flare-eval before deploying it",
            checkpoint, *trained, *info.slice_size,
        )  # fmt: skip
    # The verification volume is read first too: a bad one fails before minutes of export.
    random, real, source = verification_slices(info, verify_volume, options.verify_slices)
    if len(real) < options.verify_slices:  # the figures printed rest on these: said, as INT8's slice counts are
        log.warning(
            "%s holds %d slices, fewer than the %d asked (--verify-slices): the export is verified on those",
            source, len(real), options.verify_slices,
        )  # fmt: skip
    # Calibration data is read first: a folder without usable slices fails before minutes of export.
    calib = (
        calibration_slices(info, calibration, count=options.calibration_slices, held_out=options.held_out_slices)
        if options.int8
        else None
    )
    # Minutes on a CPU at full width: a bar over the steps (on a terminal only; None lets tqdm ask).
    steps = 3 + options.fp16 + (calib is not None)  # export, verify fp32, [verify fp16], [int8], write
    with tqdm(total=steps, desc="flare-export", unit="step", disable=None if progress else True, leave=False) as bar:
        deploy = build_deploy_network(net, fold_input=options.fold_input and info.network.in_channels > 1)
        base = ExportMetadata(
            model=info,
            input_channels=deploy.config.in_channels,
            output_kind=options.output_kind,
            label_dtype=options.label_dtype if options.output_kind == "labels" else None,
            precision="fp32",
            batch_profile=options.batch_profile,
            source_checkpoint_sha256=checkpoint_sha256,  # of the bytes loaded, not of what the path holds now
            versions=software_versions(),
            trained_slice_size=resized,
        )
        log.info("exporting %s (%s input channel(s), %s out)", checkpoint, base.input_channels, options.output_kind)
        slices = {"random": random, "real": real}
        verified = _verified_models(net, deploy, base, options, slices, source, calib, bar)
        bar.set_postfix_str("write")
        written, stale = _write_set(out, options.name, verified, overwrite)
        bar.update()
    for model_written, (_, _, figures) in zip(written, verified, strict=True):
        log.debug("wrote %s: %s", model_written.path, _summary(figures, source))  # flare-export prints it (stdout)
    for gone in stale:  # a user's file gone: said under -q too
        log.warning("removed %s: of the earlier export, not of this one (--overwrite replaces the whole set)", gone)
    return written


_Verified = tuple[Any, ExportMetadata, dict[str, dict[str, float]]]  # an ONNX model, its metadata, its figures


def _check_destination(out: Path, name: str, overwrite: bool) -> None:
    """Refuse an output folder that cannot take the export, or that holds an earlier one unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FlareSegError(f"{out}: exists and is not a folder (-o names the output folder)")
    check_writable_folder(out)
    earlier = [p for p in export_set(out, name) if os.path.lexists(p)]
    if earlier and not overwrite:
        raise FlareSegError(
            f"{out}: holds an earlier export named {name} ({earlier[0].name}); --overwrite replaces that "
            "set, or choose another -o or --name"
        )


def _verified_models(
    net: FlareUNet,
    deploy: nn.Module,
    base: ExportMetadata,
    options: ExportOptions,
    slices: dict[str, np.ndarray],
    source: str,
    calib: CalibrationSlices | None,
    bar: tqdm,
) -> list[_Verified]:
    """Export ``deploy`` (``net``'s deploy network), make the fp16 and INT8 variants asked for, and verify each
    against PyTorch (raising where one falls short); ``bar`` advances a step for the export and one per model."""
    from flareseg.export.fp16 import convert_to_fp16

    info, channels = base.model, base.input_channels
    graph = _ExportGraph(deploy, options.output_kind, options.label_dtype).eval()
    bar.set_postfix_str("export")
    fp32 = _to_onnx(graph, channels, info.slice_size, options.batch_profile[2], options.opset)
    got = onnx_opset(fp32)
    if got != options.opset:  # the exporter falls back to its own opset rather than failing
        raise FlareSegError(f"opset {options.opset} was asked for, the exporter wrote {got}; nothing written")
    batch = max(1, min(options.batch_profile[1], 4))
    reference = {"reference": "PyTorch fp32 training network (eval mode)"}
    logits = _Reference(net, info, batch, source)
    variants: list[tuple[Precision, Any]] = [("fp32", fp32)]
    if options.fp16:
        variants.append(("fp16", convert_to_fp16(fp32)))
    verified: list[_Verified] = []
    bar.update()
    for precision, model in variants:
        bar.set_postfix_str(f"verify {precision}")
        if precision == "fp16":
            _check_fp16_range(graph, info, channels, slices, batch, source)
        figures = _verify(model, logits, channels, options.output_kind, slices)
        _check(figures, precision, options.output_kind, source)
        meta = dataclasses.replace(base, precision=precision, versions=_versions(base, model)).with_verification(
            {**reference, "real_source": source, **figures}
        )
        verified.append((model, meta, figures))
        bar.update()
    if calib is not None:
        bar.set_postfix_str("int8")
        int8, figures, quantization = _quantize_verified(fp32, logits, channels, options, calib)
        meta = dataclasses.replace(
            base, precision="int8", quantization=quantization, versions=_versions(base, int8)
        ).with_verification({**reference, "held_out_source": calib.source, **figures})
        verified.append((int8, meta, figures))
        bar.update()
    return verified


def _write_set(
    out: Path, name: str, verified: list[_Verified], overwrite: bool
) -> tuple[list[ExportedModel], list[Path]]:
    """Write the verified models and their sidecars as one set; what was written, and the earlier set's members
    removed (``overwrite``)."""
    written = []
    made = missing_folders(out)  # by the first write
    # Every model and sidecar goes to a synced temporary file first; the renames come only once all are written.
    with _folders_removed_on_failure(made), atomic_outputs() as outputs:
        for model, meta, _ in verified:
            embed_in_onnx(model, meta)
            path = out / f"{name}_{meta.precision}.onnx"
            data = model.SerializeToString()
            # Without overwrite, a set another export wrote meanwhile (a job submitted twice) is kept whole,
            # and this one dropped: the folder never holds one export's fp32 beside another's fp16.
            with outputs.writing(path, replace=overwrite) as tmp:
                tmp.write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()  # of the bytes written, checked by every load (ONNX has none)
            with outputs.writing(sidecar_path(path), replace=overwrite) as side:
                side.write_text(sidecar_text({**meta.to_dict(), FILE_SHA256_KEY: digest}))
            written.append(ExportedModel(path, meta))
        # The earlier set's members that this one does not replace go with the renames, not after them:
        # a stop in between would leave the new fp32 model beside the old fp16 one, as if one set. Listed now,
        # not at the start: an overwriting export that ended meanwhile may have left an fp16 this one lacks.
        now = {p for w in written for p in (w.path, sidecar_path(w.path))}
        stale = [p for p in export_set(out, name) if os.path.lexists(p) and p not in now]
        if stale and not overwrite:  # another export's engine or fp16, say, written meanwhile: never removed
            raise written_meanwhile(stale[0])
        for gone in stale:
            outputs.remove(gone)
    return written, stale


@contextlib.contextmanager
def _folders_removed_on_failure(made: list[Path]) -> Iterator[None]:
    """On an error (a full disk at the write), remove the folders in ``made`` (deepest first) that the block made
    for its files and that hold nothing: a failed export leaves no empty output folder."""
    try:
        yield
    except BaseException:
        remove_empty_folders(made)
        raise


def export_set(out: Path, name: str) -> list[Path]:
    """Every file an export named ``name`` may have in ``out``: each precision's model and engine, with sidecars."""
    models = [
        out / f"{name}_{precision}{suffix}" for precision in ("fp32", "fp16", "int8") for suffix in (".onnx", ".engine")
    ]
    return [p for model in models for p in (model, sidecar_path(model))]


def _versions(base: ExportMetadata, model: Any) -> dict[str, str]:
    """The software versions, with the opset this model's file holds (the quantiser may raise it)."""
    return {**base.versions, "onnx_opset": str(onnx_opset(model))}


def _quantize_verified(
    fp32: Any, reference: _Reference, channels: int, options: ExportOptions, calib: CalibrationSlices
) -> tuple[Any, dict[str, dict[str, float]], dict[str, Any]]:
    """Quantise with each float-layer set of the ladder until the held-out agreement meets the threshold.

    Returns the INT8 model, its verification figures and what to record about its quantisation.
    """
    from flareseg.export.int8 import float_layer_nodes, network_inputs, quantize, quantizer_version

    info = reference.info
    inputs = network_inputs(calib.calibration, info, channels)
    held = {"held_out": network_inputs(calib.held_out, info, 1)[:, 0]}
    attempts: list[dict[str, Any]] = []
    for keep in options.int8_float_ladder:
        nodes = float_layer_nodes(fp32, keep)
        exclude = [name for names in nodes.values() for name in names]
        log.info("quantising to INT8 with %s (float: %s)", options.quantizer, ", ".join(keep) or "none")
        model, settings = quantize(fp32, inputs, exclude, options.quantizer)
        figures = _verify(model, reference, channels, options.output_kind, held)
        _check_finite(figures, "int8")
        agreement = figures["held_out"]["argmax_agreement"]
        attempts.append({"float_layers": list(keep), "held_out_agreement": agreement})
        if agreement >= options.int8_min_agreement:
            quantization = {
                "quantizer": quantizer_version(options.quantizer),
                "settings": settings,
                "float_layers": nodes,
                "calibration": {
                    "source": calib.source,
                    "slices": len(calib.calibration),
                    "held_out_slices": len(calib.held_out),
                },
                "min_agreement": options.int8_min_agreement,
                "attempts": attempts,
            }
            return model, figures, quantization
    best = max(a["held_out_agreement"] for a in attempts)
    raise Int8AgreementError(
        f"INT8 model agrees with fp32 PyTorch on {100 * best:.3f}% of held-out voxels ({len(calib.held_out)} slices "
        f"of {calib.source}), expected >= {100 * options.int8_min_agreement:.2f}% (tried float layers: "
        + "; ".join(", ".join(a["float_layers"]) or "none" for a in attempts)
        + "); nothing written",
        best,
    )


def _summary(figures: dict[str, dict[str, float]], real_source: object = None) -> str:
    parts = []
    for name, f in figures.items():
        text = f"{_slices_name(name, real_source)} slices: argmax agreement {100 * f['argmax_agreement']:.3f}%"
        if "max_abs_logit_diff" in f:
            text += f", max logit diff {f['max_abs_logit_diff']:.2e} ({f['max_rel_logit_diff']:.2e} relative)"
        dice = [f"{LABELS[o]} {f[f'dice_{LABELS[o]}']:.3f}" for o in ORGANS if f"dice_{LABELS[o]}" in f]
        if dice:
            text += ", organ Dice " + ", ".join(dice)
        parts.append(text)
    return "; ".join(parts)


def verification_report(exported: list[ExportedModel]) -> str:
    """Human-readable verification lines, one per exported model."""
    lines = []
    for item in exported:
        v = {k: val for k, val in item.metadata.verification.items() if isinstance(val, dict)}
        source = item.metadata.verification.get("real_source")
        lines.append(f"{item.path.name} ({item.metadata.precision}): {_summary(v, source)}")
    return "\n".join(lines)

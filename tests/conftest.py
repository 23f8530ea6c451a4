"""Shared fixtures: the real sample data in ../shared (skipped when absent) and small phantoms."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = SHARED_DATA / "flare21-sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real FLARE21-layout CT sample; tests using it skip on a fresh clone without ../shared."""
    if not (SAMPLE / "TrainingImg" / "train_000_0000.nii.gz").exists():
        pytest.skip(f"real sample data not found at {SAMPLE} (only present beside the project checkout)")
    return SAMPLE


@pytest.fixture(scope="session")
def sample_ct(sample_dir: Path) -> Path:
    return sample_dir / "TrainingImg" / "train_000_0000.nii.gz"


@pytest.fixture(scope="session")
def sample_mask(sample_dir: Path) -> Path:
    return sample_dir / "TrainingMask" / "train_000.nii.gz"


def reorient(img: nib.Nifti1Image, axcodes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same image stored with other voxel axes (world positions unchanged)."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(axcodes)))


def save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, path)
    return path


def oblique(img: nib.Nifti1Image, degrees: float = 12.0) -> nib.Nifti1Image:
    """The same voxels with an affine rotated about the superior axis (an oblique acquisition)."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    out = nib.Nifti1Image(np.asanyarray(img.dataobj), rot @ img.affine, img.header.copy())
    out.set_sform(rot @ img.affine, code=1)
    return out


BAD_INPUT_KINDS = [
    "missing",
    "truncated-header",
    "truncated-data",
    "not-nifti-gz",
    "not-nifti",
    "2d",
    "4d",
    "non-finite",
    "bad-datatype",
    "header-member-crc",
    "huge-grid",
    "voxels-at-byte-0",
    "nan-vox-offset",
]


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad input file (neutral names), with the words its error message must contain."""
    rng = np.random.default_rng(0)
    good = nib.Nifti1Image(rng.integers(-1000, 1000, (40, 40, 30)).astype(np.int16), np.eye(4))
    save(good, tmp_path / "good.nii.gz")
    blob = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "in1.nii.gz").write_bytes(blob[:100])  # cut inside the header
    (tmp_path / "in2.nii.gz").write_bytes(blob[: len(blob) // 2])  # cut inside the voxels
    (tmp_path / "in3.nii.gz").write_bytes(gzip.compress(b"not an image at all" * 50))
    (tmp_path / "in4.nii").write_text("hello")
    save(nib.Nifti1Image(np.zeros((4, 5), np.int16), np.eye(4)), tmp_path / "in5.nii.gz")
    save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.int16), np.eye(4)), tmp_path / "in6.nii.gz")
    nan = np.zeros((4, 5, 6), np.float32)
    nan[1, 2, 3] = np.nan
    nan[0, 0, 0] = np.inf
    save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "in7.nii.gz")
    raw = gzip.decompress(blob)  # the good file's NIfTI stream: damaged below, one header field at a time

    def patched(offset: int, values: tuple[int, ...]) -> bytes:
        return raw[:offset] + np.array(values, "<i2").tobytes() + raw[offset + 2 * len(values) :]

    (tmp_path / "in8.nii.gz").write_bytes(gzip.compress(patched(70, (0,))))  # datatype code 0
    first = bytearray(gzip.compress(raw[:352]))  # the header in a gzip member of its own...
    first[-8] ^= 0x5A  # ...whose CRC is wrong
    (tmp_path / "in9.nii.gz").write_bytes(bytes(first) + gzip.compress(raw[352:]))
    (tmp_path / "in10.nii.gz").write_bytes(gzip.compress(patched(42, (30000, 30000, 4000))))  # 7 TB of voxels
    for name, offset in (("in11.nii.gz", 0.0), ("in12.nii.gz", np.nan)):  # vox_offset, a float32 at byte 108
        (tmp_path / name).write_bytes(gzip.compress(raw[:108] + np.array(offset, "<f4").tobytes() + raw[112:]))
    return {
        "missing": (tmp_path / "absent.nii.gz", "file not found"),
        "truncated-header": (tmp_path / "in1.nii.gz", "truncated gzip stream"),
        "truncated-data": (tmp_path / "in2.nii.gz", "truncated or corrupt voxel data"),
        "not-nifti-gz": (tmp_path / "in3.nii.gz", "not a NIfTI image"),
        "not-nifti": (tmp_path / "in4.nii", "shorter than a NIfTI header"),
        "2d": (tmp_path / "in5.nii.gz", "expected a 3D volume, got shape (4, 5)"),
        "4d": (tmp_path / "in6.nii.gz", "expected a 3D volume, got shape (4, 5, 6, 2)"),
        "non-finite": (tmp_path / "in7.nii.gz", "2 voxels are not finite"),
        "bad-datatype": (tmp_path / "in8.nii.gz", "invalid NIfTI header (data code 0 not supported)"),
        "header-member-crc": (tmp_path / "in9.nii.gz", "corrupt gzip stream (CRC check failed"),
        "huge-grid": (tmp_path / "in10.nii.gz", "the header's grid needs 7,200,000,000,000 bytes, more than a"),
        # nibabel reads a vox_offset of 0 as it stands: the header's bytes would become the first voxels
        "voxels-at-byte-0": (tmp_path / "in11.nii.gz", "invalid NIfTI header (vox_offset is 0; a single-file NIfTI"),
        "nan-vox-offset": (tmp_path / "in12.nii.gz", "invalid NIfTI header (vox_offset is nan; a single-file NIfTI"),
    }


def _export_key(args: tuple[Any, ...], kwargs: dict[str, Any], keep: list[object]) -> str | None:
    """What an export's result depends on, hashed; None for a call this cannot key (then it runs afresh).

    Every attribute of every submodule, private ones included: its class, the class's forward function, parameters
    and buffers (non-persistent ones too, with their device), hooks; and every argument, example values included.
    Functions are keyed by identity, and ``keep`` holds each one so that its id is not reused meanwhile. Not seen:
    a module-level function that forward calls, patched by a test; such a test must not rely on this cache.
    """
    import torch

    if len(args) != 2 or not isinstance(args[0], torch.nn.Module) or not isinstance(args[1], tuple):
        return None
    h = hashlib.sha256()

    def add(value: object) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach()
            h.update(f"tensor {t.dtype} {tuple(t.shape)} {t.device}".encode())
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
        elif isinstance(value, torch.nn.Module):
            h.update(b"module")  # its own entries are hashed as a submodule
        elif isinstance(value, type):
            h.update(f"type {value!r}".encode())  # an export Dim's repr holds its name and range
        elif isinstance(value, dict):
            h.update(f"dict {len(value)}".encode())
            for key, item in value.items():
                add(key)
                add(item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            h.update(f"{type(value).__name__} {len(value)}".encode())
            for item in sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value:
                add(item)
        elif callable(value):
            h.update(f"callable {id(value)}".encode())
            keep.append(value)
        else:
            h.update(f"{type(value).__qualname__} {value!r}".encode())

    for name, sub in args[0].named_modules():
        cls = type(sub)
        h.update(f"{name}|{cls.__module__}.{cls.__qualname__}".encode())
        add(cls.forward)
        for key, value in sorted(vars(sub).items()):
            h.update(key.encode())
            add(value)
    for value in args[1]:
        if not isinstance(value, torch.Tensor):
            return None
        add(value)
    for key, value in sorted(kwargs.items()):
        h.update(key.encode())
        add(value)
    return h.hexdigest()


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_raises() -> Iterator[None]:
    """The Ctrl-C tests need Python's own SIGINT handler. A suite started with ``&`` from a script (a non-interactive
    shell) inherits SIGINT ignored, and Python then leaves it ignored: each of those tests failed there, their
    Ctrl-C never arriving. The commands themselves rightly leave an ignored SIGINT ignored."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="session", autouse=True)
def reuse_identical_exports() -> Iterator[None]:
    """torch's ONNX exporter takes 4 to 6 s a call whatever the network's size, and the suite exports the same
    small networks with the same arguments again and again (about 40 exports, a quarter of its time). A call
    keyed the same as an earlier one in this session (see _export_key) gets that call's real ONNX model back, as a
    fresh ONNXProgram: the first export of each module and arguments is torch's, never a stand-in. A test that
    replaces torch.onnx.export sees its own double, not this. FLARESEG_TEST_FRESH_EXPORTS=1 exports every time.
    """
    if os.environ.get("FLARESEG_TEST_FRESH_EXPORTS") == "1":
        yield
        return
    import onnx
    import onnx_ir
    import torch.onnx

    real, done, keep = torch.onnx.export, {}, []

    def export(*args: Any, **kwargs: Any) -> Any:
        key = _export_key(args, kwargs, keep)
        if key is not None and key in done:
            return torch.onnx.ONNXProgram(onnx_ir.serde.deserialize_model(onnx.load_from_string(done[key])), None)
        program = real(*args, **kwargs)
        if key is not None and program is not None:
            done[key] = program.model_proto.SerializeToString()
        return program

    torch.onnx.export = export
    try:
        yield
    finally:
        torch.onnx.export = real


TRAINED_SIZE = (64, 64)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A small network (width 8, 64x64 slices) trained for a few seconds on phantom slices.

    Trained rather than random so that its predictions contain organs: comparisons of
    labels between backends and precisions are then meaningful.
    """
    import torch

    from flareseg.checkpoint import ModelInfo, save_checkpoint
    from flareseg.network import NetworkConfig, build_training_network
    from flareseg.phantom import make_phantom
    from flareseg.preprocess import compute_stats, network_batch, normalize_volume
    from flareseg.train.loss import deep_supervision_loss

    torch.manual_seed(0)
    phantoms = [make_phantom((64, 64, 32), (6.0, 6.0, 8.0), seed=s) for s in range(3)]
    images = [p.image.transpose(2, 1, 0).astype(np.float32) for p in phantoms]
    stats = compute_stats(images)
    x = torch.cat([network_batch(normalize_volume(im, stats), TRAINED_SIZE, 3) for im in images])
    y = torch.cat([torch.from_numpy(p.labels.transpose(2, 1, 0).astype(np.int64)) for p in phantoms])
    keep = (y > 0).flatten(1).any(1)  # slices with organs
    x, y = x[keep], y[keep]
    net = build_training_network(NetworkConfig(base_width=8)).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x), (8,), generator=g)
        logits, aux = net(x[idx])
        loss = deep_supervision_loss(logits, aux, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("trained") / "small.pt"
    save_checkpoint(path, net.eval(), ModelInfo(network=net.config, normalization=stats, slice_size=TRAINED_SIZE))
    return path


@pytest.fixture(scope="session")
def int8_export(trained_checkpoint, tmp_path_factory) -> list:
    """trained_checkpoint exported with --int8 (fp32 and INT8 models, verified); read, never changed, by tests."""
    from flareseg.export import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("int8")
    return export_onnx(trained_checkpoint, out, ExportOptions(int8=True, batch_profile=(1, 2, 8)))


@pytest.fixture(scope="module")  # module: made before the module-scoped reports that use it
def smaller_matmul_peak() -> Iterator[None]:
    """flare-bench measures the CPU's peak on 30 products of 2048 x 2048: 2 s of each in-process run here, while
    its tests hold the figure to be positive and to reach the report. The real measurement still runs, on 1024 x
    1024 products (0.2 s); a call that names its size gets that size."""
    from flareseg.bench import measure

    real = measure.matmul_peak_flops

    def smaller(
        device: Any, dtype: Any, *, tf32: bool = False, n: int | None = None, repeats: int | None = None
    ) -> float:
        return real(device, dtype, tf32=tf32, n=n or 1024, repeats=repeats)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "matmul_peak_flops", smaller)
        yield


def float_bits(values) -> list[int]:
    """float64 bit patterns: equality of these is bit-identity (also tells 0.0 from -0.0)."""
    return [int(np.float64(v).view(np.int64)) for v in values]


def numpy_percentiles(volume, qs) -> list[float]:
    """np.percentile with the linear method, as floats: what exact percentiles must equal."""
    return [float(v) for v in np.percentile(volume, qs, method="linear")]


def ctrl_c_after_the_first_rename(monkeypatch) -> list[str]:
    """A test double of ``os.replace`` that sends a real SIGINT right after the first rename starts; the names
    renamed, in order, are returned (filled as the renames happen)."""
    import os
    import signal

    real_replace, renamed = os.replace, []

    def replace(src, dst):
        if not renamed:
            signal.raise_signal(signal.SIGINT)
        real_replace(src, dst)
        renamed.append(Path(dst).name)

    monkeypatch.setattr(os, "replace", replace)
    return renamed

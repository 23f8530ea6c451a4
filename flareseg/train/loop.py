"""The training loop: the paper's protocol, resumable, single-process or DistributedDataParallel.

Randomness is derived from ``(seed, epoch)`` for the slice order and the augmentation, and
from ``seed`` in a fork of torch's generator for the initial weights, so a run stopped after
any epoch and resumed produces the same weights as a run that never stopped, and a DDP run
over W processes equals a single process accumulating W micro-batches (BatchNorm statistics
are per replica in both). The caller's global generators (Python, numpy, torch) are neither
read nor changed.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from flareseg.atomic import AtomicOutputs, atomic_outputs, remove_empty_folders, write_text_atomic
from flareseg.checkpoint import ModelInfo, read_checkpoint, save_checkpoint
from flareseg.errors import FlareSegError, gpu_memory_errors
from flareseg.labels import LABELS, ORGANS
from flareseg.metrics import dice
from flareseg.network import NetworkConfig, build_training_network, non_finite_weights
from flareseg.postprocess import keep_largest_components
from flareseg.preprocess import NormalizationStats, SliceNormalizer, volume_normalizer
from flareseg.runtime.inferer import infer_volume
from flareseg.runtime.runners import FunctionRunner
from flareseg.shapes import SIZE_MULTIPLE, check_slice_size
from flareseg.train.augment import augment_batch, sample_affines
from flareseg.train.config import RUN_OUTPUTS, TrainConfig
from flareseg.train.data import (
    Case,
    SliceCache,
    SliceDataset,
    check_headers,
    data_key,
    dataset_stats,
    describe_change,
    find_training_cases,
    progress_disabled,
    read_stats_file,
    split_cases,
    stats_key,
    write_stats_file,
)
from flareseg.train.loss import LossWeights, deep_supervision_loss
from flareseg.workers import loader_worker_signals, stop_signals_blocked

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a second run into a folder is not refused there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass
class TrainResult:
    run_dir: Path
    best_score: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def on_main(self, work: Callable[[], _T]) -> _T | None:
        """``work()`` on the main process alone (its result there, None elsewhere); then every process learns
        whether it failed, and a failure is raised on each, in its one line: the others would wait at the next
        collective, and end in its traceback when the main process left."""
        failure: Exception | None = None
        result: _T | None = None
        if self.main:
            try:
                result = work()
            except Exception as exc:
                failure = exc
        if self.world > 1:
            said = [None if failure is None else str(failure) or type(failure).__name__]
            dist.broadcast_object_list(said, src=0)
            if not self.main and said[0] is not None:
                raise FlareSegError(f"{said[0]} (on the main process)")
        if failure is not None:
            raise failure
        return result


def launch_place() -> _Dist:
    """This process's place in a torchrun launch, as its environment gives it (rank 0 of 1 outside one)."""
    return _Dist(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def _init_distributed(device: str) -> tuple[_Dist, bool]:
    """The process group of a torchrun launch, and whether this call made it (only then is it ours to end)."""
    if launch_place().world <= 1:
        return _Dist(), False
    made = not dist.is_initialized()
    if made:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    d = _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return d, made


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN autotuning for this run only; the caller's setting is restored afterwards."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or previous
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _init_weights(model: nn.Module) -> None:
    """Normal (He) initialisation, as the paper's protocol; no pre-training (challenge rule)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _generator_seed(value: int) -> int:
    """``value`` as torch takes a seed: as it is where torch takes it (runs recorded before stay the same), else
    reduced modulo 2**64."""
    return value if -(2**63) <= value < 2**64 else value % 2**64


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(_generator_seed(seed * 1_000_003 + epoch * 97 + stream))


def _global_order(n_slices: int, steps: int, global_batch: int, generator: torch.Generator) -> torch.Tensor:
    """Slice indices for every step of an epoch (permutations concatenated as needed)."""
    need = steps * global_batch
    reps = math.ceil(need / n_slices)
    return torch.cat([torch.randperm(n_slices, generator=generator) for _ in range(reps)])[:need]


def _global_batch(cfg: TrainConfig, world: int) -> int:
    """Slices per optimiser step over all replicas and micro-batches."""
    return cfg.batch_size * cfg.accumulate * world


class _StepSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's micro-batches: chunk c = micro * world + rank of each step's global batch."""

    def __init__(self, order: torch.Tensor, steps: int, cfg: TrainConfig, dist_: _Dist) -> None:
        self.order, self.steps, self.cfg, self.dist = order, steps, cfg, dist_

    def __len__(self) -> int:
        return self.steps * self.cfg.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        b, world = self.cfg.batch_size, self.dist.world
        global_batch = _global_batch(self.cfg, world)
        for step in range(self.steps):
            base = step * global_batch
            for micro in range(self.cfg.accumulate):
                c = micro * world + self.dist.rank
                yield self.order[base + c * b : base + (c + 1) * b].tolist()


def _check_loss(loss: float, epoch: int, step: int, steps: int, d: _Dist, device: torch.device) -> None:
    """Stop the run on a loss that is not finite, before the optimiser step spreads it into the weights.

    Under DDP every replica learns of it at the same step (a sum carries NaN and infinity),
    so all stop together instead of the others waiting forever for the one that stopped.
    """
    if d.world > 1:
        total = torch.tensor([loss], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        loss = float(total)
    if not math.isfinite(loss):
        raise FlareSegError(
            f"epoch {epoch + 1}, step {step + 1}/{steps}: the training loss is {loss} (not finite); stopped, "
            "no checkpoint written for this epoch (try a new run with a lower --lr)"
        )


def _check_weights(model: nn.Module, epoch: int) -> None:
    """A checkpoint of non-finite weights must never replace a good one (a finite loss can still step to them)."""
    bad = list(non_finite_weights(model))
    if bad:
        raise FlareSegError(
            f"epoch {epoch + 1}: {len(bad)} weight tensors hold non-finite values ({bad[0]}, ...); stopped, "
            "no checkpoint written for this epoch (try a new run with a lower --lr)"
        )


def replica_divergence(model: nn.Module, d: _Dist) -> float:
    """Largest difference between the replicas' parameter checksums (0.0 when in sync or single-process)."""
    if d.world == 1:
        return 0.0
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])  # on the model device (NCCL)
    gathered = [torch.empty_like(sums) for _ in range(d.world)]
    dist.all_gather(gathered, sums)
    return float(max((g - gathered[0]).abs().max() for g in gathered))


@dataclass(frozen=True)
class ValidationVolume:
    """A validation case ready for scoring: stored voxels, labels and its (fixed) normaliser."""

    stored: np.ndarray
    truth: np.ndarray
    normalizer: SliceNormalizer


def validation_volumes(cache: SliceCache, cases: Sequence[Case], stats: NormalizationStats) -> list[ValidationVolume]:
    """Built once per run: a volume's percentile bounds never change, so they are not recomputed each epoch."""
    volumes = []
    for case in cases:
        stored, truth, slope, inter = cache.full_resolution(case)
        volumes.append(ValidationVolume(stored, truth, volume_normalizer(stored, stats, slope, inter)))
    return volumes


def validate(
    model: nn.Module,
    volumes: Sequence[ValidationVolume],
    info: ModelInfo,
    device: torch.device,
    batch_size: int,
) -> dict[str, float]:
    """Per-organ DSC over whole validation volumes, through the runtime's own inference path."""
    was_training = model.training
    model.eval()
    per_organ: dict[int, list[float]] = {o: [] for o in ORGANS}
    runner = FunctionRunner(model, info, device=device)
    try:
        with torch.inference_mode(), runner:
            for v in tqdm(volumes, desc="validation", unit="volume", leave=False, disable=progress_disabled()):
                pred = keep_largest_components(infer_volume(np.asarray(v.stored), v.normalizer, runner, batch_size))
                for organ in ORGANS:
                    per_organ[organ].append(dice(v.truth == organ, pred == organ))
    finally:
        model.train(was_training)
    scores = {f"dsc_{LABELS[o]}": float(np.mean(v)) for o, v in per_organ.items()}
    scores["dsc_mean"] = float(np.mean(list(scores.values())))
    return scores


def training_device(spec: str, d: _Dist) -> torch.device:
    """The device ``--device`` names, checked to exist here; under torchrun, CUDA device ``LOCAL_RANK``."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise FlareSegError(f"--device {spec}: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise FlareSegError(f"--device {spec}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise FlareSegError(f"--device {spec}: torch {torch.__version__} sees no CUDA GPU on this machine")
    index = d.local_rank if d.world > 1 else (device.index or 0)
    if index >= torch.cuda.device_count():
        raise FlareSegError(f"--device {spec}: CUDA device {index} requested, but {torch.cuda.device_count()} exist")
    return torch.device("cuda", index)


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating it would create), or None."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


#: The file a run's lock is held on, inside its folder.
RUN_LOCK = ".lock"
#: The run locks this process holds, by the lock file's device and inode. A POSIX lock does not stand
#: between two holders in one process, and closing any descriptor of its file drops it: a second run in
#: this process (threads, a notebook) is refused here, before it opens the file.
_HELD_RUNS: dict[tuple[int, int], int] = {}
_HELD_RUNS_LOCK = threading.Lock()


def _hold_run(run: Path) -> int:
    """Make the run folder and hold an exclusive lock for the training's life; the descriptor holding it.

    A second flare-train into the same folder (a job submitted twice, a --resume of a run still training) is
    refused: it would write its config.json and split.json over this one's while this one's checkpoints and log
    went on, and a later resume would mix them. A POSIX record lock on a file in the folder (``RUN/.lock``):
    NFS's lock manager shares it between hosts (a lock on the folder itself would stay on one host), and
    processes forked from this one (the DataLoader's workers) do not inherit it, so it goes the moment this
    process ends, however it ends. Where the file system has no locks, a warning says the run goes on without one.
    """
    busy = FlareSegError(
        f"--out {run}: another flare-train is training in this folder now; wait for it to end "
        "(then --resume it), or choose another --out"
    )
    with _HELD_RUNS_LOCK:
        try:
            st = os.stat(run / RUN_LOCK)
        except OSError:  # none yet; or the open below says what is wrong
            pass
        else:
            if (st.st_dev, st.st_ino) in _HELD_RUNS:
                raise busy
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FlareSegError(f"--out {run}: cannot create the run folder ({exc.strerror or exc})") from None
        try:
            fd = os.open(run / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # write access: NFS locks need it
        except OSError as exc:  # the folder is there (a --resume, say), on a read-only file system perhaps
            raise FlareSegError(f"{run / RUN_LOCK}: cannot open the run's lock file ({exc.strerror or exc})") from None
        if fcntl is not None:  # Windows has none
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise busy from None
                log.warning("%s: cannot lock the run folder (%s); a second run started into it would not be refused",
                            run, exc.strerror or exc)  # fmt: skip
        st = os.fstat(fd)
        _HELD_RUNS[(st.st_dev, st.st_ino)] = fd
    return fd


def _release_run(fd: int) -> None:
    """Let go of a run's lock (:func:`_hold_run`)."""
    with _HELD_RUNS_LOCK:
        st = os.fstat(fd)
        _HELD_RUNS.pop((st.st_dev, st.st_ino), None)
        os.close(fd)


def _remove_created(run: Path, created: Path) -> None:
    """Remove the run folder this run created, and the folders it created above it while they are empty.

    Only emptied ones go: another run may have started in a folder this one created.
    """
    shutil.rmtree(run, ignore_errors=True)
    remove_empty_folders(itertools.takewhile(lambda folder: folder != created.parent, run.parents))


def _append_record(path: Path, record: dict[str, Any], outputs: AtomicOutputs) -> None:
    """One line more in the run's log, the file replaced whole (it is small) with the epoch's checkpoints.

    Records of epochs after ``record``'s go: a run resumed from an earlier checkpoint (one
    saved before a crash) does them again.
    """
    previous = path.read_text() if path.exists() else ""
    previous = previous[: previous.rfind("\n") + 1]  # a half line from a crash of an older version goes
    kept = [line for line in previous.splitlines(keepends=True) if _record_epoch(line) < record["epoch"]]
    with outputs.writing(path) as tmp:
        tmp.write_text("".join(kept) + json.dumps(record) + "\n")


def _record_epoch(line: str) -> float:
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return float("-inf")  # not a record: kept as it was


def train(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train per ``config``; with ``resume``, continue the run in ``config.out`` from its last.pt.

    Everything that can be checked cheaply (device, data layout, split, mask grids, the
    output folder) is checked before anything is written. A new run that fails before its
    first checkpoint removes the folders it created; an interrupted one (Ctrl-C) keeps
    them, and its statistics and slice cache are reused by a rerun with the same data.
    """
    h, w = check_slice_size(config.slice_size)
    if config.batch_size * (h // SIZE_MULTIPLE) * (w // SIZE_MULTIPLE) < 2:
        # Found at the first step otherwise, in a traceback from deep in torch, after the statistics and cache.
        raise FlareSegError(
            f"--size {h}x{w} with --batch-size {config.batch_size}: the network's bottleneck is "
            f"{h // SIZE_MULTIPLE}x{w // SIZE_MULTIPLE}, and its BatchNorm needs 2 values a channel in training; "
            "give --batch-size 2 or more, or a larger --size"
        )
    d0 = launch_place()
    device = training_device(config.device, d0)
    # Resolved first: "missing/../mine" does not exist as typed, yet names an existing folder that a
    # failed run's cleanup would then remove.
    run = Path(config.out).resolve()
    if run.exists() and not run.is_dir():
        raise FlareSegError(f"--out {run}: exists and is not a folder")
    data = Path(config.data).resolve()
    if run == data or any(run.is_relative_to(data / sub) for sub in ("TrainingImg", "TrainingMask")):
        raise FlareSegError(f"--out {run}: inside the training data {data}; give the run a folder of its own")
    created = _first_missing(run) if not resume and d0.main else None
    # Held before anything is written, by the main process only (the others write nothing into the folder).
    # A run refused here removes nothing: the folder is the other run's, even where this one made it first.
    # Held before the check for a trained run too: a job submitted twice is told that the first one is training,
    # not to --resume a run still under way.
    held = _hold_run(run) if d0.main else None
    trained = [name for name in RUN_OUTPUTS if (run / name).exists()] if not resume else []
    if trained:
        _let_go(run, held, created)
        raise FlareSegError(f"{run}: a run already exists there ({trained[0]}); use --resume {run} or another --out")
    if not resume and d0.main and (run / "config.json").is_file():  # said once the folder is this run's alone
        log.info("%s: no checkpoint yet (stopped in its first epoch); starting it from epoch 1", run)
    try:
        d, own_group = _init_distributed(config.device)
    except BaseException:
        _let_go(run, held, created)
        raise
    previous_device = torch.cuda.current_device() if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        way_out = "lower --batch-size and raise --accumulate by as much"
        with gpu_memory_errors("training", config.batch_size, way_out), _cudnn_benchmark(config.cudnn_benchmark):
            return _train(config, resume, d, device, run)
    except Exception:
        _let_go(run, held, created)
        held = None
        raise
    finally:
        if held is not None:
            _release_run(held)
        if previous_device is not None:  # the caller's current device, as it was
            torch.cuda.set_device(previous_device)
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _let_go(run: Path, held: int | None, created: Path | None) -> None:
    """After a failure: the folders this new run made go if it has no checkpoint yet, then the lock (removed
    while still held, so that no run can start in a folder about to be removed)."""
    if held is not None and fcntl is None:  # Windows removes no open file: let go first
        _release_run(held)
        held = None
    if created is not None and not (run / "last.pt").exists():
        _remove_created(run, created)
    if held is not None:
        _release_run(held)


def _check_resumable(
    run: Path, config: TrainConfig, cases: tuple[list[Case], list[Case]], current: dict[str, Any]
) -> None:
    """Refuse to resume on other data than the run was trained on (its statistics and split would not hold).

    Every case's image and mask, training and validation, as ``data.json`` records them (``current``: the
    :func:`data_key` of ``cases`` now); the training images alone (``stats.json``) for runs made before it.
    Names, sizes and the masks' contents: a copy or a move of the data is taken (new modification times are
    said in a warning).
    """
    train_cases, split = cases[0], _split_names(cases)
    recorded = _read_record(run / "data.json")
    if recorded is not None:
        change = describe_change(recorded, current, contents_only=True, files="cases (images and masks)")
        if change is not None:
            raise FlareSegError(
                f"{config.data}: not the data run {run} was trained on ({change}); start a new run with another --out"
            )
        if describe_change(recorded, current) is not None:
            log.warning("%s: some images or masks have new modification times (same names, sizes and mask contents: "
                        "a copy?); their slices are cached again", run)  # fmt: skip
        return
    stats_path = run / "stats.json"
    source = read_stats_file(stats_path)[1] if stats_path.is_file() else None
    if source is not None:
        change = describe_change(source, stats_key(train_cases), contents_only=True)
        if change is not None:
            raise FlareSegError(
                f"{config.data}: not the data run {run} was trained on ({change}); start a new run with another --out"
            )
        if describe_change(source, stats_key(train_cases)) is not None:
            log.warning("%s: some training files have new modification times; their slices are cached again", run)
        return
    then = _read_record(run / "split.json")  # runs made before stats.json named its source
    if then is not None and then != split:
        raise FlareSegError(
            f"{config.data}: not the data run {run} was trained on (its split {run / 'split.json'} names other "
            "cases); start a new run with another --out"
        )


def _read_record(path: Path) -> Any:
    """A JSON record of the run; None where the run has none (made by an older version)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FlareSegError(f"{path}: unreadable ({exc})") from None


def _make_run_dir(run: Path, config: TrainConfig) -> None:
    """The run folder, and its config.json if it has none yet (a run resumed keeps its own until its data are
    checked: a resume refused for bad data must not leave the run pointing at them)."""
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlareSegError(f"--out {run}: cannot create the run folder ({exc.strerror or exc})") from None
    if not (run / "config.json").exists():
        write_text_atomic(config.to_json() + "\n", run / "config.json")


def _dataset_statistics(run: Path, train_cases: Sequence[Case], resumed: NormalizationStats | None) -> None:
    """Write ``stats.json``: a resumed run's own (``resumed``), else the one there if it was computed from these
    very training images, else new ones."""
    stats_path = run / "stats.json"
    key = stats_key(train_cases)
    if resumed is not None:  # a run keeps its statistics, whatever is on disk: its weights were trained with them
        write_stats_file(stats_path, resumed, key)
        return
    if stats_path.is_file():
        try:
            _, source = read_stats_file(stats_path)
        except FlareSegError:  # damaged: computed again
            source = None
        if source is not None and describe_change(source, key) is None:
            log.info("dataset statistics: reusing %s (same training images)", stats_path)
            return
        log.info("dataset statistics in %s were computed from other data; computing them again", stats_path)
    log.info("dataset statistics over %d training cases", len(train_cases))
    write_stats_file(stats_path, dataset_stats(train_cases), key)


def _split_for_run(config: TrainConfig, resume: bool, run: Path) -> tuple[list[Case], list[Case]]:
    """The run's training and validation cases, their headers checked."""
    cases = find_training_cases(config.data)
    try:
        train_cases, val_cases = split_cases(
            cases, val_cases=config.val_cases, val_list=config.val_list, seed=config.seed
        )
    except FlareSegError as exc:
        if not resume:
            raise
        # The run's own split settings split its data once: data they cannot split are other data.
        raise FlareSegError(
            f"{config.data}: not the data run {run} was trained on ({exc}); start a new run with another --out"
        ) from None
    check_headers(cases)
    return train_cases, val_cases


def _split_names(cases: tuple[list[Case], list[Case]]) -> dict[str, list[str]]:
    """The split as the run's split.json records it."""
    return {"train": [c.name for c in cases[0]], "validation": [c.name for c in cases[1]]}


#: Settings a last.pt's record may differ from config.json in: where the run is, and how it runs (a resume may
#: change those), and the accumulation (checked as the global batch).
_MAY_DIFFER = frozenset({"data", "out", "epochs", "device", "workers", "cudnn_benchmark", "accumulate"})


def _recorded_config(record: Any) -> dict[str, Any] | None:
    """A last.pt's record of its run's settings, in today's form (older forms read as config.json's are); None
    where there is none, or it is not one this version reads."""
    if not isinstance(record, dict):
        return None
    try:
        return TrainConfig.from_dict(record).to_dict()
    except FlareSegError:
        return None


def _checkpoint_to_resume(config: TrainConfig, run: Path) -> tuple[dict[str, Any], ModelInfo]:
    """The run's last.pt, checked against its config; refused where ``--epochs`` asks for fewer than are done."""
    payload = read_checkpoint(run / "last.pt")
    state = payload.get("train_state")
    if not isinstance(state, dict):
        raise FlareSegError(f"{run / 'last.pt'}: no training state to resume from")
    if not isinstance(state.get("optimizer"), dict):
        raise FlareSegError(
            f"{run / 'last.pt'}: holds no optimiser state (a copy of best.pt, which keeps the weights alone?), so the "
            "run cannot go on where it stopped; put the run's own last.pt back, or train anew into another --out"
        )
    saved = ModelInfo.from_dict(payload, str(run / "last.pt"))
    if saved.network.base_width != config.base_width or saved.slice_size != config.slice_size:
        raise FlareSegError(
            f"{run / 'last.pt'}: width {saved.network.base_width}, slices {saved.slice_size}; "
            f"{run / 'config.json'} says width {config.base_width}, slices {config.slice_size}"
        )
    then = _recorded_config(state.get("config"))
    if then is not None:  # a last.pt of another run, copied in, would go on with its statistics and weights
        now = config.to_dict()
        differ = [key for key in sorted(set(then) & set(now) - _MAY_DIFFER) if then[key] != now[key]]
        if differ:
            shown = "; ".join(f"{key} {then[key]!r} (the run has {now[key]!r})" for key in differ[:3])
            raise FlareSegError(
                f"{run / 'last.pt'}: saved by a run of other settings than {run / 'config.json'} ({shown}): "
                "not this run's checkpoint?"
            )
    done = int(state["epoch"]) + 1
    if config.epochs < done:
        raise FlareSegError(f"--epochs {config.epochs}: run {run} has already done {done} epochs")
    return payload, saved


def _check_global_batch(run: Path, config: TrainConfig, state: dict[str, Any], world: int) -> None:
    """Refuse a resume whose global batch (per-process batch x accumulation x processes) is not the run's: its
    steps would differ from those of the run that stopped, and its result from one that never did. Another number
    of processes is fine where ``--accumulate`` keeps the global batch; last.pt files that predate the record of
    the process count keep their own accumulation."""
    then = state.get("config") or {}
    batch = int(then.get("batch_size", config.batch_size))
    accumulate = int(then.get("accumulate", config.accumulate))
    if "world" not in state:
        if config.accumulate != accumulate:
            raise FlareSegError(
                f"--accumulate {config.accumulate}: {run / 'last.pt'} does not record how many processes trained it, "
                f"so only its own --accumulate {accumulate} keeps its global batch"
            )
        return
    processes = int(state["world"])
    recorded, now = batch * accumulate * processes, _global_batch(config, world)
    if now == recorded:
        return
    fix = (
        f"--accumulate {recorded // (config.batch_size * world)} keeps it"
        if recorded % (config.batch_size * world) == 0
        else f"resume it on {processes} process{'es' if processes > 1 else ''}"
    )
    raise FlareSegError(
        f"{run / 'last.pt'}: trained with a global batch of {recorded} slices ({processes} process"
        f"{'es' if processes > 1 else ''} x batch {batch} x accumulate {accumulate}); this resume's would be {now} "
        f"({world} x {config.batch_size} x {config.accumulate}): {fix}"
    )


def _prepare_data(
    config: TrainConfig,
    d: _Dist,
    run: Path,
    cases: tuple[list[Case], list[Case]],
    resumed: NormalizationStats | None,
    data: dict[str, Any] | None = None,
) -> tuple[ModelInfo, SliceCache]:
    """The run folder with its statistics, slice cache, split, data record and config (written by the main
    process), and the model description they give. ``data``: the cases' :func:`data_key`, where taken already."""
    train_cases, val_cases = cases
    split = _split_names(cases)

    def statistics() -> None:
        _make_run_dir(run, config)
        _dataset_statistics(run, train_cases, resumed)

    d.on_main(statistics)  # a failure on the main process (a bad case) is every process's, in its one line
    stats = read_stats_file(run / "stats.json")[0]
    cache = SliceCache(run / "cache", stats, config.slice_size)

    def cached() -> None:
        cache.build(train_cases)
        cache.build(val_cases, full_resolution=True)
        write_text_atomic(json.dumps(split, indent=2), run / "split.json")
        key = data if data is not None else data_key([*train_cases, *val_cases])
        write_text_atomic(json.dumps(key, indent=1), run / "data.json")
        write_text_atomic(config.to_json() + "\n", run / "config.json")  # every case read: the data are good

    d.on_main(cached)
    info = ModelInfo(
        network=NetworkConfig(base_width=config.base_width), normalization=stats, slice_size=config.slice_size
    )
    return info, cache


def _new_model(config: TrainConfig, info: ModelInfo, device: torch.device) -> nn.Module:
    """The network with its initial weights, on ``device`` in the run's memory format."""
    # Module construction and He initialisation draw from torch's global generator: seed a fork of it, so the
    # weights follow from the seed alone and the caller's generator is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_generator_seed(config.seed))
        model = build_training_network(info.network)
        _init_weights(model)
    return model.to(device=device).to(memory_format=_memory_format(config))  # type: ignore[call-overload]


def _memory_format(config: TrainConfig) -> torch.memory_format:
    return torch.channels_last if config.channels_last else torch.contiguous_format


@dataclass(frozen=True)
class _Epochs:
    """What every epoch of a run trains with."""

    config: TrainConfig
    d: _Dist
    device: torch.device
    info: ModelInfo
    dataset: SliceDataset
    steps: int
    weights: LossWeights


def _train_epoch(
    e: _Epochs, epoch: int, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> dict[str, Any]:
    """One epoch's steps; its log record's training part (the loss is the mean over all replicas)."""
    config, d, device, steps = e.config, e.d, e.device, e.steps
    global_batch = _global_batch(config, d.world)
    fmt = _memory_format(config)
    order = _global_order(len(e.dataset), steps, global_batch, _epoch_generator(config.seed, epoch, 0))
    thetas = sample_affines(
        steps * global_batch, config.slice_size, config.augment, _epoch_generator(config.seed, epoch, 1)
    )
    loader = torch.utils.data.DataLoader(
        e.dataset,
        batch_sampler=_StepSampler(order, steps, config, d),
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=_epoch_generator(config.seed, epoch, 2),  # its worker seeds; else drawn from the global one
        worker_init_fn=loader_worker_signals,  # a stop signal is this process's to handle, not a worker crash
    )
    net.train()
    t_epoch = time.perf_counter()
    data_time, losses = 0.0, []
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="step",
        disable=progress_disabled() if d.main else True,
        leave=False,
    )
    with stop_signals_blocked():  # the loader forks its workers here: a stop during a fork would be lost
        batches = iter(loader)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.accumulate):
            t0 = time.perf_counter()
            images, labels = next(batches)
            data_time += time.perf_counter() - t0
            c = micro * d.world + d.rank
            base = step * global_batch + c * config.batch_size
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            images, labels = augment_batch(images, labels, thetas[base : base + len(images)])
            x = images[:, None].expand(-1, e.info.network.in_channels, -1, -1).contiguous(memory_format=fmt)
            sync = contextlib.nullcontext() if micro == config.accumulate - 1 or d.world == 1 else net.no_sync()  # type: ignore[operator]
            with sync, torch.autocast(device.type, dtype=torch.float16, enabled=config.amp):
                logits, aux = net(x)
                loss = deep_supervision_loss(logits.float(), [a.float() for a in aux], labels, e.weights)
                scaler.scale(loss / config.accumulate).backward()
            step_loss += float(loss.detach()) / config.accumulate
        _check_loss(step_loss, epoch, step, steps, d, device)
        scaler.step(optimizer)
        scaler.update()
        losses.append(step_loss)
        elapsed = time.perf_counter() - t_epoch
        bar.set_postfix(loss=f"{step_loss:.4f}", data=f"{100 * data_time / elapsed:.0f}%")  # tqdm shows step/s
        bar.update()
    bar.close()
    with stop_signals_blocked():  # the workers end here (a stop in their __del__ would be dropped), not in
        del batches  # validation: they held their memory through it before the function split
    train_time = time.perf_counter() - t_epoch
    epoch_loss = torch.tensor(float(np.mean(losses)), dtype=torch.float64, device=device)
    if d.world > 1:  # report the mean over all replicas' micro-batches, not rank 0's alone
        dist.all_reduce(epoch_loss)
        epoch_loss /= d.world
    return {
        "epoch": epoch + 1,
        "loss": float(epoch_loss),
        "steps": steps,
        "steps_per_s": steps / train_time,
        "data_time_fraction": data_time / train_time,
        "train_time_s": train_time,
    }


def _train(config: TrainConfig, resume: bool, d: _Dist, device: torch.device, run: Path) -> TrainResult:
    cases = _split_for_run(config, resume, run)
    payload: dict[str, Any] = {}
    resumed: NormalizationStats | None = None
    data: dict[str, Any] | None = None  # data.json's record of the cases, where a resume took it to check them
    if resume:
        payload, saved = _checkpoint_to_resume(config, run)
        state = payload["train_state"]
        if config.epochs == int(state["epoch"]) + 1:  # nothing to resume: say so, rather than "resuming at N + 1"
            log.info(
                "%s: complete, all %d epochs done; --epochs N (more than %d) trains it further",
                run, config.epochs, config.epochs,
            )  # fmt: skip
            return TrainResult(run, float(state["best_score"]), int(state["best_epoch"]), [])

        def check() -> dict[str, Any]:
            key = data_key([*cases[0], *cases[1]])  # checked, then recorded again: each mask hashed once
            _check_resumable(run, config, cases, key)
            return key

        _check_global_batch(run, config, state, d.world)  # before every mask is hashed: it reads a header alone
        data = d.on_main(check)
        resumed = saved.normalization
    info, cache = _prepare_data(config, d, run, cases, resumed, data)

    model = _new_model(config, info, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp)
    start_epoch, best_score, best_epoch = 0, -1.0, -1
    if resume:
        state = payload["train_state"]
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        if d.main:
            log.info(
                "resuming %s at epoch %d (best mean DSC %.4f at epoch %d)", run, start_epoch + 1, best_score, best_epoch
            )
            if best_epoch > 0 and not (run / "best.pt").exists():
                log.warning("%s: best.pt is missing (moved or removed?); only an epoch that beats mean DSC %.4f "
                            "(epoch %d) writes it again", run, best_score, best_epoch)  # fmt: skip
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dataset = SliceDataset(cache, cases[0])
    whole = max(1, len(dataset) // _global_batch(config, d.world))
    steps = config.steps_per_epoch if config.steps_per_epoch is not None else whole
    weights = LossWeights(final=config.loss_weights[0], aux=tuple(config.loss_weights[1:]))  # type: ignore[arg-type]
    epochs = _Epochs(config, d, device, info, dataset, steps, weights)
    history: list[dict[str, Any]] = []
    val_volumes = validation_volumes(cache, cases[1], info.normalization) if d.main else []

    for epoch in range(start_epoch, config.epochs):
        record = _train_epoch(epochs, epoch, net, optimizer, scaler)
        record["replica_divergence"] = replica_divergence(model, d)
        _check_weights(model, epoch)
        if d.main:
            t_val = time.perf_counter()
            record.update(validate(model, val_volumes, info, device, config.val_batch_size))
            record["val_time_s"] = time.perf_counter() - t_val
            improved = record["dsc_mean"] > best_score
            if improved:
                best_score, best_epoch = record["dsc_mean"], epoch + 1
            record["best_dsc_mean"] = best_score
            train_state = {
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if config.amp else None,
                "config": config.to_dict(),
                "world": d.world,  # with the config's batch and accumulation: the global batch a resume must keep
            }
            # One set, renamed together once all are written (a stop is held back between the renames): best.pt
            # beside a last.pt of another epoch would leave a run that neither resumes nor restarts right. The log
            # goes first: killed between the renames, a record ahead of last.pt is replaced when the epoch is
            # done again, while a last.pt ahead of the log would leave a record missing for good.
            with atomic_outputs() as outputs:
                _append_record(run / "log.jsonl", record, outputs)
                if improved:
                    best_state = {"train_state": {**train_state, "optimizer": None}}
                    save_checkpoint(run / "best.pt", model, info, extra=best_state, outputs=outputs)
                save_checkpoint(run / "last.pt", model, info, extra={"train_state": train_state}, outputs=outputs)
            organs = ", ".join(f"{LABELS[o]} {record[f'dsc_{LABELS[o]}']:.3f}" for o in ORGANS)
            log.info(
                "epoch %d: loss %.4f, %.2f steps/s (data %.0f%%), val DSC %s; mean %.3f%s",
                epoch + 1, record["loss"], record["steps_per_s"], 100 * record["data_time_fraction"],
                organs, record["dsc_mean"], " (best)" if improved else "",
            )  # fmt: skip
        history.append(record)
        d.barrier()
    return TrainResult(run, best_score, best_epoch, history)

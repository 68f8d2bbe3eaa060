"""``build_engine``: a checkpoint -> a verified engine directory (manifest, weights, artifacts).

Each artifact backend of the registry (:mod:`stvfm_engine.engine.registry`) says whether it can build
for a device and precision here and writes its artifact through the :class:`BuildContext`. Every
artifact is then opened through the runtime's own backend and must pass the parity gate and, when data
is given, the task gate (test MAE vs the fp32 reference's; any precision), before the directory is
swapped into place.
"""
from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from stvfm_engine.engine.manifest import (FORMAT_VERSION, WEIGHTS_NAME, file_record, file_table, write_manifest)
from stvfm_engine.engine.precision import Precision, get_precision
from stvfm_engine.engine.registry import BACKENDS, DEFAULT_MAX_BATCH, BuildContext, names
from stvfm_engine.engine.resolve import normalize_device
from stvfm_engine.engine.runtime import cuda_status
from stvfm_engine.engine.session import open_session
from stvfm_engine.export.atomic_dir import atomic_directory
from stvfm_engine.export.auto import build_auto, candidates
from stvfm_engine.export.gates import DEFAULT_MAX_MAE_LOSS, check_max_mae_loss, mae_gate
from stvfm_engine.export.onnx_export import export_onnx
from stvfm_engine.export.parity import check_parity
from stvfm_engine.export.progress import BuildProgress
from stvfm_engine.export.records import built_engine, manifest_head, model_record
from stvfm_engine.model.checkpoint import model_from_checkpoint, read_checkpoint
from stvfm_engine.model.data import load_flow_data, windows_for
from stvfm_engine.model.evaluate import model_forecaster
from stvfm_engine.model.stvfm import STVFM
from stvfm_engine.errors import BuildError

ONNX_NAME = BACKENDS["onnxruntime"].files[0]
AUTO = "auto"  # build --precision auto
EXPORT_DIR = ".export"  # inside the temp build directory: the fp32 ONNX export the artifacts start from


def _onnx_once(model: STVFM, directory: Path, max_batch: int, ui: BuildProgress) -> Callable[[], Path]:
    """``directory/model.onnx`` (fp32), exported and checked on the first call only; the backends that start
    from it write their own artifacts from it and never modify it."""
    @functools.cache
    def onnx() -> Path:
        path = directory / ONNX_NAME
        directory.mkdir(exist_ok=True)
        with ui.stage("onnx", "export + onnx.checker"):
            export_onnx(model, path, max_batch)
        return path

    return onnx


def build_status(backend: str, device: str = "cpu", precision: str = "fp32") -> Optional[str]:
    """None when this machine can build ``backend`` for ``device`` at ``precision``, else why not."""
    if backend not in BACKENDS or BACKENDS[backend].bench_only:
        return f"unknown backend {backend!r}; expected one of {list(names(artifact=True))}"
    return BACKENDS[backend].why_not_build(device, precision)


def resolve_backends(backends: Optional[Iterable[str] | str], device: str, precision: Precision,
                     multi_model: bool = False) -> list[str]:
    """The requested backends in build order (None: all this machine can build); unbuildable ones are errors.

    ``multi_model``: for a multi-model directory (only backends whose registry record has ``multi_model``).
    """
    artifacts = names(artifact=True, multi_model=multi_model)
    if backends is None:
        chosen = [b for b in artifacts if build_status(b, device, precision.name) is None]
        if not chosen:
            reasons = "; ".join(f"{b}: {build_status(b, device, precision.name)}" for b in artifacts)
            raise BuildError(f"nothing can be built here for {device} at {precision.name} ({reasons})")
        return chosen
    if isinstance(backends, str):
        backends = [b.strip() for b in backends.split(",") if b.strip()]
    chosen = list(dict.fromkeys(backends))
    if not chosen:
        raise BuildError(f"no backends given; expected some of {list(artifacts)}")
    for b in chosen:
        if multi_model and b in names(artifact=True) and b not in artifacts:
            raise BuildError(f"cannot build {b} for a multi-model engine: its backend has no multi-model build "
                             f"(those that have: {list(artifacts)})")
        if why := build_status(b, device, precision.name):
            raise BuildError(f"cannot build {b} for {device} at {precision.name}: {why}")
    return [b for b in artifacts if b in chosen]


def check_max_batch(max_batch: int) -> int:
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise BuildError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    return max_batch


def normalize_build_device(device: str) -> str:
    d = normalize_device(device)
    if torch.device(d).type == "cuda" and (why := cuda_status()):
        raise BuildError(f"cannot build for {device}: {why}")
    return d


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))


def build_engine(checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
                 backends: Optional[Sequence[str] | str] = None, precision: str = "fp32", device: str = "cpu",
                 max_batch: int = DEFAULT_MAX_BATCH, progress: bool = True, calib_data: Optional[str | os.PathLike] = None,
                 max_mae_loss: float = DEFAULT_MAX_MAE_LOSS, threads: Optional[int] = None) -> Path:
    """Build the engine directory ``output_dir`` from ``checkpoint``; return its path.

    ``backends``: artifact backends of the registry (None: all this machine can build for ``device`` at
    ``precision``). Every artifact must pass the parity gate (relative error within the precision's
    tolerance, :mod:`stvfm_engine.engine.precision`) against the fp32 reference, or the build fails and
    ``output_dir`` is left as it was. ``progress`` shows rich progress on stderr. Every artifact is also
    gated on the forecasting task when ``calib_data`` (a data PREFIX) is given: test MAE within
    ``max_mae_loss`` of the fp32 reference's (:mod:`stvfm_engine.export.gates`; recorded in the
    manifest entry as ``reduced_precision.gate``, or ``task_gate`` for fp32). ``precision="auto"`` builds every
    candidate this CPU can build, times those that pass their gates and keeps the fastest of each backend,
    the fastest of all as the directory's default (:mod:`.auto`). ``threads``: intra-op threads of the
    sessions that gate (and, with auto, time) the artifacts.
    """
    auto = precision == AUTO
    prec = get_precision("fp32" if auto else precision)
    if auto and torch.device(normalize_device(device)).type != "cpu":
        raise BuildError(f"--precision auto chooses among CPU artifacts, not --device {device} "
                         "(name --backends and --precision for a GPU)")
    device = normalize_build_device(device)
    check_max_batch(max_batch)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise BuildError(f"threads must be an integer >= 1, got {threads!r}")
    max_mae_loss = check_max_mae_loss(max_mae_loss)
    if auto:
        if isinstance(backends, str):
            backends = [b.strip() for b in backends.split(",") if b.strip()]
        pending = candidates(backends, device)
    else:
        chosen = resolve_backends(backends, device, prec)
    ckpt_path = Path(checkpoint)
    ckpt = read_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, source=str(ckpt_path))
    if calib_data is not None:  # a wrong data set fails now, not after the long compile
        windows_for(model, load_flow_data(calib_data), "test")
    target = Path(output_dir).absolute()
    ui = BuildProgress(enabled=progress)
    started = time.perf_counter()
    with ui, atomic_directory(target) as tmp:
        export = tmp / EXPORT_DIR
        ctx = BuildContext(model, tmp, target, prec, device, max_batch, _onnx_once(model, export, max_batch, ui),
                           ui.stage, None if calib_data is None else Path(calib_data))
        with ui.stage("weights", f"{WEIGHTS_NAME} + checkpoint sha256"):
            save_weights(model.state_dict(), tmp / WEIGHTS_NAME)
            ckpt_record = {"file": ckpt_path.name, **file_record(ckpt_path)}
        extra = {}
        if auto:
            build_one = functools.partial(_build_one, ui=ui, calib_data=calib_data, max_mae_loss=max_mae_loss,
                                          threads=threads)
            entries, default, extra["auto"] = build_auto(ctx, pending, build_one, threads)
            extra["default"] = default
            prec, chosen = get_precision(default["precision"]), list(entries)
        else:
            entries = {name: _build_one(name, ctx, ui, calib_data, max_mae_loss, threads) for name in chosen}
        shutil.rmtree(export, ignore_errors=True)
        manifest = {
            **manifest_head(FORMAT_VERSION, prec, device, max_batch),
            **model_record(model, ckpt_record, max_batch),
            "files": file_table(tmp),
            "backends": entries,
            **extra,
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        write_manifest(tmp, manifest)
    ui.note(f"engine written to {target} ({', '.join(chosen)}; {manifest['build_seconds']:.1f} s)")
    return Path(output_dir)


def _build_one(name: str, ctx: BuildContext, ui: BuildProgress, calib_data: Optional[str | os.PathLike],
               max_mae_loss: float, threads: Optional[int] = None) -> dict:
    """Build one backend's artifact, open it through the runtime, gate it; its manifest record."""
    spec, prec, model = BACKENDS[name], ctx.precision, ctx.model
    t0 = time.perf_counter()
    artifact = spec.impl().build(ctx)
    seconds = time.perf_counter() - t0
    # a portable artifact (model.onnx) is checked on the CPU where its runtime has no provider for the device
    run_device = "cpu" if spec.portable and spec.why_not_run(ctx.device) else ctx.device
    entry = {"file": artifact.path.name, "precision": prec.name, "device": run_device}
    if artifact.runtime:
        entry["runtime"] = artifact.runtime
    with ctx.stage(name, f"parity gate on {run_device}"):
        session = open_session(built_engine(ctx, {name: entry}), name, prec.name, run_device, threads)
        predict = functools.partial(session.predict, None)  # the runtime's own path: check, then run
        entry["parity"] = check_parity(name, predict, model, prec, ctx.max_batch)
    ui.note(f"{name}: max relative error {entry['parity']['max_rel_err']:.2e} (tolerance {prec.tolerance:g})")
    gate = None
    if calib_data is not None:  # every artifact, fp32 too: its MAE against the fp32 reference's, measured
        with ctx.stage(name, f"task gate: test MAE vs the fp32 reference on {calib_data}"):
            gate = mae_gate(predict, model_forecaster(model), calib_data, model.config, prec.name, max_mae_loss,
                            batch_size=min(64, ctx.max_batch))
        ui.note(f"{name}: test MAE {gate['mae']:.4f} vs fp32 {gate['mae_fp32']:.4f} ({100 * gate['mae_loss']:+.2f}%)")
    if prec.reduced:
        if gate is None:
            gate = {"gate": "relative_error", "note": "no --calib-data: the parity gate at the "
                                                      f"{prec.name} tolerance decides"}
        entry["reduced_precision"] = {**artifact.details, "gate": gate}
    elif gate is not None:
        entry["task_gate"] = gate
    entry["build_seconds"] = round(seconds, 3)
    return entry

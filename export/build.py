"""``build_engine``: a checkpoint -> a verified engine directory (manifest, weights, artifacts).

Each backend has a :class:`BackendBuilder`: what it can build (device x precision, the dispatch point
for ``--precision``), and how. Every artifact is opened through the runtime's own backend and must
pass the parity gate before the directory is swapped into place.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from stvfm_engine import __version__
from stvfm_engine.engine.backends import (ARTIFACT_BACKENDS, ARTIFACT_FILES, BACKENDS, cuda_status, open_backend,
                                          run_status)
from stvfm_engine.export.aoti import export_aoti
from stvfm_engine.export.atomic_dir import BuildError, atomic_directory
from stvfm_engine.export.graph import io_spec
from stvfm_engine.export.manifest import (FORMAT_VERSION, WEIGHTS_NAME, file_record, file_table,
                                          library_versions, write_manifest)
from stvfm_engine.export.onnx_export import export_onnx
from stvfm_engine.export.parity import check_parity
from stvfm_engine.export.precision import Precision, get_precision
from stvfm_engine.export.progress import BuildProgress
from stvfm_engine.export.tensorrt import TIMING_CACHE_NAME, build_tensorrt
from stvfm_engine.model.checkpoint import model_from_checkpoint, read_checkpoint
from stvfm_engine.model.stvfm import STVFM


@dataclass
class BuildContext:
    model: STVFM  # fp32 reference, CPU
    directory: Path  # the temp sibling being built
    target: Path  # the final DIR (its previous contents may seed caches)
    precision: Precision
    device: str
    max_batch: int
    progress: BuildProgress
    done: dict = field(default_factory=dict)  # stages already run (the ONNX file serves ORT and TensorRT)
    calib_data: Optional[str] = None  # int8: data PREFIX of the test-MAE gate (export/quantize.py)
    max_mae_loss: float = 0.01

    def onnx(self) -> Path:
        """``model.onnx`` (fp32; exported and checked once per build)."""
        path = self.directory / ARTIFACT_FILES["onnxruntime"]
        if "onnx" not in self.done:
            with self.progress.stage("onnx", "export + onnx.checker"):
                export_onnx(self.model, path, self.max_batch)
            self.done["onnx"] = True
        return path


def which_compiler() -> Optional[str]:
    """The C++ compiler AOTInductor would use, or None."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "clang++", "c++")):
        if path := shutil.which(name):
            return path
    return None


def _missing(*modules: str) -> Optional[str]:
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(absent)} not installed" if absent else None


# ----------------------------------------------------------------------------- the builders
def _why_not_onnxruntime(device: str, precision: Precision) -> Optional[str]:
    if why := _missing("onnx", "onnxscript", "onnxruntime"):
        return f"{why} (pip install 'stvfm-engine[onnx]')"
    # --- int8 dispatch (bench work): ONNX Runtime artifacts are fp32 or int8; see export/quantize.py
    if precision.name == "int8":
        return _missing("onnxruntime.quantization")
    if precision.reduced:
        return "the ONNX Runtime artifact is fp32 only, or int8 (other reduced precisions: use aoti or tensorrt)"
    return None


def _build_onnxruntime(ctx: BuildContext) -> Path:
    path = ctx.onnx()
    if ctx.precision.name == "int8":  # --- int8 (bench work)
        from stvfm_engine.export.quantize import quantize_onnx_artifact

        with ctx.progress.stage("int8", "ONNX Runtime dynamic int8 quantisation + task gate"):
            ctx.done["int8"] = quantize_onnx_artifact(path, ctx.model, ctx.calib_data, ctx.max_mae_loss)
    return path


def _why_not_aoti(device: str, precision: Precision) -> Optional[str]:
    if precision.name == "int8":  # --- int8 (bench work)
        return "int8 is built for onnxruntime only"
    if which_compiler() is None:
        return "no C++ compiler found (AOTInductor compiles C++: install g++ or set CXX)"
    return None


def _build_aoti(ctx: BuildContext) -> Path:
    path = ctx.directory / ARTIFACT_FILES["aoti"]
    with ctx.progress.stage("aoti", f"torch.export + AOTInductor compile ({ctx.device}, {ctx.precision.name})"):
        export_aoti(ctx.model, path, ctx.precision, ctx.device, ctx.max_batch)
    return path


def _why_not_tensorrt(device: str, precision: Precision) -> Optional[str]:
    if torch.device(device).type != "cuda":
        return "TensorRT builds for CUDA devices only (use --device cuda)"
    if precision.name == "int8":  # --- int8 (bench work)
        return "int8 is built for onnxruntime only"
    if why := _missing("tensorrt"):
        return f"{why} (pip install 'stvfm-engine[gpu]'); untested here"
    return _why_not_onnxruntime(device, get_precision("fp32"))  # it is built from the fp32 ONNX file


def _build_tensorrt(ctx: BuildContext) -> Path:
    onnx_path = ctx.onnx()
    path = ctx.directory / ARTIFACT_FILES["tensorrt"]
    with ctx.progress.stage("tensorrt", f"TensorRT engine build ({ctx.precision.name})"):
        build_tensorrt(onnx_path, path, ctx.precision, ctx.max_batch, seed_cache=ctx.target / TIMING_CACHE_NAME)
    return path


@dataclass(frozen=True)
class BackendBuilder:
    name: str
    why_not: Callable[[str, Precision], Optional[str]]  # (device, precision) -> None if buildable, else why
    build: Callable[[BuildContext], Path]


BUILDERS: dict[str, BackendBuilder] = {
    "onnxruntime": BackendBuilder("onnxruntime", _why_not_onnxruntime, _build_onnxruntime),
    "aoti": BackendBuilder("aoti", _why_not_aoti, _build_aoti),
    "tensorrt": BackendBuilder("tensorrt", _why_not_tensorrt, _build_tensorrt),
}
assert tuple(BUILDERS) == ARTIFACT_BACKENDS


def build_status(backend: str, device: str = "cpu", precision: str = "fp32") -> Optional[str]:
    """None when this machine can build ``backend`` for ``device`` at ``precision``, else why not."""
    if backend not in BUILDERS:
        return (f"{backend} runs from the weights and has no artifact to build" if backend in BACKENDS
                else f"unknown backend {backend!r}; expected one of {list(ARTIFACT_BACKENDS)}")
    if torch.device(device).type == "cuda" and (why := cuda_status()):
        return why
    return BUILDERS[backend].why_not(device, get_precision(precision))


def resolve_backends(backends: Optional[Iterable[str] | str], device: str, precision: Precision) -> list[str]:
    """The requested backends in build order (None: all this machine can build); unbuildable ones are errors."""
    if backends is None:
        names = [b for b in ARTIFACT_BACKENDS if build_status(b, device, precision.name) is None]
        if not names:
            reasons = "; ".join(f"{b}: {build_status(b, device, precision.name)}" for b in ARTIFACT_BACKENDS)
            raise BuildError(f"nothing can be built here for {device} at {precision.name} ({reasons})")
        return names
    if isinstance(backends, str):
        backends = [b.strip() for b in backends.split(",") if b.strip()]
    names = list(dict.fromkeys(backends))
    if not names:
        raise BuildError(f"no backends given; expected some of {list(ARTIFACT_BACKENDS)}")
    for b in names:
        if why := build_status(b, device, precision.name):
            raise BuildError(f"cannot build {b} for {device} at {precision.name}: {why}")
    return [b for b in ARTIFACT_BACKENDS if b in names]


def _normalize_device(device: str) -> str:
    try:
        d = torch.device(device)
    except RuntimeError:
        raise BuildError(f"unknown device {device!r}; expected cpu or cuda[:N]") from None
    if d.type not in ("cpu", "cuda"):
        raise BuildError(f"unsupported device {device!r}; expected cpu or cuda[:N]")
    if d.type == "cuda" and (why := cuda_status()):
        raise BuildError(f"cannot build for {device}: {why}")
    return str(d)


def _save_weights(model: STVFM, path: Path) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(path))


def build_engine(checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
                 backends: Optional[Sequence[str] | str] = None, precision: str = "fp32", device: str = "cpu",
                 max_batch: int = 64, progress: bool = True, calib_data: Optional[str | os.PathLike] = None,
                 max_mae_loss: float = 0.01) -> Path:
    """Build the engine directory ``output_dir`` from ``checkpoint``; return its path.

    ``backends``: some of ``onnxruntime``, ``aoti``, ``tensorrt`` (None: all this machine can build
    for ``device`` at ``precision``). Every artifact must pass the parity gate (relative error <= 1e-4
    for fp32, 2e-2 for bf16/fp16) against the fp32 reference, or the build fails and ``output_dir``
    is left as it was. ``progress`` shows rich progress on stderr. ``int8`` (ONNX Runtime only) is
    also gated on the forecasting task when ``calib_data`` (a data PREFIX) is given: test MAE within
    ``max_mae_loss`` of fp32's (:mod:`stvfm_engine.export.quantize`).
    """
    prec = get_precision(precision)
    device = _normalize_device(device)
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise BuildError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    names = resolve_backends(backends, device, prec)
    ckpt_path = Path(checkpoint)
    ckpt = read_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, source=str(ckpt_path))
    target = Path(output_dir).absolute()
    ui = BuildProgress(enabled=progress)
    started = time.perf_counter()
    with ui, atomic_directory(target) as tmp:
        ctx = BuildContext(model, tmp, target, prec, device, max_batch, ui,
                           calib_data=None if calib_data is None else str(calib_data), max_mae_loss=max_mae_loss)
        with ui.stage("weights", f"{WEIGHTS_NAME} + checkpoint sha256"):
            _save_weights(model, tmp / WEIGHTS_NAME)
            ckpt_record = {"file": ckpt_path.name, **file_record(ckpt_path)}
        entries = {}
        for name in names:
            t0 = time.perf_counter()
            path = BUILDERS[name].build(ctx)
            seconds = time.perf_counter() - t0
            # the ONNX file is device-agnostic: its parity runs on CUDA only where ONNX Runtime has CUDA
            run_device = "cpu" if name == "onnxruntime" and run_status(name, device) else device
            with ui.stage(name, f"parity gate on {run_device}"):
                runner = open_backend(name, tmp, model.config, prec, run_device)
                parity = check_parity(name, runner, model, prec, max_batch)
                del runner
            ui.note(f"{name}: max relative error {parity['max_rel_err']:.2e} (tolerance {prec.tolerance:g})")
            entries[name] = {"file": path.name, "precision": "fp32" if name == "onnxruntime" else prec.name,
                             "device": run_device, "parity": parity, "build_seconds": round(seconds, 3)}
            if name == "onnxruntime" and "int8" in ctx.done:  # --- int8 (bench work)
                entries[name].update(precision="int8", reduced_precision=ctx.done["int8"])
        manifest = {
            "format_version": FORMAT_VERSION,
            "stvfm_engine_version": __version__,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": ckpt_record,
            "config": model.config.to_dict(),
            "normalization": {"mean": model.norm_mean.tolist(), "std": model.norm_std.tolist()},
            "precision": prec.name,
            "device": device,
            "max_batch": max_batch,
            "io": io_spec(model.config, max_batch),
            "versions": library_versions(),
            "files": file_table(tmp),
            "backends": entries,
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        write_manifest(tmp, manifest)
    ui.note(f"engine written to {target} ({', '.join(names)}; {manifest['build_seconds']:.1f} s)")
    return Path(output_dir)

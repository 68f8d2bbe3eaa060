"""The backend registry: one record per backend, the only place the backend names are listed.

CLI choices, ``env``, ``inspect``, ``bench``, backend resolution and the builders all read
:data:`BACKENDS`. A backend is one module under :mod:`stvfm_engine.engine.backends` (its runner, and
for an artifact backend its build step) plus one record here. A module provides:

- ``why_not_run(device: torch.device) -> str | None`` (optional: the generic checks below always run)
- ``open(request: OpenRequest) -> Runner``
- artifact backends: ``why_not_build(device, precision) -> str | None`` and ``build(ctx) -> Artifact``,
  where ``ctx`` is a :class:`BuildContext` made by the builder
- optionally ``version_problem(manifest) -> str | None`` (an artifact that needs the library version it
  was built with).

A backend whose record says ``multi_model=True`` also serves multi-model directories (several models
on one shared backbone, :mod:`stvfm_engine.engine.multi`): ``open_multi(request: MultiOpenRequest) -> Parts``
and, for an artifact backend, ``build_backbone(ctx: MultiBuildContext) -> Artifact`` (the shared backbone)
and ``build_parts(ctx, name) -> {"pre": Path, "post": Path}`` (one model's own parts).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, ContextManager, Mapping, Optional

import torch

from stvfm_engine.engine.precision import Precision, get_precision
from stvfm_engine.engine.runtime import cuda_status
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.stvfm import STVFM
from stvfm_engine.errors import BackendError


@dataclass(frozen=True)
class Backend:
    """What stvfm-engine knows about one backend."""

    name: str
    module: str  # the implementation, imported on first use
    files: tuple[str, ...] = ()  # artifact files written into DIR, main file first; () = runs from the weights
    devices: tuple[str, ...] = ("cpu", "cuda")  # device types it runs on
    precisions: tuple[str, ...] = ("fp32",)  # precisions it builds (artifact) or runs (weights)
    thread_safe: bool = True  # False: the Engine serialises calls with a lock
    threads: bool = False  # honours Engine.load(threads=N) (the torch backends use the process's torch threads)
    portable: bool = False  # the artifact runs on any of `devices`, whatever device it was built for
    default_precision: tuple[tuple[str, str], ...] = ()  # (device type, precision) when none is asked for
    distributions: tuple[str, ...] = ()  # libraries whose versions the manifest records for it
    bench_only: bool = False  # a baseline for `bench`, not something Engine.load serves
    auto: tuple[str, ...] = ()  # precisions `build --precision auto` tries on the CPU
    triton_platform: Optional[str] = None  # Triton Inference Server's platform for the artifact (export-triton)
    multi_model: bool = False  # serves multi-model directories (open_multi; artifact backends: build_backbone/_parts)
    note: Optional[str] = None  # shown by `env`

    @property
    def artifact(self) -> bool:
        return bool(self.files)

    def impl(self) -> ModuleType:
        return importlib.import_module(self.module)

    def precision_for(self, device: str | torch.device, asked: Optional[str]) -> str:
        """The precision to run at on ``device`` when ``asked`` (None: this backend's default there)."""
        return asked or dict(self.default_precision).get(torch.device(device).type, "fp32")

    def why_not_run(self, device: str | torch.device) -> Optional[str]:
        """None when this backend can run on ``device`` here, else why not (one line)."""
        kind = torch.device(device).type
        if kind not in self.devices:
            return f"{self.name} runs on {' or '.join(self.devices)} only, not {kind}"
        if kind == "cuda" and (why := cuda_status()):
            return why
        check = getattr(self.impl(), "why_not_run", None)
        return check(torch.device(device)) if check else None

    def why_not_build(self, device: str | torch.device, precision: str | Precision) -> Optional[str]:
        """None when this machine can build this backend's artifact for ``device`` at ``precision``."""
        prec = get_precision(precision)
        if not self.artifact:
            return f"{self.name} runs from the weights and has no artifact to build"
        kind = torch.device(device).type
        if kind not in self.devices:
            return f"{self.name} builds for {' or '.join(self.devices)} only (use --device {self.devices[0]})"
        if kind == "cuda" and (why := cuda_status()):
            return why
        if prec.name not in self.precisions:
            return f"{self.name} builds {', '.join(self.precisions)} only"
        return self.impl().why_not_build(torch.device(device), prec)

    def version_problem(self, manifest: dict[str, Any]) -> Optional[str]:
        check = getattr(self.impl(), "version_problem", None)
        return check(manifest) if check else None


@dataclass
class OpenRequest:
    """What a backend's ``open`` gets: the engine directory, its manifest entry and the resolved choices."""

    directory: Path
    entry: Optional[dict[str, Any]]  # manifest["backends"][name] (None for a weights backend)
    config: STVFMConfig
    precision: Precision
    device: torch.device
    threads: Optional[int]
    reference: Callable[[], STVFM]  # the fp32 reference model, built on demand
    max_batch: int  # the largest batch it will be asked for (the triton backend captures CUDA graphs up to it)


@dataclass
class Artifact:
    """What a backend's build step returns: its main file and the details the manifest records."""

    path: Path
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the quantisation done
    runtime: dict[str, Any] = field(default_factory=dict)  # settings its runner applies on open (manifest "runtime")


@dataclass
class BuildContext:
    """What a backend's ``build(ctx)`` gets from the builder (:mod:`stvfm_engine.export.build`)."""

    model: STVFM  # fp32 reference, CPU
    directory: Path  # the temp directory being built
    target: Path  # the final DIR (its previous contents may seed caches)
    precision: Precision
    device: str
    max_batch: int
    onnx: Callable[[], Path]  # the fp32 model.onnx, exported and checked once per build (ORT and TensorRT use it)
    stage: Callable[[str, str], ContextManager[None]]  # stage(backend, what): a progress stage
    calib_data: Optional[Path] = None  # build --calib-data PREFIX (calibration windows for static int8)


@dataclass
class MultiOpenRequest:
    """What a backend's ``open_multi`` gets: a multi-model directory, its manifest and the resolved choices."""

    directory: Path
    entry: Optional[dict[str, Any]]  # manifest["backends"][name]: the backbone artifact (None for a weights backend)
    models: Mapping[str, dict[str, Any]]  # manifest["models"]: name -> config, files, per-backend parts
    configs: Mapping[str, STVFMConfig]
    precision: Precision
    device: torch.device
    threads: Optional[int]
    references: Callable[[], Mapping[str, STVFM]]  # the fp32 reference models (sharing one backbone), on demand


@dataclass
class MultiBuildContext:
    """What a backend's ``build_backbone(ctx)`` and ``build_parts(ctx, name)`` get from the multi-model builder."""

    models: Mapping[str, STVFM]  # fp32 references, CPU, all with the same backbone tensors
    directory: Path  # the temp directory being built
    precision: Precision
    device: str
    max_batch: int
    backbone_onnx: Callable[[], Path]  # the fp32 backbone.onnx, exported and checked once per build
    parts_onnx: Callable[[str], tuple[Path, Path]]  # one model's fp32 pre.onnx and post.onnx
    stage: Callable[[str, str], ContextManager[None]]


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("onnxruntime", "stvfm_engine.engine.backends.onnxruntime", files=("model.onnx",),
            precisions=("fp32", "int8"), portable=True, threads=True, multi_model=True,
            distributions=("onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"), auto=("fp32", "int8"),
            triton_platform="onnxruntime_onnx"),
    Backend("openvino", "stvfm_engine.engine.backends.openvino", files=("model.xml", "model.bin"), devices=("cpu",),
            precisions=("fp32", "bf16", "int8"), threads=True, distributions=("openvino", "nncf"),
            auto=("fp32", "bf16", "int8")),
    Backend("aoti", "stvfm_engine.engine.backends.aoti", files=("model.pt2",), precisions=("fp32", "bf16", "fp16"),
            thread_safe=False, auto=("bf16",)),  # one runner per package: calls are serialised (pytorch 148937)
    Backend("tensorrt", "stvfm_engine.engine.backends.tensorrt", files=("model.plan", "model.timing.cache"),
            devices=("cuda",), precisions=("fp32", "bf16", "fp16"), thread_safe=False, distributions=("tensorrt",),
            triton_platform="tensorrt_plan",
            note="untested here: no machine of this project (CPU or lent GPU) has TensorRT; "
                 "the code path follows the TensorRT 10 and 11 APIs but has never run"),
    Backend("eager", "stvfm_engine.engine.backends.eager", precisions=("fp32", "bf16", "fp16"), multi_model=True),
    # triton: its runner is thread-safe with CUDA graphs (they serialise themselves), not in the interpreter
    Backend("triton", "stvfm_engine.engine.backends.triton", precisions=("fp32", "bf16", "fp16"),
            default_precision=(("cuda", "bf16"),), distributions=("triton",)),
    Backend("compile", "stvfm_engine.engine.backends.compile", precisions=("fp32", "bf16", "fp16"), thread_safe=False,
            default_precision=(("cuda", "bf16"),), bench_only=True,
            note="bench baseline: torch.compile(mode='max-autotune') of the reference model"),
)}

# Fastest first, as measured on this project's machines (shared/docs/pitfalls.md): on a CPU, ONNX Runtime
# beats AOTInductor which beats eager; on a GPU, TensorRT and AOTInductor lead. Backend resolution
# (engine/resolve.py) takes the first built artifact this machine can run.
PREFERENCE: tuple[tuple[str, str], ...] = (
    ("tensorrt", "cuda"), ("aoti", "cuda"), ("onnxruntime", "cuda"), ("onnxruntime", "cpu"), ("openvino", "cpu"), ("aoti", "cpu"))

DEFAULT_MAX_BATCH = 64  # `build --max-batch` default: every artifact accepts batches 1..64

# The libraries every manifest records, besides each backend's own.
BASE_DISTRIBUTIONS = ("torch", "timm", "numpy", "safetensors", "stvfm-engine")


def names(artifact: Optional[bool] = None, bench: bool = False, multi_model: bool = False) -> tuple[str, ...]:
    """Backend names in registry order: all servable ones, or only artifact (True) / weights (False) ones;
    ``bench`` adds the bench-only baselines; ``multi_model`` keeps those that serve multi-model directories."""
    return tuple(n for n, b in BACKENDS.items()
                 if (bench or not b.bench_only) and (artifact is None or b.artifact == artifact)
                 and (b.multi_model or not multi_model))


def get_backend(name: str, bench: bool = False) -> Backend:
    b = BACKENDS.get(name)
    if b is None or (b.bench_only and not bench):
        raise BackendError(f"unknown backend {name!r}; expected one of {list(names(bench=bench))}")
    return b


def distributions() -> tuple[str, ...]:
    """Every library a manifest records the version of."""
    return tuple(dict.fromkeys(BASE_DISTRIBUTIONS + tuple(d for b in BACKENDS.values() for d in b.distributions)))

"""What this machine can build and run, backend by backend, and why not: ``stvfm-engine env``."""
from __future__ import annotations

import os
import platform
import shutil
from typing import Any

import torch

from stvfm_engine.engine.manifest import library_versions
from stvfm_engine.engine.precision import PRECISIONS
from stvfm_engine.engine.registry import BACKENDS
from stvfm_engine.engine.runtime import cuda_status
from stvfm_engine.engine.runtime import which_compiler
from stvfm_engine.kernels import why_not_runnable


def environment() -> dict[str, Any]:
    """A JSON-able report: versions, devices, compilers, and per backend/device whether it builds/runs."""
    devices = ["cpu"] + (["cuda"] if cuda_status() is None else [])
    cuda = {"available": cuda_status() is None, "why_not": cuda_status(), "torch_cuda": torch.version.cuda}
    if cuda["available"]:
        cuda["device"] = torch.cuda.get_device_name(0)
        cuda["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    backends = {}
    for name, spec in BACKENDS.items():
        if spec.bench_only:
            continue
        row: dict[str, Any] = {}
        for d in ("cpu", "cuda"):
            if spec.artifact:
                row[f"build_{d}"] = {p: spec.why_not_build(d, p) for p in PRECISIONS}
            row[f"run_{d}"] = spec.why_not_run(d)
        if spec.note:
            row["note"] = spec.note
        backends[name] = row
    if (kernels := why_not_runnable("cpu")) is None and cuda_status() is not None:
        kernels = "runnable on this CPU only because TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests)"
    return {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "devices": devices},
        "versions": library_versions(),
        "cuda": cuda,
        "onnxruntime_providers": providers,
        "compilers": {"c++": which_compiler(), "cmake": shutil.which("cmake")},
        "torch_threads": torch.get_num_threads(),
        "kernels": {"cpu": kernels, "cuda": why_not_runnable("cuda")},
        "backends": backends,
    }

"""What this machine can build and run, backend by backend, and why not: ``stvfm-engine env``."""
from __future__ import annotations

import os
import platform
import shutil
from typing import Any

import torch

from stvfm_engine.engine.backends import ARTIFACT_BACKENDS, BACKENDS, cuda_status, run_status
from stvfm_engine.export.build import build_status, which_compiler
from stvfm_engine.export.manifest import library_versions

UNTESTED = {"tensorrt": "untested here: no machine of this project (CPU or lent GPU) has TensorRT; "
                        "the code path follows the TensorRT 10 API but has never run"}


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
    for b in BACKENDS:
        row: dict[str, Any] = {}
        for d in ("cpu", "cuda"):
            if b in ARTIFACT_BACKENDS:
                row[f"build_{d}"] = {p: build_status(b, d, p) for p in ("fp32", "bf16", "fp16")}
            row[f"run_{d}"] = run_status(b, d)
        if b == "triton" and cuda_status() is not None and row["run_cpu"] is None:
            row["note"] = ("on a CPU only under TRITON_INTERPRET=1 (slow; for tests)"
                           + ("" if os.environ.get("TRITON_INTERPRET") == "1" else ", which is not set"))
        if b in UNTESTED:
            row["note"] = UNTESTED[b]
        backends[b] = row
    return {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "devices": devices},
        "versions": library_versions(),
        "cuda": cuda,
        "onnxruntime_providers": providers,
        "compilers": {"c++": which_compiler(), "cmake": shutil.which("cmake")},
        "torch_threads": torch.get_num_threads(),
        "backends": backends,
    }

"""What every backend shares: the :class:`Runner` interface, CUDA and library-version facts, and the
conversion of validated inputs to tensors and of outputs to numpy."""
from __future__ import annotations

import importlib.metadata
import logging
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch



def cuda_status() -> Optional[str]:
    """None when a CUDA device is usable, else why not."""
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no CUDA device"
    return None


def quiet_cuda_probes() -> None:
    """On a machine without a usable CUDA device, silence the libraries' own "no CUDA" warnings (torch's
    C++ extension builder logs one when AOTInductor compiles): ``stvfm-engine env`` says once that
    there is no GPU, and build/bench output stays clean."""
    if cuda_status() is not None:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def missing(*modules: str) -> Optional[str]:
    """None when every module is importable, else ``"a, b not installed"``."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(absent)} not installed" if absent else None


def installed_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def major_minor(version: Any) -> Optional[tuple[int, int]]:
    m = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def which_compiler() -> Optional[str]:
    """The C++ compiler AOTInductor would use, or None."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "clang++", "c++")):
        if path := shutil.which(name):
            return path
    return None


def rebuild_hint(directory: str | Path) -> str:
    return f"rebuild it on this machine: stvfm-engine build CKPT -o {directory}"


def to_torch(a: Any, device: torch.device) -> Optional[torch.Tensor]:
    if a is None:
        return None
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
    return t.to(device, non_blocking=False).contiguous()


def to_numpy(a: Any) -> Optional[np.ndarray]:
    if a is None:
        return None
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a


def output(y: torch.Tensor) -> np.ndarray:
    return y.detach().to("cpu", torch.float32).numpy()


class Runner:
    """``runner(x, tod, dow) -> np.ndarray`` float32 ``[B, T_out, C, H, W]`` on validated inputs.

    ``thread_safe`` False means the Engine serialises calls to it with a lock.
    """

    thread_safe = True

    def __call__(self, x, tod, dow) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class TorchRunner(Runner):
    """A torch callable on torch tensors (the reference model, the Triton path, a loaded package)."""

    def __init__(self, fn, device: torch.device, thread_safe: bool):
        self.fn = fn
        self.device = device
        self.thread_safe = thread_safe

    def __call__(self, x, tod, dow) -> np.ndarray:
        args = [to_torch(v, self.device) for v in (x, tod, dow)]
        with torch.inference_mode():
            y = self.fn(*args)
        return output(y[0] if isinstance(y, (list, tuple)) else y)

"""The runtime API: ``Engine.load(DIR)`` opens a built engine directory; ``engine.predict`` serves it."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from stvfm_engine.engine.backends import (ARTIFACT_BACKENDS, BACKENDS, BackendError, Runner,
                                          cuda_status, open_backend, rebuild_hint, run_status,
                                          version_problem)
from stvfm_engine.engine.inputs import validate_inputs
from stvfm_engine.engine.reference import reference_model
from stvfm_engine.export.manifest import read_manifest, verify_files
from stvfm_engine.export.precision import get_precision
from stvfm_engine.model.config import STVFMConfig

# Fastest first, as measured on this project's machines (shared/docs/pitfalls.md): on a CPU, ONNX
# Runtime beats AOTInductor which beats eager; on a GPU, TensorRT and AOTInductor lead.
PREFERENCE = (("tensorrt", "cuda"), ("aoti", "cuda"), ("onnxruntime", "cuda"), ("onnxruntime", "cpu"), ("aoti", "cpu"))


def choose_backend(manifest: dict[str, Any], device: Optional[str] = None,
                   precision: Optional[str] = None) -> tuple[str, str]:
    """``(backend, device)``: the fastest built artifact that this machine can run (``eager`` if none)."""
    want = torch.device(device).type if device else None
    for name, kind in PREFERENCE:
        entry = manifest["backends"].get(name)
        # model.onnx runs on any device ONNX Runtime has a provider for; the other artifacts are device code
        built = kind if name == "onnxruntime" else torch.device(entry["device"]).type if entry else None
        if entry is None or built != kind or (want and want != kind):
            continue
        if precision and entry["precision"] != precision:
            continue
        if run_status(name, kind) is None and version_problem(name, manifest) is None:
            return name, device or kind
    return "eager", device or ("cuda" if cuda_status() is None else "cpu")


class Engine:
    """A loaded engine: ``predict(x, tod=None, dow=None) -> np.ndarray`` float32 ``[B, T_out, C, H, W]``.

    Attributes: ``backend``, ``precision``, ``device``, ``threads``, ``manifest`` (dict), ``config``
    (:class:`STVFMConfig`), ``max_batch``, ``directory``. Safe to call from several threads (backends
    that are not are serialised with a lock). Loading never changes process-wide settings.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], backend: str, precision: str, device: str,
                 threads: Optional[int], runner: Runner):
        self.directory = directory
        self.manifest = manifest
        self.config = STVFMConfig.from_dict(manifest["config"])
        self.max_batch = int(manifest["max_batch"])
        self.backend = backend
        self.precision = precision
        self.device = device
        self.threads = threads
        self._runner = runner
        self._lock = None if runner.thread_safe else threading.Lock()

    @classmethod
    def load(cls, directory: str | os.PathLike, backend: Optional[str] = None, precision: Optional[str] = None,
             device: Optional[str] = None, threads: Optional[int] = None, verify: bool = True) -> "Engine":
        """Open the engine in ``directory``.

        ``backend`` one of ``onnxruntime``, ``aoti``, ``tensorrt``, ``eager``, ``triton`` (None: the
        fastest this manifest and machine allow); ``precision`` must match a built artifact's (the
        ``eager``/``triton`` backends take any); ``device`` ``cpu``/``cuda[:N]`` (None: the artifact's);
        ``threads`` sets ONNX Runtime's intra-op threads (the torch backends use the process's torch
        thread pool, which loading never changes). ``verify`` checks the sha256 of every file the manifest lists.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        if precision is not None:
            get_precision(precision)
        if device is not None:
            try:
                device = str(torch.device(device))
            except RuntimeError:
                raise BackendError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
        if backend is None:
            backend, device = choose_backend(manifest, device, precision)
        elif backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
        if backend in ARTIFACT_BACKENDS:
            entry = manifest["backends"].get(backend)
            if entry is None:
                raise BackendError(f"{directory} holds no {backend} artifact; built: {sorted(manifest['backends'])} "
                                   "(and eager/triton run from the weights)")
            if precision is not None and precision != entry["precision"]:
                raise BackendError(f"{directory}: the {backend} artifact is {entry['precision']}, not {precision} "
                                   f"(rebuild with --precision {precision})")
            precision = entry["precision"]
            built = torch.device(entry["device"]).type
            if device is None and backend == "onnxruntime" and run_status(backend, built) is not None:
                device = "cpu"  # built on a GPU machine, served here: model.onnx runs on the CPU provider too
            device = device or entry["device"]
            if backend != "onnxruntime" and torch.device(device).type != built:
                raise BackendError(f"{directory}: the {backend} artifact was built for {built}, not {device} "
                                   f"(rebuild with --device {torch.device(device).type})")
        else:
            precision = precision or "fp32"
            device = device or ("cuda" if cuda_status() is None else "cpu")
        if verify:  # every file the manifest lists, whatever backend is asked for: a mixed-up DIR is refused whole
            verify_files(directory, manifest)
        if why := version_problem(backend, manifest):
            raise BackendError(f"{directory}: {why}; {rebuild_hint(directory)}")
        runner = open_backend(backend, directory, STVFMConfig.from_dict(manifest["config"]), get_precision(precision),
                              device, threads, reference=lambda: reference_model(directory, manifest, verify=False))
        return cls(directory, manifest, backend, precision, str(device),
                   threads if backend == "onnxruntime" else None, runner)

    def predict(self, x: Any, tod: Any = None, dow: Any = None) -> np.ndarray:
        """Forecast ``[B, T_out, C, H, W]`` float32 (numpy) from ``x`` ``[B, T, C, H, W]`` (numpy or torch)
        and, for a model with time inputs, ``tod``/``dow`` ``[B, T]`` integers."""
        x, tod, dow = validate_inputs(self.config, self.max_batch, x, tod, dow)
        if self._lock is None:
            return self._runner(x, tod, dow)
        with self._lock:
            return self._runner(x, tod, dow)

    __call__ = predict

    def __repr__(self) -> str:
        return (f"Engine({str(self.directory)!r}, backend={self.backend!r}, precision={self.precision!r}, "
                f"device={self.device!r})")

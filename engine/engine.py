"""The runtime API: ``Engine.load(DIR)`` opens a built engine directory; ``engine.predict`` serves it."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from stvfm_engine.engine.inputs import validate_inputs
from stvfm_engine.engine.manifest import read_manifest, verify_files
from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.reference import reference_model
from stvfm_engine.engine.registry import OpenRequest, get_backend
from stvfm_engine.engine.resolve import Choice, resolve
from stvfm_engine.engine.runtime import BackendError, Runner, cuda_status, rebuild_hint
from stvfm_engine.model.config import STVFMConfig


def choose_backend(manifest: dict[str, Any], backend: Optional[str] = None, precision: Optional[str] = None,
                   device: Optional[str] = None, directory: str | os.PathLike = "DIR") -> Choice:
    """What ``Engine.load`` would open for these arguments on this machine (see :func:`resolve`)."""
    def usable(name: str, kind: str) -> Optional[str]:
        spec = get_backend(name)
        return spec.why_not_run(kind) or spec.version_problem(manifest)

    return resolve(manifest, backend, precision, device, usable, cuda=cuda_status() is None, directory=str(directory))


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
        self._lock = None if runner.thread_safe and get_backend(backend).thread_safe else threading.Lock()

    @classmethod
    def load(cls, directory: str | os.PathLike, backend: Optional[str] = None, precision: Optional[str] = None,
             device: Optional[str] = None, threads: Optional[int] = None, verify: bool = True) -> "Engine":
        """Open the engine in ``directory``.

        ``backend`` a name of the registry (None: the manifest's default where it runs here, else the
        fastest this manifest and machine allow); ``precision`` must match a built artifact's (the
        ``eager``/``triton`` backends take any); ``device`` ``cpu``/``cuda[:N]`` (None: the artifact's);
        ``threads`` sets the intra-op threads of the backends with a pool of their own (ONNX Runtime,
        OpenVINO: the registry's ``threads``; the torch backends use the process's torch thread pool,
        which loading never changes). ``verify`` checks the sha256 of every file the manifest lists.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        choice = choose_backend(manifest, backend, precision, device, directory)
        if verify:  # every file the manifest lists, whatever backend is asked for: a mixed-up DIR is refused whole
            verify_files(directory, manifest)
        spec = get_backend(choice.backend)
        if why := spec.version_problem(manifest):
            raise BackendError(f"{directory}: {why}; {rebuild_hint(directory)}")
        if why := spec.why_not_run(choice.device):
            raise BackendError(f"backend {choice.backend} cannot run on {choice.device} here: {why}")
        config = STVFMConfig.from_dict(manifest["config"])
        request = OpenRequest(directory, manifest["backends"].get(choice.backend) if spec.artifact else None, config,
                              get_precision(choice.precision), torch.device(choice.device), threads,
                              reference=lambda: reference_model(directory, manifest, verify=False),
                              max_batch=int(manifest["max_batch"]))
        runner = spec.impl().open(request)
        return cls(directory, manifest, choice.backend, choice.precision, choice.device,
                   threads if spec.threads else None, runner)

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

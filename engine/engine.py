"""The runtime API: ``Engine.load(DIR)`` opens a built engine directory; ``engine.predict`` serves it, and
``engine.predict_many`` serves a mixed list of requests to the models of a multi-model directory."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from stvfm_engine.engine.inputs import validate_inputs
from stvfm_engine.engine.manifest import is_multi, read_manifest, verify_files
from stvfm_engine.engine.multi import Parts, Request, run_parts, run_whole, schedule
from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.reference import reference_model, reference_models
from stvfm_engine.engine.registry import MultiOpenRequest, OpenRequest, get_backend, names
from stvfm_engine.engine.resolve import Choice, resolve
from stvfm_engine.engine.runtime import BackendError, Runner, cuda_status, rebuild_hint
from stvfm_engine.errors import InputError, STVFMError
from stvfm_engine.model.config import STVFMConfig


def choose_backend(manifest: dict[str, Any], backend: Optional[str] = None, precision: Optional[str] = None,
                   device: Optional[str] = None, directory: str | os.PathLike = "DIR") -> Choice:
    """What ``Engine.load`` would open for these arguments on this machine (see :func:`resolve`)."""
    def usable(name: str, kind: str) -> Optional[str]:
        spec = get_backend(name)
        return spec.why_not_run(kind) or spec.version_problem(manifest)

    return resolve(manifest, backend, precision, device, usable, cuda=cuda_status() is None, directory=str(directory))


class Engine:
    """A loaded engine: ``predict(x, tod=None, dow=None, model=None) -> np.ndarray`` float32 ``[B, T_out, C, H, W]``.

    Attributes: ``backend``, ``precision``, ``device``, ``threads``, ``manifest`` (dict), ``models``
    (name -> :class:`STVFMConfig`: a multi-model directory's models, or the one model of a one-model
    directory named after the directory), ``config`` (the config where there is one model), ``max_batch``,
    ``directory``, ``backbone_calls`` (backbone passes run so far). Safe to call from several threads
    (backends that are not are serialised with a lock). Loading never changes process-wide settings.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], backend: str, precision: str, device: str,
                 threads: Optional[int], runner: Runner | Parts):
        self.directory = directory
        self.manifest = manifest
        if is_multi(manifest):
            entries = manifest["models"]
            self.models = {name: STVFMConfig.from_dict(m["config"]) for name, m in entries.items()}
            self._lengths = {name: int(m["sequence_length"]) for name, m in entries.items()}
        else:
            self.models = {Path(directory).resolve().name: STVFMConfig.from_dict(manifest["config"])}
            self._lengths = dict.fromkeys(self.models, 0)  # one model: every request may share a call
        self.max_batch = int(manifest["max_batch"])
        self.backend = backend
        self.precision = precision
        self.device = device
        self.threads = threads
        self.backbone_calls = 0
        self._runner = runner
        self._count = threading.Lock()
        self._lock = None if runner.thread_safe and get_backend(backend).thread_safe else threading.Lock()

    @property
    def config(self) -> STVFMConfig:
        """The model's config (an engine of one model); with several, use ``models[name]``."""
        if len(self.models) > 1:
            raise STVFMError(f"{self.directory} serves {len(self.models)} models {list(self.models)}: "
                             "use engine.models[name]")
        return next(iter(self.models.values()))

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
        A multi-model directory opens with a backend whose registry record has ``multi_model``, at fp32.
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
        entry = manifest["backends"].get(choice.backend) if spec.artifact else None
        if is_multi(manifest):
            runner = _open_multi(directory, manifest, choice, entry, threads)
        else:
            config = STVFMConfig.from_dict(manifest["config"])
            request = OpenRequest(directory, entry, config, get_precision(choice.precision), torch.device(choice.device),
                                  threads, reference=lambda: reference_model(directory, manifest, verify=False),
                                  max_batch=int(manifest["max_batch"]))
            runner = spec.impl().open(request)
        return cls(directory, manifest, choice.backend, choice.precision, choice.device,
                   threads if spec.threads else None, runner)

    def predict(self, x: Any, tod: Any = None, dow: Any = None, model: Optional[str] = None) -> np.ndarray:
        """Forecast ``[B, T_out, C, H, W]`` float32 (numpy) from ``x`` ``[B, T, C, H, W]`` (numpy or torch)
        and, for a model with time inputs, ``tod``/``dow`` ``[B, T]`` integers. ``model``: which model of a
        multi-model engine (optional where the engine serves one)."""
        return self._run([self._request(model, x, tod, dow)])[0]

    __call__ = predict

    def predict_many(self, requests: Sequence[Sequence[Any]]) -> list[np.ndarray]:
        """Forecasts for ``[(model, x, tod, dow), ...]`` (``tod``/``dow`` may be left out for a model without
        time inputs), in request order. Every request is validated first; requests whose backbone
        sequences have the same length share one backbone call (at most ``max_batch`` samples a call)."""
        if not isinstance(requests, (list, tuple)):
            raise InputError(f"expected a list of (model, x, tod, dow) requests, got {type(requests).__name__}")
        checked = []
        for i, r in enumerate(requests):
            if not isinstance(r, (list, tuple)) or not 2 <= len(r) <= 4:
                raise InputError(f"request {i}: expected (model, x, tod, dow), got {type(r).__name__}"
                                 f"{f' of length {len(r)}' if isinstance(r, (list, tuple)) else ''}")
            try:
                checked.append(self._request(r[0], *r[1:]))
            except InputError as e:
                raise InputError(f"request {i}: {e}") from None
        return self._run(checked)

    def run_backbone(self, tokens: Any) -> np.ndarray:
        """The shared backbone alone (a multi-model engine): ``tokens`` ``[N, L, D]`` float32 -> features of
        the same shape, numpy. Sequences of any of the engine's lengths, ``N`` up to ``2 * max_batch``; a
        server runs it in the one process that holds the backbone (see :meth:`share_backbone`)."""
        parts = self._parts("run_backbone")
        t = torch.as_tensor(tokens)
        lengths = sorted(set(self._lengths.values()))
        if t.dim() != 3 or t.dtype != torch.float32 or int(t.shape[1]) not in lengths or \
                not 1 <= int(t.shape[0]) <= 2 * self.max_batch:
            raise InputError(f"tokens: expected float32 [N, L, D] with N in 1..{2 * self.max_batch} and L one of "
                             f"{lengths}, got {t.dtype} {list(t.shape)}")
        with self._lock or contextlib.nullcontext():
            h = parts.backbone(t)
        with self._count:
            self.backbone_calls += 1
        return h.cpu().numpy() if isinstance(h, torch.Tensor) else np.asarray(h)

    def share_backbone(self, backbone: Callable[[np.ndarray], np.ndarray]) -> None:
        """Route this multi-model engine's backbone passes through ``backbone(tokens) -> features`` (numpy
        float32 ``[N, L, D]`` both), e.g. the engine of another process that holds the one backbone in
        memory (``serve`` does this: every model's parts in their own workers, the backbone in one, where
        Triton's dynamic batcher joins the backbone passes of different models). The backbone of this
        engine is then never opened."""
        self._runner = _SharedBackbone(self._parts("share_backbone"), backbone)

    def _parts(self, what: str) -> Parts:
        if not isinstance(self._runner, Parts):
            raise STVFMError(f"{what}: {self.directory} is a one-model engine; only multi-model engines run their "
                             "backbone apart")
        return self._runner

    def _request(self, model: Optional[str], x: Any, tod: Any = None, dow: Any = None) -> Request:
        if model is None:
            if len(self.models) > 1:
                raise InputError(f"this engine serves {len(self.models)} models {list(self.models)}: pass model=NAME")
            model = next(iter(self.models))
        elif model not in self.models:
            raise InputError(f"unknown model {model!r}; this engine serves {list(self.models)}")
        x, tod, dow = validate_inputs(self.models[model], self.max_batch, x, tod, dow)
        return Request(model, x, tod, dow, self._lengths[model])

    def _run(self, requests: list[Request]) -> list[np.ndarray]:
        out: list[Optional[np.ndarray]] = [None] * len(requests)
        device = torch.device(self.device)
        for call in schedule(requests, self.max_batch):
            members = [requests[i] for i in call]
            with self._lock or contextlib.nullcontext():
                if isinstance(self._runner, Parts):
                    ys = run_parts(self._runner, members)
                else:
                    ys = run_whole(self._runner, members, device)
            with self._count:
                self.backbone_calls += 1
            for i, y in zip(call, ys):
                out[i] = y
        return out

    def __repr__(self) -> str:
        return (f"Engine({str(self.directory)!r}, backend={self.backend!r}, precision={self.precision!r}, "
                f"device={self.device!r}, models={list(self.models)})")


class _SharedBackbone(Parts):
    """:class:`Parts` whose backbone pass is somebody else's (:meth:`Engine.share_backbone`)."""

    def __init__(self, parts: Parts, backbone: Callable[[np.ndarray], np.ndarray]):
        self._parts, self._backbone = parts, backbone
        self.thread_safe, self.device = parts.thread_safe, parts.device

    def pre(self, name, x, tod, dow) -> torch.Tensor:
        return self._parts.pre(name, x, tod, dow)

    def backbone(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._backbone(tokens.cpu().numpy()))).to(self.device)

    def post(self, name: str, h: torch.Tensor) -> np.ndarray:
        return self._parts.post(name, h)


def _open_multi(directory: Path, manifest: dict[str, Any], choice: Choice, entry: Optional[dict[str, Any]],
                threads: Optional[int]) -> Parts:
    """The :class:`Parts` of a multi-model directory through the chosen backend (one that serves them)."""
    spec = get_backend(choice.backend)
    if not spec.multi_model:
        raise BackendError(f"{directory} holds {len(manifest['models'])} models on one backbone; the {choice.backend} "
                           f"backend cannot serve that (use one of {list(names(multi_model=True))})")
    if choice.precision != "fp32":
        raise BackendError(f"{directory}: multi-model engines run at fp32, not {choice.precision}")
    configs = {name: STVFMConfig.from_dict(m["config"]) for name, m in manifest["models"].items()}
    request = MultiOpenRequest(directory, entry, manifest["models"], configs, get_precision(choice.precision),
                               torch.device(choice.device), threads,
                               references=lambda: reference_models(directory, manifest, verify=False))
    return spec.impl().open_multi(request)

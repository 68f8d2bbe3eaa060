"""One way to open, check and run a model: :func:`open_session` -> :class:`Session`.

Everything that runs a built artifact goes through here: :class:`~stvfm_engine.engine.Engine`, the
build's parity and task gates, ``--precision auto`` timing, ``bench`` (its ``compile`` baseline too),
both servers and the forecast streams. So each rule has one home:

- :func:`open_session` is the only code that builds an ``OpenRequest`` / ``MultiOpenRequest``: it
  resolves backend, precision and device (:mod:`~stvfm_engine.engine.resolve`), checks the backend
  can run here, and hands the reference loader to the backend;
- :meth:`Session.check` is the only call of :func:`~stvfm_engine.engine.inputs.validate_inputs`: one
  request of one model, checked and converted once;
- :meth:`Session.run` is the only scheduler: checked requests (of any models of the engine) grouped
  into backend calls of at most ``max_batch`` samples (:func:`~stvfm_engine.engine.multi.schedule`).
  Callers gather requests; they never order, split or pad them.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from stvfm_engine.engine.inputs import validate_inputs
from stvfm_engine.engine.manifest import is_multi, read_manifest, verify_files
from stvfm_engine.engine.multi import Parts, Request, run_parts, run_whole, schedule
from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.reference import reference_models, reference_model
from stvfm_engine.engine.registry import MultiOpenRequest, OpenRequest, get_backend, names
from stvfm_engine.engine.resolve import Choice, normalize_device, resolve
from stvfm_engine.engine.runtime import Runner, cuda_status, quiet_cuda_probes, rebuild_hint
from stvfm_engine.errors import BackendError, InputError, STVFMError
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.stvfm import STVFM

__all__ = ["Built", "Session", "open_session", "choose_backend"]


@dataclass(frozen=True)
class Built:
    """An engine held in memory while it is being built: its ``directory`` (the artifacts are there) and a
    ``manifest`` that need not be written yet (at least ``config``/``models``, ``max_batch`` and the
    ``backends`` entries to open). ``references``: the fp32 reference models the build already holds, by
    model name (one-model engines: any one name), instead of reloading them from the directory."""

    directory: Path
    manifest: dict[str, Any]
    references: Optional[Callable[[], Mapping[str, STVFM]]] = None


def choose_backend(manifest: dict[str, Any], backend: Optional[str] = None, precision: Optional[str] = None,
                   device: Optional[str] = None, directory: str | os.PathLike = "DIR") -> Choice:
    """What :func:`open_session` would open for these arguments on this machine (see :func:`resolve`)."""
    def usable(name: str, kind: str) -> Optional[str]:
        spec = get_backend(name)
        return spec.why_not_run(kind) or spec.version_problem(manifest)

    return resolve(manifest, backend, precision, device, usable, cuda=cuda_status() is None, directory=str(directory))


def open_session(source: str | os.PathLike | Built, backend: Optional[str] = None, precision: Optional[str] = None,
                 device: Optional[str] = None, threads: Optional[int] = None, *, verify: bool = True,
                 bench: bool = False) -> "Session":
    """Open the engine ``source`` (a directory, or a :class:`Built` engine in memory) with a backend.

    ``backend`` a name of the registry (None: the manifest's default where it runs here, else the
    fastest this manifest and machine allow); ``precision`` must match a built artifact's (the weights
    backends take any they run); ``device`` ``cpu``/``cuda[:N]`` (None: the artifact's); ``threads`` the
    intra-op threads of the backends with a pool of their own. ``verify`` checks the sha256 of every
    file a directory's manifest lists. ``bench`` admits the bench-only baselines (``compile``), which
    run from the weights like ``eager``.
    """
    quiet_cuda_probes()
    if isinstance(source, Built):
        directory, manifest, verify = Path(source.directory), source.manifest, False
        loader = source.references
    else:
        directory = Path(source)
        manifest = read_manifest(directory)
        loader = None
    spec = get_backend(backend, bench=bench) if backend is not None else None
    if spec is not None and spec.bench_only:
        kind = normalize_device(device) or ("cuda" if cuda_status() is None else "cpu")
        choice = Choice(spec.name, spec.precision_for(kind, precision), kind)
        if choice.precision not in spec.precisions:
            raise BackendError(f"the {spec.name} baseline runs {', '.join(spec.precisions)}, not {choice.precision}")
    else:
        choice = choose_backend(manifest, backend, precision, device, directory)
        spec = get_backend(choice.backend)
    if verify:  # every file the manifest lists, whatever backend is asked for: a mixed-up DIR is refused whole
        verify_files(directory, manifest)
    if why := spec.version_problem(manifest):
        raise BackendError(f"{directory}: {why}; {rebuild_hint(directory)}")
    if why := spec.why_not_run(choice.device):
        raise BackendError(f"backend {choice.backend} cannot run on {choice.device} here: {why}")
    entry = manifest["backends"].get(choice.backend) if spec.artifact else None
    prec, dev = get_precision(choice.precision), torch.device(choice.device)
    if is_multi(manifest):
        if not spec.multi_model:
            raise BackendError(f"{directory} holds {len(manifest['models'])} models on one backbone; the "
                               f"{choice.backend} backend cannot serve that (use one of {list(names(multi_model=True))})")
        if choice.precision != "fp32":
            raise BackendError(f"{directory}: multi-model engines run at fp32, not {choice.precision}")
        configs = {name: STVFMConfig.from_dict(m["config"]) for name, m in manifest["models"].items()}
        references = loader or (lambda: reference_models(directory, manifest, verify=False))
        runner: Runner | Parts = spec.impl().open_multi(MultiOpenRequest(
            directory, entry, manifest["models"], configs, prec, dev, threads, references=references))
    else:
        config = STVFMConfig.from_dict(manifest["config"])
        reference = ((lambda: next(iter(loader().values()))) if loader is not None
                     else (lambda: reference_model(directory, manifest, verify=False)))
        runner = spec.impl().open(OpenRequest(directory, entry, config, prec, dev, threads, reference=reference,
                                              max_batch=int(manifest["max_batch"])))
    return Session(directory, manifest, choice, threads if spec.threads else None, runner,
                   thread_safe=runner.thread_safe and spec.thread_safe)


class Session:
    """An opened engine: :meth:`check` a request, :meth:`run` checked requests, :meth:`run_backbone`.

    Attributes: ``directory``, ``manifest``, ``backend``, ``precision``, ``device``, ``threads``,
    ``models`` (name -> :class:`STVFMConfig`; a one-model engine's one model is named after its
    directory), ``max_batch``, ``backbone_calls`` (backend calls run so far: backbone passes).
    Safe to use from several threads (a backend that is not thread-safe is serialised with a lock).
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], choice: Choice, threads: Optional[int],
                 runner: Runner | Parts, thread_safe: bool = True):
        self.directory, self.manifest = Path(directory), manifest
        self.backend, self.precision, self.device = choice.backend, choice.precision, choice.device
        self.threads = threads
        if is_multi(manifest):
            entries = manifest["models"]
            self.models = {name: STVFMConfig.from_dict(m["config"]) for name, m in entries.items()}
            self.lengths = {name: int(m["sequence_length"]) for name, m in entries.items()}
        else:
            self.models = {self.directory.resolve().name: STVFMConfig.from_dict(manifest["config"])}
            self.lengths = dict.fromkeys(self.models, 0)  # one model: every request may share a call
        self.max_batch = int(manifest["max_batch"])
        self.backbone_calls = 0
        self._runner = runner
        self._count = threading.Lock()
        self._lock = None if thread_safe else threading.Lock()

    def model_name(self, model: Optional[str] = None) -> str:
        """``model`` checked against the engine's models (None: the one model of a one-model engine)."""
        if model is None:
            if len(self.models) > 1:
                raise InputError(f"this engine serves {len(self.models)} models {list(self.models)}: pass model=NAME")
            return next(iter(self.models))
        if model not in self.models:
            raise InputError(f"unknown model {model!r}; this engine serves {list(self.models)}")
        return model

    def check(self, model: Optional[str], x: Any, tod: Any = None, dow: Any = None) -> Request:
        """One request of ``model`` checked against its config and the max batch, converted (x float32,
        tod/dow int64), ready for :meth:`run`; a one-line :class:`InputError` otherwise."""
        model = self.model_name(model)
        x, tod, dow = validate_inputs(self.models[model], self.max_batch, x, tod, dow)
        return Request(model, x, tod, dow, self.lengths[model])

    def run(self, requests: Sequence[Request]) -> list[np.ndarray]:
        """Forecasts (numpy float32 ``[B, T_out, C, H, W]``) for checked requests, in request order.

        Requests that can share a backend call do (one model, or models whose backbone sequences have
        the same length), at most ``max_batch`` samples a call; a request is never split."""
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
        return out  # type: ignore[return-value]

    def predict(self, model: Optional[str], x: Any, tod: Any = None, dow: Any = None) -> np.ndarray:
        """One request checked and run: ``run([check(model, x, tod, dow)])[0]``."""
        return self.run([self.check(model, x, tod, dow)])[0]

    def run_backbone(self, tokens: Any) -> np.ndarray:
        """The shared backbone alone (a multi-model engine): ``tokens`` ``[N, L, D]`` float32 -> features of
        the same shape, numpy. ``L`` one of the engine's sequence lengths, ``N`` up to ``2 * max_batch``."""
        parts = self._parts("run_backbone")
        if not isinstance(tokens, (np.ndarray, torch.Tensor)):
            raise InputError(f"tokens: expected a float32 numpy array or torch tensor, got {type(tokens).__name__}")
        t = torch.as_tensor(tokens)
        lengths = sorted(set(self.lengths.values()))
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
        float32 ``[N, L, D]`` both), e.g. another process's :meth:`run_backbone`. The backbone of this
        session is then never opened."""
        self._runner = _SharedBackbone(self._parts("share_backbone"), backbone)

    def _parts(self, what: str) -> Parts:
        if not isinstance(self._runner, Parts):
            raise STVFMError(f"{what}: {self.directory} is a one-model engine; only multi-model engines run their "
                             "backbone apart")
        return self._runner

    def __repr__(self) -> str:
        return (f"Session({str(self.directory)!r}, backend={self.backend!r}, precision={self.precision!r}, "
                f"device={self.device!r}, models={list(self.models)})")


class _SharedBackbone(Parts):
    """:class:`Parts` whose backbone pass is somebody else's (:meth:`Session.share_backbone`)."""

    def __init__(self, parts: Parts, backbone: Callable[[np.ndarray], np.ndarray]):
        self._parts, self._backbone = parts, backbone
        self.thread_safe, self.device = parts.thread_safe, parts.device

    def pre(self, name, x, tod, dow) -> torch.Tensor:
        return self._parts.pre(name, x, tod, dow)

    def backbone(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._backbone(tokens.cpu().numpy()))).to(self.device)

    def post(self, name: str, h: torch.Tensor) -> np.ndarray:
        return self._parts.post(name, h)

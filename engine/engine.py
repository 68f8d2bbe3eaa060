"""The runtime API: ``Engine.load(DIR)`` opens a built engine directory; ``engine.predict`` serves it, and
``engine.predict_many`` serves a mixed list of requests to the models of a multi-model directory.

An Engine is the public face of a :class:`~stvfm_engine.engine.session.Session`: opening, checking and
running are the session's (``engine.session``), so every caller of the engine shares one path."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from stvfm_engine.engine.session import Session, choose_backend, open_session
from stvfm_engine.errors import InputError, STVFMError
from stvfm_engine.model.config import STVFMConfig

__all__ = ["Engine", "choose_backend"]


class Engine:
    """A loaded engine: ``predict(x, tod=None, dow=None, model=None) -> np.ndarray`` float32 ``[B, T_out, C, H, W]``.

    Attributes: ``backend``, ``precision``, ``device``, ``threads``, ``manifest`` (dict), ``models``
    (name -> :class:`STVFMConfig`: a multi-model directory's models, or the one model of a one-model
    directory named after the directory), ``config`` (the config where there is one model), ``max_batch``,
    ``directory``, ``backbone_calls`` (backbone passes run so far), ``session`` (the
    :class:`~stvfm_engine.engine.session.Session` underneath). Safe to call from several threads
    (backends that are not are serialised with a lock). Loading never changes process-wide settings.
    """

    def __init__(self, session: Session):
        self.session = session

    directory = property(lambda self: self.session.directory)
    manifest = property(lambda self: self.session.manifest)
    models = property(lambda self: self.session.models)
    max_batch = property(lambda self: self.session.max_batch)
    backend = property(lambda self: self.session.backend)
    precision = property(lambda self: self.session.precision)
    device = property(lambda self: self.session.device)
    threads = property(lambda self: self.session.threads)
    backbone_calls = property(lambda self: self.session.backbone_calls)
    _runner = property(lambda self: self.session._runner)  # the backend's runner (tests look inside)

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
        return cls(open_session(directory, backend, precision, device, threads, verify=verify))

    def predict(self, x: Any, tod: Any = None, dow: Any = None, model: Optional[str] = None) -> np.ndarray:
        """Forecast ``[B, T_out, C, H, W]`` float32 (numpy) from ``x`` ``[B, T, C, H, W]`` (numpy or torch)
        and, for a model with time inputs, ``tod``/``dow`` ``[B, T]`` integers. ``model``: which model of a
        multi-model engine (optional where the engine serves one)."""
        return self.session.predict(model, x, tod, dow)

    __call__ = predict

    def predict_many(self, requests: Sequence[Sequence[Any]]) -> list[np.ndarray]:
        """Forecasts for ``[(model, x, tod, dow), ...]`` (``tod``/``dow`` may be left out for a model without
        time inputs), in request order. Every request is checked first; requests whose backbone
        sequences have the same length share one backbone call (at most ``max_batch`` samples a call)."""
        if not isinstance(requests, (list, tuple)):
            raise InputError(f"expected a list of (model, x, tod, dow) requests, got {type(requests).__name__}")
        checked = []
        for i, r in enumerate(requests):
            if not isinstance(r, (list, tuple)) or not 2 <= len(r) <= 4:
                raise InputError(f"request {i}: expected (model, x, tod, dow), got {type(r).__name__}"
                                 f"{f' of length {len(r)}' if isinstance(r, (list, tuple)) else ''}")
            try:
                checked.append(self.session.check(r[0], *r[1:]))
            except InputError as e:
                raise InputError(f"request {i}: {e}") from None
        return self.session.run(checked)

    def run_backbone(self, tokens: Any) -> np.ndarray:
        """The shared backbone alone (a multi-model engine): ``tokens`` ``[N, L, D]`` float32 -> features of
        the same shape, numpy. Sequences of any of the engine's lengths, ``N`` up to ``2 * max_batch``; a
        server runs it in the one process that holds the backbone (see :meth:`share_backbone`)."""
        return self.session.run_backbone(tokens)

    def share_backbone(self, backbone: Callable[[np.ndarray], np.ndarray]) -> None:
        """Route this multi-model engine's backbone passes through ``backbone(tokens) -> features`` (numpy
        float32 ``[N, L, D]`` both), e.g. the engine of another process that holds the one backbone in
        memory (``serve`` does this: every model's parts in their own workers, the backbone in one, where
        Triton's dynamic batcher joins the backbone passes of different models). The backbone of this
        engine is then never opened."""
        self.session.share_backbone(backbone)

    def __repr__(self) -> str:
        return (f"Engine({str(self.directory)!r}, backend={self.backend!r}, precision={self.precision!r}, "
                f"device={self.device!r}, models={list(self.models)})")

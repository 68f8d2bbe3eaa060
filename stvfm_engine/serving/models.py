"""What a server serves: one :class:`ServedModel` per model of the engine directories given, and the
:class:`BatchRunner` that every server runs on a batch of requests (each validated on its own first)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from stvfm_engine.engine import Engine, validate_inputs
from stvfm_engine.engine.graph import io_spec
from stvfm_engine.errors import InputError, ServeError, first_line
from stvfm_engine.model.config import STVFMConfig

# Triton's names for the numpy dtypes of the engine's I/O (engine.graph.io_spec)
TRITON_DTYPES = {"float32": "FP32", "int64": "INT64"}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ServedModel:
    """One served model: ``name`` on the wire, the engine ``directory`` (absolute) and, for a multi-model
    directory, the ``key`` of the model in it; ``backend``/``threads`` as passed to ``Engine.load``."""

    name: str
    directory: str
    key: Optional[str]
    backend: str
    precision: str
    threads: Optional[int]
    config: STVFMConfig
    max_batch: int

    def io(self) -> dict[str, list[dict[str, Any]]]:
        """``{"inputs": [...], "outputs": [...]}``, each ``{"name", "datatype" (Triton's), "dims"}``, the
        batch axis left out (``dims`` is what Triton's model config takes)."""
        spec = io_spec(self.config, self.max_batch)
        return {side: [{"name": t["name"], "datatype": TRITON_DTYPES[t["dtype"]], "dims": list(t["shape"][1:])}
                       for t in spec[side]] for side in ("inputs", "outputs")}

    def load_parameters(self) -> dict[str, str]:
        """What a server process needs to reopen this model (:func:`open_runner`), as strings."""
        params = {"engine_dir": self.directory, "backend": self.backend}
        if self.key is not None:
            params["model_key"] = self.key
        if self.threads is not None:
            params["threads"] = str(self.threads)
        return params


def check_name(name: str) -> str:
    """A model name usable as a Triton model directory and in a URL path."""
    if not _NAME.fullmatch(name):
        raise ServeError(f"model name {name!r} is not usable: expected letters, digits, '_', '.', '-' "
                         "(not starting with '.' or '-')")
    return name


def served_models(directories: Sequence[str | os.PathLike], names: Optional[Sequence[str]] = None,
                  backend: Optional[str] = None, threads: Optional[int] = None) -> list[ServedModel]:
    """Open each engine directory once (a bad one fails here, with its one-line error, before any server
    starts) and list the models it serves (:func:`models_of`), named apart."""
    if names and len(names) != len(directories):
        raise ServeError(f"got {len(names)} --name values for {len(directories)} engine directories; "
                         "give one name per directory")
    out: list[ServedModel] = []
    for i, directory in enumerate(directories):
        out += models_of(Engine.load(directory, backend=backend, threads=threads), names[i] if names else None)
    seen = [m.name for m in out]
    if dupes := sorted({n for n in seen if seen.count(n) > 1}):
        raise ServeError(f"two served models would share the name(s) {dupes}; name them apart with --name")
    return out


def models_of(engine: Engine, name: Optional[str] = None) -> list[ServedModel]:
    """The models of a loaded engine: a multi-model directory's by their own names (``engine.models``),
    the one model of a one-model directory named ``name`` or after its directory."""
    path = Path(engine.directory).absolute()
    models = getattr(engine, "models", None) or {}
    if len(models) > 1:
        if name:
            raise ServeError(f"{path} holds several models ({', '.join(models)}), served by their own names: "
                             "drop --name")
        entries = list(models.items())
    else:
        entries = [(None, engine.config)]  # predict() needs no model= then
    return [ServedModel(check_name(key if key is not None else name or path.name), str(path), key, engine.backend,
                        engine.precision, engine.threads, config, engine.max_batch) for key, config in entries]


Request = tuple[Any, Optional[Any], Optional[Any]]  # (x, tod, dow) arrays of one request


class BatchRunner:
    """Runs one model on a batch of requests: each request is validated on its own, and only the
    valid ones are stacked into ``Engine.predict`` calls of at most ``max_batch`` samples.

    ``run`` returns, per request, the forecast ``y`` or the exception that answers it: an
    :class:`InputError` naming what was expected, or (if a predict call fails) the error of that call.
    ``inferences`` / ``executions`` count the samples predicted and the predict calls made.
    """

    def __init__(self, engine: Engine, key: Optional[str] = None):
        self.engine = engine
        self.key = key
        self.config: STVFMConfig = engine.models[key] if key is not None else engine.config
        self.max_batch = engine.max_batch
        self._model_kw = {} if key is None else {"model": key}
        self.inferences = 0
        self.executions = 0

    def check(self, x: Any, tod: Any = None, dow: Any = None) -> Request:
        """One request validated against the model (raises :class:`InputError`), converted."""
        return validate_inputs(self.config, self.max_batch, x, tod, dow)

    def run(self, requests: Sequence[Request]) -> list[np.ndarray | Exception]:
        results: list[Any] = [None] * len(requests)
        valid: list[tuple[int, Request]] = []
        for i, request in enumerate(requests):
            try:
                valid.append((i, self.check(*request)))
            except InputError as e:
                results[i] = e
        for chunk in _chunks(valid, self.max_batch):
            x, tod, dow = (None if parts[0] is None else np.concatenate(parts)
                           for parts in zip(*(r for _, r in chunk)))
            try:
                y = self.engine.predict(x, tod, dow, **self._model_kw)
            except Exception as e:  # answers every request of this call; the server keeps running
                for i, _ in chunk:
                    results[i] = RuntimeError(f"inference failed: {first_line(e)}")
                continue
            self.inferences += len(x)
            self.executions += 1
            start = 0
            for i, (rx, _, _) in chunk:
                results[i] = y[start:start + len(rx)]
                start += len(rx)
        return results


class MixedBatchRunner:
    """Runs a batch of requests to the models of ONE multi-model engine: each request validated on its own
    against its model, the valid ones through ``Engine.predict_many`` (requests of different models
    whose token sequences have the same length share a backbone pass). ``run`` takes ``(model, request)``
    pairs and answers as :meth:`BatchRunner.run`; ``counts[model]`` = [inferences, executions]."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.counts = {name: [0, 0] for name in engine.models}

    def check(self, model: str, x: Any, tod: Any = None, dow: Any = None) -> Request:
        return validate_inputs(self.engine.models[model], self.engine.max_batch, x, tod, dow)

    def run(self, items: Sequence[tuple[str, Request]]) -> list[np.ndarray | Exception]:
        items = list(items)
        results: list[Any] = [None] * len(items)
        valid: list[int] = []
        for i, (model, request) in enumerate(items):
            try:
                items[i] = (model, self.check(model, *request))
                valid.append(i)
            except InputError as e:
                results[i] = e
        if not valid:
            return results
        calls = self.engine.backbone_calls
        try:
            ys = self.engine.predict_many([(items[i][0], *items[i][1]) for i in valid])
        except Exception as e:  # answers every request of this batch; the server keeps running
            for i in valid:
                results[i] = RuntimeError(f"inference failed: {first_line(e)}")
            return results
        models = set()
        for i, y in zip(valid, ys):
            results[i] = y
            self.counts[items[i][0]][0] += len(y)
            models.add(items[i][0])
        for model in models:  # a batch's backbone passes, counted for each model that took part
            self.counts[model][1] += max(1, self.engine.backbone_calls - calls)
        return results


def _chunks(valid: list[tuple[int, Request]], max_batch: int) -> list[list[tuple[int, Request]]]:
    """Consecutive groups of requests whose samples add up to at most ``max_batch``."""
    chunks: list[list[tuple[int, Request]]] = []
    size = 0
    for item in valid:
        n = len(item[1][0])
        if not chunks or size + n > max_batch:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks


def open_engine(params: dict[str, str], base: Optional[str | os.PathLike] = None) -> Engine:
    """The ``Engine`` of :meth:`ServedModel.load_parameters` (``engine_dir`` may be relative to ``base``, as
    in an exported repository); ``backend`` empty or ``auto`` lets ``Engine.load`` choose."""
    directory = Path(params["engine_dir"])
    if not directory.is_absolute() and base is not None:
        directory = Path(base) / directory
    backend = params.get("backend") or None
    threads = int(params["threads"]) if params.get("threads") else None
    return Engine.load(directory, backend=None if backend == "auto" else backend, threads=threads)


def open_runner(params: dict[str, str], base: Optional[str | os.PathLike] = None) -> BatchRunner:
    """The :class:`BatchRunner` of :meth:`ServedModel.load_parameters` (see :func:`open_engine`)."""
    return BatchRunner(open_engine(params, base), params.get("model_key") or None)

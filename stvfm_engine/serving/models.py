"""What a server serves: one :class:`ServedModel` per model of the engine directories given, and the
:class:`Worker` that every server runs on the requests it gathered (the engine session's one check and scheduler)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from stvfm_engine.engine import Engine
from stvfm_engine.engine.multi import Request
from stvfm_engine.engine.graph import io_spec
from stvfm_engine.engine.manifest import check_model_name
from stvfm_engine.errors import InputError, ServeError, STVFMError, first_line
from stvfm_engine.model.config import STVFMConfig

# Triton's names for the numpy dtypes of the engine's I/O (engine.graph.io_spec)
TRITON_DTYPES = {"float32": "FP32", "int64": "INT64"}


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
    """A model name usable as a Triton model directory and in a URL path (the engine's one rule)."""
    try:
        return check_model_name(name)
    except STVFMError as e:
        raise ServeError(str(e)) from None


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


class Worker:
    """What a server process runs: the requests it gathered, answered through the engine's session.

    ``check(model, x, tod, dow)`` is the session's one input check (an :class:`InputError` names what
    was expected); ``run(items)`` takes checked requests or the errors that answer them, hands the
    checked ones to the session's one scheduler (:meth:`Session.run`: it groups them into calls of at
    most ``max_batch`` samples) and returns, per item, the forecast or the exception that answers it
    (a failed call answers each of its requests with ``inference failed: ...``, a :class:`ServeError`
    (a part of the server unavailable) as it is; the server keeps running). The worker only gathers: it never orders, splits or pads requests.
    ``counts[model]`` = [samples predicted, backend calls that served the model].
    """

    def __init__(self, engine: Engine, key: Optional[str] = None):
        self.engine = engine
        self.session = engine.session
        self.key = key  # the model that requests naming none are for (a one-model engine: its only one)
        self.counts = {name: [0, 0] for name in self.session.models}

    def check(self, model: Optional[str], x: Any, tod: Any = None, dow: Any = None) -> Request:
        return self.session.check(model if model is not None else self.key, x, tod, dow)

    def run(self, items: Sequence[Request | Exception]) -> list[np.ndarray | Exception]:
        results: list[Any] = list(items)
        valid = [i for i, r in enumerate(items) if isinstance(r, Request)]
        if not valid:
            return results
        calls = self.session.backbone_calls
        try:
            ys = self.session.run([items[i] for i in valid])  # type: ignore[misc]
        except ServeError as e:  # a part of the server is unavailable (the shared backbone's worker): as it is
            for i in valid:
                results[i] = e
            return results
        except Exception as e:  # noqa: BLE001 - answers every request of this batch; the server keeps running
            for i in valid:
                results[i] = RuntimeError(f"inference failed: {first_line(e)}")
            return results
        models = set()
        for i, y in zip(valid, ys):
            results[i] = y
            self.counts[items[i].model][0] += len(y)  # type: ignore[union-attr]
            models.add(items[i].model)  # type: ignore[union-attr]
        for model in models:  # a batch's backend calls, counted for each model that took part
            self.counts[model][1] += max(1, self.session.backbone_calls - calls)
        return results

    def answer(self, requests: Sequence[tuple[Optional[str], Any, Any, Any]]) -> list[np.ndarray | Exception]:
        """``run`` over ``(model, x, tod, dow)`` requests, each checked on its own first."""
        checked: list[Request | Exception] = []
        for model, x, tod, dow in requests:
            try:
                checked.append(self.check(model, x, tod, dow))
            except InputError as e:
                checked.append(e)
        return self.run(checked)


def open_engine(params: dict[str, str], base: Optional[str | os.PathLike] = None) -> Engine:
    """The ``Engine`` of :meth:`ServedModel.load_parameters` (``engine_dir`` may be relative to ``base``, as
    in an exported repository); ``backend`` empty or ``auto`` lets ``Engine.load`` choose."""
    directory = Path(params["engine_dir"])
    if not directory.is_absolute() and base is not None:
        directory = Path(base) / directory
    backend = params.get("backend") or None
    threads = int(params["threads"]) if params.get("threads") else None
    return Engine.load(directory, backend=None if backend == "auto" else backend, threads=threads)


def open_worker(params: dict[str, str], base: Optional[str | os.PathLike] = None) -> Worker:
    """The :class:`Worker` of :meth:`ServedModel.load_parameters` (see :func:`open_engine`)."""
    return Worker(open_engine(params, base), params.get("model_key") or None)

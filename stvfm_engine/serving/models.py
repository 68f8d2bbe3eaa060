"""What a server serves: one :class:`ServedModel` per model of the engine directories given, and the
:class:`Worker` that every server runs on the requests it gathered (the engine session's one check and scheduler)."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
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
STREAM_SUFFIX = "_stream"  # the companion of a served model M that keeps forecast streams: M_stream
# the serve command's warm-up request of an M_stream companion, answered once: no client's stream can have
# this name (stream names are printable)
WARM_UP_STREAM = b"\x00stvfm-warm-up"


@dataclass(frozen=True)
class StreamOptions:
    """The forecast streams of a server (``--state-dir`` / ``--stream-store`` and the gap policy): ``store``
    a SQLite file path or a ``postgresql://`` URL; ``interval`` seconds per step of a model without time
    inputs; ``max_steps`` the most steps one request may ask for."""

    store: str
    gaps: str = "refuse"
    max_gap: int = 2
    interval: Optional[float] = None
    max_steps: int = 1024

    def parameters(self) -> dict[str, str]:
        out = {"stream_store": self.store, "stream_gaps": self.gaps, "stream_max_gap": str(self.max_gap),
               "stream_max_steps": str(self.max_steps)}
        if self.interval is not None:
            out["stream_interval"] = repr(float(self.interval))
        return out

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "StreamOptions":
        interval = params.get("stream_interval")
        return cls(params["stream_store"], params.get("stream_gaps") or "refuse", int(params.get("stream_max_gap") or 2),
                   float(interval) if interval else None, int(params.get("stream_max_steps") or 1024))


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
    streams: Optional[StreamOptions] = None  # set: this is the M_stream companion of the model named base

    @property
    def base(self) -> str:
        """The served model this one runs (itself, or the model whose companion it is)."""
        return self.name[:-len(STREAM_SUFFIX)] if self.streams is not None else self.name

    def io(self) -> dict[str, list[dict[str, Any]]]:
        """``{"inputs": [...], "outputs": [...]}``, each ``{"name", "datatype" (Triton's), "dims"}`` (and
        ``"optional": True`` where it may be left out), the batch axis left out (``dims`` is what Triton's
        model config takes; -1: any length). An ``M_stream`` companion takes one stream per request:
        ``stream`` BYTES [1], ``time`` BYTES [1], ``frame`` FP32 [C, H, W], ``steps`` INT64 [1] and answers
        ``y`` FP32 [steps, C, H, W], ``time`` BYTES [steps] (ISO-8601 UTC), ``held`` INT64 [1]."""
        if self.streams is not None:
            c = self.config
            frame = [c.channels, c.height, c.width]
            return {"inputs": [{"name": "stream", "datatype": "BYTES", "dims": [1]},
                               {"name": "time", "datatype": "BYTES", "dims": [1], "optional": True},
                               {"name": "frame", "datatype": "FP32", "dims": frame, "optional": True},
                               {"name": "steps", "datatype": "INT64", "dims": [1], "optional": True}],
                    "outputs": [{"name": "y", "datatype": "FP32", "dims": [-1, *frame]},
                                {"name": "time", "datatype": "BYTES", "dims": [-1]},
                                {"name": "held", "datatype": "INT64", "dims": [1]}]}
        spec = io_spec(self.config, self.max_batch)
        return {side: [{"name": t["name"], "datatype": TRITON_DTYPES[t["dtype"]], "dims": list(t["shape"][1:])}
                       for t in spec[side]] for side in ("inputs", "outputs")}

    def load_parameters(self) -> dict[str, str]:
        """What a server process needs to reopen this model (:func:`open_worker`), as strings."""
        params = {"engine_dir": self.directory, "backend": self.backend}
        if self.key is not None:
            params["model_key"] = self.key
        if self.threads is not None:
            params["threads"] = str(self.threads)
        if self.streams is not None:
            params.update(role="stream", **self.streams.parameters())
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


def stream_companions(models: Sequence[ServedModel], options: StreamOptions) -> tuple[list[ServedModel], list[str]]:
    """The ``M_stream`` companion of each of ``models`` that streams can serve (a calendar, or without time
    inputs ``options.interval``), and a note for each that cannot. The store is opened once here, so a bad
    one is a one-line error before any server starts."""
    from stvfm_engine.engine.stream_store import open_store
    from stvfm_engine.model.calendar import grid_for

    try:
        open_store(options.store).close()
    except STVFMError as e:
        raise ServeError(str(e)) from None
    out, notes = [], []
    for m in models:
        try:
            grid_for(m.config.steps_per_day, m.config.calendar, None if m.config.steps_per_day else options.interval,
                     what=f"model {m.name!r}")
        except STVFMError as e:
            notes.append(f"no {m.name}{STREAM_SUFFIX}: {e}")
            continue
        out.append(replace(m, name=check_name(m.name + STREAM_SUFFIX), streams=options))
    return out, notes


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

    def warm_up(self, models: Optional[Sequence[Optional[str]]] = None) -> None:
        """Ready means warm: each of ``models`` (the session's names; default all) runs a batch of 1 and of max
        batch (zeros: valid inputs); raises what a failed run answers. Not counted as served work."""
        counts = {name: list(c) for name, c in self.counts.items()}
        for model in (models if models is not None else list(self.session.models)):
            cfg = self.session.models[self.session.model_name(model if model is not None else self.key)]
            for batch in sorted({1, self.session.max_batch}):
                x = np.zeros((batch, cfg.history, cfg.channels, cfg.height, cfg.width), np.float32)
                times = (np.zeros((batch, cfg.history), np.int64),) * 2 if cfg.uses_time else (None, None)
                result = self.run([self.check(model, x, *times)])[0]
                if isinstance(result, Exception):
                    raise result
        self.counts = counts

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


class StreamWorker:
    """What a server runs for ``M_stream`` companions: each request's wire tensors turned into one item of
    :meth:`Streams.serve_batch` (which pushes, checks through ``session.check`` and forecasts the batch in
    one engine call per rollout round) and each result into the companion's outputs. It adds no checks of
    the model's own: only that a request carries one stream (batch 1)."""

    def __init__(self, worker: Worker, options: StreamOptions, warm: bool = False):
        from stvfm_engine.engine.streams import Streams

        self.worker = worker
        self.warm = warm  # False: the first WARM_UP_STREAM request warms the engine (inside the server's batch)
        self.counts = {name: [0, 0] for name in worker.session.models}  # [forecasts, batches], as Worker.counts
        timeless = any(cfg.steps_per_day == 0 for cfg in worker.session.models.values())
        self.streams = Streams(worker.session, options.store, gaps=options.gaps, max_gap=options.max_gap,
                               interval=options.interval if timeless else None, max_steps=options.max_steps)

    def item(self, model: Optional[str], arrays: dict[str, Any]) -> tuple | InputError:
        """``(stream, time, frame, steps, model)`` of one request's arrays (None for an absent input), or the
        error that refuses it (a request of more than one stream)."""
        item = []
        for name in ("stream", "time", "frame", "steps"):
            a = arrays.get(name)
            if a is None:
                item.append(None)
                continue
            if name == "frame" and (a.ndim != 4 or len(a) != 1):
                return InputError(f"input 'frame': expected [1, C, H, W] (one stream per request), got shape "
                                  f"{list(a.shape)}")
            if name != "frame" and a.shape != (1, 1):
                return InputError(f"input {name!r}: expected shape [1, 1] (one stream per request), got "
                                  f"{list(a.shape)}")
            item.append(a[0, 0] if name != "frame" else a[0])
        if item[0] is None:
            return InputError("input 'stream' is missing: the name of the stream")
        if item[0] == WARM_UP_STREAM and not self.warm:
            return _WarmUp()
        if item[3] is not None:
            item[3] = int(item[3])
        return (*item, model if model is not None else self.worker.key)

    def run(self, items: Sequence[tuple | Exception]) -> list[dict[str, np.ndarray] | Exception]:
        """Per item: ``{"y", "time", "held"}`` (batch axis first), or the exception that answers it: an
        :class:`InputError` or other refusal (400), a :class:`StoreError` (the store unavailable: 503)."""
        from stvfm_engine.model.calendar import iso

        results: list[Any] = list(items)
        for i, item in enumerate(items):
            if isinstance(item, _WarmUp):
                results[i] = self._warm_up()
        valid = [i for i, item in enumerate(items) if not isinstance(item, (Exception, _WarmUp))]
        if not valid:
            return results
        served: set[str] = set()
        try:
            answers = self.streams.serve_batch([items[i] for i in valid])
        except STVFMError as e:  # the store failed for the whole batch
            answers = [e] * len(valid)
        except Exception as e:  # noqa: BLE001 - answers every request of this batch; the server keeps running
            answers = [RuntimeError(f"inference failed: {first_line(e)}")] * len(valid)
        for i, fc in zip(valid, answers):
            if isinstance(fc, Exception):
                results[i] = fc
                continue
            times = np.empty((1, len(fc.time)), dtype=object)
            times[0, :] = [iso(t).encode() for t in fc.time]
            results[i] = {"y": fc.y[None], "time": times, "held": np.array([[fc.held]], np.int64)}
            if len(fc.time):
                self.counts[fc.model][0] += 1
                served.add(fc.model)
        for model in served:
            self.counts[model][1] += 1
        return results

    def _warm_up(self) -> dict[str, np.ndarray] | Exception:
        """Ready means warm: the engine runs a batch of 1 and of max batch (here, where the server's batch runs:
        a multi-model directory's shared backbone answers only there); answered with 0 steps."""
        try:
            if not self.warm:
                self.worker.warm_up([self.worker.key])
                self.warm = True
        except Exception as e:  # noqa: BLE001 - the serve command reports it and stops
            return RuntimeError(f"warm-up failed: {first_line(e)}")
        cfg = self.worker.session.models[self.worker.session.model_name(self.worker.key)]
        return {"y": np.zeros((1, 0, cfg.channels, cfg.height, cfg.width), np.float32),
                "time": np.empty((1, 0), dtype=object), "held": np.zeros((1, 1), np.int64)}

    def answer(self, requests: Sequence[tuple[Optional[str], dict[str, Any]]]) -> list[dict[str, np.ndarray] | Exception]:
        """``run`` over ``(model, arrays)`` requests."""
        return self.run([self.item(model, arrays) for model, arrays in requests])

    def close(self) -> None:
        self.streams.close()


class _WarmUp:
    """The item of a WARM_UP_STREAM request."""


def open_stream_worker(params: dict[str, str], base: Optional[str | os.PathLike] = None) -> StreamWorker:
    """The :class:`StreamWorker` of an ``M_stream`` companion's :meth:`ServedModel.load_parameters`."""
    return StreamWorker(open_worker(params, base), StreamOptions.from_parameters(params))

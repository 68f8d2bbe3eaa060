"""Forecast streams: clients push timestamped frames, the engine keeps each stream's window, its calendar
and its gaps, and forecasts many streams in one batched engine call.

    streams = Streams("bike.engine", store="streams.db", gaps="refuse", max_gap=2)
    streams.push("midtown", "2026-11-01T05:30:00Z", frame)   # frame [C, H, W]; returns the frames held
    fc = streams.forecast("midtown", steps=4)                 # fc.y [4, C, H, W], fc.time (UTC datetimes)
    times, frames = streams.history("midtown")

Rules: times are aware and on the model's grid (:mod:`~stvfm_engine.model.calendar`: step ``k`` at
``start + k * 86400 / steps_per_day`` s; ``tod``/``dow`` by the calendar's one function, as in training);
a frame is checked by :meth:`Session.check` (as the last step of a window), so a wrong shape, an integer
dtype or a non-finite value is the session's one-line :class:`InputError`, and nothing is stored. A
push returns after its commit (:mod:`~stvfm_engine.engine.stream_store`: SQLite file or
``postgresql://``). The same frame again is a no-op, a different one is refused (``replace=True``
overwrites); a frame inside the window fills its gap, an older one is refused. A forecast reads the
``T`` steps ending at the newest frame; gaps are refused naming the missing times, or filled
(``"hold"``: last value carried, ``"linear"``) up to ``max_gap`` consecutive steps and reported in
``Forecast.imputed``. ``steps`` beyond the model's horizon roll out (the model runs again on a window
that ends with its own forecast); a forecast never changes the stored stream. A multi-model engine binds
each stream to the model it was first pushed with.

For a server (the ``M_stream`` companion of a served model ``M``), one call per batch of requests::

    results = streams.serve_batch([(stream, time_or_None, frame_or_None, steps_or_None, model), ...])

pushes every item that carries a frame (one transaction, committed before it returns), then forecasts
every item in ONE :meth:`Session.run` per rollout round (the session's scheduler: backend calls of up to
``max_batch`` samples, whatever the number of streams). Per item: a :class:`Forecast` (``y`` float32 ``[steps, C, H, W]``, ``time`` UTC datetimes,
``held`` frames in the window; a push that leaves the window incomplete answers ``steps`` 0 with
``held < T``) or the :class:`~stvfm_engine.errors.STVFMError` that refused it (send it back as that
request's 400; any other exception is the server's fault). A ``time`` without a frame must be the
newest time held. ``stream`` and ``time`` may be ``bytes`` (BYTES tensor elements), ``frame`` an FP32
``[C, H, W]`` array, ``steps`` a numpy integer; ``model`` names the served model (None on a one-model
engine). Output times as ISO-8601 UTC: :func:`stvfm_engine.model.calendar.iso`. The server adds no
checks and no batching of its own. ``Streams(...)`` raises a one-line ``ConfigError`` where a model has no
calendar (or, without time inputs, no ``interval``): the server then offers no ``M_stream``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional, Sequence

import numpy as np
import torch

from stvfm_engine.engine.session import Session, open_session
from stvfm_engine.engine.stream_store import Binding, Held, Push, StreamStore, check_binding, open_store
from stvfm_engine.errors import ConfigError, InputError, STVFMError
from stvfm_engine.model.calendar import Grid, grid_for, iso, parse_time, to_us

__all__ = ["Streams", "Forecast", "GAPS"]

GAPS = ("refuse", "hold", "linear")
MAX_STREAM_NAME = 200
_FEATURE_CACHE = 4096  # windows' tod/dow kept per (model, newest step)


@dataclass
class Forecast:
    """One stream's forecast: ``y`` float32 ``[steps, C, H, W]`` at ``time`` (aware UTC datetimes);
    ``imputed`` the history times that were filled; ``rolled_out`` steps beyond the model's horizon;
    ``held`` frames of the window present in the store."""

    stream: str
    model: str
    time: list[datetime]
    y: np.ndarray
    imputed: list[datetime] = field(default_factory=list)
    rolled_out: int = 0
    held: int = 0


@dataclass
class _Run:
    """A forecast being rolled out: the window ``x [T, C, H, W]`` ending at step ``end``."""

    index: int
    stream: str
    model: str
    steps: int
    x: np.ndarray
    newest: int
    end: int
    imputed: list[datetime]
    held: int
    out: list[np.ndarray] = field(default_factory=list)


class Streams:
    """Forecast streams over an engine (an ``Engine``, a :class:`Session` or an engine directory) and a store
    (a SQLite file path, a ``postgresql://`` URL or a :class:`StreamStore`).

    ``gaps``/``max_gap``: the default gap policy (overridable per call). ``calendar``: ``{"start", "zone"}``
    for every model (default: each model's own from its checkpoint). ``interval``: seconds per step of a
    model without time inputs. ``max_steps``: the most steps one forecast may ask for.
    """

    def __init__(self, engine: Any, store: str | os.PathLike | StreamStore, *, gaps: str = "refuse",
                 max_gap: int = 2, calendar: Optional[dict] = None, interval: Optional[float] = None,
                 max_steps: int = 1024):
        if isinstance(engine, Session):
            self.session = engine
        elif isinstance(getattr(engine, "session", None), Session):
            self.session = engine.session
        elif isinstance(engine, (str, os.PathLike)):
            self.session = open_session(engine)
        else:
            raise InputError(f"engine: expected an Engine, a Session or an engine directory, got {type(engine).__name__}")
        self.gaps, self.max_gap = _policy(gaps, max_gap)
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise InputError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        self.max_steps = max_steps
        self.grids: dict[str, Grid] = {}
        for name, cfg in self.session.models.items():
            try:
                self.grids[name] = grid_for(cfg.steps_per_day, calendar if calendar is not None else cfg.calendar,
                                            interval, what=f"model {name!r}")
            except ConfigError as e:
                raise ConfigError(f"streams: {e}") from None
        self.store = open_store(store)
        self._features: dict[tuple[str, int], tuple[Any, Any]] = {}

    # ------------------------------------------------------------------ public API
    def push(self, stream: str, time: Any, frame: Any, model: Optional[str] = None, replace: bool = False) -> int:
        """Commit ``frame`` ``[C, H, W]`` of ``stream`` at ``time``; return the frames now held in its window."""
        result = self.store.push_many([self._push_item(stream, time, frame, model, replace)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def forecast(self, stream: str, steps: Optional[int] = None, model: Optional[str] = None,
                 gaps: Optional[str] = None, max_gap: Optional[int] = None) -> Forecast:
        """The forecast of ``stream`` (``steps`` default: the model's horizon) from the window held now."""
        return self.forecast_many([(stream, steps, model)], gaps=gaps, max_gap=max_gap)[0]

    def forecast_many(self, items: Sequence[Any], gaps: Optional[str] = None,
                      max_gap: Optional[int] = None) -> list[Forecast]:
        """Forecasts of many streams in one batched engine call per rollout round. ``items``: stream names or
        ``(stream, steps)`` / ``(stream, steps, model)`` tuples. The first refusal is raised."""
        if not isinstance(items, (list, tuple)):
            raise InputError(f"expected a list of streams or (stream, steps, model) tuples, got {type(items).__name__}")
        asks = []
        for item in items:
            if isinstance(item, str):
                item = (item,)
            if not isinstance(item, (list, tuple)) or not 1 <= len(item) <= 3:
                raise InputError(f"expected a stream name or a (stream, steps, model) tuple, got {item!r}")
            stream, steps, model = (*item, None, None)[:3]
            asks.append((stream, None, steps, model))
        results = self._forecast(asks, gaps, max_gap, {})
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results  # type: ignore[return-value]

    def history(self, stream: str) -> tuple[list[datetime], np.ndarray]:
        """The window held now: its times (aware UTC, oldest first) and frames ``[n, C, H, W]`` float32."""
        stream = _name(stream)
        held = self.store.read([stream]).get(stream)
        if held is None:
            raise InputError(f"unknown stream {stream!r}: nothing was pushed to it")
        if held.binding.model not in self.grids:
            raise InputError(f"stream {stream!r} is bound to model {held.binding.model!r}, which this engine does "
                             f"not serve ({list(self.session.models)})")
        grid, T = self.grids[held.binding.model], self.session.models[held.binding.model].history
        steps = {_step(grid, t): data for t, data in held.frames}
        newest = max(steps)
        window = [k for k in sorted(steps) if k > newest - T]
        frames = np.stack([np.frombuffer(steps[k], np.float32).reshape(held.binding.shape) for k in window])
        return [grid.time(k) for k in window], frames

    def serve_batch(self, items: Sequence[Sequence[Any]]) -> list[Forecast | STVFMError]:
        """A server's batch: ``[(stream, time_or_None, frame_or_None, steps_or_None, model), ...]`` -> per item a
        :class:`Forecast` or the error that refused it (see the module docstring)."""
        results: list[Any] = [None] * len(items)
        pushes, pushed_at = [], []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, (list, tuple)) or len(item) != 5:
                    raise InputError(f"expected (stream, time, frame, steps, model), got {type(item).__name__}")
                stream, time, frame, _, model = item
                if frame is not None:
                    if time is None:
                        raise InputError(f"stream {stream!r}: a frame needs its time")
                    pushes.append(self._push_item(stream, time, frame, model, False))
                    pushed_at.append(i)
            except STVFMError as e:
                results[i] = e
        acks: dict[int, int] = {}
        for i, ack in zip(pushed_at, self.store.push_many(pushes) if pushes else []):
            if isinstance(ack, Exception):
                results[i] = ack
            else:
                acks[i] = ack
        todo = [i for i in range(len(items)) if results[i] is None]
        asks = [(items[i][0], None if i in acks else items[i][1], items[i][3], items[i][4]) for i in todo]
        for i, r in zip(todo, self._forecast(asks, None, None, {k: acks[i] for k, i in enumerate(todo) if i in acks})):
            results[i] = r
        return results

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Streams":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ pushes
    def _model(self, stream: str, model: Optional[str]) -> str:
        if model is not None or len(self.session.models) == 1:
            return self.session.model_name(model)
        binding = self.store.binding(stream)
        if binding is None:
            raise InputError(f"stream {stream!r} is not bound to a model yet: pass model=NAME "
                             f"(this engine serves {list(self.session.models)})")
        return binding.model

    def _push_item(self, stream: Any, time: Any, frame: Any, model: Optional[str], replace: bool) -> Push:
        stream = _name(stream)
        t = parse_time(time, f"stream {stream!r} time")
        model = self._model(stream, model)
        cfg, grid = self.session.models[model], self.grids[model]
        k = grid.step(t, f"stream {stream!r} time")
        if frame is None or isinstance(frame, (str, bytes)):
            raise InputError(f"stream {stream!r} at {iso(t)}: expected frame float32 [{cfg.channels}, {cfg.height}, "
                             f"{cfg.width}], got {type(frame).__name__}")
        a = frame if isinstance(frame, torch.Tensor) else np.asarray(frame)
        if isinstance(a, torch.Tensor):  # a window of zeros ending with this frame, its shape and dtype kept
            a = a.detach().cpu()
            window = torch.cat([a.new_zeros((1, cfg.history - 1, *a.shape)), a[None, None]], dim=1)
        else:
            window = np.concatenate([np.zeros((1, cfg.history - 1, *a.shape), a.dtype), a[None, None]], axis=1)
        tod, dow = self._window_features(model, k)
        try:  # the one input check
            x = self.session.check(model, window, tod, dow).x
        except InputError as e:
            raise InputError(f"stream {stream!r} at {iso(t)}: frame {list(a.shape)} checked as the last step of a "
                             f"window: {e}") from None
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        data = np.ascontiguousarray(x[0, -1], dtype=np.float32).tobytes()
        binding = Binding(model, (cfg.channels, cfg.height, cfg.width), grid.start_us, grid.interval_us)
        return Push(stream, binding, to_us(t), data, (cfg.history - 1) * grid.interval_us, bool(replace))

    # ------------------------------------------------------------------ forecasts
    def _window_features(self, model: str, end: int) -> tuple[Any, Any]:
        """``tod``/``dow`` ``[1, T]`` of the window ending at step ``end`` (None without time inputs)."""
        found = self._features.get((model, end))
        if found is None:
            if len(self._features) >= _FEATURE_CACHE:
                self._features.clear()
            T = self.session.models[model].history
            tod, dow = self.grids[model].features(range(end - T + 1, end + 1))
            found = self._features[(model, end)] = (None, None) if tod is None else (tod[None], dow[None])
        return found

    def _forecast(self, asks: list[tuple], gaps: Optional[str], max_gap: Optional[int],
                  pushed: dict[int, int]) -> list[Any]:
        """Per ask ``(stream, time, steps, model)``: a Forecast or the InputError. ``pushed``: ask index -> frames
        held after this batch's push (an incomplete window then answers 0 steps instead of an error)."""
        gaps, max_gap = _policy(gaps if gaps is not None else self.gaps, self.max_gap if max_gap is None else max_gap)
        results: list[Any] = [None] * len(asks)
        names = []
        for stream, *_ in asks:
            try:
                names.append(_name(stream))
            except InputError:
                pass
        helds = self.store.read(names)
        runs: list[_Run] = []
        for i, (stream, time, steps, model) in enumerate(asks):
            try:
                run = self._start(i, stream, time, steps, model, helds, gaps, max_gap, pushed.get(i))
            except InputError as e:
                results[i] = e
                continue
            if isinstance(run, Forecast):
                results[i] = run
            else:
                runs.append(run)
        while runs:  # one batched engine call per rollout round
            requests, checked = [], []
            for r in runs:
                try:
                    requests.append(self.session.check(r.model, r.x[None], *self._window_features(r.model, r.end)))
                    checked.append(r)
                except InputError as e:  # e.g. a rollout that left the finite range
                    results[r.index] = InputError(f"stream {r.stream!r}: {e}")
            ys = self.session.run(requests) if requests else []
            going = []
            for r, y in zip(checked, ys):
                r.out.append(y[0])
                if sum(len(o) for o in r.out) < r.steps:
                    r.x = np.concatenate([r.x, y[0]])[-len(r.x):]
                    r.end += len(y[0])
                    going.append(r)
                else:
                    results[r.index] = self._finish(r)
            runs = going
        return results

    def _start(self, index: int, stream: Any, time: Any, steps: Any, model: Optional[str], helds: dict[str, Held],
               gaps: str, max_gap: int, pushed: Optional[int] = None) -> _Run | Forecast:
        """The run of one forecast; ``pushed``: frames held after this batch's push of the stream, where a
        window that this push left incomplete answers 0 steps instead of the window's error."""
        stream = _name(stream)
        held = helds.get(stream)
        if held is None:
            raise InputError(f"unknown stream {stream!r}: nothing was pushed to it")
        bound = held.binding.model
        if model is not None and self.session.model_name(model) != bound:
            raise InputError(f"stream {stream!r} is bound to model {bound!r}; got model {model!r}")
        if bound not in self.session.models:
            raise InputError(f"stream {stream!r} is bound to model {bound!r}, which this engine does not serve "
                             f"({list(self.session.models)})")
        cfg, grid = self.session.models[bound], self.grids[bound]
        check_binding(stream, held.binding, Binding(bound, (cfg.channels, cfg.height, cfg.width), grid.start_us,
                                                    grid.interval_us))
        steps = cfg.horizon if steps is None else steps
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= self.max_steps:
            raise InputError(f"stream {stream!r}: steps must be an integer in [1, {self.max_steps}], got {steps!r}")
        try:
            x, imputed, end, present = _window(stream, held, cfg.history, grid, gaps, max_gap)
        except InputError:
            if pushed is None or pushed >= cfg.history:
                raise
            return Forecast(stream, bound, [], np.zeros((0, *held.binding.shape), np.float32), held=pushed)
        if time is not None:
            t = parse_time(time, f"stream {stream!r} time")
            if grid.step(t, f"stream {stream!r} time") != end:
                raise InputError(f"stream {stream!r}: time {iso(t)} without a frame must be the newest time held, "
                                 f"{iso(grid.time(end))}")
        return _Run(index, stream, bound, int(steps), x, end, end, imputed, present)

    def _finish(self, r: _Run) -> Forecast:
        horizon = self.session.models[r.model].horizon
        grid = self.grids[r.model]
        y = np.ascontiguousarray(np.concatenate(r.out)[:r.steps], dtype=np.float32)
        return Forecast(r.stream, r.model, [grid.time(r.newest + k) for k in range(1, r.steps + 1)], y, r.imputed,
                        max(0, r.steps - horizon), r.held)


def _policy(gaps: Any, max_gap: Any) -> tuple[str, int]:
    if gaps not in GAPS:
        raise InputError(f"gaps must be one of {list(GAPS)}, got {gaps!r}")
    if not isinstance(max_gap, int) or isinstance(max_gap, bool) or max_gap < 0:
        raise InputError(f"max_gap must be an integer >= 0 (consecutive missing steps filled), got {max_gap!r}")
    return gaps, max_gap


def _name(stream: Any) -> str:
    if isinstance(stream, bytes):  # a BYTES tensor element
        try:
            stream = stream.decode()
        except UnicodeDecodeError:
            raise InputError(f"stream: expected a UTF-8 name, got {stream[:40]!r}") from None
    if not isinstance(stream, str) or not 0 < len(stream) <= MAX_STREAM_NAME or not stream.isprintable():
        raise InputError(f"stream: expected a printable name of 1 to {MAX_STREAM_NAME} characters, got {stream!r}")
    return stream


def _step(grid: Grid, t_us: int) -> int:
    return (t_us - grid.start_us) // grid.interval_us


def _window(stream: str, held: Held, T: int, grid: Grid, gaps: str,
            max_gap: int) -> tuple[np.ndarray, list[datetime], int, int]:
    """The ``T`` steps ending at the newest frame held, gaps filled by the policy: ``x [T, C, H, W]``, the
    filled times, the newest step and the frames present in the window."""
    frames = {_step(grid, t): data for t, data in held.frames}
    known = sorted(frames)
    end = known[-1]
    first = end - T + 1
    present = sum(k >= first for k in known)
    if first not in frames and known[0] > first:
        raise InputError(f"stream {stream!r} holds {present} frames ({iso(grid.time(known[0]))} to "
                         f"{iso(grid.time(end))}); a forecast needs {T}, from {iso(grid.time(first))}")
    missing = [k for k in range(first, end + 1) if k not in frames]
    if missing and gaps == "refuse":
        shown = ", ".join(iso(grid.time(k)) for k in missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise InputError(f"stream {stream!r}: {len(missing)} of the {T} frames ending at {iso(grid.time(end))} are "
                         f"missing: {shown}; push them, or forecast with gaps='hold' or 'linear'")
    for j, k in enumerate(missing):
        if j + 1 < len(missing) and missing[j + 1] == k + 1:
            continue  # not the end of a run
        before = max(i for i in known if i < k)  # the frame held before the run (the anchor at the window's start)
        if k - before > max_gap:
            raise InputError(f"stream {stream!r}: {k - before} consecutive frames missing ({iso(grid.time(before + 1))} "
                             f"to {iso(grid.time(k))}); gaps={gaps!r} fills at most max_gap={max_gap}")
    shape = held.binding.shape
    value = (lambda k: np.frombuffer(frames[k], np.float32).reshape(shape))
    x = np.empty((T, *shape), np.float32)
    for i, k in enumerate(range(first, end + 1)):
        if k in frames:
            x[i] = value(k)
            continue
        before = max(j for j in known if j < k)
        if gaps == "hold":
            x[i] = value(before)
        else:
            after = min(j for j in known if j > k)
            w = (k - before) / (after - before)
            x[i] = value(before) + w * (value(after).astype(np.float64) - value(before))
    return x, [grid.time(k) for k in missing], end, present

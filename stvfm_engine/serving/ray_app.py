"""``stvfm-engine serve --ray``: the models as Ray Serve applications, each replica the HTTP ingress of
the models it runs (no deployment-handle hop), speaking the Open Inference Protocol's HTTP endpoints.

One application per engine directory: a one-model directory at route prefix ``/v2/models/NAME``, a
multi-model directory (one backbone in memory per replica) at ``/v2/models``; a small ``front`` application
at ``/`` answers health, server metadata, ``/metrics`` and unknown paths. A replica gathers the requests
that arrive while its model runs (:class:`Collector`) and hands them to the session's one scheduler
(:meth:`Worker.run`); wire decoding is :mod:`~stvfm_engine.serving.oip`'s, the model's rules are
``session.check``'s. The serve command (:mod:`~stvfm_engine.serving.ray_server`) tells the replicas to
drain through a small named actor (:class:`Control`) that they poll, and reads their in-flight counts there.
"""
from __future__ import annotations

import asyncio
import collections
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from stvfm_engine.errors import InputError, ProtocolError, ServeError, StoreError, STVFMError
from stvfm_engine.serving.models import ServedModel, StreamWorker, Worker, open_engine
from stvfm_engine.serving.oip import (HEADER_LENGTH, decode_request, encode_response, error_body, http_status,
                                      model_metadata, read_body)
from stvfm_engine.version import __version__

SERVER = "stvfm-engine"
PLATFORM = "stvfm_engine_ray"
NAMESPACE = "stvfm-engine"
POLL_S = 0.1  # how often a replica reports to the Control actor (and learns of a drain)
_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?(/ready|/infer)?")


@dataclass(frozen=True)
class Settings:
    """What every replica is told: the serve command's admission and batching options."""

    control: str  # the name of the Control actor (namespace NAMESPACE)
    max_queue_delay_s: float = 0.0
    request_timeout_s: float = 30.0
    max_request_bytes: int = 64 * 2 ** 20
    served: tuple[str, ...] = ()  # every model of the server, named in a 404


class Collector:
    """Gathers requests for one worker thread: a request that finds the model idle runs at once; those that
    arrive while it runs form the next run (FIFO, at most ``max_samples`` samples, ``size(item)`` each).
    Only gathers: ``run(items) -> results`` (:meth:`Worker.run`) orders, splits and pads. ``delay_s`` > 0
    holds a run that is not full that long for more requests (trading latency for batch size)."""

    def __init__(self, run: Callable[[list], list], max_samples: int, size: Callable[[Any], int], delay_s: float = 0.0,
                 executor: Optional[ThreadPoolExecutor] = None):
        self._run, self._max, self._size, self._delay = run, max_samples, size, delay_s
        self._pending: collections.deque = collections.deque()
        # the model's one thread (collectors of one replica share it: one engine call at a time)
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="stvfm-model")
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self.runs = 0

    async def submit(self, item: Any, timeout_s: float) -> Any:
        """The result of ``item``; :class:`asyncio.TimeoutError` if it is not answered within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop())
        future = loop.create_future()
        self._pending.append((item, future))
        self._wake.set()
        return await asyncio.wait_for(future, timeout_s)  # cancels the future: the collector then skips it

    def _take(self) -> list:
        batch, samples = [], 0
        while self._pending:
            item, future = self._pending[0]
            if future.done():  # its deadline passed while it waited
                self._pending.popleft()
                continue
            if batch and samples + self._size(item) > self._max:
                break
            batch.append(self._pending.popleft())
            samples += self._size(item)
        return batch

    def _queued_samples(self) -> int:
        return sum(self._size(item) for item, future in self._pending if not future.done())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                if self._delay > 0 and self._queued_samples() < self._max:
                    await asyncio.sleep(self._delay)
                batch = self._take()
                if not batch:
                    continue
                try:
                    results = await loop.run_in_executor(self._executor, self._run, [item for item, _ in batch])
                except Exception as e:  # noqa: BLE001 - Worker.run answers per item; this is a last resort
                    results = [RuntimeError(f"inference failed: {e}")] * len(batch)
                self.runs += 1
                for (_, future), result in zip(batch, results):
                    if not future.done():
                        future.set_result(result)


@ray.remote(num_cpus=0)
class Control:
    """Where the serve command and the replicas meet: readiness, the drain, in-flight and answer counts."""

    def __init__(self):
        self.ready = False
        self.draining = False
        self.replicas: dict[str, dict] = {}  # replica id -> its last report

    def set_state(self, ready: bool, draining: bool) -> None:
        self.ready, self.draining = ready, draining

    def state(self) -> tuple[bool, bool]:
        return self.ready, self.draining

    def report(self, replica: str, report: dict) -> bool:
        """A replica's in-flight count and counters (``report``); returns whether to drain."""
        self.replicas[replica] = {**report, "at": time.time()}
        return self.draining

    def snapshot(self) -> dict[str, dict]:
        return dict(self.replicas)


def _error(status: int, message: str, close: bool = False) -> Response:
    headers = {"connection": "close"} if close else None
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


class ModelIngress:
    """One replica of one engine directory, and the HTTP ingress of its models (and of their ``M_stream``
    companions, whose requests a second collector gathers for :meth:`StreamWorker.run` on the same model
    thread): metadata, readiness and infer. Warm before Ray counts it as started: every model runs a batch
    of 1 and of max batch."""

    def __init__(self, models: Sequence[ServedModel], params: dict[str, str], settings: Settings):
        self.models = {m.name: m for m in models}
        self.keys = {m.name: m.key for m in models}
        self.settings = settings
        self.worker = Worker(open_engine(params), params.get("model_key") or None)
        max_batch = self.worker.session.max_batch
        self.worker.warm_up(list(dict.fromkeys(m.key for m in models)))
        thread = ThreadPoolExecutor(1, thread_name_prefix="stvfm-model")
        self.collector = Collector(self.worker.run, max_batch * len(self.worker.session.models),
                                   lambda r: r.batch, settings.max_queue_delay_s, thread)
        streams = next((m.streams for m in models if m.streams is not None), None)
        self.streams = StreamWorker(self.worker, streams, warm=True) if streams is not None else None
        self.stream_collector = Collector(self.streams.run, max_batch * len(self.worker.session.models),
                                          lambda item: 1, settings.max_queue_delay_s, thread) if streams else None
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.control = ray.get_actor(settings.control, namespace=NAMESPACE)
        self.inflight = 0
        self.refused = 0
        self.draining = False
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                counts = {m: list((self.streams.counts if self.models[m].streams else self.worker.counts)
                                  [self.worker.session.model_name(k)]) for m, k in self.keys.items()}
                self.draining = await self.control.report.remote(self.replica, {
                    "inflight": self.inflight, "refused": self.refused, "counts": counts}) or self.draining
            except Exception:  # noqa: BLE001 - the serve command went away; Ray stops this replica next
                pass
            await asyncio.sleep(POLL_S)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")  # the whole path: Ray's proxy keeps the route prefix in it
        match = _MODEL_PATH.fullmatch(path)
        model = self.models.get(match.group(1)) if match else None
        if model is None:
            name = match.group(1) if match else path
            return _error(404, f"unknown model {name!r}; served: {list(self.settings.served)}" if match
                          else f"no endpoint {path}")
        action = match.group(2)
        if action is None:
            return Response(_json(model_metadata(model, PLATFORM)), media_type="application/json")
        if self.draining:
            self.refused += 1
            return _error(503, "the server is shutting down (draining); send the request elsewhere", close=True)
        if action == "/ready":
            return Response(status_code=200)
        if request.method != "POST":
            return _error(405, "infer takes POST")
        self.inflight += 1
        try:
            return await self._infer(model, request)
        finally:
            self.inflight -= 1

    async def _infer(self, model: ServedModel, request: Request) -> Response:
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            body = await read_body(request.stream(), request.headers.get("content-length"),
                                   self.settings.max_request_bytes)
            arrays, binary = decode_request(model, body, request.headers.get(HEADER_LENGTH))
            if model.streams is not None:
                checked, collector = self.streams.item(model.key, arrays), self.stream_collector
                if isinstance(checked, Exception):
                    raise checked
            else:
                checked = self.worker.check(model.key, arrays["x"], arrays.get("tod"), arrays.get("dow"))
                collector = self.collector
        except ProtocolError as e:
            return _error(http_status(e), str(e))
        except InputError as e:
            return _error(400, str(e))
        try:
            y = await collector.submit(checked, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return _error(504, f"not answered within the request timeout of {self.settings.request_timeout_s * 1e3:g} ms "
                               "(--request-timeout-ms)")
        if isinstance(y, Exception):  # what the request sent: 400; a part of the server down: 503
            status = 503 if isinstance(y, (ServeError, StoreError)) else 400 if isinstance(y, STVFMError) else 500
            return _error(status, str(y), close=status == 503)
        body, headers = encode_response(model, y if model.streams is not None else {"y": y}, binary)
        if self.draining:  # the client's next request opens a new connection: a 503, or refused once we are gone
            headers["connection"] = "close"
        return Response(body, headers=headers)


class Front:
    """The application at ``/``: health, server metadata, ``/metrics`` (summed over the replicas' reports)
    and a 404 naming the served models for any other path."""

    def __init__(self, models: Sequence[ServedModel], settings: Settings):
        self.models = sorted(m.name for m in models)
        self.control = ray.get_actor(settings.control, namespace=NAMESPACE)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path == "/v2/health/live":
            return Response(status_code=200)
        if path == "/v2/health/ready":
            ready, draining = await self.control.state.remote()
            return Response(status_code=200 if ready and not draining else 503)
        if path == "/v2":
            return Response(_json({"name": SERVER, "version": __version__, "extensions": ["binary_tensor_data"]}),
                            media_type="application/json")
        if path == "/metrics":
            return Response(self._metrics(await self.control.snapshot.remote()),
                            media_type="text/plain; version=0.0.4")
        match = _MODEL_PATH.fullmatch(path)
        if match:
            return _error(404, f"unknown model {match.group(1)!r}; served: {self.models}")
        return _error(404, f"no endpoint {path}")

    def _metrics(self, replicas: dict[str, dict]) -> str:
        lines = []
        for metric, i, help_text in (("nv_inference_count", 0, "Samples predicted"),
                                     ("nv_inference_exec_count", 1, "Batched backend calls")):
            lines += [f"# HELP {metric} {help_text} (counted by the stvfm-engine Ray Serve replicas)",
                      f"# TYPE {metric} counter"]
            for name in self.models:
                total = sum(r["counts"][name][i] for r in replicas.values() if name in r.get("counts", {}))
                lines.append(f'{metric}{{model="{name}",version="1"}} {total}')
        return "\n".join(lines) + "\n"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def applications(models: Sequence[ServedModel], settings: Settings, replicas: int, max_queue: Optional[int],
                 request_timeout_s: float) -> list[tuple[str, str, Any]]:
    """``(application name, route prefix, bound app)`` per engine directory, then the front at ``/``. The
    ``M_stream`` companions of a multi-model directory share its replica; that of a one-model directory is
    an application of its own (route ``/v2/models/M_stream``, its own replica and engine).
    ``max_ongoing_requests`` is 2 x the replica's largest run, so a full run can wait while one runs;
    ``max_queue`` requests more wait in Ray's router (None: 8 x max batch per model)."""
    directories: dict[str, list[ServedModel]] = {}
    for m in models:
        directories.setdefault(m.directory if m.key is not None else f"model:{m.name}", []).append(m)
    multi = [group for group in directories.values() if group[0].key is not None]
    if len(multi) > 1:
        raise ServeError(f"--ray serves at most one multi-model directory per server (its models share the route "
                         f"/v2/models), got {len(multi)}; run one 'serve --ray' per multi-model directory")
    timeout_options = {"graceful_shutdown_wait_loop_s": 0.2,
                       "graceful_shutdown_timeout_s": request_timeout_s + 5}
    apps = []
    for i, group in enumerate(directories.values()):
        first = group[0]
        params = {k: v for k, v in first.load_parameters().items() if k != "model_key"} if first.key else \
            first.load_parameters()
        run_max = first.max_batch * len(group)
        queue = max_queue if max_queue is not None else 8 * run_max
        deployment = serve.deployment(ModelIngress, name=f"model-{i + 1}").options(
            num_replicas=replicas, max_ongoing_requests=2 * run_max, max_queued_requests=queue,
            health_check_period_s=2, health_check_timeout_s=30, **timeout_options)
        prefix = "/v2/models" if first.key is not None else f"/v2/models/{first.name}"
        apps.append((f"stvfm-{first.name if first.key is None else 'multi'}", prefix,
                     deployment.bind(group, params, settings)))
    front = serve.deployment(Front, name="front").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, **timeout_options)
    apps.append(("stvfm-front", "/", front.bind(list(models), settings)))
    return apps

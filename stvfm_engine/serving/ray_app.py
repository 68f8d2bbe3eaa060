"""``stvfm-engine serve --ray``: the same models as a Ray Serve application (one ``@serve.batch`` deployment
per model behind an ingress speaking the Open Inference Protocol's HTTP endpoints, as Triton does).

The models of a multi-model directory share ONE deployment (one backbone in memory per replica): its
``@serve.batch`` takes requests of all of them, and ``Engine.predict_many`` runs the requests whose
token sequences have the same length in one backbone pass."""
from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ray import serve

from stvfm_engine.errors import InputError
from stvfm_engine.serving.lifecycle import describe, log, loopback, stop_on_signals, wait_ready
from stvfm_engine.serving.models import MixedBatchRunner, ServedModel, open_engine, open_runner
from stvfm_engine.serving.oip import HEADER_LENGTH, ProtocolError, decode_request, encode_response, model_metadata
from stvfm_engine.version import __version__

APP = "stvfm-engine"
PLATFORM = "stvfm_engine_ray"
_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?(/ready|/infer)?")


@dataclass(frozen=True)
class RayOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    address: Optional[str] = None  # None: start a local Ray instance (and stop it at the end)
    replicas: int = 1
    max_queue_delay_ms: float = 20.0  # @serve.batch's wait; 2 ms batched poorly here (shared/docs/pitfalls.md)
    ready_timeout_s: float = 300.0


def _samples(requests: list) -> int:
    return sum(len(r[0]) for r in requests)


def _answer(result: Any, stats: tuple) -> tuple[Any, Optional[str], int, tuple]:
    """A replica's reply: ``(y, error, http_status, stats)``; an InputError is the client's fault (400)."""
    if isinstance(result, Exception):
        return None, str(result), 400 if isinstance(result, InputError) else 500, stats
    return result, None, 200, stats


@serve.deployment(graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=5)
class ModelReplica:
    """One replica of one model: validates each request, then joins it to the replica's next batch."""

    def __init__(self, params: dict[str, str], max_batch: int, wait_s: float):
        self.runner = open_runner(params)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._batch.set_max_batch_size(max_batch)
        self._batch.set_batch_wait_timeout_s(wait_s)

    async def infer(self, x: Any, tod: Any, dow: Any) -> tuple[Any, Optional[str], int, tuple]:
        """``(y, error, http_status, (replica, inferences, executions))``."""
        try:
            result = await self._batch(self.runner.check(x, tod, dow))
        except InputError as e:
            result = e
        return _answer(result, (self.replica, self.runner.inferences, self.runner.executions))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.02, batch_size_fn=_samples)
    async def _batch(self, requests: list) -> list:
        return await asyncio.to_thread(self.runner.run, requests)


def _mixed_samples(items: list) -> int:
    return sum(len(r[1][0]) for r in items)


@serve.deployment(graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=5)
class SharedReplica:
    """One replica of a multi-model directory: every model's requests join one batch, run by
    ``predict_many`` (one backbone pass per group of equal token-sequence length)."""

    def __init__(self, params: dict[str, str], max_batch: int, wait_s: float):
        self.runner = MixedBatchRunner(open_engine(params))
        self.replica = serve.get_replica_context().replica_id.unique_id
        # a batch may hold max_batch samples of each model; predict_many cuts it into calls of max_batch
        self._batch.set_max_batch_size(max_batch * len(self.runner.engine.models))
        self._batch.set_batch_wait_timeout_s(wait_s)

    async def infer(self, x: Any, tod: Any, dow: Any, model: Optional[str] = None) -> tuple:
        try:
            result = await self._batch((model, self.runner.check(model, x, tod, dow)))
        except InputError as e:
            result = e
        return _answer(result, (self.replica, *self.runner.counts[model]))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.02, batch_size_fn=_mixed_samples)
    async def _batch(self, items: list) -> list:
        return await asyncio.to_thread(self.runner.run, items)


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, graceful_shutdown_wait_loop_s=0.5,
                  graceful_shutdown_timeout_s=5)
class Ingress:
    """The Open Inference Protocol's HTTP endpoints in front of the model deployments."""

    def __init__(self, models: list[ServedModel], handles: dict[str, Any]):
        self.models = {m.name: m for m in models}
        self.handles = handles
        self.counts: dict[tuple[str, str], tuple[int, int]] = {}  # (model, replica) -> latest counters

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path in ("/v2/health/live", "/v2/health/ready"):
            return Response(status_code=200)
        if path == "/v2":
            return JSONResponse({"name": APP, "version": __version__, "extensions": ["binary_tensor_data"]})
        if path == "/metrics":
            return Response(self._metrics(), media_type="text/plain; version=0.0.4")
        match = _MODEL_PATH.fullmatch(path)
        if not match:
            return _error(404, f"no endpoint {path}")
        name, action = match.groups()
        model = self.models.get(name)
        if model is None:
            return _error(404, f"unknown model {name!r}; served: {sorted(self.models)}")
        if action is None:
            return JSONResponse(model_metadata(model, PLATFORM))
        if action == "/ready":
            return Response(status_code=200)
        if request.method != "POST":
            return _error(405, "infer takes POST")
        try:
            arrays, binary = decode_request(model, await request.body(), request.headers.get(HEADER_LENGTH))
        except ProtocolError as e:
            return _error(400, str(e))
        extra = {} if model.key is None else {"model": model.key}
        y, error, status, (replica, inferences, executions) = await self.handles[name].infer.remote(
            arrays["x"], arrays.get("tod"), arrays.get("dow"), **extra)
        old = self.counts.get((name, replica), (0, 0))
        self.counts[(name, replica)] = (max(old[0], inferences), max(old[1], executions))  # responses may overtake
        if error is not None:
            return _error(status, error)
        body, headers = encode_response(model, {"y": y}, binary)
        return Response(body, headers=headers)

    def _metrics(self) -> str:
        lines = []
        for metric, i, help_text in (("nv_inference_count", 0, "Samples predicted"),
                                     ("nv_inference_exec_count", 1, "Batched predict calls")):
            lines += [f"# HELP {metric} {help_text} (counted by the stvfm-engine Ray Serve replicas)",
                      f"# TYPE {metric} counter"]
            for name in self.models:
                total = sum(c[i] for (m, _), c in self.counts.items() if m == name)
                lines.append(f'{metric}{{model="{name}",version="1"}} {total}')
        return "\n".join(lines) + "\n"


def build_app(models: Sequence[ServedModel], options: RayOptions):
    # Serve's default of 5 ongoing requests per replica would cap every batch at 5
    handles: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for i, m in enumerate(models):
        if m.key is None:
            handles[m.name] = ModelReplica.options(name=f"model-{m.name}", num_replicas=options.replicas,
                                                   max_ongoing_requests=4 * m.max_batch).bind(
                m.load_parameters(), m.max_batch, options.max_queue_delay_ms / 1000)
            continue
        if m.directory not in shared:  # one deployment, one backbone, for every model of the directory
            size = sum(1 for o in models if o.directory == m.directory)
            params = {k: v for k, v in m.load_parameters().items() if k != "model_key"}
            shared[m.directory] = SharedReplica.options(
                name=f"shared-{len(shared) + 1}", num_replicas=options.replicas,
                max_ongoing_requests=4 * m.max_batch * size).bind(params, m.max_batch, options.max_queue_delay_ms / 1000)
        handles[m.name] = shared[m.directory]
    return Ingress.bind(list(models), handles)


def deployments(models: Sequence[ServedModel]) -> int:
    """How many model deployments :func:`build_app` makes (one per one-model directory or multi-model one)."""
    return len({m.directory if m.key is not None else m.name for m in models})


def serve_ray(models: Sequence[ServedModel], options: RayOptions = RayOptions()) -> int:
    """Deploy ``models`` on Ray Serve until SIGTERM/SIGINT; then delete the application (replicas finish
    their in-flight requests) and stop the Ray instance this command started. Returns 0."""
    import ray

    local = options.address is None
    log("starting a local Ray instance" if local else f"connecting to Ray at {options.address}")
    # each model replica reserves one CPU (Serve's default): a local instance has at least that many
    num_cpus = max(os.cpu_count() or 1, deployments(models) * options.replicas) if local else None
    ray.init(address=options.address, num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    host = loopback(options.host)
    try:
        with stop_on_signals() as stop:  # after ray.init, which installs its own SIGTERM handler
            serve.start(http_options={"host": options.host, "port": options.http_port},
                        logging_config={"log_level": "WARNING"})
            log(f"deploying {describe(list(models))} ({options.replicas} replica(s) each; the models of a multi-model "
                "directory share one deployment and backbone)")
            serve.run(build_app(models, options), name=APP, route_prefix="/")
            if wait_ready(f"http://{host}:{options.http_port}/v2/health/ready", stop, lambda: None,
                          options.ready_timeout_s):
                log(f"ready: HTTP http://{host}:{options.http_port} (Ray Serve), metrics "
                    f"http://{host}:{options.http_port}/metrics; models: {', '.join(m.name for m in models)}")
            while not stop.wait(0.5):
                pass
            log(f"{stop.signal_name}: deleting the application (in-flight requests finish first)")
    finally:
        try:
            serve.delete(APP)  # the proxies and the controller go with the local instance, if it is ours
        finally:
            if local:
                ray.shutdown()
    log("stopped")
    return 0


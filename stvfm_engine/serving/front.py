"""The public ports of ``serve`` (Triton). HTTP: the v2 core HTTP API answered by the project's strict
decoder (:mod:`stvfm_engine.serving.oip`) on uvicorn, each infer request forwarded to ``tritonserver``'s
HTTP endpoint over loopback with binary tensors (:class:`TritonHttp`: keep-alive connections, about 1 ms
cheaper per request than a gRPC call from Python). gRPC (:class:`GrpcFront`): the core of Triton's gRPC
service, each infer forwarded as it came. ``tritonserver``'s own HTTP and gRPC endpoints listen on
private loopback ports and answer only requests that carry a per-run secret header (Triton's
``--http-restricted-api`` / ``--grpc-restricted-protocol``; without it: 403 / UNAVAILABLE before the body
is parsed), so no client reaches them; its other extensions (statistics, repository, shared memory,
trace, logging, model config) are not served on either public port.

Admission is the front's, for both ports: a model holds at most ``--max-queue`` waiting requests
beyond those its instances run (max batch x instances); one more is refused at once (HTTP 503 before
its body is read, gRPC UNAVAILABLE), and a request not answered within ``--request-timeout-ms`` is
504 / DEADLINE_EXCEEDED. ``tritonserver`` itself gets no queue policy (see ``serve_triton``).

Served: ``GET /v2/health/live``, ``/v2/health/ready`` (200 once every model is warm, 503 while
draining or when ``tritonserver`` is not ready), ``/v2`` (server metadata), ``/v2/models/{name}``
(model metadata), ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer`` (JSON or binary tensors);
``/versions/1`` may follow a model name. Refusals are ``{"error": "..."}`` with 400 (not a valid request),
404, 405, 413 (over ``--max-request-mb``, answered from ``Content-Length`` before the body is read, or
as soon as a streamed body passes it), 503 (queue full, not ready, draining, too many requests in
progress, or the bodies being read at once over their memory budget: with ``Connection: close``)
or 504 (past ``--request-timeout-ms``); 500 only for an inference that failed in the model.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import orjson

from stvfm_engine import __version__
from stvfm_engine.errors import ProtocolError, ServeError, first_line
from stvfm_engine.serving.models import ServedModel
from stvfm_engine.serving.oip import (
    DATATYPES,
    DTYPES,
    HEADER_LENGTH,
    asgi_chunks,
    check_content_length,
    decode_request,
    deserialize_bytes,
    encode_response,
    error_body,
    http_status,
    model_metadata,
    read_body,
    serialize_bytes,
)

PLATFORM = "stvfm-engine"
LOCKED_HEADER = "stvfm-serve-locked"  # the header (gRPC metadata) that opens tritonserver's private gRPC port
LINGER_S = 0.5  # at the end of a drain: how long accepted connections may take to deliver their request
GRPC_SERVICE = "inference.GRPCInferenceService"
# tritonserver's gRPC methods that the public gRPC port does not serve (the HTTP front serves none of them either)
NOT_PUBLIC = ("ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
              "RepositoryModelUnload", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
              "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
              "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings")
_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?(/ready|/infer)?")
_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\] ")


@dataclass(frozen=True)
class Limits:
    """What a request may take: ``max_request_bytes`` of body, ``request_timeout_s`` from arrival to
    answer, and a place among ``max_queue`` waiting requests per model (named in refusals) beyond the
    ``running`` ones that model's instances take at once."""

    max_request_bytes: int
    request_timeout_s: float
    max_queue: dict[str, int]
    running: dict[str, int] = field(default_factory=dict)

    def admitted(self, model: str) -> int:
        """Requests of ``model`` held at once (running and waiting); one more is refused at once."""
        return self.max_queue[model] + self.running.get(model, 0)

    @property
    def max_in_flight(self) -> int:
        """Requests in progress in the front at once (reading, queued in Triton, running): every model's
        admitted requests twice over, and 64 to spare; beyond it a request is refused at once with 503."""
        return 2 * sum(self.admitted(m) for m in self.max_queue) + 64

    @property
    def body_budget_bytes(self) -> int:
        """Request bodies read at once, in all: four of the largest, at least 256 MiB."""
        return max(4 * self.max_request_bytes, 2 ** 28)


def grpc_stub(target: str, max_message_bytes: int):
    """An async channel and Triton's gRPC inference service stub on it (messages up to the request limit)."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    size = max_message_bytes + 2 ** 20
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", size),
                                                         ("grpc.max_receive_message_length", size)])
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to ``tritonserver``: one request at a time, the response parsed by
    llhttp (``httptools``, as uvicorn parses requests)."""

    def __init__(self):
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: Optional[asyncio.Transport] = None
        self.waiter: Optional[asyncio.Future] = None
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"tritonserver sent a response that is not HTTP ({e})"))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._fail(exc or ConnectionError("tritonserver closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))
        if not self.parser.should_keep_alive():
            self.close()

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, head: bytes, body: Sequence[bytes]) -> tuple[int, dict[bytes, bytes], bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.headers, self.body = {}, []
        self.transport.writelines([head, *body])
        try:
            return await self.waiter
        finally:
            self.waiter = None


class TritonHttp:
    """Infer requests to ``tritonserver``'s private HTTP endpoint at ``host:port``, with binary tensors both
    ways, each carrying the secret ``header`` that opens it; keep-alive connections are reused (one per
    request in flight, at most ``keep`` kept idle)."""

    def __init__(self, host: str, port: int, header: tuple[str, str], keep: int = 64):
        self.host, self.port, self.keep = host, port, keep
        self.lock_line = f"{header[0]}: {header[1]}\r\n".encode()
        self.idle: list[_Connection] = []

    async def _connection(self) -> _Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        conn.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    async def infer(self, name: str, arrays: dict[str, np.ndarray]) -> tuple[int, Any]:
        """``(200, {output name: array})``, or ``(status, message)``: tritonserver's refusal. Raises
        ``OSError`` when tritonserver cannot be reached; cancelling (a deadline) closes the connection."""
        blobs = [serialize_bytes(a) if a.dtype == object else np.ascontiguousarray(a).data.cast("B")
                 for a in arrays.values()]
        header = orjson.dumps({"inputs": [{"name": n, "shape": list(a.shape), "datatype": DATATYPES[a.dtype],
                                           "parameters": {"binary_data_size": len(b)}}
                                          for (n, a), b in zip(arrays.items(), blobs)],
                               "parameters": {"binary_data_output": True}})
        size = len(header) + sum(len(b) for b in blobs)
        head = (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
                f"Content-Length: {size}\r\n").encode() + self.lock_line + b"\r\n"
        conn = await self._connection()
        try:
            status, headers, body = await conn.request(head, [header, *blobs])
        except BaseException:
            conn.close()  # a deadline or a failure: the connection's state is unknown
            raise
        if not conn.closed and len(self.idle) < self.keep:
            self.idle.append(conn)
        else:
            conn.close()
        if status != 200:
            try:
                message = orjson.loads(body).get("error")
            except (orjson.JSONDecodeError, AttributeError):
                message = None
            return status, str(message or body[:200].decode("utf-8", "replace") or f"HTTP {status}")
        n = int(headers.get(HEADER_LENGTH.encode(), len(body)))
        outputs, offset = {}, n
        for t in orjson.loads(body[:n])["outputs"]:
            length = t["parameters"]["binary_data_size"]
            raw = body[offset:offset + length]
            offset += length
            outputs[t["name"]] = (deserialize_bytes(raw, t["shape"]) if t["datatype"] == "BYTES" else
                                  np.frombuffer(raw, DTYPES[t["datatype"]]).reshape(t["shape"]))
        return 200, outputs

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle = []


class Front:
    """The ASGI application; ``tritonserver``'s gRPC endpoint at ``target`` (readiness, and the public gRPC
    port's calls), its HTTP endpoint at 127.0.0.1:``http_port`` (the HTTP port's infer requests).

    ``warm`` is set once every model has run (``serve`` warms them first), ``draining`` on SIGTERM/SIGINT;
    ``in_flight`` counts the requests accepted and not yet answered (:meth:`wait_answered`)."""

    def __init__(self, models: Sequence[ServedModel], target: str, limits: Limits, token: str = "",
                 http_port: int = 0):
        self.models = {m.name: m for m in models}
        self.token = token  # the header value that opens tritonserver's endpoints (they answer nobody else)
        self.http = TritonHttp("127.0.0.1", http_port, (LOCKED_HEADER, token))
        # tritonserver's gRPC endpoint answers only calls that carry this header (--grpc-restricted-protocol)
        self.call_metadata = ((f"triton-grpc-protocol-{LOCKED_HEADER}", token),) if token else None
        self.started = False  # warm once: set after the warm-up, never cleared (warm follows the workers)
        self.metadata = {m.name: json.dumps(model_metadata(m, PLATFORM)).encode() for m in models}
        self.target = target
        self.limits = limits
        self.warm = False
        self.draining = False
        self.in_flight = 0
        self.held = {name: 0 for name in self.models}  # admitted requests of each model not yet answered
        self.body_bytes = 0  # reserved by the requests whose bodies are being read
        self._answered: Optional[asyncio.Event] = None
        self.channel, self.stub = None, None

    async def connect(self) -> None:
        self.channel, self.stub = grpc_stub(self.target, self.limits.max_request_bytes)
        self._answered = asyncio.Event()
        self._answered.set()

    async def close(self) -> None:
        self.http.close()
        if self.channel is not None:
            await self.channel.close()

    async def triton_ready(self) -> bool:
        import grpc
        from tritonclient.grpc import service_pb2

        try:
            return (await self.stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2,
                                                metadata=self.call_metadata)).ready
        except grpc.aio.AioRpcError:
            return False

    async def infer(self, model: ServedModel, arrays: dict[str, np.ndarray], timeout_s: Optional[float] = None):
        """``{output name: array}`` from ``tritonserver`` (its private HTTP endpoint), or ``(HTTP status,
        message)`` when it refuses or does not answer within ``timeout_s`` (default ``--request-timeout-ms``):
        its 400 as it is, a deadline 504, a model or server not available (404, 503, no connection) 503, the
        rest (an inference that failed in the model) 500."""
        timeout_s = self.limits.request_timeout_s if timeout_s is None else timeout_s
        try:
            status, answer = await within(self.http.infer(model.name, arrays), max(0.001, timeout_s))
        except asyncio.TimeoutError:
            return 504, self.late(model)
        except OSError as e:  # refused or reset: tritonserver is stopping or died
            return 503, self.unavailable(model, first_line(e) or type(e).__name__)
        if status == 200:
            return answer
        message = _triton_message(answer)
        if status == 503 and "timeout" in message.lower():
            return 504, self.late(model)
        if status in (404, 499, 503):  # tritonserver no longer has the model loaded (it unloads in its shutdown)
            return 503, self.unavailable(model, message)
        return (400 if status == 400 else 500), message

    def classify(self, model: ServedModel, e) -> tuple[Any, str]:
        """``(gRPC status, message)`` with which both ports answer tritonserver's refusal ``e``: a deadline
        (the front's, or the shared backbone's timeout) is DEADLINE_EXCEEDED; NOT_FOUND is UNAVAILABLE (the
        front forwards only models it serves, so tritonserver no longer has this one loaded: it unloads
        models in its shutdown, or a model's stub died); the rest as tritonserver said, its notes left out."""
        import grpc

        code, message = e.code(), _triton_message(e.details() or "")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED or (code == grpc.StatusCode.UNAVAILABLE
                                                         and "timeout" in message.lower()):
            return grpc.StatusCode.DEADLINE_EXCEEDED, self.late(model)
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED):
            code, message = (grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.NOT_FOUND else code,
                             self.unavailable(model, message))
        return code, message

    @staticmethod
    def unavailable(model: ServedModel, why: str) -> str:
        return f"model {model.name!r} is not available: {why}"

    def late(self, model: ServedModel) -> str:
        return f"model {model.name!r}: not answered within {self.limits.request_timeout_s * 1000:.0f} ms " \
               "(--request-timeout-ms)"

    async def ready(self, model: Optional[str] = None) -> bool:
        """Ready: warm, not draining, ``tritonserver`` ready (and ``model`` one of the served)."""
        return (model is None or model in self.models) and self.warm and not self.draining \
            and await self.triton_ready()

    def admit(self, model: ServedModel) -> Optional[str]:
        """Take a place for a request of ``model`` (:meth:`release` gives it back), or the refusal: the model
        holds ``--max-queue`` waiting requests beyond those its instances run."""
        if self.held[model.name] >= self.limits.admitted(model.name):
            return (f"model {model.name!r}: queue full ({self.limits.max_queue[model.name]} requests waiting, "
                    "--max-queue); retry later")
        self.held[model.name] += 1
        return None

    def release(self, model: ServedModel) -> None:
        self.held[model.name] -= 1

    def accept(self) -> None:
        """A request accepted (answered before the drain may end: :meth:`answered`)."""
        self.in_flight += 1
        self._answered.clear()

    def answered(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._answered.set()

    async def wait_answered(self, timeout_s: float) -> int:
        """Wait until every accepted request is answered, at most ``timeout_s``; returns how many are not."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._answered.wait(), timeout_s)
        return self.in_flight

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        self.accept()
        try:
            await self._handle(scope, receive, send)
        finally:
            self.answered()

    async def _handle(self, scope, receive, send) -> None:
        path, method = scope["path"].rstrip("/"), scope["method"]
        if self.draining:
            return await _send(send, 503, error_body("the server is shutting down"), close=True)
        if path == "/v2/health/live":  # health first: a load balancer's probe is answered however busy
            return await _send(send, 200, b"")
        if path == "/v2/health/ready":
            ready = await self.ready()
            return await _send(send, 200 if ready else 503, b"" if ready else error_body("not ready"))
        if self.in_flight > self.limits.max_in_flight:  # counts this one
            return await _send(send, 503, error_body(f"busy: {self.in_flight - 1} requests in progress; retry later"),
                                close=True)
        if path == "/v2":
            return await _send(send, 200, json.dumps({"name": PLATFORM, "version": __version__,
                                                      "extensions": ["binary_tensor_data"]}).encode())
        match = _MODEL_PATH.fullmatch(path)
        if not match:
            return await _send(send, 404, error_body(f"no endpoint {path[:100]}"))
        name, action = match.groups()
        model = self.models.get(name)
        if model is None:
            return await _send(send, 404, error_body(f"unknown model {name[:100]!r}; served: {sorted(self.models)}"))
        if action is None:
            return await _send(send, 200, self.metadata[name])
        if action == "/ready":
            ready = await self.ready(name)
            return await _send(send, 200 if ready else 503, b"" if ready else error_body(f"{name} is not ready"))
        if method != "POST":
            return await _send(send, 405, error_body("infer takes POST"))
        if refusal := self.admit(model):  # at once, before the body is read
            return await _send(send, 503, error_body(refusal), close=True)
        deadline = asyncio.get_running_loop().time() + self.limits.request_timeout_s  # from arrival to answer
        try:
            # the requests whose headers came in with this one are admitted or refused before this body is
            # decoded (a burst's refusals do not wait behind the decoding of the admitted requests' bodies)
            await asyncio.sleep(0)
            await self._infer(model, scope, receive, send, deadline)
        finally:
            self.release(model)

    async def _infer(self, model: ServedModel, scope, receive, send, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        headers = dict((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
        try:
            size = check_content_length(headers.get("content-length"), self.limits.max_request_bytes)
        except ProtocolError as e:
            return await _send(send, http_status(e), error_body(str(e)))
        # memory stays flat under overload: the bodies being read at once share a budget
        reserved = self.limits.max_request_bytes if size is None else size
        if self.body_bytes + reserved > self.limits.body_budget_bytes:
            return await _send(send, 503, error_body(f"busy: {self.body_bytes} bytes of request bodies are being "
                                                     "read; retry later"), close=True)
        self.body_bytes += reserved
        try:  # a body that does not arrive in time holds its place no longer than the deadline
            body = await within(read_body(asgi_chunks(receive), headers.get("content-length"),
                                          self.limits.max_request_bytes), max(0.0, deadline - loop.time()))
            arrays, binary = decode_request(model, body, headers.get(HEADER_LENGTH))
        except ProtocolError as e:
            return await _send(send, http_status(e), error_body(str(e)))
        except asyncio.TimeoutError:
            return await _send(send, 504, error_body(self.late(model)), close=True)
        finally:
            self.body_bytes -= reserved
        outputs = await self.infer(model, arrays, max(0.001, deadline - loop.time()))
        if isinstance(outputs, tuple):
            status, message = outputs
            return await _send(send, status, error_body(message), close=status == 503)
        body, extra = encode_response(model, outputs, binary)
        await _send(send, 200, body, extra)


class GrpcFront:
    """The public gRPC port: the core of Triton's ``GRPCInferenceService`` (health, metadata, ``ModelInfer``)
    answered with the :class:`Front`'s admission, drain and deadline, each infer forwarded to ``tritonserver``
    as it came (bytes in, bytes out: tritonserver's protobuf decoder checks the tensors and refuses lying
    shapes with INVALID_ARGUMENT). A full queue or a drain is UNAVAILABLE at once, a request past
    ``--request-timeout-ms`` DEADLINE_EXCEEDED; the other methods (model config with its parameters,
    statistics, repository, shared memory, trace, logging, streaming) are UNIMPLEMENTED."""

    def __init__(self, front: Front):
        self.front = front
        self.server = None

    async def start(self, host: str, port: int) -> None:
        import grpc

        size = self.front.limits.max_request_bytes + 2 ** 20
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", size),
                                               ("grpc.max_send_message_length", size)])
        handlers = {"ServerLive": self._live, "ServerReady": self._ready, "ModelReady": self._model_ready,
                    "ServerMetadata": self._server_metadata, "ModelMetadata": self._model_metadata,
                    "ModelInfer": self._infer}
        handlers.update({name: self._not_public(name) for name in NOT_PUBLIC})
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(GRPC_SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in handlers.items()}),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self.server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            raise ServeError(f"cannot listen on {address} (gRPC): another server holds the port? pick another with "
                             "--grpc-port")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop(grace=1.0)

    def _call(self, method: str):
        """A unary call of tritonserver's ``method`` taking and giving serialized messages."""
        return self.front.channel.unary_unary(f"/{GRPC_SERVICE}/{method}")

    async def _live(self, raw: bytes, context) -> bytes:
        from tritonclient.grpc import service_pb2

        return service_pb2.ServerLiveResponse(live=True).SerializeToString()

    async def _ready(self, raw: bytes, context) -> bytes:
        from tritonclient.grpc import service_pb2

        ready = await self.front.ready()
        return service_pb2.ServerReadyResponse(ready=ready).SerializeToString()

    async def _model_ready(self, raw: bytes, context) -> bytes:
        from tritonclient.grpc import service_pb2

        name = (await _parse(context, service_pb2.ModelReadyRequest, raw)).name
        ready = await self.front.ready(name)
        return service_pb2.ModelReadyResponse(ready=ready).SerializeToString()

    async def _server_metadata(self, raw: bytes, context) -> bytes:
        from tritonclient.grpc import service_pb2

        return service_pb2.ServerMetadataResponse(name=PLATFORM, version=__version__,
                                                  extensions=["binary_tensor_data"]).SerializeToString()

    async def _model_metadata(self, raw: bytes, context) -> bytes:
        """What the HTTP port answers (:func:`oip.model_metadata`), as a protobuf."""
        import grpc
        from tritonclient.grpc import service_pb2

        name = (await _parse(context, service_pb2.ModelMetadataRequest, raw)).name
        if name not in self.front.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name[:100]!r}; served: "
                                f"{sorted(self.front.models)}")
        meta = model_metadata(self.front.models[name], PLATFORM)
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]],
        ).SerializeToString()

    def _not_public(self, method: str):
        async def handler(raw: bytes, context) -> bytes:
            import grpc

            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not public on this server (stvfm-engine "
                                "serves the core of the inference protocol: health, metadata, ModelInfer)")
        return handler

    async def _infer(self, raw: bytes, context) -> bytes:
        import grpc
        from tritonclient.grpc import service_pb2

        front = self.front
        if front.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        name = (await _parse(context, service_pb2.ModelInferRequest, raw)).model_name
        model = front.models.get(name)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name[:100]!r}; served: "
                                f"{sorted(front.models)}")
        if not front.started:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"model {name!r} is not ready")
        if refusal := front.admit(model):
            await context.abort(grpc.StatusCode.UNAVAILABLE, refusal)
        front.accept()
        try:
            return await self._call("ModelInfer")(raw, timeout=front.limits.request_timeout_s,
                                                  metadata=front.call_metadata)
        except grpc.aio.AioRpcError as e:
            await context.abort(*front.classify(model, e))
        finally:
            front.release(model)
            front.answered()


async def within(awaitable, timeout_s: float):
    """``await awaitable``, cancelled after ``timeout_s`` (``asyncio.TimeoutError``). From Python 3.11 it runs in
    the caller's task (``asyncio.timeout``): ``asyncio.wait_for`` wraps it in a task of its own, two more trips
    through the event loop per call, on the path of every request."""
    if _timeout is None:
        return await asyncio.wait_for(awaitable, timeout_s)
    async with _timeout(timeout_s):
        return await awaitable


_timeout = getattr(asyncio, "timeout", None)  # Python 3.11


def _triton_message(text: str) -> str:
    """tritonserver's error message without its request id and its notes."""
    return _REQUEST_ID.sub("", text).split(" NOTE: ")[0]


async def _parse(context, message_class, raw: bytes):
    """A request message of the public gRPC port; not one: INVALID_ARGUMENT."""
    import grpc
    from google.protobuf.message import DecodeError

    try:
        return message_class.FromString(raw)
    except DecodeError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a {message_class.__name__} ({e})")


async def _send(send, status: int, body: bytes, headers: Optional[dict[str, str]] = None, close: bool = False) -> None:
    head = [(b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {"content-type": "application/json"}).items()]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def http_server(app, listener: socket.socket):
    """A uvicorn server of ``app`` on the bound ``listener`` that leaves SIGTERM/SIGINT to its caller (who
    drains first). No ``limit_concurrency``: uvicorn counts open connections against it, so a burst of
    connections would be refused whole; :class:`Front` bounds the requests in progress instead."""
    try:
        import uvicorn
    except ImportError:
        raise ServeError("serve needs uvicorn for its HTTP front: pip install 'stvfm-engine[serve]'") from None

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # serve drains on SIGTERM/SIGINT, then sets should_exit
            yield

        async def shutdown(self, sockets=None):
            """Stop accepting, then give the connections already accepted (each carries at most one request:
            every answer of a drain closes its connection) up to :data:`LINGER_S` to deliver it and have it
            answered (503), before uvicorn closes the rest: a request on its way is refused, not reset."""
            for server in self.servers:
                server.close()
            for sock in sockets or []:
                sock.close()
            deadline = asyncio.get_running_loop().time() + LINGER_S
            while self.server_state.connections and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            await super().shutdown()

    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, server_header=False,
                            timeout_graceful_shutdown=2, timeout_keep_alive=5)
    return Server(config)

"""The client side of the Open Inference Protocol, shared by the Python client (:mod:`stvfm_engine.client`)
and the load tests (:mod:`stvfm_engine.bench.load`): server URLs, ``tritonclient`` connections and
requests (HTTP or gRPC, binary tensors), and keep-alive JSON-body requests. Ground floor: it imports no
layer of the project, so every layer may use it."""
from __future__ import annotations

import http.client
import ipaddress
import json
import socket
from urllib.parse import urlsplit

import numpy as np

from stvfm_engine.errors import LoadError


def parse_url(url: str) -> tuple[str, str]:
    """``(protocol, "host:port")`` of ``http://host:port``, ``grpc://host:port`` or ``host:port`` (HTTP)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "grpc") or not parts.hostname or not parts.port or parts.path not in ("", "/"):
        raise LoadError(f"expected a server URL http://HOST:PORT or grpc://HOST:PORT, got {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{parts.port}"


def check_loopback(url: str) -> None:
    """The load test drives servers on this machine only."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise LoadError(f"cannot resolve {host!r} ({e})") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise LoadError(f"the load test drives servers on this machine only (127.0.0.1, ::1, localhost); got {host!r}")


def connect(url: str, timeout_s: float = 60.0):
    """``(tritonclient module, client)`` for ``url``; an HTTP client times out after ``timeout_s``
    (a gRPC call takes ``client_timeout``, see :func:`infer`)."""
    protocol, address = parse_url(url)
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module

            return module, module.InferenceServerClient(address)
        import tritonclient.http as module

        return module, module.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)
    except ImportError:
        raise LoadError("talking to a server needs tritonclient: pip install 'stvfm-engine[serve]'") from None


def infer_inputs(module, arrays: dict[str, np.ndarray]) -> list:
    """``tritonclient`` inputs for ``{name: array}`` (float32 -> FP32, int64 -> INT64)."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer(module, client, model: str, inputs: list, timeout_s: float):
    """One request; raises ``InferenceServerException`` with the server's message on an error answer."""
    if module.__name__.endswith("grpc"):
        return client.infer(model, inputs, client_timeout=timeout_s)
    return client.infer(model, inputs)


class JsonClient:
    """One keep-alive HTTP/1.1 connection sending Open Inference Protocol JSON bodies (``bench --url --body json``,
    the fault bench); reconnects after a server's ``Connection: close`` or a failed request. ``post`` returns
    ``(status, body bytes)`` and raises ``OSError`` (or ``http.client.HTTPException``) when no answer came.

    The request goes out in one ``sendall`` and the answer is parsed by llhttp (``httptools``, which uvicorn
    uses too): about 0.3 ms less per request than ``http.client`` on a 2-core Zen 3, time that a load test
    would otherwise count as the server's (without ``httptools``: ``http.client``)."""

    def __init__(self, address: str, timeout_s: float = 60.0):
        host, port = address.rsplit(":", 1)
        self.host, self.port, self.timeout_s = host.strip("[]"), int(port), timeout_s
        self.sock: socket.socket | None = None
        try:
            import httptools
        except ImportError:
            httptools = None
        self._httptools = httptools
        self.conn = None if httptools else http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)

    def connect(self) -> None:
        """Open the connection now (a request opens it otherwise)."""
        if self.conn is not None:
            return self.conn.connect()
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.conn is not None:
            return self._post_http_client(path, body)
        try:
            self.connect()
            self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json"
                              f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            answer = _Answer()
            parser = self._httptools.HttpResponseParser(answer)
            while not answer.complete:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise http.client.RemoteDisconnected("the server closed the connection without an answer")
                parser.feed_data(data)
        except (OSError, http.client.HTTPException, self._httptools.HttpParserError) as e:
            self.close()  # the next request opens a new connection
            if isinstance(e, self._httptools.HttpParserError):
                raise http.client.HTTPException(f"not an HTTP answer: {e}") from None
            raise
        if answer.close or not parser.should_keep_alive():
            self.close()
        return parser.get_status_code(), b"".join(answer.body)

    def _post_http_client(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            self.conn.request("POST", path, body, {"content-type": "application/json"})
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # the next request opens a new connection
            raise
        if response.getheader("connection", "").lower() == "close":
            self.conn.close()
        return response.status, data

    def close(self) -> None:
        if self.conn is not None:
            return self.conn.close()
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _Answer:
    """What an ``httptools`` response parser reports (its callbacks)."""

    def __init__(self):
        self.body: list[bytes] = []
        self.complete = False
        self.close = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"connection" and value.lower() == b"close":
            self.close = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


def json_body(arrays: dict[str, np.ndarray]) -> bytes:
    """A v2 infer request with every input as JSON data (float32 -> FP32, int64 -> INT64)."""
    names = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    return json.dumps({"inputs": [{"name": k, "datatype": names[v.dtype], "shape": list(v.shape),
                                   "data": v.ravel().tolist()} for k, v in arrays.items()]}).encode()


def json_output(body: bytes) -> np.ndarray:
    """The first output of a v2 JSON infer response, as float32 of its shape: client time that a load test
    would otherwise count as the server's, so parsed by simdjson straight into an array where it is
    installed (0.04 ms for a 1200-value forecast on a 2-core Zen 3), else orjson (0.08 ms), else json."""
    if _simdjson is not None:
        try:
            out = _simdjson.Parser().parse(body)["outputs"][0]
            data = out["data"]
            values = np.frombuffer(data.as_buffer(of_type="d"), np.float64)
            if len(data) == values.size:  # as_buffer flattens nested lists: those go to the general parse
                return values.astype(np.float32).reshape(out["shape"].as_list())
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError):
            pass  # not that shape of answer (nested data, no outputs, not JSON): the general parse says why
    out = _json_loads(body)["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


try:
    from orjson import loads as _json_loads
except ImportError:  # the serve and ray extras install it; a bare install parses with json
    _json_loads = json.loads
try:
    import simdjson as _simdjson
except ImportError:
    _simdjson = None

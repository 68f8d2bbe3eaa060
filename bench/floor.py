"""The serving floor of ``bench --url --floor``: a plain app of a server kind that decodes an Open Inference
Protocol JSON infer body and answers a ``y``-sized array, with no model, run alone in its own process:

    python -m stvfm_engine.bench.floor '{"kind": "ray" | "asgi", "port": P, "y": [T_out, C, H, W]}'

``ray``: one Ray Serve deployment at ``/`` (the HTTP ingress itself, ``max_ongoing_requests`` 256) on a
private Ray instance; ``asgi``: a plain ASGI app on uvicorn. Both bind 127.0.0.1 and stop on SIGTERM.
"""
from __future__ import annotations

import json
import signal
import socket
import sys
import threading

import numpy as np

KINDS = {"ray": "a plain Ray Serve deployment (HTTP ingress, max_ongoing_requests 256)",
         "asgi": "a plain ASGI app on uvicorn"}
_DTYPES = {"FP32": np.float32, "INT64": np.int64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answer(body: bytes, y_shape: list[int]) -> bytes:
    """Decode the request as a server would (JSON, then arrays of its shapes) and answer zeros of
    ``[B, *y_shape]``, B the first input's batch."""
    request = json.loads(body)
    arrays = [np.asarray(t["data"], dtype=_DTYPES[t["datatype"]]).reshape(t["shape"]) for t in request["inputs"]]
    y = np.zeros((arrays[0].shape[0], *y_shape), np.float32)
    return json.dumps({"model_name": "floor", "model_version": "1", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}]}).encode()


def _asgi(y_shape: list[int]):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        parts, more = [], True
        while more:
            message = await receive()
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = answer(b"".join(parts), y_shape) if scope["method"] == "POST" else b"{}"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


def run_asgi(port: int, y_shape: list[int]) -> None:
    import uvicorn

    uvicorn.run(_asgi(y_shape), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def run_ray(port: int, y_shape: list[int]) -> None:
    import logging

    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    class Plain:
        async def __call__(self, request: Request) -> Response:
            if request.method != "POST":
                return Response(b"{}", media_type="application/json")
            return Response(answer(await request.body(), y_shape), media_type="application/json")

    stop = threading.Event()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, _node_ip_address="127.0.0.1")
    for s in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(s, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        serve.run(serve.deployment(Plain, name="plain").options(max_ongoing_requests=256).bind(),
                  name="floor", route_prefix="/")
        stop.wait()
    finally:
        ray.shutdown()


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    {"ray": run_ray, "asgi": run_asgi}[spec["kind"]](int(spec["port"]), [int(d) for d in spec["y"]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

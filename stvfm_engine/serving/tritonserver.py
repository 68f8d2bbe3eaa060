"""``stvfm-engine serve``: the Triton Inference Server binary bundled with nvidia-pytriton, run as a child
process on a temporary repository of Python-backend models (README "Serving" says why not PyTriton's API)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import gc
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from stvfm_engine.errors import ServeError
from stvfm_engine.serving.lifecycle import (
    STOP_SIGNALS,
    check_free,
    describe,
    listen,
    log,
    loopback,
)
from stvfm_engine.serving.models import ServedModel
from stvfm_engine.serving.tritonserver_repo import write_serving_repository

STOP_TIMEOUT_S = 9.0  # tritonserver's SIGTERM to exit, all its processes included, once nothing is in flight
PYTHON_ENVS = Path("/tmp/python_env_*")  # made by Triton's Python backend at start, whatever TMPDIR says
DRAIN_GRACE_S = 2.0  # a drain keeps answering refusals at least this long after the signal
WATCH_S = 0.2  # how often serve checks that tritonserver lives (it stops within 5 s of a death)
DEFAULT_QUEUE_PER_BATCH = 8  # --max-queue default: 8 x max batch per model
# Harmless lines of a CPU-only machine, shown only with --verbose
CPU_ONLY_NOISE = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML",
                  "Unable to allocate pinned system memory", "DCGM")


@dataclass(frozen=True)
class TritonOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_queue_delay_ms: float = 0.0
    instances: int = 1
    ready_timeout_s: float = 300.0
    verbose: bool = False
    max_queue: Optional[int] = None  # per model; None: DEFAULT_QUEUE_PER_BATCH x its max batch
    request_timeout_ms: float = 30000.0
    drain_timeout_s: float = 30.0
    max_request_mb: float = 64.0


@dataclass(frozen=True)
class Bundle:
    """The pieces of the nvidia-pytriton wheel that run a server."""

    binary: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub built for this Python version
    libs: Path
    version: str


def bundle() -> Bundle:
    try:
        import pytriton
        from pytriton.utils.distribution import get_libs_path, get_stub_path
    except ImportError:
        raise ServeError("serve needs nvidia-pytriton (the bundled Triton Inference Server): "
                         "pip install 'stvfm-engine[serve]'") from None
    from importlib.metadata import version

    root = Path(pytriton.__file__).parent / "tritonserver"
    found = Bundle(root / "bin" / "tritonserver", root / "backends" / "python",
                   get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"), get_libs_path(),
                   version("nvidia-pytriton"))
    for path in (found.binary, found.python_backend, found.stub):
        if not path.exists():
            raise ServeError(f"nvidia-pytriton {found.version} has no {path} (a Python "
                             f"{sys.version_info[0]}.{sys.version_info[1]} stub is needed)")
    return found


def server_env(libs: Path) -> dict[str, str]:
    """The server's environment. The Python-backend stub links ``libpython3.X.so``: this interpreter's
    own comes first on ``LD_LIBRARY_PATH``, or a distribution's libpython of another patch release is
    loaded against this standard library and model loading fails (``'_thread.RLock' object has no
    attribute '_recursion_count'``). ``PATH`` starts with this environment's ``bin`` so that the stub's
    interpreter finds this environment's site-packages (a venv's included)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.exec_prefix) / "bin"), env.get("PATH", "")))
    return env


def backend_directory(found: Bundle, root: Path) -> Path:
    """``root/python`` holding the Python backend and this interpreter's stub (where Triton looks for it)."""
    python = root / "python"
    python.mkdir(parents=True)
    for src in (found.python_backend / "libtriton_python.so", found.python_backend / "triton_python_backend_utils.py",
                found.stub):
        (python / src.name).symlink_to(src)
    return root


def _die_with_parent() -> None:
    """In the child: SIGTERM when the serving process dies, however it dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM)


class TritonProcess:
    """A running ``tritonserver`` in its own process group (its Python-backend stubs included)."""

    def __init__(self, found: Bundle, repository: Path, backends: Path, options: TritonOptions,
                 extra_args: Sequence[str] = (), grpc: Optional[tuple[str, int]] = None,
                 http: Optional[tuple[str, int]] = None):
        o = options
        grpc_host, grpc_port = grpc or (o.host, o.grpc_port)
        http_host, http_port = http or (o.host, o.http_port)
        args = [str(found.binary), f"--model-repository={repository}", f"--backend-directory={backends}",
                f"--http-address={http_host}", f"--http-port={http_port}",
                f"--grpc-address={grpc_host}", f"--grpc-port={grpc_port}",
                f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}",
                "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
                f"--exit-timeout-secs={math.ceil(o.drain_timeout_s) + 1}", f"--log-info={str(o.verbose).lower()}", *extra_args]
        self.verbose = o.verbose
        self._envs_before = set(PYTHON_ENVS.parent.glob(PYTHON_ENVS.name))
        self._started = time.time()
        self.errors: collections.deque[str] = collections.deque(maxlen=20)  # the last error lines, for died()
        self.proc = subprocess.Popen(args, env=server_env(found.libs), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._pump = threading.Thread(target=self._forward_output, name="tritonserver-log", daemon=True)
        self._pump.start()

    def _forward_output(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line[:1] == "E" or "error" in line.lower():
                self.errors.append(line)
            if self.verbose or not any(n in line for n in CPU_ONLY_NOISE):
                try:
                    print(line, file=sys.stderr, flush=True)
                except (OSError, ValueError):  # stderr gone (EPIPE): keep draining the pipe, or Triton blocks
                    pass

    def died(self) -> Optional[str]:
        code = self.proc.poll()
        if code is None:
            return None
        self._pump.join(timeout=2)
        last = next((e for e in reversed(self.errors) if not any(n in e for n in CPU_ONLY_NOISE)), "no error logged")
        return f"tritonserver exited with code {code}: {last.strip()[:300]}"

    def workers(self) -> dict[int, str]:
        """``{pid: model name}`` of the Python-backend stubs (one per model instance) now running."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and len(args) > 1 and args[0].endswith(b"triton_python_backend_stub"):
                out[int(entry.name)] = Path(args[1].decode("utf-8", "replace")).parents[1].name
        return out

    def remove_python_envs(self) -> None:
        """Remove the empty ``/tmp/python_env_*`` directory the Python backend made at start (a path it does
        not take from ``TMPDIR``): it removes it itself only when it exits gracefully. Those that appeared
        since this server started and are empty (another server's would only be empty too; rmdir only)."""
        for path in set(PYTHON_ENVS.parent.glob(PYTHON_ENVS.name)) - self._envs_before:
            try:
                if path.stat().st_mtime >= self._started - 1:
                    path.rmdir()
            except OSError:
                pass

    def terminate(self) -> None:
        """SIGTERM: Triton refuses new requests, finishes those it holds, unloads the models and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (Triton stops accepting, finishes in-flight requests, unloads the models), then SIGKILL
        for anything of its process group still alive after ``timeout_s``. Returns Triton's exit code."""
        deadline = time.monotonic() + timeout_s
        self.terminate()
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"tritonserver still running after {timeout_s:.0f} s: killing it")
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # the stubs exit once the server is gone
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        self._pump.join(timeout=2)
        return code


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet waited for by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True




def admission(models: Sequence[ServedModel], options: TritonOptions) -> tuple[dict[str, int], dict[str, int]]:
    """Per model: requests that may wait (``--max-queue``, default 8 x max batch) and requests that may run at
    once (max batch x instances: a batch of batch-1 requests on every instance)."""
    return ({m.name: options.max_queue or DEFAULT_QUEUE_PER_BATCH * m.max_batch for m in models},
            {m.name: m.max_batch * options.instances for m in models})


def serve_triton(models: Sequence[ServedModel], options: TritonOptions = TritonOptions()) -> int:
    """Serve ``models`` until SIGTERM/SIGINT, then drain: 0 when every accepted request was answered and
    every process exited cleanly, 3 when ``drain_timeout_s`` left requests unanswered, 1 when
    ``tritonserver`` exited non-zero. A port already held, or ``tritonserver`` dying, is a
    :class:`ServeError` (exit 2)."""
    found = bundle()
    from stvfm_engine.serving.front import Front, Limits

    listener = listen(options.host, options.http_port)  # before anything starts: a held port is exit 2 here
    try:
        check_free(options.host, (options.grpc_port, options.metrics_port))
        private = free_loopback_ports(2)  # tritonserver's gRPC and HTTP: loopback, locked
        waiting, running = admission(models, options)
        limits = Limits(int(options.max_request_mb * 2 ** 20), options.request_timeout_ms / 1000, waiting, running)
        with tempfile.TemporaryDirectory(prefix="stvfm-serve-") as tmp:
            # no queue policy in tritonserver: any makes its dynamic batcher (2.51) wait for a free instance in a
            # way that misses the wake-up now and then, holding a request its full 500 ms idle wait; the front
            # admits requests (--max-queue) and enforces their deadline instead
            repository = write_serving_repository(models, Path(tmp) / "models", int(options.max_queue_delay_ms * 1000),
                                                  options.instances, backbone_timeout_us=int(options.request_timeout_ms * 1000))
            backends = backend_directory(found, Path(tmp) / "backends")
            front = Front(models, f"127.0.0.1:{private[0]}", limits, token=secrets.token_hex(16), http_port=private[1])
            return run_loop(_serve(models, options, found, repository, backends, front, listener, private))
    finally:
        listener.close()


def free_loopback_ports(n: int) -> tuple[int, ...]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (for a child that binds them itself; should another
    process take one first, tritonserver fails to start, or answers nobody without the secret header)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in socks)


def run_loop(coro):
    """Run the front's event loop: uvloop where installed (as ``uvicorn.run`` chooses it, so the front runs on
    what the bench's plain ASGI floor app runs on), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _serve(models, options: TritonOptions, found: Bundle, repository: Path, backends: Path, front,
                 listener, private: tuple[int, int]) -> int:
    from stvfm_engine.serving.front import LOCKED_HEADER, GrpcFront, http_server

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[str] = []
    def on_signal(sig: signal.Signals) -> None:
        front.draining = True  # readiness false, new requests 503, at once
        signals.append(sig.name)
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    # tritonserver's HTTP and gRPC endpoints listen on loopback ports of their own, every API of both wanting a
    # header value that only the front knows (refused before a body is parsed): the public ports are the front's
    extra = [f"--http-restricted-api={','.join(PROTOCOLS)}:{LOCKED_HEADER}={front.token}",
             f"--grpc-restricted-protocol={','.join(PROTOCOLS)}:{LOCKED_HEADER}={front.token}"]
    log(f"starting Triton Inference Server (nvidia-pytriton {found.version}) with {describe(list(models))}")
    server = TritonProcess(found, repository, backends, options, extra, grpc=("127.0.0.1", private[0]),
                           http=("127.0.0.1", private[1]))
    web = None
    grpc_front = GrpcFront(front)
    try:
        await front.connect()
        await grpc_front.start(options.host, options.grpc_port)  # a held port: one line, exit 2, before ready
        if not await _until(front.triton_ready, stop, server, options.ready_timeout_s, "tritonserver ready"):
            return 0
        await _warm_up(front, models, stop, server)
        if stop.is_set():
            return 0
        web = http_server(front, listener)
        serving = asyncio.create_task(web.serve(sockets=[listener]))
        while not web.started:  # uvicorn loaded and answering before anything says ready
            if serving.done():
                raise ServeError(f"the HTTP front did not start: {serving.exception() or 'no error'}")
            await asyncio.sleep(0.01)
        # what startup left (torch, onnxruntime, the engine opened to check it) moves out of the collector's
        # reach: a full collection over it during a burst of requests would stall the front ~0.1 s
        gc.collect()
        gc.freeze()
        front.warm = front.started = True
        host = loopback(options.host)
        log(f"ready: HTTP http://{host}:{options.http_port}, gRPC {host}:{options.grpc_port}, metrics "
            f"http://{host}:{options.metrics_port}/metrics; models: {', '.join(m.name for m in models)}")
        workers = server.workers()  # every model's (and backbone's) worker, warm
        while not stop.is_set():
            if why := server.died():
                raise ServeError(why)
            if front.warm and (dead := sorted({name for pid, name in workers.items() if not _alive(pid)})):
                front.warm = False  # readiness false: a load balancer routes elsewhere; requests get 503s
                log(f"the worker of {', '.join(dead)} died: not ready any more (requests it serves are refused "
                    "with 503)")
            if serving.done():
                raise ServeError(f"the HTTP front stopped: {serving.exception() or 'no error'}")
            with _suppress_timeout():
                await asyncio.wait_for(stop.wait(), WATCH_S)
        log(f"{signals[0]}: draining: {front.in_flight} request(s) in flight; new ones are refused (HTTP 503, "
            "gRPC UNAVAILABLE)")
        started = time.monotonic()
        left = await front.wait_answered(options.drain_timeout_s)  # new requests: 503 / UNAVAILABLE meanwhile
        front.http.close()  # tritonserver's exit waits for open HTTP connections, idle keep-alive ones included
        server.terminate()  # nothing of ours is in tritonserver any more
        # the ports keep refusing (503 / UNAVAILABLE) for DRAIN_GRACE_S after the signal at least: a client or
        # load balancer with a request on its way gets a refusal, not a closed port
        grace = min(DRAIN_GRACE_S, options.drain_timeout_s)
        await asyncio.sleep(max(0.0, started + grace - time.monotonic()))
        web.should_exit = True
        await serving
        web = None
        await grpc_front.stop()
        # nothing of ours is in tritonserver: it gets STOP_TIMEOUT_S to exit (with a dead stub it waits for its
        # own exit timeout instead, --drain-timeout + 1 s), within what is left of the drain timeout
        code = await asyncio.to_thread(server.stop, max(1.0, min(STOP_TIMEOUT_S, started + options.drain_timeout_s
                                                                - time.monotonic())))
        if left:
            log(f"drain timeout ({options.drain_timeout_s:g} s, --drain-timeout) expired with {left} request(s) "
                "unanswered")
            return 3
        if code != 0:
            log(f"tritonserver exited with code {code}")
            return 1
        log(f"stopped: every accepted request answered ({time.monotonic() - started:.1f} s)")
        return 0
    finally:
        if web is not None:
            web.should_exit = web.force_exit = True
        await grpc_front.stop()
        await front.close()
        if server.proc.poll() is None:
            await asyncio.to_thread(server.stop)
        server.remove_python_envs()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


# every API of tritonserver's HTTP and gRPC endpoints: they answer the front only (its calls carry the header)
PROTOCOLS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository", "statistics",
             "trace", "logging")


async def _until(probe, stop: asyncio.Event, server: TritonProcess, timeout_s: float, what: str) -> bool:
    """Poll ``probe()`` until True (True), ``stop`` is set (False), ``tritonserver`` dies or ``timeout_s``
    passes (:class:`ServeError`)."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        if why := server.died():
            raise ServeError(why)
        if await probe():
            return True
        if time.monotonic() > deadline:
            raise ServeError(f"{what}: not within {timeout_s:.0f} s (--ready-timeout)")
        with _suppress_timeout():
            await asyncio.wait_for(stop.wait(), 0.25)
    return False


def _suppress_timeout():
    return contextlib.suppress(asyncio.TimeoutError)


async def _warm_up(front, models: Sequence[ServedModel], stop: asyncio.Event, server: TritonProcess) -> None:
    """Ready means warm: every model (and through it the shared backbone) runs a batch-1 and a max-batch
    request of zeros (valid inputs) before ``/v2/health/ready`` turns 200."""
    import numpy as np

    from stvfm_engine.serving.models import WARM_UP_STREAM

    for model in models:
        if model.streams is not None:  # an M_stream companion: its one warm-up request runs batch 1 and max batch
            answer = await front.infer(model, {"stream": np.array([[WARM_UP_STREAM]], dtype=object)})
            if isinstance(answer, tuple):
                raise ServeError(f"warm-up of model {model.name!r} failed: {answer[1]}")
            continue
        for batch in sorted({1, model.max_batch}):
            if stop.is_set():
                return
            if why := server.died():
                raise ServeError(why)
            arrays = {t["name"]: np.zeros((batch, *t["dims"]), np.float32 if t["datatype"] == "FP32" else np.int64)
                      for t in model.io()["inputs"]}
            answer = await front.infer(model, arrays)
            if isinstance(answer, tuple):
                raise ServeError(f"warm-up of model {model.name!r} (batch {batch}) failed: {answer[1]}")

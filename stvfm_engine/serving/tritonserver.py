"""``stvfm-engine serve``: the Triton Inference Server binary bundled with nvidia-pytriton, run as a child
process on a temporary repository of Python-backend models (README "Serving" says why not PyTriton's API)."""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import os
import signal
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
from stvfm_engine.serving.lifecycle import describe, log, loopback, stop_on_signals, wait_ready
from stvfm_engine.serving.models import ServedModel
from stvfm_engine.serving.triton_repo import write_serving_repository

STOP_TIMEOUT_S = 9.0  # SIGTERM/SIGINT to exit, all processes included (the promise is 10 s)
TRITON_EXIT_TIMEOUT_S = 6  # Triton's own wait for in-flight requests before it unloads the models
# Harmless lines of a CPU-only machine, shown only with --verbose
CPU_ONLY_NOISE = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML",
                  "Unable to allocate pinned system memory", "DCGM")


@dataclass(frozen=True)
class TritonOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_queue_delay_ms: float = 2.0
    instances: int = 1
    ready_timeout_s: float = 300.0
    verbose: bool = False


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

    def __init__(self, found: Bundle, repository: Path, backends: Path, options: TritonOptions):
        o = options
        args = [str(found.binary), f"--model-repository={repository}", f"--backend-directory={backends}",
                f"--http-address={o.host}", f"--http-port={o.http_port}",
                f"--grpc-address={o.host}", f"--grpc-port={o.grpc_port}",
                f"--metrics-address={o.host}", f"--metrics-port={o.metrics_port}",
                "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0",
                f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}", f"--log-info={str(o.verbose).lower()}"]
        self.verbose = o.verbose
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
                print(line, file=sys.stderr, flush=True)

    def died(self) -> Optional[str]:
        code = self.proc.poll()
        if code is None:
            return None
        self._pump.join(timeout=2)
        last = next((e for e in reversed(self.errors) if not any(n in e for n in CPU_ONLY_NOISE)), "no error logged")
        return f"tritonserver exited with code {code}: {last.strip()[:300]}"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (Triton stops accepting, finishes in-flight requests, unloads the models), then SIGKILL
        for anything of its process group still alive after ``timeout_s``. Returns Triton's exit code."""
        deadline = time.monotonic() + timeout_s
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
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


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def serve_triton(models: Sequence[ServedModel], options: TritonOptions = TritonOptions()) -> int:
    """Serve ``models`` until SIGTERM/SIGINT; then drain, stop every process and return 0."""
    found = bundle()
    host = loopback(options.host)
    with tempfile.TemporaryDirectory(prefix="stvfm-serve-") as tmp, stop_on_signals() as stop:
        repository = write_serving_repository(models, Path(tmp) / "models", int(options.max_queue_delay_ms * 1000),
                                              options.instances)
        backends = backend_directory(found, Path(tmp) / "backends")
        log(f"starting Triton Inference Server (nvidia-pytriton {found.version}) with {describe(list(models))}")
        server = TritonProcess(found, repository, backends, options)
        try:
            if wait_ready(f"http://{host}:{options.http_port}/v2/health/ready", stop, server.died,
                          options.ready_timeout_s):
                log(f"ready: HTTP http://{host}:{options.http_port}, gRPC {host}:{options.grpc_port}, "
                    f"metrics http://{host}:{options.metrics_port}/metrics; models: {', '.join(m.name for m in models)}")
            while not stop.wait(0.5):
                if why := server.died():
                    raise ServeError(why)
            log(f"{stop.signal_name}: draining in-flight requests, then stopping")
        finally:
            code = server.stop()
        log(f"stopped (tritonserver exit code {code})")
    return 0

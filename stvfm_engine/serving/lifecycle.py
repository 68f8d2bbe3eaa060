"""What every server command shares: stop on SIGTERM/SIGINT, wait for readiness over HTTP, and one
line per event on stderr."""
from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator, Optional, Sequence

from stvfm_engine.errors import ServeError
from stvfm_engine.serving.models import ServedModel

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def log(message: str) -> None:
    print(f"serve: {message}", file=sys.stderr, flush=True)


class StopRequest(threading.Event):
    """Set by SIGTERM/SIGINT; ``signal_name`` says which."""

    signal_name: Optional[str] = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGINT set the yielded event instead of killing the process."""
    stop = StopRequest()

    def handler(signum, frame):
        if not stop.is_set():
            stop.signal_name = signal.Signals(signum).name
            stop.set()

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def loopback(host: str) -> str:
    """Where this machine reaches a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host


def wait_ready(url: str, stop: threading.Event, alive: Callable[[], Optional[str]], timeout_s: float) -> bool:
    """Poll ``url`` (``/v2/health/ready``) until it answers 200: True; False if ``stop`` is set first.
    ``alive()`` returns None while the server runs, else why it died (raised as :class:`ServeError`)."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        if why := alive():
            raise ServeError(why)
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"the server was not ready within {timeout_s:.0f} s ({url})")
        stop.wait(0.25)
    return False


def describe(models: list[ServedModel]) -> str:
    return ", ".join(f"{m.name} ({m.backend} {m.precision}, max batch {m.max_batch})" for m in models)


def listen(host: str, port: int) -> socket.socket:
    """A TCP listener on ``host:port``, bound before anything else starts: a port another server holds is
    a one-line :class:`ServeError` (the CLI's exit 2) before anything says ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else each response whose headers and
    # body are written apart waits ~40 ms for the client's delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror} (another server holds the port? "
                         "pick another with --http-port/--grpc-port/--metrics-port)") from None
    sock.setblocking(False)
    return sock


def check_free(host: str, ports: Sequence[int]) -> None:
    """Each of ``ports`` can be listened on now (for the ports a child process binds itself)."""
    for port in ports:
        listen(host, port).close()

"""What every server command shares: stop on SIGTERM/SIGINT, wait for readiness over HTTP, and one
line per event on stderr."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator, Optional

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

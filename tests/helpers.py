"""Helpers shared by the tests: relative error, seeded random inputs, reference outputs, checkpoints.

Relative error is the product's own (:func:`stvfm_engine.export.parity.relative_error`), so a test
judges an output exactly as the build's parity gate does.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from stvfm_engine.engine.registry import get_backend
from stvfm_engine.export.parity import relative_error
from stvfm_engine.model.checkpoint import save_checkpoint
from stvfm_engine.model.config import STVFMConfig
from stvfm_engine.model.stvfm import build_model

__all__ = ["rel_err", "relative_error", "random_inputs", "reference_output", "write_checkpoint", "why_not_run",
           "one_error_line"]


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64, for numpy arrays or torch tensors (any device or dtype)."""
    as_np = (lambda t: t.detach().double().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
    return relative_error(as_np(a), as_np(b))


def random_inputs(model, batch: int, rng: np.random.Generator):
    """Raw-unit inputs around the model's normalisation (never zeros) and, where used, tod/dow."""
    c = model.config
    mean = model.norm_mean.numpy().reshape(1, 1, -1, 1, 1)
    std = model.norm_std.numpy().reshape(1, 1, -1, 1, 1)
    x = (mean + std * rng.standard_normal((batch, c.history, c.channels, c.height, c.width))).astype(np.float32)
    if not c.uses_time:
        return x, None, None
    return x, rng.integers(0, c.steps_per_day, (batch, c.history)), rng.integers(0, 7, (batch, c.history))


def reference_output(model, x, tod, dow) -> np.ndarray:
    """The fp32 reference model on numpy inputs."""
    as_t = [None if a is None else torch.from_numpy(a) for a in (x, tod, dow)]
    with torch.inference_mode():
        return model(*as_t).numpy()


def write_checkpoint(path, config: STVFMConfig, seed: int = 0, mean=None, std=None):
    """A random-weight checkpoint of ``config`` with a non-identity normalisation (``mean``/``std`` per channel)."""
    model = build_model(config, seed=seed)
    c = model.config.channels
    model.set_normalization(torch.linspace(3.0, 9.0, c) if mean is None else mean,
                            torch.linspace(2.0, 5.0, c) if std is None else std)
    save_checkpoint(model, path)
    return path


def why_not_run(backend: str, device: str) -> Optional[str]:
    """The registry's answer: None when ``backend`` runs on ``device`` here, else why not."""
    return get_backend(backend).why_not_run(device)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (bound to port 0 together, then released)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServerProcess:
    """``stvfm-engine ARGS`` (a server command) in a subprocess, its stderr kept in a file; every process
    it starts is found through /proc by parent pid, so a test can check by pid that none is left."""

    def __init__(self, args: list[str]):
        import subprocess
        import sys
        import tempfile

        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "stvfm_engine", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.family: list[int] = []

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def wait_ready(self, timeout_s: float) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        while "serve: ready" not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server not ready (exit code {self.proc.poll()}):\n{self.stderr()[-3000:]}")
            time.sleep(0.25)
        self.family = self.descendants()

    def descendants(self) -> list[int]:
        """This process and all its live descendants."""
        import os

        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    @staticmethod
    def alive(pids: list[int]) -> list[int]:
        """Those of ``pids`` that still run (zombies awaiting their parent's wait count as gone)."""
        out = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        out.append(pid)
            except OSError:
                pass
        return out

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait; whatever of the family is still there afterwards is killed (by pid)."""
        import os
        import signal
        import subprocess

        family = self.family or self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.leftovers = self.alive(family)
        for pid in self.leftovers:
            os.kill(pid, signal.SIGKILL)
        return code


def one_error_line(err: str, command: str) -> str:
    """The one line a failed CLI command writes on stderr (asserted to be exactly one, without a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stvfm-engine {command}: error: ") and "Traceback" not in err, err
    return lines[0]

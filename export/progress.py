"""Rich progress of a build on stderr: one line per finished stage with its time; stdout stays clean."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class BuildProgress:
    """``with BuildProgress(): with p.stage("aoti", "compile"): ...``; silent when not ``enabled``."""

    def __init__(self, enabled: bool = True):
        self.console = Console(stderr=True) if enabled else None
        self._progress = (Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                   console=self.console, transient=True) if enabled else None)

    def __enter__(self) -> "BuildProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextlib.contextmanager
    def stage(self, backend: str, what: str) -> Iterator[None]:
        if self._progress is None:
            yield
            return
        task = self._progress.add_task(f"[bold]{backend}[/]: {what}", total=None)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self._progress.remove_task(task)
            self.console.print(f"[red]x[/] [bold]{backend}[/]: {what} failed after {time.perf_counter() - t0:.1f} s")
            raise
        self._progress.remove_task(task)
        self.console.print(f"[green]ok[/] [bold]{backend}[/]: {what} ({time.perf_counter() - t0:.1f} s)")

    def note(self, message: str) -> None:
        if self.console is not None:
            self.console.print(f"   {message}", highlight=False)

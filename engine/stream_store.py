"""The durable store of forecast streams: each stream's binding (model, frame shape, time grid) and its
newest frames, in SQLite (a file: WAL, one transaction per batch of pushes, ``synchronous=FULL``) or
PostgreSQL (a ``postgresql://`` URL, through psycopg 3).

A push returns only after its transaction is committed. Several processes may push to one store: SQLite
serialises writers (``BEGIN IMMEDIATE``), PostgreSQL locks the stream's row (``SELECT ... FOR UPDATE``).
The store keeps a stream's frames inside its window (``window_us`` before the newest) and the newest one
before it (the anchor a gap filler at the window's start needs); older frames are deleted in the same
transaction. The rules about time (the grid, the calendar) are :mod:`~stvfm_engine.engine.streams`'; this
module only stores integers and bytes.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from stvfm_engine.errors import InputError, StoreError, first_line
from stvfm_engine.model.calendar import from_us, iso

FORMAT_VERSION = 1
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS stvfm_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stvfm_streams (name TEXT PRIMARY KEY, model TEXT NOT NULL, shape TEXT NOT NULL, "
    "grid_start BIGINT NOT NULL, interval_us BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stvfm_frames (stream TEXT NOT NULL, t BIGINT NOT NULL, data {blob} NOT NULL, "
    "PRIMARY KEY (stream, t))",
)
_READ_CHUNK = 500  # stream names per SELECT ... IN (...)


@dataclass(frozen=True)
class Binding:
    """What a stream is bound to when first pushed: a model, its frame shape ``[C, H, W]`` and its time grid
    (microseconds since the Unix epoch: step ``k`` at ``grid_start + k * interval_us``)."""

    model: str
    shape: tuple[int, int, int]
    grid_start: int
    interval_us: int


@dataclass(frozen=True)
class Push:
    """One frame to commit: ``data`` float32 bytes at ``t`` (microseconds since the epoch). ``window_us``: the
    span of the window before the newest frame (``(T - 1) * interval``)."""

    stream: str
    binding: Binding
    t: int
    data: bytes
    window_us: int
    replace: bool = False


@dataclass(frozen=True)
class Held:
    """A stream as stored: its binding and frames ``[(t, bytes), ...]`` oldest first (the anchor included)."""

    binding: Binding
    frames: list[tuple[int, bytes]]


class StreamStore:
    """SQL shared by both databases; a subclass opens the connection and says how to begin a transaction."""

    placeholder = "?"
    blob = "BLOB"
    _errors: Any = ()  # the driver's error classes, reported as StoreError

    def __init__(self, conn: Any, where: str):
        self._conn, self.where = conn, where
        self._lock = threading.Lock()  # one connection: one transaction at a time in this process
        with self._transaction() as cur:
            for sql in _SCHEMA:
                cur.execute(sql.format(blob=self.blob))
            cur.execute(self._q("INSERT INTO stvfm_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"),
                        ("format_version", str(FORMAT_VERSION)))
            cur.execute(self._q("SELECT value FROM stvfm_meta WHERE key = ?"), ("format_version",))
            found = cur.fetchone()[0]
        if found != str(FORMAT_VERSION):
            raise StoreError(f"{where}: stream store format_version {found}; this stvfm-engine reads {FORMAT_VERSION}")

    # ------------------------------------------------------------------ dialect
    def _q(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _begin(self, cur: Any, write: bool) -> None:
        raise NotImplementedError

    def _lock_stream(self, cur: Any, name: str) -> None:
        """Serialise writers of one stream (SQLite's BEGIN IMMEDIATE already serialises all)."""

    @contextlib.contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Any]:
        """One transaction: committed when the block ends, rolled back if it raises; a database error is a
        one-line :class:`StoreError` (the driver's errors are the subclass's ``_errors``)."""
        try:
            with self._one_transaction(write) as cur:
                yield cur
        except self._errors as e:
            raise StoreError(f"{self.where}: {first_line(e)}") from None

    @contextlib.contextmanager
    def _one_transaction(self, write: bool) -> Iterator[Any]:
        with self._lock:
            try:
                cur = self._conn.cursor()
                self._begin(cur, write)
            except Exception as e:
                raise StoreError(f"{self.where}: cannot start a transaction ({first_line(e)})") from None
            try:
                yield cur
            except BaseException:
                with contextlib.suppress(Exception):
                    self._conn.rollback()
                raise
            try:
                self._conn.commit()
            except Exception as e:
                with contextlib.suppress(Exception):
                    self._conn.rollback()
                raise StoreError(f"{self.where}: commit failed, nothing was stored ({first_line(e)})") from None

    # ------------------------------------------------------------------ operations
    def push_many(self, pushes: Sequence[Push]) -> list[int | Exception]:
        """Commit ``pushes`` in one transaction (each in a savepoint: a refused push changes nothing and the
        others still commit). Per push: the number of frames then in its window, or the refusal."""
        out: list[int | Exception] = []
        with self._transaction() as cur:
            for i, p in enumerate(pushes):
                cur.execute(f"SAVEPOINT p{i}")
                try:
                    out.append(self._push(cur, p))
                    cur.execute(f"RELEASE SAVEPOINT p{i}")
                except InputError as e:
                    cur.execute(f"ROLLBACK TO SAVEPOINT p{i}")
                    cur.execute(f"RELEASE SAVEPOINT p{i}")
                    out.append(e)
        return out

    def _push(self, cur: Any, p: Push) -> int:
        q, b = self._q, p.binding
        cur.execute(q("INSERT INTO stvfm_streams (name, model, shape, grid_start, interval_us) VALUES (?, ?, ?, ?, ?) "
                      "ON CONFLICT (name) DO NOTHING"),
                    (p.stream, b.model, _shape_text(b.shape), b.grid_start, b.interval_us))
        self._lock_stream(cur, p.stream)
        cur.execute(q("SELECT model, shape, grid_start, interval_us FROM stvfm_streams WHERE name = ?"), (p.stream,))
        held = _binding(cur.fetchone())
        check_binding(p.stream, held, b)
        cur.execute(q("SELECT MAX(t) FROM stvfm_frames WHERE stream = ?"), (p.stream,))
        newest = cur.fetchone()[0]
        if newest is not None and p.t < newest - p.window_us:
            raise InputError(f"stream {p.stream!r}: the frame at {_iso(p.t)} is older than the window held "
                             f"({_iso(newest - p.window_us)} to {_iso(newest)}); refused")
        cur.execute(q("SELECT data FROM stvfm_frames WHERE stream = ? AND t = ?"), (p.stream, p.t))
        row = cur.fetchone()
        if row is None:
            cur.execute(q("INSERT INTO stvfm_frames (stream, t, data) VALUES (?, ?, ?)"), (p.stream, p.t, p.data))
        elif bytes(row[0]) != p.data:
            if not p.replace:
                raise InputError(f"stream {p.stream!r} already holds a different frame at {_iso(p.t)}; "
                                 "pass replace=True to overwrite it")
            cur.execute(q("UPDATE stvfm_frames SET data = ? WHERE stream = ? AND t = ?"), (p.data, p.stream, p.t))
        newest = p.t if newest is None else max(newest, p.t)
        start = newest - p.window_us
        cur.execute(q("DELETE FROM stvfm_frames WHERE stream = ? AND t < (SELECT MAX(t) FROM stvfm_frames "
                      "WHERE stream = ? AND t < ?)"), (p.stream, p.stream, start))
        cur.execute(q("SELECT COUNT(*) FROM stvfm_frames WHERE stream = ? AND t >= ?"), (p.stream, start))
        return int(cur.fetchone()[0])

    def binding(self, stream: str) -> Optional[Binding]:
        """What ``stream`` is bound to (None: never pushed)."""
        with self._transaction(write=False) as cur:
            cur.execute(self._q("SELECT model, shape, grid_start, interval_us FROM stvfm_streams WHERE name = ?"),
                        (stream,))
            row = cur.fetchone()
        return None if row is None else _binding(row)

    def read(self, streams: Sequence[str]) -> dict[str, Held]:
        """The stored frames of ``streams`` (those never pushed are absent), read in one transaction."""
        names = list(dict.fromkeys(streams))
        out: dict[str, Held] = {}
        with self._transaction(write=False) as cur:
            for s in range(0, len(names), _READ_CHUNK):
                chunk = names[s:s + _READ_CHUNK]
                marks = ", ".join("?" * len(chunk))
                cur.execute(self._q(f"SELECT name, model, shape, grid_start, interval_us FROM stvfm_streams "
                                    f"WHERE name IN ({marks})"), chunk)
                for name, *row in cur.fetchall():
                    out[name] = Held(_binding(row), [])
                cur.execute(self._q(f"SELECT stream, t, data FROM stvfm_frames WHERE stream IN ({marks}) "
                                    "ORDER BY stream, t"), chunk)
                for name, t, data in cur.fetchall():
                    if name in out:
                        out[name].frames.append((int(t), bytes(data)))
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SQLiteStore(StreamStore):
    """A SQLite file in WAL mode; every commit is synced (``synchronous=FULL``) before a push returns."""

    _errors = sqlite3.Error

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.parent.is_dir():
            raise StoreError(f"stream store {str(path)!r}: the directory {str(path.parent)!r} does not exist")
        try:
            conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            raise StoreError(f"stream store {str(path)!r}: not a SQLite database it can open ({first_line(e)})") from None
        super().__init__(conn, str(path))

    def _begin(self, cur: Any, write: bool) -> None:
        # a writer takes the write lock now (read-check-write needs no retry); a reader reads one snapshot
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")


class PostgresStore(StreamStore):
    """A PostgreSQL database (``postgresql://user@host:port/db``) through psycopg 3."""

    placeholder = "%s"
    blob = "BYTEA"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise StoreError("a postgresql:// stream store needs psycopg 3: pip install 'stvfm-engine[streams]'") from None
        self._errors = psycopg.Error
        where = _redact(url)
        try:
            conn = psycopg.connect(url, connect_timeout=10)
        except psycopg.Error as e:
            raise StoreError(f"stream store {where}: cannot connect ({first_line(e)})") from None
        super().__init__(conn, where)

    def _begin(self, cur: Any, write: bool) -> None:
        # psycopg opens a transaction at the first statement (autocommit off); a reader sees one snapshot
        if not write:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")

    def _lock_stream(self, cur: Any, name: str) -> None:
        cur.execute("SELECT name FROM stvfm_streams WHERE name = %s FOR UPDATE", (name,))



def open_store(store: str | os.PathLike | StreamStore) -> StreamStore:
    """A :class:`StreamStore`: one given, a ``postgresql://`` URL, or the path of a SQLite file."""
    if isinstance(store, StreamStore):
        return store
    if isinstance(store, str) and store.startswith(("postgresql://", "postgres://")):
        return PostgresStore(store)
    if not isinstance(store, (str, os.PathLike)) or str(store) == "":
        raise StoreError(f"stream store: expected a SQLite file path or a postgresql:// URL, got {store!r}")
    return SQLiteStore(store)


def check_binding(stream: str, held: Binding, wanted: Binding) -> None:
    """A stream keeps the model, frame shape and time grid it was first pushed with."""
    if held.model != wanted.model:
        raise InputError(f"stream {stream!r} is bound to model {held.model!r}; got model {wanted.model!r}")
    if held.shape != wanted.shape:
        raise InputError(f"stream {stream!r} holds frames {list(held.shape)}; this model takes {list(wanted.shape)}")
    if (held.grid_start - wanted.grid_start) % wanted.interval_us or held.interval_us != wanted.interval_us:
        raise InputError(f"stream {stream!r} was pushed on a {held.interval_us / 1e6:g} s grid from "
                         f"{_iso(held.grid_start)}; this model's calendar steps {wanted.interval_us / 1e6:g} s from "
                         f"{_iso(wanted.grid_start)}")


def _binding(row: Sequence[Any]) -> Binding:
    model, shape, start, interval = row
    return Binding(model, tuple(int(v) for v in shape.split(",")), int(start), int(interval))  # type: ignore[arg-type]


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in shape)


def _iso(us: int) -> str:
    return iso(from_us(us))


def _redact(url: str) -> str:
    """``url`` without its password (for error messages)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))

"""The build cache: artifacts stored by the content they were built from, so that a rebuild after
retraining a model (or adding one) skips the exports whose inputs did not change.

An entry is ``ROOT/<key[:2]>/<key>/``: the artifact's files and ``entry.json`` (what the key was made
of, each file's sha256 and size). Each file is written atomically (temp + rename) and ``entry.json``
last, so an entry counts only once it is complete. Every file is hash-checked after it is copied out:
an entry that does not match (corrupt, truncated, edited) is deleted and rebuilt, never used. A record
entry holds only ``entry.json`` with a JSON record: the parity gate a set of artifacts (named by their
sha256) passed against a reference model (named by its weights' digest).

The cache is trusted like the machine that builds: the hashes catch corruption, not someone who can
write to the cache directory (as ``manifest.json``'s hashes do for an engine directory).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from stvfm_engine.atomic import atomic_path
from stvfm_engine.engine.manifest import file_record, sha256_file

ENTRY_NAME = "entry.json"
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stvfm-engine``, else ``~/.cache/stvfm-engine``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stvfm-engine"


def tensors_digest(tensors: dict[str, torch.Tensor], *about: Any) -> str:
    """sha256 over ``about`` (JSON) and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(json.dumps(about, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """The key of an artifact: sha256 of everything it was built from (``parts``, JSON-able)."""
    return hashlib.sha256(json.dumps({"cache_format": CACHE_FORMAT, **parts}, sort_keys=True).encode()).hexdigest()


class BuildCache:
    """Content-addressed artifacts under ``root``: :meth:`fetch` copies an entry's files out, :meth:`store` adds one."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _entry(self, key: str) -> Path:
        return self.root / key[:2] / key

    def fetch(self, key: str, dest: Path) -> tuple[Optional[dict[str, Path]], str]:
        """Copy entry ``key``'s files into ``dest``: ``({role: path}, "hit")``, or ``(None, "miss")``, or, for
        an entry that fails its check (deleted, with whatever it copied), ``(None, "corrupt")``."""
        entry = self._entry(key)
        try:
            record = json.loads((entry / ENTRY_NAME).read_text())
        except FileNotFoundError:
            return None, "miss"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        sound = isinstance(record, dict) and record.get("key") == key
        files = record.get("files") if sound else None
        roles = record.get("roles") if sound else None
        ok = (isinstance(files, dict) and isinstance(roles, dict) and bool(roles)
              and all(isinstance(n, str) and n in files for n in roles.values()))
        copied: list[Path] = []
        try:
            for name, rec in (files.items() if ok else ()):
                if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(rec, dict):
                    ok = False
                    break
                copied.append(dest / name)
                shutil.copyfile(entry / name, dest / name)
                if sha256_file(dest / name) != rec.get("sha256"):
                    ok = False
                    break
        except OSError:
            ok = False
        if ok:
            return {role: dest / name for role, name in roles.items()}, "hit"
        for p in copied:
            p.unlink(missing_ok=True)
        shutil.rmtree(entry, ignore_errors=True)
        return None, "corrupt"

    def store(self, key: str, roles: dict[str, Path], about: dict[str, Any]) -> None:
        """Add entry ``key``: copies of the files ``roles`` names and of their companions (``NAME.*``, e.g.
        ONNX external data); ``about`` records what the key was made of."""
        entry = self._entry(key)
        entry.mkdir(parents=True, exist_ok=True)
        table = {}
        for path in companions(roles.values()):
            with atomic_path(entry / path.name) as tmp:
                shutil.copyfile(path, tmp)
            table[path.name] = file_record(entry / path.name)
        record = {"key": key, "about": about, "roles": {r: p.name for r, p in roles.items()}, "files": table}
        with atomic_path(entry / ENTRY_NAME) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")


    def load_record(self, key: str) -> Optional[dict[str, Any]]:
        """The JSON record stored under ``key`` (:meth:`save_record`), or None; an unreadable entry is deleted."""
        entry = self._entry(key)
        try:
            record = json.loads((entry / ENTRY_NAME).read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and record.get("key") == key and isinstance(record.get("record"), dict):
            return record["record"]
        shutil.rmtree(entry, ignore_errors=True)
        return None

    def save_record(self, key: str, record: dict[str, Any], about: dict[str, Any]) -> None:
        """Store a JSON ``record`` (e.g. a passed parity gate) under ``key``."""
        entry = self._entry(key)
        entry.mkdir(parents=True, exist_ok=True)
        with atomic_path(entry / ENTRY_NAME) as tmp:
            tmp.write_text(json.dumps({"key": key, "about": about, "record": record}, indent=2) + "\n")


def companions(paths: Iterable[Path]) -> list[Path]:
    """``paths`` and the files beside each that belong to it (``NAME.*``, e.g. ``backbone.onnx.data``)."""
    out: list[Path] = []
    for p in paths:
        out += [p] + sorted(q for q in p.parent.glob(f"{p.name}.*") if q.is_file())
    return out


def cached(cache: Optional[BuildCache], key: str, about: dict[str, Any], dest: Path,
           build: Callable[[], dict[str, Path]]) -> tuple[dict[str, Path], str]:
    """An artifact's files in ``dest`` by role: copied from ``cache`` where it holds a sound entry for ``key``,
    else made by ``build()`` and stored. Returns them and how: ``hit``, ``miss``, ``rebuilt`` (the entry
    was corrupt) or ``off`` (no cache). A cache that cannot be written does not fail the build."""
    if cache is None:
        return build(), "off"
    roles, status = cache.fetch(key, dest)
    if roles is not None:
        return roles, status
    roles = build()
    how = "rebuilt" if status == "corrupt" else "miss"
    try:
        cache.store(key, roles, about)
    except OSError as e:
        return roles, f"{how} (not stored: {e.strerror or e})"
    return roles, how

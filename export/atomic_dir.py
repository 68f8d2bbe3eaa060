"""Atomic directory builds: build into a hidden temp sibling of DIR, then swap it into place.

``.DIR.build-<pid>-<rand>`` holds the build; on success the old DIR is renamed to ``.DIR.old-<pid>-<rand>``,
the build renamed to DIR and the old one deleted. A failed or interrupted build leaves the old DIR as
it was (or no DIR); siblings left by dead processes are cleaned by the next build, and an old DIR
stranded between the two renames is put back.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from stvfm_engine.errors import BuildError
from stvfm_engine.engine.manifest import MANIFEST_NAME


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_siblings(target: Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of build/old siblings of ``target`` whose process is gone."""
    out = []
    for kind in ("build", "old"):
        for p in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = p.name[len(f".{target.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                out.append((kind, p))
    return out


def clean_stale(target: Path, marker: str = MANIFEST_NAME) -> None:
    """Delete temp siblings of dead builds; restore an old DIR (holding ``marker``) stranded between the
    two renames."""
    for kind, p in _stale_siblings(target):
        if kind == "old" and not target.exists() and (p / marker).is_file():
            os.rename(p, target)
        else:
            shutil.rmtree(p, ignore_errors=True)


def check_replaceable(target: Path, marker: str = MANIFEST_NAME, kind: str = "an engine directory") -> None:
    """Refuse to replace anything but ``kind`` (a directory holding ``marker``) or an empty directory."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise BuildError(f"output {str(target)!r} exists and is not a directory; refusing to replace it")
    if target.is_dir() and not (target / marker).is_file() and any(target.iterdir()):
        raise BuildError(f"output {str(target)!r} is a non-empty directory without {marker} "
                         f"(not {kind}); refusing to replace it")


def _publish_permissions(directory: Path) -> None:
    """Temp files and dirs are private (0600/0700); give the result the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for p in directory.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, marker: str = MANIFEST_NAME,
                     kind: str = "an engine directory") -> Iterator[Path]:
    """Yield an empty hidden sibling of ``target``; on success it replaces ``target``, else it is removed.
    An existing ``target`` is replaced only if it is ``kind``, a directory holding ``marker`` (or empty)."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(target, marker, kind)
    clean_stale(target, marker)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(6)}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Outputs are never lost silently: one home for "refuse to replace", "move aside" and "disk full".

* :func:`refuse_existing` — an existing output is not replaced unless the user asked (``--overwrite`` /
  a dialog); the error names the path and the way out.
* :func:`move_aside` — move files out of the way into a dated sibling folder (never delete them).
* :func:`write_errors` — turn "no space left on device" / "quota exceeded" while writing into a
  :class:`~napari_diffst.errors.DiffSTError` that names the file and says the previous version is intact
  (the writers are atomic: :func:`napari_diffst.io.writers.atomic_path`).
* :func:`recover_temps` — after a killed write, remove the hidden temporaries it left next to the target (and
  put a folder moved aside mid-replacement back when the target is missing).
"""
from __future__ import annotations

import datetime as _dt
import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import DiffSTError


def remove_path(p: Path) -> bool:
    """Remove a file, link or folder tree; False when there was nothing to remove."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
        return True
    try:
        p.unlink()
    except FileNotFoundError:
        return False
    return True

__all__ = ["OutputExistsError", "DiskFullError", "refuse_existing", "move_aside", "dated_sibling", "write_errors",
           "recover_temps", "is_temp_of"]

#: errno values that mean "the disk (or the user's quota) is full"
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


class OutputExistsError(DiffSTError, FileExistsError):
    """The output path already exists and replacing it was not asked for."""

    def __init__(self, path, message: str):
        self.path = Path(path)
        super().__init__(message)

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class DiskFullError(DiffSTError, OSError):
    """Writing failed because the disk (or quota) is full; the previous version of the file is intact."""

    def __str__(self):
        return str(self.strerror)


def refuse_existing(path, overwrite: bool = False, *, what: str = "output", how: str = "pass --overwrite") -> Path:
    """Return ``path`` if it may be written; raise :class:`OutputExistsError` if it exists and not ``overwrite``."""
    p = Path(path)
    if (p.exists() or p.is_symlink()) and not overwrite:
        kind = "folder" if p.is_dir() else "file"
        raise OutputExistsError(p, f"{p}: the {what} already exists (a {kind}); not replacing it. Choose another "
                                   f"path, or {how} to replace it")
    return p


def dated_sibling(path, tag: str = "old", when: _dt.datetime | None = None) -> Path:
    """A free sibling path ``<name>.<tag>-YYYYmmdd-HHMMSS[-k]`` of ``path`` (nothing is created)."""
    p = Path(path).absolute()
    stamp = (when or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = p.parent / f"{p.name}.{tag}-{stamp}"
    cand, k = base, 1
    while cand.exists() or cand.is_symlink():
        k += 1
        cand = base.parent / f"{base.name}-{k}"
    return cand


def move_aside(folder, names: Iterable[str], tag: str = "old") -> Path | None:
    """Move the entries ``names`` of ``folder`` that exist into a new dated sibling folder of ``folder``
    (:func:`dated_sibling`) and return it (None when none of them exists). Nothing is deleted: the moved files
    keep their names, so a moved checkpoint folder is still a loadable checkpoint."""
    folder = Path(folder)
    present = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if not present:
        return None
    dest = dated_sibling(folder, tag)
    try:
        dest.mkdir(parents=True)
    except OSError as e:
        raise DiffSTError(f"cannot move the existing files of {folder} aside to {dest}: {e.strerror or e}. "
                          f"Move or delete them yourself, or choose another folder") from None
    for n in present:
        try:
            os.replace(folder / n, dest / n)
        except OSError:  # another file system: copy, then remove the original
            shutil.move(str(folder / n), str(dest / n))
    return dest


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and getattr(exc, "errno", None) in _FULL


@contextmanager
def write_errors(target, what: str = "file", previous: str | None = None) -> Iterator[None]:
    """Re-raise "disk full" / "quota exceeded" inside the block as :class:`DiskFullError` naming ``target``.

    ``previous`` describes what survives (default: the previous ``target`` if it exists, since writes are
    atomic). Other errors pass through unchanged."""
    target = Path(target)
    existed = target.exists()
    try:
        yield
    except OSError as e:
        if not is_disk_full(e) or isinstance(e, DiskFullError):
            raise
        keep = previous or (f"the previous {target.name} is intact" if existed else f"no {target.name} was written")
        raise DiskFullError(e.errno, f"{target}: cannot write the {what}: the disk is full "
                                     f"({e.strerror or os.strerror(e.errno)}); {keep}. Free some space (or "
                                     f"choose another folder) and run again") from e


def is_temp_of(name: str, target_name: str) -> str | None:
    """``'tmp'`` / ``'old'`` when ``name`` is a temporary the atomic writers make for ``target_name``, else None.

    The writers (:func:`napari_diffst.io.writers.atomic_path`, :class:`~napari_diffst.io.writers.OmeZarrWriter`)
    name them ``.tmp-XXXXXXXX-<target name>`` (the unfinished new version) and ``.old-XXXXXXXX-<target name>``
    (the previous version while a folder is replaced), ``XXXXXXXX`` 8 lowercase hex digits of a random UUID; only
    names of exactly that form match — never the target itself, another target's temporaries or a user's file
    that merely starts with a dot."""
    n = len(target_name)
    if len(name) != 14 + n or name[13] != "-" or name[14:] != target_name:
        return None
    tag, mid = name[1:4], name[5:13]
    if name[0] != "." or name[4] != "-" or tag not in ("tmp", "old") or any(c not in _HEX for c in mid):
        return None
    return tag


_HEX = frozenset("0123456789abcdef")


def recover_temps(target, log: Callable[[str], None] | None = None) -> list[Path]:
    """Clean up after a write that was killed (SIGKILL, power loss) before it finished.

    The atomic writers leave hidden siblings ``.tmp-XXXXXXXX-<name>`` (an unfinished new version) and, while a
    folder is being replaced, ``.old-XXXXXXXX-<name>`` (the previous version) — see :func:`is_temp_of`. If
    ``target`` is missing, the newest ``.old`` sibling is moved back onto it; every other such sibling is removed.
    Returns the paths removed; ``log(line)`` (when given and something was done) receives one line saying what.
    Call it only where one process owns ``target`` (a training run's checkpoint folder, the output of one
    ``sample`` command or one Export): another process's write in progress to the same target would lose its
    temporary."""
    target = Path(target)
    parent, name = target.parent, target.name
    if not parent.is_dir():
        return []
    tmps, olds = [], []
    for q in parent.iterdir():
        tag = is_temp_of(q.name, name)
        if tag == "tmp":
            tmps.append(q)
        elif tag == "old":
            olds.append(q)
    restored = None
    if olds and not (target.exists() or target.is_symlink()):
        olds.sort(key=lambda q: q.stat().st_mtime)
        restored = olds.pop()
        os.replace(restored, target)
    removed = []
    for q in tmps + olds:
        if remove_path(q):
            removed.append(q)
    if log is not None and (removed or restored is not None):
        parts = []
        for group, what in (([q for q in removed if q in tmps], "partial output"),
                            ([q for q in removed if q not in tmps], "replaced version")):
            if group:
                parts.append(f"removed {len(group)} {what}{'s' if len(group) > 1 else ''} left by a killed write "
                             f"({', '.join(q.name for q in group)})")
        if restored is not None:
            parts.append(f"put back the previous {name} that the killed write had moved aside")
        log(f"{target}: " + "; ".join(parts))
    return removed

"""Atomic file and folder writes: every file lowbit writes goes through here.

A write builds the new content under a temporary name in the destination's folder, flushes it to
disk (``fsync``) and renames it into place, so a crash or Ctrl-C leaves either the old file or the
new one, never half a file, and no temporary file behind. New files get the mode the user's umask
gives any other file (``0o666 & ~umask``); a replaced file keeps its mode.

* :func:`write_bytes`, :func:`write_text`: content in memory.
* :func:`write_stream`: content produced by a callback writing to an open binary file
  (``torch.save``, ``json.dump`` ...).
* :func:`write_tree`: a folder filled by a callback (a report), renamed into place as a whole; files
  already in the destination that the new folder does not have (a user's own files) are kept.
* :func:`check_output`: check a destination before long work starts (a folder given for a file, a
  file given for a folder, an input file named as the output, an unwritable parent).

Every function takes ``inputs``: paths the caller reads (the user's checkpoint, the model file being
evaluated). Writing to one of them is refused with :class:`OutputError`: lowbit never overwrites a
file the user named as input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "OutputError",
    "check_output",
    "current_umask",
    "new_file_mode",
    "write_bytes",
    "write_stream",
    "write_text",
    "write_tree",
]

PathLike = str | os.PathLike[str]


class OutputError(ValueError):
    """An output path cannot be written (it names an input, a folder for a file, ...)."""


def current_umask() -> int:
    """The process umask (read from /proc where it can be, else by setting and restoring it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


_UMASK_LOCK = threading.Lock()


def new_file_mode() -> int:
    """Permission bits of a new file under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~current_umask()


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _check_not_input(dst: Path, inputs: Iterable[PathLike]) -> None:
    for p in inputs:
        if p is None:
            continue
        src = Path(p)
        if _same(dst, src):
            raise OutputError(f"refusing to write {dst}: it is an input ({src}); choose another output path")


def check_output(path: PathLike, *, inputs: Iterable[PathLike] = (), folder: bool = False) -> Path:
    """Raise :class:`OutputError` now if ``path`` cannot be written later (``folder``: as a folder).

    Checks: not an input, not a folder where a file goes (nor a file where a folder goes), and the
    nearest existing ancestor is a writable folder. Creates nothing.
    """
    dst = Path(path)
    if str(path) == "":
        raise OutputError("empty output path")
    _check_not_input(dst, inputs)
    if folder:
        if dst.exists() and not dst.is_dir():
            raise OutputError(f"{dst} exists and is not a folder")
        here = Path.cwd().resolve()
        if dst.resolve() in (here, *here.parents, Path.home().resolve()):
            raise OutputError(f"{dst} is the current folder, an ancestor of it or the home folder: "
                              "give the report a folder of its own")
    elif dst.is_dir():
        raise OutputError(f"{dst} is a folder; give a file name")
    parent = dst.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot create {dst}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {dst}: folder {parent} is not writable")
    return dst


def _mode_for(dst: Path) -> int:
    try:
        return stat.S_IMODE(dst.stat().st_mode)
    except FileNotFoundError:
        return new_file_mode()


def write_stream(path: PathLike, fill: Callable[[BinaryIO], object], *, inputs: Iterable[PathLike] = ()) -> Path:
    """Write the file ``path`` with ``fill(f)`` (``f`` a binary file open for writing), atomically."""
    dst = check_output(path, inputs=inputs)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(dst))
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(dst.parent)
    return dst


def write_bytes(path: PathLike, data: bytes, *, inputs: Iterable[PathLike] = ()) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    return write_stream(path, lambda f: f.write(data), inputs=inputs)


def write_text(path: PathLike, text: str, *, inputs: Iterable[PathLike] = (), encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode(encoding), inputs=inputs)


def write_tree(path: PathLike, fill: Callable[[Path], object], *, inputs: Iterable[PathLike] = ()) -> Path:
    """Build the folder ``path`` with ``fill(tmp_folder)`` and rename it into place as a whole.

    If ``path`` exists, the new folder replaces it; entries of the old folder that the new one does
    not have are moved into the new one (nothing of the user's is deleted), then the old folder (now
    holding only the replaced entries) is removed. Signals (Ctrl-C) are held during the swap.
    """
    dst = check_output(path, inputs=inputs, folder=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        fill(tmp)
        _set_tree_modes(tmp, dst)
        with _signals_held():
            _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dst.parent)
    return dst


def _set_tree_modes(tmp: Path, dst: Path) -> None:
    """Files the callback made get the umask's mode (they may come from mkstemp's 0600), folders too."""
    mask = current_umask()
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    os.chmod(tmp, stat.S_IMODE(dst.stat().st_mode) if dst.is_dir() else 0o777 & ~mask)


def _swap_in(new: Path, dst: Path) -> None:
    if not dst.exists():
        os.rename(new, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.rmdir(old)
    os.rename(dst, old)
    os.rename(new, dst)
    for entry in os.listdir(old):  # the user's own files in the old folder move to the new one
        if not os.path.lexists(dst / entry):
            os.rename(old / entry, dst / entry)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Defer SIGINT/SIGTERM (main thread only) so the few renames of a swap are not cut in half."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort: not every file system lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

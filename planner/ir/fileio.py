"""Output files: checked before any work, written atomically, special files written through.

A regular file is replaced through a temp file in the same folder and a rename, so an interrupted
or failed write never leaves a partial file. A rename would *replace* a character device or a FIFO
(`-o /dev/null`, a pipe to another process) with a regular file, so those are opened and written
directly. A symlink is followed to the file it names, which is then replaced atomically (the link
stays a link); a dangling symlink or a symlink loop is refused.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from costmodels.errors import InputError


def _resolve(path: Path, flag: str) -> Path:
    """The path a write to `path` lands on: a symlink followed to its final target."""
    if not path.is_symlink():
        return path
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: a symlink to {os.readlink(path)}, which does not exist; "
                         "give the real file's path or fix the link") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{flag} {path}: a symlink loop; give a file path") from None
        raise InputError(f"{flag} {path}: cannot follow the symlink ({_why(exc)}); give a file path") from None


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _kind(mode: int) -> str | None:
    """What a non-regular file is, for messages; None for regular files and folders."""
    for test, name in ((stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return None


def _writes_through(mode: int) -> bool:
    """Character devices (/dev/null, a terminal) and FIFOs are written in place, never replaced."""
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _check_folder(folder: Path, flag: str, shown: str) -> None:
    """`folder` exists, is a folder and a file can be created in it (probed: root ignores mode bits)."""
    if not folder.exists():
        ancestor = folder
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if ancestor.exists() and not ancestor.is_dir():
            raise InputError(f"{flag} {shown}: {ancestor} is a file, not a folder; choose another path")
        raise InputError(f"{flag} {shown}: parent folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise InputError(f"{flag} {shown}: {folder} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".podplan-probe.", dir=folder)
    except OSError as exc:
        raise InputError(f"{flag} {shown}: folder {folder} is not writable ({_why(exc)}); "
                         "choose a writable path") from None
    os.close(fd)
    os.unlink(probe)


def check_output_path(path: str | os.PathLike[str], *, flag: str = "-o", folder: bool = False) -> Path:
    """Refuse an output path the command could not write, before it does any work (InputError, one line).

    folder=False: a file (an existing one is replaced atomically when the command succeeds, a
    character device or FIFO is written through); its parent folder must exist and be writable.
    folder=True: a folder the command fills (export -o DIR, run --job-dir); it may be missing, but
    then its parent must exist. Returns the path as given.
    """
    shown = os.fspath(path)
    if not shown:
        raise InputError(f"{flag}: empty path; give a {'folder' if folder else 'file'} path")
    p = Path(shown)
    target = _resolve(p, flag)
    try:
        mode: int | None = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # e.g. ENOTDIR: a file where a folder should be on the way
        if exc.errno == errno.ENOTDIR:
            _check_folder(target.parent, flag, shown)
        raise InputError(f"{flag} {shown}: cannot use this path ({_why(exc)}); choose another path") from None
    if folder:
        if mode is None:
            _check_folder(target.parent, flag, shown)
        elif not stat.S_ISDIR(mode):
            raise InputError(f"{flag} {shown}: is a file, not a folder; give a folder path")
        else:
            _check_folder(target, flag, shown)
        return p
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise InputError(f"{flag} {shown}: is a directory; give a file path such as {p / 'out.json'}")
        kind = _kind(mode)
        if kind:
            raise InputError(f"{flag} {shown}: is a {kind}, not a file; give a file path")
        if _writes_through(mode):
            if not os.access(target, os.W_OK):
                raise InputError(f"{flag} {shown}: not writable; choose another path")
            return p
    _check_folder(target.parent, flag, shown)
    return p


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write `data` to `path`: a regular file through a temp file and a rename, a device or FIFO in place.

    The parent folder must exist (commands check with `check_output_path` first: missing folders
    are a typo more often than a wish). Failures are one-line InputErrors.
    """
    shown = os.fspath(path)
    target = _resolve(Path(shown), "cannot write")
    raw = data.encode() if isinstance(data, str) else data
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InputError(f"cannot write {shown} ({_why(exc)}); choose another path") from None
    if st is not None and _writes_through(st.st_mode):
        try:
            with open(target, "wb") as f:  # a FIFO blocks here until a reader opens it, as with `> fifo`
                f.write(raw)
        except OSError as exc:
            raise InputError(f"cannot write {shown} ({_why(exc)}); choose another path") from None
        return
    if st is not None and not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else f"a {_kind(st.st_mode) or 'special file'}"
        raise InputError(f"cannot write {shown}: it is {what}; give a file path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise InputError(f"cannot write {shown} ({_why(exc)}); check that its folder exists and is writable") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        if st is not None:
            mode = stat.S_IMODE(st.st_mode)  # a replaced file keeps its permissions (a 0600 file stays private)
        else:
            # mkstemp creates 0600; give a new file the mode a plain open() would have
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {shown} ({_why(exc)}); choose another path") from None
        raise

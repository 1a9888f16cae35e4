"""Writes that cannot lose a user's data: one helper for every file the project writes.

A preset, a converted checkpoint or an exported artefact is written under a staging name
beside its target (`.<name>.kp-staging-<pid>-<token>`), flushed to disk, and renamed into
place. A file target is replaced with `os.replace` (atomic); a directory target is swapped
with the new one in one atomic `renameat2(RENAME_EXCHANGE)` on Linux, so a kill at any
instant leaves the old version or the new one, whole, at the target's name. Where the
exchange is not available the old directory is first renamed aside (`.kp-old-`) and a save
or load of that target later restores it if the process died before the new one was in.

Only what this project wrote is ever replaced (`owned`), never the current directory, one of
its parents, or a directory holding the source being converted.
"""

import ctypes
import hashlib
import os
import secrets
import shutil
import sys
import zipfile
from pathlib import Path

STAGING_TAG = ".kp-staging-"
ASIDE_TAG = ".kp-old-"


def sha256_of(path):
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_target(path, what, overwrite, owned, sources=(), marker="metadata.json"):
    """Raise unless `what` may write `path`.

    - never the current directory, one of its parents, or a path that is or holds one of
      `sources` (ValueError);
    - an existing path only with `overwrite` (FileExistsError) and only when `owned(path)`
      says this project wrote it (ValueError): anything else is the user's. `marker` names
      what marks our writes in the message (a preset's metadata.json, an artefact's sidecar).
    """
    path = Path(path).expanduser()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(
            f"{what}: the target {str(path)!r} is the current directory or one of its parents; "
            "expected a new path inside it"
        )
    for source in sources:
        source = Path(source).expanduser().resolve()
        if resolved == source or resolved in source.parents:
            raise ValueError(
                f"{what}: the target {str(path)!r} is or holds the source {str(source)!r}; expected another path"
            )
    restore_aside(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{what}: {str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
        if path.is_symlink() or not owned(path):
            raise ValueError(
                f"{what}: {str(path)!r} exists and was not written by keras_perceiver (no keras_perceiver "
                f"{marker}); refusing to replace it with overwrite=True. "
                "Expected a new path, or one this project wrote"
            )
    return path


def _process_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target, tag):
    """Staging or aside entries of `target` whose writer process is gone."""
    target = Path(target)
    prefix = f".{target.name}{tag}"
    if not target.parent.is_dir():
        return []
    found = []
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            found.append(entry)
    return found


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def restore_aside(target):
    """After a kill between moving an old version aside and renaming the new one in (only
    where the atomic exchange is unavailable): put the old version back."""
    target = Path(target)
    for aside in _leftovers(target, ASIDE_TAG):
        if not target.exists():
            os.rename(aside, target)
        else:
            _remove(aside)


def staging_path(target):
    """A new, unused staging name beside `target`; staging left by killed writers of the
    same target is removed first. The parent directory is created when missing."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(target, STAGING_TAG):
        _remove(stale)
    return target.parent / f".{target.name}{STAGING_TAG}{os.getpid()}-{secrets.token_hex(4)}"


def new_staging_dir(target):
    """Create and return a staging directory for `target`, with the user's normal permissions
    (umask), unlike `tempfile.mkdtemp`'s 0700."""
    staging = staging_path(target)
    os.mkdir(staging)
    return staging


def _fsync(path):
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path):
    """Flush a file, or every file and directory under a directory, to disk."""
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
    else:
        _fsync(path)


def _exchange(a, b):
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False when unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def commit(staged, target):
    """Move `staged` (a file or directory beside `target`) to `target`, replacing what is
    there. A kill at any instant leaves the old or the new version at `target`."""
    staged, target = Path(staged), Path(target)
    fsync_tree(staged)
    if not (target.exists() or target.is_symlink()):
        os.rename(staged, target)
    elif staged.is_file() and target.is_file():
        os.replace(staged, target)
    elif _exchange(staged, target):
        _remove(staged)  # now the old version
    else:
        aside = target.parent / f".{target.name}{ASIDE_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, aside)
        os.rename(staged, target)
        _remove(aside)
    _fsync(target.parent)
    return target


def read_npz(path, argument, expected="an .npz file of arrays"):
    """The arrays of the .npz at `path` as {name: array}, read whole (a damaged member fails
    here, not at its first use). ValueError naming `argument`, the `expected` and what was
    received, for a missing path, one array file (np.save's .npy) or an unreadable file."""
    import numpy as np

    shown = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{argument}: expected {expected}; received {shown!r}, which does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded as arrays:
                return {name: arrays[name] for name in arrays.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:  # ValueError: NumPy's (a pickle, a bad header)
        raise ValueError(f"{argument}: expected {expected}; received {shown!r}, not readable as one ({error})") from None
    raise ValueError(f"{argument}: expected {expected}; received the array file {shown!r} (one array, not an .npz)")

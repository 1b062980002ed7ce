"""Writing files so that nothing already on disk is lost or half-replaced.

`atomic_write`: readers (and a crash at any point) see the old file or the new one, never a part:
the bytes go to a temporary file in the same directory, are fsynced, then `os.replace`d over the
target (atomic on POSIX within one filesystem), and the directory entry is fsynced.
`unused_dir`: an output directory that holds nothing yet, so an earlier result is never overwritten.
"""

import contextlib
import os
import secrets
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) atomically; creates parent dirs. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # same dir: same filesystem
    payload = data.encode() if isinstance(data, str) else data
    try:
        # O_EXCL: never write through someone else's file; mode 0o666 lets the umask decide, as open() does.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)
    return path


def unused_dir(path: str | os.PathLike) -> Path:
    """`path` if it does not exist or is an empty directory, else the first free sibling `path-2`,
    `path-3`, ...; the directory is created (claimed) before it is returned."""
    path = Path(path)
    for number in range(1, 10_000):
        candidate = path if number == 1 else path.with_name(f"{path.name}-{number}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            if candidate.is_dir() and not any(candidate.iterdir()):
                return candidate
    raise FileExistsError(f"{path} and its siblings {path.name}-2 .. {path.name}-9999 all hold results; "
                          "pass another output directory")

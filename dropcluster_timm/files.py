""" Files written whole: the one atomic writer of the package (run records, metrics, checkpoints'
markers, reports), and the fsync it is built on (``hub.save`` syncs model folders with it).

A reader sees the old file or the new one, never half of either, and a machine that loses power
right after ``write_atomic`` returns keeps the new file: the bytes go to a temporary file of a name of
their own beside the target (two writers never share one), synced, renamed over the target, and the
folder synced so that the rename itself is on disk.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

__all__ = ['fsync_path', 'write_atomic', 'write_json', 'read_json', 'json_object_or_none']

PathLike = Union[str, os.PathLike]


def fsync_path(path: PathLike) -> None:
    """Flush a file or a folder (its entries: a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: PathLike, data: Union[str, bytes]) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8, newlines as given) in one step."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode('utf-8') if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file is a record like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def write_json(path: PathLike, data: Any) -> None:
    """``write_atomic`` of ``data`` as indented JSON (values JSON cannot hold as their ``str``)."""
    write_atomic(path, json.dumps(data, indent=2, default=str))


def read_json(path: PathLike) -> Any:
    """The JSON value of a file (``OSError`` / ``ValueError`` as ``open`` and ``json`` raise them)."""
    with open(path) as f:
        return json.load(f)


def json_object_or_none(path: PathLike) -> Optional[Dict[str, Any]]:
    """The JSON object of a file, or None when it is missing, unreadable or holds something else."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

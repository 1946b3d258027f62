""" The one check every writer runs on where it writes, before any work: a training run's folder,
``evaluate --json``, ``export-plain``'s folder, ``cards``' files.

A destination must be writable, must not replace an earlier result unless asked (``--overwrite``), and
is never a file the same command reads, nor a folder holding one, ``--overwrite`` or not: a command
that read its model from ``R/best`` cannot write its result over ``R/best/model.safetensors``.
Every refusal is one line naming the path (``DestinationError``, an input error).
"""
import os
from typing import Iterable, Optional

from .errors import InputError

__all__ = ['DestinationError', 'check_destination', 'overlaps']


class DestinationError(InputError, ValueError):
    """A destination that cannot or must not be written: the user's input (a ``ValueError`` for the
    Python API, exit status 2 on the command line)."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def overlaps(destination: str, read: str) -> bool:
    """Whether writing ``destination`` can replace ``read`` (a file or folder the command reads): the same
    path, a folder around it, or a file that exists inside a folder read."""
    dest, src = _real(destination), _real(read)
    return dest == src or _inside(src, dest) or (os.path.isdir(src) and _inside(dest, src) and os.path.exists(dest))


def check_destination(path: str, flag: str, *, folder: bool = False, overwrite: bool = False,
                      reads: Iterable[Optional[str]] = ()) -> None:
    """One-line ``DestinationError`` unless ``path`` (``flag`` names it in the message) can be written as
    a file, or with ``folder`` as a folder (made, with its parents, by the writer):

    - the nearest existing folder on its way is a writable folder (a file is not);
    - it is not a file the command reads, nor a folder around one, nor an existing file inside a
      folder read (``reads``; None entries are skipped);
    - it holds no earlier result (a file; a folder that is not empty) unless ``overwrite``.
    """
    if not path or not str(path).strip():
        raise DestinationError(f'{flag} is empty: name the {"folder" if folder else "file"}')
    path = str(path)
    for read in reads:
        if read and overlaps(path, read):
            raise DestinationError(f'{flag} {path} would write over {read}, which this command reads; give another '
                                f'{"folder" if folder else "file"}')
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise DestinationError(f'{flag} {path} is a file, not a folder')
    if not folder and os.path.isdir(path):
        raise DestinationError(f'{flag} {path} is a folder; give a file name')
    existing = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    if not folder and not os.path.isdir(existing):
        raise DestinationError(f'{flag} {path}: the folder {existing} does not exist')
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DestinationError(f'{flag} {path}: {existing} is a file, not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DestinationError(f'{flag} {path}: {existing} is not writable')
    if overwrite or not os.path.exists(path):
        return
    if not folder:
        raise DestinationError(f'{flag} {path} exists; give another name or replace it with --overwrite')
    if any(os.scandir(path)):
        what = 'a model folder' if os.path.isfile(os.path.join(path, 'config.json')) else \
            'a run folder' if os.path.isfile(os.path.join(path, 'run.json')) else 'a folder that is not empty'
        raise DestinationError(f'{flag} {path} exists ({what}); give another folder, or replace it with --overwrite')

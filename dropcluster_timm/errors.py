""" The error a user can fix, shared by the data, evaluation and training code, and the helpers that
keep such errors to one line."""
import os

__all__ = ['TrainingError', 'first_line', 'one_line', 'check_writable_file']


class TrainingError(Exception):
    """A problem the user can fix (missing data, unknown model, incompatible resume, ...): ``str()``
    is a one-line reason. The command line prints it as ``error: ...`` and exits with status 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """The whole message of an exception on one line (torch's state-dict errors span several)."""
    return ' '.join(str(error).split()) or type(error).__name__


def check_writable_file(path: str, flag: str, overwrite: bool = False) -> None:
    """``TrainingError`` unless ``path`` can be written as a file: its folder exists, it is not a
    folder, and it holds no earlier file unless ``overwrite``."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise TrainingError(f'{flag} {path} is a folder; give a file name')
    if not os.path.isdir(folder):
        raise TrainingError(f'{flag} {path}: the folder {folder} does not exist')
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrainingError(f'{flag} {path}: {folder} is not writable')
    if os.path.exists(path) and not overwrite:
        raise TrainingError(f'{flag} {path} exists; give another name or replace it with --overwrite')

""" The error a user can fix, shared by the data, evaluation and training code."""

__all__ = ['TrainingError', 'first_line']


class TrainingError(Exception):
    """A problem the user can fix (missing data, unknown model, incompatible resume, ...): ``str()``
    is a one-line reason. The command line prints it as ``error: ...`` and exits with status 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

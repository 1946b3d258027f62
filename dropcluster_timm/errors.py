""" The error a user can fix, shared by the data, evaluation and training code, and the helpers that
keep such errors to one line."""
__all__ = ['TrainingError', 'first_line', 'one_line']


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

""" Errors by cause, and the helpers that keep them to one line.

- ``InputError``: the user's input (a flag, a path, a file's contents, a model name); exit status 2.
- ``EnvironmentFailure``: the run's environment (the network, the disk, permissions); exit status 1,
  and the message says what to do.
- Anything else is a bug and reaches the user as a traceback. ``DROPCLUSTER_TIMM_TRACEBACK=1`` prints
  the traceback behind a one-line error too.
"""
import errno
import os
from typing import Optional

__all__ = ['InputError', 'TrainingError', 'EnvironmentFailure', 'TRACEBACK_VARIABLE', 'show_traceback',
           'environment_hint', 'classify', 'first_line', 'one_line']

TRACEBACK_VARIABLE = 'DROPCLUSTER_TIMM_TRACEBACK'


class InputError(Exception):
    """A problem in what the user gave (missing data, unknown model, incompatible resume, ...):
    ``str()`` is a one-line reason. The command line prints it as ``error: ...`` and exits with 2."""


TrainingError = InputError  # its name before it covered data, evaluation and Hub input too


class EnvironmentFailure(Exception):
    """The run's environment failed (the network, the disk, permissions): ``str()`` is one line that
    says what to do. The command line prints it as ``error: ...`` and exits with 1."""


def show_traceback() -> bool:
    """Whether ``DROPCLUSTER_TIMM_TRACEBACK`` asks for the traceback behind one-line errors."""
    return os.environ.get(TRACEBACK_VARIABLE, '').strip().lower() not in ('', '0', 'false', 'no')


def environment_hint(error: BaseException) -> Optional[str]:
    """What to do when ``error`` comes from the environment (the network, the disk, permissions),
    else None (a wrong name or path is the user's input)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled, \
        RepositoryNotFoundError, RevisionNotFoundError, HfHubHTTPError
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return ('the files are not in the Hugging Face cache and the Hub cannot be reached: connect to the network, '
                'or download them where it is (HF_HUB_OFFLINE=1 reads only the cache)')
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError)):
        return None
    if isinstance(error, (HfHubHTTPError, ConnectionError, TimeoutError)):
        return 'check the network connection and try again'
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return 'free some disk space and try again'
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return 'check the permissions of the path'
    return None


def classify(error: BaseException, what: str) -> Exception:
    """The one-line error of ``what`` failing with ``error``: an ``EnvironmentFailure`` with what to do
    when the environment failed, else an ``InputError``. Raise it ``from error``."""
    hint = environment_hint(error)
    if hint is not None:
        return EnvironmentFailure(f'{what}: {first_line(error)}; {hint}')
    return InputError(f'{what}: {first_line(error)}')


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """The whole message of an exception on one line (torch's state-dict errors span several)."""
    return ' '.join(str(error).split()) or type(error).__name__

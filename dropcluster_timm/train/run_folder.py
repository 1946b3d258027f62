""" The run folder as a run writes it (``layout.py`` names its parts): the checks of the output
before a run, its lock, the shared-filesystem check, and checkpoints written whole. The run's
records (run.json, metrics) are ``records.py``'s; reading a checkpoint back is ``resume.py``'s.
"""
import fcntl
import os
import shutil
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from accelerate.utils import broadcast_object_list, gather_object

from ..destination import check_destination, overlaps
from ..errors import InputError, first_line
from ..files import write_atomic, write_json
from .config import TrainConfig
from .layout import CHECKPOINT_DIR, LOCK_FILE, META_FILE, RECORDS, RESULTS
from .resume import list_checkpoints
from .run_state import save_run_state

__all__ = ['run_identity', 'check_output', 'run_results_in', 'files_read', 'clear_results', 'lock_output',
           'check_shared_output', 'save_checkpoint']



def run_identity(model_name: str, num_classes: int) -> Dict[str, Any]:
    """What must match for a resume: the model and the classes."""
    return {'model': model_name, 'num_classes': num_classes}




def run_results_in(output: str, records: bool = False) -> List[str]:
    """The names of ``RESULTS`` (and with ``records``, of ``RECORDS``) present in ``output``."""
    return [name for name in RESULTS + (RECORDS if records else ()) if os.path.lexists(os.path.join(output, name))]


def check_output(output: str, checkpoint: Optional[str], resuming: bool = False, overwrite: bool = False,
                 reads: Sequence[Optional[str]] = ()) -> None:
    """Refuse, in one line, an output that cannot be written, one whose files would replace what the
    run reads (``reads``: weights it starts from), or a folder that holds a run's results unless this
    run resumes it (``resuming``: ``--resume`` names it) or ``overwrite`` is asked. A resumed folder
    must hold the checkpoint resumed from, or no checkpoint (a run stopped in its first epoch: it
    starts over there)."""
    check_destination(output, '--output', folder=True, overwrite=True)
    for name in RESULTS + RECORDS:  # what the run writes (or clears, with --overwrite)
        read = next((r for r in reads if r and overlaps(os.path.join(output, name), r)), None)
        if read:
            raise InputError(f'--output {output}: its {name} would replace {read}, which this run reads; choose '
                                'another --output')
    found = run_results_in(output) if os.path.isdir(output) else []
    if not found or overwrite:
        return
    ours = checkpoint is not None and os.path.realpath(checkpoint).startswith(
        os.path.realpath(os.path.join(output, CHECKPOINT_DIR)) + os.sep)
    if ours or (resuming and checkpoint is None and not list_checkpoints(output)):
        return
    what = 'another run' if list_checkpoints(output) else f'the results of a run ({", ".join(found)})'
    raise InputError(f'output folder {output} already holds {what}; resume it with --resume {output}, '
                        'choose another --output, or replace it with --overwrite')


def files_read(cfg: TrainConfig) -> List[str]:
    """The weights a run starts from, which its output must never replace: ``--initial-checkpoint``,
    ``--pretrained-path`` and a ``local-dir:`` model folder."""
    m = cfg.model
    reads = [m.initial_checkpoint, m.pretrained_path]
    if m.name.startswith('local-dir:'):
        reads.append(m.name[len('local-dir:'):])
    return [r for r in reads if r]


def clear_results(output: str) -> None:
    """Remove a run's results from ``output`` (``--overwrite``; main process, under the folder's lock)."""
    for name in run_results_in(output, records=True):
        path = os.path.join(output, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def lock_output(output: str):
    """Hold an exclusive lock on ``output`` for the run's lifetime (main process), so that a second run
    into the same folder stops at start. The system releases it when the process ends, however it
    ends, so the file a killed run leaves behind never blocks a resume. Returns the open lock file:
    closing it releases the lock."""
    try:
        os.makedirs(output, exist_ok=True)
        path = os.path.realpath(os.path.join(output, LOCK_FILE))
        f = open(path, 'a+')
    except OSError as e:
        raise InputError(f'--output {output}: cannot create the run folder ({e.strerror or first_line(e)})') from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or 'unknown process'
        f.close()
        raise InputError(f'--output {output} is in use by another run ({holder}); wait for it to end or '
                            'choose another --output') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    f.flush()
    return f


SHARED_CHECK_FILE = '.shared_check'


def check_shared_output(accelerator, output: str) -> None:
    """On several machines, make sure every machine sees the same ``output`` folder: checkpoints and
    model folders are written by the global main process only, and a resume reads them everywhere.
    Node-local disks are refused at start, with one line."""
    local = int(os.environ.get('LOCAL_WORLD_SIZE', accelerator.num_processes))
    if accelerator.num_processes <= local:
        return  # one machine
    token = f'{socket.gethostname()}-{os.getpid()}-{time.time_ns()}'
    path = os.path.join(output, SHARED_CHECK_FILE)
    if accelerator.is_main_process:
        write_atomic(path, token)
    token = broadcast_object_list([token])[0]
    accelerator.wait_for_everyone()
    seen = True
    if accelerator.is_local_main_process:
        try:
            with open(path) as f:
                seen = f.read() == token
        except OSError:
            seen = False
    missing = [host for host, ok in gather_object([(socket.gethostname(), seen)]) if not ok]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.unlink(path)
    if missing:
        raise InputError(f'--output {output} is not one folder shared by all machines ({", ".join(missing)} '
                            'do not see what the main process writes there): put it on a shared file system; '
                            'node-local disks are not supported')


def save_checkpoint(accelerator, output: str, name: str, meta: Dict[str, Any], run_objects: Dict[str, Any],
                    keep: int = 2, per_process: Optional[Callable[[str], None]] = None) -> str:
    """``accelerator.save_state`` (model, optimizer, data order, random states) and the run's own
    state (``run_objects``, see ``run_state``) into a hidden temporary folder, renamed into place when
    complete.

    A crash mid-save leaves only the temporary folder, which is ignored (and cleared next time), so
    the previous checkpoint stays the newest usable one. Keeps the newest ``keep`` checkpoints.
    ``per_process(folder)`` writes each process's own files into it (every process calls it).
    """
    root = os.path.join(output, CHECKPOINT_DIR)
    final = os.path.join(root, name)
    tmp = os.path.join(root, '.tmp-' + name)
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if per_process is not None:
        per_process(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_run_state(tmp, run_objects)
        write_json(os.path.join(tmp, META_FILE), meta)  # the completion marker
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(output)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final

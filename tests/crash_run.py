""" Test-only: ``python tests/crash_run.py STEP TRAIN_ARGS...`` trains like ``train_timm.py`` and kills
its own process with SIGKILL after batch STEP, as a crash or a preempted job would."""
import os
import signal
import sys

from dropcluster_timm.train import parse_train_args, train


def kill_at(step: int):
    def on_step(state):
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
    return on_step


if __name__ == '__main__':
    train(parse_train_args(sys.argv[2:]), on_step=kill_at(int(sys.argv[1])))

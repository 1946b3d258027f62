""" The run's own state in a checkpoint, kept as data: ``run_state.json`` (numbers, strings, lists)
and ``run_state.safetensors`` (tensors). Never pickle: a checkpoint folder can come from anywhere.

The position, the drop-rate ramp, the EMA weights and the EDropout search
are saved here instead of through ``accelerator.register_for_checkpointing`` (which unpickles its
files on load). On resume every value is checked against the state of a freshly built object of the
same kind (the same keys, kinds of value, tensor shapes and dtypes) before any object is touched,
so a tampered or unexpected file stops the run with one line before any training.
"""
import json
import math
import os
from typing import Any, Dict

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import InputError, first_line

__all__ = ['STATE_JSON', 'STATE_TENSORS', 'save_run_state', 'load_run_state']

STATE_JSON = 'run_state.json'
STATE_TENSORS = 'run_state.safetensors'
_TENSOR = '__tensor__'  # a JSON value {"__tensor__": key} stands for run_state.safetensors[key]


def _encode(value: Any, path: str, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, dict):
        return {str(k): _encode(v, f'{path}.{k}', tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f'{path}.{i}', tensors) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f'{path}: a {type(value).__name__} cannot be saved as data')


def save_run_state(folder: str, objects: Dict[str, Any]) -> None:
    """Write the ``state_dict()`` of every named object into ``folder`` (main process)."""
    tensors: Dict[str, torch.Tensor] = {}
    data = {name: _encode(obj.state_dict(), name, tensors) for name, obj in objects.items()}
    save_file(tensors, os.path.join(folder, STATE_TENSORS))
    with open(os.path.join(folder, STATE_JSON), 'w') as f:
        json.dump(data, f, indent=1, allow_nan=False)


class _Refused(ValueError):
    pass


def _scalar_kind(value: Any) -> str:
    if isinstance(value, bool):
        return 'bool'
    if value is None or isinstance(value, (int, float)):
        return 'number'  # None stands for "not yet" where a number goes (best top-1 before any evaluation)
    if isinstance(value, str):
        return 'str'
    return type(value).__name__


def _decode(value: Any, expected: Any, path: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """``value`` read back, checked against ``expected`` (the fresh object's state at ``path``)."""
    if isinstance(expected, torch.Tensor):
        if not (isinstance(value, dict) and set(value) == {_TENSOR} and value[_TENSOR] in tensors):
            raise _Refused(f'{path}: expected a tensor of {STATE_TENSORS}')
        t = tensors[value[_TENSOR]]
        if t.dtype != expected.dtype or t.shape != expected.shape:
            raise _Refused(f'{path}: expected {expected.dtype} {tuple(expected.shape)}, got {t.dtype} {tuple(t.shape)}')
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _Refused(f'{path}: holds non-finite values')
        return t
    if isinstance(expected, dict):
        if not isinstance(value, dict) or set(value) != set(expected):
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise _Refused(f'{path}: expected the keys {sorted(expected)}, got {got}')
        return {k: _decode(value[k], expected[k], f'{path}.{k}', tensors) for k in expected}
    if isinstance(expected, (list, tuple)):
        if not isinstance(value, list) or len(value) != len(expected):
            raise _Refused(f'{path}: expected a list of {len(expected)}, got {str(value)[:60]}')
        return [_decode(v, e, f'{path}.{i}', tensors) for i, (v, e) in enumerate(zip(value, expected))]
    if _scalar_kind(value) != _scalar_kind(expected):
        raise _Refused(f'{path}: expected a {_scalar_kind(expected)}, got {str(value)[:60]!r}')
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused(f'{path}: {value} is not a finite number')
    return value


# Saved by earlier versions and no longer loaded: the LR scheduler's state is its settings, which a
# resumed run takes from the command line.
NOT_LOADED = ('lr_scheduler',)
# Renamed since earlier versions: (object, old key) -> new key.
RENAMED = {('state', 'best_top1'): 'best_metric'}


def _expected(obj: Any, saved: Any) -> Any:
    """The state ``obj`` expects, less the keys it added since ``saved`` was written (``obj.added_keys``:
    its ``load_state_dict`` fills them in)."""
    expected = obj.state_dict()
    if isinstance(expected, dict) and isinstance(saved, dict):
        expected = {k: v for k, v in expected.items() if k in saved or k not in getattr(obj, 'added_keys', ())}
    return expected


def load_run_state(folder: str, objects: Dict[str, Any]) -> None:
    """Check ``folder``'s run state against ``objects`` (freshly built, same settings), then load it
    into them. Raises ``InputError`` naming the file and the value, having loaded nothing."""
    try:
        with open(os.path.join(folder, STATE_JSON)) as f:
            data = json.load(f, parse_constant=lambda c: float(c))  # NaN / Infinity are refused below
        tensors = load_file(os.path.join(folder, STATE_TENSORS))
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in NOT_LOADED}
            for (name, key), new_key in RENAMED.items():
                entry = data.get(name)
                if isinstance(entry, dict) and key in entry and new_key not in entry:
                    data[name] = {(new_key if k == key else k): v for k, v in entry.items()}
        if not isinstance(data, dict) or set(data) != set(objects):
            raise _Refused(f'expected the states of {sorted(objects)}, got '
                           f'{sorted(data) if isinstance(data, dict) else type(data).__name__}')
        states = {name: _decode(data[name], _expected(obj, data[name]), name, tensors) for name, obj in objects.items()}
        for name, obj in objects.items():
            obj.load_state_dict(states[name])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise InputError(f'cannot resume from {folder}: {STATE_JSON}: {first_line(e)}') from None

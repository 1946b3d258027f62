""" The results file: one JSON object per run in ``runs*.jsonl``, one rule for duplicate rows.

A row is keyed by (config, arm, seed). Two copies of a key are the same run when every field but the
timings agrees: they merge into one (the first). Copies that disagree on anything else are refused
with the fields that differ, since a study must not quietly choose between two results.
"""
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

__all__ = ['TIMING_FIELDS', 'row_key', 'merge_rows', 'read_rows', 'append_row']

# Fields that differ between two runs of the same row on a busy or different machine.
TIMING_FIELDS = ('train_time_s', 'total_time_s', 'images_per_s')


def row_key(row: Dict[str, Any]) -> Tuple[str, str, int]:
    try:
        return str(row['config']), str(row['arm']), int(row['seed'])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f'a result row needs config, arm and an integer seed ({e!r}): {str(row)[:200]}') from None


def merge_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per key, in first-seen order; identical copies merge, conflicting copies raise."""
    merged: Dict[Tuple, Dict[str, Any]] = {}
    for row in rows:
        key = row_key(row)
        if key not in merged:
            merged[key] = row
            continue
        first = merged[key]
        differ = sorted(f for f in set(first) | set(row) if f not in TIMING_FIELDS and first.get(f) != row.get(f))
        if differ:
            raise ValueError(f'two results for {"/".join(map(str, key))} disagree on {", ".join(differ)}; '
                             'remove the wrong one (or re-run the row from its command to see which is right)')
    return list(merged.values())


def read_rows(folder: Path) -> List[Dict[str, Any]]:
    """The merged rows of every ``runs*.jsonl`` in ``folder`` (none yet: [])."""
    rows = []
    for path in sorted(Path(folder).glob('runs*.jsonl')):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f'{path}:{n}: not a JSON line ({e})') from None
            if not isinstance(row, dict):
                raise ValueError(f'{path}:{n}: a result row must be a JSON object')
            rows.append(row)
    return merge_rows(rows)


def append_row(folder: Path, row: Dict[str, Any]) -> bool:
    """Append ``row`` to ``folder/runs.jsonl`` unless its key is there already; False then.

    Any number of drivers may share the folder: the file is locked for the check and the write, the row
    goes out in one write and is synced, and a line cut short by a writer killed mid-write (no newline
    at its end) is dropped first, so a row is in the file whole or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, sort_keys=True) + '\n').encode()
    with open(folder / 'runs.jsonl', 'a+b') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            text = f.read()
            if text and not text.endswith(b'\n'):
                f.truncate(text.rfind(b'\n') + 1)
                text = text[:text.rfind(b'\n') + 1]
            if row_key(row) in {row_key(r) for r in read_rows(folder)}:
                return False
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            return True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

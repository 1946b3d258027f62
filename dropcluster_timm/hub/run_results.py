""" Results of a training run and results tables: load, check, format.

A run's results come from the metrics file it wrote (``load_metrics``: a JSON object whose keys
``check_metrics`` checks, or the ``summary.csv`` of timm's train.py). A results table is a JSON file of
another experiment's figures (``load_results_table``, checked by ``check_results_table``) that a model
card shows as a section of its comparison (``format_results_table``); ``benchmarks/study_cifar10.py``
writes the CIFAR-10 study's. ``dropcluster_timm.hub.model_card`` renders the cards from them.
"""
import csv
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from huggingface_hub.utils import validate_repo_id

__all__ = ['load_metrics', 'check_metrics', 'dataset_name', 'check_results_table', 'load_results_table',
           'format_results_table']


def load_metrics(path: Union[str, Path]) -> Dict[str, Any]:
    """Read the results of a run: a JSON object of results, or a per-epoch file of the run.

    JSON: an object with these keys, all but ``top1`` optional (``check_metrics`` checks them):
      * ``top1``, ``top5``: accuracy in percent on the evaluation split; the card's results table and
        its ``model-index`` (as fractions, the Hub's ``accuracy`` convention).
      * ``eval_loss``, ``epoch``: kept in metrics.json, not shown.
      * ``epochs``: length of the run; ``img_size``: the image size of the run (card statistics and table).
      * ``dataset``: human-readable name of the data set, shown in the card body (e.g.
        "scikit-learn handwritten digits", an ImageFolder's folder name); of a path only the last
        component is shown.
      * ``dataset_id``: the data set's Hugging Face Hub id: the header's ``datasets:`` (without it
        there is none) and the ``model-index`` data set.
      * ``dataset_type``: the ``model-index`` data set type without a Hub id (default 'imagefolder').
      * ``split``: the evaluation split, e.g. 'validation'.
      * ``base_model``: Hub id of the weights these were fine-tuned from, e.g. 'timm/resnet18.a1_in1k'.
      * ``weights``: 'ema' (exponential moving average, with ``ema_decay``) or 'raw'; the results are
        those of these weights.
      * ``peak_drop_rate``: the highest DropCluster rate the schedule reached (0: never switched on);
        ``reclusterings``: how many times the cluster maps were re-computed.
      * ``drop_block_rate``: DropBlock rate of a plain timm model.
      * ``pruned_from``: the architecture the weights were channel-pruned from (e.g. 'resnet18'), with
        ``pruning_method`` ('edropout' or 'magnitude'), ``top1_before_pruning`` (the same evaluation of
        the network before its channels were removed), ``kept_channels`` (share of the prunable
        channels kept) and ``edropout_steps`` (evolution steps of the energy search).
      * ``notes``: free text shown under the results.

    A run's per-epoch files are read too: ``summary.csv`` (timm's train.py and ``train_timm.py``),
    ``metrics.csv`` and the run-level ``metrics.json`` (a list of rows) of ``train_timm.py``; the
    row with the best top-1 (of the EMA weights when the run has them) gives ``top1``, ``top5``,
    ``epoch`` and ``epochs``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'metrics file not found: {path}')
    if path.suffix == '.csv':
        with path.open(newline='') as f:
            return _best_row(list(csv.DictReader(f)), path)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f'{path} is not valid JSON: {e}') from None
    if isinstance(data, list):
        return _best_row(data, path)
    return check_metrics(data, source=str(path))


def _best_row(rows: List[Dict[str, Any]], path: Path) -> Dict[str, Any]:
    """The results of the best epoch of a per-epoch file: timm's ``eval_top1`` columns, or the
    ``top1`` / ``ema_top1`` ones of ``train_timm.py``'s metrics files."""
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    prefix = next((p for p in ('ema_', 'eval_', '') if f'{p}top1' in columns), None)
    rows = [r for r in rows if prefix is not None and r.get(f'{prefix}top1') not in (None, '')]
    if not rows:
        raise ValueError(f'{path}: no rows with a top1 column (expected a summary.csv, metrics.csv or metrics.json '
                         'of a training run)')
    best = max(rows, key=lambda r: float(r[f'{prefix}top1']))
    metrics = {'top1': float(best[f'{prefix}top1']), 'epoch': int(float(best['epoch'])), 'epochs': len(rows)}
    if best.get(f'{prefix}top5') not in (None, ''):
        metrics['top5'] = float(best[f'{prefix}top5'])
    if prefix == 'ema_':
        metrics['weights'] = 'ema'
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metrics(metrics: Any, source: str = 'metrics') -> Dict[str, Any]:
    """Check the keys of a run's results that the card reads (see ``load_metrics``); returns ``metrics``.

    Raises ``ValueError`` naming ``source`` and the key for anything the card would misreport.
    """
    if not isinstance(metrics, dict) or not _is_number(metrics.get('top1')):
        raise ValueError(f'{source}: expected a JSON object with a numeric "top1"')
    for key in ('top5', 'eval_loss', 'ema_decay', 'peak_drop_rate', 'drop_block_rate', 'top1_before_pruning',
                'kept_channels'):
        if metrics.get(key) is not None and not _is_number(metrics[key]):
            raise ValueError(f'{source}: "{key}" must be a number, got {metrics[key]!r}')
    for key in ('dataset_id', 'base_model'):
        if metrics.get(key) is not None:
            try:
                validate_repo_id(metrics[key])
            except ValueError:  # HFValidationError: a local path or other non-Hub name
                raise ValueError(f'{source}: "{key}" must be a Hugging Face Hub id like "name" or "org/name", '
                                 f'got {metrics[key]!r}') from None
    if metrics.get('weights') not in (None, 'ema', 'raw'):
        raise ValueError(f'{source}: "weights" must be "ema" or "raw", got {metrics["weights"]!r}')
    for key in ('reclusterings', 'edropout_steps'):
        count = metrics.get(key)
        if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise ValueError(f'{source}: "{key}" must be a count >= 0, got {count!r}')
    if metrics.get('pruning_method') not in (None, 'edropout', 'magnitude'):
        raise ValueError(f'{source}: "pruning_method" must be "edropout" or "magnitude", got '
                         f'{metrics["pruning_method"]!r}')
    if metrics.get('kept_channels') is not None and not 0 < metrics['kept_channels'] <= 1:
        raise ValueError(f'{source}: "kept_channels" must be in (0, 1], got {metrics["kept_channels"]!r}')
    return metrics


def dataset_name(metrics: Dict[str, Any]) -> Optional[str]:
    """The data set's name for the card body: ``dataset`` (of a path only its last component, as a
    local path means nothing to readers), else ``dataset_id``; None when neither is given."""
    name = str(metrics.get('dataset') or '').strip().rstrip('/\\')
    name = re.split(r'[/\\]', name)[-1]
    return name or metrics.get('dataset_id') or None


_TABLE_KEYS = ('title', 'description', 'columns', 'rows')
_TABLE_OPTIONAL = ('notes', 'align')
_ALIGN = {'left': '---', 'right': '---:', 'center': ':---:'}


def _is_line(value: Any) -> bool:
    """A string without line breaks: a line break would end a markdown table row or heading."""
    return isinstance(value, str) and '\n' not in value and '\r' not in value


def check_results_table(table: Any, source: str = 'results table') -> Dict[str, Any]:
    """Check a results table (see ``load_results_table``); returns ``table``.

    Raises ``ValueError`` naming ``source`` and what is wrong.
    """
    if not isinstance(table, dict):
        raise ValueError(f'{source}: expected a JSON object with keys {", ".join(_TABLE_KEYS)}')
    missing = [k for k in _TABLE_KEYS if k not in table]
    if missing:
        raise ValueError(f'{source}: missing key(s) {", ".join(missing)}')
    unknown = sorted(set(table) - set(_TABLE_KEYS) - set(_TABLE_OPTIONAL))
    if unknown:  # a misspelt "notes" would otherwise vanish from the card without a word
        raise ValueError(f'{source}: unknown key(s) {", ".join(unknown)}; '
                         f'expected {", ".join(_TABLE_KEYS + _TABLE_OPTIONAL)}')
    for key in ('title', 'description', 'notes'):
        if key in table and not isinstance(table[key], str):
            raise ValueError(f'{source}: "{key}" must be a string, got {table[key]!r}')
    if not (_is_line(table['title']) and table['title'].strip()):
        raise ValueError(f'{source}: "title" must be one non-empty line (it is the section heading)')
    columns = table['columns']
    if not (isinstance(columns, list) and columns and all(_is_line(c) for c in columns)):
        raise ValueError(f'{source}: "columns" must be a non-empty list of one-line strings, got {columns!r}')
    if 'align' in table and (not isinstance(table['align'], list) or len(table['align']) != len(columns)
                             or any(a not in _ALIGN for a in table['align'])):
        raise ValueError(f'{source}: "align" must list one of {", ".join(_ALIGN)} per column '
                         f'({len(columns)}), got {table["align"]!r}')
    if not isinstance(table['rows'], list):
        raise ValueError(f'{source}: "rows" must be a list of rows, got {table["rows"]!r}')
    for i, row in enumerate(table['rows']):
        if not isinstance(row, list):
            raise ValueError(f'{source}: row {i} must be a list of cells, got {row!r}')
        if len(row) != len(columns):
            raise ValueError(f'{source}: row {i} has {len(row)} cells, expected one per column ({len(columns)})')
        for cell in row:
            if not (_is_number(cell) or _is_line(cell)):
                raise ValueError(f'{source}: row {i}: cells must be numbers or one-line strings, got {cell!r}')
    return table


def load_results_table(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a results table for a card's comparison section, a JSON object:

      * ``title``: heading of the section; ``description``: a markdown paragraph above the table.
      * ``columns``: column headers; ``rows``: lists of one cell (string or number) per column.
      * ``notes`` (optional): markdown under the table.
      * ``align`` (optional): 'left', 'right' or 'center' per column; by default columns of numbers
        only are right-aligned, the others left.

    ``benchmarks/study_cifar10.py`` writes one (``benchmarks/results/study_cifar10_card_table.json``).
    Raises ``FileNotFoundError``, or ``ValueError`` naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'results table not found: {path}')
    try:
        table = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    return check_results_table(table, source=str(path))


def _cell(value: Union[str, int, float]) -> str:
    if isinstance(value, float):
        return f'{value:.15g}'  # 0.0 as 0, and no float noise (0.1 + 0.2 as 0.3)
    return str(value).replace('|', '\\|')  # a bare pipe would split the cell


def format_results_table(table: Dict[str, Any]) -> str:
    """A ``### title`` section: description, the markdown table, notes."""
    columns, rows = table['columns'], table['rows']
    align = table.get('align') or ['right' if rows and all(_is_number(r[i]) for r in rows) else 'left'
                                   for i in range(len(columns))]
    lines = [
        f'### {table["title"].strip()}',
        '',
        table['description'].strip(),
        '',
        '| ' + ' | '.join(_cell(c) for c in columns) + ' |',
        '|' + '|'.join(_ALIGN[a] for a in align) + '|',
    ]
    lines += ['| ' + ' | '.join(_cell(c) for c in row) + ' |' for row in rows]
    if table.get('notes', '').strip():
        lines += ['', table['notes'].strip()]
    return '\n'.join(lines) + '\n'

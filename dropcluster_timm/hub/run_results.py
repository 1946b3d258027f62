""" Results of a training run and results tables: load, check, format.

A run's results are a ``RunResults``: built by the trainer, read from the metrics file a run wrote
(``load_metrics``: a JSON object of its fields, or the ``summary.csv`` of timm's train.py), checked
when built, and written by ``hub.save_pretrained`` as ``metrics.json``. A results table is a JSON file
of another experiment's figures (``load_results_table``, checked by ``check_results_table``) that a
model card shows as a section of its comparison (``format_results_table``).
``dropcluster_timm.hub.model_card`` renders the cards from them.
"""
import csv
import dataclasses
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from huggingface_hub.utils import validate_repo_id

__all__ = ['RunResults', 'load_metrics', 'check_results_table', 'load_results_table', 'format_results_table']


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class RunResults:
    """The results of the run that trained a model's weights, and how it was trained; the card's
    results table, ``model-index`` and training notes read them. Only ``top1`` is required.

    Attributes:
        top1, top5: accuracy in percent on the evaluation split (the ``model-index`` shows them as
            fractions, the Hub's ``accuracy`` convention).
        eval_loss, epoch: kept in metrics.json, not shown.
        epochs: length of the run; img_size: its image size (card statistics and table).
        dataset: human-readable name of the data set (of a path only the last component is shown).
        dataset_id: the data set's Hub id: the header's ``datasets:`` and the ``model-index`` data set.
        dataset_type: the ``model-index`` data set type without a Hub id (default 'imagefolder').
        split: the evaluation split, e.g. 'validation'.
        base_model: Hub id of the weights these were fine-tuned from, e.g. 'timm/resnet18.a1_in1k'.
        weights: 'ema' (exponential moving average, with ``ema_decay``) or 'raw'.
        peak_drop_rate: the highest DropCluster rate the schedule reached (0: never switched on);
            reclusterings: how many times the cluster maps were re-computed.
        drop_block_rate: DropBlock rate of a plain timm model.
        pruned_from: the architecture the weights were channel-pruned from, with ``pruning_method``
            ('edropout' or 'magnitude'), ``top1_before_pruning``, ``kept_channels`` (share of the
            prunable channels kept) and ``edropout_steps`` (evolution steps of the energy search).
        notes: free text shown under the results.
    """
    top1: float
    top5: Optional[float] = None
    eval_loss: Optional[float] = None
    epoch: Optional[int] = None
    epochs: Optional[int] = None
    img_size: Optional[int] = None
    dataset: Optional[str] = None
    dataset_id: Optional[str] = None
    dataset_type: Optional[str] = None
    split: Optional[str] = None
    base_model: Optional[str] = None
    weights: Optional[str] = None
    ema_decay: Optional[float] = None
    peak_drop_rate: Optional[float] = None
    reclusterings: Optional[int] = None
    drop_block_rate: Optional[float] = None
    pruned_from: Optional[str] = None
    pruning_method: Optional[str] = None
    top1_before_pruning: Optional[float] = None
    kept_channels: Optional[float] = None
    edropout_steps: Optional[int] = None
    notes: Optional[str] = None

    def __post_init__(self) -> None:
        self.check()

    def check(self, source: str = 'results') -> None:
        """Raise ``ValueError`` naming ``source`` and the field for anything a card would misreport."""
        if not _is_number(self.top1):
            raise ValueError(f'{source}: "top1" must be a number, got {self.top1!r}')
        for key in ('top5', 'eval_loss', 'ema_decay', 'peak_drop_rate', 'drop_block_rate', 'top1_before_pruning',
                    'kept_channels'):
            value = getattr(self, key)
            if value is not None and not _is_number(value):
                raise ValueError(f'{source}: "{key}" must be a number, got {value!r}')
        for key in ('epoch', 'epochs', 'img_size', 'reclusterings', 'edropout_steps'):
            value = getattr(self, key)
            if value is not None and not _is_count(value):
                raise ValueError(f'{source}: "{key}" must be a count >= 0, got {value!r}')
        for key in ('dataset', 'dataset_type', 'split', 'pruned_from', 'notes'):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f'{source}: "{key}" must be a string, got {value!r}')
        for key in ('dataset_id', 'base_model'):
            value = getattr(self, key)
            if value is not None:
                try:
                    validate_repo_id(value)
                except ValueError:  # HFValidationError: a local path or other non-Hub name
                    raise ValueError(f'{source}: "{key}" must be a Hugging Face Hub id like "name" or "org/name", '
                                     f'got {value!r}') from None
        if self.weights not in (None, 'ema', 'raw'):
            raise ValueError(f'{source}: "weights" must be "ema" or "raw", got {self.weights!r}')
        if self.pruning_method not in (None, 'edropout', 'magnitude'):
            raise ValueError(f'{source}: "pruning_method" must be "edropout" or "magnitude", got '
                             f'{self.pruning_method!r}')
        for key, low, high in (('top1', 0, 100), ('top5', 0, 100), ('top1_before_pruning', 0, 100),
                               ('peak_drop_rate', 0, 1), ('drop_block_rate', 0, 1), ('ema_decay', 0, 1),
                               ('eval_loss', 0, float('inf'))):
            value = getattr(self, key)
            if value is not None and not low <= value <= high:
                raise ValueError(f'{source}: "{key}" must be in [{low:g}, {high:g}], got {value!r}')
        if self.top5 is not None and self.top5 < self.top1:
            raise ValueError(f'{source}: "top5" ({self.top5!r}) cannot be below "top1" ({self.top1!r})')
        if self.epoch is not None and self.epochs is not None and self.epoch >= self.epochs:
            raise ValueError(f'{source}: "epoch" {self.epoch} (counted from 0) must be below "epochs" {self.epochs}')
        if self.kept_channels is not None and not 0 < self.kept_channels <= 1:
            raise ValueError(f'{source}: "kept_channels" must be in (0, 1], got {self.kept_channels!r}')

    @classmethod
    def from_dict(cls, data: Any, source: str = 'results') -> 'RunResults':
        """Results from a mapping of field names (a metrics.json object); refuses unknown names, since
        a misspelt one would vanish from the card without a word."""
        if isinstance(data, RunResults):
            return data
        if not isinstance(data, Mapping) or 'top1' not in data:
            raise ValueError(f'{source}: expected a JSON object with a numeric "top1"')
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f'{source}: unknown key(s) {", ".join(map(str, unknown))}; expected some of {", ".join(names)}')
        try:
            return cls(**data)
        except ValueError as e:  # name the file, not just "results"
            raise ValueError(str(e).replace('results:', f'{source}:', 1)) from None

    def to_dict(self) -> Dict[str, Any]:
        """The fields that are set, in declaration order (metrics.json)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def replace(self, **changes: Any) -> 'RunResults':
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @property
    def dataset_name(self) -> Optional[str]:
        """The data set's name for the card body: ``dataset`` (of a path only its last component, as a
        local path means nothing to readers), else ``dataset_id``; None when neither is given."""
        name = re.split(r'[/\\]', str(self.dataset or '').strip().rstrip('/\\'))[-1]
        return name or self.dataset_id or None


def load_metrics(path: Union[str, Path]) -> RunResults:
    """Read the results of a run: a JSON object of ``RunResults`` fields, or a per-epoch file of the run.

    Per-epoch files: ``summary.csv`` (timm's train.py and ``train_timm.py``), ``metrics.csv`` and the
    run-level ``metrics.json`` (a list of rows) of ``train_timm.py``; the row with the best top-1 (of
    the EMA weights when the run has them) gives ``top1``, ``top5``, ``epoch`` and ``epochs``.
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
    return RunResults.from_dict(data, source=str(path))


def _best_row(rows: List[Dict[str, Any]], path: Path) -> RunResults:
    """The results of the best epoch of a per-epoch file: timm's ``eval_top1`` columns, or the
    ``top1`` / ``ema_top1`` ones of ``train_timm.py``'s metrics files."""
    columns = set().union(*(r.keys() for r in rows if isinstance(r, dict))) if rows else set()
    prefix = next((p for p in ('ema_', 'eval_', '') if f'{p}top1' in columns), None)
    rows = [r for r in rows if isinstance(r, dict) and prefix is not None and r.get(f'{prefix}top1') not in (None, '')]
    if not rows:
        raise ValueError(f'{path}: no rows with a top1 column (expected a summary.csv, metrics.csv or metrics.json '
                         'of a training run)')
    try:
        best = max(rows, key=lambda r: float(r[f'{prefix}top1']))
        top5 = best.get(f'{prefix}top5')
        epochs = max(len(rows), 1 + max(int(float(r['epoch'])) for r in rows))  # a resumed run's file may start late
        return RunResults(top1=float(best[f'{prefix}top1']), epoch=int(float(best['epoch'])), epochs=epochs,
                          top5=float(top5) if top5 not in (None, '') else None,
                          weights='ema' if prefix == 'ema_' else None)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{path}: a row has no readable top1 / epoch ({e})') from None


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

    The study's report writes one (``benchmarks/results/study_v5/card_table.json``).
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

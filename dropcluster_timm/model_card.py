""" Model cards for the DropCluster models and for weights trained with this package, in timm's Hub card format.

The card body is a timm ``model_card`` dict rendered by timm's own ``generate_readme`` (Model Details,
Model Usage, Model Comparison and Citation sections), so it reads like the cards of timm's own
weights. The YAML header is built with ``huggingface_hub.ModelCardData``: ``library_name: timm``,
tags, license, ``pipeline_tag``, and for trained weights ``base_model``, ``datasets`` (a Hub data set
id only) and a ``model-index`` with the run's accuracy (``EvalResult``). Every generated card carries
``CARD_MARKER``, so ``hub.push`` knows which cards it may re-render and leaves hand-written ones alone.

Model statistics are measured, not typed in:
  * Params (M): parameters of the model, classifier included.
  * GMACs: multiply-accumulates of one forward at the card's image size, counted with
    ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2; convolutions, matmuls, as fvcore
    counts them). The model runs on the 'meta' device, so no memory or compute is spent.
  * Activations (M): output elements of every convolution and linear layer, fvcore's activation
    count that timm's cards use.

Results come only from a metrics file written by a real run (``load_metrics`` lists the keys the
card reads); without one the card of a ``*_dropcluster`` architecture says that no DropCluster-trained
weights are published yet. A card can also carry results tables of other experiments (JSON files read
by ``load_results_table``), each a section of its comparison: the committed ``resnet18_dropcluster`` card
carries the table of the CIFAR-10 study, which ``benchmarks/study_cifar10.py`` writes.

Regenerate the committed cards with
``dropcluster-timm cards --table resnet18_dropcluster=benchmarks/results/study_cifar10_card_table.json``.
"""
import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.utils import validate_repo_id
from timm.models import get_pretrained_cfg, list_pretrained
from timm.models._hub import generate_readme
from timm.models._input import get_model_input_config
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['model_stats', 'format_stat', 'load_metrics', 'check_metrics', 'dataset_name', 'training_notes',
           'is_dropcluster_architecture', 'check_results_table', 'load_results_table', 'build_model_card',
           'render_model_card', 'write_model_cards', 'CITATIONS', 'PAPERS', 'CARD_MARKER', 'CLUSTER_MAPS_IMAGE']

# In every generated card (an HTML comment, invisible on the Hub): push re-renders only cards that carry it.
CARD_MARKER = '<!-- dropcluster-timm card -->'
# The picture of the cluster maps that hub.save_pretrained writes next to the weights.
CLUSTER_MAPS_IMAGE = 'cluster_maps.png'
PIP_PACKAGE = 'dropcluster-timm'  # the distribution name in pyproject.toml
# Usage examples of weights not on the Hub yet; hub.push replaces it with hf-hub:<repo_id> before uploading.
LOCAL_MODEL_ID = 'local-dir:path/to/this/folder'
# YAML header keys in the order of timm's own cards; model-index comes last.
_HEADER_ORDER = ['tags', 'pipeline_tag', 'library_name', 'license', 'base_model', 'datasets', 'metrics']

PAPERS = {
    'DropCluster: A structured dropout for convolutional networks': 'https://arxiv.org/abs/2002.02997',
    'DropBlock: A regularization method for convolutional networks': 'https://arxiv.org/abs/1810.12890',
    'Deep Residual Learning for Image Recognition': 'https://arxiv.org/abs/1512.03385',
}

# bibtex by paper; plain timm models cite timm (and DropBlock when trained with it) only
_CITATIONS = {
    'dropcluster': """@article{chen2020dropcluster,
  title={DropCluster: A structured dropout for convolutional networks},
  author={Chen, Liyan and Gautier, Philip and Aydore, Sergul},
  journal={arXiv preprint arXiv:2002.02997},
  year={2020}
}""",
    'dropblock': """@inproceedings{ghiasi2018dropblock,
  title={DropBlock: A regularization method for convolutional networks},
  author={Ghiasi, Golnaz and Lin, Tsung-Yi and Le, Quoc V},
  booktitle={Advances in Neural Information Processing Systems},
  year={2018}
}""",
    'resnet': """@inproceedings{he2016deep,
  title={Deep Residual Learning for Image Recognition},
  author={He, Kaiming and Zhang, Xiangyu and Ren, Shaoqing and Sun, Jian},
  booktitle={Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition},
  pages={770--778},
  year={2016}
}""",
    'timm': """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}""",
}
CITATIONS = list(_CITATIONS.values())

NO_RESULTS = ('No DropCluster-trained weights are published yet, so there are no results for this model. '
              'The pretrained tags listed above are timm\'s ImageNet-1k weights of the base ResNet with '
              'grid-initialised cluster maps, a starting point for fine-tuning with DropCluster; their '
              'accuracy is that of the base timm weights.')
NO_RUN_RESULTS = 'No results of a training run were given for these weights.'


def is_dropcluster_architecture(architecture: str, model_args: Optional[Dict[str, Any]] = None) -> bool:
    """Whether ``architecture`` (with the ``model_args`` of its config.json) is a DropCluster model,
    i.e. its checkpoints carry cluster maps; any other timm architecture is a plain model."""
    return 'drop_cluster_prob' in (model_args or {}) or architecture.split('.')[0].endswith('_dropcluster')


def format_stat(value: float) -> str:
    """A model statistic for the card: one decimal from 10 up, three significant digits below (so the
    GMACs of a small model at a small image size do not print as 0.0)."""
    if value >= 10:
        return f'{value:.1f}'
    if value <= 0:
        return '0'
    return f'{value:.{max(2 - math.floor(math.log10(value)), 0)}f}'


@torch.no_grad()
def model_stats(
        model_name: str,
        img_size: Optional[Union[int, Sequence[int]]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> Dict[str, Any]:
    """Params (M), GMACs and Activations (M) of ``model_name`` for one image (see module docstring).

    Args:
        model_name: any timm classification architecture (optionally ``arch.tag``).
        img_size: input size of the count; None: the model's own input size (its ``img_size``
            argument where it has one, else its pretrained config's).
        model_args: arguments the model is built with, e.g. config.json's ``model_args``.
        **kwargs: more model arguments (override ``model_args``).
    """
    model = timm.create_model(model_name, pretrained=False, device='meta', **{**(model_args or {}), **kwargs}).eval()
    if img_size is None:
        img_size = get_model_input_config(model)['input_size'][-2:]
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    x = torch.empty((1, model.in_chans, *size), device='meta')
    activations = []

    def count(module, args, output):
        activations.append(output.numel())

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'gmacs': counter.get_total_flops() / 2 / 1e9,
        'activations_m': sum(activations) / 1e6,
        'img_size': size,
    }


def load_metrics(path: Union[str, Path]) -> Dict[str, Any]:
    """Read the results of a run: a JSON file, or the ``summary.csv`` that timm's train.py writes.

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
      * ``notes``: free text shown under the results.

    CSV: the row with the best ``eval_top1`` gives ``top1``, ``top5``, ``epoch`` and ``epochs``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'metrics file not found: {path}')
    if path.suffix == '.csv':
        with path.open(newline='') as f:
            rows = [r for r in csv.DictReader(f) if r.get('eval_top1')]
        if not rows:
            raise ValueError(f'{path}: no rows with an eval_top1 column (expected timm train.py summary.csv)')
        best = max(rows, key=lambda r: float(r['eval_top1']))
        metrics = {'top1': float(best['eval_top1']), 'epoch': int(float(best['epoch'])), 'epochs': len(rows)}
        if best.get('eval_top5'):
            metrics['top5'] = float(best['eval_top5'])
        return metrics
    return check_metrics(json.loads(path.read_text()), source=str(path))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metrics(metrics: Any, source: str = 'metrics') -> Dict[str, Any]:
    """Check the keys of a run's results that the card reads (see ``load_metrics``); returns ``metrics``.

    Raises ``ValueError`` naming ``source`` and the key for anything the card would misreport.
    """
    if not isinstance(metrics, dict) or not _is_number(metrics.get('top1')):
        raise ValueError(f'{source}: expected a JSON object with a numeric "top1"')
    for key in ('top5', 'eval_loss', 'ema_decay', 'peak_drop_rate', 'drop_block_rate'):
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
    count = metrics.get('reclusterings')
    if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        raise ValueError(f'{source}: "reclusterings" must be a count >= 0, got {count!r}')
    return metrics


def dataset_name(metrics: Dict[str, Any]) -> Optional[str]:
    """The data set's name for the card body: ``dataset`` (of a path only its last component, as a
    local path means nothing to readers), else ``dataset_id``; None when neither is given."""
    name = str(metrics.get('dataset') or '').strip().rstrip('/\\')
    name = re.split(r'[/\\]', name)[-1]
    return name or metrics.get('dataset_id') or None


def training_notes(model_name: str, metrics: Dict[str, Any], dropcluster: bool) -> str:
    """What the weights are and how they were trained, from the run's ``metrics``: the description of
    the card and the ``notes`` of config.json's pretrained_cfg."""
    arch = model_name.split('.')[0]
    text = f'A {arch} image classification model'
    name = dataset_name(metrics)
    if metrics.get('base_model'):
        text += f' fine-tuned from {metrics["base_model"]}'
    elif name or metrics.get('epochs') or metrics.get('img_size'):
        text += ' trained'
    if name:
        text += f' on {name}'
    if metrics.get('epochs'):
        text += f' for {metrics["epochs"]} epochs'
    if metrics.get('img_size'):
        text += f' at {_size_text(metrics["img_size"])} px'
    text += '.'
    peak, count = metrics.get('peak_drop_rate'), metrics.get('reclusterings')
    if not dropcluster:
        text += ' It has no DropCluster layers'
        if metrics.get('drop_block_rate'):
            text += f' and was trained with DropBlock (rate {metrics["drop_block_rate"]:g})'
        text += '.'
    elif peak is None:  # metrics of older runs do not say what the schedule did
        text += ' It has DropCluster structured dropout layers.'
    elif peak > 0:
        text += f' It was trained with DropCluster (peak rate {peak:g}'
        text += f', clusters re-computed {count} times).' if count is not None else ').'
    else:
        text += (' Its DropCluster layers were present but never switched on (rate 0 throughout), so it '
                 'was trained without structured dropout.')
    if metrics.get('weights') == 'ema':
        decay = metrics.get('ema_decay')
        text += (' These are the exponential-moving-average (EMA) weights of the run'
                 + (f' (decay {decay:g})' if decay is not None else '')
                 + '; the results are those of the EMA weights.')
    elif metrics.get('weights') == 'raw':
        text += ' These are the raw weights of the run (no weight averaging).'
    return text


def _size_text(size: Union[int, Sequence[int]]) -> str:
    h, w = (size, size) if isinstance(size, int) else size[-2:]
    return f'{h} x {w}'


# The keys of a results table file (see ``load_results_table``): required, then optional.
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


def _results_table(table: Dict[str, Any]) -> str:
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


_TRAINING_USAGE = """### Training with DropCluster
```python
import timm
import torch
import dropcluster_timm

model = timm.create_model('{model_id}', pretrained=True, drop_cluster_prob=0.1)
images = torch.randn(32, 3, 224, 224)  # a batch of training images
# re-cluster the DropCluster layers from the batch, e.g. every few epochs
dropcluster_timm.update_clusters(model, images)
dropcluster_timm.set_drop_prob(model, 0.1)  # or follow a schedule
```
"""


def _usage(model_id: str, dropcluster: bool) -> str:
    """The Model Usage section. ``model_id``: a registered name, ``hf-hub:org/name`` for pushed
    weights or ``LOCAL_MODEL_ID`` for weights not pushed yet; ``dropcluster``: the architecture is a
    DropCluster model (needs this package), else a plain timm model."""
    if dropcluster:
        intro = (f'Install `{PIP_PACKAGE}` and import `dropcluster_timm` before creating the model: the import '
                 'registers the DropCluster models with timm (timm has no plugin discovery).\n\n'
                 f'```bash\npip install {PIP_PACKAGE}\n```\n')
    else:
        intro = 'A plain timm model (no DropCluster layers): timm alone loads it.\n\n```bash\npip install timm\n```\n'
    if model_id == LOCAL_MODEL_ID:
        intro += ('\nThese weights are not on the Hugging Face Hub yet, so the examples load the folder this card '
                  'is in (`path/to/this/folder`). `dropcluster-timm push FOLDER --repo-id org/name` (or '
                  '`dropcluster_timm.push`) uploads them with this card rewritten to load `hf-hub:org/name`.\n')
    register = '\nimport dropcluster_timm  # registers *_dropcluster models with timm' if dropcluster else ''
    return intro + f"""
### Image Classification
```python
from urllib.request import urlopen
from PIL import Image
import timm
import torch{register}

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model('{model_id}', pretrained=True)
model = model.eval()

# get model specific transforms (normalization, resize)
data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1

top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)
```

### Feature Map Extraction
```python
from urllib.request import urlopen
from PIL import Image
import timm{register}

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model(
    '{model_id}',
    pretrained=True,
    features_only=True,
)
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1

for o in output:
    # print shape of each feature map in output
    print(o.shape)
```

### Image Embeddings
```python
from urllib.request import urlopen
from PIL import Image
import timm{register}

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model(
    '{model_id}',
    pretrained=True,
    num_classes=0,  # remove classifier nn.Linear
)
model = model.eval()

data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)

output = model(transforms(img).unsqueeze(0))  # output is (batch_size, num_features) shaped tensor

# or equivalently (without needing to set num_classes=0)
output = model.forward_features(transforms(img).unsqueeze(0))  # unpooled, a (1, num_features, H, W) tensor
output = model.forward_head(output, pre_logits=True)  # a (1, num_features) tensor
```
""" + ('\n' + _TRAINING_USAGE.format(model_id=model_id) if dropcluster else '')


def _results(model_name: str, metrics: Optional[Dict[str, Any]], dropcluster: bool) -> str:
    if not metrics:
        return (NO_RESULTS if dropcluster else NO_RUN_RESULTS) + '\n'
    size = metrics.get('img_size')
    size = f'{size}' if size is not None else ''
    top5 = metrics.get('top5')
    source = 'from its metrics file'
    if metrics.get('split'):
        source += f', on the {metrics["split"]} split'
    if metrics.get('weights') == 'ema':
        source += ', EMA weights'
    lines = [
        f'Results of the run that produced these weights ({source}):',
        '',
        '| model | dataset | img_size | top1 | top5 |',
        '|---|---|---|---|---|',
        f'| {model_name} | {dataset_name(metrics) or ""} | {size} | {metrics["top1"]:.3f} | '
        f'{"" if top5 is None else f"{top5:.3f}"} |',
    ]
    if metrics.get('notes'):
        lines += ['', str(metrics['notes'])]
    return '\n'.join(lines) + '\n'


def _card_data(model_name: str, metrics: Optional[Dict[str, Any]], dropcluster: bool, license: str) -> ModelCardData:
    """The YAML header: for trained weights ``base_model``, ``datasets`` (Hub ids only) and ``model-index``."""
    datasets, base_model, eval_results = None, None, None
    if metrics:
        datasets = [metrics['dataset_id']] if metrics.get('dataset_id') else None
        base_model = metrics.get('base_model')
        name = dataset_name(metrics)
        if name:  # a model-index result needs its data set
            where = dict(task_type='image-classification', task_name='Image Classification',
                         dataset_type=metrics.get('dataset_id') or metrics.get('dataset_type') or 'imagefolder',
                         dataset_name=name, dataset_split=metrics.get('split'))
            # the Hub's `accuracy` metric is a fraction; the card body keeps timm's percentages
            eval_results = [EvalResult(metric_type='accuracy', metric_name=f'Top-{k} accuracy',
                                       metric_value=round(metrics[key] / 100, 6), **where)
                            for k, key in ((1, 'top1'), (5, 'top5')) if metrics.get(key) is not None]
    elif dropcluster:
        datasets = ['imagenet-1k']  # the pretrained tags are timm's ImageNet-1k weights
    return ModelCardData(
        tags=['image-classification', 'timm'] + (['dropcluster'] if dropcluster else []),
        pipeline_tag='image-classification',
        library_name='timm',
        license=license,
        base_model=base_model,
        datasets=datasets,
        metrics=['accuracy'] if eval_results else None,
        eval_results=eval_results,
        model_name=model_name if eval_results else None,
    )


def build_model_card(
        model_name: str,
        metrics: Optional[Dict[str, Any]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        license: str = 'apache-2.0',
        repo_id: Optional[str] = None,
        tables: Optional[Sequence[Dict[str, Any]]] = None,
        cluster_maps: Optional[str] = None,
) -> Dict[str, Any]:
    """timm ``model_card`` dict for ``model_name`` (an architecture, optionally ``arch.tag``), plus
    ``card_data`` (the YAML header, a ``ModelCardData``) and ``cluster_maps``.

    Args:
        model_name: a registered ``*_dropcluster`` name, e.g. ``'resnet50_dropcluster'``, or any
            other timm classification architecture (weights trained without DropCluster layers).
        metrics: results of the real run that trained the weights (keys: see ``load_metrics``);
            ``None``: the card of the architecture, which says no DropCluster-trained weights are published.
        model_args: the model arguments of the weights (config.json ``model_args``).
        license: license in the card header: the code's (or, for a fine-tune, the base weights');
            each pretrained tag lists its weights' own.
        repo_id: Hub repo of the weights; the usage examples then load ``hf-hub:<repo_id>``. Trained
            weights without one load ``LOCAL_MODEL_ID``, which ``hub.push`` replaces.
        tables: results tables (``load_results_table``), each a section of the comparison, in order.
        cluster_maps: file name of a cluster-map picture next to the card, shown in it.
    """
    if not timm.is_model(model_name.split('.')[0]):
        raise ValueError(f'unknown model {model_name!r}; did you `import dropcluster_timm`?')
    arch = model_name.split('.')[0]
    model_args = dict(model_args or {})
    dropcluster = is_dropcluster_architecture(arch, model_args)
    if metrics:
        check_metrics(metrics)
    tables = [check_results_table(t) for t in tables or ()]
    stats = model_stats(model_name, img_size=(metrics or {}).get('img_size'), model_args=model_args)
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {
            'Params (M)': format_stat(stats['params_m']),
            'GMACs': format_stat(stats['gmacs']),
            'Activations (M)': format_stat(stats['activations_m']),
            'Image size': _size_text(stats['img_size']),
        },
    }
    if dropcluster:
        dc = {
            'Rate (drop_cluster_prob)': f"{model_args.get('drop_cluster_prob', 0.0):g}",
            'Placement': ('stages ' + ', '.join(str(s) for s in model_args.get('dc_stages', (3, 4)))
                          + ' (every block, in the DropBlock slot)'
                          + ('; stem (after conv, norm and activation, before max-pooling)'
                             if model_args.get('dc_stem') else '')),
            'Cluster maps': 'saved in the checkpoint (`cluster_map`, `cluster_counts` buffers of every layer)',
        }
        if metrics and metrics.get('peak_drop_rate') is not None:
            dc['Peak rate in training'] = f'{metrics["peak_drop_rate"]:g}'
        if metrics and metrics.get('reclusterings') is not None:
            dc['Cluster re-computations in training'] = metrics['reclusterings']
        details['DropCluster'] = dc
        details['Papers'] = [f'{title}: {url}' for title, url in PAPERS.items()]
        citations = CITATIONS
    else:
        drop_block = bool((metrics or {}).get('drop_block_rate'))
        details['Papers'] = [f'{t}: {u}' for t, u in PAPERS.items() if drop_block and t.startswith('DropBlock')]
        citations = [_CITATIONS['timm']] + ([_CITATIONS['dropblock']] if drop_block else [])
        if not details['Papers']:
            del details['Papers']
    if metrics:
        name = dataset_name(metrics)
        if name:
            dataset_id = metrics.get('dataset_id')
            details['Dataset'] = name + (f' (Hub: `{dataset_id}`)' if dataset_id and dataset_id != name else '')
        if metrics.get('base_model'):
            details['Base model'] = f'[{metrics["base_model"]}](https://huggingface.co/{metrics["base_model"]})'
        if metrics.get('weights') == 'ema':
            decay = metrics.get('ema_decay')
            details['Weights'] = 'exponential moving average (EMA)' + (f', decay {decay:g}' if decay is not None else '')
        elif metrics.get('weights') == 'raw':
            details['Weights'] = 'raw (no weight averaging)'
        description = training_notes(arch, metrics, dropcluster)
    elif dropcluster:
        tags = [t.split('.', 1)[1] for t in list_pretrained(f'{arch}.*')]
        bases = sorted({get_pretrained_cfg(f'{arch}.{t}').hf_hub_id for t in tags})
        details['Dataset'] = 'ImageNet-1k'
        details['Pretrained tags'] = [
            f'`{arch}.{t}`: {get_pretrained_cfg(f"{arch}.{t}").hf_hub_id} '
            f'(license {get_pretrained_cfg(f"{arch}.{t}").license})' for t in tags]
        description = (
            f'A ResNet with DropCluster structured dropout (timm architecture `{arch}`). '
            'No DropCluster-trained weights are published yet: the pretrained tags load timm\'s ImageNet-1k '
            f'weights of the base ResNet ({", ".join(bases)}) with grid-initialised cluster maps.')
    else:
        description = f'A timm `{arch}` image classification model without DropCluster layers. {NO_RUN_RESULTS}'
    if repo_id:
        model_id = f'hf-hub:{repo_id}'
    else:  # the bare name loads timm's ImageNet tags: right for the architecture's card only
        model_id = LOCAL_MODEL_ID if metrics else model_name
    return {
        'tags': ['image-classification', 'timm'] + (['dropcluster'] if dropcluster else []),
        'license': license,
        'description': description,
        'details': details,
        'usage': _usage(model_id, dropcluster),
        'comparison': '\n'.join([_results(model_name, metrics, dropcluster)] + [_results_table(t) for t in tables]),
        'citation': citations,
        'card_data': _card_data(model_name, metrics, dropcluster, license),
        'cluster_maps': cluster_maps,
    }


def render_model_card(model_name: str, **kwargs) -> str:
    """README.md text for ``model_name`` (arguments of ``build_model_card``): a ``ModelCardData`` YAML
    header, ``CARD_MARKER``, then the body from timm's ``generate_readme``."""
    card = build_model_card(model_name, **kwargs)
    # generate_readme writes its own YAML header (its `datasets:` is the body's data set name, lowercased):
    # keep only its body.
    body = generate_readme(card, model_name, task_name='image-classification').split('---\n', 2)[2]
    if card['cluster_maps']:
        section = (f'\n## Cluster maps\n![cluster maps]({card["cluster_maps"]})\n\nThe first channels\' cluster maps '
                   'of every DropCluster layer, as saved with the weights (one colour per cluster).\n')
        body = body.replace('\n## Model Usage\n', section + '\n## Model Usage\n', 1)
    header = card['card_data'].to_yaml(original_order=_HEADER_ORDER)
    return f'---\n{header}\n---\n{CARD_MARKER}\n{body}'


def write_model_cards(
        out_dir: Union[str, Path] = 'model_cards',
        models: Optional[Sequence[str]] = None,
        metrics: Optional[Dict[str, Dict[str, Any]]] = None,
        tables: Optional[Dict[str, Sequence[Dict[str, Any]]]] = None,
) -> List[Path]:
    """Write ``<out_dir>/<model>.md`` for every registered ``*_dropcluster`` model (or ``models``).

    ``metrics`` maps a model name to the results of its run; models without one get the
    "no DropCluster-trained weights" card. ``tables`` maps a model name to the results tables
    (``load_results_table``) of its card; a name that is not written raises ``ValueError``.
    """
    names = list(models or timm.list_models('*_dropcluster'))
    metrics, tables = metrics or {}, tables or {}
    unknown = sorted(set(tables) - set(names))
    if unknown:  # a misspelt model name would otherwise drop its tables without a word
        raise ValueError(f'results tables for model(s) without a card here: {", ".join(unknown)} '
                         f'(cards: {", ".join(names)})')
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = out_dir / f'{name}.md'
        path.write_text(render_model_card(name, metrics=metrics.get(name), tables=tables.get(name)),
                        encoding='utf-8')
        paths.append(path)
    return paths

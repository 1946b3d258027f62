""" Model cards for the DropCluster models, in timm's Hub card format.

The card is a timm ``model_card`` dict rendered by timm's own ``generate_readme`` (the YAML header
with ``library_name: timm``, tags, license, datasets and ``pipeline_tag``, then Model Details, Model
Usage, Model Comparison and Citation sections), so it reads like the cards of timm's own weights.

Model statistics are measured, not typed in:
  * Params (M): parameters of the model, classifier included.
  * GMACs: multiply-accumulates of one forward at the card's image size, counted with
    ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2; convolutions, matmuls, as fvcore
    counts them). The model runs on the 'meta' device, so no memory or compute is spent.
  * Activations (M): output elements of every convolution and linear layer, fvcore's activation
    count that timm's cards use.

Results come only from a metrics file written by a real run (``load_metrics``); without one the card
says that no DropCluster-trained weights are published yet. The card of the architecture used by the
CIFAR-10 study (``benchmarks/study_cifar10.py``) also gets the study's table, read from its JSON
results (``load_study``).

Regenerate the committed cards with ``dropcluster-timm cards`` (or ``python -m dropcluster_timm.cli cards``).
"""
import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg, list_pretrained
from timm.models._hub import generate_readme
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['model_stats', 'load_metrics', 'load_study', 'build_model_card', 'render_model_card', 'write_model_cards',
           'CITATIONS', 'PAPERS']

PAPERS = {
    'DropCluster: A structured dropout for convolutional networks': 'https://arxiv.org/abs/2002.02997',
    'DropBlock: A regularization method for convolutional networks': 'https://arxiv.org/abs/1810.12890',
    'Deep Residual Learning for Image Recognition': 'https://arxiv.org/abs/1512.03385',
}

CITATIONS = [
    """@article{chen2020dropcluster,
  title={DropCluster: A structured dropout for convolutional networks},
  author={Chen, Liyan and Gautier, Philip and Aydore, Sergul},
  journal={arXiv preprint arXiv:2002.02997},
  year={2020}
}""",
    """@inproceedings{ghiasi2018dropblock,
  title={DropBlock: A regularization method for convolutional networks},
  author={Ghiasi, Golnaz and Lin, Tsung-Yi and Le, Quoc V},
  booktitle={Advances in Neural Information Processing Systems},
  year={2018}
}""",
    """@inproceedings{he2016deep,
  title={Deep Residual Learning for Image Recognition},
  author={He, Kaiming and Zhang, Xiangyu and Ren, Shaoqing and Sun, Jian},
  booktitle={Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition},
  pages={770--778},
  year={2016}
}""",
    """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}""",
]

NO_RESULTS = ('No DropCluster-trained weights are published yet, so there are no results for this model. '
              'The pretrained tags listed above are timm\'s ImageNet-1k weights of the base ResNet with '
              'grid-initialised cluster maps, a starting point for fine-tuning with DropCluster; their '
              'accuracy is that of the base timm weights.')


@torch.no_grad()
def model_stats(model_name: str, img_size: Optional[Tuple[int, int]] = None, **kwargs) -> Dict[str, Any]:
    """Params (M), GMACs and Activations (M) of ``model_name`` for one image (see module docstring)."""
    model = timm.create_model(model_name, pretrained=False, device='meta', **kwargs).eval()
    size = tuple(img_size or model.pretrained_cfg['input_size'][-2:])
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

    JSON: an object with ``top1`` (required) and optionally ``top5``, ``dataset``, ``img_size``,
    ``epochs``, ``param_count`` and ``notes``. CSV: the row with the best ``eval_top1``.
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
    metrics = json.loads(path.read_text())
    if not isinstance(metrics, dict) or not isinstance(metrics.get('top1'), (int, float)):
        raise ValueError(f'{path}: expected a JSON object with a numeric "top1"')
    return metrics


ARM_LABELS = {'none': 'no structured dropout', 'dropblock': 'DropBlock, stages 3-4',
              'dc_stages': 'DropCluster, stages 3-4', 'dc_stem': 'DropCluster, stem'}


def load_study(path: Union[str, Path]) -> Dict[str, Any]:
    """Read the JSON results of ``benchmarks/study_cifar10.py`` (needs its ``config``, ``models`` and
    ``summary``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'study results not found: {path}')
    study = json.loads(path.read_text())
    if not isinstance(study, dict) or not all(k in study for k in ('config', 'models', 'summary')):
        raise ValueError(f'{path}: expected the JSON written by benchmarks/study_cifar10.py '
                         '(with "config", "models" and "summary")')
    return study


def _study_results(study: Dict[str, Any]) -> str:
    cfg = study['config']
    lines = [
        '### CIFAR-10 study (from-scratch runs; no weights published)',
        '',
        f'From `benchmarks/study_cifar10.py` (results file `benchmarks/results/study_cifar10.json`): a narrow '
        f'`{study["models"]["dropcluster"]}` (layers {cfg["layers"]}, channels {cfg["channels"]}, output_stride 8, '
        f'{cfg["img_size"]} px) trained from scratch on class-balanced CIFAR-10 subsets, against the same timm '
        f'`{study["models"]["base"]}` without structured dropout and with DropBlock. Rates chosen on a validation '
        f'split; test top-1 on {cfg["test_images"]} test images, mean corruption top-1 (mCA) over 8 corruptions x '
        f'5 severities on {cfg["corruption_images"]} of them; mean +- std over {cfg["seeds"]} seeds. A '
        f'difference smaller than the standard deviations is not evidence either way; BENCHMARKS.md of the '
        f'dropcluster-timm repository discusses these figures.',
        '',
        '| train images | regulariser | rate | test top-1 (%) | mCA (%) |',
        '|---:|---|---:|---:|---:|',
    ]
    for e in study['summary']:
        lines.append(f"| {e['size']} | {ARM_LABELS.get(e['arm'], e['arm'])} | {e['rate']:g} | "
                     f"{e['test_top1']:.2f} +- {e['test_top1_std']:.2f} | "
                     f"{e['mean_corruption_top1']:.2f} +- {e['mean_corruption_top1_std']:.2f} |")
    return '\n'.join(lines) + '\n'


def _usage(model_name: str) -> str:
    # model_name: a registered name, or 'hf-hub:org/name' for pushed weights
    return f"""Importing `dropcluster_timm` registers the DropCluster models with timm (timm has no plugin discovery).

### Image Classification
```python
from urllib.request import urlopen
from PIL import Image
import timm
import torch
import dropcluster_timm  # registers *_dropcluster models with timm

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model('{model_name}', pretrained=True)
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
import timm
import dropcluster_timm  # registers *_dropcluster models with timm

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model(
    '{model_name}',
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
import timm
import dropcluster_timm  # registers *_dropcluster models with timm

img = Image.open(urlopen(
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'
))

model = timm.create_model(
    '{model_name}',
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

### Training with DropCluster
```python
import timm
import torch
import dropcluster_timm

model = timm.create_model('{model_name}', pretrained=True, drop_cluster_prob=0.1)
images = torch.randn(32, 3, 224, 224)  # a batch of training images
# re-cluster the DropCluster layers from the batch, e.g. every few epochs
dropcluster_timm.update_clusters(model, images)
dropcluster_timm.set_drop_prob(model, 0.1)  # or follow a schedule
```
"""


def _results(model_name: str, metrics: Optional[Dict[str, Any]]) -> str:
    if not metrics:
        return NO_RESULTS + '\n'
    size = metrics.get('img_size')
    size = f'{size}' if size is not None else ''
    top5 = metrics.get('top5')
    lines = [
        'Results of the run that produced these weights (from its metrics file):',
        '',
        '| model | dataset | img_size | top1 | top5 |',
        '|---|---|---|---|---|',
        f'| {model_name} | {metrics.get("dataset", "")} | {size} | {metrics["top1"]:.3f} | '
        f'{"" if top5 is None else f"{top5:.3f}"} |',
    ]
    if metrics.get('notes'):
        lines += ['', str(metrics['notes'])]
    return '\n'.join(lines) + '\n'


def build_model_card(
        model_name: str,
        metrics: Optional[Dict[str, Any]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        license: str = 'apache-2.0',
        repo_id: Optional[str] = None,
        study: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """timm ``model_card`` dict for ``model_name`` (an architecture, optionally ``arch.tag``).

    Args:
        model_name: registered ``*_dropcluster`` name, e.g. ``'resnet50_dropcluster'``.
        metrics: results of a real run (see ``load_metrics``); ``None`` states that no
            DropCluster-trained weights are published.
        model_args: the DropCluster model arguments of the weights (config.json ``model_args``).
        license: license in the card header: the code's; each pretrained tag lists its weights' own.
        repo_id: Hub repo of the weights; the usage examples then load ``hf-hub:<repo_id>``.
        study: results of the CIFAR-10 study (``load_study``), shown when they are for ``model_name``.
    """
    if not timm.is_model(model_name.split('.')[0]):
        raise ValueError(f'unknown model {model_name!r}; did you `import dropcluster_timm`?')
    arch = model_name.split('.')[0]
    model_args = dict(model_args or {})
    stat_args = {k: v for k, v in model_args.items()
                 if k in ('in_chans', 'img_size', 'num_classes') or k.startswith('dc_')}
    stats = model_stats(model_name, **stat_args)
    dc = {
        'Rate (drop_cluster_prob)': model_args.get('drop_cluster_prob', 0.0),
        'Placement': ('stages ' + ', '.join(str(s) for s in model_args.get('dc_stages', (3, 4)))
                      + ' (every block, in the DropBlock slot)'
                      + ('; stem (after conv, norm and activation, before max-pooling)'
                         if model_args.get('dc_stem') else '')),
        'Cluster maps': 'saved in the checkpoint (`cluster_map`, `cluster_counts` buffers of every layer)',
    }
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {
            'Params (M)': f'{stats["params_m"]:.1f}',
            'GMACs': f'{stats["gmacs"]:.1f}',
            'Activations (M)': f'{stats["activations_m"]:.1f}',
            'Image size': f'{stats["img_size"][0]} x {stats["img_size"][1]}',
        },
        'DropCluster': dc,
        'Papers': [f'{title}: {url}' for title, url in PAPERS.items()],
    }
    if metrics:
        details['Dataset'] = metrics.get('dataset', 'ImageNet-1k')
        description = f'A {arch} image classification model trained with DropCluster structured dropout.'
    else:
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
    return {
        'tags': ['image-classification', 'timm', 'dropcluster'],
        'license': license,
        'description': description,
        'details': details,
        'usage': _usage(f'hf-hub:{repo_id}' if repo_id else model_name),
        'comparison': _results(model_name, metrics) + (
            '\n' + _study_results(study) if study and study['models']['dropcluster'] == arch else ''),
        'citation': CITATIONS,
    }


def render_model_card(model_name: str, **kwargs) -> str:
    """README.md text for ``model_name`` (arguments of ``build_model_card``), via timm's ``generate_readme``."""
    return generate_readme(build_model_card(model_name, **kwargs), model_name, task_name='image-classification')


def write_model_cards(
        out_dir: Union[str, Path] = 'model_cards',
        models: Optional[Sequence[str]] = None,
        metrics: Optional[Dict[str, Dict[str, Any]]] = None,
        study: Optional[Dict[str, Any]] = None,
) -> List[Path]:
    """Write ``<out_dir>/<model>.md`` for every registered ``*_dropcluster`` model (or ``models``).

    ``metrics`` maps a model name to the results of its run; models without one get the
    "no DropCluster-trained weights" card. ``study`` (``load_study``) adds the CIFAR-10 study's table
    to the card of the architecture it used.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = metrics or {}
    paths = []
    for name in models or timm.list_models('*_dropcluster'):
        path = out_dir / f'{name}.md'
        path.write_text(render_model_card(name, metrics=metrics.get(name), study=study), encoding='utf-8')
        paths.append(path)
    return paths

""" The text of the model cards: papers and citations, usage snippets, training notes and the results
section."""
from typing import Optional, Sequence, Union

from .run_results import RunResults


PIP_PACKAGE = 'dropcluster-timm'  # the distribution name in pyproject.toml


# Usage examples of weights not on the Hub yet; hub.push replaces it with hf-hub:<repo_id> before uploading.
LOCAL_MODEL_ID = 'local-dir:path/to/this/folder'


PAPERS = {
    'DropCluster: A structured dropout for convolutional networks': 'https://arxiv.org/abs/2002.02997',
    'DropBlock: A regularization method for convolutional networks': 'https://arxiv.org/abs/1810.12890',
    'Deep Residual Learning for Image Recognition': 'https://arxiv.org/abs/1512.03385',
}


# bibtex by paper; plain timm models cite timm (and DropBlock when trained with it) only
CITATIONS_BY_PAPER = {
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


CITATIONS = list(CITATIONS_BY_PAPER.values())


NO_RESULTS = ('No DropCluster-trained weights are published yet, so there are no results for this model. '
              'The pretrained tags listed above are timm\'s ImageNet weights of the base architecture with '
              'grid-initialised cluster maps, a starting point for fine-tuning with DropCluster; their '
              'accuracy is that of the base timm weights.')


NO_RUN_RESULTS = 'No results of a training run were given for these weights.'


def training_notes(model_name: str, metrics: RunResults, dropcluster: bool) -> str:
    """What the weights are and how they were trained, from the run's ``metrics``: the description of
    the card and the ``notes`` of config.json's pretrained_cfg."""
    arch = model_name.split('.')[0]
    text = f'A {arch} image classification model'
    name = metrics.dataset_name
    if metrics.base_model:
        text += f' fine-tuned from {metrics.base_model}'
    elif name or metrics.epochs or metrics.img_size:
        text += ' trained'
    if name:
        text += f' on {name}'
    if metrics.epochs and metrics.epoch is not None and metrics.epoch + 1 < metrics.epochs:
        text += f' for {metrics.epoch + 1} of the run\'s {metrics.epochs} epochs'  # best/ of an earlier epoch
    elif metrics.epochs:
        text += f' for {metrics.epochs} epochs'
    if metrics.img_size:
        text += f' at {size_text(metrics.img_size)} px'
    text += '.'
    peak, count = metrics.peak_drop_rate, metrics.reclusterings
    if not dropcluster:
        text += ' It has no DropCluster layers'
        if metrics.drop_block_rate:
            text += f' and was trained with DropBlock (rate {metrics.drop_block_rate:g})'
        text += '.'
    elif peak is None:  # metrics of older runs do not say what the schedule did
        text += ' It has DropCluster structured dropout layers.'
    elif peak > 0:
        text += f' It was trained with DropCluster (peak rate {peak:g}'
        text += f', clusters re-computed {count} time{"" if count == 1 else "s"}).' if count is not None else ').'
    else:
        text += (' Its DropCluster layers were present but never switched on (rate 0 throughout), so it '
                 'was trained without structured dropout.')
    if metrics.pruned_from:
        method = {'edropout': ' with EDropout', 'magnitude': ' by filter magnitude'}.get(metrics.pruning_method, '')
        text += f' Its channels were pruned from `{metrics.pruned_from}`{method} (see Pruning below).'
    if metrics.weights == 'ema':
        decay = metrics.ema_decay
        text += (' These are the exponential-moving-average (EMA) weights of the run'
                 + (f' (decay {decay:g})' if decay is not None else '')
                 + '; the results are those of the EMA weights.')
    elif metrics.weights == 'raw':
        text += ' These are the raw weights of the run (no weight averaging).'
    return text


def size_text(size: Union[int, Sequence[int]]) -> str:
    h, w = (size, size) if isinstance(size, int) else size[-2:]
    return f'{h} x {w}'


_TRAINING_USAGE = """### Training with DropCluster
```python
import timm
import torch
import dropcluster_timm

model = timm.create_model('{model_id}', pretrained=True, drop_cluster_rate=0.1)
# Train it in any loop (timm's train.py with --drop-block 0.1, plain PyTorch, Accelerate): its layers
# cluster their input at the first training step and every dc_recluster_every steps after, and ramp
# the rate over dc_ramp_steps steps, with no extra call. To drive them yourself instead:
dropcluster_timm.disable_own_schedule(model)
dropcluster_timm.update_clusters(model, torch.randn(32, 3, 224, 224))  # from a batch of training images
dropcluster_timm.set_drop_prob(model, 0.1)  # or follow a schedule
```
"""


def usage_text(model_id: str, dropcluster: bool, slim: bool = False) -> str:
    """The Model Usage section. ``model_id``: a registered name, ``hf-hub:org/name`` for pushed
    weights or ``LOCAL_MODEL_ID`` for weights not pushed yet; ``dropcluster``: the architecture is a
    DropCluster model (needs this package); ``slim``: a channel-pruned ``*_slim`` ResNet (timm's own
    layers, but its per-block widths are registered by this package); else a plain timm model."""
    if slim:
        intro = (f'A plain timm ResNet with pruned per-block widths (`block_widths` in config.json). Install '
                 f'`{PIP_PACKAGE}` and import `dropcluster_timm` before creating the model: the import registers '
                 'the `*_slim` architectures with timm (timm has no plugin discovery).\n\n'
                 f'```bash\npip install {PIP_PACKAGE}\n```\n')
    elif dropcluster:
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
    if slim:
        register = '\nimport dropcluster_timm.edropout  # registers the *_slim (pruned) architectures with timm'
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


def results_text(model_name: str, metrics: Optional[RunResults], dropcluster: bool) -> str:
    if not metrics:
        return (NO_RESULTS if dropcluster else NO_RUN_RESULTS) + '\n'
    size = metrics.img_size
    size = f'{size}' if size is not None else ''
    top5 = metrics.top5
    source = 'from its metrics file'
    if metrics.split:
        source += f', on the {metrics.split} split'
    if metrics.weights == 'ema':
        source += ', EMA weights'
    lines = [
        f'Results of the run that produced these weights ({source}):',
        '',
        '| model | dataset | img_size | top1 | top5 |',
        '|---|---|---|---|---|',
        f'| {model_name} | {metrics.dataset_name or ""} | {size} | {metrics.top1:.3f} | '
        f'{"" if top5 is None else f"{top5:.3f}"} |',
    ]
    if metrics.notes:
        lines += ['', str(metrics.notes)]
    return '\n'.join(lines) + '\n'

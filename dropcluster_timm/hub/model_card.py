""" Model cards for the DropCluster models and for weights trained with this package, in timm's Hub card format.

The card body is a timm ``model_card`` dict rendered by timm's own ``generate_readme`` (Model Details,
Model Usage, Model Comparison and Citation sections), so it reads like the cards of timm's own
weights. The YAML header is built with ``huggingface_hub.ModelCardData``: ``library_name: timm``,
tags, license, ``pipeline_tag``, and for trained weights ``base_model``, ``datasets`` (a Hub data set
id only) and a ``model-index`` with the run's accuracy (``EvalResult``). Every generated card carries
``CARD_MARKER``, so ``hub.push`` knows which cards it may re-render and leaves hand-written ones alone.

Results come only from a metrics file written by a real run; without one the card of a ``*_dropcluster``
architecture says that no DropCluster-trained weights are published yet. A card can also carry results
tables of other experiments, each a section of its comparison: the committed ``resnet18_dropcluster`` card
carries the table of the CIFAR-10 study, which ``benchmarks/regularizer_study/report.py`` writes.
``dropcluster_timm.hub.run_results`` reads, checks and formats both, and measures the card's model statistics
(Params, GMACs, Activations).

Regenerate the committed cards with
``dropcluster-timm cards --overwrite --table resnet18_dropcluster=benchmarks/results/study_v5/card_table.json``.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
from huggingface_hub import EvalResult, ModelCardData
from timm.models import get_pretrained_cfg, list_pretrained

from .model_stats import format_stat, model_stats
from ..destination import DestinationError, check_destination
from ..models.names import SLIM_SUFFIX, register_architecture
from .run_results import RunResults, check_results_table, format_results_table, load_metrics, load_results_table
# timm's card writer has no public name; its README layout is the one timm's own weights show on the Hub.
from ..layers.options import LAYER_OPTIONS
from ..models.variants import describe_placement
from ..timm_compat import readme_body
from .card_text import (
    CITATIONS, CITATIONS_BY_PAPER, LOCAL_MODEL_ID, NO_RUN_RESULTS, PAPERS, results_text, size_text, usage_text,
    training_notes)

__all__ = ['CARD_MODELS', 'model_stats', 'format_stat', 'RunResults', 'load_metrics', 'training_notes',
           'is_dropcluster_architecture', 'check_results_table', 'load_results_table', 'build_model_card',
           'render_model_card', 'write_model_cards', 'CITATIONS', 'PAPERS', 'CARD_MARKER', 'CLUSTER_MAPS_IMAGE']

# In every generated card (an HTML comment, invisible on the Hub): push re-renders only cards that carry it.
CARD_MARKER = '<!-- dropcluster-timm card -->'
# The picture of the cluster maps that hub.save_pretrained writes next to the weights.
CLUSTER_MAPS_IMAGE = 'cluster_maps.png'
# The cards model_cards/ holds: the ResNets of the reference, and one model of each architecture
# family with DropBlock slots that users asked for (every *_dropcluster model renders on demand).
CARD_MODELS = (
    'resnet18_dropcluster', 'resnet34_dropcluster', 'resnet50_dropcluster', 'resnet101_dropcluster',
    'resnet152_dropcluster', 'resnet50d_dropcluster', 'resnext50_32x4d_dropcluster', 'seresnet50_dropcluster',
    'wide_resnet50_2_dropcluster', 'skresnet18_dropcluster', 'resnest14d_dropcluster', 'gernet_s_dropcluster',
    'resnet33ts_dropcluster', 'regnetz_b16_dropcluster',
)
# YAML header keys in the order of timm's own cards; model-index comes last.
_HEADER_ORDER = ['tags', 'pipeline_tag', 'library_name', 'license', 'base_model', 'datasets', 'metrics']


def is_dropcluster_architecture(architecture: str, model_args: Optional[Dict[str, Any]] = None) -> bool:
    """Whether ``architecture`` (with the ``model_args`` of its config.json) is a DropCluster model,
    i.e. its checkpoints carry cluster maps; any other timm architecture is a plain model."""
    args = model_args or {}
    return 'drop_cluster_rate' in args or architecture.split('.')[0].endswith('_dropcluster')


def _card_data(model_name: str, metrics: Optional[RunResults], dropcluster: bool, license: str) -> ModelCardData:
    """The YAML header: for trained weights ``base_model``, ``datasets`` (Hub ids only) and ``model-index``."""
    datasets, base_model, eval_results = None, None, None
    if metrics:
        datasets = [metrics.dataset_id] if metrics.dataset_id else None
        base_model = metrics.base_model
        name = metrics.dataset_name
        if name:  # a model-index result needs its data set
            where = dict(task_type='image-classification', task_name='Image Classification',
                         dataset_type=metrics.dataset_id or metrics.dataset_type or 'imagefolder',
                         dataset_name=name, dataset_split=metrics.split)
            # the Hub's `accuracy` metric is a fraction; the card body keeps timm's percentages
            eval_results = [EvalResult(metric_type='accuracy', metric_name=f'Top-{k} accuracy',
                                       metric_value=round(value / 100, 6), **where)
                            for k, value in ((1, metrics.top1), (5, metrics.top5)) if value is not None]
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
        metrics: Optional[Union[RunResults, Dict[str, Any]]] = None,
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
        metrics: results of the real run that trained the weights (a ``RunResults``, or a dict of its fields);
            ``None``: the card of the architecture, which says no DropCluster-trained weights are published.
        model_args: the model arguments of the weights (config.json ``model_args``).
        license: license in the card header: the code's (or, for a fine-tune, the base weights');
            each pretrained tag lists its weights' own.
        repo_id: Hub repo of the weights; the usage examples then load ``hf-hub:<repo_id>``. Trained
            weights without one load ``LOCAL_MODEL_ID``, which ``hub.push`` replaces.
        tables: results tables (``load_results_table``), each a section of the comparison, in order.
        cluster_maps: file name of a cluster-map picture next to the card, shown in it.
    """
    register_architecture(model_name.split('.')[0])  # a pruned *_slim ResNet: its opt-in package, on demand
    if not timm.is_model(model_name.split('.')[0]):
        raise ValueError(f'unknown model {model_name!r}; did you `import dropcluster_timm`?')
    arch = model_name.split('.')[0]
    model_args = dict(model_args or {})
    dropcluster = is_dropcluster_architecture(arch, model_args)
    metrics = RunResults.from_dict(metrics) if metrics else None
    tables = [check_results_table(t) for t in tables or ()]
    stats = model_stats(model_name, img_size=(metrics.img_size if metrics else None), model_args=model_args)
    details = {
        'Model Type': 'Image classification / feature backbone',
        'Model Stats': {
            'Params (M)': format_stat(stats['params_m']),
            'GMACs': format_stat(stats['gmacs']),
            'Activations (M)': format_stat(stats['activations_m']),
            'Image size': size_text(stats['img_size']),
        },
    }
    if dropcluster:
        dc = {
            'Rate (drop_cluster_rate)': f"{model_args.get('drop_cluster_rate', 0.0):g}",
            'Placement': describe_placement(model_name.split('.')[0], model_args),
            'Cluster maps': 'saved in the checkpoint (`cluster_map`, `cluster_counts` buffers of every layer)',
        }
        options = _clustering_options(model_args)
        if options:
            dc['Clustering'] = options
        if metrics and metrics.peak_drop_rate is not None:
            dc['Peak rate in training'] = f'{metrics.peak_drop_rate:g}'
        if metrics and metrics.reclusterings is not None:
            dc['Cluster re-computations in training'] = metrics.reclusterings
        details['DropCluster'] = dc
        details['Papers'] = [f'{title}: {url}' for title, url in PAPERS.items()]
        citations = CITATIONS
    else:
        drop_block = bool((metrics.drop_block_rate if metrics else None))
        details['Papers'] = [f'{t}: {u}' for t, u in PAPERS.items() if drop_block and t.startswith('DropBlock')]
        citations = [CITATIONS_BY_PAPER['timm']] + ([CITATIONS_BY_PAPER['dropblock']] if drop_block else [])
        if not details['Papers']:
            del details['Papers']
    if metrics and metrics.pruned_from:
        details['Pruning'] = _pruning_details(metrics, model_args, stats)
    if metrics:
        name = metrics.dataset_name
        if name:
            dataset_id = metrics.dataset_id
            details['Dataset'] = name + (f' (Hub: `{dataset_id}`)' if dataset_id and dataset_id != name else '')
        if metrics.base_model:
            details['Base model'] = f'[{metrics.base_model}](https://huggingface.co/{metrics.base_model})'
        if metrics.weights == 'ema':
            decay = metrics.ema_decay
            details['Weights'] = 'exponential moving average (EMA)' + (f', decay {decay:g}' if decay is not None else '')
        elif metrics.weights == 'raw':
            details['Weights'] = 'raw (no weight averaging)'
        description = training_notes(arch, metrics, dropcluster)
    elif dropcluster:
        tags = [t.split('.', 1)[1] for t in list_pretrained(f'{arch}.*')]
        bases = sorted({get_pretrained_cfg(f'{arch}.{t}').hf_hub_id for t in tags})
        details['Dataset'] = 'ImageNet-1k' if all(t.endswith('in1k') for t in tags) else 'ImageNet (see the tags)'
        details['Pretrained tags'] = [
            f'`{arch}.{t}`: {get_pretrained_cfg(f"{arch}.{t}").hf_hub_id} '
            f'(license {get_pretrained_cfg(f"{arch}.{t}").license})' for t in tags]
        description = (
            f'timm\'s `{arch[:-len("_dropcluster")]}` with DropCluster structured dropout in its DropBlock slots '
            f'(timm architecture `{arch}`). No DropCluster-trained weights are published yet: the pretrained '
            f'tags load timm\'s weights of the base architecture ({", ".join(bases)}) with grid-initialised '
            'cluster maps.')
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
        'usage': usage_text(model_id, dropcluster, slim=arch.endswith(SLIM_SUFFIX)),
        'comparison': '\n'.join([results_text(model_name, metrics, dropcluster)]
                                 + [format_results_table(t) for t in tables]),
        'citation': citations,
        'card_data': _card_data(model_name, metrics, dropcluster, license),
        'cluster_maps': cluster_maps,
    }


def _pruning_details(metrics: RunResults, model_args: Dict[str, Any], stats: Dict[str, Any]) -> Dict[str, str]:
    """The card's pruning section: what was pruned from, and parameters, MACs and top-1 before and
    after, every figure measured (statistics counted on both architectures, accuracies from the run)."""
    source = metrics.pruned_from
    before = model_stats(source, img_size=stats['img_size'],
                         model_args={k: v for k, v in model_args.items() if k != 'block_widths'})
    method = {'edropout': 'EDropout, energy-based channel states (https://arxiv.org/abs/2006.04270)',
              'magnitude': 'magnitude (L1 norm of the filters, https://arxiv.org/abs/1608.08710)'}
    details = {
        'Pruned from': f'`{source}`',
        'Method': method.get(metrics.pruning_method, 'channel pruning'),
        'Params (M), before -> after': f"{format_stat(before['params_m'])} -> {format_stat(stats['params_m'])}",
        'GMACs, before -> after': f"{format_stat(before['gmacs'])} -> {format_stat(stats['gmacs'])}",
    }
    if metrics.top1_before_pruning is not None:
        details['Top-1, before -> after'] = f"{metrics.top1_before_pruning:.2f} -> {metrics.top1:.2f}"
    if metrics.kept_channels is not None:
        details['Prunable channels kept'] = f"{100 * metrics.kept_channels:.1f}%"
    if metrics.edropout_steps is not None:
        details['Energy-search steps'] = metrics.edropout_steps
    return details


def render_model_card(model_name: str, **kwargs) -> str:
    """README.md text for ``model_name`` (arguments of ``build_model_card``): a ``ModelCardData`` YAML
    header, ``CARD_MARKER``, then the body from timm's ``generate_readme``."""
    card = build_model_card(model_name, **kwargs)
    # timm's header names the body's data set, lowercased: this header (ModelCardData) replaces it
    body = readme_body(card, model_name)
    if card['cluster_maps']:
        section = (f'\n## Cluster maps\n![cluster maps]({card["cluster_maps"]})\n\nThe first channels\' cluster maps '
                   'of every DropCluster layer, as saved with the weights (one colour per cluster).\n')
        body = body.replace('\n## Model Usage\n', section + '\n## Model Usage\n', 1)
    header = card['card_data'].to_yaml(original_order=_HEADER_ORDER)
    return f'---\n{header}\n---\n{CARD_MARKER}\n{body}'


def _clustering_options(model_args: Dict[str, Any]) -> str:
    """The clustering method and reference options of a model that differ from the defaults ('' if none)."""
    parts = []
    for option in LAYER_OPTIONS:
        value = model_args.get(option.model_arg, option.default)
        if option.card and value is not None and value != option.default:
            parts.append(option.card.format(value=value))
    return '; '.join(parts)


def write_model_cards(
        out_dir: Union[str, Path] = 'model_cards',
        models: Optional[Sequence[str]] = None,
        metrics: Optional[Dict[str, RunResults]] = None,
        tables: Optional[Dict[str, Sequence[Dict[str, Any]]]] = None,
        overwrite: bool = False,
        replace_hand_written: bool = False,
        reads: Sequence[str] = (),
) -> List[Path]:
    """Write ``<out_dir>/<model>.md`` for each of ``CARD_MODELS`` (or ``models``).

    ``metrics`` maps a model name to the results of its run; models without one get the
    "no DropCluster-trained weights" card. ``tables`` maps a model name to the results tables
    (``load_results_table``) of its card. A name in either that is not written raises ``ValueError``.
    Every card is checked before any is written: an existing card is replaced only with ``overwrite``,
    one without ``CARD_MARKER`` (hand-written or edited) only with ``replace_hand_written`` too, and
    never a file of ``reads`` (the results files the cards are made from).
    """
    names = list(models or CARD_MODELS)
    metrics, tables = metrics or {}, tables or {}
    for what, given in (('results', metrics), ('results tables', tables)):
        unknown = sorted(set(given) - set(names))
        if unknown:  # a misspelt model name would otherwise drop them without a word
            raise ValueError(f'{what} for model(s) without a card here: {", ".join(unknown)} '
                             f'(cards: {", ".join(names)})')
    out_dir = Path(out_dir)
    check_destination(str(out_dir), '--out-dir', folder=True, overwrite=True, reads=reads)
    for name in names if out_dir.is_dir() else ():  # (a new folder holds no card yet)
        path = out_dir / f'{name}.md'
        check_destination(str(path), 'the card', overwrite=overwrite, reads=reads)
        if path.is_file() and not replace_hand_written and CARD_MARKER not in path.read_text(encoding='utf-8'):
            raise DestinationError(f'the card {path} was not generated by dropcluster-timm (no marker): it is kept; '
                                   'replace it with --overwrite --replace-hand-written')
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = out_dir / f'{name}.md'
        path.write_text(render_model_card(name, metrics=metrics.get(name), tables=tables.get(name)),
                        encoding='utf-8')
        paths.append(path)
    return paths

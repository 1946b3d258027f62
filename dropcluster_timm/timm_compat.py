""" The timm names this package needs that timm does not publish, in one place.

timm keeps them in private modules (``timm.models._input``, ``_hub``, ``_prune``), which may move in
any release. Tested with timm 1.0.31 (``TESTED_TIMM``); pyproject.toml allows ``>=1.0.31,<1.1``. If a
later timm moves one, importing this package fails here with the name and the installed version,
not later inside a model build.
"""
from typing import Any, Dict

import timm

__all__ = ['TESTED_TIMM', 'update_model_args', 'adapt_model_from_string', 'readme_body', 'recorded_model_args']

TESTED_TIMM = ('1.0.31',)

try:
    # config.json records the model's arguments (`model_args`) from timm 1.0.31 on
    from timm.models._input import update_model_args
    from timm.models._hub import generate_readme as _generate_readme
    # EDropout's pruning rebuilds a ResNet from timm's channel-width string
    from timm.models._prune import adapt_model_from_string
except ImportError as e:  # pragma: no cover - only with an untested timm
    raise ImportError(
        f'dropcluster-timm needs timm internals missing from the installed timm {timm.__version__} ({e}); '
        f'it is tested with timm {", ".join(TESTED_TIMM)}: pip install "timm=={TESTED_TIMM[-1]}"') from e


def readme_body(card: Dict[str, Any], model_name: str) -> str:
    """The body of timm's model-card text for ``card``, without the YAML header that timm writes
    (this package writes its own header, from ``huggingface_hub.ModelCardData``)."""
    text = _generate_readme(card, model_name, task_name='image-classification')
    parts = text.split('---\n', 2)
    if len(parts) != 3 or parts[0]:
        raise RuntimeError(f'timm {timm.__version__} wrote a model card without the expected "---" YAML '
                           f'header; dropcluster-timm is tested with timm {", ".join(TESTED_TIMM)}')
    return parts[2]


def recorded_model_args(model) -> Dict[str, Any]:
    """The arguments timm's factory recorded on ``model`` (``_model_args``), drop rates included;
    ``timm.models.get_model_args`` leaves those out."""
    return dict(getattr(model, '_model_args', None) or {})

""" Model folders and the Hugging Face Hub: save (``save_pretrained``, the one writer of a model folder),
plain-timm export, push, model cards, run results, model statistics and pictures."""
from .push import check_push, push, resolve_push_token
from .run_results import RunResults, load_metrics
from .save import copy_model_folder, export_plain, save_pretrained

__all__ = ['save_pretrained', 'copy_model_folder', 'export_plain', 'push', 'resolve_push_token', 'check_push', 'RunResults',
           'load_metrics']

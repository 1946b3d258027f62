""" Model folders and the Hugging Face Hub: save (``save_pretrained``, the one writer of a model folder),
plain-timm export, push, model cards, run results, model statistics and pictures."""
from .push import push, resolve_push_token
from .save import export_plain, save_pretrained

__all__ = ['save_pretrained', 'export_plain', 'push', 'resolve_push_token']

""" ``dropcluster-timm`` command line.

    dropcluster-timm push OUTPUT_DIR --repo-id org/name [--private] [--revision BRANCH]
    dropcluster-timm cards [--out-dir model_cards] [--metrics MODEL=FILE ...]

``push`` uploads a folder written by ``dropcluster_timm.hub.save_pretrained`` (config.json,
model.safetensors, README.md; never pickle files). The token comes from ``HF_TOKEN`` or
``hf auth login``, never from the command line. ``cards`` regenerates the model cards.
"""
import argparse
import sys
from typing import List, Optional

__all__ = ['main']


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='dropcluster-timm', description=__doc__.split('\n\n')[0].strip())
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('push', help='upload a saved model folder to the Hugging Face Hub (safetensors only)')
    p.add_argument('output_dir', metavar='OUTPUT_DIR', help='folder written by dropcluster_timm.hub.save_pretrained')
    p.add_argument('--repo-id', required=True, help='Hub repo, org/name (created if needed)')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', default=None, help='branch to push to (created if needed)')
    p.add_argument('--commit-message', default='Add DropCluster model')

    c = sub.add_parser('cards', help='regenerate the model cards of the registered *_dropcluster models')
    c.add_argument('--out-dir', default='model_cards')
    c.add_argument('--metrics', action='append', default=[], metavar='MODEL=FILE',
                   help='results of a real run for MODEL (metrics.json or timm summary.csv); repeatable')
    c.add_argument('--study', default=None, metavar='FILE',
                   help='results of benchmarks/study_cifar10.py (its .json), for the card of the model it used')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == 'push':
        from .hub import push
        try:
            info = push(args.output_dir, args.repo_id, private=args.private, revision=args.revision,
                        commit_message=args.commit_message)
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            print(f'dropcluster-timm push: error: {e}', file=sys.stderr)
            return 1
        print(f'pushed {args.output_dir} to {getattr(info, "commit_url", None) or args.repo_id}')
        return 0

    from . import models  # noqa: F401  registers the models
    from .model_card import load_metrics, load_study, write_model_cards
    metrics = {}
    for item in args.metrics:
        name, sep, path = item.partition('=')
        if not sep:
            print(f'dropcluster-timm cards: error: --metrics expects MODEL=FILE, got {item!r}', file=sys.stderr)
            return 2
        metrics[name] = load_metrics(path)
    try:
        study = load_study(args.study) if args.study else None
    except (OSError, ValueError) as e:
        print(f'dropcluster-timm cards: error: {e}', file=sys.stderr)
        return 2
    for path in write_model_cards(args.out_dir, metrics=metrics, study=study):
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())

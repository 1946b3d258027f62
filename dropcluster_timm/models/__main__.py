""" ``python -m dropcluster_timm.models [OUT]``: the architectures with DropBlock slots in the installed
timm, as JSON in the format of the shipped ``dropblock_architectures.json``; written to OUT, or printed.

From a source checkout, ``python -m dropcluster_timm.models dropcluster_timm/models/dropblock_architectures.json``
refreshes the table that the package ships (after a timm upgrade).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .variants import FAMILIES, scan_dropblock_slots


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m dropcluster_timm.models', description=__doc__.split('\n\n')[0])
    parser.add_argument('out', nargs='?', default=None, metavar='OUT',
                        help='JSON file to write (its folder must exist); default: print to stdout')
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        parser.error(f'the folder of {out} does not exist')
    table = {family.module: scan_dropblock_slots(family.timm_modules) for family in FAMILIES}
    text = json.dumps(table, indent=1, sort_keys=True) + '\n'
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        print({k: len(v) for k, v in table.items()}, '->', out, file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())

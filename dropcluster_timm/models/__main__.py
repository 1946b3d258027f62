""" ``python -m dropcluster_timm.models``: rewrite ``dropblock_architectures.json`` from the installed timm."""
import json

from .byobnet_dropcluster import FAMILY as BYOBNET
from .resnet_dropcluster import FAMILY as RESNET
from .variants import ARCHITECTURES_FILE, scan_dropblock_slots

table = {family.module: scan_dropblock_slots(family.timm_modules) for family in (RESNET, BYOBNET)}
with open(ARCHITECTURES_FILE, 'w') as f:
    json.dump(table, f, indent=1, sort_keys=True)
    f.write('\n')
print({k: len(v) for k, v in table.items()}, '->', ARCHITECTURES_FILE)

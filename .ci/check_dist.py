""" Check what the sdist and the wheel in a folder hold: the licence, the package data, the metadata,
and no tests or benchmarks in the sdist (they need a source checkout)."""
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

dist = Path(sys.argv[1])
(sdist,), (wheel,) = list(dist.glob('*.tar.gz')), list(dist.glob('*.whl'))

with tarfile.open(sdist) as tar:
    names = [n.split('/', 1)[1] for n in tar.getnames() if '/' in n]
for required in ('LICENSE', 'pyproject.toml', 'README.md', 'dropcluster_timm/models/dropblock_architectures.json'):
    assert required in names, f'{sdist.name} lacks {required}'
shipped = [n for n in names if n.startswith(('tests/', 'benchmarks/')) or n == 'train_timm.py']
assert not shipped, f'{sdist.name} ships files that need a source checkout: {shipped[:5]}'

with zipfile.ZipFile(wheel) as whl:
    names = whl.namelist()
    meta_name = next(n for n in names if n.endswith('.dist-info/METADATA'))
    meta = Parser().parsestr(whl.read(meta_name).decode())
for required in ('dropcluster_timm/models/dropblock_architectures.json', 'dropcluster_timm/timm_compat.py'):
    assert required in names, f'{wheel.name} lacks {required}'
assert any(n.endswith('.dist-info/licenses/LICENSE') for n in names), f'{wheel.name} lacks the LICENSE file'
assert meta['License-Expression'] == 'Apache-2.0', meta['License-Expression']
assert meta['Requires-Python'] == '>=3.10', meta['Requires-Python']
requires = ' '.join(meta.get_all('Requires-Dist'))
for dep in ('torch', 'timm', 'accelerate', 'huggingface_hub', 'safetensors', 'numpy', 'pillow', 'pyyaml', 'tqdm'):
    assert dep in requires, f'{wheel.name} does not declare {dep}'
print(f'dist: {sdist.name} and {wheel.name} hold the licence and the package data; metadata checked')

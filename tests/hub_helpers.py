""" The Hub token the tests use, and the check that it never leaks into files or output."""
from pathlib import Path

TOKEN = 'hf_testtoken_do_not_leak_0123456789'


def assert_no_token(path: Path, *texts):
    for p in path.rglob('*'):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    for t in texts:
        assert TOKEN not in t

""" Results of a run and results tables: malformed tables refused naming the file and the fault."""
import pytest

from dropcluster_timm.run_results import load_results_table


@pytest.mark.parametrize('content, message', [
    ('[1, 2]', 'expected a JSON object'),
    ('{"title": "t", "columns": ["a"], "rows": []}', 'missing key.* description'),
    ('{"title": "t", "description": "d", "columns": ["a", "b"], "rows": [[1, 2], [3]]}',
     'row 1 has 1 cells, expected one per column \\(2\\)'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[1]], "note": "x"}', 'unknown key.* note'),
    ('{"title": "t", "description": "d", "columns": [], "rows": []}', '"columns" must be a non-empty list'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[{"x": 1}]]}', 'row 0: cells must be'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[true]]}', 'row 0: cells must be'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[1]], "align": ["up"]}', '"align" must'),
    ('{"title": "", "description": "d", "columns": ["a"], "rows": []}', '"title" must be one non-empty line'),
    ('{"title": "t", "description": "d", "columns": ["a"], "rows": [[1]], "notes": 3}',
     '"notes" must be a string'),
    ('{"title": "t",', 'not valid JSON'),
])
def test_malformed_results_table_fails_naming_file_and_fault(tmp_path, content, message):
    path = tmp_path / 'my_table.json'
    path.write_text(content)
    with pytest.raises(ValueError, match=f'my_table.json: .*{message}'):
        load_results_table(path)

""" Results of a run and results tables: malformed tables refused naming the file and the fault."""
import pytest

from dropcluster_timm.hub.run_results import load_results_table


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


def test_every_metrics_file_of_a_run_reads_the_same_best_epoch(full_run, tmp_path):
    """``cards --metrics`` takes the run's metrics.csv, its run-level metrics.json and summary.csv."""
    import json
    import os
    from dropcluster_timm.cli import main as cli_main
    from dropcluster_timm.hub.run_results import load_metrics
    rows = json.load(open(os.path.join(full_run, 'metrics.json')))
    best = max(rows, key=lambda r: r['top1'])
    results = [load_metrics(os.path.join(full_run, name)) for name in ('metrics.csv', 'metrics.json', 'summary.csv')]
    for r in results:
        assert r.top1 == pytest.approx(best['top1']) and r.epoch == best['epoch'] and r.epochs == len(rows)
        assert r.top5 == pytest.approx(best['top5'])
    for name in ('metrics.csv', 'metrics.json', 'summary.csv'):
        argv = ['cards', '--out-dir', str(tmp_path / name), '--metrics', f'resnet18_dropcluster={full_run}/{name}']
        assert cli_main(argv) == 0
        assert f"{best['top1']:.3f}" in (tmp_path / name / 'resnet18_dropcluster.md').read_text()
    empty = tmp_path / 'empty.csv'
    empty.write_text('epoch,train_loss\n0,1.0\n')
    with pytest.raises(ValueError, match='no rows with a top1 column'):
        load_metrics(empty)

"""The rehearsal: every stage of a preset for a few steps, measured and projected (`kt_paper.rehearsal`)."""
import csv, json, math
import pytest
from kt_paper.rehearsal import StageRow, full_run_jobs, rehearsal_roots, write_rehearsal
from kt_paper.reproduce import main

STAGES = ['data', 'pretext', 'teachers', 'clustering', 'student', 'evaluation', 'transfer']

def test_test_sized_rehearsal_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv('KT_PAPER_PRECISION', 'fp32')
    main(['reproduce', '--preset', 'test', '--rehearse', '--rehearse-steps', '3', '--device', 'cpu', '--fig-dir', str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path/'rehearsal.csv')))
    assert [r['stage'] for r in rows] == ['data', 'pretext', 'teachers', 'teachers', 'clustering', 'student', 'evaluation', 'evaluation',
                                          'transfer', 'transfer', 'transfer']
    for r in rows:
        assert float(r['step_s']) > 0 and float(r['hours']) > 0 and float(r['full_steps']) > 0, r
        assert float(r['peak_rss_gb']) > 0.1, r
    info = json.loads((tmp_path/'rehearsal.json').read_text())
    assert set(info['hours_by_stage']) == set(STAGES) and info['preset'] == 'test'
    assert math.isclose(info['total_hours'], sum(float(r['hours']) for r in rows), rel_tol=1e-3)
    md = (tmp_path/'rehearsal.md').read_text()
    assert 'bf16 units' in md and '**total**' in md and 'Input pipeline' in md

def test_rehearse_refuses_changed_settings(tmp_path):
    with pytest.raises(SystemExit): main(['reproduce', '--preset', 'test', '--rehearse', '--set', 'clustering.k=3'])

def test_projection_arithmetic_and_table(tmp_path):
    rows = [StageRow('student', 'AlexNet', 4, 2.0, 256, 0.1, 3.0, 0., 10, 450_360, 6, 1.4),
            StageRow('pretext', 'CFN', 4, 0.5, 256, 0.2, 2.0, 0., 10, 350_000, 3, 0.7)]
    assert rows[0].hours == pytest.approx(450_360 * 6 * 2.0 / 3600) and rows[0].items_per_s == 128
    info = dict(preset='paper', machine='m', precision='bf16', data={'imagenet': 'x (sample)'}, steps=4, n_images=256,
                rehearsal_seconds=1., input_rates={'full decode': 200.}, total_hours=sum(r.hours for r in rows))
    write_rehearsal(rows, info, tmp_path)
    md = (tmp_path/'rehearsal.md').read_text()
    assert f"**{info['total_hours']:,.1f}**" in md and '85 cores (full decode)' in md   # 1.7e4 / 200

def test_paper_jobs_and_sample_roots(tmp_path):
    j = full_run_jobs('paper')
    assert j['students'] >= 5 and j['probe_sets'] == 2
    assert j['probe_models'] == j['voc_models'] - (j['students'] - j['teachers'])   # the ablation students: VOC07 only
    assert j['nonlinear_probes'] == 29                                               # Table E's runs
    roots, source = rehearsal_roots('test')
    assert set(source.values()) == {'builtin'} and all(p.is_dir() for p in roots.values())
    with pytest.raises(Exception, match='data_root|needs the real dataset'): rehearsal_roots('paper', None)

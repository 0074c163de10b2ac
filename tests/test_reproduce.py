"""The papermill driver: end to end on the real stage notebooks (test preset), caching, resume and failure paths."""
import json
from pathlib import Path
import pytest
from kt_paper.reproduce import find_stages, reproduce, main, STAGES
from kt_paper.core import load_json

def _toy_nb(path, body):
    cells = [dict(cell_type='code', metadata=dict(tags=['parameters']), outputs=[], execution_count=None,
                  source="PRESET='tiny'; OUT_DIR=None; SEED=0"),
             dict(cell_type='code', metadata={}, outputs=[], execution_count=None, source=body)]
    nb = dict(cells=cells, nbformat=4, nbformat_minor=4,
              metadata=dict(kernelspec=dict(name='python3', language='python', display_name='python3')))
    Path(path).write_text(json.dumps(nb))

def test_stages_are_in_pipeline_order():
    names = [s.name for s in find_stages()]
    order = [n for n, _ in STAGES]
    assert names and names == [n for n in order if n in names]

def test_failed_stage_is_kept_and_run_resumes(tmp_path):
    nbs = tmp_path/'nbs'; nbs.mkdir()
    _toy_nb(nbs/'04_samples.ipynb', "from pathlib import Path\np = Path(OUT_DIR,'count.txt')\n"
            "p.write_text(str(int(p.read_text())+1 if p.exists() else 1))")
    _toy_nb(nbs/'11_pretext.ipynb', "from pathlib import Path\nif not Path(OUT_DIR,'fixed').exists(): raise RuntimeError('boom')")
    with pytest.raises(Exception, match='boom'):
        reproduce('tiny', out=tmp_path/'run', fig_dir=tmp_path/'fig', nbs_path=nbs)
    m = load_json(tmp_path/'run'/'manifest.json')
    assert 'boom' in m['stages']['jigsaw']['failed']
    assert (tmp_path/'run'/'notebooks'/'11_pretext.failed.ipynb').exists()
    assert not (tmp_path/'run'/'notebooks'/'11_pretext.ipynb').exists()
    (tmp_path/'run'/'fixed').write_text('')
    m = reproduce('tiny', out=tmp_path/'run', fig_dir=tmp_path/'fig', nbs_path=nbs)
    assert m['stages']['data']['cached'] and not m['stages']['jigsaw']['cached']
    assert (tmp_path/'run'/'count.txt').read_text() == '1'      # the finished stage was not run again
    m = reproduce('tiny', out=tmp_path/'run', fig_dir=tmp_path/'fig', nbs_path=nbs, force=True, only='data')
    assert list(m['stages']) == ['data'] and (tmp_path/'run'/'count.txt').read_text() == '2'

def test_cli_rejects_unknown_stage(tmp_path, capsys):
    nbs = tmp_path/'nbs'; nbs.mkdir(); _toy_nb(nbs/'04_samples.ipynb', 'x = 1')
    with pytest.raises(ValueError, match='no such stage'):
        reproduce('tiny', out=tmp_path/'run', nbs_path=nbs, only='student')
    with pytest.raises(SystemExit): main(['reproduce', '--preset', 'nope'])

def test_pipeline_end_to_end_test_preset(tmp_path, monkeypatch):
    "Every real stage notebook runs through papermill at the `test` preset; a second run is fully cached."
    monkeypatch.setenv('IN_TEST', '1')
    m = reproduce('test', out=tmp_path/'run', fig_dir=tmp_path/'fig')
    stages = [s.name for s in find_stages()]
    assert list(m['stages']) == stages
    for s in find_stages(): assert (tmp_path/'run'/'notebooks'/s.notebook.name).exists()
    man = load_json(tmp_path/'run'/'manifest.json')
    assert man['preset'] == 'test' and man['environment']['torch']
    assert load_json(tmp_path/'fig'/'run_manifest.json')['stages'] == man['stages']   # the figures say which run made them
    assert "(preset `test`)" in (tmp_path/'fig'/'claims.md').read_text()   # written before the run's manifest exists
    m2 = reproduce('test', out=tmp_path/'run', fig_dir=tmp_path/'fig')
    assert all(v['cached'] for v in m2['stages'].values())


def test_papermill_reads_every_stage_parameter():
    "papermill's own parser sees every knob of each stage's `parameters` cell (else the driver's values are 'unknown')."
    import nbformat
    from papermill.translators import PythonTranslator
    from kt_paper.reproduce import notebook_parameters
    for st in find_stages():
        nb = nbformat.read(st.notebook, as_version=4)
        cell = next(c for c in nb.cells if 'parameters' in c.metadata.get('tags', []))
        seen = {p.name for p in PythonTranslator.inspect(cell)}
        assert seen == notebook_parameters(st.notebook), f"{st.notebook.name}: papermill reads {sorted(seen)}"
        assert {'PRESET', 'DATA_ROOT', 'OUT_DIR', 'SEED', 'DEVICE'} <= seen, st.notebook.name

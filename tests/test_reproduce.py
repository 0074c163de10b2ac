"""The papermill driver: end to end on the real stage notebooks (test preset), caching, resume and failure paths."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
from kt_paper.reproduce import find_stages, reproduce, main, STAGES
from kt_paper.core import load_json

ROOT = Path(__file__).resolve().parents[1]

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

def _kt_paper(args, env, cwd):
    "Run the `kt-paper` command line in a subprocess; return its console output (fails the test on a non-zero exit)."
    r = subprocess.run([sys.executable, '-c', 'from kt_paper.reproduce import main; main()', *args], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout

def test_pipeline_end_to_end_and_code_changes(tmp_path):
    """Every real stage notebook runs through papermill at the `test` preset from a copy of the package; a second run is
    fully cached; an edit of a module the clustering stage runs (not its notebook) re-runs clustering and every later
    stage, with the reason printed, and leaves data, jigsaw and teachers cached. Figures go under the run folder."""
    site = tmp_path/'site'; shutil.copytree(ROOT/'kt_paper', site/'kt_paper', ignore=shutil.ignore_patterns('__pycache__'))
    env = dict(os.environ, PYTHONPATH=str(site), IN_TEST='1')
    run, args = tmp_path/'run', ['reproduce', '--preset', 'test', '--out', str(tmp_path/'run'), '--nbs-path', str(ROOT/'nbs')]
    out1 = _kt_paper(args, env, tmp_path)
    stages = [s.name for s in find_stages()]
    man = load_json(run/'manifest.json')
    assert list(man['stages']) == stages and not any(v['cached'] for v in man['stages'].values()), out1
    assert man['environment']['python'] and 'kt_paper/kmeans.py' in man['stages']['clustering']['inputs']['code']
    for s in find_stages(): assert (run/'notebooks'/s.notebook.name).exists()
    fig = run/'figures'   # --out without --fig-dir: the tables follow the run
    assert load_json(fig/'run_manifest.json')['stages'] == man['stages']   # the figures say which run made them
    assert "(preset `test`, seed 0)" in (fig/'claims.md').read_text()
    out2 = _kt_paper(args, env, tmp_path)
    assert all(v['cached'] for v in load_json(run/'manifest.json')['stages'].values()), out2
    km = site/'kt_paper'/'kmeans.py'; km.write_text(km.read_text() + '\n# an edit that changes no behaviour\n')
    out3 = _kt_paper(args, env, tmp_path)
    cached = {n: v['cached'] for n, v in load_json(run/'manifest.json')['stages'].items()}
    assert cached == dict(data=True, jigsaw=True, teachers=True, clustering=False, student=False, evaluation=False,
                          transfer=False), out3
    assert re.search(r'clustering\s+running 14_clustering.ipynb \(code changed: kt_paper/kmeans.py\)', out3), out3
    assert re.search(r'evaluation\s+running 16_probes.ipynb \(.*re-run before it: clustering, student', out3), out3


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

def test_stage_kernel_is_this_interpreter(tmp_path, monkeypatch):
    "The stage notebooks run on the Python that runs the driver, even where Jupyter's `python3` kernelspec is another one."
    decoy = tmp_path/'jupyter'/'kernels'/'python3'; decoy.mkdir(parents=True)   # as on GPU images: `python3` = another interpreter
    (decoy/'kernel.json').write_text(json.dumps(dict(argv=[str(tmp_path/'other'/'python'), '-m', 'ipykernel_launcher', '-f',
                                                          '{connection_file}'], display_name='other', language='python')))
    monkeypatch.setenv('JUPYTER_PATH', str(tmp_path/'jupyter'))
    nbs = tmp_path/'nbs'; nbs.mkdir()
    _toy_nb(nbs/'04_samples.ipynb', "import sys\nfrom pathlib import Path\nPath(OUT_DIR, 'python.txt').write_text(sys.executable)")
    reproduce('tiny', out=tmp_path/'run', fig_dir=tmp_path/'fig', nbs_path=nbs, report=False)
    assert (tmp_path/'run'/'python.txt').read_text() == sys.executable
    assert os.environ['JUPYTER_PATH'] == str(tmp_path/'jupyter')   # restored after the stage

def test_device_checked_before_the_stages(tmp_path, monkeypatch, capsys):
    "`--device auto` falling back to the CPU where a driver is installed says so (console, manifest); `--device cuda` without CUDA stops the run."
    import torch, kt_paper.core
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(kt_paper.core, 'nvidia_driver_present', lambda: True)
    nbs = tmp_path/'nbs'; nbs.mkdir(); _toy_nb(nbs/'04_samples.ipynb', 'x = 1')
    m = reproduce('tiny', out=tmp_path/'run', nbs_path=nbs, report=False)
    assert "WARNING: device 'auto' runs on the CPU although an NVIDIA driver is installed" in capsys.readouterr().out
    assert len(m['device_warnings']) == 1
    with pytest.raises(SystemExit) as e: main(['reproduce', '--device', 'cuda', '--out', str(tmp_path/'run2'), '--nbs-path', str(nbs)])
    assert e.value.code == 2 and 'CUDA is not usable' in capsys.readouterr().err
    assert not (tmp_path/'run2'/'manifest.json').exists()

"""The `kt-paper` command line: settings (--set, --config), notebook parameters (-p), data roles (--data), caching."""
import json, shutil
from pathlib import Path
import pytest
from kt_paper.core import load_json
from kt_paper.reproduce import main, find_stages, notebook_parameters

PARAMS = "PRESET = 'tiny'\nOUT_DIR = None\nSEED = 0\nOVERRIDES = '{}'\nTEACHERS = 'auto'"

def _toy_nb(path, body, params=PARAMS):
    cells = [dict(cell_type='code', metadata=dict(tags=['parameters']), outputs=[], execution_count=None, source=params),
             dict(cell_type='code', metadata={}, outputs=[], execution_count=None, source=body)]
    nb = dict(cells=cells, nbformat=4, nbformat_minor=4,
              metadata=dict(kernelspec=dict(name='python3', language='python', display_name='python3')))
    Path(path).write_text(json.dumps(nb))

@pytest.fixture
def toy(tmp_path):
    "Three toy stages that record what reached them: `<out>/<stage>.json` holds OVERRIDES and TEACHERS."
    nbs = tmp_path/'nbs'; nbs.mkdir()
    for nb, name in (('04_samples', 'data'), ('14_clustering', 'clustering'), ('15_student', 'student')):
        _toy_nb(nbs/f'{nb}.ipynb', "import json, os\nfrom pathlib import Path\n"
                f"Path(OUT_DIR, '{name}.json').write_text(json.dumps(dict(overrides=json.loads(OVERRIDES), teachers=TEACHERS, "
                "imagenet=os.environ.get('KT_PAPER_DATA_IMAGENET'))))")
    return tmp_path

def _cli(toy, *args):
    main(['reproduce', '--preset', 'test', '--out', str(toy/'run'), '--fig-dir', str(toy/'fig'), '--nbs-path', str(toy/'nbs'), *args])
    return load_json(toy/'run'/'manifest.json')

def _seen(toy, stage): return load_json(toy/'run'/f'{stage}.json')

def _ran(m): return {n: not v['cached'] for n, v in m['stages'].items()}

def test_set_reaches_its_stage_and_reruns_it_and_later_ones(toy, capsys):
    m = _cli(toy)
    assert _ran(m) == dict(data=True, clustering=True, student=True)
    m = _cli(toy, '--set', 'clustering.k=5', '--set', 'clustering.whiten=false')
    assert _ran(m) == dict(data=False, clustering=True, student=True)
    assert _seen(toy, 'clustering')['overrides'] == dict(k=5, whiten=False) and _seen(toy, 'student')['overrides'] == {}
    assert m['overrides'] == dict(clustering=dict(k=5, whiten=False))
    out = capsys.readouterr().out
    assert "setting --set clustering.k=5" in out and 'stage' in out and 'total' in out   # printed at start; the summary table
    assert not any(_ran(_cli(toy, '--set', 'clustering.k=5', '--set', 'clustering.whiten=false')).values())
    m = _cli(toy, '--set', 'student.lr_milestones=3,4')
    assert _ran(m) == dict(data=False, clustering=True, student=True)   # clustering back to its preset
    assert _seen(toy, 'student')['overrides'] == dict(lr_milestones=[3, 4])

@pytest.mark.parametrize('setting, message', [
    ('clustering.kk=5', "ClusterConfig has no field 'kk'; its fields: ['k',"),
    ('clustering.k=five', "clustering.k: 'five' is not a valid int"),
    ('clustering.whiten=maybe', 'use true or false'),
    ('kmeans.k=5', "no stage 'kmeans'; stages: ['data', 'jigsaw'"),
    ('clustering.k', 'expected stage.field=value'),
    ('transfer.cls=3', 'is a group of settings'),
])
def test_bad_settings_are_usage_errors(toy, capsys, setting, message):
    with pytest.raises(SystemExit) as e: _cli(toy, '--set', setting)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (toy/'run'/'manifest.json').exists()    # nothing ran

def test_setting_a_stage_the_run_lacks_or_that_takes_no_overrides(toy, capsys):
    with pytest.raises(SystemExit): _cli(toy, '--set', 'jigsaw.iterations=3')
    assert "which this run does not have" in capsys.readouterr().err
    _toy_nb(toy/'nbs'/'11_pretext.ipynb', 'x = 1', params="PRESET='tiny'; OUT_DIR=None")
    with pytest.raises(SystemExit): _cli(toy, '--set', 'jigsaw.iterations=3')
    assert "11_pretext.ipynb takes no OVERRIDES parameter" in capsys.readouterr().err

def test_config_file_and_set_on_top(toy, capsys):
    cfg = toy/'run.toml'
    cfg.write_text('[clustering]\nk = 4\nniter = 3\n\n[params]\nTEACHERS = "hog"\n')
    _cli(toy, '--config', str(cfg), '--set', 'clustering.k=6')
    assert _seen(toy, 'clustering') == dict(overrides=dict(k=6, niter=3), teachers='hog', imagenet=None)
    cfg.write_text('[clustering]\nk = "four"\n')
    with pytest.raises(SystemExit): _cli(toy, '--config', str(cfg))
    assert "run.toml: clustering.k: 'four' is not a valid int" in capsys.readouterr().err
    with pytest.raises(SystemExit): _cli(toy, '--config', str(toy/'none.toml'))
    assert 'no such file' in capsys.readouterr().err

def test_param_forwarding_and_unknown_names(toy, capsys):
    m = _cli(toy, '-p', 'TEACHERS=hog,random')
    assert _seen(toy, 'clustering')['teachers'] == 'hog,random' and _seen(toy, 'data')['teachers'] == 'hog,random'
    m = _cli(toy, '-p', 'TEACHERS=hog,random', '-p', 'clustering.TEACHERS=hog')   # the later, for one stage, wins there
    assert _ran(m) == dict(data=False, clustering=True, student=True) and _seen(toy, 'clustering')['teachers'] == 'hog'
    assert m['notebook_parameters']['clustering'] == dict(TEACHERS='hog')
    with pytest.raises(SystemExit): _cli(toy, '-p', 'NOPE=1')
    err = capsys.readouterr().err
    assert "no stage declares 'NOPE'" in err and "clustering: ['TEACHERS']" in err
    with pytest.raises(SystemExit): _cli(toy, '-p', 'SEED=3')
    assert 'use --seed' in capsys.readouterr().err

def test_data_roles_checked_up_front_and_passed_on(toy, capsys):
    from kt_paper.builtin import ensure_builtin_dataset
    mine = toy/'my_objects'; shutil.copytree(ensure_builtin_dataset(None, 0, 'test')/'objects', mine)
    m = _cli(toy, '--data', f'imagenet={mine}')
    assert _seen(toy, 'student')['imagenet'] == str(mine) and m['data_roles'] == dict(imagenet=str(mine))
    assert not any(_ran(_cli(toy, '--data', f'imagenet={mine}')).values())
    assert all(_ran(_cli(toy)).values())                      # back to the preset's data: everything re-runs
    with pytest.raises(SystemExit): _cli(toy, '--data', f'imagenet={toy/"nowhere"}', '--data', f'voc07={mine}', '--data', 'coco=/x')
    assert 'not a data role' in capsys.readouterr().err
    with pytest.raises(SystemExit): _cli(toy, '--data', f'imagenet={toy/"nowhere"}', '--data', f'voc07={mine}')
    err = capsys.readouterr().err
    assert 'imagenet = ' in err and 'folder not found' in err and 'voc07 = ' in err and err.count('expected') == 2

def test_changed_data_reruns_the_data_stage_and_later_ones(toy, capsys):
    "A file replaced in a data role's folder re-runs the data stage (whose image check must see it) and every stage after it."
    from kt_paper.builtin import ensure_builtin_dataset
    import os
    mine = toy/'my_objects'; shutil.copytree(ensure_builtin_dataset(None, 0, 'test')/'objects', mine)
    _cli(toy, '--data', f'imagenet={mine}')
    assert not any(_ran(_cli(toy, '--data', f'imagenet={mine}')).values())
    f = sorted((mine/'train'/'cat').iterdir())[0]; st = f.stat(); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    capsys.readouterr(); m = _cli(toy, '--data', f'imagenet={mine}')
    assert all(_ran(m).values()) and 'data changed: imagenet' in capsys.readouterr().out

def test_data_role_reaches_the_real_data_stage(tmp_path, monkeypatch):
    "`--data` on the real data notebook: the stage reads the given folder (through $KT_PAPER_DATA_<ROLE>)."
    from kt_paper.builtin import ensure_builtin_dataset
    monkeypatch.setenv('IN_TEST', '1')
    mine = tmp_path/'my_places'; shutil.copytree(ensure_builtin_dataset(None, 0, 'test')/'scenes', mine)
    main(['reproduce', '--preset', 'test', '--out', str(tmp_path/'run'), '--fig-dir', str(tmp_path/'fig'),
          '--only', 'data', '--data', f'places={mine}'])
    nb = json.loads((tmp_path/'run'/'notebooks'/'04_samples.ipynb').read_text())
    text = ''.join(''.join(o.get('text', '')) for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', []))
    assert f'<- {mine}' in text, text[:2000]

def test_every_real_stage_forwards_its_overrides():
    for st in find_stages():
        assert 'OVERRIDES' in notebook_parameters(st.notebook), st.notebook.name
        code = '\n'.join(''.join(c['source']) for c in json.loads(st.notebook.read_text())['cells'] if c['cell_type'] == 'code')
        assert 'json.loads(OVERRIDES)' in code, st.notebook.name

def test_small_commands(capsys):
    with pytest.raises(SystemExit) as e: main(['--version'])
    assert e.value.code == 0 and 'kt-paper' in capsys.readouterr().out
    main(['stages']); out = capsys.readouterr().out
    assert 'clustering' in out and '--set clustering.<ClusterConfig field>' in out and 'PROBE_SETS' in out
    main(['config', '--preset', 'test', '--stage', 'clustering', '--set', 'clustering.k=5'])
    assert 'k = 5  # changed' in capsys.readouterr().out
    main(['config', '--preset', 'test', '--set', 'transfer.cls.iters=7'])
    out = capsys.readouterr().out
    assert '[transfer.cls]' in out and 'iters = 7  # changed' in out and '[student]' in out

def test_log_output_streams_cell_output(toy, capsys):
    _toy_nb(toy/'nbs'/'14_clustering.ipynb', "for i in range(2): print('progress', i, flush=True)")
    _cli(toy, '--only', 'clustering', '--log-output')
    _cli(toy, '--only', 'clustering', '--log-output', '--force')       # a second call adds no second handler
    out = capsys.readouterr().out
    assert out.count('progress 1') == 2 and 'clustering   ran' in out


def test_progress_lines_appear_while_a_stage_runs(tmp_path):
    "A stage's progress events (`core.progress`, as `train.fit` and `extract_features` send them) reach the console during the stage."
    import subprocess, sys, time
    nbs = tmp_path/'nbs'; nbs.mkdir()
    _toy_nb(nbs/'04_samples.ipynb', "import time\nfrom pathlib import Path\nfrom kt_paper.core import progress\n"
            "for e in range(1, 4):\n    progress('toy model', e, 3, eta_s=3 - e, loss=1. / e); time.sleep(1.5)\n"
            "Path(OUT_DIR, 'ended.txt').write_text(str(time.time()))")
    cmd = [sys.executable, '-c', 'import sys; from kt_paper.reproduce import main; main(sys.argv[1:])', 'reproduce', '--preset', 'test',
           '--out', str(tmp_path/'run'), '--fig-dir', str(tmp_path/'fig'), '--nbs-path', str(nbs)]
    p, seen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True), []
    for line in p.stdout: seen.append((time.time(), line.rstrip()))
    assert p.wait() == 0, seen
    lines = [(t, l.strip()) for t, l in seen if 'toy model: epoch' in l]
    assert [l for _, l in lines] == ['data: toy model: epoch 1/3, loss 1, ETA 0m02s', 'data: toy model: epoch 2/3, loss 0.5, ETA 0m01s',
                                     'data: toy model: epoch 3/3, loss 0.3333, ETA 0m00s'], seen
    ended = float((tmp_path/'run'/'ended.txt').read_text())
    assert lines[0][0] < ended - 1.5, (lines[0][0], ended)   # the first line was on the console while the stage still ran


def test_a_stage_notebook_run_alone_builds_its_inputs(tmp_path):
    "The clustering notebook, run by papermill alone in an empty run folder (not by the driver), runs data, jigsaw and teachers first."
    import os, papermill as pm
    from kt_paper.reproduce import notebooks_dir, prepare_notebook
    src = prepare_notebook(notebooks_dir()/'14_clustering.ipynb', tmp_path/'14_clustering.ipynb')
    env = {k: v for k, v in os.environ.items() if not k.startswith('KT_PAPER_DRIVER')}
    env.update(IN_TEST='1', KT_PAPER_STANDALONE='1', KT_PAPER_PRECISION='fp32', MPLBACKEND='agg')
    old = dict(os.environ); os.environ.clear(); os.environ.update(env)
    try: pm.execute_notebook(str(src), str(tmp_path/'done.ipynb'), parameters=dict(PRESET='test', OUT_DIR=str(tmp_path/'run')),
                             kernel_name='python3', progress_bar=False, cwd=str(notebooks_dir()))
    finally: os.environ.clear(); os.environ.update(old)
    run = tmp_path/'run'
    assert all((run/'stages'/f'{s}.json').exists() for s in ('data', 'jigsaw', 'teachers'))
    assert (run/'jigsaw'/'jigsaw_cfn.pth').exists()
    assert all((run/'clusters'/t/'current.json').exists() for t in ('jigsaw', 'hog', 'random'))   # the lesson's own results


def test_resize_command(tmp_path, capsys):
    "`kt-paper resize SRC DEST` makes the pre-resized copy; a detection tree is refused with a usage error naming it."
    from PIL import Image
    from kt_paper.reproduce import main
    (tmp_path/'src'/'c').mkdir(parents=True)
    Image.new('RGB', (512, 300)).save(tmp_path/'src'/'c'/'a.jpg')
    main(['resize', str(tmp_path/'src'), str(tmp_path/'dst'), '--short-side', '100', '--workers', '0'])
    assert '1 resized' in capsys.readouterr().out
    assert Image.open(tmp_path/'dst'/'c'/'a.jpg').size == (171, 100)
    (tmp_path/'voc'/'Annotations').mkdir(parents=True); (tmp_path/'voc'/'Annotations'/'x.xml').write_text('<a/>')
    with pytest.raises(SystemExit): main(['resize', str(tmp_path/'voc'), str(tmp_path/'v')])
    assert 'pixel coordinates' in capsys.readouterr().err

def _kt_paper_cli(*args, env=None, cwd=None):
    "The installed `kt-paper` console script (or its entry point), run as a user would: `(exit status, stdout, stderr)`."
    import os, subprocess, sys
    exe = Path(sys.executable).parent/'kt-paper'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-c', 'from kt_paper.reproduce import main; main()']
    r = subprocess.run(cmd + list(args), env=dict(os.environ, IN_TEST='1', **(env or {})), cwd=cwd, capture_output=True,
                       text=True, timeout=900)
    return r.returncode, r.stdout, r.stderr

def _objects_with_bad_images(tmp_path):
    "The test-scale objects with a truncated, a zero-byte and a non-image `.jpg` among their training images."
    from kt_paper.builtin import ensure_builtin_dataset
    mine = tmp_path/'my_objects'; shutil.copytree(ensure_builtin_dataset(None, 0, 'test')/'objects', mine)
    cls = mine/'train'/'dog'; good = sorted(cls.iterdir())[0].read_bytes()
    bad = [cls/'truncated.jpg', cls/'empty.jpg', cls/'notes.jpg']
    bad[0].write_bytes(good[:len(good)//3]); bad[1].write_bytes(b''); bad[2].write_text('these are my notes, not a picture')
    return mine, bad

def test_bad_images_stop_the_run_before_any_training(tmp_path):
    "`--on-bad-image raise` (the default): the data stage decodes everything and stops the run with a short list, no traceback."
    mine, bad = _objects_with_bad_images(tmp_path)
    rc, out, err = _kt_paper_cli('reproduce', '--preset', 'test', '--out', str(tmp_path/'run'), '--data', f'imagenet={mine}', cwd=tmp_path)
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    assert 'Traceback' not in err and 'Traceback' not in out, err[-3000:]
    assert '3 of ' in err and '--on-bad-image skip' in err, err
    for f in bad: assert str(f) in err, err
    m = load_json(tmp_path/'run'/'manifest.json')
    assert list(m['stages']) == ['data'] and 'failed' in m['stages']['data']   # nothing after the data stage ran
    assert not (tmp_path/'run'/'jigsaw').exists()

def test_bad_images_left_out_of_every_stage(tmp_path):
    """`--on-bad-image skip`: the run goes on without them; the manifest, `image_check.md` and the stages' inputs agree.
    (The data stage, the pretext stage, where the issue's crash happened, and the teachers stage, whose features feed
    the clustering and the students: every reader takes the same list, `kt_paper.data.images_left_out`.)"""
    mine, bad = _objects_with_bad_images(tmp_path)
    run = tmp_path/'run'
    for stage in ('data', 'jigsaw', 'teachers'):
        rc, out, err = _kt_paper_cli('reproduce', '--preset', 'test', '--out', str(run), '--data', f'imagenet={mine}',
                                     '--on-bad-image', 'skip', '--only', stage, cwd=tmp_path)
        assert rc == 0, (out[-3000:], err[-3000:])
        if stage == 'data': assert '3 unreadable images left out of every stage' in out, out
    m = load_json(run/'manifest.json')
    assert sorted(s.split(':')[0] for s in m['image_check']['left_out']) == sorted(map(str, bad))
    md = (run/'figures'/'image_check.md').read_text()
    assert all(str(f) in md for f in bad) and 'left out of every stage' in md
    assert (run/'jigsaw'/'jigsaw_cfn.pth').exists()   # the pretext stage trained: it would have died decoding them
    for teacher in ('hog', 'random'):   # the teachers' features (the clustering's and the students' inputs) lack them
        ids = load_json(run/'features'/teacher/'objects_train.json')['ids']
        assert ids and not any(i.endswith(('truncated.jpg', 'empty.jpg', 'notes.jpg')) for i in ids)

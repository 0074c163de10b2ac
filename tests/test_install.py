"""Installed use: the built wheel, in a fresh virtual environment, runs `kt-paper` outside the repository.

The fresh environment installs only the wheel (`--no-deps`) and borrows, from the running environment, the installed
distributions that kt_paper's runtime requirements need (resolved recursively from their metadata), linked into a
folder of their own: the dev extras (nbdev, pytest, ...) and anything only they pull in stay invisible, as after
`pip install kt_paper`. No network, no second copy of torch.
"""
import os, subprocess, sys, sysconfig, venv
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def _run(cmd, **kw):
    kw.setdefault('env', {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})   # the fresh environment sees only its own path
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r

def _runtime_closure(dist_name:str) -> set:
    "The installed distributions `dist_name` needs at run time (its requirements without extras, recursively)."
    from importlib import metadata
    from packaging.requirements import Requirement
    seen, todo = set(), [dist_name]
    while todo:
        d = metadata.distribution(todo.pop())
        name = d.metadata['Name'].lower().replace('_', '-')
        if name in seen: continue
        seen.add(name)
        for r in map(Requirement, d.requires or []):
            if r.marker is not None and not r.marker.evaluate({'extra': ''}): continue   # extras and other platforms
            try: metadata.distribution(r.name)
            except metadata.PackageNotFoundError: continue                             # optional, not installed
            todo.append(r.name)
    return seen

def _link_distributions(names:set, dest:Path):
    "Symlink the top-level files and folders of the installed distributions `names` (and their metadata) into `dest`."
    from importlib import metadata
    site = Path(sysconfig.get_paths()['purelib'])
    for d in metadata.distributions():
        if d.metadata['Name'].lower().replace('_', '-') not in names or d.metadata['Name'].lower() == 'kt-paper': continue
        tops = {Path(f).parts[0] for f in (d.files or []) if not str(f).startswith('..')}
        for t in tops:
            if (site/t).exists() and not (dest/t).exists() and t != '__pycache__': (dest/t).symlink_to(site/t)

@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    d = tmp_path_factory.mktemp('install')
    _run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', str(ROOT), '-w', str(d/'dist')])
    wheel = next((d/'dist').glob('kt_paper-*.whl'))
    venv.EnvBuilder(with_pip=False).create(d/'env')
    py = d/'env'/'bin'/'python'
    purelib = _run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).stdout.strip()
    deps = d/'runtime_deps'; deps.mkdir()
    _link_distributions(_runtime_closure('kt_paper') - {'kt-paper'}, deps)
    Path(purelib, '_runtime_deps.pth').write_text(str(deps) + '\n')
    _run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', purelib, str(wheel)])
    return d, py

def test_fresh_environment_sees_no_dev_extras(installed):
    d, py = installed
    for mod in ('nbdev', 'pytest', 'pyflakes'):
        r = subprocess.run([str(py), '-c', f'import {mod}'], capture_output=True, text=True, cwd=d)
        assert r.returncode != 0, f'{mod} is importable in the fresh environment: the test would not catch a runtime import of it'
    v = _run([str(py), '-c', 'import kt_paper; print(kt_paper.__version__)'], cwd=d).stdout.strip()
    import tomllib
    assert v == tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['version']

def test_wheel_ships_notebooks_and_cli(installed):
    d, py = installed
    where = _run([str(py), '-c', 'import kt_paper; print(kt_paper.__file__)'], cwd=d).stdout.strip()
    assert str(d) in where, f'kt_paper imported from {where}, not from the fresh environment'
    _run([str(py), '-c', 'from kt_paper.reproduce import main; main(["notebooks", "nbs"])'], cwd=d)
    assert (d/'nbs'/'01_data.ipynb').exists() and (d/'nbs'/'25_reproduce.ipynb').exists()

def test_installed_reproduce_runs_outside_repo(installed):
    d, py = installed
    env = {**os.environ, 'IN_TEST': '1', 'MPLBACKEND': 'agg'}
    env.pop('PYTHONPATH', None)
    _run([str(py), '-c', 'from kt_paper.reproduce import main; main(["reproduce", "--preset", "test", "--out", "run"])'], cwd=d, env=env)
    m = (d/'run'/'manifest.json')
    assert (d/'run'/'notebooks'/'04_samples.ipynb').exists() and m.exists()
    import json
    assert len(json.loads(m.read_text())['stages']) == 7, 'every stage ran'
    assert (d/'run'/'figures').is_dir()   # outside a checkout, figures go under the run folder

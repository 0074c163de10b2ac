"""Installed use: the built wheel, in a fresh virtual environment, runs `kt-paper` outside the repository.

The fresh environment installs only the wheel (`--no-deps`) and borrows the already installed dependencies of the
running environment through a `.pth` file, so the test needs no network and no second copy of torch.
"""
import os, subprocess, sys, sysconfig, venv
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r

@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    d = tmp_path_factory.mktemp('install')
    _run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', str(ROOT), '-w', str(d/'dist')])
    wheel = next((d/'dist').glob('kt_paper-*.whl'))
    venv.EnvBuilder(with_pip=False).create(d/'env')
    py = d/'env'/'bin'/'python'
    purelib = _run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).stdout.strip()
    Path(purelib, '_borrowed_deps.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    _run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', purelib, str(wheel)])
    return d, py

def test_wheel_ships_notebooks_and_cli(installed):
    d, py = installed
    where = _run([str(py), '-c', 'import kt_paper; print(kt_paper.__file__)'], cwd=d).stdout.strip()
    assert str(d) in where, f'kt_paper imported from {where}, not from the fresh environment'
    _run([str(py), '-c', 'from kt_paper.reproduce import main; main(["notebooks", "nbs"])'], cwd=d)
    assert (d/'nbs'/'01_data.ipynb').exists() and (d/'nbs'/'21_reproduce.ipynb').exists()

def test_installed_reproduce_runs_outside_repo(installed):
    d, py = installed
    env = {**os.environ, 'IN_TEST': '1', 'MPLBACKEND': 'agg'}
    _run([str(py), '-c', 'from kt_paper.reproduce import main; main(["reproduce", "--preset", "test", "--only", "data", "--out", "run"])'],
         cwd=d, env=env)
    assert (d/'run'/'notebooks'/'04_samples.ipynb').exists() and (d/'run'/'manifest.json').exists()
    assert (d/'run'/'figures').is_dir()   # outside a checkout, figures go under the run folder

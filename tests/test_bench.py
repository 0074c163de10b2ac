"""Benchmarks that cannot rot: every `bench/*.py` script runs at its smoke size (`--smoke`: toy sizes, seconds) in a
fresh Python process, exits 0 and prints the lines it closes with, so that an import or API change that breaks a
benchmark fails the suite. The numbers of a smoke run mean nothing and are not checked, only that they were printed.

A new script is picked up by the glob: it fails here until it accepts `--smoke` (argparse exits 2 on an unknown
option) and its closing lines are listed in `CLOSING`. Files starting with `_` are helpers, not benchmarks.
"""
import json, os, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT/'bench').glob('*.py') if not p.name.startswith('_'))
NUM = r'-?\d+\.\d+'   # a finite number as the scripts print them (a NaN or inf from a mis-sized smoke run fails)

# The last lines of each script's output, in order (regexes, matched from the start of the line).
TRAIN_END = [rf'train_ratio_premade_min: {NUM}$', rf'train_ratio_min: {NUM}$']
CLOSING = {
    'data.py':     [rf'objects +pixels16 +val accuracy {NUM}', rf'objects +hog +val accuracy {NUM}',
                    rf'scenes +pixels16 +val accuracy {NUM}', rf'scenes +hog +val accuracy {NUM}'],
    'decode.py':   [rf'draft_speedup_2x: {NUM}$', rf'resized_speedup_2x: {NUM}$'],
    'features.py': [rf'hog: peak RSS ratio \(largest/smallest size\) {NUM}', rf'random: peak RSS ratio \(largest/smallest size\) {NUM}'],
    'gpu.py':      TRAIN_END,   # without CUDA: bench/train.py on the CPU, one trainer, through gpu.py's hand-over
    'jigsaw.py':   [rf'speedup: {NUM}$', rf'data_overhead: {NUM}$'],
    'kmeans.py':   [rf'speedup: {NUM}$', rf'objective_ratio: {NUM}$', rf'faiss_overhead: {NUM}$'],
    'memory.py':   [rf'rss_growth_puzzles: {NUM}$', rf'rss_growth_features: {NUM}$'],
    'train.py':    TRAIN_END,
}
# Lines every smoke run prints somewhere: the machine it ran on (the benchmarks' convention) and the smoke notice.
ALWAYS = [r'machine: \S', r'smoke size: ']

def test_scripts_found():
    assert len(SCRIPTS) >= 8, SCRIPTS   # the glob works from any working directory

def test_closing_lines_cover_exactly_the_scripts():
    assert sorted(CLOSING) == SCRIPTS, "a bench/ script without its closing lines in CLOSING, or a stale entry"

@pytest.mark.parametrize('name', SCRIPTS)
def test_smoke(name):
    cmd = [sys.executable, str(ROOT/'bench'/name), '--smoke']
    # One compute thread: on a shared 2-core machine, OpenMP threads that wait for each other at every barrier make a
    # loaded run several times slower (measured: 7 s -> 15-30 s for bench/jigsaw.py --smoke at load 6); code paths are the same.
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'MPLBACKEND': 'agg', 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    out = r.stdout.splitlines()
    tail = '\n'.join(out[-15:]) + '\n--- stderr ---\n' + r.stderr[-3000:]
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{tail}"
    for pat in ALWAYS: assert any(re.match(pat, l) for l in out), f"{name} --smoke printed no line matching {pat!r}:\n{tail}"
    want = CLOSING.get(name)
    assert want, f"bench/{name}: list the lines it closes with in tests/test_bench.py's CLOSING"
    last = out[-len(want):]
    assert len(last) == len(want) and all(re.match(p, l) for p, l in zip(want, last)), \
        f"bench/{name} --smoke: last lines\n" + '\n'.join(last) + "\ndo not match\n" + '\n'.join(want) + f"\n{tail}"

def test_train_bench_trains_kt_paper_on_the_device(monkeypatch):
    "Every kt_paper-side trainer of bench/train.py gets its network on `--device`, as the bare loops (the meta device stands in for a GPU)."
    import importlib.util, torch, kt_paper.train, kt_paper.finetune
    monkeypatch.syspath_prepend(str(ROOT/'bench'))   # its `_common`
    spec = importlib.util.spec_from_file_location('bench_train', ROOT/'bench'/'train.py')
    bt = importlib.util.module_from_spec(spec); spec.loader.exec_module(bt)
    monkeypatch.setattr(bt, 'DEVICE', torch.device('meta'))
    class Stop(Exception): pass
    seen = {}
    def fake_fit(learn, *a, **k): seen[case] = next(learn.model.parameters()).device.type; raise Stop
    def fake_steps(model, draws, cfg, loss, device, *a, **k): seen[case] = torch.device(device).type; raise Stop
    monkeypatch.setattr(kt_paper.train, 'fit', fake_fit); monkeypatch.setattr(kt_paper.finetune, 'train_steps', fake_steps)
    for case, make in bt.CASES.items():
        kt = make('test', 1, 1)[1]
        with pytest.raises(Stop): kt()
    assert seen == {c: 'meta' for c in bt.CASES}

# bench/gpu_check.sh, the prepared device check for one CUDA GPU (a shell script: not in the glob above). These machines
# have no GPU: the tests check that it stands down without CUDA, and walk its plumbing with `--dry-run` on the CPU.
GPU_CHECK = ROOT/'bench'/'gpu_check.sh'
STEPS = ('env', 'data', 'decode', 'train', 'rehearsal')

def gpu_check(out, *args, **env):
    "Run bench/gpu_check.sh from another folder (it must find the repository itself) with this interpreter, `$OUT` = `out`."
    e = {k: v for k, v in os.environ.items() if not k.startswith('GPU_CHECK_')}
    e.update(GPU_CHECK_PYTHON=sys.executable, OUT=str(out), PYTHONWARNINGS='ignore', **env)
    return subprocess.run(['bash', str(GPU_CHECK), *args], capture_output=True, text=True, cwd=out, env=e, timeout=300)

def test_gpu_check_syntax():
    r = subprocess.run(['bash', '-n', str(GPU_CHECK)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_gpu_check_stands_down_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available(): pytest.skip('a CUDA machine: the check would run for minutes')
    r = gpu_check(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.fullmatch(r'gpu_check: no CUDA device here .*\n', r.stdout), r.stdout + r.stderr
    assert not (tmp_path/'gpu_check.json').exists() and not list(tmp_path.iterdir())   # it stopped at once

def _figures(r, out):
    "The JSON the script wrote, after checking that each of its figures was also printed as a `name: value` line."
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((out/'gpu_check.json').read_text())
    printed = dict(l.split(': ', 1) for l in r.stdout.splitlines() if re.match(r'[a-z_0-9]+: ', l))
    assert set(d) == set(printed), set(d) ^ set(printed)
    for k, v in d.items(): assert (printed[k] == v if isinstance(v, str) else float(printed[k]) == v), (k, v, printed[k])
    assert re.fullmatch(r'gpu_check_seconds: \d+', r.stdout.splitlines()[-1]), r.stdout[-500:]
    return d

def test_gpu_check_dry_run(tmp_path):
    "`--dry-run` on the CPU: every step at smoke size, exit 0, the figures printed and in gpu_check.json, each step's log."
    r = gpu_check(tmp_path, '--dry-run')
    d = _figures(r, tmp_path)
    assert {d[f'step_{s}_rc'] for s in STEPS} == {0}, {s: d.get(f'step_{s}_rc') for s in STEPS}
    assert d['python'] == sys.executable and d['cuda_available'] == 'False' and d['torch_version']
    assert d['kernel_name'] == 'kt-paper-python' and d['kernel_interpreter']
    assert {d[f'layout_{r}'] for r in ('imagenet', 'places', 'voc07', 'voc12')} == {'preset'}   # the paper layout, genuine
    assert d['photo_size'] == '500x375' and d['decode_2x_size'] == '1000x750'
    for k in ('decode_1x_full_per_s', 'decode_2x_tv_cpu_per_s', 'draft_speedup_2x', 'train_ratio_min', 'train_pretext_kt_img_s',
              'rehearsal_total_hours', 'rehearsal_peak_rss_gb', 'rehearsal_student_cc_alexnet_items_per_s', 'gpu_check_seconds'):
        assert isinstance(d[k], (int, float)), (k, d.get(k))
    assert d['rehearsal'] == 'done' and (tmp_path/'rehearsal'/'rehearsal.md').exists()
    assert all((tmp_path/'gpu_check_logs'/f'{s}.log').stat().st_size > 0 for s in STEPS)

def test_gpu_check_budget(tmp_path):
    "A spent budget: every step is recorded as skipped, the run goes on to its end, writes its JSON and exits 0."
    d = _figures(gpu_check(tmp_path, '--dry-run', GPU_CHECK_BUDGET='2'), tmp_path)
    assert {d[f'step_{s}_rc'] for s in STEPS if s != 'rehearsal'} == {'skipped (budget spent)'}, d

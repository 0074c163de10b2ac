"""Benchmark of the built-in dataset: generation time and how hard its classification tasks are.

Usage: .venv/bin/python bench/data.py [--scale default] [--workers 0 2] [--skip-difficulty] [--smoke]
(`--smoke`: the `test` scale, 10 L-BFGS iterations (`--max-iter`), seconds; what `tests/test_bench.py` runs; its numbers
mean nothing.)

Prints, for each worker count, the wall and CPU time of `make_builtin_dataset` at the given scale, with the ratio
to the single-process run measured in the same invocation, and the machine it ran on. Then the validation accuracy
of a logistic regression on 16x16 pixels and on HOG features for the objects (ImageNet role) and scenes (Places
role), as a measure of difficulty (chance: 5% and 10%). Timings on a shared machine are noisy: read the CPU column.
"""
import argparse, os, shutil, tempfile, time, warnings
from pathlib import Path

import numpy as np

from kt_paper import data as D, builtin as S
from kt_paper.core import load_json
from _common import cpu_name, smoke_defaults, SMOKE_HELP, SMOKE_NOTE


def generation(scale: str, workers: list) -> Path:
    base = Path(tempfile.mkdtemp(prefix='kt_bench_data_')); ref = None; keep = None
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for w in workers:
        root = base/f'w{w}'
        t, c = time.perf_counter(), time.process_time()
        S.make_builtin_dataset(root, seed=0, **S.BUILTIN_SCALES[scale], n_workers=w)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        ref = ref or wall
        print(f"scale={scale} workers={w}: wall {wall:.1f} s (x{wall/ref:.2f} of the first), main-process CPU {cpu:.1f} s, "
              f"{load_json(root/'builtin.json')['counts']}")
        keep = root
    return keep


def difficulty(root: Path, max_iter: int = 300):
    from skimage.feature import hog
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    feats = {'pixels16': lambda im: np.asarray(im.resize((16, 16)), np.float32).ravel(),
             'hog': lambda im: hog(np.asarray(im.convert('L')), pixels_per_cell=(12, 12), cells_per_block=(2, 2))}
    for role in ('objects', 'scenes'):
        tr = D.read_class_folder(root/role, 'train'); va = D.read_class_folder(root/role, 'val', classes=tr.classes)
        imgs_tr = [D.load_rgb(p) for p in tr.paths]; imgs_va = [D.load_rgb(p) for p in va.paths]
        for name, f in feats.items():
            Xtr = np.stack([f(i) for i in imgs_tr]); Xva = np.stack([f(i) for i in imgs_va])
            sc = StandardScaler().fit(Xtr)
            clf = LogisticRegression(max_iter=max_iter, C=0.1).fit(sc.transform(Xtr), tr.labels)
            acc = (clf.predict(sc.transform(Xva)) == va.labels).mean()
            print(f"{role:8s} {name:9s} val accuracy {acc:.3f} (chance {1/len(tr.classes):.3f}, {len(tr)} train / {len(va)} val)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--scale', default='default'); ap.add_argument('--workers', type=int, nargs='+', default=[0, 2])
    ap.add_argument('--skip-difficulty', action='store_true')
    ap.add_argument('--max-iter', type=int, default=300, help="L-BFGS iterations of each logistic regression")
    ap.add_argument('--smoke', action='store_true', help=SMOKE_HELP)
    a = smoke_defaults(ap, dict(scale='test', max_iter=10))
    if a.smoke: print(SMOKE_NOTE); warnings.filterwarnings('ignore')   # 10 L-BFGS iterations do not converge: it says so 4 times
    root = generation(a.scale, a.workers)
    if not a.skip_difficulty: difficulty(root, a.max_iter)
    shutil.rmtree(root.parent, ignore_errors=True)

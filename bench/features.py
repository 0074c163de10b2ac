"""Benchmark: throughput (images/s) and peak memory of streaming feature extraction at two dataset sizes.

Each (teacher, size) runs in a fresh Python process, which reports its own peak RSS and that of its DataLoader
workers (`getrusage`). The image lists cycle over the built-in dataset's `objects` images (2,000 JPEGs, 96x96), so
the larger list re-reads files (from the page cache); what is measured is the decode -> prepare -> embed -> write
pipeline. Peak memory must not grow with the number of images: the summary prints the ratio of the largest size's
peak RSS to the smallest's, and the growth during extraction (peak minus the peak before it) at both sizes.

A teacher name ending in `-unpinned` (e.g. `random-unpinned`) runs that teacher with `pin_mmap_threshold` disabled,
the reference for what pinning glibc's mmap threshold changes (see `nbs/12_teachers.ipynb`).

Usage: python bench/features.py [--sizes 2000 20000] [--teachers hog random [random-unpinned]] [--preset tiny] [--smoke]
`--smoke`: one size, 8 images of the built-in `test`-scale dataset, at the `test` preset: seconds (each child process still
imports torch); what `tests/test_bench.py` runs. Its numbers mean nothing.
"""
import argparse, json, os, platform, resource, subprocess, sys, tempfile, time
from pathlib import Path
from _common import cpu_name, smoke_defaults, SMOKE_HELP, SMOKE_NOTE

def child(teacher:str, n:int, preset:str, out:str, scale:str='default'):
    import numpy as np, torch
    from kt_paper.core import pick_preset
    from kt_paper.data import read_class_folder
    from kt_paper.builtin import ensure_builtin_dataset
    from kt_paper import teachers as T
    from kt_paper.jigsaw import JIGSAW_PRESETS
    if teacher.endswith('-unpinned'): T.pin_mmap_threshold = lambda: False  # the reference: glibc's dynamic threshold
    root = ensure_builtin_dataset(scale=scale)
    paths = read_class_folder(root/'objects', 'train').paths + read_class_folder(root/'objects', 'val').paths
    paths = [paths[i % len(paths)] for i in range(n)]
    cfg = pick_preset(T.TEACHER_PRESETS, preset)
    j = JIGSAW_PRESETS[preset]
    t = T.hog_teacher(cfg) if teacher.startswith('hog') else T.random_teacher(cfg, 0, arch=j.arch, width=j.width, tile=j.tile,
                                                                     conv1_kernel=j.conv1_kernel, conv1_stride=j.conv1_stride, conv1_pad=j.conv1_pad)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    T.extract_features(t, paths, Path(out)/f'{teacher}_{n}.npy', root=root, batch_size=cfg.batch_size, dtype=cfg.dtype)
    dt = time.perf_counter() - t0
    print(json.dumps(dict(teacher=teacher, n=n, dim=t.dim, seconds=dt, images_per_s=n/dt, rss_before_mb=rss0/1024,
                          peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024,
                          peak_worker_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024)))

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--sizes', type=int, nargs='+', default=[2000, 20000])
    ap.add_argument('--teachers', nargs='+', default=['hog', 'random'])
    ap.add_argument('--preset', default='tiny')
    ap.add_argument('--scale', default='default', help="built-in dataset scale the image lists cycle over")
    ap.add_argument('--smoke', action='store_true', help=SMOKE_HELP)
    ap.add_argument('--child', nargs=5, help=argparse.SUPPRESS)
    a = smoke_defaults(ap, dict(sizes=[8], preset='test', scale='test'))
    if a.child: return child(a.child[0], int(a.child[1]), a.child[2], a.child[3], a.child[4])
    if a.smoke: print(SMOKE_NOTE)
    import torch
    from kt_paper.core import default_num_workers
    print(f"machine: {cpu_name()}, {os.cpu_count()} cpus, cuda {torch.cuda.is_available()}, "
          f"{'-'.join(platform.libc_ver())}, torch {torch.__version__}, DataLoader workers {default_num_workers()}; "
          f"preset {a.preset}, built-in scale {a.scale}; load average {os.getloadavg()[0]:.1f} (shared machine: timings are noisy)")
    with tempfile.TemporaryDirectory() as d:
        rows = []
        for t in a.teachers:
            for n in a.sizes:
                r = subprocess.run([sys.executable, __file__, '--child', t, str(n), a.preset, d, a.scale], capture_output=True, text=True)
                if r.returncode: print(r.stderr[-3000:]); raise SystemExit(r.returncode)
                res = json.loads(r.stdout.strip().splitlines()[-1]); rows.append(res)
                print(f"{t:15s} n={n:6d} dim={res['dim']:5d}: {res['images_per_s']:7.1f} images/s, peak RSS main {res['peak_rss_mb']:.0f} MB "
                      f"(before extraction {res['rss_before_mb']:.0f} MB, growth {res['peak_rss_mb']-res['rss_before_mb']:.0f} MB), "
                      f"workers {res['peak_worker_rss_mb']:.0f} MB", flush=True)
                os.remove(Path(d)/f'{t}_{n}.npy')
        for t in a.teachers:
            rs = [r for r in rows if r['teacher'] == t]
            g = [r['peak_rss_mb'] - r['rss_before_mb'] for r in rs]
            print(f"{t}: peak RSS ratio (largest/smallest size) {rs[-1]['peak_rss_mb']/rs[0]['peak_rss_mb']:.3f}, "
                  f"growth during extraction {g[0]:.0f} -> {g[-1]:.0f} MB, throughput ratio {rs[-1]['images_per_s']/rs[0]['images_per_s']:.2f}")

if __name__ == '__main__': main()

"""Benchmark: memory of the paper-geometry input paths does not grow with the number of images.

Two paths are run at the `paper` preset's geometry over 1,000 and then 10,000 images, with 2 loader workers:
- **puzzles**: the Jigsaw++ training loader (`jigsaw_dataloaders`, `preload=False` as at `paper`: 256 short side,
  255 crop, 3x3 grid of 64-px tiles, 0-2 foreign tiles), every batch drawn;
- **features**: `teachers.extract_features` of the paper preset's random CFN teacher (AlexNet trunk, conv4, 2x2 grid
  pooling, 224 px input, float16 rows streamed to a `.npy` on disk).
Images are synthesised per index (500x375 RGB, ImageNet's typical size) by the loader, so that no dataset is
needed and decoding is not what is measured. Peak RSS is the largest sum over the main process and its workers (`rehearsal.PeakRSS`,
sampled every 50 ms). Printed last: `rss_growth_puzzles: X` and `rss_growth_features: X`, each
peak(10k) / peak(1k) - 1. Target: <= 0.10.

Usage: python bench/memory.py [--small 1000] [--large 10000] [--workers 2] [--smoke]
`--smoke`: 8 and 16 images (one puzzle batch each), 1 loader worker, seconds; what `tests/test_bench.py` runs. Its numbers
mean nothing.
"""
import argparse, os, tempfile, time
from pathlib import Path
import numpy as np
from PIL import Image
from kt_paper.rehearsal import PeakRSS   # peak RSS of this process + its loader workers
from _common import cpu_name, smoke_defaults, SMOKE_HELP, SMOKE_NOTE

def synth_image(path) -> Image.Image:
    "A deterministic 500x375 RGB image for `path` (its digits seed it): smooth colour blobs plus noise."
    i = int(''.join(c for c in Path(path).stem if c.isdigit()) or 0)
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((500, 375), Image.BILINEAR), np.int16)
    return Image.fromarray(np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8))

_PERMS = {}

def puzzles(n, workers):
    import dataclasses
    from kt_paper.jigsaw import JIGSAW_PRESETS, jigsaw_dataloaders
    from kt_paper.permutations import permutation_set
    cfg = dataclasses.replace(JIGSAW_PRESETS['paper'], bs=64, num_workers=workers)
    assert not cfg.preload
    paths = [Path(f'/synthetic/img_{i}.jpg') for i in range(n)]
    if cfg not in _PERMS: _PERMS[cfg] = permutation_set(cfg.n_perms, cfg.min_dist)   # ~2 s at 701 permutations: once per run
    dls = jigsaw_dataloaders(paths, paths[:64], cfg, _PERMS[cfg], loader=synth_image)
    with PeakRSS() as m:
        t = time.perf_counter(); k = sum(len(y) for _, y in dls.train)
    return m.peak, k / (time.perf_counter() - t)

def features(n, workers, tmp):
    from kt_paper.teachers import TEACHER_PRESETS, cfn_args, extract_features, random_teacher
    cfg = TEACHER_PRESETS['paper']
    teacher = random_teacher(cfg, **cfn_args('paper'))
    paths = [Path(f'/synthetic/img_{i}.jpg') for i in range(n)]
    with PeakRSS() as m:
        t = time.perf_counter()
        extract_features(teacher, paths, Path(tmp)/f'f{n}.npy', root='/synthetic', batch_size=64, dtype=cfg.dtype,
                         num_workers=workers, device='cpu', loader=synth_image)
    return m.peak, n / (time.perf_counter() - t)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--small', type=int, default=1000); ap.add_argument('--large', type=int, default=10_000)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--smoke', action='store_true', help=SMOKE_HELP)
    a = smoke_defaults(ap, dict(small=8, large=16, workers=1))
    if a.smoke: print(SMOKE_NOTE)
    import torch
    print(f"machine: {cpu_name()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{a.workers} loader workers; paper geometry, images synthesised per index")
    growth = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (('puzzles', lambda n: puzzles(n, a.workers)), ('features', lambda n: features(n, a.workers, tmp))):
            (p1, r1), (p2, r2) = run(a.small), run(a.large)
            growth[name] = p2 / p1 - 1
            print(f"{name:9s} peak RSS {p1/2**20:7.0f} MB at {a.small} images ({r1:.0f}/s), "
                  f"{p2/2**20:7.0f} MB at {a.large} ({r2:.0f}/s)")
    for name, g in growth.items(): print(f"rss_growth_{name}: {g:.3f}")

if __name__ == '__main__': main()

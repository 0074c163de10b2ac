"""Benchmark of the Jigsaw++ input pipeline and pretext training (run: `.venv/bin/python bench/jigsaw.py`).

(a) Puzzles per second of `kt_paper.jigsaw`'s per-sample builder (`PuzzleDataset`, NumPy slicing on cached crops)
    against a straightforward per-sample PIL implementation of the same sampling (how public reference
    implementations build puzzles in DataLoader workers), and of the batched torch builder on this machine's device,
    at the paper's sizes (255-px crops, 64-px tiles) and at the tiny preset's (63-px crops, 16-px tiles).
    Both per-sample builders draw the same random description (`sample_puzzles`) and run in one process; the
    reference is checked to produce the same tiles.
(b) Pretext training throughput at the tiny preset: the loop with the default DataLoader settings against the model
    step alone on pre-built batches; `data_overhead` is the fraction of the loop's time spent waiting for batches.

The last two lines are `speedup: X` (builder vs reference, paper sizes) and `data_overhead: Y`.

Usage: .venv/bin/python bench/jigsaw.py [--quick] [--smoke]
  --quick (or BENCH_QUICK=1): fewer puzzles and iterations (noisier);
  --smoke: the same code paths at toy sizes (a few puzzles from 3 photos, 2 training steps of 16 puzzles on the built-in
           `test`-scale dataset, no download), seconds: what `tests/test_bench.py` runs so that an import or API change
           fails CI. Its numbers mean nothing.
"""
import argparse, dataclasses, os, time, warnings
warnings.filterwarnings('ignore')
import numpy as np, torch
from PIL import Image
import torchvision.transforms.functional as TF
from kt_paper.core import seed_everything, get_device, environment_info
from kt_paper.jigsaw import (JIGSAW_PRESETS, PuzzleDataset, sample_puzzles, assemble_puzzles_torch,
                             prepare_image, COLOUR_PROJECTION, jigsaw_dataloaders)
from kt_paper.pretext import cfn_from_config
from kt_paper.permutations import permutation_set
from _common import cpu_name, SMOKE_HELP, SMOKE_NOTE

QUICK = bool(os.environ.get('BENCH_QUICK'))

def photos():
    import skimage.data as d
    return [d.astronaut(), d.chelsea(), d.coffee(), d.rocket(), d.camera(), d.immunohistochemistry(), d.hubble_deep_field(),
            d.retina()]

class ReferenceDataset(torch.utils.data.Dataset):
    "The straightforward per-sample PIL builder: PIL crops per tile and channel, `to_tensor`, torch normalisation."
    def __init__(self, imgs, cfg, perms, seed=0):
        self.imgs = [Image.fromarray(a.transpose(1, 2, 0)) for a in imgs]   # prepared crops as PIL images
        self.cfg, self.perms, self.seed, self.epoch = cfg, perms, seed, 0
        self.P = torch.as_tensor(COLOUR_PROJECTION)
    def __len__(self): return len(self.imgs)
    def __getitem__(self, i):
        c, t = self.cfg, self.cfg.tile
        rng = np.random.default_rng((self.seed, self.epoch, i))
        j = int((i + rng.integers(1, len(self))) % len(self))
        p = sample_puzzles(rng, c, self.perms, 1)
        bands = (self.imgs[i].split(), self.imgs[j].split())
        tiles = []
        for s in range(c.n_tiles):
            b = bands[p['src'][0, s]]
            chans = [b[ch].crop((int(p['xs'][0, s, ch]), int(p['ys'][0, s, ch]), int(p['xs'][0, s, ch]) + t, int(p['ys'][0, s, ch]) + t))
                     for ch in range(3)]
            x = TF.to_tensor(Image.merge('RGB', chans))
            mode = p['colour'][0, s]
            if mode == 1: x = x.mean(0, keepdim=True).expand(3, -1, -1)
            elif mode == 2: x = torch.einsum('ij,jhw->ihw', self.P, x)
            x = (x - x.mean()) / (x.std(unbiased=False) + 1e-5) * c.tile_scale
            tiles.append(x)
        return torch.stack(tiles), int(p['label'][0])

REPEAT = 3

def rate(f, n, repeat=None):
    "Best items/s of `repeat` (default `REPEAT`) runs of `f(n)`."
    best, repeat = 0., repeat or REPEAT
    for _ in range(repeat):
        t = time.perf_counter(); f(n); best = max(best, n / (time.perf_counter() - t))
    return best

def bench_builders(name, cfg, perms, raw, n, B=256):
    imgs = [prepare_image(a, cfg) for a in raw]
    ours = PuzzleDataset(raw, cfg, perms, seed=0).preload()          # raw photos, prepared and cached once
    ref = ReferenceDataset(imgs, cfg, perms, seed=0)
    for i in range(len(imgs)):                                       # same puzzles, same pixels
        a, b = ours[i], ref[i]
        assert a[1] == b[1] and torch.allclose(a[0], b[0], atol=2e-3 * max(1, cfg.tile_scale)), f'{name}: builders differ'
    L = len(imgs)
    r_ours = rate(lambda n: [ours[k % L] for k in range(n)], n)
    r_ref = rate(lambda n: [ref[k % L] for k in range(n)], n)
    dev = get_device('auto')
    stack = torch.as_tensor(np.stack(imgs)).to(dev)
    def batched(n):
        rng = np.random.default_rng(0)
        for _ in range(max(1, n // B)):
            p = sample_puzzles(rng, cfg, perms, B)
            main = torch.as_tensor(rng.integers(0, L, B))
            other = (main + torch.as_tensor(rng.integers(1, L, B))) % L
            x = assemble_puzzles_torch(stack, main, other, p, cfg)
        if dev.type == 'cuda': torch.cuda.synchronize()
    r_bat = rate(batched, max(n, B))
    print(f'[{name}] puzzles/s, one process: builder {r_ours:,.0f} | PIL reference {r_ref:,.0f} | '
          f'batched torch on {dev.type} {r_bat:,.0f}  (builder/reference = {r_ours / r_ref:.2f}x)')
    return r_ours / r_ref

def bench_training(cfg, n_iter, scale='default'):
    from kt_paper.data import read_class_folder, load_rgb
    from kt_paper.builtin import ensure_builtin_dataset
    root = ensure_builtin_dataset(scale=scale)
    tr, va = read_class_folder(root/'objects', 'train').paths, read_class_folder(root/'objects', 'val').paths
    perms = permutation_set(cfg.n_perms, cfg.min_dist)
    dls = jigsaw_dataloaders(tr, va, cfg, perms, loader=load_rgb, seed=0)     # default loader settings
    nw = dls.train.num_workers
    seed_everything(0)
    net = cfn_from_config(cfg).train()
    opt = torch.optim.Adam(net.parameters(), cfg.lr)
    def step(x, y):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    prebuilt = []
    for x, y in dls.train:
        prebuilt.append((x, y))
        if len(prebuilt) == 8: break
    for x, y in prebuilt[:2]: step(x, y)                              # warm-up
    # model step alone on pre-built batches
    t = time.perf_counter()
    for k in range(n_iter): step(*prebuilt[k % len(prebuilt)])
    t_model = time.perf_counter() - t
    # the loop with data loading (new DataLoader iterators, as each epoch starts new workers)
    wait, done, t = 0., 0, time.perf_counter()
    while done < n_iter:
        it = iter(dls.train)
        while done < n_iter:
            t0 = time.perf_counter()
            try: x, y = next(it)
            except StopIteration: break
            wait += time.perf_counter() - t0
            step(x, y); done += 1
        dls.train.dataset.epoch += 1
    t_loop = time.perf_counter() - t
    bs = cfg.bs
    print(f'[tiny training, built-in {scale}] {n_iter} iterations of {bs} puzzles, num_workers={nw}: model step alone '
          f'{n_iter*bs/t_model:,.0f} puzzles/s | with data loading {n_iter*bs/t_loop:,.0f} puzzles/s | '
          f'waiting for data {wait:.2f} s of {t_loop:.2f} s')
    return wait / t_loop

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', default=QUICK, help="fewer puzzles and iterations (also BENCH_QUICK=1)")
    ap.add_argument('--smoke', action='store_true', help=SMOKE_HELP)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    info = environment_info()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {info['torch']}, "
          f"cuda={info['cuda']}, cpu_bf16={info['cpu_bf16']} (shared machine: timings are noisy)")
    if a.smoke: print(SMOKE_NOTE); REPEAT = 1
    sizes = (8, 8, 2, 'test', 16) if a.smoke else (300, 500, 10, 'default', 256) if a.quick else (1500, 3000, 40, 'default', 256)
    raw = photos()[:3] if a.smoke else photos()
    pc, tc = JIGSAW_PRESETS['paper'], JIGSAW_PRESETS['tiny']
    speed = bench_builders('paper 255/64', pc, permutation_set(pc.n_perms, pc.min_dist), raw, sizes[0], B=sizes[4])
    speed_t = bench_builders('tiny 63/16', tc, permutation_set(tc.n_perms, tc.min_dist), raw, sizes[1], B=sizes[4])
    overhead = bench_training(dataclasses.replace(tc, bs=16) if a.smoke else tc, sizes[2], scale=sizes[3])
    print(f'speedup: {speed:.2f}')
    print(f'data_overhead: {overhead:.3f}')

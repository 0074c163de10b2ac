"""Benchmark: training throughput of every kt_paper trainer against a bare PyTorch loop of the same model and batch.

For each trainer the same network is trained for a few steps on the same in-memory data two ways, in this process:
- **kt_paper**: the library's own path (its `Learner`, callbacks and `kt_paper.train.fit`, precision `auto`);
- **bare**: `for x, y in batches: opt.zero_grad(); loss(model(x), y).backward(); opt.step()` with the torch optimiser
  of the same update (SGD + momentum + L2, or AdamW for fastai's decoupled Adam), in fp32 and in bf16 autocast, each
  in the default and the channels-last memory layout; the fastest of the four is the reference ("best bare"); on a CPU without bf16 units, where bf16 is emulated and
  several times slower, only the two fp32 loops run unless `--emulated-bf16`. Where the protocol's
  update clips the gradient norm (VOC07 fine-tuning), the bare loop clips it too: the same update, not a cheaper one.
Data are pre-decoded uint8 images (student, probes, VOC07 fine-tuning) or pre-built puzzles (pretext), so what is compared is the training
loop, its precision and its per-batch work (crops, flips, normalisation on the kt_paper side are part of its cost).
Each measurement is repeated `--rounds` times, interleaved (kt_paper, then each bare variant, then again), and the best
of the rounds is kept: oneDNN picks and caches kernels on first use, and a 2-core machine is noisy.
For VOC07 fine-tuning, whose protocol rescales every image by a random factor before cropping, a second reference is
printed: the best bare loop fed by a plain torch `DataLoader` over the same draws (`ClsDraws`), i.e. with the same
per-image work; it tells the trainer's own overhead apart from the protocol's augmentation. `train_ratio_min` uses
the first, stricter reference (pre-made batches) for every trainer.
Two summaries: `train_ratio_min_best_of_rounds` divides kt_paper's best round by the best bare round (which may come
from another moment: on a shared 2-core VM the bare references alone moved by 15-20% between runs), and the last line,
`train_ratio_min: X`, the smallest over trainers of the median over rounds of kt_paper / best bare loop *of the same
round* (a paired comparison: both sides measured within seconds of each other).

Usage: python bench/train.py [--preset small] [--steps 60] [--warmup 5] [--rounds 3]   (shorter runs are noisy on 2 cores)
"""
import argparse, contextlib, copy, platform, time
import numpy as np, torch
from torch import nn

def cpu_name():
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor()

def bare(model, batches, opt, precision, channels_last, loss=nn.CrossEntropyLoss(), warmup=3, clip=0.):
    "img/s of a plain loop over `batches` [(x, y)] (the first `warmup` untimed) with torch optimiser `opt(params)` (gradient norm clipped to `clip` if > 0)."
    m = copy.deepcopy(model).train()
    if channels_last: m = m.to(memory_format=torch.channels_last)
    opt = opt([p for p in m.parameters() if p.requires_grad])
    ac = torch.autocast('cpu', dtype=torch.bfloat16) if precision == 'bf16' else contextlib.nullcontext()
    n = 0
    for i, (x, y) in enumerate(batches):
        if i == warmup: t0, n = time.perf_counter(), 0
        if channels_last and x.ndim == 4: x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        with ac: l = loss(m(x), y)
        l.backward()
        if clip: nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step(); n += len(y)
    return n / (time.perf_counter() - t0)

class Timer:
    "A fastai callback timing the training batches after `warmup` (up to validation)."
    def __new__(cls, warmup):
        from fastai.callback.core import Callback
        class _T(Callback):
            order = 100
            def before_fit(self): self.i, self.n, self.t0 = 0, 0, None
            def after_batch(self):
                if not self.training: return
                self.i += 1
                if self.i == warmup: self.t0, self.n = time.perf_counter(), 0
                elif self.t0 is not None: self.n += len(self.yb[0])
            def before_validate(self): self.rate = self.n / (time.perf_counter() - self.t0) if self.t0 else float('nan')
        return _T()

def norm_batches(x_u8, y, bs, crop):
    from kt_paper.images import imagenet_normalize
    o = (x_u8.shape[-1] - crop)//2
    xs = imagenet_normalize(x_u8[..., o:o+crop, o:o+crop])
    return [(xs[i:i+bs], y[i:i+bs]) for i in range(0, len(y) - bs + 1, bs)]

def student_case(preset, steps, warmup):
    from kt_paper.student import STUDENT_PRESETS, build_alexnet, ImageTensorDataset, make_student_dls, student_learner
    from kt_paper.train import fit
    cfg = STUDENT_PRESETS[preset]; n = cfg.bs*(steps + warmup)
    x = torch.randint(0, 256, (n, 3, cfg.resize, cfg.resize), dtype=torch.uint8); y = torch.randint(0, 100, (n,))
    model = build_alexnet(100, **cfg.alexnet_args())
    def kt():
        dls = make_student_dls(ImageTensorDataset(x, y.numpy(), cfg.crop, True), ImageTensorDataset(x[:cfg.bs], y[:cfg.bs].numpy(), cfg.crop, False), cfg.bs, num_workers=0)
        t = Timer(warmup); learn = student_learner(copy.deepcopy(model), dls, cfg, cbs=[t])
        fit(learn, 1, quiet=True); return t.rate, learn.precision_used
    opt = lambda ps: torch.optim.SGD(ps, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)   # the student's: coupled wd
    return 'student (CC AlexNet)', kt, model, norm_batches(x, y, cfg.bs, cfg.crop), opt, nn.CrossEntropyLoss(), 0.

def pretext_case(preset, steps, warmup):
    from fastai.data.core import DataLoaders
    from kt_paper.jigsaw import JIGSAW_PRESETS
    from kt_paper.pretext import cfn_from_config, jigsaw_learner
    from kt_paper.train import fit
    cfg = JIGSAW_PRESETS[preset]; n = cfg.bs*(steps + warmup)
    x = torch.randn(n, cfg.n_tiles, 3, cfg.tile, cfg.tile); y = torch.randint(0, cfg.n_perms, (n,))
    model = cfn_from_config(cfg)
    def kt():
        ds = torch.utils.data.TensorDataset(x, y)
        dls = DataLoaders(torch.utils.data.DataLoader(ds, cfg.bs, shuffle=True, drop_last=True), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:cfg.bs], y[:cfg.bs]), cfg.bs))
        t = Timer(warmup); learn = jigsaw_learner(dls, copy.deepcopy(model), cfg, path='/tmp/kt_bench_train', device='cpu')
        fit(learn, 1, quiet=True, cbs=[t], lr=cfg.lr); return t.rate, learn.precision_used
    if cfg.opt == 'adam': opt = lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=cfg.wd)  # fastai's Adam
    else: opt = lambda ps: torch.optim.SGD(ps, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    return f'pretext (Jigsaw++ CFN, {cfg.opt})', kt, model, [(x[i:i+cfg.bs], y[i:i+cfg.bs]) for i in range(0, n, cfg.bs)], opt, nn.CrossEntropyLoss(), 0.

def probe_case(preset, steps, warmup):
    from kt_paper.probes import PROBE_PRESETS, LinearProbes, linear_probe_learner, multi_head_loss, probe_dls
    from kt_paper.student import STUDENT_PRESETS, build_alexnet
    from kt_paper.train import fit
    cfg = PROBE_PRESETS[preset]; n = cfg.bs*(steps + warmup)
    x = torch.randint(0, 256, (n, 3, cfg.resize, cfg.resize), dtype=torch.uint8); y = torch.randint(0, 10, (n,))
    net = build_alexnet(100, **{**STUDENT_PRESETS[preset].alexnet_args(), 'input_size': cfg.crop})
    model = LinearProbes(net, 10, input_size=cfg.crop)
    def kt():
        dls = probe_dls((x, y.numpy()), (x[:cfg.bs], y[:cfg.bs].numpy()), cfg, num_workers=0)
        t = Timer(warmup); learn = linear_probe_learner(copy.deepcopy(model), dls, cfg); learn.add_cb(t)
        fit(learn, 1, quiet=True); return t.rate, learn.precision_used
    opt = lambda ps: torch.optim.SGD(ps, lr=cfg.lin_lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    return 'linear probes (conv1-5)', kt, model, norm_batches(x, y, cfg.bs, cfg.crop), opt, multi_head_loss, 0.

def transfer_case(preset, steps, warmup):
    import dataclasses
    from kt_paper.finetune import conv_trunk, student_fc_dim, train_steps
    from kt_paper.transfer import TRANSFER_PRESETS, ClsDraws, TrunkClassifier, masked_bce
    from kt_paper.nets import build_alexnet
    from kt_paper.student import STUDENT_PRESETS
    cfg = dataclasses.replace(TRANSFER_PRESETS[preset].cls, iters=steps + warmup); n = cfg.bs*(steps + warmup)
    x = torch.randint(0, 256, (n, 3, cfg.resize, cfg.resize), dtype=torch.uint8); y = torch.randint(-1, 2, (n, 20))
    net = build_alexnet(20, **STUDENT_PRESETS[preset].alexnet_args())
    model = TrunkClassifier(conv_trunk(net), cfg.crop, 20, cfg.fc_dim or student_fc_dim(net), cfg.dropout)
    def kt():   # the protocol's own path: step draws (rescale, crop, flip, normalise per image), gradient clipping;
        t = Timer(warmup)   # no loader workers: `finetune.loader_workers`' choice for in-memory images on a CPU
        learn = train_steps(copy.deepcopy(model), ClsDraws(x, y, cfg), cfg, masked_bce, 'cpu', quiet=True, cbs=[t], num_workers=0)
        return t.rate, learn.precision_used
    opt = lambda ps: torch.optim.SGD(ps, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)   # L2 on every parameter, as the protocol
    kt.same_draws = lambda: torch.utils.data.DataLoader(ClsDraws(x, y, cfg), cfg.bs, collate_fn=ClsDraws.collate_fn)   # the bare loop with the protocol's per-image work
    return 'VOC07 cls fine-tuning', kt, model, norm_batches(x, y, cfg.bs, cfg.crop), opt, masked_bce, cfg.clip   # its update clips the gradient norm

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default='small'); ap.add_argument("--steps", type=int, default=60)
    ap.add_argument('--warmup', type=int, default=5); ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument('--emulated-bf16', action='store_true', help="also time bf16 bare loops on a CPU without bf16 units")
    a = ap.parse_args()
    from kt_paper.core import cpu_has_bf16
    torch.manual_seed(0)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}, torch {torch.__version__}, preset {a.preset}")
    variants = [('fp32', False), ('fp32', True)] + ([('bf16', False), ('bf16', True)] if cpu_has_bf16() or a.emulated_bf16 else [])
    if len(variants) == 2: print("no bf16 units: the bare bf16 loops (emulated, several times slower than fp32) are skipped; --emulated-bf16 times them")
    ratios, paired_ratios = [], []
    for case in (student_case, pretext_case, probe_case, transfer_case):
        name, kt, model, batches, opt, loss, clip = case(a.preset, a.steps, a.warmup)
        refs, rate, paired = {}, 0., []
        for _ in range(a.rounds):
            r_kt, prec = kt(); rate = max(rate, r_kt); this_round = {}
            for p, cl in variants:
                k = f'{p}{"+cl" if cl else ""}'; this_round[k] = bare(model, batches, opt, p, cl, loss, a.warmup, clip)
                refs[k] = max(refs.get(k, 0.), this_round[k])
            paired.append(r_kt / max(this_round.values()))   # against the best bare loop of the same round
        best = max(refs, key=refs.get); r = rate / refs[best]; ratios.append(r); paired_ratios.append(float(np.median(paired)))
        print(f"{name:26s} kt_paper {rate:8.1f} img/s ({prec.name}{'+cl' if prec.channels_last else ''})  bare: " +
              ', '.join(f'{k} {v:.1f}' for k, v in refs.items()) + f"  ratio vs best bare ({best}): {r:.2f}; "
              f"per round: {', '.join(f'{x:.2f}' for x in paired)} (median {paired_ratios[-1]:.2f})")
        if hasattr(kt, 'same_draws'):   # the best variant again, fed the same draws as the protocol
            p, cl = best.split('+')[0], best.endswith('+cl')
            same = max(bare(model, kt.same_draws(), opt, p, cl, loss, a.warmup, clip) for _ in range(a.rounds))
            print(f"{'':26s} bare {best} with the protocol's draws {same:.1f} img/s  ratio: {rate / same:.2f}")
    print(f"train_ratio_min_best_of_rounds: {min(ratios):.2f}")
    print(f"train_ratio_min: {min(paired_ratios):.2f}")

if __name__ == '__main__': main()

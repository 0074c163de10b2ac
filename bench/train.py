"""Benchmark: training throughput of every kt_paper trainer against a bare PyTorch loop of the same model and batch.

For each trainer the same network is trained for a few steps on the same in-memory data two ways, in this process:
- **kt_paper**: the library's own path (its `Learner`, callbacks and `kt_paper.train.fit`, precision `auto`);
- **bare**: `for x, y in batches: opt.zero_grad(); loss(model(x), y).backward(); opt.step()` with the torch optimiser
  of the same update (SGD + momentum + L2, or AdamW for fastai's decoupled Adam), in fp32 and in bf16 autocast, each
  in the default and the channels-last memory layout; the fastest of the four is the reference ("best bare"); on a CPU without bf16 units, where bf16 is emulated and
  several times slower, only the two fp32 loops run unless `--emulated-bf16`. Where the protocol's
  update clips the gradient norm (VOC07 fine-tuning), the bare loop clips it too: the same update, not a cheaper one.
Data are pre-decoded uint8 images (student, probes, VOC07 fine-tuning) or pre-built puzzles (pretext). Each training
step also does its protocol's input work: a random crop, mirror and normalisation per image (student, probes), and for
VOC07 fine-tuning a random rescale of every image first. The bare loop is timed twice:
- **doing the same input work**, written as a plain loop would (`bare_crops`, `bare_rescale_crops`: per-image slicing,
  torchvision's resize, one `(x - mean)/std`; none of kt_paper's code), in the fastest precision and layout of the
  round. This is the reference of `train_ratio_min`: it measures what kt_paper adds to the same training (its
  `Learner`, callbacks, loaders, augmentation code), and the issue's target (>= 0.9) applies to it.
- **on pre-made batches** (centre crops, normalised once before timing), the loop with no input work at all:
  `train_ratio_premade_min` says what the protocol's augmentation and the library cost together, for the record.
  (Pretext: pre-built puzzles on both sides, so the two references coincide.)
Each measurement is repeated `--rounds` times, interleaved (kt_paper, then each bare variant, then the same-work loop),
and each ratio is paired: kt_paper / the bare loop of the same round (on a shared 2-core VM the references alone move
15-20% between runs); the median over rounds is reported. oneDNN picks and caches kernels on first use, so the first
`--warmup` steps of every loop are not timed. The last line is `train_ratio_min: X`, the smallest median over trainers.

Usage: python bench/train.py [--preset small] [--steps 60] [--warmup 5] [--rounds 3] [--device cpu] [--cases student pretext probes transfer] [--smoke]
(shorter runs are noisy on 2 cores; `train_ratio_min` is over the cases run)
`--smoke`: the `test` preset, 2 timed steps after 1 warm-up, 1 round, bare loops in fp32 only (with and without
channels-last; `--emulated-bf16` adds the others back), seconds; what `tests/test_bench.py` runs (its numbers mean nothing).
On a GPU: `python bench/gpu.py` (this script with `--device cuda --preset paper`: bare loops in fp32 and bf16 autocast, or fp16
with a grad scaler where the GPU has no bf16, each with and without channels-last).
"""
import argparse, contextlib, copy, time
import numpy as np, torch
from torch import nn
from _common import cpu_name, smoke_defaults, SMOKE_HELP, SMOKE_NOTE
from kt_paper.core import cuda_has_bf16

DEVICE = torch.device('cpu')   # set by `--device`; every case and loop runs there

def sync():
    if DEVICE.type == 'cuda': torch.cuda.synchronize(DEVICE)

def bare(model, batches, opt, precision, channels_last, loss=nn.CrossEntropyLoss(), warmup=3, clip=0.):
    "img/s of a plain loop over `batches` [(x, y)] (the first `warmup` untimed) with torch optimiser `opt([(name, param)])` (gradient norm clipped to `clip` if > 0)."
    m = copy.deepcopy(model).to(DEVICE).train()
    if channels_last: m = m.to(memory_format=torch.channels_last)
    opt = opt([(k, p) for k, p in m.named_parameters() if p.requires_grad])
    dt = dict(bf16=torch.bfloat16, fp16=torch.float16).get(precision)
    ac = torch.autocast(DEVICE.type, dtype=dt) if dt is not None else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=precision == 'fp16')   # disabled: scale/unscale_/update do nothing
    n = 0
    for i, (x, y) in enumerate(batches):
        if i == warmup: sync(); t0, n = time.perf_counter(), 0
        x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
        if channels_last and x.ndim == 4: x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        with ac: l = loss(m(x), y)
        scaler.scale(l).backward()
        if clip: scaler.unscale_(opt); nn.utils.clip_grad_norm_(m.parameters(), clip)
        scaler.step(opt); scaler.update()
        n += len(y)
    sync()
    return n / (time.perf_counter() - t0)

class Timer:
    "A fastai callback timing the training batches after `warmup` (up to validation); it stops a model that is not on `DEVICE`."
    def __new__(cls, warmup):
        from fastai.callback.core import Callback
        class _T(Callback):
            order = 100
            def before_fit(self):
                dev = next(self.learn.model.parameters()).device
                if dev.type != DEVICE.type: raise RuntimeError(f"kt_paper's side trains on {dev}, the bare loops on {DEVICE}")
                self.i, self.n, self.t0 = 0, 0, None
            def after_batch(self):
                if not self.training: return
                self.i += 1
                if self.i == warmup: sync(); self.t0, self.n = time.perf_counter(), 0
                elif self.t0 is not None: self.n += len(self.yb[0])
            def before_validate(self): sync(); self.rate = self.n / (time.perf_counter() - self.t0) if self.t0 else float('nan')
        return _T()

def norm_batches(x_u8, y, bs, crop):
    from kt_paper.images import imagenet_normalize
    o = (x_u8.shape[-1] - crop)//2
    xs = imagenet_normalize(x_u8[..., o:o+crop, o:o+crop])
    return [(xs[i:i+bs], y[i:i+bs]) for i in range(0, len(y) - bs + 1, bs)]

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)*255, torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)*255

def bare_crops(x_u8, y, bs, crop, n_batches):
    "The student's / probes' augmentation written as a plain loop would: shuffled batches, a random crop and mirror per image, then `(x - mean)/std`."
    for _ in range(n_batches):
        idx = torch.randperm(len(y))[:bs]; h, w = x_u8.shape[-2:]
        ii, jj, ff = torch.randint(0, h - crop + 1, (bs,)), torch.randint(0, w - crop + 1, (bs,)), torch.rand(bs) < 0.5
        xs = torch.stack([x_u8[n, :, i:i+crop, j:j+crop].flip(-1) if f else x_u8[n, :, i:i+crop, j:j+crop]
                          for n, i, j, f in zip(idx.tolist(), ii.tolist(), jj.tolist(), ff.tolist())])
        yield (xs.float() - MEAN) / STD, y[idx]

def bare_rescale_crops(x_u8, y, bs, crop, resize, scale_range, n_batches):
    "VOC07 classification's augmentation written plainly: per image a random rescale (torchvision's antialiased resize of the short side), a random crop zero-padded to `crop`, a random mirror; then `(x - mean)/std` with the padding at 0."
    from torchvision.transforms.v2 import functional as TF
    for _ in range(n_batches):
        idx = torch.randperm(len(y))[:bs]; xs = torch.zeros(bs, 3, crop, crop); 
        for k, n in enumerate(idx.tolist()):
            short = max(8, round(resize * float(torch.empty(1).uniform_(*scale_range))))
            im = TF.resize(x_u8[n], [short, short], antialias=True)   # square store images: both sides
            i, j = (int(torch.randint(0, max(short - crop, 0) + 1, (1,))) for _ in range(2))
            win = ((im[:, i:i+crop, j:j+crop].float() - MEAN[0]) / STD[0])
            if torch.rand(1) < 0.5: win = win.flip(-1)
            xs[k, :, :win.shape[1], :win.shape[2]] = win
        yield xs, y[idx]

def student_case(preset, steps, warmup):
    from kt_paper.student import STUDENT_PRESETS, build_alexnet, ImageTensorDataset, make_student_dls, student_learner
    from kt_paper.train import fit
    cfg = STUDENT_PRESETS[preset]; n = cfg.bs*(steps + warmup)
    x = torch.randint(0, 256, (n, 3, cfg.resize, cfg.resize), dtype=torch.uint8); y = torch.randint(0, 100, (n,))
    model = build_alexnet(100, **cfg.alexnet_args())
    def kt():
        dls = make_student_dls(ImageTensorDataset(x, y.numpy(), cfg.crop, True), ImageTensorDataset(x[:cfg.bs], y[:cfg.bs].numpy(), cfg.crop, False), cfg.bs, num_workers=0, device=DEVICE)
        t = Timer(warmup); learn = student_learner(copy.deepcopy(model).to(DEVICE), dls, cfg, cbs=[t])   # batches follow the model
        fit(learn, 1, quiet=True); return t.rate, learn.precision_used
    opt = lambda nps: torch.optim.SGD([p for _, p in nps], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)   # the student's: coupled wd
    kt.same_work = lambda: bare_crops(x, y, cfg.bs, cfg.crop, steps + warmup)
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
        dls = DataLoaders(torch.utils.data.DataLoader(ds, cfg.bs, shuffle=True, drop_last=True), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:cfg.bs], y[:cfg.bs]), cfg.bs), device=DEVICE)
        t = Timer(warmup); learn = jigsaw_learner(dls, copy.deepcopy(model), cfg, path='/tmp/kt_bench_train', device=DEVICE)
        fit(learn, 1, quiet=True, cbs=[t], lr=cfg.lr); return t.rate, learn.precision_used
    if cfg.opt == 'adam': opt = lambda nps: torch.optim.AdamW([p for _, p in nps], lr=cfg.lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=cfg.wd)  # fastai's Adam
    else: opt = lambda nps: torch.optim.SGD([p for _, p in nps], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
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
        t = Timer(warmup); learn = linear_probe_learner(copy.deepcopy(model).to(DEVICE), dls, cfg); learn.add_cb(t)   # batches follow the model (as `run_linear_probes`)
        fit(learn, 1, quiet=True); return t.rate, learn.precision_used
    opt = lambda nps: torch.optim.SGD([p for _, p in nps], lr=cfg.lin_lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    kt.same_work = lambda: bare_crops(x, y, cfg.bs, cfg.crop, steps + warmup)
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
        learn = train_steps(copy.deepcopy(model), ClsDraws(x, y, cfg), cfg, masked_bce, DEVICE, quiet=True, cbs=[t], num_workers=0)
        return t.rate, learn.precision_used
    def opt(nps):   # the protocol's groups: biases at lr x bias_lr_mult and wd x bias_decay_mult (the reference's), the rest; L2
        b, w = [p for k, p in nps if k.endswith('bias')], [p for k, p in nps if not k.endswith('bias')]
        return torch.optim.SGD([dict(params=b, lr=cfg.lr * cfg.bias_lr_mult, weight_decay=cfg.wd * cfg.bias_decay_mult), dict(params=w)],
                               lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
    kt.same_work = lambda: bare_rescale_crops(x, y, cfg.bs, cfg.crop, cfg.resize, cfg.scale_range, steps + warmup)
    return 'VOC07 cls fine-tuning', kt, model, norm_batches(x, y, cfg.bs, cfg.crop), opt, masked_bce, cfg.clip   # its update clips the gradient norm

CASES = dict(student=student_case, pretext=pretext_case, probes=probe_case, transfer=transfer_case)

def low_precision(dev): return 'bf16' if dev.type == 'cpu' or cuda_has_bf16(dev) else 'fp16'

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--preset', default='small'); ap.add_argument("--steps", type=int, default=60)
    ap.add_argument('--warmup', type=int, default=5); ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument('--emulated-bf16', action='store_true', help="also time bf16 bare loops on a CPU without bf16 units")
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (bench/gpu.py): where both sides run")
    ap.add_argument('--cases', nargs='+', choices=list(CASES), default=list(CASES), help="the trainers to time (default: all)")
    ap.add_argument('--smoke', action='store_true', help=SMOKE_HELP)
    a = smoke_defaults(ap, dict(preset='test', steps=2, warmup=1, rounds=1))
    if a.smoke: print(SMOKE_NOTE)
    from kt_paper.core import cpu_has_bf16
    global DEVICE
    DEVICE = torch.device(a.device)
    torch.manual_seed(0)
    if DEVICE.type == 'cuda':
        bf16 = cuda_has_bf16(DEVICE)   # native only: emulated bf16 (pre-Ampere) is slower than fp16 + scaler, as in `precision_policy`
        print(f"machine: {torch.cuda.get_device_name(DEVICE)} (host {cpu_name()}), torch {torch.__version__}, preset {a.preset}")
        variants = [('fp32', False), ('fp32', True)] + ([('bf16', False), ('bf16', True)] if bf16 else [('fp16', False), ('fp16', True)])
    else:
        print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}, torch {torch.__version__}, preset {a.preset}")
        variants = [('fp32', False), ('fp32', True)] + ([('bf16', False), ('bf16', True)] if cpu_has_bf16() or a.emulated_bf16 else [])
    if a.smoke and len(variants) > 2 and not a.emulated_bf16:
        variants = variants[:2]; print(f"smoke: bare loops in fp32 only (the {low_precision(DEVICE)} variants are skipped to save time)")
    elif len(variants) == 2: print("no bf16 units: the bare bf16 loops (emulated, several times slower than fp32) are skipped; --emulated-bf16 times them")
    premade_min, same_min = [], []
    for case in (CASES[c] for c in a.cases):
        name, kt, model, batches, opt, loss, clip = case(a.preset, a.steps, a.warmup)
        refs, rate, vs_premade, vs_same, same_best = {}, 0., [], [], 0.
        for _ in range(a.rounds):
            r_kt, prec = kt(); rate = max(rate, r_kt); this_round = {}
            for p, cl in variants:
                k = f'{p}{"+cl" if cl else ""}'; this_round[k] = bare(model, batches, opt, p, cl, loss, a.warmup, clip)
                refs[k] = max(refs.get(k, 0.), this_round[k])
            best_now = max(this_round, key=this_round.get)
            vs_premade.append(r_kt / this_round[best_now])   # against the best bare loop of the same round
            if hasattr(kt, 'same_work'):   # that variant again, doing the protocol's per-step input work itself
                r_same = bare(model, kt.same_work(), opt, best_now.split('+')[0], best_now.endswith('+cl'), loss, a.warmup, clip)
                same_best = max(same_best, r_same); vs_same.append(r_kt / r_same)
            else: vs_same.append(vs_premade[-1])   # pre-built inputs on both sides: the same work already
        best = max(refs, key=refs.get); med_p, med_s = float(np.median(vs_premade)), float(np.median(vs_same))
        premade_min.append(med_p); same_min.append(med_s)
        print(f"{name:26s} kt_paper {rate:8.1f} img/s ({prec.name}{'+cl' if prec.channels_last else ''})  bare, pre-made batches: " +
              ', '.join(f'{k} {v:.1f}' for k, v in refs.items()) +
              (f"; bare {best} doing the same input work: {same_best:.1f}" if same_best else '') +
              f"\n{'':26s} ratio vs the same-work bare loop, per round: {', '.join(f'{x:.2f}' for x in vs_same)} (median {med_s:.2f});"
              f" vs pre-made batches: {', '.join(f'{x:.2f}' for x in vs_premade)} (median {med_p:.2f})")
    print(f"train_ratio_premade_min: {min(premade_min):.2f}")
    print(f"train_ratio_min: {min(same_min):.2f}")

if __name__ == '__main__': main()

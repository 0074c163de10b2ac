"""Benchmark: the input pipeline's decode paths against a plain PIL builder, images/s on one core, same files, same run.

Data: real photos, the JPEGs of `../shared/data/voc2007-mini` (about 500 x 375, ImageNet's most common size), as they
are and re-encoded at 2x (about 1000 x 750, like ImageNet's larger photos; quality 90). Each path decodes an image and
resizes it to 256 px on its shorter side (what every paper-scale stage does first):
  reference  PIL: `Image.open(p).convert('RGB')` + resize (no EXIF handling, no error naming)
  full       `data.load_rgb(p)` + resize
  draft      `data.load_rgb(p, min_side=256)` + resize (JPEG draft mode: DCT scaling by 1/2, 1/4, 1/8)
  resized    `data.load_rgb` of the `kt-paper resize` copy (`images.resize_file`, 256 px), + resize (a no-op)
  tv-cpu     `images.decode_resize_crop` (torchvision's `decode_jpeg` + antialiased resize and 256-px centre crop) on the CPU,
             and tv-cuda (nvJPEG) on the GPU when there is one: the pretext stage's `decode_on='device'` path.
Prints images/s and the ratio to the reference, then `draft_speedup_2x: X` and `resized_speedup_2x: Y` last
(the two fast paths against the full decode on the 2x photos).

Usage: python bench/decode.py [--n 150] [--data ../shared/data/voc2007-mini] [--smoke]
`--smoke`: 6 images of the built-in `test`-scale dataset's VOC2007 (synthetic, about 140 x 125, no download) unless
`--data` is given, seconds; what `tests/test_bench.py` runs. Its numbers mean nothing.
"""
import argparse, os, tempfile, time
from pathlib import Path
from _common import cpu_name, smoke_defaults, SMOKE_HELP, SMOKE_NOTE

SHARED = Path(__file__).resolve().parents[1].parent/'shared'/'data'/'voc2007-mini'

def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--n', type=int, default=150)
    ap.add_argument('--data', default=None, help=f"folder searched for *.jpg (default {SHARED})")
    ap.add_argument('--smoke', action='store_true', help=SMOKE_HELP)
    a = smoke_defaults(ap, dict(n=6))
    if a.smoke: print(SMOKE_NOTE)
    if a.data is None:
        if a.smoke:
            from kt_paper.builtin import ensure_builtin_dataset
            a.data = str(ensure_builtin_dataset(scale='test')/'VOCdevkit'/'VOC2007'/'JPEGImages')
        else: a.data = str(SHARED)
    import torch, torchvision
    from PIL import Image
    from kt_paper.data import load_rgb
    from kt_paper.images import resize_file, read_image_bytes, decode_resize_crop
    torch.set_num_threads(1)
    srcs = sorted(Path(a.data).rglob('*.jpg'))[:a.n]
    if not srcs: raise SystemExit(f"no JPEGs under {a.data}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cpus (one used), torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}; {len(srcs)} photos from {a.data}")
    def short256(im):
        s = 256 / min(im.size); return im.resize((max(256, round(im.size[0]*s)), max(256, round(im.size[1]*s))), Image.BILINEAR)
    def tv(p, dev):   # the library's device path (`images.read_image_bytes` + `decode_resize_crop`), one image at a time
        blob, o = read_image_bytes(p); return decode_resize_crop([blob], [o], 256, device=dev)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d); big, small = [], {}
        for i, p in enumerate(srcs):
            q = d/f'{i}_2x.jpg'; im = Image.open(p).convert('RGB'); im.resize((im.width*2, im.height*2), Image.BICUBIC).save(q, quality=90); big.append(q)
        for kind, files in (('1x', srcs), ('2x', big)):
            for p in files: small[p] = d/f'r_{kind}_{p.name}'; resize_file(p, small[p], 256)
            paths = {'reference': lambda p: short256(Image.open(p).convert('RGB')), 'full': lambda p: short256(load_rgb(p)),
                     'draft': lambda p: short256(load_rgb(p, min_side=256)), 'resized': lambda p: short256(load_rgb(small[p])),
                     'tv-cpu': lambda p: tv(p, 'cpu')}
            if torch.cuda.is_available(): paths['tv-cuda'] = lambda p: tv(p, 'cuda')
            for name, f in paths.items():
                f(files[0]); t = time.perf_counter()
                for p in files: f(p)
                if name == 'tv-cuda': torch.cuda.synchronize()
                res[kind, name] = len(files) / (time.perf_counter() - t)
            print(f"{kind} photos ({Image.open(files[0]).size[0]} x {Image.open(files[0]).size[1]} first): " +
                  ', '.join(f"{n} {res[kind, n]:.0f}/s ({res[kind, n] / res[kind, 'reference']:.2f}x)" for n in paths))
    print(f"draft_speedup_2x: {res['2x', 'draft'] / res['2x', 'full']:.2f}")
    print(f"resized_speedup_2x: {res['2x', 'resized'] / res['2x', 'full']:.2f}")

if __name__ == '__main__': main()

"""Benchmark on a GPU: every kt_paper trainer against a bare PyTorch loop of the same model and batch, on CUDA.

`bench/train.py` with `--device cuda` and the `paper` preset's shapes (override with `--preset`): both sides on the GPU,
the bare loops in fp32 and bf16 autocast (fp16 + a gradient scaler on GPUs without bf16), each with and without
channels-last; kt_paper with its precision policy (`auto`: bf16, or fp16 on GPUs without bf16). The last line is
`train_ratio_min: X`. Without CUDA it says so and exits 0 (CI machines have no GPU).

Usage: python bench/gpu.py [--preset paper] [--steps 60] [--rounds 3]
"""
import runpy, sys, pathlib, torch

if __name__ == '__main__':
    if not torch.cuda.is_available(): print("bench/gpu.py: no CUDA device on this machine; nothing to measure"); sys.exit(0)
    args = sys.argv[1:]
    if not any(a.startswith('--preset') for a in args): args += ['--preset', 'paper']
    sys.argv = [str(pathlib.Path(__file__).with_name('train.py')), '--device', 'cuda', *args]
    runpy.run_path(sys.argv[0], run_name='__main__')

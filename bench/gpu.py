"""Benchmark on a GPU: every kt_paper trainer against a bare PyTorch loop of the same model and batch, on CUDA.

`bench/train.py` with `--device cuda` and the `paper` preset's shapes (override with `--preset`): both sides on the GPU,
the bare loops in fp32 and bf16 autocast (fp16 + a gradient scaler on GPUs without bf16), each with and without
channels-last; kt_paper with its precision policy (`auto`: bf16, or fp16 on GPUs without bf16). The last line is
`train_ratio_min: X`. Without CUDA it says so and exits 0 (CI machines have no GPU).

`--smoke` (what `tests/test_bench.py` runs): `bench/train.py --smoke` through the same hand-over, seconds; on CUDA on the
GPU, and without CUDA on the CPU with one trainer (`--cases pretext`), so that the hand-over and the path it shares with
`bench/train.py` are exercised on every machine. Its numbers mean nothing.

Usage: python bench/gpu.py [--preset paper] [--steps 60] [--rounds 3] [--smoke]   (other arguments go to bench/train.py)
"""
import runpy, sys, pathlib, torch

def train_argv(args:list, device:str) -> list:
    "The command line handed to bench/train.py: `--device`, then `args`, with the `paper` preset unless one is given (smoke: its own)."
    if not any(a.startswith('--preset') for a in args) and '--smoke' not in args: args = [*args, '--preset', 'paper']
    return [str(pathlib.Path(__file__).with_name('train.py')), '--device', device, *args]

if __name__ == '__main__':
    args = sys.argv[1:]
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device on this machine; nothing to measure")
        if '--smoke' not in args: sys.exit(0)
        print("smoke: the hand-over to bench/train.py on the CPU instead, one trainer")
        if not any(a.startswith('--cases') for a in args): args = [*args, '--cases', 'pretext']
        sys.argv = train_argv(args, 'cpu')
    else: sys.argv = train_argv(args, 'cuda')
    runpy.run_path(sys.argv[0], run_name='__main__')

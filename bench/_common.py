"""Helpers shared by the `bench/` scripts (not a benchmark: `tests/test_bench.py` skips files starting with `_`)."""
import platform

def cpu_name() -> str:
    "The CPU's model name (`/proc/cpuinfo`), else what `platform` knows."
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.processor() or platform.machine()

def smoke_defaults(ap, smoke:dict):
    "Parse `ap`'s arguments; with `--smoke`, `smoke` replaces the defaults (arguments given explicitly still win)."
    a = ap.parse_args()
    if getattr(a, 'smoke', False): ap.set_defaults(**smoke); a = ap.parse_args()
    return a

SMOKE_HELP = "toy sizes that run the same code paths in seconds (what tests/test_bench.py runs); the numbers mean nothing"
SMOKE_NOTE = "smoke size: toy sizes that exercise the code paths; the numbers below mean nothing"

#!/usr/bin/env bash
# bench/gpu_check.sh: the project's prepared device check, one script for a machine with one CUDA GPU (<= 8 minutes).
#
# It proves that the `paper` preset runs on CUDA and measures what a GPU projection assumes:
#   1 env       torch and its CUDA build, nvidia-smi's driver / GPU / memory, compute capability, native bf16
#               (`kt_paper.core.cuda_has_bf16`), the precision policy, and the interpreter papermill's stage kernels
#               would use (`kt_paper.reproduce.write_kernelspec`: sys.executable) and whether it has ipykernel;
#   2 data      synthetic photos: 200 JPEGs of 500 x 375 px (smoothed multi-scale noise, so that their JPEG size is
#               close to a photo's; bench/decode.py adds their 1000 x 750 re-encodings itself), and the paper preset's
#               data layout under one --data-root: ILSVRC2012/ (class folders of those photos), places205/ and
#               VOCdevkit/VOC2007 + VOC2012 (the built-in generator's, `kt_paper.builtin.make_builtin_dataset`),
#               checked with `kt_paper.rehearsal.rehearsal_roots('paper', root)` (every role from the preset's folder);
#   3 decode    bench/decode.py --data <photos> --n 200: images/s of every decode path, tv-cuda (nvJPEG) included;
#   4 train     bench/gpu.py --steps 20 --warmup 5 --rounds 1: each trainer's kt_paper step against a bare PyTorch
#               loop on the GPU at the paper preset's shapes (train_ratio_min, img/s per trainer);
#   5 rehearsal kt-paper reproduce --preset paper --rehearse --device cuda --data-root <layout> --fig-dir $OUT/rehearsal:
#               every stage a few steps on CUDA and the projected hours (falls back to ../shared/data's samples when
#               the synthetic layout could not be built, else records `rehearsal: skipped (no data)`).
# Peak GPU memory: torch.cuda.max_memory_allocated / _reserved at the end of steps 3-4 (a wrapper around the script),
# the rehearsal's per-stage peaks, and nvidia-smi's memory.used sampled every 0.5 s during each step.
#
# Every figure is printed as a `name: value` line and written to $OUT/gpu_check.json ($OUT if set, else bench/out/),
# after each step, so a killed run still leaves its JSON; each step's raw log is in $OUT/gpu_check_logs/. Each step has
# its own timeout, all within a 450-s budget (caps: env 40 s, data 60 s, decode 75 s, train 130 s, rehearsal the rest
# up to 200 s); a failed or timed-out step is recorded as `step_<name>_rc: N` (124: timed out) and the next one runs.
# The last line is `gpu_check_seconds: X`. GPU_CHECK_BUDGET=S sets that budget (the dry run's: 120 s).
#
# Without CUDA it prints one line saying so and exits 0.
# `--dry-run` (or GPU_CHECK_FAKE=1): on any machine, the CPU only, every step's plumbing at smoke size in about 30 s:
# the same environment report, 6 photos through `bench/decode.py --smoke`, `bench/gpu.py --smoke` (one trainer on the
# CPU), the paper layout built small and checked by `rehearsal_roots`, and the `test` preset's rehearsal on the CPU
# in place of the paper one (the paper rehearsal on a CPU takes minutes); the JSON and logs are written the same way.
# What tests/test_bench.py runs. Its numbers mean nothing.
#
# Usage: bash bench/gpu_check.sh [--dry-run]     (from anywhere; it works from the repository root)
# The interpreter: $GPU_CHECK_PYTHON if set, else the checkout's .venv/bin/python, else `python` on the PATH.
set -u
T0=$(date +%s)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then PY=$GPU_CHECK_PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
DRY=0
for a in "$@"; do
    case $a in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu_check: unknown argument $a (usage: bash bench/gpu_check.sh [--dry-run])" >&2; exit 2 ;;
    esac
done
[ "${GPU_CHECK_FAKE:-0}" = 1 ] && DRY=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's kt_paper, installed or not

CUDA=$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)
if [ "$CUDA" != True ] && [ $DRY = 0 ]; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is ${CUDA:-not importable} with $PY); nothing to check (--dry-run walks the steps on the CPU)"
    exit 0
fi

DEST=${OUT:-bench/out}
LOGS=$DEST/gpu_check_logs
JSON=$DEST/gpu_check.json
mkdir -p "$LOGS" || exit 1
FIGS=$LOGS/figures.tsv; : > "$FIGS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
SAMPLER=
cleanup() { [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
export PYTHONWARNINGS=ignore MPLBACKEND=agg
if [ $DRY = 1 ]; then
    BUDGET=120
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # as tests/test_bench.py: loaded shared CPUs
else BUDGET=450; fi
BUDGET=${GPU_CHECK_BUDGET:-$BUDGET}   # seconds for all the steps (tests shrink it to see steps skipped)

fig() { echo "$1: $2"; printf '%s\t%s\n' "$1" "$2" >> "$FIGS"; }
figs() { while IFS= read -r l; do case $l in *': '*) fig "${l%%: *}" "${l#*: }" ;; esac; done; }   # `name: value` lines
write_json() {   # figures.tsv -> gpu_check.json (numbers as numbers, the last value of a name wins), atomically
    "$PY" - "$FIGS" "$JSON" <<'PY'
import json, os, sys
d = {}
for line in open(sys.argv[1]):
    k, _, v = line.rstrip('\n').partition('\t')
    try: d[k] = int(v)
    except ValueError:
        try: d[k] = float(v)
        except ValueError: d[k] = v
tmp = sys.argv[2] + '.tmp'
with open(tmp, 'w') as f: json.dump(d, f, indent=1)
os.replace(tmp, sys.argv[2])
PY
}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# run_step NAME CAP CMD...: CMD under `timeout` (CAP s, or what is left of the budget), output in $LOGS/NAME.log,
# nvidia-smi's memory.used sampled meanwhile; records step_NAME_rc / _seconds / _smi_peak_mib; returns CMD's status.
run_step() {
    local name=$1 cap=$2; shift 2
    local t log=$LOGS/$name.log smi=$LOGS/$name.smi s0 rc
    t=$(left); [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 5 ]; then echo "# $name skipped: the budget is spent" > "$log"; fig "step_${name}_rc" "skipped (budget spent)"; return 99; fi
    echo "# $name (timeout ${t} s): $*" > "$log"
    SAMPLER=
    if [ $DRY = 0 ] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$smi" 2>/dev/null & SAMPLER=$!
    fi
    s0=$(date +%s)
    timeout -k 5 "$t" "$@" >> "$log" 2>&1; rc=$?
    if [ -n "$SAMPLER" ]; then
        kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=
        fig "step_${name}_smi_peak_mib" "$(sort -n "$smi" | tail -1)"
    fi
    fig "step_${name}_rc" "$rc"; fig "step_${name}_seconds" "$(( $(date +%s) - s0 ))"
    [ $rc = 124 ] && echo "gpu_check: step $name timed out after ${t} s (log: $log)"
    [ $rc != 0 ] && [ $rc != 124 ] && { echo "gpu_check: step $name failed ($rc); its last lines:"; tail -5 "$log" | sed 's/^/    /'; }
    return $rc
}

# Runs a bench script (or `kt-paper`, the console script's main) in this process and prints its peak GPU memory at exit.
PEAK=$(cat <<'PY'
import atexit, os, runpy, sys, torch
def _peak():
    if torch.cuda.is_available():
        print(f"peak_gpu_allocated_gb: {torch.cuda.max_memory_allocated() / 2**30:.3f}")
        print(f"peak_gpu_reserved_gb: {torch.cuda.max_memory_reserved() / 2**30:.3f}", flush=True)
atexit.register(_peak)
target = sys.argv[1]; sys.argv = sys.argv[1:]
if target == 'kt-paper':
    from kt_paper.reproduce import main; main(sys.argv[1:])
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(target))); runpy.run_path(target, run_name='__main__')
PY
)

fig gpu_check_mode "$([ $DRY = 1 ] && echo 'dry run (CPU, smoke sizes; the numbers mean nothing)' || echo cuda)"
fig gpu_check_out "$DEST"
fig python "$PY"

# ---- 1. environment ------------------------------------------------------------------------------------------------
run_step env 40 "$PY" - <<'PY'
import importlib.util, json, sys, tempfile
from pathlib import Path
import torch, kt_paper
from kt_paper.core import cuda_has_bf16, usable_cores
from kt_paper.reproduce import KERNEL_NAME, write_kernelspec
from kt_paper.train import precision_policy
cuda = torch.cuda.is_available()
f = {'torch_version': torch.__version__, 'torch_cuda_build': torch.version.cuda, 'cudnn_version': torch.backends.cudnn.version(),
     'cuda_available': cuda, 'gpu_count': torch.cuda.device_count(), 'kt_paper_version': kt_paper.__version__,
     'kt_paper_file': kt_paper.__file__, 'usable_cores': usable_cores(), 'sys_executable': sys.executable}
if cuda:
    p = torch.cuda.get_device_properties(0)
    f.update(torch_gpu_name=p.name, torch_gpu_memory_gib=round(p.total_memory / 2**30, 1),
             compute_capability='.'.join(map(str, torch.cuda.get_device_capability(0))), bf16_native=cuda_has_bf16(0))
f['precision_policy'] = precision_policy(torch.device('cuda' if cuda else 'cpu')).name
with tempfile.TemporaryDirectory() as d:   # what `reproduce` writes for papermill: the stage kernels' interpreter
    spec = json.loads((write_kernelspec(d)/'kernels'/KERNEL_NAME/'kernel.json').read_text())
f.update(kernel_name=KERNEL_NAME, kernel_interpreter=spec['argv'][0],
         kernel_has_ipykernel=importlib.util.find_spec('ipykernel') is not None)
for k, v in f.items(): print(f'{k}: {v}')
PY
figs < <(grep -E '^[a-z_0-9]+: ' "$LOGS/env.log")
if command -v nvidia-smi >/dev/null; then
    IFS=, read -r g_name g_driver g_mem < <(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
    fig smi_gpu_name "$(echo ${g_name:-n/a})"; fig smi_driver "$(echo ${g_driver:-n/a})"; fig smi_memory_total "$(echo ${g_mem:-n/a})"
else fig smi_gpu_name "n/a (no nvidia-smi)"; fi
write_json

# ---- 2. synthetic data: photos for decode, the paper preset's layout for the rehearsal ------------------------------
PHOTOS=$WORK/photos; LAYOUT=$WORK/paper_data
if [ $DRY = 1 ]; then N_PHOTOS=10; N_VOC=20; else N_PHOTOS=200; N_VOC=64; fi
run_step data 60 "$PY" - "$PHOTOS" "$LAYOUT" "$N_PHOTOS" "$N_VOC" <<'PY'
import os, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
photos, root, n, n_voc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def natural(rng, w, h):
    "Smoothed noise at three scales (1/f-like) plus grain: a photo-like JPEG size (about 80 KB at 500 x 375, quality 90)."
    img = rng.standard_normal((h, w, 3)).astype(np.float32) * 4
    for f, amp in ((32, 60.), (8, 35.), (2, 18.)):
        small = rng.standard_normal((max(2, h // f), max(2, w // f), 3)).astype(np.float32)
        img += amp * np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)], -1)
    return Image.fromarray(np.clip(img + 128, 0, 255).astype(np.uint8))
t0 = time.time(); rng = np.random.default_rng(0); photos.mkdir(parents=True)
for i in range(n): natural(rng, 500, 375).save(photos/f'{i:04d}.jpg', quality=90)
print(f"photos: {n}"); print(f"photo_size: 500x375")
print(f"photo_mean_kb: {np.mean([p.stat().st_size for p in photos.iterdir()]) / 1e3:.1f}")
# The paper preset's layout (`kt_paper.data.DATA_PRESETS['paper']`) under one data root: ILSVRC2012/{train,val}/<class>/
# (the photos, hard-linked; 2 classes), places205 and VOCdevkit/VOC2007 + VOC2012 from the built-in generator.
from kt_paper.builtin import make_builtin_dataset
from kt_paper.core import usable_cores
for i, p in enumerate(sorted(photos.iterdir())):
    d = root/'ILSVRC2012'/('val' if i // 2 % 5 == 4 else 'train')/f'n0000000{i % 2}'   # 1 in 5 to val
    d.mkdir(parents=True, exist_ok=True)
    os.link(p, d/f'{p.stem}.JPEG')
gen = root.parent/'builtin'
make_builtin_dataset(gen, seed=0, size=256, n_objects_train=1, n_objects_val=1, n_scenes_train=4, n_scenes_val=2,
                     n_voc07_trainval=n_voc, n_voc07_test=n_voc, n_voc12_train=n_voc, n_voc12_val=n_voc // 2,
                     n_workers=min(8, usable_cores()))
os.rename(gen/'scenes', root/'places205'); os.rename(gen/'VOCdevkit', root/'VOCdevkit')
from kt_paper.rehearsal import rehearsal_roots
from kt_paper.data import check_roles
roots, source = rehearsal_roots('paper', root)
problems = check_roles(roots)
for r in roots: print(f"layout_{r}: {source[r]}")
print(f"layout_problems: {'; '.join(problems) or 'none'}")
print(f"data_seconds: {time.time() - t0:.1f}")
sys.exit(1 if problems or set(source.values()) != {'preset'} else 0)
PY
DATA_RC=$?
figs < <(grep -E '^[a-z_0-9]+: ' "$LOGS/data.log")
write_json

# ---- 3. decode paths -----------------------------------------------------------------------------------------------
if [ $DRY = 1 ]; then DEC=(--smoke); else DEC=(--n 200); fi
run_step decode 75 "$PY" -c "$PEAK" bench/decode.py --data "$PHOTOS" "${DEC[@]}"
"$PY" - "$LOGS/decode.log" <<'PY' | figs
import re, sys
for line in open(sys.argv[1]):
    m = re.search(r'(\dx) photos \((\d+) x (\d+) first\): (.*)', line)
    if m:
        print(f"decode_{m[1]}_size: {m[2]}x{m[3]}")
        for name, rate in re.findall(r'([\w-]+) (\d+)/s', m[4]): print(f"decode_{m[1]}_{name.replace('-', '_')}_per_s: {rate}")
    elif re.match(r'(draft_speedup_2x|resized_speedup_2x|peak_gpu_\w+): ', line): print('decode_' * line.startswith('peak') + line.strip())
PY
write_json

# ---- 4. trainers: kt_paper against bare PyTorch loops ----------------------------------------------------------------
if [ $DRY = 1 ]; then TR=(--smoke); else TR=(--steps 20 --warmup 5 --rounds 1); fi
run_step train 130 "$PY" -c "$PEAK" bench/gpu.py "${TR[@]}"
"$PY" - "$LOGS/train.log" <<'PY' | figs
import re, sys
KEY = dict(student='student', pretext='pretext', linear='probes', voc07='transfer')
key = None
for line in open(sys.argv[1]):
    m = re.search(r'(student|pretext|linear|VOC07)\b[^\n]*? kt_paper +([\d.]+) img/s \(([^)]*)\)  bare, pre-made batches: ([^;\n]*)(?:; bare (\S+) doing the same input work: ([\d.]+))?', line)
    if m:
        key = KEY.get(m[1].lower(), m[1].lower())
        print(f"train_{key}_kt_img_s: {m[2]}"); print(f"train_{key}_kt_precision: {m[3]}")
        bare = dict((k, float(v)) for k, v in re.findall(r'([\w+]+) ([\d.]+)', m[4]))
        if bare: b = max(bare, key=bare.get); print(f"train_{key}_bare_best_img_s: {bare[b]}"); print(f"train_{key}_bare_best: {b}")
        if m[6]: print(f"train_{key}_bare_same_work_img_s: {m[6]}")
        continue
    m = re.search(r'same-work bare loop, per round: .*\(median ([\d.]+)\);.*\(median ([\d.]+)\)', line)
    if m and key: print(f"train_{key}_ratio: {m[1]}"); print(f"train_{key}_ratio_premade: {m[2]}")
    elif (m := re.search(r'\b(train_ratio_min|train_ratio_premade_min): (\S+)', line)): print(f'{m[1]}: {m[2]}')
    elif re.match(r'peak_gpu_\w+: ', line): print('train_' + line.strip())
PY
write_json

# ---- 5. the paper rehearsal on CUDA ----------------------------------------------------------------------------------
REH=$DEST/rehearsal
if [ $DATA_RC = 0 ]; then ROOT=$LAYOUT; WHAT="the synthetic paper layout (every role from the preset's folder)"
elif [ -d ../shared/data ]; then ROOT=../shared/data; WHAT="../shared/data (the synthetic layout failed: step_data_rc $DATA_RC)"
else ROOT=; WHAT=none; fi
if [ $DRY = 1 ]; then fig rehearsal_data "the test preset's built-in set (dry run; the paper rehearsal would use $WHAT)"
else fig rehearsal_data "$WHAT"; fi
if [ -z "$ROOT" ]; then fig rehearsal "skipped (no data)"
else
    if [ $DRY = 1 ]; then   # the paper rehearsal takes minutes on a CPU: the test preset's, same code and reporting
        fig rehearsal_preset "test (dry run; the paper one on CUDA)"
        RARGS=(--preset test --rehearse --rehearse-steps 2 --device cpu)
    else fig rehearsal_preset paper; RARGS=(--preset paper --rehearse --device cuda --data-root "$ROOT"); fi
    rm -f "$REH/rehearsal.json"   # a previous run's is not this one's
    run_step rehearsal 200 "$PY" -c "$PEAK" kt-paper reproduce "${RARGS[@]}" --fig-dir "$REH"
    "$PY" - "$REH/rehearsal.json" <<'PY' | figs
import json, re, sys
try: info = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e: print(f"rehearsal: no rehearsal.json ({type(e).__name__})"); sys.exit()
print("rehearsal: done"); print(f"rehearsal_machine: {info['machine']}"); print(f"rehearsal_precision: {info['precision']}")
print(f"rehearsal_seconds: {info['rehearsal_seconds']}"); print(f"rehearsal_total_hours: {info['total_hours']:.4g}")
print(f"rehearsal_total_days: {info['total_hours'] / 24:.4g}")
for s, h in info['hours_by_stage'].items(): print(f"rehearsal_hours_{s}: {h:.4g}")
print(f"rehearsal_peak_gpu_gb: {max(r['peak_gpu_gb'] for r in info['rows']):.3f}")
print(f"rehearsal_peak_rss_gb: {max(r['peak_rss_gb'] for r in info['rows']):.2f}")
for r in info['rows']:
    job = re.sub(r'[^a-z0-9]+', '_', re.split(r'[(,]| on | k=', r['job'])[0].lower()).strip('_')
    print(f"rehearsal_{r['stage']}_{job}_items_per_s: {r['items_per_s']:.1f}")
    if isinstance(r['data_wait'], (int, float)) and r['data_wait'] == r['data_wait']: print(f"rehearsal_{r['stage']}_{job}_data_wait: {r['data_wait']:.3f}")
    print(f"rehearsal_{r['stage']}_{job}_peak_gpu_gb: {r['peak_gpu_gb']:.3f}")
for k, v in info['input_rates'].items(): print(f"rehearsal_input_{k.replace(' ', '_').replace('-', '_')}_per_s: {v:.0f}")
PY
fi
write_json

fig gpu_check_seconds "$(( $(date +%s) - T0 ))"
write_json
exit 0

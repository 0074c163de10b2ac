#!/usr/bin/env python3
"""A CI gate: run a command that regenerates files and fail when it changed any of them.

Usage: gate.py NAME GLOB [GLOB ...] -- CMD [ARG ...]
Example: gate.py "notebooks clean" 'nbs/**/*.ipynb' -- .venv/bin/nbdev-clean
"""
import subprocess, sys
from pathlib import Path

def snapshot(globs):
    return {p: p.read_bytes() for g in globs for p in Path('.').glob(g) if p.is_file()}

if __name__ == '__main__':
    sep = sys.argv.index('--')
    name, globs, cmd = sys.argv[1], sys.argv[2:sep], sys.argv[sep+1:]
    before = snapshot(globs)
    r = subprocess.run(cmd)
    if r.returncode: sys.exit(f'gate "{name}": {" ".join(cmd)} failed with exit code {r.returncode}')
    after = snapshot(globs)
    changed = sorted(str(p) for p in set(before) | set(after) if before.get(p) != after.get(p))
    if changed:
        print(f'gate "{name}" FAILED: `{" ".join(cmd)}` changed {len(changed)} file(s):', *changed, sep='\n  ')
        print('Run the command locally, review the diff and commit it.')
        sys.exit(1)
    print(f'gate "{name}": ok ({len(after)} files unchanged)')

#!/usr/bin/env python3
"""Render README.md from nbs/index.ipynb with nbconvert's Markdown exporter (Quarto is not available here).

`#| hide` cells are dropped and nbdev `#|` directive lines are removed, as nbdev's own README rendering does.
Usage: make_readme.py [--check]   (--check: exit 1 when README.md differs from what would be rendered)
"""
import sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parents[1]

def render(nb_path=ROOT/'nbs'/'index.ipynb') -> str:
    nb = nbformat.read(nb_path, as_version=4)
    cells = []
    for c in nb.cells:
        lines = c.source.splitlines()
        directives = [l.replace(' ', '') for l in lines if l.startswith('#|')]
        if '#|hide' in directives: continue
        if c.cell_type == 'code': c.source = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
        cells.append(c)
    nb.cells = cells
    body, _ = MarkdownExporter().from_notebook_node(nb)
    body = body.strip() + '\n'
    return '<!-- Generated from nbs/index.ipynb by `make readme`; edit the notebook, not this file. -->\n\n' + body

if __name__ == '__main__':
    text, readme = render(), ROOT/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md is stale: run `make readme` (it is generated from nbs/index.ipynb) and commit it.')
        print('README.md is current.')
    else:
        readme.write_text(text); print(f'wrote {readme}')

"""Ship the pipeline's notebooks inside the package (kt_paper/notebooks), so `kt-paper reproduce` works when installed.

All metadata lives in pyproject.toml; this file only adds that copy step to the build.
"""
import json, shutil
from pathlib import Path
from setuptools import setup
from setuptools.command.build_py import build_py

class build_py_with_notebooks(build_py):
    def run(self):
        super().run()
        src, dest = Path(__file__).parent/'nbs', Path(self.build_lib)/'kt_paper'/'notebooks'
        if not src.is_dir(): return
        dest.mkdir(parents=True, exist_ok=True)
        for nb in sorted(src.glob('[0-9]*.ipynb')): shutil.copy2(nb, dest/nb.name)

setup(cmdclass={'build_py': build_py_with_notebooks})

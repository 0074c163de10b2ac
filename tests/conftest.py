import os
from pathlib import Path
import pytest

os.environ.setdefault('MPLBACKEND', 'agg')
# The suite tests one program on every CPU: fp32 unless a test asks for another precision explicitly (the bf16 paths
# have their own tests, which force bf16 whether or not this CPU has bf16 units).
os.environ.setdefault('KT_PAPER_PRECISION', 'fp32')
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('KT_PAPER_SHARED_DATA', ROOT.parent/'shared'/'data'))

@pytest.fixture(scope='session')
def shared_data() -> Path:
    "The real sample datasets (../shared/data), or skip when absent."
    if not SHARED.is_dir(): pytest.skip(f'real sample data not found at {SHARED} (set KT_PAPER_SHARED_DATA)')
    return SHARED

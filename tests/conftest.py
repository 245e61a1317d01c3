"""Shared pytest setup: make the repository importable (`import utils`) from any directory."""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def repo_root() -> Path:
    """The repository root (scripts, configs/ and utils/ live here)."""
    return REPO_ROOT

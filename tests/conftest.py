import os
from pathlib import Path

import pytest

# nothing in the test suite may reach a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CASES = Path(__file__).parent / "cases"


@pytest.fixture
def cases() -> Path:
    return CASES


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Let each test create its own Accelerator (Accelerate keeps one global state per process)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory trained for a few steps on coloured shapes, with an index of its held-out shards."""
    from accelerate.state import AcceleratorState, GradientState

    from mmalign.config import build_config
    from mmalign.train import train
    from tests.helpers import write_labelled_shards

    folder = tmp_path_factory.mktemp("tiny_run")
    config = build_config(
        {
            "run": {"name": "tiny", "output_dir": str(folder / "runs"), "seed": 0},
            "model": {"name": "mm-test"},
            "data": {"train_shards": write_labelled_shards(folder, 2, 48), "workers": 0, "shuffle_buffer": 16},
            "train": {"batch_size": 16, "steps": 40, "log_every": 10, "checkpoint_every": 40},
            "optim": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0},
            "eval": {"shards": write_labelled_shards(folder, 1, 24, prefix="val"), "build_index": True},
        }
    )
    run_dir = train(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return run_dir

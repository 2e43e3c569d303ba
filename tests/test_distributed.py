"""Multi-process behaviour with real processes: torchrun, gloo, CPU."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def torchrun(nproc: int, *args: str, timeout: int = 240) -> None:
    """Run torchrun; on a timeout, kill every process it started (a hung rank must not outlive the test)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-5000:]


def load_ranks(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("rank-*.json"))]


@pytest.mark.parametrize(
    ("nproc", "accumulation", "freeze"),
    [
        (2, 1, "none"),
        (3, 1, "none"),
        (2, 2, "none"),
        (3, 2, "none"),
        (2, 1, "image"),
        (2, 1, "text"),
        (2, 1, "logit_scale"),
        (2, 2, "image+text"),
    ],
)
def test_distributed_step_equals_single_process(tmp_path, nproc, accumulation, freeze):
    out = tmp_path / "out"
    torchrun(
        nproc, "tests/distributed_check.py", "--out", str(out), "--accumulation", str(accumulation), "--freeze", freeze
    )
    ranks = load_ranks(out)
    assert [rank["rank"] for rank in ranks] == list(range(nproc))
    assert all(rank["world"] == nproc for rank in ranks)
    reference = ranks[0]
    for rank in ranks:
        assert rank["mean_loss"] == pytest.approx(reference["reference_loss"], rel=1e-5)
        assert set(rank["grads"]) == set(reference["reference_grads"])
        for name, expected in reference["reference_grads"].items():
            actual, wanted = torch.tensor(rank["grads"][name]), torch.tensor(expected)
            assert (actual - wanted).norm() <= 1e-5 * wanted.norm() + 1e-12, name
    if "image" in freeze:
        assert not any(name.startswith("visual.") for name in reference["grads"])
    if freeze == "logit_scale":
        assert "logit_scale" not in reference["grads"]


def write_run_config(tmp_path: Path, shard_pattern: str, val_pattern: str | None, steps: int) -> Path:
    import yaml

    config = {
        "run": {"name": "dist", "output_dir": str(tmp_path / "runs"), "seed": 1},
        "model": {"name": "mm-test"},
        "data": {"train_shards": shard_pattern, "workers": 1, "shuffle_buffer": 8},
        "train": {"batch_size": 4, "steps": steps, "log_every": 2, "checkpoint_every": 5},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "eval": {"shards": val_pattern, "recall_k": [1, 5], "batch_size": 3, "workers": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_processes_train_on_uneven_shards_and_evaluate_once(tmp_path):
    from tests.helpers import write_labelled_shards

    train_pattern = write_labelled_shards(tmp_path / "shards", shards=3, per_shard=[40, 8, 3])
    val_pattern = write_labelled_shards(tmp_path / "shards", shards=3, per_shard=[7, 2, 4], prefix="val")
    config = write_run_config(tmp_path, train_pattern, val_pattern, steps=12)
    torchrun(2, "-m", "mmalign.train", "--config", str(config))

    run_dir = tmp_path / "runs" / "dist"
    report = json.loads((run_dir / "data_report.json").read_text())
    processes = {item["rank"]: item for item in report["processes"]}
    # both processes ran every step, and each read and decoded its own shards
    assert processes[0]["batches"] == processes[1]["batches"] == 12
    assert processes[0]["shards"] and processes[1]["shards"]
    assert processes[0]["shards"] != processes[1]["shards"]
    state = json.loads((run_dir / "checkpoints" / "step-12" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert [item["batches"] for item in state["data"]] == [12, 12]

    # evaluation on 2 processes x 2 workers read each held-out sample once
    details = json.loads((run_dir / "eval_details.json").read_text())
    assert details["images"] == 13
    assert details["data"]["read"] == 13
    two_process_scores = json.loads((run_dir / "eval.json").read_text())

    # the same model scored by one process gives the same numbers
    single = tmp_path / "single"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "mmalign.cli", "eval", "--model", str(run_dir), "--output", str(single)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    one_process_scores = json.loads((single / "eval.json").read_text())
    assert one_process_scores.keys() == two_process_scores.keys()
    for key, value in one_process_scores.items():
        assert two_process_scores[key] == pytest.approx(value, abs=1e-6), key


def read_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "train/loss" in record:
                losses[record["step"]] = record["train/loss"]
    return losses


def test_run_killed_by_signal_resumes_step_for_step(tmp_path):
    import time

    import yaml

    from tests.helpers import write_labelled_shards

    pattern = write_labelled_shards(tmp_path / "shards", shards=3, per_shard=20)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def config_for(name: str) -> Path:
        path = write_run_config(tmp_path, pattern, None, steps=40)
        config = yaml.safe_load(path.read_text())
        config["run"]["name"] = name
        config["data"]["workers"] = 2
        config["train"].update(log_every=1, checkpoint_every=5)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    command = [sys.executable, "-m", "mmalign.train", "--config"]
    subprocess.run([*command, str(config_for("straight"))], cwd=ROOT, env=env, check=True, capture_output=True)
    expected = read_losses(tmp_path / "runs" / "straight")

    killed_dir = tmp_path / "runs" / "killed"
    process = subprocess.Popen([*command, str(config_for("killed"))], cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while max(read_losses(killed_dir), default=0) < 17 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    stopped_at = max(read_losses(killed_dir))
    assert 17 <= stopped_at < 40

    subprocess.run(
        [*command, str(tmp_path / "killed.yaml"), "run.resume=auto"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    resumed = read_losses(killed_dir)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(1, 41):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step

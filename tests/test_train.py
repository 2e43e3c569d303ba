import json
import logging
import math

import open_clip
import pytest
import torch
import yaml

import mmalign.train as train_module
from mmalign.checkpoint import list_checkpoints
from mmalign.config import build_config
from mmalign.model import load_model
from mmalign.train import TrainingError, main, train
from tests.helpers import write_labelled_shards


@pytest.fixture
def shard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    train_pattern = write_labelled_shards(folder, shards=2, per_shard=48)
    val_pattern = write_labelled_shards(folder, shards=1, per_shard=24, prefix="val")
    classes = {
        "classnames": ["circle", "square", "triangle", "cross"],
        "templates": ["a {}", "a picture of a {}"],
        "labels": {},
    }
    from tests.helpers import SHAPES, labelled_samples

    for key, _, caption in labelled_samples(0, 24):
        classes["labels"][key] = SHAPES.index(caption.split()[-1])
    (folder / "classes.json").write_text(json.dumps(classes))
    return {"train": train_pattern, "val": val_pattern, "classes": str(folder / "classes.json")}


def tiny_config(tmp_path, shard_dir, **sections):
    data = {
        "run": {"name": "tiny", "output_dir": str(tmp_path / "runs"), "seed": 3},
        "model": {"name": "mm-test"},
        "data": {"train_shards": shard_dir["train"], "workers": 0, "shuffle_buffer": 16},
        "train": {"batch_size": 16, "steps": 30, "log_every": 1, "checkpoint_every": 10},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0},
        "eval": {"shards": shard_dir["val"], "classes": shard_dir["classes"], "recall_k": [1, 5]},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return build_config(data)


def read_metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "train/loss" in record]


def test_training_lowers_loss_and_writes_run_dir(tmp_path, shard_dir):
    run_dir = train(tiny_config(tmp_path, shard_dir))
    metrics = read_metrics(run_dir)
    assert [record["step"] for record in metrics] == list(range(1, 31))
    first = sum(record["train/loss"] for record in metrics[:5]) / 5
    last = sum(record["train/loss"] for record in metrics[-5:]) / 5
    assert first == pytest.approx(math.log(16), rel=0.15)
    assert last < first - 0.5
    for key in ("train/logit_scale", "train/lr", "train/grad_norm", "data/samples_per_s"):
        assert key in metrics[-1]

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 30
    assert [path.name for path in list_checkpoints(run_dir)] == ["step-20", "step-30"]
    for name in ("model.safetensors", "optimizer.safetensors", "rng-rank-0.safetensors", "trainer_state.json"):
        assert (run_dir / "checkpoints" / "step-30" / name).is_file()
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["skipped"] == 0
    assert report["used"] == 30 * 16

    scores = json.loads((run_dir / "eval.json").read_text())
    for key in (
        "zeroshot/top1",
        "zeroshot/top5",
        "zeroshot/mean_per_class_recall",
        "retrieval/i2t_R@1",
        "retrieval/t2i_R@5",
        "linear_probe/top1",
        "linear_probe/mean_per_class_recall",
    ):
        assert 0.0 <= scores[key] <= 1.0
        assert f"chance/{key}" in scores
    assert scores["retrieval/t2i_R@5"] > scores["chance/retrieval/t2i_R@5"]


def test_saved_model_loads_in_plain_open_clip(tmp_path, shard_dir):
    run_dir = train(tiny_config(tmp_path, shard_dir, train={"steps": 3}, eval={"shards": None}))
    ours = load_model(run_dir)
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run_dir}")
    tokens = tokenizer(["a red circle"])
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.encode_text(tokens), theirs.encode_text(tokens), atol=1e-6)
        assert torch.allclose(ours.encode_image(image), theirs.encode_image(image), atol=1e-6)
    description = json.loads((run_dir / "open_clip_config.json").read_text())
    assert description["model_cfg"]["quick_gelu"] is False
    assert description["mmalign"]["activation"] == "gelu"
    assert description["preprocess_cfg"]["size"] == [32, 32]
    assert description["model_cfg"]["vision_cfg"]["patch_size"] == 8
    assert "ls_init_value" in description["model_cfg"]["text_cfg"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_same_losses(tmp_path, shard_dir, monkeypatch, workers):
    data = {"workers": workers}
    straight = train(tiny_config(tmp_path / "a", shard_dir, data=data, train={"steps": 20}, eval={"shards": None}))
    expected = {record["step"]: record["train/loss"] for record in read_metrics(straight)}

    real_step = train_module.optimizer_step
    calls = {"count": 0}

    def interrupted_step(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] > 13:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    config = tiny_config(tmp_path / "b", shard_dir, data=data, train={"steps": 20}, eval={"shards": None})
    monkeypatch.setattr(train_module, "optimizer_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(train_module, "optimizer_step", real_step)

    run_dir = train(config.model_copy(update={"run": config.run.model_copy(update={"resume": "auto"})}))
    records = read_metrics(run_dir)
    # one record per step: the interrupted run's steps 11-13 moved to metrics.superseded.jsonl
    assert [record["step"] for record in records] == list(range(1, 21))
    superseded = (run_dir / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in superseded if "train/loss" in line] == [11, 12, 13]
    resumed = {record["step"]: record["train/loss"] for record in records}
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_existing_run_dir_is_not_overwritten(tmp_path, shard_dir):
    config = tiny_config(tmp_path, shard_dir, train={"steps": 2}, eval={"shards": None})
    train(config)
    with pytest.raises(TrainingError, match="already contains a run"):
        train(config)


def test_cli_reports_config_error_with_key(tmp_path, caplog):
    status = main(["optim.lr=fast", f"run.output_dir={tmp_path}"])
    assert status == 2
    assert "optim.lr" in caplog.text


def test_cli_reports_missing_shards(tmp_path, caplog):
    status = main([f"data.train_shards={tmp_path}/none-{{0..3}}.tar", f"run.output_dir={tmp_path}"])
    assert status == 2
    assert "data.train_shards" in caplog.text
    assert "4 of 4 shards not found" in caplog.text


def test_warmup_longer_than_run_is_clipped(tmp_path, shard_dir, caplog):
    config = tiny_config(tmp_path, shard_dir, train={"steps": 4}, optim={"warmup_steps": 100}, eval={"shards": None})
    run_dir = train(config)
    assert "longer than the run" in caplog.text
    assert read_metrics(run_dir)[-1]["train/lr"] == pytest.approx(3e-3)


def test_resume_with_other_shards_restarts_the_data(tmp_path, shard_dir, caplog):
    config = tiny_config(tmp_path, shard_dir, train={"steps": 4, "checkpoint_every": 2}, eval={"shards": None})
    train(config.model_copy(update={"train": config.train.model_copy(update={"steps": 2})}))
    state = json.loads((tmp_path / "runs" / "tiny" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["shard_orders"]["0"]
    first_shard_only = shard_dir["train"].replace("{000..001}", "000")
    changed = config.model_copy(
        update={
            "run": config.run.model_copy(update={"resume": "auto"}),
            "data": config.data.model_copy(update={"train_shards": first_shard_only}),
        }
    )
    train(changed)
    assert "the shards or their order differ" in caplog.text
    assert read_metrics(tmp_path / "runs" / "tiny")[-1]["step"] == 4


def test_tensorboard_logging_writes_events(tmp_path, shard_dir):
    pytest.importorskip("tensorboard")
    run_dir = train(tiny_config(tmp_path, shard_dir, train={"steps": 2, "tensorboard": True}, eval={"shards": None}))
    assert list(run_dir.rglob("events.out.tfevents.*"))


def test_hf_text_tower_model_round_trips(tmp_path):
    from mmalign.config import ModelConfig
    from mmalign.model import create_model, create_tokenizer, save_model

    model = create_model(ModelConfig(name="mm-tiny-minilm", freeze_text=True)).eval()
    folder = tmp_path / "saved"
    save_model(model, folder)
    for name in ("config.json", "tokenizer.json", "vocab.txt", "model.safetensors", "open_clip_config.json"):
        assert (folder / name).is_file(), name
    tokens = create_tokenizer(model)(["a red heart"])
    with torch.no_grad():
        expected = model.encode_text(tokens)
        theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        assert torch.allclose(theirs.eval().encode_text(tokens), expected, atol=1e-5)
        # mmalign's loader also works after the folder has moved
        moved = tmp_path / "moved"
        folder.rename(moved)
        ours = load_model(moved)
        assert torch.allclose(ours.encode_text(create_tokenizer(ours)(["a red heart"])), expected, atol=1e-5)


def frozen_text_model():
    from mmalign.config import ModelConfig
    from mmalign.model import create_model

    model = create_model(ModelConfig(name="mm-test")).eval()
    for name, param in model.named_parameters():
        if not name.startswith("visual.") and name != "logit_scale":
            param.requires_grad_(False)
    return model


def test_text_cache_returns_what_the_tower_computes():
    from mmalign.model import cache_text_embeddings, create_tokenizer

    model = frozen_text_model()
    tokens = create_tokenizer(model)(["a red circle", "a blue square", "a red circle", "a green cross"])
    with torch.no_grad():
        expected = model.encode_text(tokens, normalize=True)
    cache = cache_text_embeddings(model, capacity=2)
    assert cache is not None
    first = model.encode_text(tokens, normalize=True)
    # the repeated caption is encoded once; the cache keeps only its capacity
    assert (cache.hits, cache.misses, len(cache.entries)) == (1, 3, 2)
    second = model.encode_text(tokens, normalize=True)
    assert (cache.hits, cache.misses) == (4, 4)
    assert torch.allclose(first, expected, atol=1e-6)
    assert torch.allclose(second, expected, atol=1e-6)
    # without normalize, the raw features come back
    assert torch.allclose(torch.nn.functional.normalize(model.encode_text(tokens), dim=-1), expected, atol=1e-6)


def test_text_cache_needs_a_frozen_text_tower():
    from mmalign.config import ModelConfig
    from mmalign.model import cache_text_embeddings, create_model

    # freeze_text keeps the text projection of a built-in tower trainable, so captions' embeddings move
    model = create_model(ModelConfig(name="mm-test", freeze_text=True))
    assert cache_text_embeddings(model, capacity=100) is None
    assert cache_text_embeddings(frozen_text_model(), capacity=0) is None


def test_training_with_text_cache_matches_without(tmp_path, shard_dir, caplog):
    caplog.set_level(logging.INFO, logger="mmalign")
    losses = {}
    for size in (0, 1000):
        config = tiny_config(
            tmp_path / str(size),
            shard_dir,
            model={"name": "mm-tiny-minilm", "freeze_text": True, "text_cache_size": size},
            train={"steps": 12, "checkpoint_every": 100},
            eval={"shards": None},
        )
        losses[size] = [record["train/loss"] for record in read_metrics(train(config))]
    assert losses[1000] == pytest.approx(losses[0], rel=1e-5)
    assert "text cache: " in caplog.text

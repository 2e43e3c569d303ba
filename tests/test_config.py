import subprocess
import sys

import pytest

from mmalign.config import ConfigError, apply_overrides, build_config, load_config, shipped_config_path

MINIMAL = {"data": {"train_shards": "shards/train-{000..007}.tar"}, "train": {"steps": 10}}


def test_shipped_default_config_loads():
    config = load_config()
    assert config.model.name == "mm-tiny-minilm"
    assert config.train.steps is not None


def test_override_sets_nested_value():
    config = build_config(apply_overrides(MINIMAL, ["optim.lr=5e-4", "train.batch_size=8", "eval.recall_k=[1,2]"]))
    assert config.optim.lr == pytest.approx(5e-4)
    assert config.train.batch_size == 8
    assert config.eval.recall_k == [1, 2]


def test_unknown_override_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*optim allows.*lr"):
        apply_overrides(MINIMAL, ["optim.learning_rate=1e-3"])


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match=r"'optimizer\.lr'.*the top level allows"):
        apply_overrides(MINIMAL, ["optimizer.lr=1e-3"])


def test_unknown_key_in_file_names_key():
    data = {**MINIMAL, "train": {"steps": 10, "epochs": 3}}
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epochs'; allowed here: batch_size"):
        build_config(data)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"'train\.batch_size': 'many'"):
        build_config(apply_overrides(MINIMAL, ["train.batch_size=many"]))


def test_out_of_range_value_names_key():
    with pytest.raises(ConfigError, match=r"'optim\.lr'"):
        build_config(apply_overrides(MINIMAL, ["optim.lr=-1"]))


def test_invalid_choice_lists_allowed():
    with pytest.raises(ConfigError, match=r"'train\.mixed_precision'.*'no', 'bf16' or 'fp16'"):
        build_config(apply_overrides(MINIMAL, ["train.mixed_precision=fp8"]))


def test_missing_shard_pattern_is_reported():
    with pytest.raises(ConfigError, match=r"missing required config key 'data\.train_shards'"):
        build_config({"data": {}, "train": {"steps": 1}})


def test_budget_needs_exactly_one_of_steps_and_samples():
    with pytest.raises(ConfigError, match=r"exactly one of train\.steps and train\.samples"):
        build_config({**MINIMAL, "train": {"steps": 10, "samples": 100}})


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match=r"not of the form section\.key=value"):
        apply_overrides(MINIMAL, ["optim.lr"])


def test_override_into_value_is_rejected():
    with pytest.raises(ConfigError, match=r"optim\.lr is a value"):
        apply_overrides(MINIMAL, ["optim.lr.x=1"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_toml_config_reads(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\ntrain_shards = "a-{0..1}.tar"\n[train]\nsamples = 1000\n')
    config = load_config(path)
    assert config.train.samples == 1000


def test_shipped_config_path_rejects_unknown_name():
    with pytest.raises(ConfigError, match="no shipped config named 'nope'"):
        shipped_config_path("nope")


def test_text_fields_keep_what_was_typed():
    overrides = ["train.mixed_precision=no", "run.name=0001", "model.name=1e3", "optim.lr=1e-3"]
    config = build_config(apply_overrides(MINIMAL, overrides))
    assert config.train.mixed_precision == "no"
    assert config.run.name == "0001"
    assert config.model.name == "1e3"
    assert config.optim.lr == pytest.approx(1e-3)


def test_yaml_no_in_file_means_no_mixed_precision():
    config = build_config({**MINIMAL, "train": {"steps": 1, "mixed_precision": False}})
    assert config.train.mixed_precision == "no"


def test_list_and_null_overrides():
    config = build_config(apply_overrides(MINIMAL, ["data.train_shards=[a.tar, b.tar]", "eval.shards=null"]))
    assert config.data.train_shards == ["a.tar", "b.tar"]
    assert config.eval.shards is None


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_answers_without_importing_torch(command):
    # torch takes seconds to import; help and usage errors should not wait for it
    script = (
        "import sys\n"
        "from mmalign.cli import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"usage: mmalign {command}" in result.stdout

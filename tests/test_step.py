"""The train step: cached-embedding accumulation, activation checkpointing and torch.compile."""

import pytest
import torch
from accelerate import Accelerator

from mmalign.config import ModelConfig
from mmalign.loss import InfoNCELoss
from mmalign.model import create_model
from mmalign.train import compile_towers, train_step


def batch(rows: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 49000, (rows, 16), generator=generator)
    text[:, -1] = 49407
    return {"image": torch.rand(rows, 3, 32, 32, generator=generator), "text": text}


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def run_step(model, micro_batches, accelerator) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = train_step(model, InfoNCELoss(), micro_batches, accelerator)
    return loss.item(), gradients(model)


def fresh_model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(name="mm-test", **options)).double()


def assert_same(first, second, rel: float) -> None:
    assert first[0] == pytest.approx(second[0], rel=rel)
    assert first[1].keys() == second[1].keys()
    for name in first[1]:
        expected, actual = second[1][name], first[1][name]
        assert (actual - expected).norm() <= rel * expected.norm() + 1e-12, name


@pytest.mark.parametrize("micro", [2, 4])
def test_cached_accumulation_equals_one_big_batch(micro):
    accelerator = Accelerator(cpu=True)
    whole = batch(16)
    whole = {"image": whole["image"].double(), "text": whole["text"]}
    chunks = [{key: value[index::micro] for key, value in whole.items()} for index in range(micro)]
    # the big batch in the order the micro-batches concatenate
    ordered = {key: torch.cat([chunk[key] for chunk in chunks]) for key in whole}
    model = fresh_model()
    big = run_step(model, [ordered], accelerator)
    accumulated = run_step(model, chunks, accelerator)
    assert_same(accumulated, big, rel=1e-9)


def test_activation_checkpointing_matches_plain():
    accelerator = Accelerator(cpu=True)
    micro_batches = [{"image": b["image"].double(), "text": b["text"]} for b in (batch(8, 1), batch(8, 2))]
    plain = run_step(fresh_model(), micro_batches, accelerator)
    checkpointed_model = fresh_model(grad_checkpointing=True)
    checkpointed_model.train()
    checkpointed = run_step(checkpointed_model, micro_batches, accelerator)
    assert_same(checkpointed, plain, rel=1e-9)


@pytest.mark.slow
def test_compiled_towers_match_plain():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    plain_model = create_model(ModelConfig(name="mm-test"))
    torch.manual_seed(0)
    compiled_model = create_model(ModelConfig(name="mm-test"))
    compile_towers(compiled_model)
    micro_batches = [batch(8, 3)]
    plain = run_step(plain_model, micro_batches, accelerator)
    compiled = run_step(compiled_model, micro_batches, accelerator)
    assert_same(compiled, plain, rel=1e-4)
    # compiling in place keeps parameter names, so checkpoints stay interchangeable
    assert plain_model.state_dict().keys() == compiled_model.state_dict().keys()

import math

import pytest
import torch

from mmalign.loss import InfoNCELoss


def naive_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: float) -> torch.Tensor:
    """Loop over pairs: the textbook symmetric InfoNCE."""
    image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    batch = image_emb.shape[0]
    image_terms, text_terms = [], []
    for i in range(batch):
        image_logits = [scale * torch.dot(image_emb[i], text_emb[j]) for j in range(batch)]
        text_logits = [scale * torch.dot(text_emb[i], image_emb[j]) for j in range(batch)]
        image_terms.append(-image_logits[i] + torch.logsumexp(torch.stack(image_logits), 0))
        text_terms.append(-text_logits[i] + torch.logsumexp(torch.stack(text_logits), 0))
    return (torch.stack(image_terms).mean() + torch.stack(text_terms).mean()) / 2


@pytest.mark.parametrize("batch", [1, 2, 7, 32])
@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
def test_loss_matches_naive_reference(batch, temperature):
    generator = torch.Generator().manual_seed(batch)
    image_emb = torch.randn(batch, 16, generator=generator, dtype=torch.float64)
    text_emb = torch.randn(batch, 16, generator=generator, dtype=torch.float64)
    scale = torch.tensor(1 / temperature, dtype=torch.float64)
    loss = InfoNCELoss()(image_emb, text_emb, scale)
    reference = naive_infonce(image_emb.float(), text_emb.float(), 1 / temperature)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)


def test_loss_of_single_pair_is_zero():
    emb = torch.randn(1, 8)
    assert InfoNCELoss()(emb, emb.clone(), torch.tensor(10.0)).item() == pytest.approx(0.0, abs=1e-6)


def test_loss_at_uniform_logits_is_log_batch():
    image_emb = torch.randn(16, 8)
    loss = InfoNCELoss()(image_emb, torch.randn(16, 8), torch.tensor(0.0))
    assert loss.item() == pytest.approx(math.log(16), rel=1e-6)


def test_loss_ignores_embedding_scale():
    image_emb, text_emb = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(14.0)
    plain = InfoNCELoss()(image_emb, text_emb, scale)
    scaled = InfoNCELoss()(3 * image_emb, 0.2 * text_emb, scale)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-6)


def test_loss_gradients_pass_gradcheck():
    image_emb = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    text_emb = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)

    def loss_in_float64(image, text, logit_scale):
        # the module normalises in float32; the check needs float64 throughout
        image = torch.nn.functional.normalize(image, dim=-1)
        text = torch.nn.functional.normalize(text, dim=-1)
        labels = torch.arange(image.shape[0])
        logits = logit_scale * image @ text.T
        return (
            torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
        ) / 2

    assert torch.autograd.gradcheck(loss_in_float64, (image_emb, text_emb, scale))
    # the module's gradients agree with the float64 reference
    image32 = image_emb.detach().float().requires_grad_()
    text32 = text_emb.detach().float().requires_grad_()
    scale32 = scale.detach().float().requires_grad_()
    InfoNCELoss()(image32, text32, scale32).backward()
    loss_in_float64(image_emb, text_emb, scale).backward()
    assert torch.allclose(image32.grad.double(), image_emb.grad, atol=1e-5)
    assert torch.allclose(text32.grad.double(), text_emb.grad, atol=1e-5)
    assert torch.allclose(scale32.grad.double(), scale.grad, atol=1e-5)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        InfoNCELoss()(torch.randn(4, 8), torch.randn(3, 8), torch.tensor(1.0))

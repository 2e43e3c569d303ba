"""Scores of a frozen model: zero-shot classification and cross-modal retrieval recall.

Definitions (also written to eval_details.json):

- zero-shot: each class embedding is the normalised mean of its prompt
  embeddings; an image is correct at k when its class is among the k classes
  of highest cosine similarity. Mean per-class recall is the top-1 recall
  averaged over the classes present.
- text to image R@k: every caption is a query; a hit when an image that has
  this caption text is among the top k images.
- image to text R@k: every image is a query; a hit when any of its captions
  (any caption instance with one of its caption texts) is among the top k
  captions.
- ties count against the query: a negative that scores equal to the best
  positive ranks above it, so a model that scores everything alike gets chance.
- k larger than the gallery is clamped to the gallery size, with a warning.
- linear probe: a logistic-regression classifier on the frozen image
  embeddings, scored by stratified k-fold cross-validation on the labelled
  held-out images. Its L2 penalty is chosen inside each training fold, so a
  test fold never influences the probe that scores it.

Chance levels are the expected scores of a uniformly random ranking, except
the linear probe's top-1, whose baseline is the most common class's share of
the probed images (a probe learns the class frequencies, so it beats a
uniform guess on imbalanced classes without learning anything else).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger("mmalign.eval")

DEFINITIONS = {
    "zeroshot": "top-k: the true class is among the k classes of highest cosine similarity to the image; "
    "class embeddings average the normalised prompt embeddings",
    "retrieval/t2i": "every caption is a query; hit when an image having this caption text is in the top k images",
    "retrieval/i2t": "every image is a query; hit when any of its captions is in the top k captions",
    "ties": "a negative scoring equal to the best positive ranks above it",
    "large_k": "k larger than the gallery is clamped to the gallery size",
    "linear_probe": "logistic regression on frozen image embeddings, stratified k-fold cross-validation on the "
    "labelled held-out images, L2 penalty chosen on a held-out part of each training fold",
}
# L2 penalties tried for the linear probe, weakest to strongest
PROBE_PENALTIES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# L-BFGS iterations per fit; the fits along the penalty path warm-start each other
PROBE_STEPS = 100


def clamp_k(k: int, size: int, what: str) -> int:
    if k > size:
        logger.warning("R@%d %s: the gallery has only %d items, so k is clamped to %d", k, what, size, size)
        return size
    return k


def chance_hit(total: int, positives: int, k: int) -> float:
    """Return P(at least one of ``positives`` items is in a random top ``k`` of ``total``)."""
    if positives <= 0:
        return 0.0
    if total - positives < k:
        return 1.0
    log_miss = (
        math.lgamma(total - positives + 1)
        - math.lgamma(total - positives - k + 1)
        - math.lgamma(total + 1)
        + math.lgamma(total - k + 1)
    )
    return 1.0 - math.exp(log_miss)


def class_ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return, per row of logits (N, C), how many wrong classes score at least the true class."""
    true = logits.gather(1, labels[:, None])  # (N, 1)
    return (logits >= true).sum(dim=1) - 1  # (N,)


def zeroshot_metrics(image_emb: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall, with chance levels.

    Shape:
        image_emb: (N, D) normalised; labels: (N,) class indices; classifier: (C, D) normalised.
    """
    num_classes = classifier.shape[0]
    ranks = class_ranks(image_emb.float() @ classifier.float().T, labels)  # (N,)
    top5 = min(5, num_classes)
    correct = ranks == 0
    present = labels.unique()
    per_class = torch.stack([correct[labels == label].float().mean() for label in present])
    return {
        "zeroshot/top1": correct.float().mean().item(),
        "zeroshot/top5": (ranks < top5).float().mean().item(),
        "zeroshot/mean_per_class_recall": per_class.mean().item(),
        "chance/zeroshot/top1": 1 / num_classes,
        "chance/zeroshot/top5": top5 / num_classes,
        "chance/zeroshot/mean_per_class_recall": 1 / num_classes,
    }


def positive_mask(text_ids: torch.Tensor, image_texts: list[set[int]], rows: slice) -> torch.Tensor:
    """Return a (rows, N) mask: caption t is a positive of image n when n has caption text t."""
    ids = text_ids[rows].tolist()
    mask = torch.zeros(len(ids), len(image_texts), dtype=torch.bool)
    images_of_text: dict[int, list[int]] = {}
    for image, texts in enumerate(image_texts):
        for text in texts:
            images_of_text.setdefault(text, []).append(image)
    for row, text in enumerate(ids):
        mask[row, images_of_text.get(text, [])] = True
    return mask


def retrieval_ranks(
    score_rows: Callable[[slice], torch.Tensor],
    text_ids: torch.Tensor,
    image_texts: list[set[int]],
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (t2i ranks (T,), i2t ranks (N,)): negatives scoring at least the best positive.

    ``score_rows(rows)`` returns the (rows, N) text-by-image scores of a slice of captions.
    """
    num_texts, num_images = len(text_ids), len(image_texts)
    t2i = torch.empty(num_texts, dtype=torch.long)
    best_caption = torch.full((num_images,), -math.inf)
    chunks = [slice(start, min(start + chunk, num_texts)) for start in range(0, num_texts, chunk)]

    # pass 1: text-to-image ranks, and each image's best-scoring own caption
    for rows in chunks:
        scores = score_rows(rows).float()  # (c, N)
        positives = positive_mask(text_ids, image_texts, rows)  # (c, N)
        best_image = scores.masked_fill(~positives, -math.inf).amax(dim=1)  # (c,)
        t2i[rows] = ((scores >= best_image[:, None]) & ~positives).sum(dim=1)
        best_caption = torch.maximum(best_caption, scores.masked_fill(~positives, -math.inf).amax(dim=0))

    # pass 2: image-to-text ranks against those best captions
    i2t = torch.zeros(num_images, dtype=torch.long)
    for rows in chunks:
        scores = score_rows(rows).float()  # (c, N)
        positives = positive_mask(text_ids, image_texts, rows)  # (c, N)
        i2t += ((scores >= best_caption[None, :]) & ~positives).sum(dim=0)
    return t2i, i2t


def retrieval_metrics(
    score_rows: Callable[[slice], torch.Tensor],
    caption_texts: Sequence[str],
    caption_owner: Sequence[int],
    num_images: int,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@k with chance levels (see the module docstring).

    Args:
        score_rows: returns the (rows, N) scores of a slice of the T captions against the N images.
        caption_texts: the T caption strings (equal strings are the same caption text).
        caption_owner: for each caption, the index of the image it belongs to.
        num_images: N.
    """
    text_index: dict[str, int] = {}
    text_ids = torch.tensor([text_index.setdefault(text, len(text_index)) for text in caption_texts])
    image_texts: list[set[int]] = [set() for _ in range(num_images)]
    for text_id, owner in zip(text_ids.tolist(), caption_owner, strict=True):
        image_texts[owner].add(text_id)
    t2i, i2t = retrieval_ranks(score_rows, text_ids, image_texts)

    images_per_text = torch.bincount(
        torch.tensor([text for texts in image_texts for text in texts], dtype=torch.long), minlength=len(text_index)
    )
    instances_per_text = torch.bincount(text_ids, minlength=len(text_index))
    positives_per_image = [int(sum(instances_per_text[text] for text in texts)) for texts in image_texts]
    results = {}
    for k in ks:
        k_images = clamp_k(k, num_images, "text to image")
        k_texts = clamp_k(k, len(text_ids), "image to text")
        results[f"retrieval/i2t_R@{k}"] = (i2t < k_texts).float().mean().item()
        results[f"retrieval/t2i_R@{k}"] = (t2i < k_images).float().mean().item()
        results[f"chance/retrieval/i2t_R@{k}"] = sum(
            chance_hit(len(text_ids), positives, k_texts) for positives in positives_per_image
        ) / max(1, num_images)
        results[f"chance/retrieval/t2i_R@{k}"] = sum(
            chance_hit(num_images, int(images_per_text[text]), k_images) for text in text_ids.tolist()
        ) / max(1, len(text_ids))
    return results


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit multinomial logistic regression with an L2 penalty by full-batch L-BFGS; return (weight, bias).

    ``start`` warm-starts from an earlier solution, such as the one for a stronger penalty.

    Shape:
        features: (N, D); labels: (N,) class indices below ``num_classes``; weight: (D, C); bias: (C,).
    """
    if start is None:
        start = (features.new_zeros(features.shape[1], num_classes), features.new_zeros(num_classes))
    weight, bias = (tensor.clone().requires_grad_() for tensor in start)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=PROBE_STEPS, history_size=20, line_search_fn="strong_wolfe", tolerance_change=1e-6
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight + bias, labels)
        loss = loss + weight_decay / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def probe_predict(probe: tuple[torch.Tensor, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    weight, bias = probe
    return (features @ weight + bias).argmax(dim=1)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Return a fold index per item (N,), each class dealt round-robin over the folds in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty_like(labels)
    offset = 0
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        # continuing the round-robin across classes keeps the folds' sizes within one of each other
        fold_of[members] = (torch.arange(len(members)) + offset) % folds
        offset += len(members)
    return fold_of


def linear_probe_metrics(
    features: torch.Tensor,
    labels: torch.Tensor,
    folds: int = 5,
    max_images: int = 10_000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], dict[str, int]]:
    """Cross-validated top-1 and mean per-class recall of a logistic-regression probe, with baselines.

    Every labelled image is scored once, by the probe trained on the other folds. The
    L2 penalty is chosen from ``PROBE_PENALTIES`` on a held-out part of each training
    fold, then the probe is refit on the whole training fold. Classes with fewer than
    two images cannot be split, so they are left out. Above ``max_images``, a seeded random
    subset is used. The returned details count the images and classes used and the folds run.

    Shape:
        features: (N, D) frozen embeddings; labels: (N,) class indices.
    """
    if len(labels) > max_images:
        subset = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_images]
        features, labels = features[subset], labels[subset]
    classes, counts = labels.unique(return_counts=True)
    kept = torch.isin(labels, classes[counts >= 2])
    features, labels = features[kept].float().to(device), labels[kept].to(device)
    classes, counts = labels.unique(return_counts=True)
    if len(classes) < 2:
        reason = "it needs two classes with at least two labelled images each"
        logger.warning("linear probe skipped: %s", reason)
        return {}, {"linear_probe_skipped": reason}
    # class indices 0..C-1 in the order of the classes present
    targets = torch.searchsorted(classes, labels)
    splits = min(folds, int(counts.min()))
    if splits < folds:
        logger.warning(
            "linear probe: %d folds requested, but the smallest class has %d images, so %d folds run",
            folds,
            int(counts.min()),
            splits,
        )
    fold_of = stratified_folds(targets.cpu(), splits, seed).to(device)
    predicted = torch.empty_like(targets)
    for fold in range(splits):
        train, test = fold_of != fold, fold_of == fold
        penalty, start = choose_penalty(features[train], targets[train], len(classes), seed)
        probe = fit_linear_probe(features[train], targets[train], len(classes), penalty, start)
        predicted[test] = probe_predict(probe, features[test])
    correct = predicted == targets
    per_class = torch.stack([correct[targets == index].double().mean() for index in range(len(classes))])
    results = {
        "linear_probe/top1": correct.double().mean().item(),
        "linear_probe/mean_per_class_recall": per_class.mean().item(),
        # a probe that learned only the class frequencies predicts the most common class
        "chance/linear_probe/top1": counts.max().item() / len(targets),
        "chance/linear_probe/mean_per_class_recall": 1 / len(classes),
    }
    details = {"linear_probe_images": len(targets), "linear_probe_classes": len(classes), "linear_probe_folds": splits}
    return results, details


def choose_penalty(
    features: torch.Tensor, targets: torch.Tensor, num_classes: int, seed: int
) -> tuple[float, tuple[torch.Tensor, torch.Tensor] | None]:
    """Return the L2 penalty that scores best on a stratified fifth of the data, and its fit as a warm start.

    The penalties are tried from strongest to weakest, each fit starting from the one before.
    """
    counts = targets.bincount(minlength=num_classes)
    if counts[counts > 0].min() < 2:
        return PROBE_PENALTIES[len(PROBE_PENALTIES) // 2], None
    holdout = stratified_folds(targets.cpu(), min(5, int(counts[counts > 0].min())), seed + 1).to(targets.device) == 0
    best_score, best_penalty, best_probe, probe = -1.0, PROBE_PENALTIES[-1], None, None
    for penalty in sorted(PROBE_PENALTIES, reverse=True):
        probe = fit_linear_probe(features[~holdout], targets[~holdout], num_classes, penalty, probe)
        score = (probe_predict(probe, features[holdout]) == targets[holdout]).double().mean().item()
        # on a tie the stronger penalty stays: the simpler probe that does as well
        if score > best_score:
            best_score, best_penalty, best_probe = score, penalty, probe
    return best_penalty, best_probe

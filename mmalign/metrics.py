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

Chance levels are the expected scores of a uniformly random ranking.
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
}


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

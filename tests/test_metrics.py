import json
import math
from pathlib import Path

import pytest
import torch

from mmalign.data.decode import split_captions
from mmalign.metrics import chance_hit, linear_probe_metrics, retrieval_metrics, stratified_folds, zeroshot_metrics

CASES = Path(__file__).resolve().parents[1] / "tests" / "cases"


def scores_from(matrix: list[list[float]]):
    scores = torch.tensor(matrix)
    return lambda rows: scores[rows]


def test_zeroshot_hand_computed():
    # 4 images, 3 classes; classifier is the identity so logits equal the embeddings
    classifier = torch.eye(3)
    image_emb = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # true 0, predicted 0
            [0.2, 0.7, 0.1],  # true 1, predicted 1
            [0.6, 0.3, 0.1],  # true 2, ranked third
            [0.1, 0.5, 0.4],  # true 2, ranked second
        ]
    )
    labels = torch.tensor([0, 1, 2, 2])
    result = zeroshot_metrics(image_emb, labels, classifier)
    assert result["zeroshot/top1"] == pytest.approx(0.5)
    # only 3 classes: top-5 is clamped to top-3, which every image reaches
    assert result["zeroshot/top5"] == pytest.approx(1.0)
    # per class: 1.0, 1.0, 0.0
    assert result["zeroshot/mean_per_class_recall"] == pytest.approx(2 / 3)
    assert result["chance/zeroshot/top1"] == pytest.approx(1 / 3)
    assert result["chance/zeroshot/top5"] == pytest.approx(1.0)


def test_zeroshot_ties_count_against_the_image():
    result = zeroshot_metrics(torch.ones(2, 4), torch.tensor([0, 3]), torch.eye(4))
    assert result["zeroshot/top1"] == 0.0


def test_retrieval_one_caption_each():
    # rows: captions 0..2 owned by images 0..2
    scores = [[0.9, 0.1, 0.2], [0.8, 0.3, 0.1], [0.1, 0.2, 0.7]]
    result = retrieval_metrics(scores_from(scores), ["a", "b", "c"], [0, 1, 2], 3, ks=(1, 2))
    # t2i: caption 0 -> image 0 first; caption 1 -> image 1 second; caption 2 -> first
    assert result["retrieval/t2i_R@1"] == pytest.approx(2 / 3)
    assert result["retrieval/t2i_R@2"] == pytest.approx(1.0)
    # i2t: image 0's best caption is 0 (0.9), first; image 1 column [0.1, 0.3, 0.2]: caption 1 first;
    # image 2 column [0.2, 0.1, 0.7]: caption 2 first
    assert result["retrieval/i2t_R@1"] == pytest.approx(1.0)
    assert result["chance/retrieval/t2i_R@1"] == pytest.approx(1 / 3)


def test_retrieval_repeated_caption_text_is_a_hit_for_either_image():
    # two images share the caption "a dog"; the query ranks the other dog image first
    scores = [[0.5, 0.9, 0.1], [0.5, 0.9, 0.1], [0.1, 0.2, 0.9]]
    result = retrieval_metrics(scores_from(scores), ["a dog", "a dog", "a cat"], [0, 1, 2], 3, ks=(1,))
    assert result["retrieval/t2i_R@1"] == pytest.approx(1.0)


def test_retrieval_large_k_is_clamped(caplog):
    scores = [[0.1, 0.9], [0.8, 0.2]]
    result = retrieval_metrics(scores_from(scores), ["a", "b"], [0, 1], 2, ks=(5,))
    assert result["retrieval/t2i_R@5"] == 1.0
    assert result["chance/retrieval/t2i_R@5"] == 1.0
    assert "clamped to 2" in caplog.text


def test_chance_hit_matches_enumeration():
    # 6 items, 2 positives, k=2: 1 - C(4,2)/C(6,2) = 1 - 6/15
    assert chance_hit(6, 2, 2) == pytest.approx(1 - 6 / 15)
    assert chance_hit(10, 1, 3) == pytest.approx(0.3)
    assert chance_hit(5, 3, 3) == 1.0


def test_multicaption_case_matches_expected_recalls():
    case = json.loads((CASES / "retrieval_multicaption" / "scores.json").read_text())
    expected = case["expected"]
    owner = expected["caption_owner"]
    texts = [f"caption {index}" for index in range(len(owner))]
    result = retrieval_metrics(scores_from(case["scores_text_by_image"]), texts, owner, 4, ks=(1, 2, 5))
    assert result["retrieval/t2i_R@1"] == pytest.approx(expected["text_to_image_recall@1"])
    assert result["retrieval/t2i_R@2"] == pytest.approx(expected["text_to_image_recall@2"])
    assert result["retrieval/i2t_R@1"] == pytest.approx(expected["image_to_text_recall@1"])
    assert result["retrieval/i2t_R@2"] == pytest.approx(expected["image_to_text_recall@2"])
    assert result["retrieval/i2t_R@5"] == pytest.approx(expected["image_to_text_recall@5"])
    # k=5 > 4 images: clamped to 4, so every caption finds its image
    assert result["retrieval/t2i_R@5"] == 1.0


def test_multicaption_case_captions_split_on_newline_only():
    import tarfile

    with tarfile.open(CASES / "retrieval_multicaption" / "test" / "0.tar") as tar:
        raws = [tar.extractfile(member).read() for member in tar if member.name.endswith(".txt")]
    counts = [len(split_captions(raw)[0]) for raw in raws]
    assert counts == [5, 5, 5, 5]
    naive = sum(len(raw.decode().splitlines()) for raw in raws)
    assert naive == 21


def test_chance_of_t2i_uses_gallery_size():
    scores = torch.rand(20, 4)
    owner = [index // 5 for index in range(20)]
    result = retrieval_metrics(lambda rows: scores[rows], [str(i) for i in range(20)], owner, 4, ks=(1,))
    assert result["chance/retrieval/t2i_R@1"] == pytest.approx(0.25)
    assert result["chance/retrieval/i2t_R@1"] == pytest.approx(5 / 20)
    assert not math.isnan(result["retrieval/i2t_R@1"])


def clustered(labels: torch.Tensor, noise: float, dim: int = 16) -> torch.Tensor:
    """Unit vectors around one random centre per class."""
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(int(labels.max()) + 1, dim, generator=generator)
    return torch.nn.functional.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=generator))


def test_linear_probe_separates_what_zero_shot_cannot():
    labels = torch.arange(4).repeat_interleave(30)
    features = clustered(labels, noise=0.3)
    # class embeddings that point nowhere near the clusters: zero-shot is at chance or below
    assert zeroshot_metrics(features, labels, -torch.eye(4, 16))["zeroshot/top1"] <= 0.5
    results, details = linear_probe_metrics(features, labels, folds=5)
    assert results["linear_probe/top1"] == 1.0
    assert results["linear_probe/mean_per_class_recall"] == 1.0
    assert results["chance/linear_probe/top1"] == 0.25
    assert details == {"linear_probe_images": 120, "linear_probe_classes": 4, "linear_probe_folds": 5}


def test_linear_probe_on_random_labels_stays_near_chance():
    generator = torch.Generator().manual_seed(2)
    features = torch.nn.functional.normalize(torch.randn(200, 16, generator=generator))
    labels = torch.randint(0, 4, (200,), generator=generator)
    # every image is scored by a probe that never saw it, so noise cannot be memorised into the score
    results, _ = linear_probe_metrics(features, labels, folds=5)
    assert results["linear_probe/top1"] < 0.4


def test_linear_probe_drops_classes_with_one_image():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    results, details = linear_probe_metrics(clustered(labels, noise=0.1), labels, folds=5)
    # class 2 has one image; the others have three, so three folds
    assert details == {"linear_probe_images": 6, "linear_probe_classes": 2, "linear_probe_folds": 3}
    assert results["chance/linear_probe/top1"] == 0.5
    skipped = linear_probe_metrics(torch.randn(3, 4), torch.tensor([0, 0, 1]), folds=5)
    assert skipped == ({}, {"linear_probe_skipped": "it needs two classes with at least two labelled images each"})


def test_linear_probe_baseline_is_the_majority_class(caplog):
    # 3 of 4 images in class 0: a probe that learns nothing but the frequencies scores 0.75
    labels = torch.tensor([0] * 30 + [1] * 10)
    results, details = linear_probe_metrics(torch.zeros(40, 8), labels, folds=20)
    assert results["chance/linear_probe/top1"] == 0.75
    assert results["chance/linear_probe/mean_per_class_recall"] == 0.5
    # the smallest class has 10 images, so 10 folds run, and a warning gives the reason
    assert details["linear_probe_folds"] == 10
    assert "20 folds requested, but the smallest class has 10 images" in caplog.text


def test_linear_probe_caps_the_images_used():
    labels = torch.arange(3).repeat(100)
    _, details = linear_probe_metrics(clustered(labels, noise=0.1), labels, folds=2, max_images=60)
    assert details["linear_probe_images"] == 60


def test_stratified_folds_balance_each_class():
    labels = torch.tensor([0] * 10 + [1] * 5)
    folds = stratified_folds(labels, 5, seed=0)
    for fold in range(5):
        assert (labels[folds == fold] == 0).sum() == 2
        assert (labels[folds == fold] == 1).sum() == 1

"""The Python API: load, encode, zero-shot labels, and the embedding index."""

import json

import pytest
import torch
from PIL import Image

import mmalign
from mmalign.data.decode import SampleError
from mmalign.index import (
    EmbeddingIndex,
    IndexFolderError,
    build_index,
    faiss_index,
    measured_recall,
    search_parameter,
    set_search_parameter,
    tune_search,
)
from tests.helpers import encode, shape_image


def test_public_surface():
    assert set(mmalign.__all__) == {"DEFAULT_TEMPLATES", "AlignedModel", "InfoNCELoss", "load"}


def test_encode_accepts_paths_bytes_pil_and_tensors(tiny_run, tmp_path):
    model = mmalign.load(tiny_run, device="cpu")
    image = shape_image("red", "circle", 32)
    path = tmp_path / "circle.png"
    image.save(path)
    from_path = model.encode_images([str(path)])
    from_bytes = model.encode_images([encode(image, "PNG")])
    from_pil = model.encode_images([image])
    from_tensor = model.encode_images(model.preprocess(image)[None])
    for embeddings in (from_path, from_bytes, from_pil, from_tensor):
        assert embeddings.shape == (1, model.embedding_dim)
        assert embeddings.dtype == torch.float32
        assert torch.allclose(embeddings, from_path, atol=1e-5)
    assert torch.allclose(from_path.norm(dim=-1), torch.ones(1), atol=1e-5)
    texts = model.encode_texts(["a red circle", "a blue square", "a green cross"])
    assert texts.shape == (3, model.embedding_dim)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_encode_batches_large_inputs(tiny_run):
    model = mmalign.load(tiny_run, device="cpu")
    images = [shape_image("blue", "square", 32)] * 10
    assert torch.allclose(
        model.encode_images(images, batch_size=3), model.encode_images(images, batch_size=10), atol=1e-5
    )


def test_zero_shot_ranks_and_sums_to_one(tiny_run):
    model = mmalign.load(tiny_run, device="cpu")
    labels = ["red circle", "blue square", "green triangle", "black cross"]
    results = model.zero_shot([shape_image("red", "circle"), shape_image("blue", "square")], labels)
    assert len(results) == 2
    for ranked in results:
        assert sorted(label for label, _ in ranked) == sorted(labels)
        probabilities = [probability for _, probability in ranked]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert probabilities == sorted(probabilities, reverse=True)
    top = model.zero_shot([shape_image("red", "circle")], labels, templates=["a {}"], top_k=2)[0]
    assert len(top) == 2


def test_zero_shot_probabilities_are_softmax_of_scores(tiny_run):
    model = mmalign.load(tiny_run, device="cpu")
    labels = ["red circle", "blue square"]
    image = shape_image("red", "circle")
    scores = model.scores([image], labels)
    expected = scores.softmax(dim=1)[0]
    ranked = dict(model.zero_shot([image], labels)[0])
    assert ranked["red circle"] == pytest.approx(float(expected[0]), rel=1e-5)


def test_zero_shot_rejects_bad_labels_and_templates(tiny_run):
    model = mmalign.load(tiny_run, device="cpu")
    image = shape_image("red", "circle")
    with pytest.raises(ValueError, match="non-empty strings"):
        model.zero_shot([image], [])
    with pytest.raises(TypeError, match="list of strings"):
        model.zero_shot([image], "red circle")
    with pytest.raises(ValueError, match="exactly one"):
        model.zero_shot([image], ["a"], templates=["no placeholder"])


def test_undecodable_image_raises_with_reason(tiny_run, tmp_path):
    model = mmalign.load(tiny_run, device="cpu")
    with pytest.raises(SampleError) as error:
        model.encode_images([b"not an image"])
    assert error.value.reason == "not_an_image"
    with pytest.raises(FileNotFoundError):
        model.encode_images([str(tmp_path / "missing.jpg")])
    model.max_pixels = 100
    with pytest.raises(SampleError, match="too_many_pixels"):
        model.encode_images([Image.new("RGB", (20, 20))])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an mmalign model folder"):
        mmalign.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        mmalign.load("mm-test", weights=tmp_path / "nope.safetensors")


def test_load_model_file_of_saved_folder(tiny_run):
    model = mmalign.load(tiny_run / "model.safetensors", device="cpu")
    reference = mmalign.load(tiny_run, device="cpu")
    image = shape_image("green", "cross")
    assert torch.allclose(model.encode_images([image]), reference.encode_images([image]))


def test_load_architecture_with_weights_file(tiny_run):
    model = mmalign.load("mm-test", weights=tiny_run / "model.safetensors", device="cpu")
    reference = mmalign.load(tiny_run, device="cpu")
    image = shape_image("green", "cross")
    assert torch.allclose(model.encode_images([image]), reference.encode_images([image]), atol=1e-5)


def test_training_built_an_index(tiny_run):
    info = json.loads((tiny_run / "index" / "index.json").read_text())
    assert info["images"] == 24
    assert info["texts"] == 24
    assert info["search"] == "exact"


def test_index_search_by_text_and_image(tiny_run):
    index = EmbeddingIndex(tiny_run / "index")
    hits = index.search_text("a red circle", k=5)
    assert len(hits) == 5
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert hits[0].thumbnail.size[0] > 0
    assert hits[0].captions
    captions = index.search_image(shape_image("red", "circle"), k=3)
    assert len(captions) == 3
    assert all(hit.text for hit in captions)
    with pytest.raises(ValueError, match="empty"):
        index.search_text("  ")
    assert len(index.search_text("a red circle", k=500)) == 24


def test_index_build_resumes_and_checks_model(tiny_run, tmp_path, monkeypatch):
    import mmalign.index as index_module

    shards = str(tiny_run.parent.parent / "train-{000..001}.tar")
    out = tmp_path / "index"
    real_embed = index_module.embed_shard
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(index_module, "embed_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(tiny_run, shards, out, progress=False)
    assert (out / "parts" / "000000.json").is_file()

    # the second build embeds only the shard the first one did not finish
    calls.clear()
    info = build_index(tiny_run, shards, out, progress=False)
    assert [url.rsplit("/", 1)[1] for url in calls] == ["train-001.tar"]
    assert info["images"] == 96
    assert not (out / "parts").exists()

    # a finished index is not replaced by accident
    with pytest.raises(IndexFolderError, match=r"already contains an index.*--overwrite"):
        build_index(tiny_run, shards, out, progress=False)

    (out / "parts").mkdir()
    (out / "parts" / "_model.json").write_text(json.dumps({"model": "other", "fingerprint": "0" * 16}))
    with pytest.raises(IndexFolderError, match="another model"):
        build_index(tiny_run, shards, out, progress=False, overwrite=True)


def test_approximate_index_reports_recall(tiny_run, tmp_path):
    pytest.importorskip("faiss")
    shards = json.loads((tiny_run / "index" / "index.json").read_text())["shards"]
    info = build_index(tiny_run, shards, tmp_path / "ann", approximate="always", ann_kind="hnsw", progress=False)
    assert info["search"] == "faiss-hnsw"
    assert 0.0 <= info["images_recall@10"] <= 1.0
    assert info["images_recall@10"] > 0.9
    assert info["images_efSearch"] >= 16
    index = EmbeddingIndex(tmp_path / "ann")
    assert len(index.search_text("a blue square", k=4)) == 4
    # the tuned setting travels in the index file
    assert index.faiss["images"].hnsw.efSearch == info["images_efSearch"]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_search_tuned_to_smallest_setting(kind):
    faiss = pytest.importorskip("faiss")
    faiss.omp_set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(4000, 32, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(200, 32, generator=generator), dim=1)
    index = faiss_index(gallery, kind)

    value = tune_search(index, gallery, queries, target=0.99)

    assert search_parameter(index) == ("efSearch" if kind == "hnsw" else "nprobe", value)
    assert measured_recall(index, gallery, queries) >= 0.99
    smallest = 16 if kind == "hnsw" else 1
    if value > smallest:
        set_search_parameter(index, value // 2)
        assert measured_recall(index, gallery, queries) < 0.99


def test_ann_recall_target_is_validated(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="ann_recall"):
        build_index(tiny_run, "unused.tar", tmp_path / "ann", ann_recall=1.5, progress=False)


def test_missing_index_folder_is_explained(tmp_path):
    with pytest.raises(IndexFolderError, match="mmalign index build"):
        EmbeddingIndex(tmp_path)

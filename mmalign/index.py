"""An embedding index of shards: every image and caption embedded by a trained model, searchable.

    mmalign index build --model runs/emoji-tiny --shards 'shards/val-{000..001}.tar' --out runs/emoji-tiny/index
    mmalign index search runs/emoji-tiny/index --text "a red heart"

An index folder holds:

- ``index.json``: the model, the shards, counts, the search kind and measured recall;
- ``image_embeddings.safetensors`` (N, D) and ``text_embeddings.safetensors`` (T, D);
- ``items.jsonl``: per image its key, shard, captions and where its thumbnail is;
- ``texts.jsonl``: per caption its text and the image it belongs to;
- ``thumbnails.bin``: JPEG thumbnails, one after another;
- ``images.faiss`` and ``texts.faiss`` when an approximate (FAISS) index was built;
- ``parts/``: one file set per shard while building, so an interrupted build resumes.

Search is exact (a matrix product) below ``ann_threshold`` items and approximate
with FAISS (HNSW or IVF, inner product on normalised embeddings) above it. The
approximate index's search setting (HNSW efSearch or IVF nprobe) is tuned to reach
a target recall@10 against exact search, and the recall reached is measured on
other queries and stored in ``index.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mmalign.api import AlignedModel, ImageInput, load
from mmalign.data.decode import SampleError
from mmalign.data.reader import FieldSpec, RawSample, ShardTruncated, check_urls, iter_shard
from mmalign.data.report import DataReport
from mmalign.data.sample import decode_sample
from mmalign.model import MODEL_WEIGHTS

logger = logging.getLogger("mmalign.index")
INDEX_FILE = "index.json"
THUMBNAIL_SIDE = 128


class IndexFolderError(RuntimeError):
    """An index folder that is missing, incomplete or built with another model."""


@dataclass
class ImageHit:
    """A search result image: its position, score, key, captions and thumbnail."""

    index: int
    score: float
    key: str
    shard: str
    captions: list[str]
    thumbnail: Image.Image


@dataclass
class TextHit:
    """A search result caption: its text, score and the key of the image it describes."""

    index: int
    score: float
    text: str
    image_key: str


def model_fingerprint(model_dir: Path) -> str:
    digest = hashlib.sha256()
    with (model_dir / MODEL_WEIGHTS).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def thumbnail_bytes(image: Image.Image, side: int) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((side, side))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def embed_shard(
    model: AlignedModel, url: str, fields: FieldSpec, batch_size: int, side: int, report: DataReport
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], bytes]:
    """Embed one shard; return its tensors, its items and its thumbnails."""
    items: list[dict[str, Any]] = []
    thumbs = bytearray()
    images, image_chunks, captions = [], [], []
    for sample in iter_shard(url, fields):
        if isinstance(sample, ShardTruncated):
            report.truncated(sample)
            break
        if not isinstance(sample, RawSample):
            continue
        report.read += 1
        try:
            decoded = decode_sample(sample, fields, model.max_pixels)
        except SampleError as error:
            report.skip(error.reason, url, sample.key, error.detail)
            continue
        report.used += 1
        thumb = thumbnail_bytes(decoded.image.image, side)
        items.append(
            {"key": sample.key, "shard": url, "captions": decoded.captions, "thumb": [len(thumbs), len(thumb)]}
        )
        thumbs.extend(thumb)
        images.append(decoded.image.image)
        captions.extend(decoded.captions)
        if len(images) == batch_size:
            image_chunks.append(model.encode_images(images, progress=False))
            images = []
    if images:
        image_chunks.append(model.encode_images(images, progress=False))
    tensors = {
        "images": torch.cat(image_chunks) if image_chunks else torch.empty(0, model.embedding_dim),
        "texts": model.encode_texts(captions, progress=False) if captions else torch.empty(0, model.embedding_dim),
    }
    return tensors, items, bytes(thumbs)


def build_index(
    model_path: str | Path,
    shards: str | list[str],
    out: str | Path,
    fields: FieldSpec | None = None,
    batch_size: int = 64,
    approximate: str = "auto",
    ann_threshold: int = 100_000,
    ann_kind: str = "hnsw",
    ann_recall: float = 0.95,
    thumbnail_side: int = THUMBNAIL_SIDE,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Embed every image and caption of ``shards`` with the model at ``model_path`` into ``out``.

    Shards already embedded into ``out/parts`` by an interrupted build with the same
    model are not embedded again.

    Raises:
        IndexFolderError: ``out`` already contains an index (and ``overwrite`` is not set),
            or parts embedded by a different model.
        ShardError: a shard is missing or unreadable.
    """
    if approximate not in ("auto", "never", "always") or ann_kind not in ("hnsw", "ivf"):
        raise ValueError(
            f"approximate must be auto, never or always and ann_kind hnsw or ivf; got {approximate}, {ann_kind}"
        )
    if not 0.0 < ann_recall <= 1.0:
        raise ValueError(f"ann_recall is a target recall@10 in (0, 1]; got {ann_recall}")
    urls = check_urls(shards, "--shards")
    out = Path(out)
    if (out / INDEX_FILE).is_file() and not overwrite:
        raise IndexFolderError(
            f"{out} already contains an index; pass --overwrite to replace it or choose another --out"
        )
    fields = fields or FieldSpec()
    model_dir = Path(model_path).resolve()
    fingerprint = model_fingerprint(model_dir)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    meta_path = parts / "_model.json"
    if meta_path.exists() and json.loads(meta_path.read_text())["fingerprint"] != fingerprint:
        raise IndexFolderError(f"{out} contains embeddings from another model; delete {parts} or choose another --out")
    meta_path.write_text(json.dumps({"model": str(model_dir), "fingerprint": fingerprint}))

    model = load(model_dir, device=device)
    report = DataReport()
    for number, url in enumerate(tqdm(urls, desc="index", unit="shard", disable=not progress)):
        stem = parts / f"{number:06d}"
        part = stem.with_suffix(".json")
        # a part is reused only if it was embedded from the same shard
        if part.is_file() and json.loads(part.read_text(encoding="utf-8"))["url"] == url:
            continue
        tensors, items, thumbs = embed_shard(model, url, fields, batch_size, thumbnail_side, report)
        save_file(tensors, str(stem.with_suffix(".safetensors")))
        stem.with_suffix(".thumbs").write_bytes(thumbs)
        # written last: a part with its .json is complete
        stem.with_suffix(".json").write_text(json.dumps({"url": url, "items": items}))
    return merge_parts(out, urls, model_dir, fingerprint, report, approximate, ann_threshold, ann_kind, ann_recall)


def merge_parts(
    out: Path,
    urls: list[str],
    model_dir: Path,
    fingerprint: str,
    report: DataReport,
    approximate: str,
    ann_threshold: int,
    ann_kind: str,
    ann_recall: float,
) -> dict[str, Any]:
    """Concatenate the per-shard parts into the final index files."""
    parts = out / "parts"
    image_chunks, text_chunks = [], []
    with (
        (out / "items.jsonl").open("w", encoding="utf-8") as items_file,
        (out / "texts.jsonl").open("w", encoding="utf-8") as texts_file,
        (out / "thumbnails.bin").open("wb") as thumbs_file,
    ):
        image_count = 0
        for number in range(len(urls)):
            stem = parts / f"{number:06d}"
            tensors = load_file(str(stem.with_suffix(".safetensors")))
            image_chunks.append(tensors["images"])
            text_chunks.append(tensors["texts"])
            base = thumbs_file.tell()
            thumbs_file.write(stem.with_suffix(".thumbs").read_bytes())
            for item in json.loads(stem.with_suffix(".json").read_text())["items"]:
                item["thumb"][0] += base
                items_file.write(json.dumps(item, ensure_ascii=False) + "\n")
                for caption in item["captions"]:
                    texts_file.write(json.dumps({"text": caption, "image": image_count}, ensure_ascii=False) + "\n")
                image_count += 1
    image_emb, text_emb = torch.cat(image_chunks), torch.cat(text_chunks)
    if not len(image_emb):
        raise IndexFolderError(f"no usable sample in {urls}: {report.summary()}; no index was written")
    save_file({"embeddings": image_emb.contiguous()}, str(out / "image_embeddings.safetensors"))
    save_file({"embeddings": text_emb.contiguous()}, str(out / "text_embeddings.safetensors"))
    info: dict[str, Any] = {
        "model": str(model_dir),
        "model_fingerprint": fingerprint,
        "shards": urls,
        "images": int(image_emb.shape[0]),
        "texts": int(text_emb.shape[0]),
        "embedding_dim": int(image_emb.shape[1]) if image_emb.numel() else 0,
        "search": "exact",
        "data": report.to_dict(),
    }
    use_ann = approximate == "always" or (approximate == "auto" and max(len(image_emb), len(text_emb)) >= ann_threshold)
    if use_ann and len(image_emb):
        info.update(build_faiss(out, image_emb, text_emb, ann_kind, ann_recall))
    (out / INDEX_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(parts)
    logger.info(
        "index of %d images and %d captions written to %s (%s search)",
        info["images"],
        info["texts"],
        out,
        info["search"],
    )
    return info


def faiss_index(embeddings: torch.Tensor, kind: str):
    """Build an inner-product FAISS index (HNSW, or IVF with about 4 sqrt(N) lists) over normalised rows."""
    import faiss

    data = embeddings.float().numpy()
    dim = data.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        lists = max(1, min(len(data) // 39, int(4 * math.sqrt(len(data)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(data)
        index.nprobe = max(1, lists // 8)
    index.add(data)
    return index


def search_parameter(index) -> tuple[str, int]:
    """Return the name and value of the search setting that trades an index's speed for recall."""
    if hasattr(index, "hnsw"):
        return "efSearch", int(index.hnsw.efSearch)
    return "nprobe", int(index.nprobe)


def set_search_parameter(index, value: int) -> None:
    """Set efSearch (HNSW) or nprobe (IVF), which faiss.write_index stores with the index."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = value
    else:
        index.nprobe = value


def tune_search(index, embeddings: torch.Tensor, queries: torch.Tensor, target: float) -> int:
    """Set the smallest power-of-two efSearch or nprobe whose recall@10 on ``queries`` reaches ``target``.

    Returns the value set. When no value reaches the target, the largest tried is kept:
    1,024 for HNSW, every list for IVF (which then searches exhaustively).
    """
    name, _ = search_parameter(index)
    largest = 1024 if name == "efSearch" else int(index.nlist)
    value = 16 if name == "efSearch" else 1
    while True:
        set_search_parameter(index, min(value, largest))
        if value >= largest or measured_recall(index, embeddings, queries) >= target:
            return min(value, largest)
        value *= 2


def measured_recall(index, embeddings: torch.Tensor, queries: torch.Tensor, k: int = 10) -> float:
    """Recall@k of an approximate index against exact search, over the given queries."""
    k = min(k, len(embeddings))
    exact = (queries @ embeddings.T).topk(k, dim=1).indices  # (Q, k)
    _, approximate = index.search(queries.float().numpy(), k)
    hits = sum(
        len(set(row_exact.tolist()) & set(row_approx.tolist()))
        for row_exact, row_approx in zip(exact, approximate, strict=True)
    )
    return hits / (len(queries) * k)


def build_faiss(
    out: Path, image_emb: torch.Tensor, text_emb: torch.Tensor, kind: str, target_recall: float = 0.95
) -> dict[str, Any]:
    """Write images.faiss and texts.faiss; return their kind, search settings and measured recall@10.

    The search setting (efSearch or nprobe) is tuned on up to 500 queries to reach
    ``target_recall``, and the recall is then measured on up to 500 other queries.
    """
    try:
        import faiss
    except ImportError:
        logger.warning("faiss is not installed (pip install 'mmalign[index]'); the index uses exact search")
        return {}
    generator = torch.Generator().manual_seed(0)
    result: dict[str, Any] = {"search": f"faiss-{kind}"}
    for name, embeddings, queries in (("images", image_emb, text_emb), ("texts", text_emb, image_emb)):
        index = faiss_index(embeddings, kind)
        sample = queries[torch.randperm(len(queries), generator=generator)[:1000]]
        # tuned and measured on different queries, so the recall reported is not flattered by the tuning
        half = max(1, len(sample) // 2)
        tuning, held_out = sample[:half], sample[half:] if len(sample) > 1 else sample
        value = tune_search(index, embeddings, tuning, target_recall)
        faiss.write_index(index, str(out / f"{name}.faiss"))
        parameter, _ = search_parameter(index)
        result[f"{name}_{parameter}"] = value
        result[f"{name}_recall@10"] = round(measured_recall(index, embeddings, held_out), 4)
    return result


class EmbeddingIndex:
    """A built index, searchable by text (images) or by image (captions)."""

    def __init__(self, folder: str | Path, model: AlignedModel | None = None, device: str | None = None) -> None:
        folder = Path(folder)
        if not (folder / INDEX_FILE).is_file():
            raise IndexFolderError(
                f"no index in {folder} ({INDEX_FILE} missing); build one with "
                "`mmalign index build --model RUN --shards PATTERN --out DIR`"
            )
        self.folder = folder
        self.info = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        self.model = model or load(self.info["model"], device=device)
        self.image_emb = load_file(str(folder / "image_embeddings.safetensors"))["embeddings"]
        self.text_emb = load_file(str(folder / "text_embeddings.safetensors"))["embeddings"]
        self.items = [json.loads(line) for line in (folder / "items.jsonl").open(encoding="utf-8")]
        self.texts = [json.loads(line) for line in (folder / "texts.jsonl").open(encoding="utf-8")]
        self.faiss = {}
        if self.info["search"].startswith("faiss"):
            import faiss

            # the index files keep the tuned efSearch or nprobe
            self.faiss = {name: faiss.read_index(str(folder / f"{name}.faiss")) for name in ("images", "texts")}

    def _top(self, name: str, embeddings: torch.Tensor, query: torch.Tensor, k: int) -> list[tuple[int, float]]:
        k = max(1, min(k, len(embeddings)))
        if name in self.faiss:
            scores, indices = self.faiss[name].search(query.float().numpy(), k)
            return [(int(i), float(s)) for i, s in zip(indices[0], scores[0], strict=True) if i >= 0]
        scores, indices = (embeddings @ query[0]).topk(k)
        return list(zip(indices.tolist(), scores.tolist(), strict=True))

    def thumbnail(self, index: int) -> Image.Image:
        offset, length = self.items[index]["thumb"]
        with (self.folder / "thumbnails.bin").open("rb") as handle:
            handle.seek(offset)
            return Image.open(io.BytesIO(handle.read(length))).convert("RGB")

    def search_text(self, query: str, k: int = 10) -> list[ImageHit]:
        """Return the k images closest to a text query, best first (scores are cosine similarities)."""
        if not query or not query.strip():
            raise ValueError("the text query is empty")
        embedding = self.model.encode_texts([query.strip()], progress=False)  # (1, D)
        return [
            ImageHit(i, s, self.items[i]["key"], self.items[i]["shard"], self.items[i]["captions"], self.thumbnail(i))
            for i, s in self._top("images", self.image_emb, embedding, k)
        ]

    def search_image(self, image: ImageInput, k: int = 10) -> list[TextHit]:
        """Return the k captions closest to an image, best first (scores are cosine similarities)."""
        embedding = self.model.encode_images([image], progress=False)  # (1, D)
        hits = []
        for i, s in self._top("texts", self.text_emb, embedding, k):
            owner = self.texts[i]["image"]
            hits.append(TextHit(i, s, self.texts[i]["text"], self.items[owner]["key"]))
        return hits

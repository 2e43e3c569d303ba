"""The mmalign web demo: zero-shot classification, text-to-image and image-to-text search.

    mmalign demo --model runs/emoji-tiny [--index runs/emoji-tiny/index]

It uses only mmalign's public API (``mmalign.load``, ``AlignedModel.zero_shot``)
and the embedding index (``mmalign.index.EmbeddingIndex``). Every handler turns
bad input into a ``gr.Error`` whose message the page shows; nothing a user
uploads or types can stop the server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from mmalign.api import DEFAULT_TEMPLATES, AlignedModel, is_template
from mmalign.data.decode import SampleError, decode_image
from mmalign.index import EmbeddingIndex

logger = logging.getLogger("mmalign.demo")
MAX_UPLOAD = "20mb"


class Demo:
    """The handlers behind the three tabs, with their input limits."""

    def __init__(
        self, model: AlignedModel, index: EmbeddingIndex | None, max_labels: int = 100, max_results: int = 50
    ) -> None:
        self.model = model
        self.index = index
        self.max_labels = max_labels
        self.max_results = max_results

    def read_image(self, path: str | None):
        """Decode an uploaded file with mmalign's decoder, or raise gr.Error saying what is wrong."""
        if not path:
            raise gr.Error("No image: upload an image file first.")
        data = Path(path).read_bytes()
        try:
            return decode_image(data, self.model.max_pixels).image
        except SampleError as error:
            messages = {
                "too_many_pixels": (
                    f"The image has too many pixels (the limit is {self.model.max_pixels:,}). Upload a smaller image."
                ),
                "not_an_image": f"{Path(path).name} is not an image file (JPEG, PNG, WebP, ...).",
                "empty_image": f"{Path(path).name} is empty.",
                "truncated_image": f"{Path(path).name} is cut short (truncated); upload the complete file.",
            }
            raise gr.Error(messages.get(error.reason, f"{Path(path).name} cannot be read: {error}")) from None

    def parse_labels(self, text: str) -> list[str]:
        labels = [part.strip() for line in (text or "").splitlines() for part in line.split(",")]
        # a label typed twice is kept once, so it does not count twice in the probabilities
        labels = list(dict.fromkeys(label for label in labels if label))
        if not labels:
            raise gr.Error("No labels: type at least one label, separated by commas or new lines.")
        if len(labels) > self.max_labels:
            raise gr.Error(f"{len(labels)} labels given; the limit is {self.max_labels} (--max-labels).")
        return labels

    @staticmethod
    def parse_templates(text: str) -> list[str]:
        templates = [line.strip() for line in (text or "").splitlines() if line.strip()]
        bad = [template for template in templates if not is_template(template)]
        if bad:
            raise gr.Error(
                f"Each template needs exactly one {{}} where the label goes, and no other braces; check: {bad[0]!r}"
            )
        return templates or list(DEFAULT_TEMPLATES)

    def classify(self, path: str | None, labels_text: str, templates_text: str):
        """Tab 1: rank the labels for the uploaded image."""
        image = self.read_image(path)
        labels = self.parse_labels(labels_text)
        templates = self.parse_templates(templates_text)
        ranked = self.model.zero_shot([image], labels, templates)[0]
        return {label: probability for label, probability in ranked}, image

    def need_index(self) -> EmbeddingIndex:
        if self.index is None:
            raise gr.Error(
                "No index is loaded, so there is nothing to search. Build one with `mmalign index build "
                "--model RUN --shards PATTERN --out DIR` and restart the demo with --index DIR."
            )
        return self.index

    def text_to_image(self, query: str, k: float):
        """Tab 2: the images of the index closest to a text query."""
        index = self.need_index()
        if not query or not query.strip():
            raise gr.Error("The query is empty: type what to look for.")
        hits = index.search_text(query, self.clamp(k))
        return [(hit.thumbnail, f"{hit.score:.3f}  {' | '.join(hit.captions)}") for hit in hits]

    def image_to_text(self, path: str | None, k: float):
        """Tab 3: the captions of the index closest to an uploaded image."""
        index = self.need_index()
        image = self.read_image(path)
        hits = index.search_image(image, self.clamp(k))
        return [[rank, round(hit.score, 4), hit.text, hit.image_key] for rank, hit in enumerate(hits, 1)], image

    def clamp(self, k: float) -> int:
        return max(1, min(int(k or 1), self.max_results))


def build_app(demo: Demo) -> gr.Blocks:
    """Lay out the three tabs and wire them to the handlers (each also an API endpoint)."""
    index_note = (
        f"Index: {demo.index.info['images']} images, {demo.index.info['texts']} captions."
        if demo.index is not None
        else "No index loaded: the search tabs need `--index DIR`."
    )
    with gr.Blocks(title="mmalign demo") as app:
        gr.Markdown(f"# mmalign demo\n{index_note}")
        with gr.Tab("Zero-shot classification"):
            with gr.Row():
                with gr.Column():
                    upload = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="classify-image")
                    labels = gr.Textbox(label="Labels (comma or newline separated)", lines=3, elem_id="labels")
                    templates = gr.Textbox(
                        label="Prompt templates (optional, one per line, {} marks the label)",
                        lines=2,
                        placeholder="\n".join(DEFAULT_TEMPLATES),
                    )
                    classify = gr.Button("Classify", variant="primary", elem_id="classify-button")
                with gr.Column():
                    ranked = gr.Label(label="Ranked labels", num_top_classes=10, elem_id="ranked-labels")
                    seen = gr.Image(label="What the model saw", height=192)
            classify.click(demo.classify, [upload, labels, templates], [ranked, seen], api_name="classify")
        with gr.Tab("Text to image"):
            query = gr.Textbox(label="Query", elem_id="query")
            k_images = gr.Slider(1, demo.max_results, value=12, step=1, label="Results")
            search = gr.Button("Search", variant="primary")
            gallery = gr.Gallery(label="Closest images", columns=6, height="auto")
            search.click(demo.text_to_image, [query, k_images], gallery, api_name="text_to_image")
        with gr.Tab("Image to text"):
            with gr.Row():
                with gr.Column():
                    query_image = gr.File(label="Image", file_types=["image"], type="filepath")
                    k_texts = gr.Slider(1, demo.max_results, value=10, step=1, label="Results")
                    describe = gr.Button("Find captions", variant="primary")
                with gr.Column():
                    captions = gr.Dataframe(headers=["rank", "score", "caption", "image key"], label="Closest captions")
                    seen_query = gr.Image(label="What the model saw", height=192)
            describe.click(demo.image_to_text, [query_image, k_texts], [captions, seen_query], api_name="image_to_text")
    return app


def launch(app: gr.Blocks, host: str, port: int | None, share: bool, block: bool = True) -> str:
    """Start the server; return its local URL. The server binds only to ``host`` (127.0.0.1 by default)."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_UPLOAD,
        prevent_thread_lock=not block,
        show_error=True,
        # Gradio's own start-up lines suggest launch() arguments; mmalign demo logs the URL itself
        quiet=True,
        theme=theme,
    )
    return app.local_url

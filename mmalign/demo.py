"""``mmalign demo``: start the Gradio app in ``demos/app.py`` for a trained model.

The app ships with the source checkout (``demos/`` beside the package); this
module only parses options, loads the model and index, and starts the server.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

logger = logging.getLogger("mmalign.demo")
APP_PATH = Path(__file__).resolve().parent.parent / "demos" / "app.py"


def load_app_module() -> ModuleType:
    """Import demos/app.py from the checkout this package lives in."""
    if not APP_PATH.is_file():
        raise FileNotFoundError(
            f"the demo app {APP_PATH} is not there; the demo runs from a source checkout of mmalign "
            "(git clone, then pip install -e '.[demo]')"
        )
    if importlib.util.find_spec("gradio") is None:
        raise FileNotFoundError(
            "the demo needs gradio: pip install -e '.[demo]' (into the environment mmalign runs in)"
        )
    spec = importlib.util.spec_from_file_location("mmalign_demo_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mmalign demo", description="Web demo: zero-shot labels and search.")
    parser.add_argument("--model", required=True, help="run directory or model folder")
    parser.add_argument("--index", type=Path, help="index folder (default: MODEL/index when it exists)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--max-labels", type=int, default=100, help="most labels accepted in one request")
    parser.add_argument("--max-pixels", type=int, default=25_000_000, help="largest image accepted, in pixels")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    return parser.parse_args(argv)


def create_demo(
    model_path: str | Path,
    index_path: str | Path | None = None,
    max_labels: int = 100,
    max_pixels: int = 25_000_000,
    device: str | None = None,
):
    """Load the model (and the index, if any); return (app module, Demo handlers, Gradio Blocks)."""
    from mmalign.api import load
    from mmalign.index import EmbeddingIndex

    module = load_app_module()
    model = load(model_path, device=device)
    model.max_pixels = max_pixels
    if index_path is None and (Path(model_path) / "index" / "index.json").is_file():
        index_path = Path(model_path) / "index"
    index = EmbeddingIndex(index_path, model=model) if index_path is not None else None
    handlers = module.Demo(model, index, max_labels=max_labels)
    return module, handlers, module.build_app(handlers)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmalign demo``; blocks while the server runs."""
    from mmalign.index import IndexFolderError

    args = parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost") or args.share:
        logger.warning("the demo will be reachable from other machines (--host %s, --share %s)", args.host, args.share)
    try:
        module, _, app = create_demo(args.model, args.index, args.max_labels, args.max_pixels, args.device)
    except (FileNotFoundError, IndexFolderError) as error:
        logger.error("%s", error)
        return 2
    logger.info("starting the demo on http://%s:%d (Ctrl-C stops it)", args.host, args.port)
    try:
        module.launch(app, args.host, args.port, args.share, block=True)
    except OSError as error:
        logger.error("cannot start the server on %s:%d: %s; choose another --port", args.host, args.port, error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

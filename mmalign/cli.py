"""The ``mmalign`` command: train, eval, shards, index and demo subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = """usage: mmalign COMMAND [ARGS]

commands:
  train            train a model:             mmalign train [--config FILE] [key=value ...]
  eval             score a trained model:     mmalign eval --model RUN_DIR [key=value ...]
  shards build     write shards from images:  mmalign shards build INPUT --out DIR
  shards verify    check every sample:        mmalign shards verify PATTERN [--json]
  shards inspect   summarise shards:          mmalign shards inspect PATTERN [--sheet FILE.png]
  index build      embed shards for search:   mmalign index build --model RUN --shards PATTERN --out DIR
  index search     search an index:           mmalign index search DIR --text QUERY | --image FILE
  demo             web demo (Gradio):         mmalign demo --model RUN [--index DIR]

Run `mmalign COMMAND --help` for the options of a command.
"""


def add_field_options(parser: argparse.ArgumentParser, caption_default: str | None = "txt") -> None:
    parser.add_argument("--image-keys", default="jpg,jpeg,png,webp", help="image member suffixes, comma-separated")
    parser.add_argument(
        "--caption-key",
        default=caption_default,
        help="caption member suffix, or json:FIELD" + ("" if caption_default else " (default: the run's, else txt)"),
    )
    parser.add_argument("--caption-json-field", help="KEY.json field used when the caption member is missing")
    parser.add_argument("--max-pixels", type=int, default=25_000_000, help="pixel cap per image")


def field_spec(args: argparse.Namespace):
    from mmalign.data.reader import FieldSpec

    return FieldSpec(
        image_keys=tuple(key.strip().lower() for key in args.image_keys.split(",") if key.strip()),
        caption_key=args.caption_key.lower(),
        caption_json_field=args.caption_json_field,
    )


def train_parser() -> argparse.ArgumentParser:
    """Build the parser of ``mmalign train``, kept here so that ``--help`` returns before torch is imported."""
    parser = argparse.ArgumentParser(
        prog="mmalign train",
        description="Train an image-text model with the symmetric InfoNCE loss.",
        epilog="Overrides are dotted config keys, e.g. optim.lr=5e-4 train.steps=200 run.resume=auto",
    )
    parser.add_argument("--config", help="YAML or TOML config file (default: the shipped emoji-tiny config)")
    parser.add_argument("overrides", nargs="*", help="section.key=value pairs applied over the config")
    return parser


def eval_parser() -> argparse.ArgumentParser:
    """Build the parser of ``mmalign eval``."""
    parser = argparse.ArgumentParser(
        prog="mmalign eval",
        description="Zero-shot classification and retrieval recall of a trained model on held-out shards.",
        epilog="Overrides are dotted config keys, e.g. eval.shards=shards/val-{000..001}.tar eval.recall_k=[1,5]",
    )
    parser.add_argument("--model", required=True, help="run directory or model folder written by mmalign train")
    parser.add_argument("--config", help="config file for the eval and data sections (default: the run's config.yaml)")
    parser.add_argument("--output", help="folder for eval.json (default: the model folder)")
    parser.add_argument("overrides", nargs="*", help="section.key=value pairs")
    return parser


def shards_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign shards", description="Build, verify and inspect WebDataset shards.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="write shards from a folder, a table or other shards")
    build.add_argument("input", help="image folder, .csv/.tsv/.jsonl/.parquet file, or shards (folder or pattern)")
    build.add_argument("--out", required=True, type=Path, help="output folder")
    build.add_argument("--format", default="auto", choices=["auto", "folder", "csv", "jsonl", "parquet", "shards"])
    build.add_argument("--image-column", help="table column with image paths (default: image, path, file, ...)")
    build.add_argument("--caption-column", help="table column with captions (default: caption, text, ...)")
    build.add_argument(
        "--delimiter", help="CSV delimiter (default: tab for .tsv, else whichever of , TAB ; | splits the header most)"
    )
    build.add_argument("--prefix", default="shard", help="shard file name prefix (PREFIX-000000.tar)")
    size = build.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    size.add_argument("--shard-mb", type=float, help="target shard size in megabytes instead of a sample count")
    build.add_argument(
        "--resize", default="none", choices=["none", "keep_ratio", "shorter_side", "center_crop"], help="resize mode"
    )
    build.add_argument("--max-side", type=int, default=512, help="target side in pixels for --resize")
    build.add_argument("--image-format", default="keep", choices=["keep", "jpg", "png", "webp"])
    build.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality when re-encoding")
    build.add_argument("--dedup", default="none", choices=["none", "image", "pair"], help="drop repeated images/pairs")
    build.add_argument("--workers", type=int, default=2, help="decoding processes")
    build.add_argument("--max-pixels", type=int, default=25_000_000, help="pixel cap per image")
    build.add_argument("--overwrite", action="store_true", help="replace shards already in --out")

    verify = commands.add_parser("verify", help="read every sample and report problems (exit 1 if any)")
    verify.add_argument("shards", help="shard pattern, e.g. shards/train-{000..007}.tar")
    verify.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_field_options(verify)

    inspect = commands.add_parser("inspect", help="image sizes and modes, caption lengths, a contact sheet")
    inspect.add_argument("shards", help="shard pattern")
    inspect.add_argument("--model", default="mm-tiny-minilm", help="architecture whose tokenizer counts caption tokens")
    inspect.add_argument("--sheet", type=Path, help="write a contact sheet PNG of random samples here")
    inspect.add_argument("--samples", type=int, default=24, help="samples on the contact sheet")
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    add_field_options(inspect)
    return parser


def shards_main(argv: Sequence[str]) -> int:
    from mmalign.data.build import BuildError, BuildOptions, build
    from mmalign.data.reader import DataError, ShardError, check_urls

    args = shards_parser().parse_args(argv)
    try:
        if args.command == "build":
            options = BuildOptions(
                out=args.out,
                prefix=args.prefix,
                shard_size=None if args.shard_mb else args.shard_size,
                shard_mb=args.shard_mb,
                resize=args.resize,
                max_side=args.max_side,
                image_format=args.image_format,
                quality=args.quality,
                dedup=args.dedup,
                workers=args.workers,
                overwrite=args.overwrite,
                max_pixels=args.max_pixels,
                image_column=args.image_column,
                caption_column=args.caption_column,
                input_format=args.format,
                delimiter=args.delimiter.replace("\\t", "\t") if args.delimiter else None,
            )
            try:
                stats = build(args.input, options)
            except KeyboardInterrupt:
                logging.getLogger("mmalign").error("interrupted: nothing was written, and %s is as it was", args.out)
                return 130
            print(json.dumps({key: value for key, value in stats.items() if key != "options"}, indent=1))
            return 0
        urls = check_urls(args.shards, "shards")
        if args.command == "verify":
            from mmalign.data.verify import format_verify, verify

            result = verify(urls, field_spec(args), args.max_pixels, progress=not args.json)
            print(json.dumps(result, indent=1) if args.json else format_verify(result))
            return 0 if result["ok"] else 1
        return inspect_command(args, urls)
    except (BuildError, ShardError, DataError) as error:
        logging.getLogger("mmalign").error("%s", error)
        return 2


def inspect_command(args: argparse.Namespace, urls: list[str]) -> int:
    from mmalign.config import ModelConfig
    from mmalign.data.inspect import contact_sheet, format_inspect, inspect
    from mmalign.model import create_model, create_tokenizer

    if args.sheet is not None and args.samples < 1:
        logging.getLogger("mmalign").error("--samples %d: a contact sheet needs at least 1 sample", args.samples)
        return 2
    if args.sheet is not None:
        blocked = next((folder for folder in args.sheet.parents if folder.exists() and not folder.is_dir()), None)
        if blocked is not None or args.sheet.is_dir():
            problem = f"{blocked} is a file" if blocked is not None else "it is a folder"
            logging.getLogger("mmalign").error("cannot write --sheet %s: %s; give a PNG path", args.sheet, problem)
            return 2
    tokenizer = create_tokenizer(create_model(ModelConfig(name=args.model)))
    fields = field_spec(args)
    summary, chosen = inspect(
        urls,
        fields,
        tokenizer.token_count,
        tokenizer.context_length,
        sheet_samples=args.samples if args.sheet else 0,
        seed=args.seed,
        progress=not args.json,
    )
    if args.sheet:
        summary["contact_sheet"] = str(contact_sheet(chosen, fields, args.sheet))
    print(json.dumps(summary, indent=1) if args.json else format_inspect(summary))
    return 0


def index_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign index", description="Build and search embedding indexes.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="embed every image and caption of a set of shards")
    build.add_argument("--model", required=True, help="run directory or model folder")
    build.add_argument("--shards", required=True, help="shard pattern")
    build.add_argument("--out", required=True, type=Path, help="index folder (an interrupted build resumes here)")
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--approximate", default="auto", choices=["auto", "never", "always"], help="use FAISS")
    build.add_argument("--ann-threshold", type=int, default=100_000, help="items above which auto uses FAISS")
    build.add_argument("--ann-kind", default="hnsw", choices=["hnsw", "ivf"])
    build.add_argument(
        "--ann-recall",
        type=float,
        default=0.95,
        help="recall@10 against exact search that the approximate index's efSearch or nprobe is tuned to reach",
    )
    build.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    build.add_argument("--overwrite", action="store_true", help="replace an index already in --out")
    add_field_options(build, caption_default=None)
    search = commands.add_parser("search", help="search an index by text (images) or by image (captions)")
    search.add_argument("index", type=Path, help="index folder")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find images for this text")
    query.add_argument("--image", type=Path, help="find captions for this image file")
    search.add_argument("--k", type=int, default=10, help="results to return")
    search.add_argument("--json", action="store_true", help="print JSON")
    return parser


def run_caption_key(model_dir: Path) -> str:
    """Return the caption key a run was trained with (from its config.yaml), or txt."""
    import yaml

    config = model_dir / "config.yaml"
    if config.is_file():
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        return str(data.get("data", {}).get("caption_key", "txt"))
    return "txt"


def index_main(argv: Sequence[str]) -> int:
    from mmalign.data.decode import SampleError
    from mmalign.data.reader import ShardError
    from mmalign.index import EmbeddingIndex, IndexFolderError, build_index

    args = index_parser().parse_args(argv)
    try:
        if args.command == "build":
            if args.caption_key is None:
                args.caption_key = run_caption_key(Path(args.model))
            info = build_index(
                args.model,
                args.shards,
                args.out,
                field_spec(args),
                batch_size=args.batch_size,
                approximate=args.approximate,
                ann_threshold=args.ann_threshold,
                ann_kind=args.ann_kind,
                ann_recall=args.ann_recall,
                device=args.device,
                overwrite=args.overwrite,
            )
            print(json.dumps({key: value for key, value in info.items() if key != "shards"}, indent=1))
            return 0
        index = EmbeddingIndex(args.index)
        if args.text is not None:
            hits = [
                {"rank": rank, "score": round(hit.score, 4), "key": hit.key, "captions": hit.captions}
                for rank, hit in enumerate(index.search_text(args.text, args.k), 1)
            ]
        else:
            hits = [
                {"rank": rank, "score": round(hit.score, 4), "text": hit.text, "image_key": hit.image_key}
                for rank, hit in enumerate(index.search_image(args.image, args.k), 1)
            ]
        if args.json:
            print(json.dumps(hits, indent=1, ensure_ascii=False))
        else:
            for hit in hits:
                label = " | ".join(hit["captions"]) if "captions" in hit else hit["text"]
                print(f"{hit['rank']:>3}  {hit['score']:.3f}  {hit.get('key', hit.get('image_key'))}  {label}")
        return 0
    except (IndexFolderError, ShardError, SampleError, ValueError, FileNotFoundError) as error:
        logging.getLogger("mmalign").error("%s", error)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand; return its exit status."""
    from mmalign.logs import configure_logging

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    configure_logging()
    if command == "train":
        # --help and usage errors are handled here, before the training module imports torch
        train_parser().parse_args(rest)
        from mmalign.train import main as train_main

        return train_main(rest)
    if command == "eval":
        eval_parser().parse_args(rest)
        from mmalign.evaluate import main as eval_main

        return eval_main(rest)
    if command == "shards":
        return shards_main(rest)
    if command == "index":
        return index_main(rest)
    if command == "demo":
        from mmalign.demo import main as demo_main

        return demo_main(rest)
    sys.stderr.write(f"mmalign: unknown command {command!r}\n\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

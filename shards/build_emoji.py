"""Build the shipped emoji image-caption shards from Debian's Unicode packages.

    apt-get install fonts-noto-color-emoji unicode-data unicode-cldr-core
    python shards/build_emoji.py --out shards

Sources (all read offline from the Debian packages named above):
- images: the Noto Color Emoji font (glyphs Apache-2.0, font SIL OFL 1.1),
  rendered with Pillow and composited on white;
- names, groups and subgroups: Unicode's emoji-test.txt (Unicode licence);
- keywords: CLDR English annotations (Unicode licence).

The output is deterministic for a given set of package versions: the same
inputs give byte-identical tar files, so a rebuild shows up in git only when
the sources change.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLDR_ANNOTATIONS = (
    Path("/usr/share/unicode/cldr/common/annotations/en.xml"),
    Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml"),
)
FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")

# Noto Color Emoji is a bitmap (CBDT) font with a single strike at 109 px.
FONT_STRIKE_PX = 109
SKIN_TONES = ("\U0001f3fb", "\U0001f3fc", "\U0001f3fd", "\U0001f3fe", "\U0001f3ff")
VARIATION_SELECTOR = "\ufe0f"
LINE_RE = re.compile(r"^(?P<codes>[0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(?P<name>.+)$")

# Zero-shot classes: the Unicode emoji groups, with names a caption would use.
# "Component" (bare skin tones and hair styles) is not a group of pictures.
GROUP_CLASSES = {
    "Smileys & Emotion": "smiley face",
    "People & Body": "person or body part",
    "Animals & Nature": "animal or plant",
    "Food & Drink": "food or drink",
    "Travel & Places": "place or vehicle",
    "Activities": "activity or sport",
    "Objects": "object",
    "Symbols": "symbol or sign",
    "Flags": "flag",
}
TEMPLATES = ("{}", "an emoji of a {}.", "a {} emoji.", "a picture of a {}.")


@dataclass
class Emoji:
    text: str
    name: str
    group: str
    subgroup: str
    keywords: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        """Return the emoji without skin tones, so that variants share a split."""
        return "".join(ch for ch in self.text if ch not in SKIN_TONES and ch != VARIATION_SELECTOR)


def read_emoji_test(path: Path) -> list[Emoji]:
    emoji, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif match := LINE_RE.match(line):
            if group == "Component":
                continue
            text = "".join(chr(int(code, 16)) for code in match["codes"].split())
            emoji.append(Emoji(text=text, name=match["name"], group=group, subgroup=subgroup))
    return emoji


def read_cldr_keywords(paths: tuple[Path, ...]) -> dict[str, list[str]]:
    """Map each emoji (variation selectors removed) to its CLDR English keywords."""
    keywords: dict[str, list[str]] = {}
    for path in paths:
        for node in ET.parse(path).getroot().iter("annotation"):
            if node.get("type") == "tts" or not node.text:
                continue
            key = node.get("cp", "").replace(VARIATION_SELECTOR, "")
            keywords[key] = [word.strip() for word in node.text.split("|") if word.strip()]
    return keywords


def render(font: ImageFont.FreeTypeFont, text: str, size: int) -> Image.Image | None:
    """Render one emoji on white at size x size pixels, or None if the font lacks it."""
    canvas = Image.new("RGBA", (FONT_STRIKE_PX + 40, FONT_STRIKE_PX + 40), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text(
        (canvas.width // 2, canvas.height // 2), text, font=font, embedded_color=True, anchor="mm"
    )
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    # a missing sequence renders as several glyphs side by side: much wider than tall
    if glyph.width > 1.3 * FONT_STRIKE_PX:
        return None
    square = Image.new("RGBA", (FONT_STRIKE_PX + 8, FONT_STRIKE_PX + 8), (255, 255, 255, 0))
    square.alpha_composite(glyph, ((square.width - glyph.width) // 2, (square.height - glyph.height) // 2))
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    white.alpha_composite(square)
    return white.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def split_of(emoji: Emoji, val_percent: int) -> str:
    digest = hashlib.sha256(emoji.base.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:4], "big") % 100 < val_percent else "train"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def write_split(
    out: Path, split: str, items: list[tuple[Emoji, bytes]], num_shards: int, first_number: int = 0
) -> list[str]:
    digits = len(str(num_shards - 1)) if num_shards > 1 else 1
    digits = max(digits, 3)
    per_shard = -(-len(items) // num_shards)
    keys: list[str] = []
    for shard in range(num_shards):
        path = out / f"{split}-{shard:0{digits}d}.tar"
        chunk = items[shard * per_shard : (shard + 1) * per_shard]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, (emoji, jpeg) in enumerate(chunk):
                # img2dataset keys: shard number, then the index inside the shard; the
                # validation shards are numbered after the training ones, so keys are unique
                key = f"{first_number + shard:05d}{index:04d}"
                keywords = [word for word in emoji.keywords if word != emoji.name]
                meta = {
                    "key": key,
                    "emoji": emoji.text,
                    "codepoints": " ".join(f"U+{ord(ch):04X}" for ch in emoji.text),
                    "caption": emoji.name,
                    "captions": [emoji.name, f"{emoji.name}: {', '.join(keywords)}" if keywords else emoji.name],
                    "keywords": keywords,
                    "group": emoji.group,
                    "subgroup": emoji.subgroup,
                    "width": Image.open(io.BytesIO(jpeg)).width,
                    "height": Image.open(io.BytesIO(jpeg)).height,
                    "status": "success",
                }
                add_member(tar, f"{key}.jpg", jpeg)
                add_member(tar, f"{key}.txt", emoji.name.encode("utf-8"))
                add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))
                keys.append(key)
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--val-percent", type=int, default=15, help="share of base emoji held out")
    parser.add_argument("--train-shards", type=int, default=8)
    parser.add_argument("--val-shards", type=int, default=2)
    args = parser.parse_args()

    emoji = read_emoji_test(EMOJI_TEST)
    keywords = read_cldr_keywords(CLDR_ANNOTATIONS)
    font = ImageFont.truetype(str(FONT), FONT_STRIKE_PX, layout_engine=ImageFont.Layout.RAQM)

    splits: dict[str, list[tuple[Emoji, bytes]]] = {"train": [], "val": []}
    missing_glyphs = []
    for item in emoji:
        item.keywords = keywords.get(item.text.replace(VARIATION_SELECTOR, ""), [])
        image = render(font, item.text, args.size)
        if image is None:
            missing_glyphs.append(item.name)
            continue
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=args.quality)
        splits[split_of(item, args.val_percent)].append((item, buffer.getvalue()))

    # emoji-test.txt lists related emoji together; web-crawled shards are in no such order
    for split_items in splits.values():
        split_items.sort(key=lambda pair: hashlib.sha256(pair[0].text.encode("utf-8")).digest())

    args.out.mkdir(parents=True, exist_ok=True)
    write_split(args.out, "train", splits["train"], args.train_shards)
    val_keys = write_split(args.out, "val", splits["val"], args.val_shards, first_number=args.train_shards)

    class_names = list(GROUP_CLASSES.values())
    group_index = {group: index for index, group in enumerate(GROUP_CLASSES)}
    classes = {
        "classnames": class_names,
        "templates": list(TEMPLATES),
        # one label per emoji: skin-tone variants repeat the same picture in five colours,
        # so labelling them would count the People & Body group up to six times per emoji
        "labels": {
            key: group_index[item.group]
            for key, (item, _) in zip(val_keys, splits["val"], strict=True)
            if not any(tone in item.text for tone in SKIN_TONES)
        },
        "source": "Unicode emoji groups from emoji-test.txt; skin-tone variants are unlabelled",
    }
    (args.out / "classes.json").write_text(json.dumps(classes, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    stats = {
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "skipped_missing_glyph": len(missing_glyphs),
        "missing_glyph_names": missing_glyphs,
    }
    (args.out / "build_stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in stats.items() if k != "missing_glyph_names"}))


if __name__ == "__main__":
    main()

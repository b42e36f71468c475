"""Draws the small dataset that the tiny training demo (`make demo`) ships with.

Sixteen 96x96 cartoon heads (spiky hair, a headband, eyes) with BLIP-style captions, written with
the `datasets` library as a parquet shard in the hub layout of lambdalabs/naruto-blip-captions
(`data/train-00000-of-00001.parquet`, columns `image` {bytes, path} and `text`), so the demo reads
it through the same code path as the real dataset. Deterministic: the same bytes on every run.

Run with the fixtures venv: `$(tools/fixtures/setup.sh) tools/demo/make_dataset.py examples/data/tiny-naruto`
(optional arguments: image side and count, default 96 and 16).
"""

import io
import random
import sys
from pathlib import Path

import datasets
from PIL import Image, ImageDraw

HAIR = [("orange", (235, 120, 20)), ("yellow", (240, 200, 40)), ("black", (30, 30, 40)), ("pink", (230, 120, 170)), ("white", (225, 225, 230))]
BACKGROUND = [("blue", (90, 140, 220)), ("green", (110, 190, 120)), ("grey", (160, 160, 170)), ("red", (200, 90, 80))]


def head(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    base = 96
    hair_name, hair = rng.choice(HAIR)
    bg_name, bg = rng.choice(BACKGROUND)
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    cx, cy = size // 2 + rng.randint(-6, 6), size // 2 + rng.randint(0, 8)
    r = rng.randint(22, 28)
    # Spiky hair behind the face.
    for k in range(9):
        x = cx - r + k * (2 * r) // 8
        draw.polygon([(x - 8, cy - r // 2), (x + rng.randint(-10, 10), cy - r - rng.randint(10, 22)), (x + 8, cy - r // 2)], fill=hair)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 215, 180), outline=(60, 40, 30))
    # Headband with a metal plate.
    draw.rectangle([cx - r, cy - r // 2 - 5, cx + r, cy - r // 2 + 3], fill=(40, 50, 110))
    draw.rectangle([cx - 9, cy - r // 2 - 6, cx + 9, cy - r // 2 + 4], fill=(190, 195, 205))
    eye_name, eye = rng.choice([("blue", (40, 90, 220)), ("dark", (40, 30, 30)), ("red", (200, 30, 30))])
    for side in (-1, 1):
        ex = cx + side * r // 2
        draw.ellipse([ex - 5, cy - 2, ex + 5, cy + 6], fill=(255, 255, 255), outline=(20, 20, 20))
        draw.ellipse([ex - 2, cy, ex + 2, cy + 4], fill=eye)
    mouth = rng.choice(["smiling", "serious"])
    if mouth == "smiling":
        draw.arc([cx - 8, cy + 6, cx + 8, cy + 16], 20, 160, fill=(90, 30, 30), width=2)
    else:
        draw.line([cx - 6, cy + 12, cx + 6, cy + 12], fill=(90, 30, 30), width=2)
    caption = f"a cartoon of a {mouth} ninja with {hair_name} hair and {eye_name} eyes on a {bg_name} background"
    if size != base:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image, caption


def main() -> None:
    out = Path(sys.argv[1])
    # Optional: image side and count (the GPU runs use 75 images of 512 px, the seed recipe's shape).
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    rng = random.Random(1200)
    rows = {"image": [], "text": []}
    for i in range(count):
        image, caption = head(rng, size)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        rows["image"].append({"bytes": buffer.getvalue(), "path": f"{i:03d}.png"})
        rows["text"].append(caption)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    shard = out / "data" / "train-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(shard))
    print(f"wrote {shard} ({shard.stat().st_size} bytes, {len(rows['text'])} rows)")


if __name__ == "__main__":
    main()

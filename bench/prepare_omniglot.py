"""Build issue 21's Omniglot benchmark as an ImageFolder from the two small background zips.

    # the zips come from github:brendenlake/omniglot (MIT licence), python/images_background_small{1,2}.zip
    python bench/prepare_omniglot.py --zips small1.zip small2.zip --out /tmp/omniglot --classes 100
    sdlora data prepare --benchmark imagefolder --root /tmp/omniglot --out /tmp/omniglot-shards --tasks 10

The two zips hold 242 handwritten characters from 10 alphabets, each drawn once by 20 people (105x105 black strokes
on white). Characters of one alphabet look alike, so a class-incremental run over them is where features drift and
old classes get confused with new ones (digits is too easy to show it). ``--classes`` characters are drawn with a
seeded generator; the first ``--test`` drawers (by their file number) of each character are the test set, the
others train, so no test drawer was seen in training. Each image is inverted (white strokes on black, as the demo's
glyph pre-training draws them), its strokes thickened by a 5x5 maximum filter and it is resized to ``--size`` px
(the toy backbone reads 16 px; thin 105 px strokes vanish when shrunk that far). The data is never committed.
"""

from __future__ import annotations

import argparse
import io
import random
import zipfile
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps


def characters(zips: list[Path]) -> dict[str, dict[str, bytes]]:
    """``alphabet_characterNN`` -> {file name: PNG bytes}, over all zips."""
    found: dict[str, dict[str, bytes]] = {}
    for path in zips:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                parts = name.split("/")
                if len(parts) != 4 or not parts[3].endswith(".png"):
                    continue
                _, alphabet, character, file = parts
                found.setdefault(f"{alphabet}_{character}", {})[file] = archive.read(name)
    if not found:
        raise SystemExit(f"error: no Omniglot images in {', '.join(map(str, zips))}; pass the images_background "
                         "zips of github:brendenlake/omniglot")  # fmt: skip
    return found


def convert(png: bytes, size: int) -> Image.Image:
    """White strokes on black, thickened, ``size`` px square."""
    image = ImageOps.invert(Image.open(io.BytesIO(png)).convert("L"))
    return image.filter(ImageFilter.MaxFilter(5)).resize((size, size), Image.Resampling.BILINEAR)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zips", nargs="+", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--test", type=int, default=5, help="test drawers per character (of 20)")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    found = characters(args.zips)
    if args.classes > len(found):
        raise SystemExit(f"error: --classes {args.classes} but the zips hold {len(found)} characters")
    chosen = sorted(random.Random(args.seed).sample(sorted(found), args.classes))
    counts = {"train": 0, "test": 0}
    for name in chosen:
        files = sorted(found[name])
        for i, file in enumerate(files):
            split = "test" if i < args.test else "train"
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            convert(found[name][file], args.size).save(folder / file)
            counts[split] += 1
    print(f"{len(chosen)} characters: {counts['train']} train and {counts['test']} test images in {args.out}")


if __name__ == "__main__":
    main()

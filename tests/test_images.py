"""The shared image loader: one test per PIL mode against a numpy reference, and the three consumers agreeing.

Every reference below is computed with numpy from the pixel values written, never with PIL's own conversion.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora_dist.data import load_manifest, prepare
from sdlora_dist.data.images import ImageDecodeError, open_rgb, to_rgb
from sdlora_dist.data.prepare import encode_item
from sdlora_dist.data.sources import SourceItem

RNG = np.random.default_rng(0)
WHITE = 255.0


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + WHITE * (1.0 - a)


def _assert_close(got: Image.Image, expected: np.ndarray, atol: int = 0) -> None:
    assert got.mode == "RGB" and np.asarray(got).shape == expected.shape
    diff = np.abs(np.asarray(got).astype(np.int64) - np.rint(expected).astype(np.int64))
    assert diff.max() <= atol, diff.max()


def test_i16_png_scaled_by_257() -> None:
    values = RNG.integers(0, 65536, (9, 7), dtype=np.uint16)
    values[0, :3] = (0, 65535, 257 * 100)
    data = _png(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = open_rgb(data)
    _assert_close(got, _grey3(np.rint(values / 257.0)))
    assert np.asarray(got)[0, :3, 0].tolist() == [0, 255, 100]  # PIL's convert would give 255 for 257 * 100


def test_mode_i_16bit_range_and_wide_range() -> None:
    values = RNG.integers(0, 65536, (6, 5)).astype(np.int32)
    _assert_close(to_rgb(Image.fromarray(values, mode="I")), _grey3(np.rint(values / 257.0)))
    wide = RNG.integers(-70000, 300000, (6, 5)).astype(np.int32)
    expected = (wide - wide.min()) * 255.0 / (wide.max() - wide.min())
    _assert_close(to_rgb(Image.fromarray(wide, mode="I")), _grey3(expected))


def test_mode_f_assumed_unit_range() -> None:
    values = RNG.uniform(-0.2, 1.2, (6, 5)).astype(np.float32)
    _assert_close(to_rgb(Image.fromarray(values, mode="F")), _grey3(np.clip(values.astype(np.float64), 0, 1) * 255))


def test_palette_with_transparency_on_white() -> None:
    palette = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
    index = RNG.integers(0, 16, (8, 8), dtype=np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(palette.flatten().tolist())
    img.info["transparency"] = 3  # palette entry 3 is fully transparent
    got = open_rgb(_png(img))
    alpha = np.where(index == 3, 0, 255)
    _assert_close(got, _over_white(palette[index], alpha))
    assert (np.asarray(got)[index == 3] == 255).all()


def test_la_on_white() -> None:
    la = RNG.integers(0, 256, (7, 6, 2), dtype=np.uint8)
    got = open_rgb(_png(Image.fromarray(la, mode="LA")))
    _assert_close(got, _over_white(_grey3(la[..., 0]), la[..., 1]), atol=1)  # PIL's integer rounding


def test_rgba_on_white() -> None:
    rgba = RNG.integers(0, 256, (7, 6, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    got = open_rgb(_png(Image.fromarray(rgba, mode="RGBA")))
    _assert_close(got, _over_white(rgba[..., :3], rgba[..., 3]), atol=1)
    assert np.asarray(got)[0, 0].tolist() == [255, 255, 255]  # fully transparent -> the background exactly
    assert np.asarray(got)[0, 1].tolist() == rgba[0, 1, :3].tolist()  # opaque -> untouched


def test_cmyk_converted() -> None:
    cmyk = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(cmyk, mode="CMYK").save(buf, format="TIFF")
    c = cmyk.astype(np.float64)
    _assert_close(open_rgb(buf.getvalue()), (255 - c[..., :3]) * (255 - c[..., 3:]) / 255)


@pytest.mark.parametrize(("orientation", "turn"), [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_applied(orientation: int, turn: int) -> None:
    rgb = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    _assert_close(open_rgb(buf.getvalue()), np.rot90(rgb, turn))  # 6: stored rotated 90 CCW, shown turned CW


def test_plain_modes_unchanged() -> None:
    grey = RNG.integers(0, 256, (5, 4), dtype=np.uint8)
    _assert_close(open_rgb(_png(Image.fromarray(grey, mode="L"))), _grey3(grey))
    rgb = RNG.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    _assert_close(open_rgb(_png(Image.fromarray(rgb))), rgb)


def test_undecodable_reason_names_no_object() -> None:
    with pytest.raises(ImageDecodeError) as info:
        open_rgb(b"this is not an image")
    assert str(info.value) == "not a recognised image format" and "0x" not in str(info.value)


def _shard_image(out: Path) -> tuple[str, bytes]:
    manifest = load_manifest(out)
    with tarfile.open(out / manifest.task_shards("train", 0)[0].path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg")))
        return member.name, tar.extractfile(member).read()


def test_cmyk_source_stored_as_rgb_in_the_shard(tmp_path: Path) -> None:
    cmyk = RNG.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.jpg", quality=100)
    expected = np.asarray(open_rgb(tmp_path / "c.jpg"))
    enc = encode_item(SourceItem(path="c.jpg", label=0, file=str(tmp_path / "c.jpg")), resize=256)
    stored = Image.open(io.BytesIO(enc.data))
    assert enc.ext == "png" and stored.mode == "RGB"  # before: the CMYK JPEG bytes went into the tar as they were
    np.testing.assert_array_equal(np.asarray(stored), expected)


def test_16bit_and_alpha_sources_stored_converted(tmp_path: Path) -> None:
    grey8 = RNG.integers(0, 256, (16, 20), dtype=np.uint8)
    for cls in ("a", "b"):
        for split, n in (("train", 2), ("test", 1)):
            (tmp_path / "src" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / f"src/{split}/{cls}/{i}.png")
    prepare("imagefolder", tmp_path / "src", tmp_path / "out", tasks=1, progress=False, workers=1)
    name, data = _shard_image(tmp_path / "out")
    stored = Image.open(io.BytesIO(data))
    assert name.endswith(".png") and stored.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(stored), _grey3(grey8))


def test_predict_16bit_png_equals_8bit(tmp_path: Path) -> None:
    from sdlora_dist.export.metadata import ModelMetadata
    from sdlora_dist.export.preprocess import image_to_uint8, normalize

    meta = ModelMetadata(class_names=("x", "y"), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), input_size=(3, 16, 16),
                         interpolation="bicubic", crop_pct=0.875, num_tasks=1, config_hash="0" * 16)  # fmt: skip
    grey8 = RNG.integers(0, 256, (23, 29), dtype=np.uint8)
    Image.fromarray(grey8, mode="L").save(tmp_path / "g8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    x8 = normalize(image_to_uint8(tmp_path / "g8.png", meta)[None], meta.mean, meta.std)
    x16 = normalize(image_to_uint8(tmp_path / "g16.png", meta)[None], meta.mean, meta.std)
    np.testing.assert_array_equal(x16, x8)


def test_training_pipeline_decodes_with_the_shared_loader() -> None:
    """A shard written by an older prepare may hold a 16-bit or RGBA PNG: training sees what predict sees."""
    from sdlora_dist.data.reading import Item, decode

    grey8 = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    rgba = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    for img, expected in (
        (Image.fromarray(grey8.astype(np.uint16) * 257), _grey3(grey8)),
        (Image.fromarray(rgba, mode="RGBA"), _over_white(rgba[..., :3], rgba[..., 3])),
    ):
        item = Item(shard="s.tar", key="k", files={"png": _png(img), "cls": b"3"})
        delta = {"corrupt": 0, "corrupt_keys": []}
        decoded, label = decode(item, delta, "skip")
        assert label == 3 and delta["corrupt"] == 0
        _assert_close(decoded, expected, atol=1)

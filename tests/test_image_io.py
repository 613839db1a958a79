"""Tests for utils.image_io: decoding every supported mode, clear errors, atomic writes, listing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.image_io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    LoadedImage,
    atomic_write,
    list_images,
    read_image,
    save_png,
)


def _noise_rgb(h: int = 16, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- read_image: modes


def test_read_rgb_png_exact(tmp_path):
    rgb = _noise_rgb()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert isinstance(img, LoadedImage)
    assert img.rgb.dtype == np.float32 and img.rgb.shape == (16, 24, 3)
    assert img.alpha is None and img.bit_depth == 8
    np.testing.assert_allclose(img.rgb * 255, rgb, atol=1e-4)


def test_read_greyscale_replicated(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.rgb.shape == (3, 4, 3) and img.alpha is None
    for c in range(3):
        np.testing.assert_allclose(img.rgb[..., c] * 255, grey, atol=1e-4)


def test_read_grey_alpha(tmp_path):
    la = np.stack([np.full((3, 4), 100, np.uint8), np.full((3, 4), 51, np.uint8)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    img = read_image(tmp_path / "la.png")
    np.testing.assert_allclose(img.rgb, 100 / 255, atol=1e-6)
    np.testing.assert_allclose(img.alpha, 0.2, atol=1e-6)


def test_read_rgba_keeps_alpha_separately(tmp_path):
    rgba = np.dstack([_noise_rgb(4, 5), np.linspace(0, 255, 20).astype(np.uint8).reshape(4, 5)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(img.rgb * 255, rgba[..., :3], atol=1e-4)
    np.testing.assert_allclose(img.alpha * 255, rgba[..., 3], atol=1e-4)


def test_read_palette_with_and_without_transparency(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    image.save(tmp_path / "p.png")
    image.save(tmp_path / "pt.png", transparency=1)

    opaque = read_image(tmp_path / "p.png")
    assert opaque.alpha is None
    np.testing.assert_allclose(opaque.rgb[0, 0], [1, 0, 0])
    np.testing.assert_allclose(opaque.rgb[0, 1], [0, 1, 0])
    np.testing.assert_allclose(opaque.rgb[1, 0], [0, 0, 1])

    transparent = read_image(tmp_path / "pt.png")
    np.testing.assert_allclose(transparent.alpha, [[1, 0], [1, 0]])
    np.testing.assert_allclose(transparent.rgb[1, 0], [0, 0, 1])


def test_read_16bit_png(tmp_path):
    values = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    img = read_image(tmp_path / "d.png")
    assert img.bit_depth == 16
    np.testing.assert_allclose(img.rgb[..., 1], values / 65535.0, atol=1e-7)


def test_read_16bit_big_endian_tiff(tmp_path):
    values = np.array([[0, 258], [40000, 65535]], dtype=">u2")
    image = Image.fromarray(values)
    assert image.mode == "I;16B"
    image.save(tmp_path / "d.tif")
    img = read_image(tmp_path / "d.tif")
    assert img.bit_depth == 16
    np.testing.assert_allclose(img.rgb[..., 0], values.astype(np.float64) / 65535.0, atol=1e-7)


def test_read_32bit_int_tiff_scaled_and_clipped(tmp_path):
    values = np.array([[-5, 655], [65535, 100000]], dtype=np.int32)
    image = Image.fromarray(values)
    assert image.mode == "I"
    image.save(tmp_path / "i.tif")
    img = read_image(tmp_path / "i.tif")
    np.testing.assert_allclose(img.rgb[..., 2], [[0, 655 / 65535], [1, 1]], atol=1e-7)


def test_read_float_tiff_clipped(tmp_path):
    values = np.array([[-0.5, 0.25], [0.75, 3.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    img = read_image(tmp_path / "f.tif")
    assert img.bit_depth == 32
    np.testing.assert_allclose(img.rgb[..., 0], [[0, 0.25], [0.75, 1]])


def test_read_cmyk(tmp_path):
    cmyk = np.zeros((2, 2, 4), np.uint8)
    cmyk[0, 0] = [255, 0, 0, 0]  # cyan
    cmyk[1, 1] = [0, 0, 0, 255]  # black
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    img = read_image(tmp_path / "c.tif")
    np.testing.assert_allclose(img.rgb[0, 0], [0, 1, 1])
    np.testing.assert_allclose(img.rgb[1, 1], [0, 0, 0])
    np.testing.assert_allclose(img.rgb[0, 1], [1, 1, 1])


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_read_honours_exif_orientation(tmp_path, suffix):
    rgb = _noise_rgb(2, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    save_kwargs = {"lossless": True} if suffix == ".webp" else {}
    Image.fromarray(rgb).save(tmp_path / f"e{suffix}", exif=exif.tobytes(), **save_kwargs)
    img = read_image(tmp_path / f"e{suffix}")
    assert img.rgb.shape == (3, 2, 3)
    np.testing.assert_allclose(img.rgb * 255, np.rot90(rgb, -1), atol=1e-4)


@pytest.mark.parametrize("suffix", [".bmp", ".tiff", ".webp"])
def test_read_lossless_formats(tmp_path, suffix):
    rgb = _noise_rgb(5, 7, seed=3)
    Image.fromarray(rgb).save(tmp_path / f"x{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    np.testing.assert_allclose(read_image(tmp_path / f"x{suffix}").rgb * 255, rgb, atol=1e-4)


def test_read_jpeg_close(tmp_path):
    rgb = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.JPG", quality=95)
    np.testing.assert_allclose(read_image(tmp_path / "x.JPG").rgb * 255, rgb, atol=3)


# ---------------------------------------------------------------- read_image: errors


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png.*empty"):
        read_image(tmp_path / "empty.png")


def test_non_image_with_png_extension(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match=r"notes\.png.*not a recognised image"):
        read_image(tmp_path / "notes.png")


def test_truncated_png(tmp_path):
    Image.fromarray(_noise_rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")


def test_truncated_jpeg(tmp_path):
    Image.fromarray(_noise_rgb(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg"):
        read_image(tmp_path / "cut.jpg")


def test_corrupt_png_data(tmp_path):
    Image.fromarray(_noise_rgb(64, 64)).save(tmp_path / "full.png")
    data = bytearray((tmp_path / "full.png").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"bad\.png.*corrupt"):
        read_image(tmp_path / "bad.png")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")


def test_image_read_error_is_value_error_with_path(tmp_path):
    err = ImageReadError(tmp_path / "x.png", "because")
    assert isinstance(err, ValueError)
    assert err.path == tmp_path / "x.png" and "because" in str(err) and "x.png" in str(err)


# ---------------------------------------------------------------- save_png / atomic_write


def test_save_png_rounds_float_and_round_trips(tmp_path):
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[0, 0] = [0.2, 0.203, 1.5]  # 51.0 -> 51, 51.765 -> 52 (truncation would give 51), clipped -> 255
    rgb[1, 1] = [-0.1, 0.0, 1.0]
    path = save_png(tmp_path / "sub" / "dir" / "x.png", rgb)
    assert path == tmp_path / "sub" / "dir" / "x.png"
    stored = np.asarray(Image.open(path))
    np.testing.assert_array_equal(stored[0, 0], [51, 52, 255])
    np.testing.assert_array_equal(stored[1, 1], [0, 0, 255])


def test_save_png_uint8_and_alpha(tmp_path):
    rgb = _noise_rgb(3, 4)
    alpha = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    save_png(tmp_path / "a.png", rgb, alpha)
    img = read_image(tmp_path / "a.png")
    np.testing.assert_allclose(img.rgb * 255, rgb, atol=1e-4)
    np.testing.assert_allclose(img.alpha, np.round(alpha * 255) / 255, atol=1e-6)


def test_save_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="HxWx3"):
        save_png(tmp_path / "a.png", np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        save_png(tmp_path / "a.png", np.full((3, 4, 3), np.nan, np.float32))
    with pytest.raises(TypeError, match="uint8 or float"):
        save_png(tmp_path / "a.png", np.zeros((3, 4, 3), np.int64))
    with pytest.raises(ValueError, match="alpha"):
        save_png(tmp_path / "a.png", np.zeros((3, 4, 3), np.float32), np.zeros((4, 3), np.float32))
    assert _files(tmp_path) == []


def test_save_png_refuses_overwrite_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "x.png"
    save_png(path, np.zeros((2, 2, 3), np.uint8))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"x\.png.*overwrite=True"):
        save_png(path, np.full((2, 2, 3), 255, np.uint8))
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["x.png"]
    save_png(path, np.full((2, 2, 3), 255, np.uint8), overwrite=True)
    assert np.asarray(Image.open(path)).min() == 255
    assert _files(tmp_path) == ["x.png"]


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")

    def failing_writer(tmp: Path) -> None:
        tmp.write_text("half a new fi")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, failing_writer)
    assert path.read_text() == "old\n"
    assert _files(tmp_path) == ["table.csv"]


def test_atomic_write_replaces_and_creates(tmp_path):
    path = tmp_path / "a" / "b.json"
    assert atomic_write(path, lambda tmp: tmp.write_text("1")) == path
    atomic_write(path, lambda tmp: tmp.write_text("2"))
    assert path.read_text() == "2"
    with pytest.raises(FileExistsError, match=r"b\.json"):
        atomic_write(path, lambda tmp: tmp.write_text("3"), overwrite=False)
    assert path.read_text() == "2"
    assert _files(path.parent) == ["b.json"]


def test_atomic_write_exclusive_creation_and_umask(tmp_path):
    old_umask = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "new.txt", lambda tmp: tmp.write_text("x"), overwrite=False)
    finally:
        os.umask(old_umask)
    assert path.read_text() == "x"
    assert path.stat().st_mode & 0o777 == 0o640


# ---------------------------------------------------------------- list_images


def test_image_extensions_cover_formats():
    for ext in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"):
        assert ext in IMAGE_EXTENSIONS
    assert ".txt" not in IMAGE_EXTENSIONS and ".gif" not in IMAGE_EXTENSIONS


def test_list_images_expands_filters_and_sorts(tmp_path):
    for rel in ["b.PNG", "a.jpeg", "notes.txt", ".hidden.png", "._b.png", "sub/c.WebP", "sub/deeper/d.tif"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    extra = tmp_path / "sub" / "c.WebP"
    found = list_images([tmp_path, extra])
    assert found == sorted([tmp_path / "a.jpeg", tmp_path / "b.PNG", extra, tmp_path / "sub/deeper/d.tif"])
    assert list_images([tmp_path], recursive=False) == [tmp_path / "a.jpeg", tmp_path / "b.PNG"]
    assert list_images(str(tmp_path / "a.jpeg")) == [tmp_path / "a.jpeg"]


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        list_images([tmp_path / "missing_dir"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt.*not an image"):
        list_images([tmp_path / "notes.txt"])
    assert list_images([tmp_path]) == []

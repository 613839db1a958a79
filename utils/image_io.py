"""Image reading and writing with clear errors, and atomic file writes.

Images in this project are float32 arrays in [0, 1], HxWx3 (RGB) in numpy / 3xHxW in torch. Reading
accepts what Pillow decodes (greyscale, palette, alpha, CMYK, 16-bit, float) and always returns RGB,
with the alpha channel, if any, kept separately. Writing is atomic: a reader never sees half a file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp"}
)
"""Lower-case file extensions (with the dot) that count as images; matching is case-insensitive."""

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageReadError(ValueError):
    """A file could not be read as an image; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {str(self.path)!r}: {reason}")


class ImagePathNotFoundError(FileNotFoundError):
    """An image file or folder named by the user does not exist; the message names it."""


class NotAnImageFileError(ValueError):
    """A file named explicitly as an image input does not have an image extension."""


class OutputExistsError(FileExistsError):
    """Writing would replace an existing file, which the caller did not allow."""


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image.

    rgb: float32 HxWx3 in [0, 1]. alpha: float32 HxW in [0, 1], or None when the file has none.
    bit_depth: bits per channel in the file (1, 8, 16 or 32).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int


def read_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Decode ``path`` fully, honour its EXIF orientation, and return RGB (+ alpha) in [0, 1].

    Greyscale is replicated to three channels; palette images with a transparent colour get an alpha
    channel; 16-bit integer images (I;16, I;16B, I) are divided by 65535 and float (F) images are
    clipped to [0, 1] (NaN becomes 0). Pillow reduces 16-bit *colour* PNGs to 8 bits; such files are
    read at 8 bits. Raises ImagePathNotFoundError (a FileNotFoundError) for a missing file and
    ImageReadError for an empty, truncated, corrupt or non-image file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImagePathNotFoundError(f"image file not found: {str(path)!r}")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "the file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()  # full decode: detects truncation and corrupt data now, not later
            img = ImageOps.exif_transpose(img)
            return _decode(img, path)
    except Image.UnidentifiedImageError:
        reason = "not a recognised image format (wrong extension or not an image)"
        raise ImageReadError(path, reason) from None
    except _DECODE_ERRORS as err:
        raise ImageReadError(path, f"corrupt or truncated image data ({type(err).__name__}: {err})") from None


def _decode(img: Image.Image, path: Path) -> LoadedImage:
    """Convert a loaded Pillow image of any supported mode into a LoadedImage."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(img).astype(np.float32) / 65535.0
        return LoadedImage(_grey_to_rgb(np.clip(grey, 0.0, 1.0)), None, 16)
    if mode == "F":
        grey = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return LoadedImage(_grey_to_rgb(np.clip(grey, 0.0, 1.0)), None, 32)
    if mode == "1":
        return LoadedImage(_grey_to_rgb(_unit(img.convert("L"))), None, 1)
    if mode == "L":
        return LoadedImage(_grey_to_rgb(_unit(img)), None, 8)
    if mode == "LA":
        arr = _unit(img)
        return LoadedImage(_grey_to_rgb(arr[..., 0]), np.ascontiguousarray(arr[..., 1]), 8)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    if mode in ("RGBA", "RGBa"):
        arr = _unit(img.convert("RGBA"))
        return LoadedImage(np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3]), 8)
    try:
        rgb = img.convert("RGB")
    except ValueError as err:
        raise ImageReadError(path, f"unsupported image mode {mode!r} ({err})") from None
    return LoadedImage(_unit(rgb), None, 8)


def _unit(img: Image.Image) -> np.ndarray:
    """8-bit Pillow image -> float32 array in [0, 1]."""
    return np.asarray(img, dtype=np.float32) / 255.0


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """HxW -> HxWx3 (copied, contiguous)."""
    return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)


def to_tensor(rgb: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """HxWx3 image in [0, 1] -> (1, 3, H, W) float32 tensor (on ``device``): what the networks take."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))[None].to(device)


def to_array(img: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) tensor -> HxWx3 float32 array clipped to [0, 1]: what :func:`save_png` and the metrics take."""
    return np.clip(img[0].permute(1, 2, 0).float().cpu().numpy(), 0, 1)


def atomic_write(
    path: str | os.PathLike[str],
    write_fn: Callable[[Path], object],
    *,
    overwrite: bool = True,
) -> Path:
    """Create ``path`` atomically: ``write_fn(tmp)`` writes a temporary file in the same directory,
    which is fsynced and then renamed onto ``path``.

    Readers see either the old file or the complete new one. Parent directories are created. If
    ``write_fn`` raises, the temporary file is removed, the old file (if any) is left untouched and
    the exception propagates. With ``overwrite=False`` an existing ``path`` raises OutputExistsError
    (checked atomically where the filesystem supports hard links). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise _exists_error(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never clobber someone else's file; mode 0o666 lets the umask decide permissions.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write_fn(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_exclusive(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _publish_exclusive(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (hard link, or check + rename)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # filesystem without hard links: best effort
        if path.exists():
            raise _exists_error(path) from None
        os.replace(tmp, path)


def _exists_error(path: Path) -> OutputExistsError:
    return OutputExistsError(
        f"refusing to overwrite existing file {str(path)!r} (pass overwrite=True to replace it)"
    )


def _fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_png(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    alpha: np.ndarray | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write an RGB(A) PNG atomically and return its path.

    rgb: HxWx3, uint8 (written as is) or float in [0, 1], which is clipped and *rounded* to the nearest
    of 0..255 (note: the reference's result images truncate instead; pass uint8 to control this).
    alpha: None or HxW with the same conventions. Parent directories are created; an existing file
    raises FileExistsError unless ``overwrite=True``.
    """
    rgb8 = _as_uint8(rgb, "rgb")
    if rgb8.ndim != 3 or rgb8.shape[2] != 3:
        raise ValueError(f"rgb must have shape HxWx3, got {rgb8.shape}")
    if alpha is None:
        image = Image.fromarray(rgb8)
    else:
        alpha8 = _as_uint8(alpha, "alpha")
        if alpha8.shape != rgb8.shape[:2]:
            raise ValueError(f"alpha must have shape {rgb8.shape[:2]} (HxW), got {alpha8.shape}")
        image = Image.fromarray(np.dstack([rgb8, alpha8]))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), overwrite=overwrite)


def _as_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    """uint8 passes through; float in [0, 1] is clipped, scaled by 255 and rounded."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def list_images(paths: Sequence[str | os.PathLike[str]], recursive: bool = True) -> list[Path]:
    """Expand files and folders into a sorted, de-duplicated list of image files.

    Folders contribute files whose extension is in IMAGE_EXTENSIONS (any case), searched recursively
    or not; hidden files (names starting with '.', e.g. macOS '._x.png' forks) are skipped. A missing
    path raises ImagePathNotFoundError (a FileNotFoundError); a file named explicitly that is not an image
    raises NotAnImageFileError (a ValueError).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: set[Path] = set()
    for entry in map(Path, paths):
        if entry.is_dir():
            candidates = entry.rglob("*") if recursive else entry.iterdir()
            found.update(p for p in candidates if p.is_file() and _is_image_name(p))
        elif entry.is_file():
            if entry.suffix.lower() not in IMAGE_EXTENSIONS:
                allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise NotAnImageFileError(f"{str(entry)!r} is not an image file (extension must be one of {allowed})")
            found.add(entry)
        else:
            raise ImagePathNotFoundError(f"no such file or folder: {str(entry)!r}")
    return sorted(found)


def _is_image_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def save_grid(path: str | os.PathLike[str], rows: Sequence[Sequence[np.ndarray]], *, height: int = 200,
              gap: int = 4, overwrite: bool = False) -> Path:
    """Write a PNG grid: each row's images (float HxWx3 in [0, 1] or uint8) resized to ``height`` pixels
    and placed left to right, rows stacked top to bottom on a white background."""
    tiles = [[_resized(img, height) for img in row] for row in rows]
    width = max(sum(t.width for t in row) + gap * (len(row) - 1) for row in tiles)
    canvas = Image.new("RGB", (width, len(tiles) * (height + gap) - gap), "white")
    for r, row in enumerate(tiles):
        x = 0
        for tile in row:
            canvas.paste(tile, (x, r * (height + gap)))
            x += tile.width + gap
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"), overwrite=overwrite)


def _resized(img: np.ndarray, height: int) -> Image.Image:
    image = Image.fromarray(_as_uint8(img, "grid image"))
    return image.resize((max(1, round(image.width * height / image.height)), height), Image.Resampling.LANCZOS)

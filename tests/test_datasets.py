"""Tests for data.datasets (layouts, pairing, crops and augmentation) and data.datamodule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.datamodule import DATASET_COMBINATIONS, LowLightDataModule, collate_pairs
from data.datasets import PairedImageDataset, find_pairs_dirs, pair_files, pair_key
from tests.conftest import ROOT
from utils.image_io import ImageReadError, read_image

H, W = 12, 16  # tiny "full" images


def write_pair(
    low_dir: Path,
    high_dir: Path,
    low_name: str,
    high_name: str | None = None,
    size: tuple[int, int] = (H, W),
    seed: int = 0,
) -> None:
    """A low image with values 0..127 and its high = 2 * low (exact in uint8 and in float)."""
    low_dir.mkdir(parents=True, exist_ok=True)
    high_dir.mkdir(parents=True, exist_ok=True)
    low = np.random.default_rng(seed).integers(0, 128, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(low).save(low_dir / low_name)
    Image.fromarray(low * 2).save(high_dir / (high_name or low_name))


def make_lol(root: Path, n_train: int = 3, n_test: int = 2) -> None:
    for i in range(n_train):
        write_pair(root / "our485/low", root / "our485/high", f"{i + 1}.png", seed=i)
    for i in range(n_test):
        write_pair(root / "eval15/low", root / "eval15/high", f"{100 + i}.png", seed=50 + i)


def make_lolv2(root: Path, n_train: int = 2, n_test: int = 1) -> None:
    for split, n in (("Train", n_train), ("Test", n_test)):
        for i in range(n):
            base = root / "Real_captured" / split
            names = f"low{i + 1:05d}.png", f"normal{i + 1:05d}.png"
            write_pair(base / "Low", base / "Normal", *names, seed=10 + i)
            base = root / "Synthetic" / split
            write_pair(base / "Low", base / "Normal", f"r{i:03d}ab.png", seed=20 + i)


def make_velol(root: Path, n_train: int = 4, n_test: int = 1) -> None:
    for split, n in (("train", n_train), ("test", n_test)):
        base = root / "VE-LOL-L-Cap-Full" / split
        for i in range(n):
            write_pair(base / "low", base / "high", f"low{i:05d}.png", f"normal{i:05d}.png", seed=30 + i)


@pytest.fixture
def roots(tmp_path) -> dict[str, str]:
    make_lol(tmp_path / "LOL")
    make_lolv2(tmp_path / "LOLv2")
    make_velol(tmp_path / "VE-LOL-L")
    return {
        "LOL": str(tmp_path / "LOL"),
        "LOLv2": str(tmp_path / "LOLv2"),
        "VELOL": str(tmp_path / "VE-LOL-L"),
    }


def assert_high_is_twice_low(item: dict) -> None:
    torch.testing.assert_close(item["high"], item["low"] * 2, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- layouts


def test_every_layout_is_found_without_renaming(roots, tmp_path):
    lol, lolv2, velol = Path(roots["LOL"]), Path(roots["LOLv2"]), Path(roots["VELOL"])
    assert find_pairs_dirs("LOL", lol, "train") == (lol / "our485/low", lol / "our485/high")
    assert find_pairs_dirs("LOL", lol, "test") == (lol / "eval15/low", lol / "eval15/high")
    real = lolv2 / "Real_captured"
    assert find_pairs_dirs("LOLv2", lolv2, "train") == (real / "Train/Low", real / "Train/Normal")
    assert find_pairs_dirs("LOLv2", lolv2, "test") == (real / "Test/Low", real / "Test/Normal")
    synthetic = lolv2 / "Synthetic"
    assert find_pairs_dirs("LOLv2_synthetic", lolv2, "test") == (
        synthetic / "Test/Low",
        synthetic / "Test/Normal",
    )
    ve = velol / "VE-LOL-L-Cap-Full"
    assert find_pairs_dirs("VELOL", velol, "train") == (ve / "train/low", ve / "train/high")
    assert find_pairs_dirs("folder", lol / "eval15") == (lol / "eval15/low", lol / "eval15/high")
    assert find_pairs_dirs("folder", real / "Test") == (real / "Test/Low", real / "Test/Normal")

    expected_sizes = {
        ("LOL", lol): 3,
        ("LOLv2", lolv2): 2,
        ("LOLv2_synthetic", lolv2): 2,
        ("VELOL", velol): 4,
    }
    for (kind, root), size in expected_sizes.items():
        dataset = PairedImageDataset.from_layout(kind, root, "train")
        assert len(dataset) == size
        assert_high_is_twice_low(dataset[0])


def test_reference_renamed_layout_also_works(tmp_path):
    base = tmp_path / "LOL-v2" / "Real_captured" / "train"
    write_pair(base / "low", base / "high", "low00001.png", "normal00001.png")
    low, high = find_pairs_dirs("LOLv2", tmp_path / "LOL-v2", "train")
    assert (low.name, high.name) == ("low", "high")


def test_missing_layout_folder_names_expected_path(tmp_path):
    (tmp_path / "LOL" / "our485" / "low").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"LOL dataset \(train split\).*our485[/\\]high.*eval15"):
        find_pairs_dirs("LOL", tmp_path / "LOL", "train")
    with pytest.raises(FileNotFoundError, match=r"VELOL.*VE-LOL-L-Cap-Full[/\\]test[/\\]low"):
        find_pairs_dirs("VELOL", tmp_path / "nowhere", "test")
    with pytest.raises(ValueError, match="unknown dataset layout 'LOL3'"):
        find_pairs_dirs("LOL3", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        find_pairs_dirs("LOL", tmp_path, "val")


# ---------------------------------------------------------------- pairing


def test_pair_key_strips_prefixes_case_insensitively():
    assert pair_key("low00001.png") == "00001"
    assert pair_key("Normal00001.PNG") == "00001"
    assert pair_key("high_7.jpg") == "7"
    assert pair_key("/x/LOW-12.png") == "12"
    assert pair_key("2.png") == "2"
    assert pair_key("low.png") == "low"
    assert pair_key("Lowland.png") == "land"


def test_pairing_by_name_across_prefixes_and_case(tmp_path):
    low_dir, high_dir = tmp_path / "low", tmp_path / "high"
    write_pair(low_dir, high_dir, "low00002.png", "normal00002.png", seed=2)
    write_pair(low_dir, high_dir, "low00001.png", "NORMAL00001.PNG", seed=1)
    write_pair(low_dir, high_dir, "Scene.png", "scene.png", seed=3)
    pairs = pair_files(low_dir, high_dir)
    assert [(a.name, b.name) for a, b in pairs] == [
        ("Scene.png", "scene.png"),
        ("low00001.png", "NORMAL00001.PNG"),
        ("low00002.png", "normal00002.png"),
    ]
    for item in PairedImageDataset(low_dir, high_dir):
        assert_high_is_twice_low(item)


def test_unpaired_files_are_all_named(tmp_path):
    low_dir, high_dir = tmp_path / "low", tmp_path / "high"
    write_pair(low_dir, high_dir, "1.png")
    write_pair(low_dir, tmp_path / "elsewhere", "only_low.png")
    write_pair(tmp_path / "elsewhere", high_dir, "only_high.png")
    with pytest.raises(ValueError, match=r"2 file\(s\) without a counterpart") as info:
        PairedImageDataset(low_dir, high_dir)
    assert "only_low.png" in str(info.value) and "only_high.png" in str(info.value)
    assert "1.png" not in str(info.value).replace("only", "")


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "low").mkdir()
    write_pair(tmp_path / "x", tmp_path / "high", "1.png")
    (tmp_path / "low" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images .* in folder .*low"):
        PairedImageDataset(tmp_path / "low", tmp_path / "high")
    with pytest.raises(FileNotFoundError, match="nothing"):
        PairedImageDataset(tmp_path / "nothing", tmp_path / "high")


def test_ambiguous_names_in_one_folder(tmp_path):
    write_pair(tmp_path / "low", tmp_path / "high", "low1.png")
    write_pair(tmp_path / "low", tmp_path / "other", "1.png")
    with pytest.raises(ValueError, match=r"ambiguous pairing.*1\.png.*low1\.png"):
        PairedImageDataset(tmp_path / "low", tmp_path / "high")


# ---------------------------------------------------------------- items, crops, augmentation


def test_eval_items_are_full_images(tmp_path):
    write_pair(tmp_path / "low", tmp_path / "high", "a.png", size=(10, 14))
    item = PairedImageDataset(tmp_path / "low", tmp_path / "high")[0]
    assert set(item) == {"low", "high", "name"} and item["name"] == "a.png"
    assert item["low"].shape == (3, 10, 14) and item["low"].dtype == torch.float32
    assert 0.0 <= item["low"].min() and item["high"].max() <= 1.0
    expected = np.asarray(Image.open(tmp_path / "low" / "a.png")).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(item["low"].numpy(), expected, atol=1e-6)


def _dihedral_candidates(img: np.ndarray) -> dict[str, np.ndarray]:
    """The reference's reachable transforms of an HxWxC array."""
    hflip = img[:, ::-1]
    return {
        "id": img,
        "v": img[::-1],
        "r": np.rot90(img, 1, (0, 1)),
        "h": hflip,
        "hv": hflip[::-1],
        "hr": np.rot90(hflip, 1, (0, 1)),
    }


def test_crop_and_augmentation_identical_on_both_images(tmp_path):
    write_pair(tmp_path / "low", tmp_path / "high", "a.png", size=(12, 16), seed=4)
    full = np.asarray(Image.open(tmp_path / "low" / "a.png")) / 255.0
    dataset = PairedImageDataset(tmp_path / "low", tmp_path / "high", crop_size=8, augment=True, seed=1)
    seen = set()
    for _ in range(40):
        item = dataset[0]
        assert item["low"].shape == item["high"].shape == (3, 8, 8)
        assert_high_is_twice_low(item)
        crop = item["low"].numpy().transpose(1, 2, 0)
        matches = {
            (name, top, left)
            for name, candidate in _dihedral_candidates(full).items()
            for top in range(candidate.shape[0] - 7)
            for left in range(candidate.shape[1] - 7)
            if np.allclose(candidate[top : top + 8, left : left + 8], crop, atol=1e-6)
        }
        assert matches, "the crop is not a transformed window of the image"
        seen.update(name for name, _, _ in matches)
    assert {"id", "h", "v", "r"} <= seen


def test_augmentation_frequencies_follow_reference(tmp_path):
    write_pair(tmp_path / "low", tmp_path / "high", "sq.png", size=(6, 6), seed=9)
    full = np.asarray(Image.open(tmp_path / "low" / "sq.png")) / 255.0
    candidates = _dihedral_candidates(full)
    dataset = PairedImageDataset(tmp_path / "low", tmp_path / "high", augment=True, seed=0)
    counts = dict.fromkeys(candidates, 0)
    n = 400
    for _ in range(n):
        out = dataset[0]["low"].numpy().transpose(1, 2, 0)
        (name,) = [k for k, c in candidates.items() if np.allclose(c, out, atol=1e-6)]
        counts[name] += 1
    hflip = (counts["h"] + counts["hv"] + counts["hr"]) / n
    vflip = (counts["v"] + counts["hv"]) / n
    rot = (counts["r"] + counts["hr"]) / n
    assert abs(hflip - 0.5) < 0.08 and abs(vflip - 0.25) < 0.07 and abs(rot - 0.25) < 0.07


def test_augmentation_keeps_shape_of_non_square_images(tmp_path):
    write_pair(tmp_path / "low", tmp_path / "high", "wide.png", size=(6, 10), seed=9)
    dataset = PairedImageDataset(tmp_path / "low", tmp_path / "high", augment=True, seed=3)
    for _ in range(30):
        item = dataset[0]
        assert item["low"].shape == (3, 6, 10)
        assert_high_is_twice_low(item)


def test_same_seed_same_crops_different_seed_different(tmp_path):
    for i in range(4):
        write_pair(tmp_path / "low", tmp_path / "high", f"{i}.png", seed=i)

    def crops(seed: int) -> list[torch.Tensor]:
        dataset = PairedImageDataset(
            tmp_path / "low", tmp_path / "high", crop_size=6, augment=True, seed=seed
        )
        return [dataset[i]["low"] for i in range(4)]

    first, again, other = crops(1), crops(1), crops(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_workers_draw_different_streams(tmp_path):
    for i in range(4):  # four identical pairs: only the random crops can tell items apart
        write_pair(tmp_path / "low", tmp_path / "high", f"{i}.png", seed=0)
    dataset = PairedImageDataset(tmp_path / "low", tmp_path / "high", crop_size=6, augment=True, seed=5)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(0))
    items = [batch["low"][0] for batch in loader]  # worker 0: items 0, 2; worker 1: items 1, 3
    assert not torch.equal(items[0], items[1]) or not torch.equal(items[2], items[3])
    next_epoch = [batch["low"][0] for batch in loader]  # fresh workers, fresh seeds
    assert not all(torch.equal(a, b) for a, b in zip(items, next_epoch, strict=True))


def test_image_smaller_than_crop_is_an_error_naming_it(tmp_path):
    write_pair(tmp_path / "low", tmp_path / "high", "tiny.png", size=(5, 9))
    dataset = PairedImageDataset(tmp_path / "low", tmp_path / "high", crop_size=8, augment=True)
    with pytest.raises(ValueError, match=r"tiny\.png.*9x5.*smaller than the 8x8"):
        dataset[0]


def test_pair_size_mismatch_is_an_error(tmp_path):
    write_pair(tmp_path / "low", tmp_path / "x", "a.png", size=(8, 8))
    write_pair(tmp_path / "y", tmp_path / "high", "a.png", size=(8, 9))
    with pytest.raises(ValueError, match=r"pair sizes differ.*a\.png.*8x8.*9x8"):
        PairedImageDataset(tmp_path / "low", tmp_path / "high")[0]


def test_unreadable_image_names_the_file(tmp_path):
    write_pair(tmp_path / "low", tmp_path / "high", "a.png")
    (tmp_path / "high" / "a.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match=r"high[/\\]a\.png"):
        PairedImageDataset(tmp_path / "low", tmp_path / "high")[0]


def test_grey_and_rgba_inputs_become_rgb(tmp_path):
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(tmp_path / "low" / "a.png")
    rgba = np.dstack([np.full((8, 8, 3), 80, np.uint8), np.zeros((8, 8), np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "high" / "a.png")
    item = PairedImageDataset(tmp_path / "low", tmp_path / "high", crop_size=4, augment=True)[0]
    assert item["low"].shape == item["high"].shape == (3, 4, 4)
    torch.testing.assert_close(item["low"], torch.full((3, 4, 4), 40 / 255))
    torch.testing.assert_close(item["high"], torch.full((3, 4, 4), 80 / 255))


def test_lol_layout_with_lossless_webp_pairs(tmp_path):
    """The LOL layout as shared here (lossless WebP, names 2 ... 789): the repo's own samples, no machine path."""
    names = ("2", "5", "6", "9")
    for side in ("low", "high"):
        (tmp_path / "our485" / side).mkdir(parents=True)
    for name in names:
        low = Image.open(ROOT / "samples" / f"lol_{name}.png").convert("RGB")
        low.save(tmp_path / "our485" / "low" / f"{name}.webp", lossless=True)
        low.point(lambda v: min(255, 4 * v)).save(tmp_path / "our485" / "high" / f"{name}.webp", lossless=True)
    dataset = PairedImageDataset.from_layout("LOL", tmp_path, "train", crop_size=160, augment=True, seed=0)
    assert [low.name for low, _ in dataset.pairs] == [f"{n}.webp" for n in names]
    item = dataset[0]
    assert item["low"].shape == (3, 160, 160)
    assert item["low"].mean() < item["high"].mean()
    decoded = read_image(tmp_path / "our485" / "low" / "2.webp").rgb
    original = np.asarray(Image.open(ROOT / "samples" / "lol_2.png").convert("RGB"), dtype=np.float32) / 255
    assert np.array_equal(decoded, original)  # lossless


# ---------------------------------------------------------------- datamodule


@pytest.mark.parametrize(
    "use_dataset,n_train,test_dir",
    [
        ("LOL", 3, "LOL/eval15/low"),
        ("LOLv2", 2, "LOLv2/Real_captured/Test/Low"),
        ("LOLv2_synthetic", 2, "LOLv2/Synthetic/Test/Low"),
        ("VELOL", 4, "VE-LOL-L/VE-LOL-L-Cap-Full/test/low"),
        ("LOL+LOLv2", 5, "LOL/eval15/low"),
        ("LOL+LOLv2+VELOL", 9, "LOL/eval15/low"),
    ],
)
def test_datamodule_combinations(roots, tmp_path, use_dataset, n_train, test_dir):
    dm = LowLightDataModule(use_dataset, roots=roots, image_size=8, train_batch_size=2, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_dataset) == n_train
    assert dm.val_dataset is None and dm.val_dataloader() == []
    batch = next(iter(dm.train_dataloader()))
    assert batch["low"].shape == batch["high"].shape == (2, 3, 8, 8)
    assert len(batch["name"]) == 2
    torch.testing.assert_close(batch["high"], batch["low"] * 2, atol=1e-6, rtol=0)
    dm.setup("test")
    assert dm.test_dataset.pairs[0][0].parent == tmp_path / test_dir


def test_combinations_cover_config_choices():
    assert set(DATASET_COMBINATIONS) == {
        "LOL",
        "LOLv2",
        "LOLv2_synthetic",
        "VELOL",
        "LOL+LOLv2",
        "LOL+LOLv2+VELOL",
        "folder",
    }


def test_datamodule_extra_folders_val_and_test(roots, tmp_path):
    synthetic = tmp_path / "synthetic"
    for i in range(3):
        write_pair(synthetic / "low", synthetic / "high", f"s{i}.png", seed=70 + i)
    val = tmp_path / "myval"
    write_pair(val / "low", val / "high", "v.png", size=(10, 14))
    dm = LowLightDataModule(
        "LOL",
        roots=roots,
        extra_train_folders=[str(synthetic)],
        val_folder=str(val),
        test_folder=str(Path(roots["VELOL"]) / "VE-LOL-L-Cap-Full" / "test"),
        image_size=8,
        train_batch_size=6,
        num_workers=0,
    )
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 + 3
    names = sorted(next(iter(dm.train_dataloader()))["name"])
    assert names == ["1.png", "2.png", "3.png", "s0.png", "s1.png", "s2.png"]
    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["low"].shape == (1, 3, 10, 14) and val_batch["name"] == ["v.png"]
    test_batches = list(dm.test_dataloader())
    assert [b["name"] for b in test_batches] == [["low00000.png"]]
    assert test_batches[0]["low"].shape == (1, 3, H, W)


def test_datamodule_folder_mode(tmp_path):
    folder = tmp_path / "pairs"
    write_pair(folder / "low", folder / "high", "a.png")
    with pytest.raises(ValueError, match="extra_train_folders"):
        LowLightDataModule("folder")
    dm = LowLightDataModule("folder", extra_train_folders=[str(folder)], image_size=4, num_workers=0)
    dm.setup()
    assert len(dm.train_dataset) == 1 and dm.test_dataset is None
    with pytest.raises(ValueError, match="set test_folder"):
        dm.test_dataloader()


def test_datamodule_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown use_dataset 'LOL4K'"):
        LowLightDataModule("LOL4K")
    with pytest.raises(ValueError, match="unknown roots key"):
        LowLightDataModule("LOL", roots={"lol": "x"})
    with pytest.raises(ValueError, match="image_size"):
        LowLightDataModule("LOL", image_size=0)
    dm = LowLightDataModule("LOL+LOLv2", roots={"LOL": str(tmp_path / "none")}, num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"LOL dataset \(train split\)"):
        dm.setup("fit")


def test_datamodule_setup_is_idempotent_and_loader_settings(roots):
    dm = LowLightDataModule("LOL", roots=roots, image_size=8, num_workers=2)
    dm.setup("fit")
    first = dm.train_dataset
    dm.setup("fit")
    dm.setup(None)
    assert dm.train_dataset is first and dm.test_dataset is not None
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    assert loader.pin_memory == torch.cuda.is_available()
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler)
    assert not LowLightDataModule("LOL", roots=roots, num_workers=0).test_dataloader().persistent_workers


def test_train_order_and_crops_follow_seed(roots):
    def first_batch(seed: int) -> dict:
        dm = LowLightDataModule(
            "LOL+LOLv2+VELOL", roots=roots, image_size=8, train_batch_size=4, num_workers=0, seed=seed
        )
        return next(iter(dm.train_dataloader()))

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert a["name"] == b["name"] and torch.equal(a["low"], b["low"])
    assert a["name"] != c["name"] or not torch.equal(a["low"], c["low"])


def test_eval_collate_refuses_mixed_sizes(tmp_path):
    write_pair(tmp_path / "low", tmp_path / "high", "small.png", size=(8, 8))
    write_pair(tmp_path / "low", tmp_path / "high", "wide.png", size=(8, 12))
    dm = LowLightDataModule(
        "folder",
        extra_train_folders=[str(tmp_path)],
        test_folder=str(tmp_path),
        eval_batch_size=2,
        num_workers=0,
    )
    message = r"different sizes: small\.png \(8x8\), wide\.png \(12x8\).*eval_batch_size=1"
    with pytest.raises(ValueError, match=message):
        next(iter(dm.test_dataloader()))
    items = [{"low": torch.zeros(3, 4, 4), "high": torch.ones(3, 4, 4), "name": n} for n in "ab"]
    batch = collate_pairs(items)
    assert batch["low"].shape == (2, 3, 4, 4) and batch["name"] == ["a", "b"]


class _CountingModule(pl.LightningModule):
    """Records the shapes of the batches Lightning hands it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_shapes: list[tuple] = []
        self.val_shapes: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.train_shapes.append(tuple(batch["low"].shape))
        return ((batch["low"] * self.weight - batch["high"]) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_shapes.append(tuple(batch["low"].shape))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("with_val", [False, True])
def test_lightning_fit_with_and_without_validation(roots, tmp_path, with_val):
    dm = LowLightDataModule(
        "LOL",
        roots=roots,
        image_size=8,
        train_batch_size=2,
        num_workers=0,
        val_folder=str(Path(roots["LOL"]) / "eval15") if with_val else None,
    )
    module = _CountingModule()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert module.train_shapes == [(2, 3, 8, 8), (1, 3, 8, 8)]
    assert module.val_shapes == ([(1, 3, H, W)] * 2 if with_val else [])

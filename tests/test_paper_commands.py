"""The commands of the paper's README, typed as it writes them from a checkout's root: on tiny data in the paper's
folder layout each one runs to a result, and where the datasets or the paper's checkpoint are missing it stops at a
one-line message about them (never a missing config, never a traceback), having written nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

import test as test_script
import test_unpaired
import train
from tests.conftest import default_signals
from tests.test_reliability import (
    TINY_MODEL,
    assert_kept,
    assert_one_error,
    make_pairs,
    noise,
    run_in_process,
    save_tiny_checkpoint,
    snapshot,
)
from tests.test_two_step import TS_MODEL
from utils.cli import PAPER_DOWNLOAD
from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train.py": train, "test.py": test_script, "test_unpaired.py": test_unpaired}

PAPER_COMMANDS = {  # the paper's README, command for command, then the configs of its repository's TS/ folder
    "train": ["train.py", "--cfg", "cfg/train/FS/train.yaml"],
    "test_LOL": ["test.py"],
    "test_VELOL": ["test.py", "--cfg", "cfg/test/FS/test_VELOL.yaml"],
    "test_LOLv2": ["test.py", "--cfg", "cfg/test/FS/test_LOLv2.yaml"],
    "unpaired": ["test_unpaired.py", "--cfg", "cfg/test/test_unpaired.yaml"],
    "TS_train": ["train.py", "--cfg", "cfg/train/TS/two_step.yaml"],
    "TS_test": ["test.py", "--cfg", "cfg/test/TS/test.yaml"],
}
TEST_SPLITS = {  # the paper's README's data/ tree, with the folder names the datasets ship with: split -> (low, high)
    "data/LOL/eval15": ("low", "high"),
    "data/LOLv2/Real_captured/Test": ("Low", "Normal"),
    "data/VE-LOL-L/VE-LOL-L-Cap-Full/test": ("low", "high"),
}
TRAIN_SPLITS = {"data/LOL/our485": ("low", "high"), "data/LOLv2/Real_captured/Train": ("Low", "Normal"),
                "data/VE-LOL-L/VE-LOL-L-Cap-Full/train": ("low", "high")}
TEST_PAIRS = {"data/LOL/eval15": 1, "data/LOLv2/Real_captured/Test": 2, "data/VE-LOL-L/VE-LOL-L-Cap-Full/test": 3}
"""Each test split holds its own number of pairs, so a report tells which split it scored."""
PAIR_SIZE = (44, 52)
"""Not a multiple of the tiny models' padding (8): the TS geometry crops it to 40x48, the FS one keeps it."""
FS_CHECKPOINT, TS_CHECKPOINT = Path("model/FS_final.ckpt"), Path("model/twostep_final.ckpt")
MISSING_DATA = r"LOL dataset \(test split\) not found: missing folder\(s\) data/LOL/eval15/low, data/LOL/eval15/high"
MISSING_TRAIN_DATA = (r"LOL dataset \(train split\) not found: missing folder\(s\) data/LOL/our485/low, "
                      r"data/LOL/our485/high")
MISSING_FS = (r"checkpoint not found: model/FS_final\.ckpt, the paper's released checkpoint, which "
              r"cfg/test/FS/{}\.yaml names\. The paper's README links its trained models \(\"Pretrained Models\": "
              + PAPER_DOWNLOAD.replace("?", r"\?") + r"\): put FS_final\.ckpt at model/FS_final\.ckpt, or pass "
              r"--ckpt PATH \(--ckpt checkpoints/default\.ckpt runs the bundled model instead\)$")
MISSING_TS = r"checkpoint not found: model/twostep_final\.ckpt, the paper's two-step \(TS\) checkpoint, .*put " \
             r"twostep_final\.ckpt at model/twostep_final\.ckpt, or pass --ckpt PATH"
TINY_TRAINING = ["model.unet_dim=8", "model.dim_mults=[1,2,2]", "diffusion.pad_multiple=8", "data.image_size=32",
                 "data.train_batch_size=2", "data.num_workers=0", "val_sampler.sampler=ddim", "val_sampler.steps=2"]
"""Overrides that shrink the paper's training runs to a CPU test (the data and everything else as they are)."""


@pytest.fixture
def clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory of a fresh clone: this project's cfg/ (a copy: a test may edit it as the paper's README
    says) and nothing else; no datasets, no model/ folder."""
    shutil.copytree(ROOT / "cfg", tmp_path / "cfg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def add_datasets(root: Path, splits: dict[str, tuple[str, str]]) -> None:
    for split, (low, high) in splits.items():
        folder = make_pairs(root / split, n=TEST_PAIRS.get(split, 2), size=PAIR_SIZE, seed=len(split))
        (folder / "low").rename(folder / f"{low}.tmp")  # case-only renames, through a temporary name
        (folder / f"{low}.tmp").rename(folder / low)
        (folder / "high").rename(folder / high)


def add_checkpoints(root: Path) -> None:
    """Tiny stand-ins for the paper's checkpoints, where its configs expect them."""
    (root / "model").mkdir()
    save_tiny_checkpoint(root / FS_CHECKPOINT)
    save_tiny_checkpoint(root / TS_CHECKPOINT, model={**TINY_MODEL, "model": {**TINY_MODEL["model"], **TS_MODEL}})


def run(command: list[str], capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    script, *argv = command
    return run_in_process(SCRIPTS[script], [*argv, *extra], capsys)


def test_the_paper_configs_are_this_projects_own():
    """Each of the paper's config paths means what the reference's file means, read from this project's config of
    the same run (one source): the paper's checkpoint path is all the FS and TS test configs add."""
    config = lambda name: load_config(ROOT / "cfg" / name).to_dict()  # noqa: E731
    assert config("train/FS/train.yaml") == config("train/faithful.yaml")
    assert config("train/TS/two_step.yaml") == config("train/ts_diffusion.yaml")
    for paper, ours in [("FS/test.yaml", "LOL.yaml"), ("FS/test_VELOL.yaml", "VELOL.yaml"),
                        ("FS/test_LOLv2.yaml", "LOLv2.yaml"), ("TS/test.yaml", "LOL_TS.yaml")]:
        theirs, mine = config(f"test/{paper}"), config(f"test/{ours}")
        assert theirs["checkpoint"] == str(TS_CHECKPOINT if paper.startswith("TS") else FS_CHECKPOINT)
        assert {**theirs, "checkpoint": None} == mine
    unpaired = load_config(ROOT / "cfg/test/test_unpaired.yaml")
    assert unpaired.checkpoint == str(FS_CHECKPOINT)
    assert (unpaired.test_folder_unpaired, unpaired.results_folder_unpaired) == (None, None)


@pytest.mark.parametrize("name, message", [
    ("train", MISSING_TRAIN_DATA),
    ("test_LOL", MISSING_DATA),
    ("test_VELOL", MISSING_FS.format("test_VELOL")),
    ("test_LOLv2", MISSING_FS.format("test_LOLv2")),
    ("unpaired", r"^error: cfg/test/test_unpaired\.yaml sets no test_folder_unpaired: write the folder of your "
                 r"images there \(test_folder_unpaired: my_image_folder\) or pass --input$"),
    ("TS_train", MISSING_TRAIN_DATA),
    ("TS_test", MISSING_TS),
])
def test_on_a_fresh_clone_each_command_says_what_is_missing(clone, capsys, name, message):
    before = snapshot(clone)
    code, _, err = run(PAPER_COMMANDS[name], capsys)
    assert code == 2
    assert_one_error(err, message)
    assert "config file not found" not in err
    assert_kept(before, clone, nothing_new=True)


def test_with_the_datasets_the_paper_configs_want_the_papers_checkpoint(clone, capsys):
    """The bundled checkpoint never stands in for the paper's: its configs stop and say where to put it; our own
    default (test.py without --cfg) runs the bundled checkpoint and says so."""
    add_datasets(clone, TEST_SPLITS)
    (clone / "my_image_folder").mkdir()
    Image.fromarray(noise((20, 28), 1, 60)).save(clone / "my_image_folder" / "dark.png")
    unpaired = clone / "cfg/test/test_unpaired.yaml"
    unpaired.write_text(unpaired.read_text().replace("test_folder_unpaired: null", "test_folder_unpaired: "
                                                     "'my_image_folder'").replace("results_folder_unpaired: null",
                                                                                  "results_folder_unpaired: out"))
    before = snapshot(clone)
    for name, message in [("test_VELOL", MISSING_FS.format("test_VELOL")),
                          ("test_LOLv2", MISSING_FS.format("test_LOLv2")), ("TS_test", MISSING_TS),
                          ("unpaired", r"checkpoint not found: model/FS_final\.ckpt, the paper's released checkpoint, "
                                       r"which cfg/test/test_unpaired\.yaml names")]:
        code, _, err = run(PAPER_COMMANDS[name], capsys)
        assert code == 2
        assert_one_error(err, message)
    assert_kept(before, clone, nothing_new=True)
    code, _, err = run(PAPER_COMMANDS["test_LOL"], capsys, "--device", "cpu")
    assert code == 0
    assert "checkpoint: the bundled checkpoints/default.ckpt (--ckpt PATH runs another; the paper's FS_final.ckpt: " \
           "--cfg cfg/test/FS/test.yaml)" in err
    report = json.loads((clone / "results/LOL/metrics.json").read_text())
    assert Path(report["checkpoint"]["path"]) == ROOT / "checkpoints/default.ckpt" and report["n"] == 1


def test_every_test_command_scores_its_split_with_the_papers_checkpoint(clone, capsys):
    add_datasets(clone, TEST_SPLITS)
    add_checkpoints(clone)
    for name, split, results, checkpoint, size in [
        ("test_VELOL", "data/VE-LOL-L/VE-LOL-L-Cap-Full/test", "results/FS/test_VELOL", FS_CHECKPOINT, PAIR_SIZE),
        ("test_LOLv2", "data/LOLv2/Real_captured/Test", "results/FS/test_LOLv2", FS_CHECKPOINT, PAIR_SIZE),
        ("TS_test", "data/LOL/eval15", "results/TS/test", TS_CHECKPOINT, (40, 48)),
    ]:
        code, out, err = run(PAPER_COMMANDS[name], capsys, "--device", "cpu")
        assert code == 0, err
        assert f"results in {results}" in out and "checkpoint: the bundled" not in err
        report = json.loads((clone / results / "metrics.json").read_text())
        assert report["checkpoint"]["path"] == str(checkpoint) and report["n"] == TEST_PAIRS[split]
        assert (report["sampler"]["sampler"], report["sampler"]["steps"]) == ("ddim", 2)  # the checkpoint's own
        high = TEST_SPLITS[split][1]
        psnrs = []
        for row in report["per_image"]:
            enhanced = np.asarray(Image.open(clone / results / row["name"]))
            assert enhanced.shape[:2] == size
            gt = np.asarray(Image.open(clone / split / high / row["name"]))
            top, left = (gt.shape[0] - size[0]) // 2, (gt.shape[1] - size[1]) // 2
            psnrs.append(peak_signal_noise_ratio(gt[top:top + size[0], left:left + size[1]], enhanced, data_range=255))
            assert row["psnr"] == pytest.approx(psnrs[-1], abs=1e-9)
        assert report["psnr"] == pytest.approx(np.mean(psnrs))


def test_test_unpaired_enhances_the_folders_set_in_the_file(clone, capsys):
    add_checkpoints(clone)
    inputs = clone / "my_image_folder"
    inputs.mkdir()
    for i, size in enumerate([(20, 28), (13, 21)]):
        Image.fromarray(noise(size, i, 60)).save(inputs / f"dark_{i}.png")
    unpaired = clone / "cfg/test/test_unpaired.yaml"
    edited = unpaired.read_text().replace("test_folder_unpaired: null", "test_folder_unpaired: 'my_image_folder'")
    unpaired.write_text(edited.replace("results_folder_unpaired: null", "results_folder_unpaired: 'my_image_results'"))

    code, out, err = run(PAPER_COMMANDS["unpaired"], capsys, "--device", "cpu")
    assert code == 0, err
    assert "wrote 2 image(s) to my_image_results" in out
    written = {p.name: np.asarray(Image.open(p)) for p in sorted((clone / "my_image_results").iterdir())}
    assert {name: image.shape for name, image in written.items()} == {"dark_0.png": (20, 28, 3),
                                                                      "dark_1.png": (13, 21, 3)}
    by_flags = clone / "by_flags"
    assert run(["test_unpaired.py"], capsys, "--input", str(inputs), "--output", str(by_flags), "--ckpt",
               str(FS_CHECKPOINT), "--device", "cpu")[0] == 0
    for name, image in written.items():  # the file's folders and checkpoint are those the flags name
        assert np.array_equal(image, np.asarray(Image.open(by_flags / name)))

    before = snapshot(clone)
    code, _, err = run(PAPER_COMMANDS["unpaired"], capsys, "--device", "cpu")
    assert code == 2
    assert_one_error(err, r"2 output file\(s\) already exist \(e\.g\. my_image_results/dark_0\.png\); pass "
                          r"--overwrite to replace them or choose another results_folder_unpaired$")
    assert_kept(before, clone, nothing_new=True)
    assert run(PAPER_COMMANDS["unpaired"], capsys, "--device", "cpu", "--overwrite")[0] == 0
    code, out, _ = run(PAPER_COMMANDS["unpaired"], capsys, "--device", "cpu", "--output", "elsewhere")
    assert code == 0 and "wrote 2 image(s) to elsewhere" in out  # a flag wins over the file

    unpaired.write_text(edited.replace("results_folder_unpaired: null", "results_folder_unpaired: out")
                        .replace("'my_image_folder'", "'my_images'"))
    code, _, err = run(PAPER_COMMANDS["unpaired"], capsys)
    assert code == 2
    assert_one_error(err, r"^error: test_folder_unpaired: no such file or folder: 'my_images'$")
    unpaired.write_text(edited)
    before = snapshot(clone)
    code, _, err = run(PAPER_COMMANDS["unpaired"], capsys)
    assert code == 2
    assert_one_error(err, r"sets no results_folder_unpaired: write the folder for the results there "
                          r"\(results_folder_unpaired: my_image_results\) or pass --output$")
    assert_kept(before, clone, nothing_new=True)


def test_the_training_commands_train_on_the_paper_layout(clone, capsys):
    """FS: one training and one validation batch of the paper's run on the three training sets (shrunk to a CPU
    model); TS: the last stage asks for the earlier stage's checkpoint, before writing anything."""
    add_datasets(clone, {**TRAIN_SPLITS, "data/LOL/eval15": ("low", "high")})
    code, _, err = run(PAPER_COMMANDS["train"], capsys, *TINY_TRAINING, "optim.dfpl_image_loss=l1",
                       "trainer.monitor=val/psnr", "--fast-dev-run")
    assert code == 0, err
    before = snapshot(clone)
    code, _, err = run(PAPER_COMMANDS["TS_train"], capsys, *TINY_TRAINING)
    assert code == 2
    assert_one_error(err, r"init_from: no checkpoint at runs/ts_he/version_0/checkpoints/last\.ckpt \(train the "
                          r"earlier stage first, or fix the path\)")
    assert_kept(before, clone, nothing_new=True)


@pytest.mark.parametrize("name", ["test_VELOL", "unpaired"])
def test_as_typed_in_a_shell(clone, name):
    """The scripts themselves, as the paper's README runs them: exit status 2, one line, no traceback."""
    script, *argv = PAPER_COMMANDS[name]
    done = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=clone, capture_output=True, text=True,
                          preexec_fn=default_signals, timeout=300)
    assert done.returncode == 2
    assert_one_error(done.stderr, "checkpoint not found" if name == "test_VELOL" else "sets no test_folder_unpaired")

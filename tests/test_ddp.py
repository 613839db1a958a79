"""Multi-process DDP training on CPU (gloo): two ranks, different data, files written by rank 0 only, validation
metrics reduced across ranks.

train.py runs as a real process under a few-line wrapper script that adds one test-only callback, recording per
rank what the rank saw; Lightning's DDP launcher starts the second rank by running the same script again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import default_signals

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = '''
import os
import signal
import sys
sys.path.insert(0, {root!r})
from pathlib import Path

import torch
from pytorch_lightning.callbacks import Callback

import train
from utils.cli import run_cli
from utils.metrics import score_pair

LOG = Path({log!r})
SIGTERM_RANK1_AT = {sigterm_rank1_at!r}  # optimizer steps done when rank 1 alone gets SIGTERM (None: never)


class Record(Callback):
    """Appends to rank<N>.txt: the process group, each training batch's names, each validation image's PSNR
    computed on this rank alone, and the val/psnr Lightning logged (after any cross-rank reduction)."""

    def _write(self, trainer, line):
        with (LOG / f"rank{{trainer.global_rank}}.txt").open("a") as f:
            f.write(line + "\\n")

    def on_train_start(self, trainer, pl_module):
        self._write(trainer, f"group {{torch.distributed.get_backend()}} {{trainer.world_size}}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._write(trainer, "train " + " ".join(batch["name"]))
        if trainer.global_rank == 1 and trainer.global_step == SIGTERM_RANK1_AT:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            result = pl_module.enhance(batch["low"], pl_module.config.val_sampler)
            psnr = score_pair(result.image[0], batch["high"][0])["psnr"]
            self._write(trainer, f"val {{batch['name'][0]}} {{psnr!r}}")

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._write(trainer, f"logged {{float(trainer.callback_metrics['val/psnr'])!r}}")


original = train.build_callbacks
train.build_callbacks = lambda *args, **kwargs: [*original(*args, **kwargs), Record()]
sys.exit(run_cli(train.main, train.USER_ERRORS))
'''


def make_pairs(root: Path, names: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for sub in ("low", "high"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        high = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(high).save(root / "high" / name)
        Image.fromarray((high * rng.uniform(0.1, 0.4)).astype(np.uint8)).save(root / "low" / name)
    return root


def run_ddp(tmp_path: Path, *overrides: str, sigterm_rank1_at: int | None = None) -> tuple[int, str]:
    """train.py under the recording wrapper on 2 CPU processes: (exit status, stderr)."""
    train_pairs = make_pairs(tmp_path / "train", [f"t{i}.png" for i in range(4)], seed=0)
    val_pairs = make_pairs(tmp_path / "val", ["v0.png", "v1.png"], seed=1)
    (tmp_path / "log").mkdir()
    script = tmp_path / "train_recorded.py"
    script.write_text(WRAPPER.format(root=str(ROOT), log=str(tmp_path / "log"), sigterm_rank1_at=sigterm_rank1_at))
    argv = ["--cfg", str(ROOT / "cfg" / "train" / "tiny.yaml"), "--no-test",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
            f"data.extra_train_folders=[{train_pairs}]", f"data.val_folder={val_pairs}", "data.train_batch_size=1",
            "trainer.max_steps=-1", "trainer.log_every_n_steps=1", f"trainer.output_dir={tmp_path / 'runs'}",
            *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        # its own process group: on a timeout, rank 1 (started by rank 0) goes too
        proc = subprocess.Popen([sys.executable, str(script), *argv], cwd=ROOT, env=env, stdout=out, stderr=err,
                                start_new_session=True, preexec_fn=default_signals)
        try:
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return proc.returncode, (tmp_path / "err.txt").read_text()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    code, stderr = run_ddp(tmp_path, "trainer.max_epochs=1")
    assert code == 0, stderr[-4000:]
    assert "Traceback" not in stderr
    log, runs = tmp_path / "log", tmp_path / "runs"

    seen = {rank: (log / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)}
    assert sorted(p.name for p in log.iterdir()) == ["rank0.txt", "rank1.txt"]
    for lines in seen.values():
        assert lines[0] == "group gloo 2"
    # each rank trained on its own half of the data (Lightning's DistributedSampler)
    train_names = {rank: [n for line in lines if line.startswith("train ") for n in line.split()[1:]]
                   for rank, lines in seen.items()}
    assert len(train_names[0]) == len(train_names[1]) == 2
    assert not set(train_names[0]) & set(train_names[1])
    assert sorted(train_names[0] + train_names[1]) == [f"t{i}.png" for i in range(4)]
    # each rank validated one image; the logged val/psnr is the mean over both ranks (sync_dist), on both ranks
    val = {rank: [line.split() for line in lines if line.startswith("val ")] for rank, lines in seen.items()}
    assert sorted(v[0][1] for v in val.values()) == ["v0.png", "v1.png"]
    local = [float(v[0][2]) for v in val.values()]
    assert abs(local[0] - local[1]) > 0.1  # so that a missing reduction would show
    logged = [float(line.split()[1]) for lines in seen.values() for line in lines if line.startswith("logged ")]
    assert len(logged) == 2 and logged[0] == logged[1]
    assert logged[0] == pytest.approx(np.mean(local), abs=1e-4)

    # rank 0 alone wrote the run: one folder, one config, one TensorBoard file, the checkpoints
    assert [p.name for p in (runs / "tiny").iterdir()] == ["version_0"]
    run = runs / "tiny" / "version_0"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert sorted(set(files) - set(events)) == ["checkpoints/best-step=2.ckpt", "checkpoints/last.ckpt",
                                                "config.yaml", "hparams.yaml"]


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path):
    code, stderr = run_ddp(tmp_path, "trainer.max_epochs=2", sigterm_rank1_at=1)  # 2 steps per epoch
    assert code == 128 + signal.SIGTERM, stderr[-4000:]
    assert "SIGTERM received: stopped after step 2" in stderr and "Traceback" not in stderr
    for rank in (0, 1):  # both ranks trained two steps, and skipped the validation that was due
        lines = (tmp_path / "log" / f"rank{rank}.txt").read_text().splitlines()
        assert [line.split()[0] for line in lines] == ["group", "train", "train"]
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2

"""An interrupted training run with DataLoader workers exits, the signal sent to its main process alone or its group.

``kill -TERM <pid>`` (or Ctrl-C reaching the main process only) stops training after the running step with
``last.ckpt`` saved; the process must then exit, its workers with it, although the workers ignore SIGINT and SIGTERM
(data.datamodule.leave_signals_to_main_process). With a validation loop, Lightning validates once training is told
to stop, so the stop is raised from ``on_validation_start``; Lightning then tears down the validation loop only, and
the training loader's persistent worker would outlive ``main()``: multiprocessing's exit handler SIGTERMs it
(ignored) and joins it forever, unless data.datamodule.LowLightDataModule.on_exception shuts it down.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from models.checkpoint import read_checkpoint
from tests.test_reliability import finish, make_pairs, start, train_argv, world  # noqa: F401  (world: a fixture)

EXIT_WITHIN = 60
"""Seconds the process may take to exit after the signal (the running step, saving last.ckpt, shutting down)."""


def group_is_gone(pgid: int, timeout: float) -> bool:
    """True once no process of the group ``pgid`` is left (within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "group"), [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM-main-process", "SIGINT-main-process", "SIGTERM-process-group"])
def test_an_interrupted_run_with_workers_and_validation_exits(world, signum, group):  # noqa: F811
    """A persistent DataLoader worker for training and one for validation (its sanity check); validation is not
    due when the signal comes. The signal goes to the main process alone, or to the whole group (Slurm)."""
    data = make_pairs(world.root / "four", n=4)
    argv = train_argv(world, "trainer.max_steps=100000", "trainer.max_epochs=100000", "data.num_workers=1",
                      f"data.val_folder={world.pairs}", "trainer.val_check_interval=100000",
                      "trainer.check_val_every_n_epoch=null", "trainer.checkpoint_every_n_steps=1", data=data)
    run = world.runs / "tiny" / "version_1"
    logs = world.root.parent / "logs"
    # in a session of its own (default signal dispositions, see tests.conftest.default_signals), so that whatever
    # it leaves behind can be killed as a group
    proc = start(["train.py", *argv], logs, own_group=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None, (logs / "err.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.02)
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        sent = time.monotonic()
        try:
            code, err = finish(proc, logs, timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            err = (logs / "err.txt").read_text()
            pytest.fail(f"still running {EXIT_WITHIN} s after {signal.Signals(signum).name} (killed): {err[-3000:]}")
        assert code == 128 + signum, err[-3000:]
        name = signal.Signals(signum).name
        stopped = re.search(rf"interrupted: {name} received: stopped after step (\d+); "
                            rf"saved {run}/checkpoints/last\.ckpt", err)
        assert stopped and "Traceback" not in err, err[-3000:]
        assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == int(stopped.group(1)) >= 1
        assert group_is_gone(proc.pid, timeout=10), "a DataLoader worker outlived the training process"
        assert time.monotonic() - sent < EXIT_WITHIN
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group started above: a hung main process and its workers
        except ProcessLookupError:
            pass

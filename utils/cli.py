"""What every command-line script shares: clear one-line errors and device selection."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from utils.choices import precision_error
from utils.config import PRECISIONS, Config, ConfigError, DetailName, SamplerConfig, SamplerName, check_sampler

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(RuntimeError):
    """A problem the user can fix (bad path, flag or file); printed as one line, exit code 2."""


def run_cli(main: Callable[[Sequence[str] | None], int | None], user_errors: tuple[type[BaseException], ...] = (),
            argv: Sequence[str] | None = None) -> int:
    """Run ``main`` and turn expected failures into ``error: ...`` on stderr and a non-zero exit code."""
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print("interrupted: nothing was left half-written; earlier outputs are untouched", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = _user_message(err, (UserError, *user_errors))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def _user_message(err: Exception, user_errors: tuple[type[BaseException], ...]) -> str | None:
    """The one-line message of an expected failure, or None for a bug (which keeps its traceback). A DataLoader
    worker's error reaches the main process re-raised as its type or as RuntimeError, with the worker's whole
    traceback as message: its last line is what the user needs."""
    text = str(err).strip()
    worker = _WORKER_ERROR.match(text)
    if worker is not None:
        names = {cls.__name__ for base in user_errors for cls in _subclasses(base)}
        if worker.group(1) not in names:
            return None
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, user_errors):
        return text or type(err).__name__
    return None


def _subclasses(cls: type) -> set[type]:
    return {cls}.union(*(_subclasses(sub) for sub in cls.__subclasses__()))


def ensure_output_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """Create the folder ``path`` (named by ``flag`` in messages) and prove it writable by creating and removing a
    file in it; a UserError says why not (a file in the way, no permission, read-only file system)."""
    path = Path(path)
    probe = path / f".write-test-{secrets.token_hex(6)}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        raise UserError(f"{flag} {path}: cannot write there ({err.strerror or type(err).__name__}{where})") from None
    return path


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a usable torch.device, or a UserError saying why not."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UserError(f"unsupported device '{name}'; use auto, cpu, cuda or cuda:N")
    return device


def add_inference_args(parser: argparse.ArgumentParser, defaults: SamplerConfig | None = None,
                       config_checkpoint: bool = False) -> None:
    """The flags test.py, test_unpaired.py and the demo share: checkpoint, sampler, device. Without
    ``defaults`` the sampler flags default to None (the config's sampler then applies). ``config_checkpoint``: the
    script's --cfg file may name the checkpoint (:func:`checkpoint_for`)."""
    d = defaults
    fallback = "the --cfg file's checkpoint, else " if config_checkpoint else ""
    parser.add_argument("--ckpt", help=f"checkpoint: ours or the paper's FS_final.ckpt (default: {fallback}the "
                                       "bundled checkpoints/default.ckpt)")
    parser.add_argument("--sampler", choices=typing.get_args(SamplerName), default=d and d.sampler,
                        help="ddpm: the paper's 100-step sampler; ddim: exact few-step sampler; anchor: no "
                             "diffusion steps, the anchor itself (one network pass, a preview) "
                             f"(default: {d.sampler if d else 'the config'})")
    parser.add_argument("--steps", type=int, default=d and d.steps,
                        help=f"sampling steps; ddpm needs all timesteps (default: {d.steps if d else 'the config'})")
    parser.add_argument("--eta", type=float, default=d and d.eta,
                        help="ddim noise: 0 deterministic, 1 = the DDPM posterior (default: "
                             f"{d.eta if d else 'the config'})")
    parser.add_argument("--seed", type=int, default=d and d.seed,
                        help="seed of the sampler's noise, for reproducible stochastic sampling")
    parser.add_argument("--detail", choices=typing.get_args(DetailName), default=d and d.detail,
                        help="where fine detail comes from: model (the network's pixels, the paper) or input (the "
                             "photo's own detail and, where lit, its colours, re-exposed by the model; "
                             f"models/detail.py) (default: {d.detail if d else 'the config'})")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="network arithmetic: fp32 (default, exact); bf16 or fp16 autocast, faster on CUDA "
                             "GPUs (fp16 needs CUDA; bf16 is emulated and much slower on CPUs without native bf16)")


PAPER_CHECKPOINTS = {"FS_final.ckpt": "the paper's released checkpoint",
                     "twostep_final.ckpt": "the paper's two-step (TS) checkpoint"}
"""The checkpoints of the paper's repository, by file name, that configs of cfg/ name (its paths: model/<name>)."""
PAPER_DOWNLOAD = "https://1drv.ms/u/s!AvJJYu8Th24UjKJp4oGJqDoYNlOiKQ?e=h5qwHO"
"""Where the paper's README ("Testing", "Pretrained Models") says its trained models can be downloaded."""


def checkpoint_for(ckpt: str | None, config: Config, cfg: str | None) -> str | None:
    """The checkpoint a script runs: ``--ckpt`` when given, else the ``checkpoint`` of the config file ``cfg``, else
    None (the bundled checkpoints/default.ckpt). A config's checkpoint that is missing is a UserError saying where
    to put it (and, for the paper's, where to get it): the bundled checkpoint never stands in for it."""
    if ckpt is not None or config.checkpoint is None:
        return ckpt
    path = Path(config.checkpoint)
    if path.is_file():
        return config.checkpoint
    paper = PAPER_CHECKPOINTS.get(path.name)
    if paper:
        where = (f"{path}, {paper}, which {cfg} names. The paper's README links its trained models (\"Pretrained "
                 f"Models\": {PAPER_DOWNLOAD}): put {path.name} at {path}")
    else:
        where = f"{path}, which {cfg} names (checkpoint). Put the checkpoint there"
    raise UserError(f"checkpoint not found: {where}, or pass --ckpt PATH (--ckpt checkpoints/default.ckpt runs the "
                    "bundled model instead)")


def check_precision(precision: str, device: torch.device) -> str:
    """``precision`` if ``device`` can run it (:func:`utils.choices.precision_error`), else a UserError."""
    if (error := precision_error(precision, device.type)) is not None:
        raise UserError(f"--{error}")
    return precision


def sampler_from_args(args: argparse.Namespace, base: SamplerConfig, timesteps: int) -> SamplerConfig:
    """``base`` with the sampler flags of :func:`add_inference_args` that were given, validated."""
    given = {k: getattr(args, k) for k in ("sampler", "steps", "eta", "seed", "detail") if getattr(args, k) is not None}
    sampler = dataclasses.replace(base, **given)
    try:
        check_sampler(sampler, timesteps, "--")
    except ConfigError as err:
        raise UserError(str(err)) from None
    return sampler

"""Typed, validated configuration.

A config is a tree of dataclasses whose defaults are the reference (faithful) settings of the paper's
public code, so a YAML file only lists what it changes. Loading validates every key and type: a misspelt
key is an error naming the nearest valid one. Dotted command-line overrides (``model.unet_dim=32``) go
through the same validation.

A config file may name other config files under ``base`` (a file name or a list of them, relative to the file):
their settings come first, in order, and the file's own settings go on top, section by section; so a file that
differs from another in one key says only that key.

Every choice (schedules, samplers, losses, datasets, stages, ...) is declared once, as a ``typing.Literal`` in
:mod:`utils.choices`: the fields are typed with it, so loading refuses any other value naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from utils.choices import (  # noqa: F401 - the choices are part of the config's interface
    PRECISIONS,
    AnchorLossName,
    AnchorTarget,
    BetaSchedule,
    DatasetName,
    DetailName,
    DiffusionDomain,
    ImageLossName,
    LossType,
    MonitorMode,
    NoiseLossName,
    OptimizerName,
    Precision,
    Prediction,
    SamplerName,
    SamplingStart,
    SchedulerName,
    Stage,
    SynthKind,
    TestGeometry,
    TrainTimesteps,
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and why."""


@dataclass
class ModelConfig:
    """Architecture of the noise-predicting UNet and the anchor encoder (which share widths)."""

    unet_dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 2, 4, 4, 8)
    in_dim: int = 6
    unet_outdim: int = 3
    cond_in_dim: int = 12
    use_wn: bool = True
    cond_use_wn: bool = True
    use_instance_norm: bool = True
    weight_init: bool = True
    stronger_cond: bool = True
    cond_on_res: bool = True
    cond_zero_residual: bool = False
    cond_dim: int | None = None
    """Width of the anchor encoder (None: ``unet_dim``); may differ only without ``stronger_cond``."""
    he_network: bool = False
    """The two-step (TS) variant: an HE network H (the UNet's width and input channels) maps [HE(lr), img_c] to
    zeta, and the anchor is the screen blend zeta + (1 - zeta) img_c of it and the sigmoid encoder output img_c
    (needs ``cond_on_res: false``). The TS reference also has ``stronger_cond: false``."""
    he_on_res: bool = True
    """H's output: clamp(final conv + HE(lr), 0, 1) (the reference, which reads its diffusion ``on_res``), or
    sigmoid(final conv)."""
    unet_sees_anchor: bool = False
    """The UNet takes the anchor c as a third input beside x_t and the low-light image (``in_dim`` + 3 channels);
    the reference gives it x_t and the image only. Needs ``diffusion.use_center`` (no anchor without DRDA)."""


@dataclass
class DiffusionConfig:
    """Noise schedule and the anchoring switches (DRDA in ``q_sample``, DRDS in ``q_posterior``)."""

    timesteps: int = 100
    beta_schedule: BetaSchedule = "cosine"
    use_center: bool = True
    use_center_sampler: bool = True
    clip_denoised: bool = True
    pad_multiple: int = 32
    prediction: Prediction = "eps"
    """What the UNet outputs: eps* (the paper), x0, or v = sqrt(abar_t) eps* - sqrt(1 - abar_t) x0 (Salimans & Ho);
    x0 and v stay well-conditioned where abar_t -> 0, which a sampler of few steps starts at."""
    domain: DiffusionDomain = "residual"
    """What x0 is: the residual 2 (hr - lr) - 1 (the paper, which cannot go darker than the input) or the image
    2 hr - 1 itself."""
    scale: float = 1.0
    """What is diffused is c' + (x0 - c') / scale, the distance from the anchor magnified by 1 / scale: a good
    anchor leaves little to add (x0 - c' has a standard deviation of about 0.1), which the schedule's noise would
    otherwise drown at every t. 1 is the paper."""
    sampling_start: SamplingStart = "anchor"
    """Where the reverse process starts: x_T = c' (the reference; without DRDS, N(0, I)), or ``marginal``:
    s + sqrt(1 - abar_T) z, DRDA's forward marginal at T with x0 taken to be the anchor (s = c' with DRDS, else
    0), which is what training saw at t = T."""




@dataclass
class SamplerConfig:
    """How images are sampled: ``ddpm`` is the paper's 100-step sampler, ``ddim`` the exact few-step one."""

    sampler: SamplerName = "ddpm"
    steps: int = 100
    eta: float = 0.0
    seed: int | None = 0
    detail: DetailName = "model"
    """``input``: the final step of models/detail.py (the photo's own detail, re-exposed by the model)."""


FAST_SAMPLER = SamplerConfig(sampler="ddim", steps=4, eta=0.0, seed=0)
"""The default of test_unpaired.py and the demo: deterministic DDIM, 4 steps, chosen by measurement (README,
"Speed"): the paper-size model enhances a 600x400 image in under 20 s on a 2-core CPU, and with the bundled
checkpoint it scores above the paper's DDPM-100 on held-out LOL pairs (more steps score a little higher)."""


@dataclass
class OptimConfig:
    """Loss and optimisation of the LightningModule."""

    loss_type: LossType = "dfpl"
    dfpl_image_loss: ImageLossName = "lpips_vgg"
    image_loss: tuple[AnchorLossName, ...] = ("l1",)
    """``loss_type: image``: image losses summed between the image rebuilt from the UNet's x0_hat and hr (the
    names of ``anchor_loss``)."""
    image_loss_weights: tuple[float, ...] = (1.0,)
    train_timesteps: TrainTimesteps = "all"
    """Stage ``diffusion``: t is drawn uniformly from all T timesteps (the paper), or from those ``val_sampler``
    visits (``sampler``: DDIM-2 trains at t = T - 1 and 0 only), so that a few-step model learns the steps it
    takes."""
    optimizer: OptimizerName = "lion"
    lr: float = 4e-4
    weight_decay: float = 0.0
    scheduler: SchedulerName | None = None
    scheduler_patience: int = 10
    scheduler_factor: float = 0.5
    min_lr: float = 1e-6
    ref_prob: float = 0.5
    train_encoder: bool = False
    ema_decay: float | None = None
    anchor_target: AnchorTarget = "chroma"
    """Stage ``anchor``: what the encoder learns: ``chroma`` (C(hr), the reference's TS encoder) or ``hr``."""
    anchor_loss: tuple[AnchorLossName, ...] = ("msssim",)
    """Stage ``anchor``: image losses summed (msssim = 1 - 4-scale MS-SSIM, l1, l2, lpips_alex, lpips_vgg)."""
    anchor_loss_weights: tuple[float, ...] = (1.0,)
    he_loss: tuple[AnchorLossName, ...] = ("lpips_vgg",)
    """Stage ``he``: image losses summed between the HE network's zeta and hr (the same names as ``anchor_loss``;
    the reference's TS default is LPIPS-VGG on [0, 1] images)."""
    he_loss_weights: tuple[float, ...] = (1.0,)


@dataclass
class DataConfig:
    """Datasets (roots in the layouts the datasets ship with) and loaders."""

    use_dataset: DatasetName = "LOL+LOLv2+VELOL"
    lol_root: str = "data/LOL"
    lolv2_root: str = "data/LOLv2"
    velol_root: str = "data/VE-LOL-L"
    extra_train_folders: list[str] = field(default_factory=list)
    val_folder: str | None = None
    test_folder: str | None = None
    image_size: int = 160
    train_batch_size: int = 24
    eval_batch_size: int = 1
    num_workers: int = 4
    synth_prob: float = 0.0
    """Probability that a training crop is replaced by a synthetic pair made from its ``high`` image (exposure
    variety: see data.exposure); 0 keeps the real pairs only (the reference)."""
    synth_kinds: tuple[SynthKind, ...] = ("dark", "identity", "bright")
    test_geometry: TestGeometry = "pad"
    """How test.py fits test images to the networks: ``pad`` (the FS reference: reflect-pad to a multiple of
    ``diffusion.pad_multiple``, crop the output back, score the full image) or ``center_crop`` (the TS
    reference: centre-crop input and ground truth to a multiple of ``diffusion.pad_multiple`` and score the
    crop; see utils.metrics.center_crop_boxes)."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings, checkpointing and logging."""

    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int = 1000
    max_steps: int = -1
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    check_val_every_n_epoch: int | None = 1
    val_check_interval: int | float | None = None
    log_every_n_steps: int = 50
    limit_val_batches: int | float = 1.0
    monitor: str = "val/combined"
    monitor_mode: MonitorMode = "max"
    save_top_k: int = 1
    checkpoint_every_n_steps: int = 0
    output_dir: str = "runs"
    run_name: str = "anlightendiff"
    deterministic: bool = False


@dataclass
class Config:
    """The whole run configuration. Defaults reproduce the reference (faithful) settings."""

    seed: int = 3407
    stage: Stage = "diffusion"
    """What this run trains: ``anchor`` (the encoder alone, against ``optim.anchor_target``), ``he`` (the TS
    variant's HE network alone, against hr, on a frozen encoder) or ``diffusion`` (the noise predictor; the
    encoder too if ``optim.train_encoder``; the HE network stays frozen)."""
    init_from: str | None = None
    """Checkpoint of an earlier stage whose anchor encoder this run loads (and keeps frozen unless
    ``optim.train_encoder``), and its HE network where it holds one (required by stage ``diffusion`` with
    ``model.he_network``; always frozen there)."""
    checkpoint: str | None = None
    """test.py and test_unpaired.py: the checkpoint they run when ``--ckpt`` is not given (None: the bundled
    ``checkpoints/default.ckpt``). A checkpoint named here and missing is an error, never replaced by the bundled
    one."""
    test_folder_unpaired: str | None = None
    """test_unpaired.py: the images (a folder or an image file) it enhances when ``--input`` is not given (the
    paper's key)."""
    results_folder_unpaired: str | None = None
    """test_unpaired.py: the folder it writes to when ``--output`` is not given (the paper's key)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    val_sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists) fit for YAML and checkpoints."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _nearest(key: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting only lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    """``int``, ``one of ['cosine', 'plateau'] or null``, ...: a type hint in the words of the messages."""
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key '{where}'{_nearest(key, names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{where}.")
        else:
            kwargs[key] = _coerce(value, hint, where)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested dict (from YAML or a checkpoint) into a :class:`Config`."""
    config = _build(Config, data or {}, "")
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    if config.model.in_dim != 2 * config.model.unet_outdim:
        raise ConfigError("model.in_dim must be 2 * model.unet_outdim (x_t and the low-light image)")
    check_sampler(config.sampler, config.diffusion.timesteps, "sampler.")
    check_sampler(config.val_sampler, config.diffusion.timesteps, "val_sampler.")
    if not config.diffusion.use_center and config.model.stronger_cond:
        raise ConfigError("diffusion.use_center: false needs model.stronger_cond: false: without DRDA the reference "
                          "trains with no anchor and no encoder features, and model.stronger_cond: true feeds the "
                          "encoder's features into the UNet (the reference cannot run that combination)")
    if config.model.cond_zero_residual and not config.model.cond_on_res:
        raise ConfigError("model.cond_zero_residual needs model.cond_on_res (it zeroes the residual on the "
                          "equalised image)")
    if not (math.isfinite(config.diffusion.scale) and config.diffusion.scale > 0):
        raise ConfigError(f"diffusion.scale must be a number > 0, got {config.diffusion.scale}")
    if config.model.unet_sees_anchor and not config.diffusion.use_center:
        raise ConfigError("model.unet_sees_anchor needs diffusion.use_center: without DRDA there is no anchor")
    if config.optim.train_timesteps == "sampler" and config.val_sampler.sampler == "anchor":
        raise ConfigError("optim.train_timesteps: sampler draws t from val_sampler's timesteps, and the anchor "
                          "sampler has none: set val_sampler to ddim or ddpm")
    if not 0.0 <= config.optim.ref_prob <= 1.0:
        raise ConfigError("optim.ref_prob must be in [0, 1]")
    for key in ("anchor_loss", "he_loss", "image_loss"):
        if len(getattr(config.optim, key)) != len(getattr(config.optim, f"{key}_weights")):
            raise ConfigError(f"optim.{key}_weights needs one weight per optim.{key} entry")
    _check_he_network(config)
    if not 0.0 <= config.data.synth_prob <= 1.0:
        raise ConfigError("data.synth_prob must be in [0, 1]")
    if config.model.cond_dim not in (None, config.model.unet_dim) and config.model.stronger_cond:
        raise ConfigError("model.cond_dim differs from model.unet_dim, which needs model.stronger_cond: false "
                          "(the UNet concatenates the encoder's feature maps)")
    multiple = 2 ** (len(config.model.dim_mults) - 1)
    if config.diffusion.pad_multiple % multiple:
        raise ConfigError(f"diffusion.pad_multiple must be a multiple of {multiple} for these dim_mults")


def _check_he_network(config: Config) -> None:
    """The two-step (TS) variant's settings: the HE network and the stage that trains it."""
    model = config.model
    if model.he_network and model.cond_on_res:
        raise ConfigError("model.he_network (the TS anchor zeta + (1 - zeta) img_c) needs model.cond_on_res: false: "
                          "the screen blend takes the sigmoid encoder output img_c in (0, 1)")
    if model.he_network and not config.diffusion.use_center:
        raise ConfigError("model.he_network only changes the anchor, which diffusion.use_center: false does not use")
    if config.stage == "he" and not model.he_network:
        raise ConfigError("stage: he trains the HE network, which needs model.he_network: true")
    if config.stage == "he" and config.optim.train_encoder:
        raise ConfigError("stage: he trains the HE network alone on a frozen encoder: set optim.train_encoder: false")
    if config.stage == "anchor" and model.he_network:
        raise ConfigError("stage: anchor trains the encoder alone and validates its output; set model.he_network: "
                          "false there (the he stage adds the HE network and loads this encoder with init_from)")


def check_sampler(sampler: SamplerConfig, timesteps: int, prefix: str = "sampler.") -> None:
    """The one validation of sampler settings, for the ``sampler`` and ``val_sampler`` sections, the scripts'
    flags (``prefix="--"``) and :func:`models.samplers.make_sampler`: a ConfigError naming ``{prefix}{key}``.

    The name must be one of :data:`SamplerName`; ``ddpm`` visits all ``timesteps``, ``ddim`` takes
    1 to ``timesteps`` steps (other samplers take no diffusion steps, so ``steps`` is not theirs to check);
    ``eta`` (DDIM's noise: 0 deterministic, 1 the DDPM posterior) is a finite number >= 0.
    """
    valid = typing.get_args(SamplerName)
    if sampler.sampler not in valid:
        raise ConfigError(f"{prefix}sampler: unknown sampler {sampler.sampler!r}; valid: {', '.join(valid)}")
    if sampler.sampler == "ddpm" and sampler.steps != timesteps:
        raise ConfigError(f"{prefix}steps: the ddpm sampler visits all {timesteps} timesteps (diffusion.timesteps); "
                          f"use {prefix}sampler=ddim for {sampler.steps} steps")
    if sampler.sampler == "ddim" and not 1 <= sampler.steps <= timesteps:
        raise ConfigError(f"{prefix}steps must be in [1, {timesteps}] (diffusion.timesteps), got {sampler.steps}")
    if not (math.isfinite(sampler.eta) and sampler.eta >= 0):
        raise ConfigError(f"{prefix}eta must be a number >= 0 (0: deterministic, 1: the DDPM posterior), "
                          f"got {sampler.eta}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.unet_dim=32"`` -> (["model", "unet_dim"], 32); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply dotted overrides to a nested dict (a copy is returned)."""
    data = _plain(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return data


BASE_KEY = "base"
"""The key of a config file that names the config files it builds on (see the module docstring)."""


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (``None`` = faithful defaults) with its ``base`` files, apply overrides, validate.
    Paths inside a config (datasets, checkpoints, folders) are relative to the working directory, as on the
    command line; only ``base`` is relative to the file that names it."""
    data = _read_with_bases(Path(path)) if path is not None else {}
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def _read_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The settings of the config file ``path``: its ``base`` files' (each read the same way, merged in order),
    then its own on top. ``chain``: the files whose ``base`` led here, to refuse cycles. A misspelt key or a wrong
    type is reported with the file that holds it."""
    chain = (*chain, path.resolve())
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if isinstance(bases, str):
        bases = [bases]
    if bases is not None and not (isinstance(bases, list) and all(isinstance(b, str) and b for b in bases)):
        raise ConfigError(f"{path}: {BASE_KEY}: expected a config file name or a list of them (relative to this "
                          f"file), got {bases!r}")
    try:
        _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    merged: dict[str, Any] = {}
    for name in bases or ():
        base = path.parent / name
        if not base.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} {name}: config file not found: {base}")
        if base.resolve() in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(base.resolve()):], base.resolve()))
            raise ConfigError(f"{path}: {BASE_KEY} {name}: the base files form a cycle: {cycle}")
        merged = _merge(merged, _read_with_bases(base, chain))
    return _merge(merged, data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _merge(below: dict[str, Any], above: dict[str, Any]) -> dict[str, Any]:
    """``above`` over ``below``, section by section: a section of ``above`` changes only the keys it lists (an
    empty one, ``data:``, none); any other value replaces ``below``'s."""
    merged = dict(below)
    for key, value in above.items():
        if isinstance(merged.get(key), dict) and (value is None or isinstance(value, dict)):
            merged[key] = _merge(merged[key], value or {})
        else:
            merged[key] = value
    return merged


def save_config(config: Config, path: str | Path) -> None:
    """Write the merged config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

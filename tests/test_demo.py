"""The web demo (demo.py): its handler over HTTP with gradio_client, and the page in headless Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DEMO_PACKAGES = "needs the demo's packages: pip install -r requirements-demo.txt"
pytest.importorskip("gradio", reason=DEMO_PACKAGES)
gradio_client = pytest.importorskip("gradio_client", reason=DEMO_PACKAGES)
AppError = gradio_client.exceptions.AppError

import demo  # noqa: E402
from docs.demo_screenshot import CHROMIUM_ARGS, enhance_in_page, find_chromium, free_port  # noqa: E402
from models import AnlightenDiff, CheckpointError, load_for_inference, tiling  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.config import SamplerConfig, config_from_dict  # noqa: E402

TINY = {"model": {"unet_dim": 8, "dim_mults": [1, 2, 2]}, "diffusion": {"timesteps": 10, "pad_multiple": 8},
        "sampler": {"sampler": "ddim", "steps": 2}, "val_sampler": {"sampler": "ddim", "steps": 2}}
FAST = SamplerConfig(sampler="ddim", steps=2, eta=0.0, seed=0)
MAX_PIXELS = 24 * 24
CHROMIUM = find_chromium()
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")  # pandas 3 vs gradio


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> AnlightenDiff:
    """A tiny random model, loaded from a checkpoint file as demo.py loads one."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.manual_seed(0)  # the same weights whatever ran before
    module = AnlightenDiff(config_from_dict(TINY))
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return load_for_inference(str(path), torch.device("cpu"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A samples folder with two small dark images (PNG and JPEG)."""
    folder = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((20, 24, 3)) * 60).astype(np.uint8)).save(folder / "dark.png")
    Image.fromarray((rng.random((16, 16, 3)) * 60).astype(np.uint8)).save(folder / "dusk.jpg")
    return folder


@pytest.fixture(scope="module")
def server(model: AnlightenDiff, samples: Path) -> Iterator[str]:
    """The demo served on 127.0.0.1 at a free port; yields its URL."""
    app = demo.build_app(model, FAST, MAX_PIXELS, demo.sample_images(samples))
    url = demo.launch(app, "127.0.0.1", free_port(), samples, block=False)
    yield url
    app.close()


def enhance(url: str, path: Path, tile: int = 0, *brightness: float) -> tuple:
    """The page's enhancement over HTTP; without ``brightness`` the client leaves the slider at its default."""
    client = gradio_client.Client(url, verbose=False)
    return client.predict(gradio_client.handle_file(str(path)), "ddim", 2, tile, *brightness, api_name="/enhance")


def mean_luminance(path: str | Path) -> float:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    return float((rgb @ np.array([0.2126, 0.7152, 0.0722])).mean())


def assert_brightened(low_path: Path, out_path: str | Path) -> None:
    """Same size, and no darker anywhere (the model adds a residual in [0, 1]), brighter on average."""
    low = np.asarray(Image.open(low_path).convert("RGB"), dtype=np.int16)
    out = np.asarray(Image.open(out_path), dtype=np.int16)
    assert out.shape == low.shape
    assert (out >= low).all()
    assert out.mean() > low.mean() + 10


def test_enhance_over_http(server: str, samples: Path) -> None:
    (before, after), anchor, png = enhance(server, samples / "dark.png")
    assert Path(png).name == "dark_enhanced.png"
    assert_brightened(samples / "dark.png", png)
    assert_brightened(samples / "dark.png", after)
    assert np.array_equal(np.asarray(Image.open(before)), np.asarray(Image.open(samples / "dark.png")))
    assert Image.open(anchor).size == Image.open(samples / "dark.png").size


def test_brightness_slider_sets_the_mean_luminance(server: str, samples: Path) -> None:
    (_, automatic), _, _ = enhance(server, samples / "dark.png", 0, 0)
    results = [enhance(server, samples / "dark.png", 0, value) for value in (0.2, 0.5, 0.8)]
    levels = [mean_luminance(png) for _, _, png in results]
    assert levels == pytest.approx([0.2, 0.5, 0.8], abs=0.01)
    assert mean_luminance(results[1][1]) == pytest.approx(0.5, abs=0.02)  # the anchor shown follows it
    (_, again), _, _ = enhance(server, samples / "dark.png", 0, 0)  # 0 = the model's own brightness again,
    assert mean_luminance(again) == pytest.approx(mean_luminance(automatic), abs=1e-6)  # not the last target set
    assert mean_luminance(again) != pytest.approx(0.8, abs=1e-3)
    with pytest.raises(AppError, match=r"Brightness must be 0 \(automatic\) or between 0.05 and 0.95, got 0.02"):
        enhance(server, samples / "dark.png", 0, 0.02)


def test_brightness_slider_is_an_input_of_the_enhancement(model: AnlightenDiff) -> None:
    app = demo.build_app(model, FAST)
    enhance_fn = next(fn for fn in app.fns.values() if fn.api_name == "enhance")
    slider = next(block for block in enhance_fn.inputs if getattr(block, "elem_id", None) == "brightness")
    assert (slider.minimum, slider.maximum, slider.value) == (0, 0.95, 0)
    assert [demo.brightness_target(v) for v in (0, None, 0.15000000000000002, 0.95)] == [None, None, 0.15, 0.95]


def test_unreadable_upload_gets_a_message(server: str, tmp_path: Path) -> None:
    fake = tmp_path / "holiday.png"
    fake.write_text("not an image")
    with pytest.raises(AppError, match="Cannot read holiday.png: not a recognised image"):
        enhance(server, fake)


def test_uploads_above_the_limit_are_refused_tiled_or_not(server: str, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.fromarray(np.full((30, 30, 3), 20, np.uint8)).save(big)
    for tile in (0, 16):
        with pytest.raises(AppError, match="900 pixels, more than this demo's limit of 576. Upload a smaller"):
            enhance(server, big, tile=tile)


def test_explicit_tiles(server: str, samples: Path) -> None:
    _, _, png = enhance(server, samples / "dark.png", tile=16)
    assert_brightened(samples / "dark.png", png)
    with pytest.raises(AppError, match="tile size must be a positive multiple of 8"):
        enhance(server, samples / "dark.png", tile=12)


def test_large_uploads_are_tiled_by_themselves(model: AnlightenDiff, samples: Path, monkeypatch) -> None:
    """Tile size 0 (the default): above the automatic threshold (shrunk here to a 16 px tile's memory) the
    image is enhanced on tiles, and the progress bar says which tile is running; below it, in one piece."""
    per_pixel = tiling.NETWORK_BYTES_PER_PIXEL[0] + tiling.NETWORK_BYTES_PER_PIXEL[1] * 8
    monkeypatch.setattr(tiling, "AUTO_TILE_MEMORY", per_pixel * 16 * 16)
    assert demo.tile_options(0, model, 20, 24) == {"tile": 16, "tile_overlap": 4}
    assert demo.tile_options(0, model, 16, 16) == {}
    assert demo.tile_options(8, model, 16, 16) == {"tile": 8, "tile_overlap": 2}
    seen: list[str] = []
    handler = demo.make_enhance_fn(model, FAST, MAX_PIXELS)
    upload = {"path": str(samples / "dark.png"), "orig_name": "dark.png"}  # 24x20, padded to 24x24: 2x2 tiles
    (_, after), _, png = handler(upload, "ddim", 2, 0, progress=lambda value, desc: seen.append(desc))
    assert seen == ["sampling"] + [f"tile {i} of 4" for i in (1, 1, 2, 2, 3, 3, 4, 4)]
    assert_brightened(samples / "dark.png", png)


def test_large_results_are_shown_downscaled_and_downloaded_whole() -> None:
    small = np.random.default_rng(0).random((30, 40, 3)).astype(np.float32)
    assert demo.preview(small) is small
    large = np.zeros((100, 3000, 3), np.float32)
    assert demo.preview(large).shape == (68, 2048, 3)


def test_progress_follows_the_sampling_steps(model: AnlightenDiff, samples: Path) -> None:
    seen: list[tuple[int, int]] = []
    handler = demo.make_enhance_fn(model, FAST, MAX_PIXELS)
    upload = {"path": str(samples / "dusk.jpg"), "orig_name": "dusk.jpg"}
    handler(upload, "ddim", 2, 0, progress=lambda value, desc: seen.append(value))
    assert seen == [0, (1, 2), (2, 2)]


def test_ddpm_locks_the_steps_at_every_timestep() -> None:
    assert demo.steps_control("ddpm", 10) == {"__type__": "update", "value": 10, "interactive": False}
    assert demo.steps_control("ddim", 10) == {"__type__": "update", "interactive": True}
    assert demo.steps_control("anchor", 10) == {"__type__": "update", "interactive": False}


def test_the_page_offers_the_samplers_the_model_can_run(model: AnlightenDiff, samples: Path) -> None:
    """A diffusion-stage model offers all three; an anchor-stage one (its noise predictor never trained) only
    the anchor, starts there, and refuses the others with a message, on the page and from the flags."""
    anchor_only = AnlightenDiff(config_from_dict({**TINY, "stage": "anchor", "model": {**TINY["model"],
                                                  "cond_on_res": False}, "sampler": {"sampler": "anchor"}})).eval()
    radios = {m: [c for c in demo.build_app(m, demo.initial_sampler(m)).config["components"]
                  if c["type"] == "radio"][0]["props"] for m in (model, anchor_only)}
    assert [c[0] for c in radios[model]["choices"]] == ["ddpm", "ddim", "anchor"]
    assert [c[0] for c in radios[anchor_only]["choices"]] == ["anchor"] and radios[anchor_only]["value"] == "anchor"
    with pytest.raises(demo.UserError, match="runs only anchor"):
        demo.initial_sampler(anchor_only, demo.parse_args(["--sampler", "ddim"]))
    enhance_fn = demo.make_enhance_fn(anchor_only, demo.initial_sampler(anchor_only), MAX_PIXELS)
    upload = {"path": str(samples / "dark.png")}
    with pytest.raises(demo.gr.Error, match="runs only anchor"):
        enhance_fn(upload, "ddim", 2, 0, 0, progress=lambda *a, **k: None)
    (_, after), _, png = enhance_fn(upload, "anchor", 1, 0, 0, progress=lambda *a, **k: None)
    low = demo.to_tensor(demo.read_image(samples / "dark.png").rgb, anchor_only.device)
    expected = demo.to_array(anchor_only.enhance(low, demo.initial_sampler(anchor_only)).image)
    assert np.abs(np.asarray(Image.open(png), dtype=np.float64) / 255 - expected).max() < 1 / 255


def test_one_enhancement_at_a_time(model: AnlightenDiff) -> None:
    app = demo.build_app(model, FAST)
    enhance_fn = next(fn for fn in app.fns.values() if fn.api_name == "enhance")
    assert enhance_fn.concurrency_limit == 1


def test_missing_or_empty_samples_folder(tmp_path: Path) -> None:
    assert demo.sample_images(tmp_path / "absent") == []
    assert demo.sample_images(tmp_path) == []


def test_every_flag_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = ("--ckpt", "--host", "--port", "--device", "--max-pixels", "--samples", "--sampler", "--steps")
    assert all(flag in text for flag in flags)


def test_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(demo.main, (CheckpointError,), ["--ckpt", str(tmp_path / "none.ckpt")])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where the browser test leaves its screenshot: $ANLIGHTENDIFF_ARTIFACTS, else the test's tmp dir."""
    folder = Path(os.environ.get("ANLIGHTENDIFF_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: bash .ci/install_browser.sh")
def test_page_in_headless_chromium(server: str, samples: Path, artifacts: Path, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason=DEMO_PACKAGES)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=CHROMIUM, args=CHROMIUM_ARGS, accept_downloads=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            enhance_in_page(page, server, samples / "dark.png")
            page.screenshot(path=artifacts / "demo_page.png", full_page=True)
            with page.expect_download() as download:
                page.click("#download")
            download.value.save_as(tmp_path / download.value.suggested_filename)
        finally:
            browser.close()
    assert_brightened(samples / "dark.png", tmp_path / "dark_enhanced.png")

"""utils.metrics: values checked against scikit-image, hand computations and OpenCV reference values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from utils import metrics as M


def _pair(seed: int = 0, shape=(48, 64, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 256, shape, dtype=np.uint8)
    noise = rng.integers(-30, 31, shape)
    out = np.clip(gt.astype(int) * 0.8 + noise + 10, 0, 255).astype(np.uint8)
    return out, gt


def _manual_ssim(x: np.ndarray, y: np.ndarray, win: int = 7, axis_ndim: int = 2) -> float:
    """SSIM written out: uniform win^d windows fully inside the image, sample covariance, C1/C2 at L=255."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    shape = (win,) * axis_ndim
    wx, wy = sliding_window_view(x, shape), sliding_window_view(y, shape)
    axes = tuple(range(-axis_ndim, 0))
    n = win**axis_ndim
    mx, my = wx.mean(axes), wy.mean(axes)
    vx = (wx**2).mean(axes) - mx**2
    vy = (wy**2).mean(axes) - my**2
    cxy = (wx * wy).mean(axes) - mx * my
    vx, vy, cxy = (v * n / (n - 1) for v in (vx, vy, cxy))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _manual_gray(img: np.ndarray) -> np.ndarray:
    c = img.astype(np.int64)
    return ((9798 * c[..., 0] + 19235 * c[..., 1] + 3735 * c[..., 2] + 16384) // 32768).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
def test_psnr_and_ssim_equal_skimage():
    for seed in range(3):
        out, gt = _pair(seed)
        assert M.psnr(out, gt) == peak_signal_noise_ratio(gt, out, data_range=255)
        assert M.ssim(out, gt) == structural_similarity(gt, out, channel_axis=2, data_range=255)
    out, gt = _pair(0)
    mse = np.mean((out.astype(np.float64) - gt) ** 2)
    assert M.psnr(out, gt) == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-12)
    per_channel = [_manual_ssim(out[..., c], gt[..., c]) for c in range(3)]
    assert M.ssim(out, gt) == pytest.approx(np.mean(per_channel), abs=1e-9)
    assert M.psnr(gt, gt) == float("inf")
    assert M.ssim(gt, gt) == pytest.approx(1.0)


def test_rgb_to_gray_matches_opencv_values():
    # outputs of cv2.cvtColor(..., COLOR_RGB2GRAY), opencv-python-headless 4.10.0.84
    table = [((255, 255, 255), 255), ((0, 0, 0), 0), ((255, 0, 0), 76), ((0, 255, 0), 150),
             ((0, 0, 255), 29), ((162, 188, 129), 174), ((141, 230, 38), 182), ((176, 112, 238), 145),
             ((180, 223, 77), 194), ((193, 200, 21), 178), ((121, 131, 193), 135), ((243, 8, 36), 81),
             ((210, 242, 63), 212)]
    img = np.array([[c for c, _ in table]], dtype=np.uint8)
    assert M.rgb_to_gray(img)[0].tolist() == [v for _, v in table]
    f = M.rgb_to_gray(img.astype(np.float32))
    assert f.dtype == np.float32
    np.testing.assert_allclose(f[0, 2], 0.299 * 255, rtol=1e-6)


def test_ssim_gray_matches_manual_computation():
    out, gt = _pair(1)
    g_out, g_gt = _manual_gray(out), _manual_gray(gt)
    assert M.ssim_gray(out, gt) == pytest.approx(_manual_ssim(g_out, g_gt), abs=1e-9)
    # the reference's quirk: mean over columns of a 1-D, 7-tap SSIM along each column
    cols = np.mean([_manual_ssim(g_out[:, j], g_gt[:, j], axis_ndim=1) for j in range(g_out.shape[1])])
    assert M.ssim_gray(out, gt, columnwise=True) == pytest.approx(cols, abs=1e-9)
    assert abs(M.ssim_gray(out, gt, columnwise=True) - M.ssim_gray(out, gt)) > 1e-3


def test_gt_mean_correct_makes_grey_means_equal():
    rng = np.random.default_rng(3)
    gt = rng.integers(20, 200, (40, 56, 3), dtype=np.uint8)
    out = (gt * 0.4).astype(np.uint8)
    gt_before = gt.copy()

    def gray_mean(img):
        return float(M.rgb_to_gray(img.astype(np.float32)).mean())

    assert gray_mean(gt) - gray_mean(out) > 50
    fixed = M.gt_mean_correct(out, gt)
    assert fixed.dtype == np.uint8 and fixed.shape == gt.shape
    np.testing.assert_array_equal(gt, gt_before)
    assert abs(gray_mean(fixed) - gray_mean(gt)) < 1.0  # truncation loses < 1 level
    rounded = M.gt_mean_correct(out, gt, mode="round")
    assert abs(gray_mean(rounded) - gray_mean(gt)) < 0.1
    # one gain for all channels, applied to the output's pixel values in [0, 1]
    ratio = gray_mean(gt) / gray_mean(out)
    expected = np.floor(np.clip(out / 255 * ratio, 0, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(rounded, expected)
    assert M.psnr(fixed, gt) > M.psnr(out, gt) + 10
    black = np.zeros_like(gt)
    np.testing.assert_array_equal(M.gt_mean_correct(black, gt), black)


def test_to_uint8_round_vs_truncate():
    x = np.array([0.0, 0.001, 0.004, 0.25, 0.5, 0.998, 0.999, 1.0, 1.5, -0.2], dtype=np.float32)
    assert M.to_uint8(x, "round").tolist() == [0, 0, 1, 64, 128, 254, 255, 255, 255, 0]
    assert M.to_uint8(x, "truncate").tolist() == [0, 0, 1, 63, 127, 254, 254, 255, 255, 0]
    assert M.to_uint8(x).dtype == np.uint8
    t = torch.zeros(3, 2, 4)
    t[0] = 1.0
    t[2, 1, 3] = 0.5
    u = M.to_uint8(t, mode="truncate")
    assert u.shape == (2, 4, 3)
    assert u[0, 0].tolist() == [255, 0, 0] and u[1, 3].tolist() == [255, 0, 127]
    assert M.to_uint8(torch.rand(2, 3, 5, 6)).shape == (2, 5, 6, 3)
    with pytest.raises(ValueError):
        M.to_uint8(x, "floor")


def test_combined_score_known_numbers():
    assert M.combined_score(20.0, 0.8, 0.1) == pytest.approx(0.72 + 0.08 + 2.0)
    assert M.combined_score(psnr=0.0, ssim=0.0, lpips=1.0) == 0.0
    assert M.combined_score(30.0, 1.0, 0.0) == pytest.approx(3.0 + 0.1 + 0.8)


class _RecordingModel(torch.nn.Module):
    """Stands in for LPIPS: records its inputs, returns (N, 1, 1, 1) = mean |a - b|."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.inputs: list[torch.Tensor] = []

    def forward(self, a, b):
        self.inputs = [a, b]
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_distance_feeds_minus_one_to_one_nchw():
    gt = np.zeros((8, 10, 3), dtype=np.uint8)
    out = np.full((8, 10, 3), 255, dtype=np.uint8)
    out[0, 0] = (0, 127, 255)
    model = _RecordingModel()
    d = M.lpips_distance(out, gt, model)
    a, b = model.inputs
    assert a.shape == (1, 3, 8, 10) and a.dtype == torch.float32
    assert torch.all(a == -1.0)  # gt = 0 -> -1
    assert b[0, :, 0, 0].tolist() == pytest.approx([-1.0, 127 / 127.5 - 1, 1.0])
    assert b[0, :, 1, 1].tolist() == [1.0, 1.0, 1.0]
    assert isinstance(d, float) and d == pytest.approx(float((b - a).abs().mean()))
    M.lpips_distance(out, gt, model, unscaled=True)  # reference validation quirk 5
    assert model.inputs[1].max().item() == 1.0 and model.inputs[0].min().item() == 0.0


def test_image_metrics_reference_protocol_changes_only_gray_and_lpips():
    out, gt = _pair(5)
    plain = M.image_metrics(out, gt)
    assert set(plain) == {"psnr", "ssim", "ssim_gray", "lpips", "psnr_gt_mean", "ssim_gt_mean"}
    assert plain["lpips"] is None
    assert plain["psnr"] == M.psnr(out, gt) and plain["ssim"] == M.ssim(out, gt)
    assert plain["ssim_gray"] == M.ssim_gray(out, gt)
    fixed = M.gt_mean_correct(out, gt)
    assert plain["psnr_gt_mean"] == M.psnr(fixed, gt) and plain["ssim_gt_mean"] == M.ssim(fixed, gt)

    out[..., 0] //= 2  # a colour cast, so that channel order matters
    model = _RecordingModel()
    # a channel-sensitive stand-in for LPIPS: weights the first channel only
    model.forward = lambda a, b: (a[:, :1] - b[:, :1]).abs().mean(dim=(1, 2, 3), keepdim=True)
    plain = M.image_metrics(out, gt, lpips_model=model)
    ref = M.image_metrics(out, gt, lpips_model=model, reference_protocol=True)
    for key in ("psnr", "ssim", "psnr_gt_mean", "ssim_gt_mean"):
        assert ref[key] == plain[key], key
    assert abs(ref["ssim_gray"] - plain["ssim_gray"]) > 1e-3
    assert abs(ref["lpips"] - plain["lpips"]) > 1e-3
    # what the reference computes: BGR images, RGB->grey weights, column-wise SSIM
    bgr_out, bgr_gt = out[..., ::-1], gt[..., ::-1]
    expected = structural_similarity(_manual_gray(bgr_gt), _manual_gray(bgr_out), channel_axis=1,
                                     data_range=255)
    assert ref["ssim_gray"] == pytest.approx(expected, abs=1e-12)


def test_image_metrics_rejects_bad_inputs():
    out, gt = _pair(0)
    with pytest.raises(TypeError):
        M.image_metrics(out.astype(np.float32), gt)
    with pytest.raises(ValueError):
        M.image_metrics(out[:-1], gt)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_min_sizes_are_the_smallest_images_the_networks_take(net):
    from utils.lpips import MIN_SIZES, build_lpips, lpips_defined

    model = build_lpips(net, random_backbone=True)
    size = MIN_SIZES[net]
    for h, w in ((size, 40), (40, size)):
        assert lpips_defined(model, h, w)
        model(torch.zeros(1, 3, h, w), torch.zeros(1, 3, h, w))
    for h, w in ((size - 1, 40), (40, size - 1)):
        assert not lpips_defined(model, h, w)
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, h, w), torch.zeros(1, 3, h, w))


def test_image_metrics_are_null_where_undefined_never_an_error():
    from utils.lpips import build_lpips

    alex = build_lpips("alex", random_backbone=True)
    rng = np.random.default_rng(0)
    for (h, w), lpips_null, ssim_null in (((12, 16), True, False), ((6, 5), True, True), ((31, 31), False, False)):
        out, gt = (rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2))
        scores = M.image_metrics(out, gt, lpips_model=alex)
        assert (scores["lpips"] is None) == lpips_null
        assert all((scores[k] is None) == ssim_null for k in ("ssim", "ssim_gray", "ssim_gt_mean"))
        assert scores["psnr"] == pytest.approx(peak_signal_noise_ratio(gt, out, data_range=255))
        assert scores["psnr_gt_mean"] is not None

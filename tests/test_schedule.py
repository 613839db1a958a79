import math

import pytest
import torch

from models.schedule import (
    beta_schedule,
    cosine_beta_schedule,
    drda_coefficient,
    drds_coefficient,
    extract,
    schedule_buffers,
)


def test_cosine_schedule_uses_reference_end_point():
    betas = cosine_beta_schedule(100)
    # the reference's linspace(0, T + 1, T + 1) / (T + 1) is i / T for i = 0..T
    x = torch.arange(101, dtype=torch.float64) / 100
    abar = torch.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = (1 - abar[1:] / abar[:-1]).clamp(0, 0.999)
    assert betas.shape == (100,)
    assert torch.allclose(betas, expected, atol=0, rtol=1e-12)


def test_drda_coefficient_closed_form():
    abar = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    k1 = drda_coefficient(abar[1:])
    assert torch.allclose(k1, torch.tensor([(1 - 0.5**0.5) / 0.5**0.5, 1.0], dtype=torch.float64))
    # at alpha-bar -> 1 the coefficient vanishes
    assert drda_coefficient(torch.tensor([1 - 1e-12], dtype=torch.float64)).item() < 1e-5


def test_drds_coefficient_is_one_minus_posterior_coefficients():
    buffers = schedule_buffers(cosine_beta_schedule(100))
    k2 = buffers["extra_term_coef2"]
    assert torch.allclose(k2, 1 - buffers["posterior_mean_coef1"] - buffers["posterior_mean_coef2"], atol=1e-12)


def test_anchor_coefficients_match_values_worked_out_by_hand():
    """betas (0.1, 0.2, 0.3): alpha = (0.9, 0.8, 0.7), abar = (0.9, 0.72, 0.504), abar_prev = (1, 0.9, 0.72);
    k1 and k2 from the paper's formulas in scalar arithmetic (math.sqrt), written out as numbers."""
    betas = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    alphas = 1 - betas
    abar = torch.tensor([0.9, 0.72, 0.504], dtype=torch.float64)
    abar_prev = torch.tensor([1.0, 0.9, 0.72], dtype=torch.float64)
    k1 = [0.16227766016837947, 0.28625491357158983, 0.4118723280692915]
    k2 = [0.0, 0.002930790321091633, 0.014469256740527708]
    assert drda_coefficient(abar).tolist() == pytest.approx(k1, abs=1e-12)
    assert drds_coefficient(alphas, abar, abar_prev).tolist() == pytest.approx(k2, abs=1e-12)
    buffers = schedule_buffers(betas)
    assert buffers["alphas_cumprod"].tolist() == pytest.approx(abar.tolist(), abs=1e-12)
    assert buffers["extra_term_coef1"].tolist() == pytest.approx(k1, abs=1e-12)
    assert buffers["extra_term_coef2"].tolist() == pytest.approx(k2, abs=1e-12)


def test_posterior_identities():
    b = schedule_buffers(cosine_beta_schedule(50))
    assert b["alphas_cumprod_prev"][0] == 1
    assert torch.allclose(b["alphas_cumprod_prev"][1:], b["alphas_cumprod"][:-1])
    assert torch.allclose(b["posterior_mean_coef1"][0], torch.tensor(1.0, dtype=torch.float64))
    assert b["posterior_variance"][0] == 0
    assert torch.isfinite(b["posterior_log_variance_clipped"]).all()


def test_unknown_schedule_names_valid_ones():
    with pytest.raises(ValueError, match="cosine, linear"):
        beta_schedule("quadratic", 10)


def test_extract_broadcasts():
    a = torch.arange(10.0)
    out = extract(a, torch.tensor([3, 7]), torch.Size([2, 3, 4, 5]))
    assert out.shape == (2, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 7.0]

import torch

from models.build import build_networks


def _diffusion(tiny_config):
    _, diffusion = build_networks(tiny_config)
    return diffusion


def test_img2res_res2img_round_trip(tiny_config, images):
    low, high = images
    d = _diffusion(tiny_config)
    assert torch.allclose(d.res2img(d.img2res(high, low), low), high, atol=1e-6)


def test_q_sample_leaves_noise_untouched(tiny_config, images):
    low, high = images
    d = _diffusion(tiny_config)
    x0, center = d.img2res(high, low), high
    eps = torch.randn_like(x0)
    copy = eps.clone()
    t = torch.tensor([3, 9])
    first = d.q_sample(x0, t, center, noise=eps)
    second = d.q_sample(x0, t, center, noise=eps)
    assert torch.equal(eps, copy)
    assert torch.equal(first, second)


def test_q_sample_mean_moves_from_x_start_to_anchor(tiny_config, images):
    """With eps = 0, x_t = x0 + (1 - sqrt(abar_t)) (c' - x0): its distance to the anchor shrinks as
    sqrt(abar_t), from about |x0 - c'| at t = 0 to about 0 at t = T - 1."""
    low, high = images
    d = _diffusion(tiny_config)
    x0 = d.img2res(high, low)
    center = torch.full_like(high, 0.8)
    anchor = 2 * center - 1
    ratios = []
    for t in range(d.num_timesteps):
        mean = d.q_sample(x0, torch.full((2,), t), center, noise=torch.zeros_like(x0))
        ratios.append(((mean - anchor).norm() / (x0 - anchor).norm()).item())
    assert torch.allclose(torch.tensor(ratios), d.sqrt_alphas_cumprod, atol=1e-5)
    assert ratios[0] > 0.95 and ratios[-1] < 0.05
    assert all(a > b for a, b in zip(ratios, ratios[1:], strict=False))


def test_drds_posterior_mean_formula(tiny_config, images):
    low, high = images
    d = _diffusion(tiny_config)
    x0, center = d.img2res(high, low), low * 3
    x_t = torch.randn_like(x0)
    t = torch.tensor([4, 4])
    mean, var, logvar = d.q_posterior(x0, x_t, t, center)
    c1, c2, k2 = d.posterior_mean_coef1[4], d.posterior_mean_coef2[4], d.extra_term_coef2[4]
    assert torch.allclose(mean, c1 * x0 + c2 * x_t + k2 * (2 * center - 1), atol=1e-6)
    assert torch.allclose(var, d.posterior_variance[4].expand_as(var))
    assert torch.allclose(logvar.exp(), var, rtol=1e-5)


def test_predict_start_from_noise_inverts_q_sample(tiny_config, images):
    low, high = images
    d = _diffusion(tiny_config)
    x0, center = d.img2res(high, low), high
    eps = torch.randn_like(x0)
    t = torch.tensor([2, 8])
    x_t = d.q_sample(x0, t, center, noise=eps)
    recovered = d.predict_start_from_noise(x_t, t, d.drda_noise(eps, t, center))
    assert torch.allclose(recovered, x0, atol=1e-4)


def test_anchoring_switches_off(tiny_config, images):
    low, high = images
    tiny_config.diffusion.use_center = False  # DRDA off
    tiny_config.diffusion.use_center_sampler = False  # DRDS off
    d = _diffusion(tiny_config)
    x0 = d.img2res(high, low)
    eps = torch.randn_like(x0)
    t = torch.tensor([5, 5])
    plain = d.sqrt_alphas_cumprod[5] * x0 + d.sqrt_one_minus_alphas_cumprod[5] * eps
    assert torch.allclose(d.q_sample(x0, t, high, noise=eps), plain)
    mean, _, _ = d.q_posterior(x0, eps, t, high)
    assert torch.allclose(mean, d.posterior_mean_coef1[5] * x0 + d.posterior_mean_coef2[5] * eps)

import pytest
import torch

from models.build import build_networks
from models.inference import enhance, sample
from models.module import AnlightenDiff
from models.padding import pad_to_multiple
from models.samplers import AnchorSampler, DDIMSampler, DDPMSampler, SamplerStep, make_sampler
from utils.config import SamplerConfig, config_from_dict

ABLATIONS = [(True, True), (True, False), (False, True), (False, False)]
"""(diffusion.use_center = DRDA, diffusion.use_center_sampler = DRDS): the paper and its ablations."""
ABLATION_IDS = ["DRDA+DRDS", "DRDA_only", "DRDS_only", "neither"]


@pytest.fixture
def setup(tiny_config, images):
    torch.manual_seed(0)
    encoder, diffusion = build_networks(tiny_config)
    low, _ = images
    with torch.no_grad():
        anchor, feats = encoder(low)
    return diffusion, low, anchor, feats


def _run(diffusion, sampler, low, anchor, feats, seed):
    return sample(diffusion, sampler, low, anchor, feats, generator=torch.Generator().manual_seed(seed))


def test_ddim_eta_one_over_all_steps_is_the_ddpm_posterior(setup):
    diffusion, low, anchor, feats = setup
    ddpm = _run(diffusion, make_sampler(diffusion, "ddpm", 10), low, anchor, feats, seed=1)
    ddim = _run(diffusion, make_sampler(diffusion, "ddim", 10, eta=1.0), low, anchor, feats, seed=1)
    assert torch.allclose(ddpm, ddim, atol=1e-4)
    other_noise = _run(diffusion, make_sampler(diffusion, "ddpm", 10), low, anchor, feats, seed=2)
    assert not torch.allclose(ddpm, other_noise, atol=1e-4)


def test_single_ddpm_step_matches_ddim_step(setup):
    diffusion, low, anchor, _ = setup
    x_t, x0 = torch.randn_like(low), torch.rand_like(low) * 2 - 1
    for t in (9, 5, 1):
        ddpm, ddim = make_sampler(diffusion, "ddpm", 10), make_sampler(diffusion, "ddim", 10, eta=1.0)
        a = ddpm.step(x0, t, x_t, anchor, generator=torch.Generator().manual_seed(t)).prev_sample
        b = ddim.step(x0, t, x_t, anchor, generator=torch.Generator().manual_seed(t)).prev_sample
        assert torch.allclose(a, b, atol=1e-5)


def test_ddim_eta_zero_is_deterministic_and_ends_at_x0(setup):
    diffusion, low, anchor, feats = setup
    sampler = make_sampler(diffusion, "ddim", 3)
    # evenly spaced from T - 1 to 0, rounded half to even (4.5 -> 4)
    assert sampler.timesteps == [9, 4, 0]
    assert make_sampler(diffusion, "ddim", 4).timesteps == [9, 6, 3, 0]
    assert make_sampler(diffusion, "ddim", 1).timesteps == [9]
    assert make_sampler(diffusion, "ddim", 10).timesteps == list(range(9, -1, -1))
    a = _run(diffusion, sampler, low, anchor, feats, seed=1)
    b = _run(diffusion, sampler, low, anchor, feats, seed=2)
    assert torch.equal(a, b)
    x0 = torch.rand_like(low) * 2 - 1
    assert torch.allclose(sampler.step(x0, 0, torch.randn_like(low), anchor).prev_sample, x0, atol=1e-6)


def test_ddim_with_exact_x0_recovers_the_shifted_trajectory(setup):
    """If x0_hat is exact, a deterministic DDIM step from q_sample(x0, t) lands on q_sample(x0, s) with the
    same base noise: the sampler works in the anchor-shifted coordinates."""
    diffusion, low, anchor, _ = setup
    x0 = torch.rand_like(low) * 2 - 1
    eps = torch.randn_like(low)
    sampler = make_sampler(diffusion, "ddim", 4)
    t, s = sampler.timesteps[0], sampler.timesteps[1]
    x_t = diffusion.q_sample(x0, torch.full((2,), t), anchor, noise=eps)
    x_s = sampler.step(x0, t, x_t, anchor).prev_sample
    assert torch.allclose(x_s, diffusion.q_sample(x0, torch.full((2,), s), anchor, noise=eps), atol=1e-4)


def test_a_step_returns_the_next_sample_and_the_prediction_it_used(setup):
    diffusion, low, anchor, _ = setup
    x_t, x0 = torch.randn_like(low), torch.rand_like(low) * 2 - 1
    for sampler in (make_sampler(diffusion, "ddpm", 10), make_sampler(diffusion, "ddim", 4)):
        step = sampler.step(x0, sampler.timesteps[0], x_t, anchor, generator=torch.Generator().manual_seed(0))
        assert isinstance(step, SamplerStep) and step.pred_original_sample is x0
        assert step.prev_sample.shape == x_t.shape and not torch.allclose(step.prev_sample, x_t)


def test_a_step_before_set_timesteps_is_refused(setup):
    diffusion, low, anchor, _ = setup
    for sampler in (DDPMSampler(diffusion), DDIMSampler(diffusion)):
        with pytest.raises(RuntimeError, match="set_timesteps"):
            sampler.step(low, 9, low, anchor)
    ddim = make_sampler(diffusion, "ddim", 4)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ddim.step(low, 5, low, anchor)  # not one of its timesteps


def test_the_anchor_sampler_has_no_steps_and_returns_the_anchor(setup):
    diffusion, low, anchor, feats = setup
    sampler = make_sampler(diffusion, "anchor", 1)
    assert isinstance(sampler, AnchorSampler) and sampler.timesteps == []
    calls = []
    out = sample(diffusion, sampler, low, anchor * 2 - 0.5, feats, callback=lambda i, n: calls.append((i, n)))
    assert torch.equal(out, (anchor * 2 - 0.5).clamp(0, 1)) and calls == [(1, 1)]


def test_sampler_arguments_are_checked(setup):
    diffusion = setup[0]
    with pytest.raises(ValueError, match="ddim"):
        make_sampler(diffusion, "ddpm", 5)
    with pytest.raises(ValueError, match="steps"):
        make_sampler(diffusion, "ddim", 0)
    with pytest.raises(ValueError, match="valid"):
        make_sampler(diffusion, "euler", 5)
    with pytest.raises(ValueError, match="eta"):
        make_sampler(diffusion, "ddim", 4, eta=-1.0)


def test_enhance_any_size_crops_back(tiny_config):
    torch.manual_seed(0)
    encoder, diffusion = build_networks(tiny_config)
    img = torch.rand(1, 3, 13, 21)
    out = enhance(encoder, diffusion, img, sampler=make_sampler(diffusion, "ddim", 2), pad_multiple=8)
    assert out.image.shape == img.shape and out.anchor.shape == img.shape
    assert 0 <= out.image.min() and out.image.max() <= 1
    assert out.image.min() >= 0 and torch.all(out.image + 1e-6 >= img)  # residual >= -1 keeps img >= lr


def test_pad_to_multiple_reflects_then_replicates():
    img = torch.arange(12.0).reshape(1, 1, 3, 4)
    padded = pad_to_multiple(img, 8)
    assert padded.shape == (1, 1, 8, 8)
    assert torch.equal(padded[..., :3, :4], img)
    medium = torch.rand(1, 3, 13, 21)
    reflected = pad_to_multiple(medium, 8)
    assert torch.equal(reflected[..., 13, :21], medium[..., 11, :])  # reflection about the last row


def _ablation(use_center: bool, use_center_sampler: bool):
    """A tiny model with the given switches (stronger_cond off: without DRDA training uses no encoder features)."""
    config = config_from_dict({"model": {"unet_dim": 8, "dim_mults": [1, 2, 2], "stronger_cond": False},
                               "diffusion": {"timesteps": 10, "pad_multiple": 8, "use_center": use_center,
                                             "use_center_sampler": use_center_sampler},
                               "sampler": {"sampler": "ddpm", "steps": 10},
                               "val_sampler": {"sampler": "ddim", "steps": 2},
                               "optim": {"loss_type": "l2", "optimizer": "adamw"}})
    torch.manual_seed(0)
    return build_networks(config)


@pytest.mark.parametrize("use_center, use_center_sampler", ABLATIONS, ids=ABLATION_IDS)
def test_ddim_eta_one_step_is_the_ddpm_posterior_for_every_ablation(use_center, use_center_sampler):
    """DDPM's posterior follows DRDS (the k2 term); DDIM must shift by the same anchor, or the two disagree
    by up to 0.8 in one step when only one of DRDA/DRDS is on."""
    _, diffusion = _ablation(use_center, use_center_sampler)
    generator = torch.Generator().manual_seed(0)
    anchor = torch.rand(2, 3, 16, 24, generator=generator)
    x_t = torch.randn(2, 3, 16, 24, generator=generator)
    x0 = torch.rand(2, 3, 16, 24, generator=generator) * 2 - 1
    b = diffusion
    for t in (9, 5, 1):
        z = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(t))
        a = make_sampler(b, "ddpm", 10).step(x0, t, x_t, anchor, noise=z).prev_sample
        d = make_sampler(b, "ddim", 10, eta=1.0).step(x0, t, x_t, anchor, noise=z).prev_sample
        assert torch.allclose(a, d, atol=1e-5), (t, (a - d).abs().max())
        # the posterior by hand: coef1 x0 + coef2 x_t (+ k2 c' with DRDS) + sigma z
        abar, abar_prev, beta = b.alphas_cumprod[t], b.alphas_cumprod[t - 1], b.betas[t]
        mean = (beta * abar_prev.sqrt() * x0 + (1 - abar_prev) * (1 - beta).sqrt() * x_t) / (1 - abar)
        if use_center_sampler:
            mean = mean + b.extra_term_coef2[t] * (2 * anchor - 1)
        expected = mean + (beta * (1 - abar_prev) / (1 - abar)).sqrt() * z
        assert torch.allclose(a, expected, atol=1e-5)


@pytest.mark.parametrize("use_center, use_center_sampler", ABLATIONS, ids=ABLATION_IDS)
def test_ddim_eta_one_over_all_steps_samples_as_ddpm_for_every_ablation(images, use_center, use_center_sampler):
    encoder, diffusion = _ablation(use_center, use_center_sampler)
    low, _ = images
    with torch.no_grad():
        anchor, feats = encoder(low)
    ddpm = _run(diffusion, make_sampler(diffusion, "ddpm", 10), low, anchor, feats, seed=1)
    ddim = _run(diffusion, make_sampler(diffusion, "ddim", 10, eta=1.0), low, anchor, feats, seed=1)
    assert torch.allclose(ddpm, ddim, atol=1e-4), (ddpm - ddim).abs().max()


@pytest.mark.parametrize("use_center_sampler", [True, False], ids=["DRDS", "no_DRDS"])
def test_sampling_starts_from_the_anchor_with_drds_else_from_seeded_noise(images, use_center_sampler):
    """x_T as the reference: c' = 2c - 1 with DRDS, N(0, I) (from the caller's generator) without."""
    encoder, diffusion = _ablation(False, use_center_sampler)
    low, _ = images
    with torch.no_grad():
        anchor, feats = encoder(low)
    one_step = make_sampler(diffusion, "ddim", 1)  # deterministic: the output is x0_hat(x_T) at t = T - 1
    x_T = 2 * anchor - 1 if use_center_sampler else torch.randn(low.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, x0_hat = diffusion.predict_start(x_T, torch.full((2,), 9), low, feats)
    expected = diffusion.res2img(x0_hat, low)
    assert torch.allclose(_run(diffusion, one_step, low, anchor, feats, seed=7), expected, atol=1e-6)
    other = _run(diffusion, one_step, low, anchor, feats, seed=8)
    assert torch.allclose(other, expected, atol=1e-6) == use_center_sampler  # only noise depends on the seed


def test_enhance_without_drds_is_seeded_even_with_a_deterministic_sampler(images):
    torch.manual_seed(0)
    module = AnlightenDiff(config_from_dict({"model": {"unet_dim": 8, "dim_mults": [1, 2, 2]},
                                             "diffusion": {"timesteps": 10, "pad_multiple": 8,
                                                           "use_center_sampler": False},
                                             "sampler": {"sampler": "ddpm", "steps": 10},
                                             "val_sampler": {"sampler": "ddim", "steps": 2}}))
    low, _ = images
    ddim = [SamplerConfig(sampler="ddim", steps=2, eta=0.0, seed=s) for s in (0, 0, 1)]
    with torch.no_grad():
        a, b, c = (module.enhance(low, s).image for s in ddim)
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-4)

import pytest
import torch

from models.inference import enhance, pad_to_multiple, sample
from models.module import build_networks
from models.samplers import DDIMSampler, DDPMSampler, make_sampler


@pytest.fixture
def setup(tiny_config, images):
    torch.manual_seed(0)
    encoder, diffusion = build_networks(tiny_config)
    low, _ = images
    with torch.no_grad():
        center, feats = encoder(low)
    return diffusion, low, center, feats


def _run(diffusion, sampler, low, center, feats, seed):
    return sample(diffusion, sampler, low, center, feats, generator=torch.Generator().manual_seed(seed))


def test_ddim_eta_one_over_all_steps_is_the_ddpm_posterior(setup):
    diffusion, low, center, feats = setup
    ddpm = _run(diffusion, make_sampler(diffusion, "ddpm", 10), low, center, feats, seed=1)
    ddim = _run(diffusion, make_sampler(diffusion, "ddim", 10, eta=1.0), low, center, feats, seed=1)
    assert torch.allclose(ddpm, ddim, atol=1e-4)
    other_noise = _run(diffusion, make_sampler(diffusion, "ddpm", 10), low, center, feats, seed=2)
    assert not torch.allclose(ddpm, other_noise, atol=1e-4)


def test_single_ddpm_step_matches_ddim_step(setup):
    diffusion, low, center, _ = setup
    x_t, x0 = torch.randn_like(low), torch.rand_like(low) * 2 - 1
    for t in (9, 5, 1):
        a = DDPMSampler(diffusion).step(x0, t, x_t, center, generator=torch.Generator().manual_seed(t))
        b = DDIMSampler(diffusion, eta=1.0).step(x0, t, x_t, center, generator=torch.Generator().manual_seed(t))
        assert torch.allclose(a, b, atol=1e-5)


def test_ddim_eta_zero_is_deterministic_and_ends_at_x0(setup):
    diffusion, low, center, feats = setup
    sampler = make_sampler(diffusion, "ddim", 3)
    assert sampler.timesteps == [9, 4, 0] or sampler.timesteps[0] == 9 and sampler.timesteps[-1] == 0
    a = _run(diffusion, sampler, low, center, feats, seed=1)
    b = _run(diffusion, sampler, low, center, feats, seed=2)
    assert torch.equal(a, b)
    x0 = torch.rand_like(low) * 2 - 1
    assert torch.allclose(sampler.step(x0, 0, torch.randn_like(low), center), x0, atol=1e-6)


def test_ddim_with_exact_x0_recovers_the_shifted_trajectory(setup):
    """If x0_hat is exact, a deterministic DDIM step from q_sample(x0, t) lands on q_sample(x0, s) with the
    same base noise: the sampler works in the anchor-shifted coordinates."""
    diffusion, low, center, _ = setup
    x0 = torch.rand_like(low) * 2 - 1
    eps = torch.randn_like(low)
    sampler = make_sampler(diffusion, "ddim", 4)
    t, s = sampler.timesteps[0], sampler.timesteps[1]
    x_t = diffusion.q_sample(x0, torch.full((2,), t), center, noise=eps)
    x_s = sampler.step(x0, t, x_t, center)
    assert torch.allclose(x_s, diffusion.q_sample(x0, torch.full((2,), s), center, noise=eps), atol=1e-4)


def test_sampler_arguments_are_checked(setup):
    diffusion = setup[0]
    with pytest.raises(ValueError, match="ddim"):
        make_sampler(diffusion, "ddpm", 5)
    with pytest.raises(ValueError, match="steps"):
        make_sampler(diffusion, "ddim", 0)
    with pytest.raises(ValueError, match="valid"):
        make_sampler(diffusion, "euler", 5)


def test_enhance_any_size_crops_back(tiny_config):
    torch.manual_seed(0)
    encoder, diffusion = build_networks(tiny_config)
    img = torch.rand(1, 3, 13, 21)
    out = enhance(encoder, diffusion, img, sampler="ddim", steps=2, pad_multiple=8)
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

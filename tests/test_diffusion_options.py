"""The diffusion's options (what the UNet predicts, the domain and scale of x0, where sampling starts): with an
oracle UNet, one that outputs the true target, every sampler reproduces the ground truth; DDIM with eta = 1 over
all timesteps is DDPM for every option; the paper's settings are untouched."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from models.build import build_networks
from models.diffusion import GaussianDiffusion
from models.inference import sample
from models.samplers import make_sampler
from utils.config import ConfigError, config_from_dict

T = 10
OPTIONS = list(itertools.product(["eps", "x0", "v"], ["residual", "image"], [1.0, 0.2], ["anchor", "marginal"]))
OPTION_IDS = ["-".join(str(v) for v in option) for option in OPTIONS]
SAMPLERS = [("ddpm", T, 0.0), ("ddim", 1, 0.0), ("ddim", 3, 0.0), ("ddim", T, 0.0), ("ddim", 4, 1.0)]


class Oracle(nn.Module):
    """A UNet that knows x0 (what is diffused): at x_t it outputs the target the diffusion's prediction type asks
    for, eps* = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), x0 or v."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.diffusion: list[GaussianDiffusion] = []  # not a submodule: the diffusion owns this network

    def forward(self, x_t, t, img_lr, feats, anchor=None):
        d = self.diffusion[0]
        abar = d.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps_star = (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        return d.prediction_target(self.x0, eps_star, t)


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lr, hr, anchor) (2, 3, 8, 8): hr >= lr, as the paper's residual can represent; the anchor near hr."""
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(2, 3, 8, 8, generator=g) * 0.3
    hr = (lr + torch.rand(2, 3, 8, 8, generator=g) * 0.6).clamp(0, 1)
    anchor = (hr + 0.1 * torch.randn(2, 3, 8, 8, generator=g)).clamp(0, 1)
    return lr, hr, anchor


def _oracle_diffusion(prediction, domain, scale, start, lr, hr, anchor, drda=True, drds=True):
    d = GaussianDiffusion(nn.Identity(), timesteps=T, prediction=prediction, domain=domain, scale=scale,
                          sampling_start=start, drda=drda, drds=drds)
    oracle = Oracle(d.encode(hr, lr, anchor))
    oracle.diffusion.append(d)
    d.unet = oracle
    return d


@pytest.mark.parametrize("prediction, domain, scale, start", OPTIONS, ids=OPTION_IDS)
def test_an_oracle_network_makes_every_sampler_reproduce_the_ground_truth(prediction, domain, scale, start):
    lr, hr, anchor = _pair()
    d = _oracle_diffusion(prediction, domain, scale, start, lr, hr, anchor)
    for name, steps, eta in SAMPLERS:
        out = sample(d, make_sampler(d, name, steps, eta), lr, anchor, [], generator=torch.Generator().manual_seed(1))
        assert torch.allclose(out, hr, atol=2e-4), (name, steps, eta, (out - hr).abs().max().item())


@pytest.mark.parametrize("drda, drds", [(False, False), (True, False), (False, True)],
                         ids=["no_anchoring", "DRDA_only", "DRDS_only"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_the_oracle_holds_for_the_ablations(drda, drds, prediction):
    lr, hr, anchor = _pair(2)
    d = _oracle_diffusion(prediction, "image", 0.5, "marginal", lr, hr, anchor, drda=drda, drds=drds)
    for name, steps, eta in SAMPLERS:
        out = sample(d, make_sampler(d, name, steps, eta), lr, anchor, [], generator=torch.Generator().manual_seed(3))
        assert torch.allclose(out, hr, atol=2e-4), (name, steps, eta)


def test_predictions_are_consistent_with_each_other():
    """from_output inverts prediction_target for every type: the same x_t gives the same (eps*, x0)."""
    lr, hr, anchor = _pair(4)
    t = torch.tensor([2, 7])
    for prediction in ("eps", "x0", "v"):
        d = GaussianDiffusion(nn.Identity(), timesteps=T, prediction=prediction)
        x0 = d.encode(hr, lr, anchor)
        eps = torch.randn_like(x0, generator=None)
        x_t = d.q_sample(x0, t, anchor, noise=eps)
        eps_star = d.drda_noise(eps, t, anchor)
        eps_hat, x0_hat = d.from_output(d.prediction_target(x0, eps_star, t), x_t, t)
        assert torch.allclose(eps_hat, eps_star, atol=1e-4) and torch.allclose(x0_hat, x0, atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_encode_and_decode_are_inverse_and_scale_around_the_anchor(scale):
    lr, hr, anchor = _pair(5)
    for domain in ("residual", "image"):
        d = GaussianDiffusion(nn.Identity(), timesteps=T, domain=domain, scale=scale)
        x0 = d.encode(hr, lr, anchor)
        assert torch.allclose(d.decode(x0, lr, anchor), hr, atol=1e-6)
        unscaled = 2 * (hr - lr) - 1 if domain == "residual" else 2 * hr - 1
        assert torch.allclose(x0 - (2 * anchor - 1), (unscaled - (2 * anchor - 1)) / scale, atol=1e-5)
    assert torch.equal(GaussianDiffusion(nn.Identity(), timesteps=T).encode(hr, lr, anchor), 2 * (hr - lr) - 1)


def test_the_marginal_start_is_the_forward_marginal_at_T_around_the_anchor():
    lr, hr, anchor = _pair(6)
    d = GaussianDiffusion(nn.Identity(), timesteps=T, sampling_start="marginal")
    noise = torch.randn_like(anchor)
    x_T = d.sampling_start(anchor, noise)
    assert torch.allclose(x_T, (2 * anchor - 1) + d.sqrt_one_minus_alphas_cumprod[-1] * noise)
    # what training sees at t = T - 1 for x0 = c': the same distribution
    x0 = 2 * anchor - 1
    trained = d.q_sample(x0, torch.full((2,), T - 1), anchor, noise=noise)
    assert torch.allclose(trained, x_T, atol=1e-5)
    assert d.start_draws_noise and not GaussianDiffusion(nn.Identity(), timesteps=T).start_draws_noise
    with pytest.raises(ValueError, match="noise"):
        d.sampling_start(anchor)


def _tiny(**diffusion):
    config = config_from_dict({"model": {"unet_dim": 8, "dim_mults": [1, 2], "unet_sees_anchor": True,
                                         "stronger_cond": False, "cond_on_res": False},
                               "diffusion": {"timesteps": T, "pad_multiple": 8, **diffusion},
                               "sampler": {"sampler": "ddpm", "steps": T},
                               "val_sampler": {"sampler": "ddpm", "steps": T}})
    torch.manual_seed(0)
    return build_networks(config)


@pytest.mark.parametrize("prediction, scale, start", [("v", 0.2, "marginal"), ("x0", 1.0, "anchor"),
                                                      ("eps", 0.5, "marginal")])
def test_ddim_eta_one_over_all_steps_is_ddpm_for_the_options(prediction, scale, start):
    encoder, d = _tiny(prediction=prediction, scale=scale, sampling_start=start, domain="image")
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.3
    with torch.no_grad():
        anchor, feats = encoder(lr)
    ddpm = sample(d, make_sampler(d, "ddpm", T), lr, anchor, feats, generator=torch.Generator().manual_seed(2))
    ddim = sample(d, make_sampler(d, "ddim", T, 1.0), lr, anchor, feats, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ddpm, ddim, atol=1e-4)
    other = sample(d, make_sampler(d, "ddpm", T), lr, anchor, feats, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(ddpm, other, atol=1e-4)  # the noise matters: the comparison is not vacuous


def test_the_unet_sees_the_anchor_only_when_asked():
    encoder, d = _tiny()
    assert d.unet.sees_anchor and d.unet.downs[0][0].block1.block[1].in_channels == 9
    x = torch.rand(1, 3, 16, 16)
    t = torch.tensor([3])
    a = d.unet(x, t, x, [], torch.zeros_like(x))
    b = d.unet(x, t, x, [], torch.ones_like(x))
    assert not torch.allclose(a, b)


def test_option_settings_are_validated():
    with pytest.raises(ConfigError, match="diffusion.scale"):
        config_from_dict({"diffusion": {"scale": 0}})
    with pytest.raises(ConfigError, match="diffusion.prediction"):
        config_from_dict({"diffusion": {"prediction": "score"}})
    with pytest.raises(ConfigError, match="unet_sees_anchor"):
        config_from_dict({"model": {"unet_sees_anchor": True, "stronger_cond": False},
                          "diffusion": {"use_center": False}})


def test_a_training_step_with_the_options_logs_each_term(monkeypatch):
    from models.module import AnlightenDiff

    config = config_from_dict({
        "stage": "diffusion",
        "model": {"unet_dim": 8, "dim_mults": [1, 2], "unet_sees_anchor": True, "stronger_cond": False,
                  "cond_on_res": False},
        "diffusion": {"timesteps": T, "pad_multiple": 8, "prediction": "v", "domain": "image", "scale": 0.2,
                      "sampling_start": "marginal"},
        "sampler": {"sampler": "ddim", "steps": 2}, "val_sampler": {"sampler": "ddim", "steps": 2},
        "optim": {"loss_type": "image", "image_loss": ["l1", "l2"], "image_loss_weights": [1.0, 0.5],
                  "ref_prob": 0.0}})
    torch.manual_seed(0)
    module = AnlightenDiff(config)
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **k: logged.__setitem__(name, value))
    monkeypatch.setattr(module, "log_dict", lambda values, **k: logged.update(values))
    lr, hr, _ = _pair(7)
    loss = module.training_step({"low": lr, "high": hr, "name": ["a", "b"]}, 0)
    assert set(logged) == {"train/loss", "train/loss/l1", "train/loss/l2"}
    assert torch.allclose(logged["train/loss/l1"] + logged["train/loss/l2"], loss)
    loss.backward()
    assert all(p.grad is not None for p in module.model.unet.parameters() if p.requires_grad)
    assert all(p.grad is None for p in module.encoder.parameters())  # the anchor stays frozen
    out = module.enhance(lr[:1], config.sampler).image
    assert out.shape == lr[:1].shape and 0 <= out.min() and out.max() <= 1


def test_training_can_draw_t_from_the_validation_samplers_timesteps(monkeypatch):
    from models.anchored_diffusion import AnchoredDiffusion
    from models.build import build_objective

    base = {"model": {"unet_dim": 8, "dim_mults": [1, 2]}, "diffusion": {"timesteps": T, "pad_multiple": 8},
            "sampler": {"sampler": "ddim", "steps": 3}, "val_sampler": {"sampler": "ddim", "steps": 3},
            "optim": {"loss_type": "l2"}}
    assert build_objective(config_from_dict(base)).timesteps is None
    config = config_from_dict({**base, "optim": {"loss_type": "l2", "train_timesteps": "sampler"}})
    objective = build_objective(config)
    assert objective.timesteps == (9, 4, 0) == tuple(make_sampler(GaussianDiffusion(nn.Identity(), timesteps=T),
                                                                  "ddim", 3).timesteps)
    drawn = []
    original = GaussianDiffusion.q_sample
    monkeypatch.setattr(GaussianDiffusion, "q_sample",
                        lambda self, x0, t, *a, **k: drawn.extend(t.tolist()) or original(self, x0, t, *a, **k))
    encoder, diffusion = build_networks(config)
    method = AnchoredDiffusion(encoder, diffusion, pad_multiple=8)
    lr, hr, _ = _pair(8)
    for _ in range(10):
        method.loss(lr, hr, objective)
    assert set(drawn) == {9, 4, 0}
    with pytest.raises(ConfigError, match="train_timesteps"):
        config_from_dict({**base, "val_sampler": {"sampler": "anchor"}, "optim": {"train_timesteps": "sampler"}})

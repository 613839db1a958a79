"""Anchored Gaussian diffusion: the DRDA forward process and the DRDS posterior, and what is diffused (the paper's
residual, or the image) and what the UNet predicts (eps*, as the paper, x0 or v)."""

from __future__ import annotations

import torch
from torch import nn

from models.schedule import beta_schedule, extract, schedule_buffers
from models.unet import NoiseUNet


def to_signed(img: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: the anchor c' = 2c - 1 used in every anchoring term."""
    return img * 2 - 1


class GaussianDiffusion(nn.Module):
    """Owns the noise predictor (``unet``) and the schedule buffers; implements the process maths.

    Tensors are (B, 3, H, W): ``x_start``/``x_t`` what is diffused, in about [-1, 1] (see :meth:`encode`),
    ``anchor`` the anchor image c in about [0, 1], ``t`` (B,) long timesteps in [0, T).

    ``drda``: the forward process carries the anchor (Eq. 12; the reference's ``use_center``); ``drds``: the
    posterior does (Eqs. 17-19; ``use_center_sampler``). The buffers keep the official checkpoint's names: k1 is
    ``extra_term_coef1``, k2 ``extra_term_coef2``.

    Options, each the paper's by default (see utils/config.py:DiffusionConfig): ``prediction`` (eps, x0, v),
    ``domain`` (residual, image), ``scale`` (what is diffused is c' + (x0 - c') / scale) and ``sampling_start``
    (anchor, marginal). DRDA's q_sample and DRDS's posterior are the same for all of them.
    """

    def __init__(self, unet: NoiseUNet, *, timesteps: int = 100, beta_schedule_name: str = "cosine",
                 drda: bool = True, drds: bool = True, clip_denoised: bool = True, prediction: str = "eps",
                 domain: str = "residual", scale: float = 1.0, sampling_start: str = "anchor"):
        super().__init__()
        self.unet = unet
        self.num_timesteps = timesteps
        self.drda = drda
        self.drds = drds
        self.clip_denoised = clip_denoised
        self.prediction = prediction
        self.domain = domain
        self.scale = scale
        self.start = sampling_start
        for name, value in schedule_buffers(beta_schedule(beta_schedule_name, timesteps)).items():
            self.register_buffer(name, value.to(torch.float32))

    @property
    def k1(self) -> torch.Tensor:
        """DRDA's k1_t (T,) (Eq. 13)."""
        return self.extra_term_coef1

    @property
    def k2(self) -> torch.Tensor:
        """DRDS's k2_t (T,) (Eqs. 17-19)."""
        return self.extra_term_coef2

    def alpha_bar(self, t: int) -> torch.Tensor:
        """abar_t (a 0-d tensor) for t in [0, T), and 1 for t = -1 (the clean image, after the last step)."""
        return self.alphas_cumprod[t] if t >= 0 else self.alphas_cumprod.new_tensor(1.0)

    @staticmethod
    def img2res(img_hr: torch.Tensor, img_lr: torch.Tensor) -> torch.Tensor:
        """x0 = 2 (hr - lr) - 1: the enhancement residual, in [-1, 1] where hr >= lr."""
        return 2 * (img_hr - img_lr) - 1

    @staticmethod
    def res2img(res: torch.Tensor, img_lr: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`img2res` (residual clamped to [-1, 1], image to [0, 1])."""
        return (img_lr + (res.clamp(-1, 1) + 1) / 2).clamp(0, 1)

    def _signed_anchor(self, anchor: torch.Tensor | None) -> torch.Tensor | float:
        """c', the centre of the scaling; 0 without DRDA, where training has no anchor."""
        return to_signed(anchor) if self.drda and anchor is not None else 0.0

    def encode(self, img_hr: torch.Tensor, img_lr: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """What is diffused, x0, for the target hr: the residual :meth:`img2res` (the paper) or the image 2 hr - 1,
        then c' + (x0 - c') / scale."""
        x0 = self.img2res(img_hr, img_lr) if self.domain == "residual" else to_signed(img_hr)
        if self.scale == 1:
            return x0
        signed = self._signed_anchor(anchor)
        return signed + (x0 - signed) / self.scale

    def unscaled(self, x0: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """x0 in its domain's units, from what is diffused (the inverse of the scaling in :meth:`encode`)."""
        if self.scale == 1:
            return x0
        signed = self._signed_anchor(anchor)
        return signed + self.scale * (x0 - signed)

    def decode(self, x0: torch.Tensor, img_lr: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """The image in [0, 1] that x0 (what is diffused) stands for: the inverse of :meth:`encode`, clamped."""
        x0 = self.unscaled(x0, anchor)
        return self.res2img(x0, img_lr) if self.domain == "residual" else ((x0.clamp(-1, 1) + 1) / 2)

    def clip_start(self, x0: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """x0_hat clamped to [-1, 1] in its domain's units (before the scaling)."""
        if self.scale == 1:
            return x0.clamp(-1, 1)
        signed = self._signed_anchor(anchor)
        return signed + (self.unscaled(x0, anchor).clamp(-1, 1) - signed) / self.scale

    def drda_noise(self, noise: torch.Tensor, t: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """eps* = eps + k1_t c' (Eq. 13), the noise the UNet learns to predict. ``noise`` is not modified.
        Without DRDA eps* = eps and ``anchor`` is not used (it may be None)."""
        if not self.drda:
            return noise
        return noise + extract(self.k1, t, noise.shape) * to_signed(anchor)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, anchor: torch.Tensor | None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """DRDA forward process (Eq. 12): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) (eps + k1_t c').

        ``noise`` is eps ~ N(0, I) (drawn if None) and is left unchanged.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * self.drda_noise(noise, t, anchor))

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, anchor: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DRDS posterior q(x_{t-1} | x_t, x0) (Eqs. 17-19): (mean, variance, clipped log variance).

        mean = coef1_t x0 + coef2_t x_t + k2_t c'.
        """
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        if self.drds:
            mean = mean + extract(self.k2, t, x_t.shape) * to_signed(anchor)
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps*_hat (unclipped)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps*_hat, x0_hat), unclipped, from the UNet's ``output`` at x_t: eps* itself (the paper), x0, or
        v = sqrt(abar_t) eps* - sqrt(1 - abar_t) x0, so x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v and
        eps* = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
        if self.prediction == "eps":
            return output, self.predict_start_from_noise(x_t, t, output)
        if self.prediction == "x0":
            eps = ((extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - output)
                   / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))
            return eps, output
        sqrt_abar = extract(self.sqrt_alphas_cumprod, t, x_t.shape)
        sqrt_one_minus = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        return sqrt_one_minus * x_t + sqrt_abar * output, sqrt_abar * x_t - sqrt_one_minus * output

    def prediction_target(self, x_start: torch.Tensor, eps_star: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should output for x_t = q_sample(x_start, t, c, eps): eps*, x0 or v."""
        if self.prediction == "eps":
            return eps_star
        if self.prediction == "x0":
            return x_start
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * eps_star
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)

    def predict_start(self, x_t: torch.Tensor, t: torch.Tensor, img_lr: torch.Tensor, feats: list[torch.Tensor],
                      anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the UNet: (eps*_hat, x0_hat), x0_hat clipped (:meth:`clip_start`) when ``clip_denoised``."""
        eps_hat, x0_hat = self.from_output(self.unet(x_t, t, img_lr, feats, anchor), x_t, t)
        return eps_hat, self.clip_start(x0_hat, anchor) if self.clip_denoised else x0_hat

    def anchor_shift(self, anchor: torch.Tensor) -> torch.Tensor:
        """The offset s between x and the coordinates z = x - s in which the reverse process is a plain DDPM
        posterior: c' with DRDS (mean = c' + coef1 (x0 - c') + coef2 (x_t - c'), since k2 = 1 - coef1 - coef2),
        zero without it. The samplers work in these coordinates, so DDIM with eta = 1 over all timesteps is the
        DDPM/DRDS posterior for every setting of the two switches.

        DRDA shifts the forward process by c' in the same way; the paper's ablations switch DRDA and DRDS
        independently, and sampling follows the posterior (DRDS), as the reference's does."""
        return to_signed(anchor) if self.drds else torch.zeros_like(anchor)

    @property
    def start_draws_noise(self) -> bool:
        """Whether :meth:`sampling_start` needs noise: from the marginal, or without DRDS."""
        return self.start == "marginal" or not self.drds

    def sampling_start(self, anchor: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_T, where the reverse process starts. As the reference: the anchor c' with DRDS (no noise added),
        otherwise ``noise``. ``marginal``: s + sqrt(1 - abar_T) ``noise`` (s = :meth:`anchor_shift`), the forward
        marginal at T with x0 taken to be the anchor. ``noise``: standard-normal, shaped like ``anchor``, required
        when :attr:`start_draws_noise`."""
        if not self.start_draws_noise:
            return to_signed(anchor)
        if noise is None:
            raise ValueError("this sampling start draws N(0, I) noise: pass it")
        if self.start == "marginal":
            return self.anchor_shift(anchor) + self.sqrt_one_minus_alphas_cumprod[-1] * noise
        return noise

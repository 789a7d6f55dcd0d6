"""ddpm.py: Denoising Diffusion Probabilistic Models in one file, to read next to the papers:
  DDPM  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239
  DDIM  Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502

    python ddpm.py sample --sampler ddim      # DDIM, 50 steps, the model in samples/: sample.png
    python ddpm.py sample                     # Algorithm 2, T = 1000 steps: ~4 minutes on 2 cores
    python ddpm.py train --epochs 30          # Algorithm 1 on MNIST (downloaded), writes ckpt.pt
    python ddpm.py nll                        # the bound of eq. (5) in bits/dim, MNIST's test split
    python ddpm.py reconstruct                # DDIM Section 5.4: test digits to x_T and back, MSE
    python ddpm.py interpolate                # DDIM's slerp and DDPM Section 4.4's mix, one grid
    python -m pytest                          # the tests: the code is the papers' math

The papers' core comes first: the schedule and forward process, Algorithm 1, the bound it
simplifies, Algorithm 2, DDIM (sampling, encoding, interpolation), the eps-network. Then what goes
beyond them: DPM-Solver++(2M), classifier-free guidance, the bound at a few network calls, EMA.
Then the machinery: data, files, device and precision, the training loop, the command line.
Equation numbers are DDPM's unless marked "DDIM" or another paper.

Time index, used everywhere: t = 1..T as in DDPM. Every schedule tensor has length T + 1 and index
0 means "no noise": beta[0] = 0, alpha_bar[0] = 1, so x_0 is data and the network only sees t >= 1.

Notation. The three papers give one quantity different names; this file uses DDPM's:
    code                     DDPM              DDIM              DPM-Solver++ (Lu et al. 2022)
    alpha_bar[t]             alpha_bar_t       alpha_t           alpha_t ** 2
    (1 - alpha_bar[t])**0.5  sqrt(1 - a_bar)   sqrt(1 - alpha_t) sigma_t
    lam[t]                   -                 -                 lambda_t = log(alpha_t / sigma_t)
    sigma (sampling noise)   sigma_t           sigma_tau(eta)    - (deterministic)
    x0_hat                   x_0 from eq. (15) "predicted x_0"   x_theta, the data prediction
"""

import argparse
import contextlib
import copy
import functools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

# ==================================== The papers' core ====================================


# --- Noise schedule and forward process q(x_t | x_0): DDPM eqs. (2), (4), (6), (7) ---------------
@dataclass
class Schedule:
    """Every per-step constant, float64 on the CPU. Where each sample has its own t (training),
    gather(a, t, x) picks a[t]; the samplers, whose whole batch is at one step, index a[step]."""

    T: int
    beta: torch.Tensor  # (T+1,) variance added at step t, eq. (2); beta[0] = 0
    alpha: torch.Tensor  # 1 - beta
    alpha_bar: torch.Tensor  # prod_{s<=t} alpha_s, eq. (4); alpha_bar[0] = 1
    beta_tilde: torch.Tensor  # variance of q(x_{t-1} | x_t, x_0), eq. (7); beta_tilde[1] = 0
    lam: torch.Tensor  # log(sqrt(alpha_bar) / sqrt(1 - alpha_bar)): DPM-Solver's time, lam[0] = inf


def make_schedule(kind, T):
    assert kind in ("linear", "cosine"), kind
    if kind == "linear":  # Ho et al.: 1e-4 .. 0.02 at T = 1000; x 1000/T keeps alpha_bar_T ~ e^-10
        beta = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    else:  # cosine: Nichol & Dhariwal 2021, eq. (17): alpha_bar_t = f(t) / f(0)
        s = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        beta = 1 - f[1:] / f[:-1]
    beta = beta.clamp(max=0.999)  # no single step may erase x entirely
    return schedule_of(beta)


def schedule_of(beta):  # every constant from beta_1..beta_T; index 0 is prepended: no noise
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
    T = len(beta) - 1
    alpha = 1 - beta
    alpha_bar = torch.cumprod(alpha, 0)
    beta_tilde = torch.zeros_like(beta)
    beta_tilde[1:] = (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]) * beta[1:]  # eq. (7)
    lam = 0.5 * (alpha_bar / (1 - alpha_bar)).log()
    return Schedule(T, beta, alpha, alpha_bar, beta_tilde, lam)


def gather(a, t, x):  # a[t] per sample, shaped (B, 1, ..., 1) to multiply x of any rank
    return a[t.cpu()].to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


# x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar) x_0, (1 - alpha_bar) I), eq. (4)
def q_sample(x0, t, eps, sched):
    alpha_bar = gather(sched.alpha_bar, t, x0)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


def predict_x0(xt, t, eps, sched):  # eq. (4) solved for x_0, given the noise: x0_hat of eq. (15)
    alpha_bar = gather(sched.alpha_bar, t, xt)
    return (xt - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def q_posterior(x0, xt, t, sched):
    """Mean and variance of q(x_{t-1} | x_t, x_0), eqs. (6)-(7). Algorithm 2 does not call it: its
    line 4 (eq. 11) is this mean with x_0 = x0_hat, in eps; a test replays Algorithm 2 here."""
    alpha_bar = gather(sched.alpha_bar, t, xt)
    alpha_bar_prev = gather(sched.alpha_bar, t - 1, xt)  # alpha_bar_{t-1}
    beta = gather(sched.beta, t, xt)
    alpha = gather(sched.alpha, t, xt)
    mean = (alpha_bar_prev.sqrt() * beta * x0 + alpha.sqrt() * (1 - alpha_bar_prev) * xt) / (
        1 - alpha_bar
    )
    return mean, gather(sched.beta_tilde, t, xt)


# --- Algorithm 1: training ------------------------------------------------------------------------
# z ~ N(0, I) shaped like x, from the caller's generator: seeds fix samples
def noise_like(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def loss_fn(eps_model, x0, sched, generator=None):
    """L_simple, eq. (14): the mean over pixels where eq. (14) sums them (a constant factor)."""
    # line 3: t ~ Uniform({1, ..., T}); t = 0 is data, never a training step
    t = torch.randint(1, sched.T + 1, (x0.shape[0],), generator=generator, device=x0.device)
    eps = noise_like(x0, generator)  # line 4
    xt = q_sample(x0, t, eps, sched)
    # line 5: the squared error of the noise, in fp32 whatever the network's precision
    return F.mse_loss(eps_model(xt, t).float(), eps.float())


NO_AUTOCAST = contextlib.nullcontext()
NO_LOSS_SCALING = torch.amp.GradScaler("cpu", enabled=False)


def train_step(
    net, opt, x0, sched, generator=None, y=None, amp=NO_AUTOCAST, scaler=NO_LOSS_SCALING
):
    """Algorithm 1, lines 2-5, once: returns the loss, or None if the step was skipped.
    Additions to the paper: gradient-norm clipping at 1 (as Ho et al.'s released code), the network
    under autocast `amp` (bf16/fp16), fp16 loss scaling by `scaler`, and a skip instead of an update
    when the loss or gradient is not finite, so no NaN ever reaches the weights. y: class labels."""
    with amp:
        loss = loss_fn(lambda xt, t: net(xt, t, y), x0, sched, generator)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # the true gradient, for clipping
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        scaler.update()  # an fp16 overflow: a smaller loss scale next step
        print(
            f"warning: loss {loss.item()}, grad norm {grad_norm.item()}: step skipped",
            file=sys.stderr,
        )
        return None
    scaler.step(opt)  # line 5: the gradient step
    scaler.update()
    return loss.item()


# --- The bound L of eq. (5), in nats per dimension: what L_simple simplifies ----------------------
# -log p(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0. With p_theta's mean from eq. (11), each L_{t-1} is
# a KL between Gaussians: a weight times ||eps - eps_theta||^2 (eq. 12), plus, where sigma_t^2 is
# not beta_tilde_t, a constant for the variances' mismatch. L_simple (Section 3.4) keeps the squared
# error and drops the weight, sigma, the constants and L_0's bucket edges: eq. (14).
def sigma2_choice(sched, sigma2):
    """sigma_t^2 of Section 3.2: "beta" (beta_t) or "beta_tilde" (beta_tilde_t); under beta_tilde,
    sigma_1^2 = beta_tilde_2, as Ho et al.'s code clips it: beta_tilde_1 = 0 would make L_0 a
    decoder without noise, whose bucket probability is 0 or 1."""
    if sigma2 == "beta":
        return sched.beta
    var = sched.beta_tilde.clone()
    if sched.T > 1:  # a one-step schedule (respaced to S = 1) has no beta_tilde_2
        var[1] = var[2]
    return var


def normal_kl(mean1, var1, mean2, var2):  # KL(N(mean1, var1) || N(mean2, var2)) per dimension
    return 0.5 * ((var2 / var1).log() + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def bucket_probability(x0, mean, sigma):
    """p_theta(x_0 | x_1) per dimension, eq. (13): N(mean, sigma^2) integrated over x_0's bucket,
    x_0 +- 1/255 (x_0 one of the 256 pixel values, scaled to [-1, 1]); the first bucket reaches
    down to -inf and the last up to +inf, so the 256 probabilities sum to 1. float64, and taken on
    the side of the mean where the normal CDF is small, so a far bucket keeps its digits."""
    x0, mean = x0.double(), mean.double()
    upper = torch.where(x0 > 1 - 1 / 255, math.inf, x0 + 1 / 255)
    lower = torch.where(x0 < -1 + 1 / 255, -math.inf, x0 - 1 / 255)
    Phi = torch.special.ndtr
    above = Phi((mean - lower) / sigma) - Phi((mean - upper) / sigma)  # for buckets above the mean
    below = Phi((upper - mean) / sigma) - Phi((lower - mean) / sigma)
    return torch.where(x0 > mean, above, below)


def prior_kl(x0, sched):  # L_T = KL(q(x_T | x_0) || N(0, I)), eq. (4), in nats per dimension
    alpha_bar = sched.alpha_bar[sched.T]
    one = torch.ones((), dtype=torch.float64)
    return normal_kl(alpha_bar.sqrt() * x0.double(), 1 - alpha_bar, 0 * one, one)


SIGMA2 = ("beta_tilde", "beta")  # the two sigma_t^2 of Section 3.2, in this order


def bound_term(eps_model, x0, t, sched, generator=None):
    """Each image's term of eq. (5) at its own t, in nats per dimension, shaped (2, *x0.shape) for
    the two sigma_t^2 of SIGMA2: L_{t-1} for t >= 2 and L_0 for t = 1, from one x_t ~ q(x_t | x_0);
    and x0_hat, eq. (15). x0: images on the pixel grid, in [-1, 1]."""
    eps = noise_like(x0, generator)
    xt = q_sample(x0, t, eps, sched)
    eps_theta = eps_model(xt, t).to(x0.dtype)
    beta = gather(sched.beta, t, xt)
    alpha_bar = gather(sched.alpha_bar, t, xt)
    mean = (xt - beta / (1 - alpha_bar).sqrt() * eps_theta) / gather(sched.alpha, t, xt).sqrt()
    q_mean, q_var = q_posterior(x0, xt, t, sched)  # eqs. (6)-(7)
    first = (t == 1).view(-1, *[1] * (x0.dim() - 1))
    terms = []
    for sigma2 in SIGMA2:
        var = gather(sigma2_choice(sched, sigma2), t, xt).double()
        kl = normal_kl(q_mean.double(), q_var.double(), mean.double(), var)  # inf at t = 1: unused
        p = bucket_probability(x0, mean, var.sqrt())  # L_0: at t = 1, mean is x0_hat
        nll = -p.clamp(min=torch.finfo(p.dtype).tiny).log()  # 0 beyond ~38 sigma: not inf
        terms.append(torch.where(first, nll, kl))
    return torch.stack(terms), predict_x0(xt, t, eps_theta, sched)


# --- Algorithm 2: sampling ------------------------------------------------------------------------
# x_T ~ N(0, I) on the generator's device, unless given
def initial_noise(shape, generator, x_T=None):
    if x_T is not None:
        return x_T
    return torch.randn(shape, generator=generator, device=getattr(generator, "device", None))


@torch.inference_mode()
def sample_ddpm(
    eps_model,
    sched,
    shape,
    generator=None,
    sigma2="beta_tilde",
    x_T=None,
    trajectory=False,
    t_start=None,
):
    """Algorithm 2 as printed. sigma2 = "beta_tilde" or "beta", the two sigma_t^2 of Section 3.2.
    Line 4 is eq. (11); the route through x0_hat and the posterior mean, eq. (7), is the same.
    With t_start, x_T is an x_t at t = t_start: the reverse process starts there (Section 4.4)."""
    x = initial_noise(shape, generator, x_T)  # line 1
    xs = [x]
    sigma = sigma2_choice(sched, sigma2).sqrt()  # sigma_1 unused: no noise at t = 1 (line 3)
    for step in range(t_start or sched.T, 0, -1):  # line 2
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        # line 3: no noise at the last step, otherwise every sample keeps sigma_1 * z of noise
        z = noise_like(x, generator) if step > 1 else 0
        eps = eps_model(x, t).to(x.dtype)
        beta = sched.beta[step]
        alpha = sched.alpha[step]
        alpha_bar = sched.alpha_bar[step]
        x = (x - beta / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt() + sigma[step] * z  # line 4
        xs.append(x)
    return (x, xs) if trajectory else x  # line 6: x_0


def clip_x0(eps_model, sched):
    """What Ho et al.'s released code samples with and Algorithm 2 does not print: x0_hat clipped to
    the data's range [-1, 1] before the posterior mean of eq. (7) ("clip_denoised"). Written as an
    eps-model, the noise whose x0_hat (eq. 15) is the clipped one, so every sampler takes it as it
    is: in Algorithm 2, line 4 with this eps is eq. (7) at the clipped x0_hat."""

    def clipped(xt, t):
        x0_hat = predict_x0(xt, t, eps_model(xt, t).to(xt.dtype), sched).clamp(-1, 1)
        alpha_bar = gather(sched.alpha_bar, t, xt)
        return (xt - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()  # eq. (4) solved for eps

    return clipped


# --- DDIM (Song et al. 2021): eq. (12) on a sub-sequence tau of 1..T ------------------------------
def ddim_timesteps(T, steps):
    """The "trailing" spacing: round(linspace(T, 1, steps)), `steps` distinct integers from T to 1.
    DDIM's own tau_i = floor(c i) never reaches t = T, where training put pure noise."""
    return torch.linspace(T, 1, steps, dtype=torch.float64).round().long().tolist()


def ddim_sigma(sched, t, t_next, eta):  # DDIM eq. (16); eta = 1 on the full grid is beta_tilde
    alpha_bar, alpha_bar_next = sched.alpha_bar[t], sched.alpha_bar[t_next]
    return (
        eta
        * ((1 - alpha_bar_next) / (1 - alpha_bar)).sqrt()
        * (1 - alpha_bar / alpha_bar_next).sqrt()
    )


@torch.inference_mode()
def sample_ddim(
    eps_model, sched, shape, steps=50, eta=0.0, generator=None, x_T=None, trajectory=False
):
    """DDIM eq. (12), one network call per step; t_next is the sampler's next step, a smaller t.
    The last step goes to t_next = 0, where alpha_bar = 1 and sigma = 0: it returns x0_hat."""
    x = initial_noise(shape, generator, x_T)
    xs = [x]
    taus = ddim_timesteps(sched.T, steps)
    for step, step_next in zip(taus, taus[1:] + [0]):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        eps = eps_model(x, t).to(x.dtype)
        x0_hat = predict_x0(x, t, eps, sched)  # "predicted x_0"
        alpha_bar_next = sched.alpha_bar[step_next]
        sigma = ddim_sigma(sched, step, step_next, eta)
        z = noise_like(x, generator) if eta > 0 else 0
        # >= 0 exactly; when alpha_bar[step] is ~0 rounding can make it -1e-18, whose root is nan
        direction = (1 - alpha_bar_next - sigma**2).clamp(min=0).sqrt()
        x = alpha_bar_next.sqrt() * x0_hat + direction * eps + sigma * z
        xs.append(x)
    return (x, xs) if trajectory else x


def respaced(sched, steps, eps_model):
    """The sub-sequence tau of ddim_timesteps as a schedule of its own, with S = steps steps:
    alpha_bar'_i = alpha_bar[tau_i], so beta'_i = 1 - alpha_bar'_i / alpha_bar'_{i-1}; and the
    eps-model of its step i, asked at t = tau_i. Algorithm 2 on it with sigma^2 = beta' is DDIM
    Table 1's sigma_hat row; with sigma^2 = beta_tilde' it is DDIM at eta = 1."""
    tau = torch.tensor([0] + ddim_timesteps(sched.T, steps)[::-1])
    alpha_bar = sched.alpha_bar[tau]
    sub = schedule_of(1 - alpha_bar[1:] / alpha_bar[:-1])
    return sub, lambda xt, i: eps_model(xt, tau.to(i.device)[i])


@torch.inference_mode()
def ddim_encode(eps_model, sched, x0, steps=50, refine=0):
    """DDIM Section 5.4: eq. (12) at eta = 0 run upwards, from x_0 to x_T on sample_ddim's steps,
    so that sample_ddim(eps_model, sched, x0.shape, steps, x_T=x_T) decodes x_T to x_0 again.
    Eq. (12) at eta = 0 is an Euler step of DDIM's ODE, eq. (14): decoding t -> s takes eps at the
    step's start, eps(x_t, t). Encoding s -> t is the Euler step the other way, from eps(x_s, s),
    so it undoes its decoding step only up to O((t - s)^2). refine > 0, beyond the paper: that many
    fixed-point iterations x_t <- step(x_s, eps(x_t, t)), whose fixed point is the decoding step's
    exact inverse. No clip_x0: clipping x0_hat is not invertible."""
    x = x0
    taus = ddim_timesteps(sched.T, steps)[::-1]  # 1, ..., T: sample_ddim's steps, upwards
    for step_prev, step in zip([0] + taus[:-1], taus):
        t_prev = torch.full((x.shape[0],), step_prev, device=x.device, dtype=torch.long)
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        alpha_bar = sched.alpha_bar[step]
        x_t, t_eps = x, t_prev.clamp(min=1)  # the paper: eps at the start; x_0 is read at t = 1
        for _ in range(1 + refine):
            eps = eps_model(x_t, t_eps).to(x.dtype)
            x0_hat = predict_x0(x, t_prev, eps, sched)  # the x0_hat decoding x_t would give
            x_t = alpha_bar.sqrt() * x0_hat + (1 - alpha_bar).sqrt() * eps  # eq. (12), t_next = t
            t_eps = t  # refining: eps at the step's end, where decoding takes it
        x = x_t
    return x


def slerp(z0, z1, lam):
    """Spherical interpolation of two latents (DDIM Section 5.3, Appendix D.5), per sample:
    sin((1 - lam) theta) / sin(theta) z0 + sin(lam theta) / sin(theta) z1, theta their angle."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos_theta = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.arccos(cos_theta).clamp(min=1e-8)[:, None]  # z0 = z1: the limit, lerp
    z = (torch.sin((1 - lam) * theta) * a + torch.sin(lam * theta) * b) / torch.sin(theta)
    return z.to(z0.dtype).reshape(z0.shape)


def ddpm_mix(eps_model, sched, x0, x0_prime, lam, t, eps, generator=None):
    """DDPM Section 4.4: q as a stochastic encoder, both images to step t with the same noise eps,
    mixed linearly, x_t_bar = (1 - lam) x_t + lam x_t', and decoded by the reverse process."""
    t_batch = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
    x_t = q_sample(x0, t_batch, eps, sched)
    x_t_prime = q_sample(x0_prime, t_batch, eps, sched)
    x_t_bar = (1 - lam) * x_t + lam * x_t_prime
    return sample_ddpm(eps_model, sched, x0.shape, generator, x_T=x_t_bar, t_start=t)


# --- The eps-network ------------------------------------------------------------------------------
# Any R^n -> R^n model that also takes t works (the tests use closed-form ones). For images, a small
# version of Ho et al.'s U-Net (Appendix B); for 2-D points, an MLP.
def timestep_embedding(t, dim):
    """Transformer sinusoids of the integer step t (Vaswani et al.), as Ho et al.
    The frequencies are 10000^(-i / half); Ho et al.'s code divides by half - 1 (kept:
    trained weights depend on it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, dim)


def norm(c):
    """GroupNorm with gcd(32, c // 4, c) groups: 32 (Ho et al.) from c = 128 up, and at least 4
    channels a group: one channel a group would subtract ResBlock's per-channel t bias."""
    return nn.GroupNorm(math.gcd(32, max(c // 4, 1), c), c)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)  # t enters as a per-channel bias (Ho: after a SiLU)
        self.norm2 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.t_proj(emb)[:, :, None, None]  # (B, c_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):  # single-head self-attention over all H * W positions, residual
    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2)  # (B, 3, HW, C)
        q, k, v = qkv.unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class UNet(nn.Module):
    """eps_theta(x_t, t, y). Level i = 1..L has width ch * ch_mult[i-1] at resolution H / 2^(i-1),
    so H and W must divide by 2^(L-1). y: class labels for classifier-free guidance (see there);
    label n_classes means "no label", the only one an unconditional net (n_classes = 0) has."""

    def __init__(self, in_ch=1, ch=64, ch_mult=(1, 2, 2), n_res=2, n_classes=0):
        super().__init__()
        self.config = dict(ch=ch, ch_mult=list(ch_mult), n_res=n_res, n_classes=n_classes)
        t_dim = 4 * ch
        widths = [ch * m for m in ch_mult]
        self.time_mlp = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.label_emb = nn.Embedding(n_classes + 1, t_dim)  # added to the time embedding
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = ch
        for i, w in enumerate(widths, 1):  # every level but the last halves H and W
            self.down.append(
                nn.ModuleList([ResBlock(c if j == 0 else w, w, t_dim) for j in range(n_res)])
            )
            last = i == len(widths)
            self.downsample.append(nn.Identity() if last else nn.Conv2d(w, w, 3, 2, padding=1))
            c = w
        self.mid1 = ResBlock(c, c, t_dim)
        self.attn = Attention(c)
        self.mid2 = ResBlock(c, c, t_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        # a level's first block also takes the skip
        for i, w in reversed(list(enumerate(widths, 1))):
            self.up.append(
                nn.ModuleList([ResBlock(c + w if j == 0 else w, w, t_dim) for j in range(n_res)])
            )
            double = nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(w, w, 3, padding=1))
            self.upsample.append(double if i > 1 else nn.Identity())
            c = w
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, in_ch, 3, padding=1)

    def forward(self, x, t, y=None):
        if y is None:
            y = torch.full_like(t, self.config["n_classes"])  # "no label"
        emb = self.time_mlp(timestep_embedding(t, self.config["ch"]))  # (B, t_dim)
        emb = emb + self.label_emb(y)
        h = self.conv_in(x)
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)  # one skip per level (Ho et al.: one per block)
            h = down(h)
        h = self.mid1(h, emb)
        h = self.attn(h)  # at the lowest resolution only (Ho et al.: also at 16 x 16)
        h = self.mid2(h, emb)
        for blocks, up in zip(self.up, self.upsample):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MLP(nn.Module):  # eps_theta for 2-D points (the swiss roll): residual blocks of width 4 * ch
    def __init__(self, dim=2, ch=32, n_res=2):
        super().__init__()
        self.config = dict(ch=ch, n_res=n_res)
        w = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, w), nn.SiLU(), nn.Linear(w, w))
        self.x_in = nn.Linear(dim, w)
        self.x_out = nn.Linear(w, dim)
        self.blocks = nn.ModuleList()
        for _ in range(n_res):
            lin1 = nn.Linear(w, w)
            t_proj = nn.Linear(w, w)  # t as a bias inside the block, as in ResBlock
            lin2 = nn.Linear(w, w)
            self.blocks.append(nn.ModuleList([lin1, t_proj, lin2]))

    def forward(self, x, t, y=None):  # points have no labels: y is ignored
        emb = self.time_mlp(timestep_embedding(t, self.config["ch"]))  # (B, w)
        h = self.x_in(x)
        for lin1, t_proj, lin2 in self.blocks:
            h = h + lin2(F.silu(lin1(F.silu(h)) + t_proj(emb)))
        return self.x_out(F.silu(h))


# (dim,): the MLP; (C, H, W): U-Net
def make_net(shape, ch, ch_mult=(1, 2, 2), n_res=2, n_classes=0):
    if len(shape) == 1:
        return MLP(shape[0], ch, n_res)
    return UNet(shape[0], ch, ch_mult, n_res, n_classes)


# ==================================== Beyond the papers ====================================


# --- DPM-Solver++(2M): Lu et al. 2022, arXiv:2211.01095, Algorithm 2 ------------------------------
def dpm_timesteps(sched, steps):
    """T, then the t nearest to `steps - 1` values even in lambda from max(lambda_T, -5) to lambda_1
    ("logSNR" spacing, Lu et al.'s choice for small images; below -5 the data is noise already).
    Rounding to integers can make two t meet: each t is kept below the one before it, and high
    enough that every later step still finds a distinct integer >= 1."""
    lam_start = max(sched.lam[sched.T].item(), -5)
    targets = torch.linspace(lam_start, sched.lam[1].item(), steps)[1:]
    taus = [sched.T]
    for i, target in enumerate(targets, 1):
        t = int((sched.lam[1:] - target).abs().argmin()) + 1
        steps_left = steps - 1 - i
        taus.append(max(min(t, taus[-1] - 1), steps_left + 1))
    return taus


@torch.inference_mode()
def sample_dpm(eps_model, sched, shape, steps=20, generator=None, x_T=None, trajectory=False):
    """Lu et al.'s Algorithm 2 in their symbols: alpha_t = sqrt(alpha_bar_t), sigma_t =
    sqrt(1 - alpha_bar_t), h_i = lambda_{t_i} - lambda_{t_{i-1}}. Each step is exact for a constant
    data prediction; D_i extrapolates x0_hat linearly in lambda from the last two calls (r_i =
    h_{i-1} / h_i). First order (D = x0_hat) at the first step and at the last, to t = 0, where
    lambda is infinite. Deterministic: no noise is added."""
    x = initial_noise(shape, generator, x_T)
    xs = [x]
    alpha = sched.alpha_bar.sqrt()
    sigma = (1 - sched.alpha_bar).sqrt()
    taus = dpm_timesteps(sched, steps)
    x0_hat_last = h_last = None  # of the previous step, at a larger t
    for step, step_next in zip(taus, taus[1:] + [0]):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0_hat = predict_x0(x, t, eps_model(x, t).to(x.dtype), sched)
        h = sched.lam[step_next] - sched.lam[step]
        D = x0_hat
        if x0_hat_last is not None and step_next > 0:
            r = h_last / h
            D = x0_hat + (x0_hat - x0_hat_last) / (2 * r)
        x = sigma[step_next] / sigma[step] * x - alpha[step_next] * torch.expm1(-h) * D
        x0_hat_last = x0_hat
        h_last = h
        xs.append(x)
    return (x, xs) if trajectory else x


# --- Classifier-free guidance: Ho & Salimans 2022, arXiv:2207.12598 -------------------------------
# Algorithm 1: "no label" (index n_classes) with probability p
def drop_labels(y, p, n_classes, generator):
    dropped = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(dropped, n_classes, y)


def guided(model, y, w, t_lo=0, t_hi=math.inf):
    """eps_model(x_t, t) for labels y and guidance weight w, eq. (6):
    (1 + w) eps(x_t, t, y) - w eps(x_t, t). w = 0 is the conditional model; w > 0 pushes away
    from the unconditional prediction. w applies for t_lo <= t <= t_hi and is 0 at other t:
    guidance in an interval (Kynkaanniemi et al. 2024, arXiv:2404.07724)."""
    no_label = torch.full_like(y, model.config["n_classes"])

    def eps_model(xt, t):
        w_t = ((t_lo <= t) & (t <= t_hi)).to(xt.dtype) * w
        w_t = w_t.view(-1, *[1] * (xt.dim() - 1))
        if not w_t.any():  # the conditional prediction alone: one call of B, not 2B
            return model(xt, t, y)
        both = model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, no_label]))
        eps_y, eps_none = both.to(xt.dtype).chunk(2)  # both predictions from one batched call
        return (1 + w_t) * eps_y - w_t * eps_none

    return eps_model


# Unconditional samples of a conditional net: y ~ p(y), then x | y guided a little, in an interval
# of t (README, "How good it is": more confident digits, for 15 double batches in DDIM's 50 calls)
UNCOND_W = 0.25
UNCOND_T = (0.3, 0.6)  # t_lo / T, t_hi / T


def draw_labels(label_freq, n, generator):
    """n labels y ~ p(y), the training set's label frequencies. Sampling x | y with them draws from
    p(x) = sum_y p(y) p(x | y): unconditional samples from the conditional network. Drawn
    systematically: one u ~ U[0, 1), the n points (i + u) / n through the inverse CDF, shuffled.
    Each label is still distributed as p(y), and each class gets n p(y) labels to within one,
    where n independent draws scatter by sqrt(n p(y)) (1,000 once drew 72 eights, not 97.5)."""
    cdf = torch.tensor(label_freq, dtype=torch.float64).cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    points = (torch.arange(n, dtype=torch.float64) + u) / n * cdf[-1]
    y = torch.searchsorted(cdf, points, right=True)  # the k with cdf[k - 1] <= point < cdf[k]
    return y[torch.randperm(n, generator=generator)]


# --- The bound at a few network calls an image: importance sampling of t --------------------------
# The full sum of eq. (5) costs T network calls an image. Its terms fall about as t^-1.3 (measured
# on the shipped model, README), so k steps drawn from q(t) ~ t^-1.25, each term weighted by
# 1 / (k q(t)), estimate sum_{t>=2} L_{t-1} without bias at k network calls, not T - 1: at k = 4
# its own scatter is 0.05 bits/dim an image, where uniform draws of t scatter by 1.9.
T_POWER = 1.25


def rd_steps(T):  # where DDPM's Table 4 and Fig. 5 look: t = T, 0.9 T, ..., 0.1 T, and 1
    return [T * (10 - i) // 10 for i in range(10)] + [1]


def t_proposal(T):  # q(t) for t = 2..T; q[0] = q[1] = 0: L_0 is always computed
    q = torch.zeros(T + 1, dtype=torch.float64)
    q[2:] = torch.arange(2, T + 1, dtype=torch.float64) ** -T_POWER
    return q / q.sum()


def draw_steps(T, n, k, generator):
    """(n, k) steps t and weights w for n images: systematic draws from t_proposal (the k points
    (i + u) / k through its inverse CDF, one u an image), each t distributed as q, so that
    sum_i w_i L_{t_i - 1} with w = 1 / (k q(t)) is unbiased. k = None: every t = 2..T, weight 1."""
    if k is None:
        return torch.arange(2, T + 1).repeat(n, 1), torch.ones(n, T - 1, dtype=torch.float64)
    q = t_proposal(T)
    device = getattr(generator, "device", None)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64, device=device).cpu()
    points = (torch.arange(k, dtype=torch.float64) + u) / k
    t = torch.searchsorted(q.cumsum(0), points, right=True).clamp(2, T)
    return t, 1 / (k * q[t])


def of_rows(eps_model, i):  # eps_model(xt, t, i) as an eps-model of (xt, t), for the images i
    return lambda xt, t: eps_model(xt, t, i)


@torch.inference_mode()
def bound_pass(eps_model, x0, sched, k=8, generator=None, chunk=256):
    """One estimate of eq. (5) for each of the n images x0, in nats per dimension: L_T (n, ...);
    sum_{t>=2} L_{t-1} and L_0, each (2, n, ...) for the two sigma_t^2 of SIGMA2; and the KL
    received down to each t of rd_steps(T), sum_{s >= t} L_{s-1}, per image (2, n, 11).
    k draws of t an image (k = None: the full sum), at most `chunk` images a network call.
    eps_model(xt, t, i): i says which image of x0 each row of xt is."""
    n = len(x0)
    t, w = (a.to(x0.device) for a in draw_steps(sched.T, n, k, generator))
    kl = torch.zeros(2, *x0.shape, dtype=torch.float64, device=x0.device)
    steps = torch.tensor(rd_steps(sched.T), device=x0.device)
    received = torch.zeros(2, n, len(steps), dtype=torch.float64, device=x0.device)
    every = torch.arange(n, device=x0.device)
    cols = max(1, chunk // n)  # draws of each image per call
    for c in range(0, t.shape[1], cols):
        tc = t[:, c : c + cols]  # (n, m)
        m = tc.shape[1]
        i = every.repeat_interleave(m)
        terms, _ = bound_term(of_rows(eps_model, i), x0[i], tc.flatten(), sched, generator)
        terms = terms.view(2, n, m, *x0.shape[1:]) * w[:, c : c + cols].view(
            1, n, m, *[1] * (x0.dim() - 1)
        )
        kl += terms.sum(2)
        after = (tc[..., None] >= steps).double()  # (n, m, 11): t_i counts for the steps below
        received += torch.einsum("snm,nmr->snr", terms.flatten(3).sum(3), after)
    first = torch.ones(n, dtype=torch.long, device=x0.device)
    l0, _ = bound_term(of_rows(eps_model, every), x0, first, sched, generator)
    return prior_kl(x0, sched), kl, l0, received


@torch.inference_mode()
def progressive_x0(eps_model, x0, sched, generator=None):
    """x0_hat (eq. 15) from x_t ~ q(x_t | x_0) at each t of rd_steps(T), shaped (11, *x0.shape):
    what a receiver of x_t reconstructs (DDPM Section 4.3, Fig. 6)."""
    x0_hats = []
    every = torch.arange(len(x0), device=x0.device)
    for step in rd_steps(sched.T):
        t = torch.full((len(x0),), step, device=x0.device)
        xt = q_sample(x0, t, noise_like(x0, generator), sched)
        eps_theta = of_rows(eps_model, every)(xt, t).to(x0.dtype)
        x0_hats.append(predict_x0(xt, t, eps_theta, sched))
    return torch.stack(x0_hats)


# --- EMA: the weights' exponential moving average, which is what is sampled from ------------------
class EMA:
    """decay min(decay, (1 + n) / (10 + n)) after n updates: a short run's average is not mostly the
    random initial weights."""

    def __init__(self, model, decay):
        self.decay = decay
        self.n = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        self.n += 1
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)  # e = d * e + (1 - d) * p


# ==================================== Machinery ====================================


class UserError(Exception):
    """A mistake the user can fix: main() prints it as one line and exits with 2."""


# --- Data: images as one uint8 tensor, scaled to [-1, 1] per batch (DDPM Section 3.3) -------------
def to_model_range(x):  # uint8 0..255 -> [-1, 1]; points are used as they are
    if x.dtype != torch.uint8:
        return x
    return x.float() / 127.5 - 1


def to_pixels(x):  # [-1, 1] -> uint8 0..255
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_swissroll(n, generator):  # Sohl-Dickstein et al. 2015, Fig. 1: (n, 2) points, |x| < 1.5
    u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    return (torch.stack([u * u.cos(), u * u.sin()], dim=1) / 10).float()


def sliced_wasserstein(x, y, generator, n_dirs=256):
    """Two equal-size point sets: the root mean over random directions of the 1-D W2^2 of their
    projections. In 1-D, W2 pairs sorted samples in order; two samples of a law are n^-1/2 apart."""
    d = F.normalize(torch.randn(x.shape[1], n_dirs, generator=generator, dtype=x.dtype), dim=0)
    gap = (x @ d).sort(0).values - (y @ d).sort(0).values
    return gap.pow(2).mean().sqrt().item()


# (3, size, size) uint8: the shorter side resized to size, centre-cropped
def read_image(path, size):
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise UserError(f"cannot read the image {path} ({type(e).__name__})") from None
    tf = torchvision.transforms.functional
    return tf.pil_to_tensor(tf.center_crop(tf.resize(image, size), size))


DATASETS = {  # downloaded to --data-dir when absent
    "mnist": torchvision.datasets.MNIST,
    "fashion": torchvision.datasets.FashionMNIST,
    "cifar10": torchvision.datasets.CIFAR10,
}


def load_data(dataset, data_dir, seed=0, image_size=32, train=True):
    """((N, C, H, W) uint8 images, (N,) labels), or ((N, 2) points, None) for the swiss roll.
    28 x 28 digits are padded to 32 x 32: resizing would blur the strokes. train=False: the test
    split (mnist, fashion, cifar10)."""
    if dataset == "swissroll":
        return make_swissroll(100_000, torch.Generator().manual_seed(seed)), None
    # a folder, read as ImageFolder: class sub-folders, sorted, are labels
    if dataset not in DATASETS:
        try:
            folder = torchvision.datasets.ImageFolder(dataset)
        except OSError as e:  # no such folder, no sub-folder, or no image file in them
            raise UserError(
                f"--dataset {dataset}: neither a known data set nor a folder of images ({e})"
            ) from None
        images = torch.stack([read_image(f, image_size) for f, _ in folder.imgs])
        return images, torch.tensor(folder.targets)
    try:
        ds = DATASETS[dataset](data_dir, train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError or URLError when it cannot download
        raise UserError(
            f"{dataset} is not in {data_dir} and downloading it failed ({type(e).__name__}); "
            "pass --data-dir with the folder that holds it"
        ) from None
    data = torch.as_tensor(ds.data)  # MNIST, Fashion: (N, 28, 28); CIFAR-10: (N, 32, 32, 3)
    if data.dim() == 4:
        data = data.permute(0, 3, 1, 2)  # channels first
    else:
        data = F.pad(data, (2, 2, 2, 2)).unsqueeze(1)  # (N, 1, 32, 32)
    return data.contiguous(), torch.as_tensor(ds.targets)


# --- Files: checkpoints and images, every one written atomically ----------------------------------
# write(f) to path.tmp, then rename: a crash midway keeps the old file
def atomic_write(path, write):
    with open(f"{path}.tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def check_writable(path):  # before hours of work, not after
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        raise UserError(f"cannot write {path}: its folder is missing or not writable")


def save_checkpoint(path, config, model, ema, opt, step):
    state = {
        "config": config,
        "model": model.state_dict(),
        "ema": ema.model.state_dict(),
        "opt": opt.state_dict(),
        "step": step,
        "ema_n": ema.n,
    }
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device):
    """(the checkpoint's dict, its EMA network). weights_only: unpickling a file could run code."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path} (train one with: python ddpm.py train)")
    try:  # fp16 weights (samples/) are cast to the model's fp32 by load_state_dict
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = type(e).__name__
        with contextlib.suppress(Exception):  # a torch.save file, with Python objects in it?
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            why = f"it pickles {', '.join(unsafe)}: unpickling could run code, refused"
        raise UserError(f"{path} is not a ddpm.py checkpoint ({why})") from None
    try:
        model = make_net(ckpt["config"]["data_shape"], **ckpt["config"]["model"])
        model.load_state_dict(ckpt["ema"])
    except Exception as e:
        raise UserError(
            f"{path} is not a ddpm.py checkpoint with weights that fit the architecture it names "
            f"({type(e).__name__})"
        ) from None
    return ckpt, model.to(device).eval()


# images in [-1, 1]: a grid sqrt(N) wide; points: a 256 x 256 histogram of [-1.5, 1.5]^2
def grid_image(x, nrow=None):
    if x.dim() == 2:
        ij = ((x.float().clamp(-1.5, 1.5) + 1.5) * 255 / 3).round().long().cpu()  # (N, 2) pixels
        hist = torch.zeros(256, 256).index_put_(
            (255 - ij[:, 1], ij[:, 0]), torch.ones(len(x)), True
        )
        return Image.fromarray(((hist == 0) * 255).to(torch.uint8).numpy())  # y grows upwards
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    grid = torchvision.utils.make_grid(to_pixels(x).cpu(), nrow=nrow)  # (3, H, W)
    if x.shape[1] == 1:
        return Image.fromarray(grid[0].numpy())
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_samples(path, x, xs=None, nrow=None):  # .png grid; .npz uint8 or float; .gif: xs
    ext = os.path.splitext(path)[1].lower()
    if ext == ".png":
        atomic_write(path, lambda f: grid_image(x, nrow).save(f, format="PNG"))
    elif ext == ".npz" and x.dim() == 2:
        atomic_write(path, lambda f: np.savez(f, points=x.cpu().numpy()))
    elif ext == ".npz":
        atomic_write(path, lambda f: np.savez(f, images=to_pixels(x).cpu().numpy()))
    elif ext == ".gif":  # at most ~60 frames of the reverse process, then the samples held for 20
        frames = [grid_image(x) for x in xs[:: math.ceil(len(xs) / 60)]] + [grid_image(xs[-1])] * 20
        atomic_write(
            path,
            lambda f: frames[0].save(
                f,
                format="GIF",
                save_all=True,
                append_images=frames[1:],
                duration=60,
                loop=0,
                optimize=False,  # Pillow's optimize corrupts these frames
            ),
        )


# --- Device and precision -------------------------------------------------------------------------
def has_native_bf16(device):  # CUDA with bf16, or a CPU with AVX512-BF16 (or AMX)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not os.path.exists("/proc/cpuinfo"):
        return False
    with open("/proc/cpuinfo") as f:
        return "avx512_bf16" in f.read()


def check_device(name):  # --device as a torch.device this machine has, or one line saying why not
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; auto, cpu, cuda, cuda:N or mps") from None
    count = {
        "cpu": 1,
        "cuda": torch.cuda.device_count(),
        "mps": int(torch.backends.mps.is_available()),
    }
    if device.type not in count:
        raise UserError(f"--device {name}: ddpm.py runs on auto, cpu, cuda, cuda:N or mps")
    if (device.index or 0) >= count[device.type]:
        raise UserError(
            f"--device {name}: this machine has {count[device.type]} {device.type} device(s)"
        )
    return device


# auto: cuda, then mps, then cpu; bf16 where native, CUDA else fp16
def pick_device(name, precision):
    if name == "auto" and torch.cuda.is_available():
        name = "cuda"
    elif name == "auto" and torch.backends.mps.is_available():
        name = "mps"
    elif name == "auto":
        name = "cpu"
    device = check_device(name)
    if precision != "auto":
        return device, precision
    if has_native_bf16(device):
        return device, "bf16"
    return device, "fp16" if device.type == "cuda" else "fp32"


# bf16/fp16 for matmuls and convolutions; weights and all else fp32
def autocast(device, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# --- Several processes: torchrun and DistributedDataParallel --------------------------------------
def start_processes(device):
    """(rank, world size, device). torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain run is
    rank 0 of 1. Gloo on the CPU, NCCL on CUDA with one GPU a process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


# batch i of the epoch's order: rank r takes the r-th B of B * world
def shard(perm, i, B, rank, world):
    start = (i * world + rank) * B
    return perm[start : start + B]


# a stop asked of one process stops them all after the same step
def on_any_rank(flag, world, device):
    if world == 1:
        return flag
    flags = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


# --- The training loop ----------------------------------------------------------------------------
RUN_KEYS = (
    "dataset image_size cond p_uncond ch ch_mult n_res schedule T batch_size lr ema_decay seed"
)


def hms(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


class Progress:
    """The progress line of every long command, "step k/N | <fields> | <rate> | elapsed | eta":
    2 s after the start, then every 10 s, and at the last step if a line came before. The rate and
    the eta are the pace since the previous line; a command done in 2 s prints none."""

    def __init__(self, total, done=0, unit=None, per_step=1, log=print):
        self.total = total
        self.k = self.k_last = done
        self.unit = unit  # e.g. "img": a rate of per_step units a step; None: no rate
        self.per_step = per_step
        self.log = log
        self.t0 = self.t_last = time.time()
        self.printed = False

    def tick(self, *fields, steps=1):  # `steps` more steps done
        self.k += steps
        now = time.time()
        due = now - self.t_last >= (10 if self.printed else 2)
        if not (due or (self.printed and self.k == self.total)):
            return
        per_second = (self.k - self.k_last) / max(now - self.t_last, 1e-9)  # steps
        rate = [f"{per_second * self.per_step:.0f} {self.unit}/s"] if self.unit else []
        eta = (self.total - self.k) / per_second
        line = [f"step {self.k}/{self.total}", *fields, *rate, f"elapsed {hms(now - self.t0)}"]
        self.log(" | ".join([*line, f"eta {hms(eta)}"]), flush=True)
        self.t_last = now
        self.k_last = self.k
        self.printed = True


@dataclass
class Run:
    """One training run: what build_run makes and train_loop advances."""

    args: argparse.Namespace  # the flags; on --resume, the run's own from its checkpoint
    rank: int  # this process, of `world` (torchrun); rank 0 logs and saves
    world: int
    device: torch.device
    data: torch.Tensor  # (N, C, H, W) uint8 images or (N, 2) points, on the device
    labels: torch.Tensor  # (N,) class labels; all 0 for an unconditional run
    K: int  # classes; label K is "no label", the only label if K = 0
    sched: Schedule
    model: nn.Module
    net: nn.Module  # what the step calls; with several processes, the wrapper averaging gradients
    ema: EMA
    opt: torch.optim.Optimizer
    amp: contextlib.AbstractContextManager  # autocast in the run's precision
    scaler: torch.amp.GradScaler  # fp16 loss scaling; a no-op otherwise
    config: dict  # what load_checkpoint and sample need to rebuild the network and draw from it
    step: int  # optimizer steps taken


def train(args):
    """Algorithm 1 with its machinery: build the run, take its steps, save; the exit code."""
    run = build_run(args)
    stop = []  # Ctrl-C or SIGTERM (a preempted job): finish the step, save, exit
    handlers = {
        s: signal.signal(s, lambda n, _: stop.append(n)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        train_loop(run, stop)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return finish_run(run, stop)


def build_run(args):
    """The run from the flags, or continued from the checkpoint that --resume names."""
    device, args.precision = pick_device(args.device, args.precision)
    rank, world, device = start_processes(device)
    check_writable(args.out)
    ckpt = resume_checkpoint(args, device) if args.resume else None
    data, labels, K = training_data(args)
    images = data.dim() > 2
    # not the paper's 2e-4 and 128 (35.7 M parameters, TPUs): at this size on a CPU more and larger
    # steps win (README: the recipe); points (a small MLP) take larger ones still
    if args.batch_size is None:
        args.batch_size = 32 if images else 128
    if args.lr is None:
        args.lr = 1e-3 if images else 2e-3

    sched = make_schedule(args.schedule, args.T)
    torch.manual_seed(args.seed)  # the initial weights, the same on every rank
    model = make_net(data.shape[1:], args.ch, args.ch_mult, args.n_res, K).to(device).train()
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        ema.n = ckpt["ema_n"]
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    amp = autocast(device, args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 only
    label_freq = (torch.bincount(labels, minlength=K) / len(labels)).tolist() if K else []
    config = {
        "model": model.config,
        "data_shape": list(data.shape[1:]),
        "label_freq": label_freq,  # p(y), for unconditional samples from a conditional net
        "train": dict(vars(args)),
    }
    data = data.to(device)
    labels = labels.to(device)
    return Run(
        args,
        rank,
        world,
        device,
        data,
        labels,
        K,
        sched,
        model,
        net,
        ema,
        opt,
        amp,
        scaler,
        config,
        step,
    )


def resume_checkpoint(args, device):
    """The checkpoint to continue; the run's definition (model, data, lr...) is taken from it into
    args, while its length, files and cadence stay this command's."""
    ckpt, _ = load_checkpoint(args.resume, device)
    if "opt" not in ckpt:
        raise UserError(
            f"--resume {args.resume}: has EMA weights only (like samples/), no training state"
        )
    vars(args).update({k: v for k, v in ckpt["config"]["train"].items() if k in RUN_KEYS.split()})
    return ckpt


def training_data(args):
    """(data, labels, K): conditional on K classes whenever the data has labels, unless --no-cond
    (then K = 0 and every label is 0, which the network reads as "no label")."""
    data, labels = load_data(args.dataset, args.data_dir, args.seed, args.image_size)
    if args.cond is None:
        args.cond = labels is not None
    if args.cond and labels is None:
        raise UserError(f"--cond: {args.dataset} has no labels")
    if data.dim() > 2:
        check_levels(args.ch_mult, data.shape[2:])
    K = int(labels.max()) + 1 if args.cond else 0
    if not args.cond:
        labels = torch.zeros(len(data), dtype=torch.long)
    return data, labels, K


def check_levels(ch_mult, hw):  # the U-Net halves H and W once per level but the last
    halvings = 2 ** (len(ch_mult) - 1)
    if hw[0] % halvings or hw[1] % halvings:
        raise UserError(
            f"--ch-mult {','.join(map(str, ch_mult))}: {len(ch_mult)} levels halve the images "
            f"{len(ch_mult) - 1} times, and {hw[0]} x {hw[1]} does not divide by {halvings}"
        )


def train_loop(run, stop):
    """Algorithm 1's "repeat ... until converged": a step a batch, to the last step or a signal."""
    args = run.args
    B = min(args.batch_size, len(run.data) // run.world)  # per process; a step reads B * world
    per_epoch = len(run.data) // (B * run.world)  # an epoch's last, partial batch is dropped
    total = args.steps or args.epochs * per_epoch
    save_every = args.save_every or per_epoch
    unit = "img" if run.data.dim() > 2 else "points"
    log = print if run.rank == 0 else lambda *a, **k: None
    n_params = sum(p.numel() for p in run.model.parameters())
    log(
        f"{type(run.model).__name__} {n_params:,} parameters | {len(run.data)} {unit} | "
        f"{per_epoch} steps/epoch | steps {run.step}..{total} | "
        f"{run.device} {args.precision} | {run.world} process(es) x batch {B}"
    )
    progress = Progress(total, run.step, unit, B * run.world, log)
    smooth = float("nan")
    perm_epoch = None
    while run.step < total and not on_any_rank(bool(stop), run.world, run.device):
        epoch, i = divmod(run.step, per_epoch)
        # the order follows from (seed, epoch): a resumed run sees the same data
        if epoch != perm_epoch:
            order = torch.Generator().manual_seed(args.seed + epoch)
            perm = torch.randperm(len(run.data), generator=order).to(run.device)
            perm_epoch = epoch
        # this step's draws (labels dropped, flips, t, eps), the same after a resume
        gen = torch.Generator(run.device).manual_seed(hash((args.seed, run.step, run.rank)))
        x0, y = training_batch(run, shard(perm, i, B, run.rank, run.world), gen)
        loss = train_step(run.net, run.opt, x0, run.sched, gen, y, run.amp, run.scaler)
        if loss is not None:
            run.ema.update(run.model)
            smooth = loss if math.isnan(smooth) else 0.98 * smooth + 0.02 * loss
        run.step += 1
        progress.tick(f"epoch {epoch + 1}", f"loss {smooth:.4f}")
        if run.rank == 0 and run.step % save_every == 0:
            save_checkpoint(args.out, run.config, run.model, run.ema, run.opt, run.step)
        if run.rank == 0 and args.sample_every and run.step % args.sample_every == 0:
            save_preview(run)


def training_batch(run, idx, gen):  # x_0 in [-1, 1] and labels, some dropped; photos flipped
    x0 = to_model_range(run.data[idx])
    y = drop_labels(run.labels[idx], run.args.p_uncond, run.K, gen)
    # photographs get random horizontal flips (Ho et al., CIFAR-10); digits not
    if run.data.shape[1] == 3:
        flips = torch.rand(len(idx), 1, 1, 1, generator=gen, device=run.device) < 0.5
        x0 = torch.where(flips, x0.flip(3), x0)
    return x0, y


def save_preview(run):
    """16 images (2,000 points) from the EMA weights, from the same noise each time and drawn as
    `sample` draws without --class: the run's progress at a glance, next to its checkpoint."""
    images = run.data.dim() > 2
    n = 16 if images else 2000
    eps_model = run.ema.model
    if run.K:  # labels drawn from p(y), not "no label"
        y = draw_labels(run.config["label_freq"], n, torch.Generator().manual_seed(0))
        t_lo, t_hi = (f * run.sched.T for f in UNCOND_T)
        eps_model = guided(run.ema.model, y.to(run.device), UNCOND_W, t_lo, t_hi)
    if images:
        eps_model = clip_x0(eps_model, run.sched)
    shape = (n, *run.data.shape[1:])
    preview = torch.Generator(run.device).manual_seed(0)
    with run.amp:
        x = sample_ddim(eps_model, run.sched, shape, min(50, run.sched.T), generator=preview)
    save_samples(f"{os.path.splitext(run.args.out)[0]}_step{run.step:07d}.png", x)


def finish_run(run, stop):  # the last save; the exit code says whether a signal stopped the run
    if run.rank == 0:
        save_checkpoint(run.args.out, run.config, run.model, run.ema, run.opt, run.step)
        print(f"saved {run.args.out} at step {run.step}")
    if run.world > 1:
        dist.barrier()  # rank 0 has saved
        dist.destroy_process_group()
    if not stop:
        return 0
    where = f"rank {run.rank}: " if run.world > 1 else ""
    print(
        f"{where}stopped by signal {stop[0]} after step {run.step}; "
        f"continue with --resume {run.args.out}",
        file=sys.stderr,
    )
    return 128 + stop[0]


# --- Command line ---------------------------------------------------------------------------------
# the model `sample` uses without --ckpt; the README says how it was trained
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "mnist.pt")


def class_labels(cls, n, K):  # --class K: n labels K; --class all: K rows of K, a row a class
    if not K:
        raise UserError(f"--class {cls}: unconditional net")
    if cls == "all":
        return torch.arange(K * K) // K
    if cls is None or not cls.isdigit() or int(cls) >= K:
        raise UserError(f"--class {cls}: 0..{K - 1} or all")
    return torch.full((n,), int(cls))


def sample(args):
    """Load the checkpoint, choose the eps-model the flags ask for, run the sampler, save."""
    device, precision = pick_device(args.device, args.precision)
    if not 0 <= args.eta <= 1 or (args.eta and args.sampler == "dpm"):
        raise UserError(
            f"--eta {args.eta}: DDIM's eta (eq. 16) lies in [0, 1]; DPM-Solver++(2M) takes none"
        )
    if os.path.splitext(args.out)[1].lower() not in (".png", ".npz", ".gif"):
        raise UserError(
            f"--out {args.out}: use .png (a grid), .npz (uint8 arrays) or .gif (reverse process)"
        )
    check_writable(args.out)
    # no --ckpt: the model shipped in samples/
    ckpt, model = load_checkpoint(args.ckpt or SHIPPED, device)
    run = ckpt["config"]["train"]
    sched = make_schedule(run["schedule"], run["T"])
    steps = (
        args.steps
        or {"ddpm": sched.T, "ddim": min(50, sched.T), "dpm": min(20, sched.T)}[args.sampler]
    )
    if steps > sched.T:
        raise UserError(f"--steps {steps}: the samplers take 1..T = 1..{sched.T} steps")
    if args.sigma2 != "beta_tilde" and args.sampler != "ddpm":
        raise UserError(f"--sigma2 {args.sigma2}: Algorithm 2's choice; DDIM's is --eta")
    eps_model, args.n = sampling_eps_model(args, ckpt, model, sched)
    shape = (args.n, *ckpt["config"]["data_shape"])
    if args.clip and len(shape) > 2:  # images lie in [-1, 1]; points do not
        eps_model = clip_x0(eps_model, sched)
    if args.sampler == "ddpm" and steps < sched.T:  # Algorithm 2 on DDIM's sub-sequence
        sched, eps_model = respaced(sched, steps, eps_model)
    eps_model = with_progress(eps_model, steps)  # each sampler makes `steps` calls
    gen = torch.Generator(device).manual_seed(args.seed)
    gif = args.out.lower().endswith(".gif")
    t0 = time.time()
    with autocast(device, precision):
        if args.sampler == "ddpm":
            out = sample_ddpm(eps_model, sched, shape, gen, args.sigma2, trajectory=gif)
        elif args.sampler == "ddim":
            out = sample_ddim(eps_model, sched, shape, steps, args.eta, gen, trajectory=gif)
        else:
            out = sample_dpm(eps_model, sched, shape, steps, gen, trajectory=gif)
    x, xs = out if gif else (out, None)
    save_samples(args.out, x, xs)
    if run["dataset"] == "swissroll":  # how near the data, and what "near" means at this n
        gen_cpu = torch.Generator().manual_seed(args.seed)
        fresh, fresh2 = make_swissroll(2 * args.n, gen_cpu).split(args.n)
        print(
            f"sliced W2 to fresh data {sliced_wasserstein(x.cpu(), fresh, gen_cpu):.4f} "
            f"(two fresh sets: {sliced_wasserstein(fresh2, fresh, gen_cpu):.4f})"
        )
    print(
        f"wrote {args.out}: {args.n} samples, {args.sampler} with {steps} steps, "
        f"{time.time() - t0:.1f}s, "
        f"{precision} (checkpoint {args.ckpt or 'shipped in samples/'} at step {ckpt['step']})"
    )
    return 0


def nll(args):
    """The bound of eq. (5) in bits/dim on the test split of the checkpoint's data set: with each
    image's own label (plus -log p(y)) on --n images; the "no label" branch, and Section 4.3's
    rate and distortion, on the first --n-rd of them."""
    device, precision = pick_device(args.device, args.precision)
    ckpt, model = load_checkpoint(args.ckpt or SHIPPED, device)
    run = ckpt["config"]["train"]
    check_test_split(run, "nll: the bound")
    if args.out and not args.out.lower().endswith(".png"):
        raise UserError(
            f"--out {args.out}: the picture of x0_hat along the reverse process is a .png"
        )
    if args.out:
        check_writable(args.out)
    data, labels = load_data(run["dataset"], args.data_dir, train=False)
    n = args.n or len(data)
    if n > len(data):
        raise UserError(f"--n {n}: the {run['dataset']} test split has {len(data)} images")
    n_rd = min(args.n_rd, n)
    sched = make_schedule(run["schedule"], run["T"])
    K = model.config["n_classes"]
    branches = {"own label": labels, "no label": torch.full_like(labels, K)} if K else {}
    branches = branches or {"unconditional": torch.zeros_like(labels)}
    totals = {name: [] for name in branches}  # per batch: (2 regions, 2 sigma^2, 3 terms, B) nats
    steps = rd_steps(sched.T)
    rate = torch.zeros(2, len(steps), dtype=torch.float64)  # nats, summed over the first n_rd
    squared_error = torch.zeros(len(steps), dtype=torch.float64)  # on 0..255, summed likewise
    region = padded_region(run["dataset"], data.shape[1:])
    # the progress line counts images through the network: k draws of t (T - 1 for --full) and L_0
    per_image = (args.t_draws or sched.T - 1) + 1
    progress = Progress(per_image * (n + (n_rd if K else 0)) + len(steps) * n_rd)
    model = counted(model, progress)
    t0 = time.time()
    for b in range(0, n, args.batch_size):
        x0 = to_model_range(data[b : min(b + args.batch_size, n)].to(device))
        m = max(0, min(n_rd - b, len(x0)))  # how many of them are among the first n_rd
        for name, y in branches.items():
            x = x0[:m] if name == "no label" else x0
            if not len(x):
                continue
            eps_model = labelled(model, y[b : b + len(x)].to(device))
            # the same draws of t and eps in every branch: their difference is the labels'
            gen = torch.Generator(device).manual_seed(hash((args.seed, b)))
            with autocast(device, precision):
                LT, kl, l0, received = bound_pass(eps_model, x, sched, args.t_draws, gen)
            terms = torch.stack([LT[None].expand_as(kl), kl, l0], 1)  # (2 sigma^2, 3, B, C, H, W)
            totals[name].append(torch.stack([terms.flatten(3).sum(3), terms[..., region].sum(3)]))
            if name != list(branches)[0] or not m:
                continue
            rate += (received[:, :m] + LT[:m].flatten(1).sum(1)[None, :, None]).sum(1).cpu()
            with autocast(device, precision):
                x0_hats = progressive_x0(eps_model, x0[:m], sched, gen)
            error = to_pixels(x0_hats).double() - to_pixels(x0[:m]).double()
            squared_error += error.pow(2).flatten(1).sum(1).cpu()
            if b == 0 and args.out:
                grid = torch.cat([x0_hats[:, :8], x0[None, :8]]).transpose(0, 1).flatten(0, 1)
                save_samples(args.out, grid, nrow=len(steps) + 1)
    nats = {name: torch.cat(v, -1).cpu() for name, v in totals.items()}
    log_p_y = torch.zeros(n, dtype=torch.float64)  # -log p(x) <= -log p(x | y) - log p(y)
    if K:
        label_freq = ckpt["config"].get("label_freq", [1 / K] * K)  # older checkpoints: uniform
        log_p_y = torch.tensor(label_freq, dtype=torch.float64)[labels[:n]].log()
    where = f"{n} {run['dataset']} test images, checkpoint {args.ckpt or 'shipped in samples/'}"
    print(f"nll: {where} at step {ckpt['step']}, {args.t_draws or 'every'} t an image, {precision}")
    report_bound(nats, -log_p_y, data[0].numel(), int(region.sum()), n_rd)
    mse = squared_error / (n_rd * data[0].numel())
    report_rate_distortion(steps, rate / n_rd, mse, data[0].numel())
    print(f"{time.time() - t0:.0f}s")
    return 0


def check_test_split(run, what):
    if run["dataset"] not in DATASETS:
        raise UserError(
            f"{what} needs the test split of an 8-bit image data set (mnist, fashion, cifar10); "
            f"this checkpoint was trained on {run['dataset']}"
        )


def check_steps(steps, T):
    if max(steps) > T:
        raise UserError(f"--steps {max(steps)}: DDIM takes 1..T = 1..{T} steps")


def reconstruct(args):
    """DDIM Section 5.4, Table 2: the first --n test images encoded to x_T (ddim_encode) and
    decoded (sample_ddim, eta = 0) at each of --steps, for each --refine; a conditional net is told
    each image's own label, the same y both ways. Prints the per-dimension MSE on [0, 1]."""
    device, precision = pick_device(args.device, args.precision)
    ckpt, model = load_checkpoint(args.ckpt or SHIPPED, device)
    run = ckpt["config"]["train"]
    check_test_split(run, "reconstruct")
    sched = make_schedule(run["schedule"], run["T"])
    check_steps(args.steps, sched.T)
    if args.out and not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out}: the picture of the reconstructions is a .png")
    if args.out:
        check_writable(args.out)
    data, labels = load_data(run["dataset"], args.data_dir, train=False)
    if args.n > len(data):
        raise UserError(f"--n {args.n}: the {run['dataset']} test split has {len(data)} images")
    runs = [(steps, refine) for steps in args.steps for refine in args.refine]
    calls = [steps * (2 + refine) for steps, refine in runs]  # encode 1 + refine a step, decode 1
    progress = Progress(args.n * sum(calls))
    model = counted(model, progress)
    mse = {r: [] for r in runs}  # per image
    x_T_std = {r: [] for r in runs}
    shown = [to_model_range(data[:8].to(device))]  # the first 8 images, then their reconstructions
    t0 = time.time()
    for b in range(0, args.n, args.batch_size):
        x0 = to_model_range(data[b : min(b + args.batch_size, args.n)].to(device))
        y = labels[b : b + len(x0)].to(device) if model.config["n_classes"] else 0
        eps_model = told(model, y)  # the same y to encode and to decode
        for steps, refine in runs:
            with autocast(device, precision):
                x_T = ddim_encode(eps_model, sched, x0, steps, refine)
                x0_back = sample_ddim(eps_model, sched, x0.shape, steps, x_T=x_T)
            error = (x0_back.double() - x0.double()) / 2  # on [0, 1]
            mse[(steps, refine)].append(error.pow(2).flatten(1).mean(1).cpu())
            x_T_std[(steps, refine)].append(x_T.double().flatten(1).std(1).cpu())
            if b == 0:
                shown.append(x0_back[:8])
    where = (
        f"{args.n} {run['dataset']} test images, checkpoint {args.ckpt or 'shipped in samples/'}"
    )
    label = ", own label both ways" if model.config["n_classes"] else ""
    print(f"reconstruct: {where} at step {ckpt['step']}{label}, {precision}")
    print(
        "  steps | refine | MSE per dim on [0, 1] +- 1 SE | median | worst image | std of x_T"
        " | network calls an image"
    )
    for r, c in zip(runs, calls):
        e = torch.cat(mse[r])
        se = e.std() / math.sqrt(len(e)) if len(e) > 1 else math.nan
        spread = f"{e.median():.1e} | {e.max():.1e}"  # a few images can carry the mean
        std = torch.cat(x_T_std[r]).mean()
        print(f"  {r[0]:5d} | {r[1]:6d} | {e.mean():.2e} +- {se:.1e} | {spread} | {std:.3f} | {c}")
    if args.out:
        save_samples(args.out, torch.cat(shown).float(), nrow=len(shown[0]))
        print(f"wrote {args.out}: the first {len(shown[0])} images, then a row a line above")
    print(f"{time.time() - t0:.0f}s")
    return 0


def interpolate(args):
    """One grid, columns lam = 0..1: the --pair of images encoded by ddim_encode and slerped
    (DDIM Section 5.3); --rows pairs of random x_T slerped; the pair mixed at each of --t-mix and
    decoded by Algorithm 2 (DDPM Section 4.4). Pair rows have the images at both ends and use the
    "no label" branch of a conditional net (two digits have no one label); a random row draws one
    label and is guided as `sample` is."""
    device, precision = pick_device(args.device, args.precision)
    ckpt, model = load_checkpoint(args.ckpt or SHIPPED, device)
    run = ckpt["config"]["train"]
    shape = tuple(ckpt["config"]["data_shape"])
    if len(shape) != 3:
        raise UserError("interpolate: the checkpoint is not an image model")
    sched = make_schedule(run["schedule"], run["T"])
    steps = args.steps or min(50, sched.T)
    check_steps([steps], sched.T)
    if len(args.pair) != 2:
        raise UserError(f"--pair {','.join(args.pair)}: two test indices or .png files, I,J")
    t_mix = args.t_mix or [sched.T // 4, sched.T // 2, 3 * sched.T // 4]
    if max(t_mix) > sched.T:
        raise UserError(f"--t-mix {max(t_mix)}: DDPM Section 4.4 mixes at t in 1..{sched.T}")
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out}: the interpolation grid is a .png")
    check_writable(args.out)
    test = functools.cache(lambda: load_data(run["dataset"], args.data_dir, train=False)[0])
    x0 = torch.stack([pair_image(s, run, shape, test) for s in args.pair]).to(device)
    L = args.lambdas
    # network calls: encode the pair, decode its row, the mixes one lam at a time, the random rows
    progress = Progress(steps * (2 + args.refine) + L * sum(t_mix) + (steps if args.rows else 0))
    model = counted(model, progress, by_images=False)
    no_label = told(model, model.config["n_classes"])
    lam = torch.linspace(0, 1, L, dtype=torch.float64)[:, None]
    gen = torch.Generator(device).manual_seed(args.seed)
    t0 = time.time()
    with autocast(device, precision):
        x_T = ddim_encode(no_label, sched, x0, steps, args.refine)
        z = slerp(x_T[:1].expand(L, *shape), x_T[1:].expand(L, *shape), lam)
        rows = [sample_ddim(no_label, sched, z.shape, steps, x_T=z)]
        rows += [mix_row(no_label, sched, x0, lam, t, gen) for t in t_mix]
        if args.rows:
            rows += random_rows(model, ckpt, sched, steps, lam, args.rows, gen, args.seed)
    blank = -torch.ones(1, *shape, device=device)  # black
    grid = []
    for i, row in enumerate(rows):
        ends = (x0[:1], x0[1:]) if i <= len(t_mix) else (blank, blank)
        grid += [ends[0], row.float(), ends[1]]
    save_samples(args.out, torch.cat(grid), nrow=L + 2)
    print(
        f"wrote {args.out}: lam = 0..1 in {L} columns; rows: the pair by DDIM ({steps} steps, "
        f"refine {args.refine}), DDPM's mix at t = {', '.join(map(str, t_mix)) or '-'}, "
        f"{args.rows} random pairs; {time.time() - t0:.0f}s, {precision}"
    )
    return 0


def mix_row(eps_model, sched, x0, lam, t, gen):  # DDPM Section 4.4 at t, a column a lam
    eps = torch.randn(1, *x0.shape[1:], generator=gen, device=x0.device)  # one eps for both
    seed = int(torch.randint(2**62, (1,), generator=gen, device=x0.device))
    mixes = []
    for j in range(len(lam)):  # one lam at a time, each decoded with the same z
        gen_t = torch.Generator(x0.device).manual_seed(seed)
        mixes.append(ddpm_mix(eps_model, sched, x0[:1], x0[1:], lam[j].item(), t, eps, gen_t))
    return torch.cat(mixes)


def random_rows(model, ckpt, sched, steps, lam, n_rows, gen, seed):  # slerp of random x_T pairs
    shape = tuple(ckpt["config"]["data_shape"])
    L = len(lam)
    z0 = torch.randn(n_rows, *shape, generator=gen, device=gen.device)
    z1 = torch.randn(n_rows, *shape, generator=gen, device=gen.device)
    z = slerp(z0.repeat_interleave(L, 0), z1.repeat_interleave(L, 0), lam.repeat(n_rows, 1))
    eps_model = model
    K = model.config["n_classes"]
    if K:  # one label a row, guided as `sample` guides an unconditional request
        label_freq = ckpt["config"].get("label_freq", [1 / K] * K)
        y = draw_labels(label_freq, n_rows, torch.Generator().manual_seed(seed))
        t_lo, t_hi = [f * sched.T for f in UNCOND_T]
        eps_model = guided(model, y.repeat_interleave(L).to(gen.device), UNCOND_W, t_lo, t_hi)
    x = sample_ddim(eps_model, sched, z.shape, steps, x_T=z)
    return list(x.float().split(L))


def pair_image(s, run, shape, test):  # --pair: an index into test(), or a .png of the model's shape
    if s.isdigit():
        check_test_split(run, f"--pair {s}: a test index")
        data = test()  # loaded once for both indices
        if int(s) >= len(data):
            raise UserError(f"--pair {s}: the {run['dataset']} test split has {len(data)} images")
        return to_model_range(data[int(s)])
    try:
        image = Image.open(s).convert("L" if shape[0] == 1 else "RGB")
    except OSError as e:
        raise UserError(f"--pair {s}: neither a test index nor a readable image ({e})") from None
    x = torchvision.transforms.functional.pil_to_tensor(image)
    if x.shape[1:] == (28, 28) and run["dataset"] in ("mnist", "fashion"):
        x = F.pad(x, (2, 2, 2, 2))  # as load_data pads the digits
    if tuple(x.shape) != shape:
        raise UserError(
            f"--pair {s}: a {x.shape[2]} x {x.shape[1]} image with {x.shape[0]} channel(s); "
            f"the model takes {shape[2]} x {shape[1]} with {shape[0]}"
        )
    return to_model_range(x)


def counted(model, progress, by_images=True):  # the network, ticking `progress` each call
    def model_counted(xt, t, y):
        eps = model(xt, t, y)
        progress.tick(steps=len(xt) if by_images else 1)
        return eps

    model_counted.config = model.config
    return model_counted


def told(model, y):  # eps_model(xt, t) of a net told labels y; K = n_classes: "no label"
    return lambda xt, t: model(xt, t, y if torch.is_tensor(y) else torch.full_like(t, y))


def labelled(model, y):  # eps_model(xt, t, i) of bound_pass: image i has label y[i]
    return lambda xt, t, i: model(xt, t, y[i])


def padded_region(dataset, shape):  # the pixels of the original image: 28 x 28 digits padded to 32
    region = torch.ones(shape, dtype=torch.bool)
    if dataset in ("mnist", "fashion"):
        region[..., :2, :] = region[..., -2:, :] = False
        region[..., :, :2] = region[..., :, -2:] = False
    return region


def report_bound(nats, minus_log_p_y, D, D_region, n_rd):
    """Bits/dim and its standard error over images, split into L_T / sum L_{t-1} / L_0, for each
    branch and sigma^2; then the same over the original pixels, when padding was added."""
    for r, dims in enumerate([D, D_region]):
        if r and dims == D:
            return
        print(
            f"bits/dim over {dims} dimensions (eq. 5: L_T + sum L_t-1 + L_0; +- 1 standard error)"
        )
        for name, v in nats.items():
            extra = minus_log_p_y if name == "own label" else 0 * minus_log_p_y
            for s, sigma2 in enumerate(SIGMA2):
                terms = v[r, s] / (dims * math.log(2))  # bits/dim: (3 terms, images)
                total = terms.sum(0) + extra[: terms.shape[1]] / (dims * math.log(2))
                se = total.std() / math.sqrt(len(total)) if len(total) > 1 else math.nan
                split = " / ".join(f"{x:.4f}" for x in terms.mean(1).tolist())
                label = f"{name}, first {n_rd}" if name == "no label" and len(nats) > 1 else name
                line = f"  {label:18} sigma^2 = {sigma2:10} {total.mean():.4f} +- {se:.4f}"
                if name == "own label":
                    split += f" | -log p(y) {extra.mean() / (dims * math.log(2)):.4f}"
                if name == "no label" and len(nats) > 1:  # the same images with their labels
                    own = (
                        nats["own label"][r, s, :, : len(total)].sum(0)
                        + minus_log_p_y[: len(total)]
                    )
                    split += f" | own label on them {own.mean() / (dims * math.log(2)):.4f}"
                print(f"{line} | L_T / sum L_t-1 / L_0 {split}")


def report_rate_distortion(steps, rate, mse, D):
    """DDPM Table 4: at step t a receiver holds x_t ~ q(x_t | x_0), for which it has paid the rate
    L_T + sum_{s >= t} L_{s-1} (nats an image here), and reconstructs x0_hat (eq. 15): the
    distortion is its RMSE on 0..255 (mse: per dimension)."""
    print(
        "rate and distortion (Section 4.3): t | rate, bits/dim, sigma^2 = beta_tilde, beta | RMSE"
    )
    for j, step in enumerate(steps):
        bits = rate[:, j] / (D * math.log(2))
        print(f"  {step:5d} | {bits[0]:.4f} {bits[1]:.4f} | {mse[j].sqrt():.2f}")


def sampling_eps_model(args, ckpt, model, sched):
    """(eps-model, number of samples) for --class and --guidance: without --class, a conditional net
    draws y ~ p(y) and samples x | y, guided a little (UNCOND_W, UNCOND_T); with --class, x | y for
    that class (w = 3 by default); --class none, or an unconditional net: the "no label" model."""
    if args.guidance_t and (len(args.guidance_t) != 2 or args.guidance_t[0] > args.guidance_t[1]):
        raise UserError(
            f"--guidance-t {','.join(f'{v:g}' for v in args.guidance_t)}: "
            "two values LO,HI with LO <= HI"
        )
    K = model.config.get("n_classes", 0)  # the MLP has no labels
    device = next(model.parameters()).device
    if args.cls is None and K:
        label_freq = ckpt["config"].get("label_freq", [1 / K] * K)  # older checkpoints: uniform
        y = draw_labels(label_freq, args.n, torch.Generator().manual_seed(args.seed))
        w = UNCOND_W if args.guidance is None else args.guidance
        t_lo, t_hi = args.guidance_t or [f * sched.T for f in UNCOND_T]
        return guided(model, y.to(device), w, t_lo, t_hi), args.n
    if args.cls not in (None, "none") or args.guidance is not None or args.guidance_t:
        y = class_labels(args.cls, args.n, K)
        w = 3.0 if args.guidance is None else args.guidance
        t_lo, t_hi = args.guidance_t or (0, sched.T)
        return guided(model, y.to(device), w, t_lo, t_hi), len(y)
    return model, args.n


def with_progress(eps_model, total):  # the eps-model, printing a progress line as it is called
    progress = Progress(total)

    def counted(xt, t):
        eps = eps_model(xt, t)
        progress.tick()
        return eps

    return counted


def comma_ints(s):
    return [int(v) for v in s.split(",")]


def comma_floats(s):
    return [float(v) for v in s.split(",")]


def make_parser():
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        description="DDPM / DDIM on MNIST in one file.", formatter_class=fmt
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the eps-network (Algorithm 1)", formatter_class=fmt)
    sa = sub.add_parser(
        "sample", help="Algorithm 2, DDIM or DPM-Solver++ sampling", formatter_class=fmt
    )
    nl = sub.add_parser(
        "nll", help="the bound of eq. (5) in bits/dim on the test split", formatter_class=fmt
    )
    rec = sub.add_parser(
        "reconstruct", help="DDIM: encode test images to x_T, decode, the MSE", formatter_class=fmt
    )
    ip = sub.add_parser(
        "interpolate", help="DDIM's and DDPM's interpolations, as a grid", formatter_class=fmt
    )
    add_device_flags(tr)
    add_device_flags(sa)
    add_device_flags(nl, "fp32: bf16 raises the shipped model's bound by 0.04 bits/dim (README)")
    fp32_default = "fp32; bf16 measured 1.8x faster, no worse at S = 10, 50 (samples/README.md)"
    add_device_flags(rec, fp32_default)
    add_device_flags(ip, fp32_default)
    for p in (tr, sa, nl, ip):
        p.add_argument("--seed", type=int, default=0, help="fixes every random draw")
    for p in (sa, nl, rec, ip):
        p.add_argument(
            "--ckpt", help="checkpoint written by train; None: the model shipped in samples/"
        )
    for p in (nl, rec, ip):
        p.add_argument(
            "--data-dir", default="./data", help="the test split is read, or downloaded, here"
        )
    add_train_flags(tr)
    add_sample_flags(sa)
    add_nll_flags(nl)
    add_reconstruct_flags(rec)
    add_interpolate_flags(ip)
    return parser


def add_device_flags(p, fp32_why=None):  # fp32_why: why this command defaults to fp32
    p.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="fp32" if fp32_why else "auto",
        help=fp32_why,
    )


def add_train_flags(tr):
    # data and files
    tr.add_argument(
        "--dataset", default="mnist", help="mnist, fashion, cifar10, swissroll, or a folder"
    )
    tr.add_argument(
        "--data-dir", default="./data", help="mnist, fashion, cifar10 are downloaded here"
    )
    tr.add_argument(
        "--image-size", type=int, choices=[8, 16, 32, 64, 128], default=32, help="for folders"
    )
    tr.add_argument(
        "--cond",
        action=argparse.BooleanOptionalAction,
        help="class-conditional, for classifier-free guidance; None: if the data has labels",
    )
    tr.add_argument(
        "--p-uncond", type=float, default=0.1, help="with --cond: how often the label is dropped"
    )
    tr.add_argument("--out", default="ckpt.pt", help="checkpoint path")
    tr.add_argument(
        "--resume", metavar="PATH", help="continue this checkpoint's run (model, data, lr...)"
    )
    tr.add_argument(
        "--save-every", type=int, help="steps between checkpoints; None: once per epoch"
    )
    tr.add_argument(
        "--sample-every", type=int, default=0, help="steps between EMA preview grids; 0: none"
    )
    # model and schedule
    tr.add_argument("--ch", type=int, default=32, help="base width of the U-Net")
    tr.add_argument("--ch-mult", type=comma_ints, default=[1, 2, 2], help="U-Net width per level")
    tr.add_argument("--n-res", type=int, default=2, help="residual blocks per resolution")
    tr.add_argument(
        "--schedule", choices=["linear", "cosine"], default="linear", help="beta_t schedule"
    )
    tr.add_argument("--T", type=int, default=1000, help="diffusion steps")
    # optimization
    tr.add_argument("--epochs", type=int, default=30, help="passes over the data")
    tr.add_argument("--steps", type=int, help="total optimizer steps; overrides --epochs")
    tr.add_argument(
        "--batch-size", type=int, help="per step and process; None: 32 images or 128 points"
    )
    tr.add_argument(
        "--lr", type=float, help="AdamW learning rate; None: 1e-3 for images, 2e-3 for points"
    )
    tr.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay after warm-up")


def add_sample_flags(sa):
    sa.add_argument(
        "--sampler", choices=["ddpm", "ddim", "dpm"], default="ddpm", help="dpm: DPM-Solver++"
    )
    sa.add_argument(
        "--steps",
        type=int,
        help="network calls; None: T for ddpm, 50 for ddim, 20 for dpm; ddpm with S < T: "
        "Algorithm 2 on DDIM's sub-sequence of S steps",
    )
    sa.add_argument(
        "--eta", type=float, default=0.0, help="DDIM eq. (16): 0 deterministic, 1 DDPM-like"
    )
    sa.add_argument(
        "--sigma2",
        choices=SIGMA2,
        default="beta_tilde",
        help="Algorithm 2's sigma_t^2 (Section 3.2); beta with --steps: DDIM's sigma_hat",
    )
    sa.add_argument("--n", type=int, default=64, help="number of samples")
    sa.add_argument(
        "--class",
        dest="cls",
        help="a class index; all: a row per class; none: the 'no label' prediction; "
        "None: unconditional, each label drawn from the training set's frequencies",
    )
    sa.add_argument(
        "--guidance",
        type=float,
        help=f"classifier-free guidance w; None: 3 with --class, else {UNCOND_W}",
    )
    sa.add_argument(
        "--guidance-t",
        type=comma_floats,
        metavar="LO,HI",
        help="guide only for LO <= t <= HI; None: every t with --class, else "
        f"{UNCOND_T[0]} T..{UNCOND_T[1]} T",
    )
    sa.add_argument(
        "--no-clip",
        dest="clip",
        action="store_false",
        help="images: Algorithm 2 as printed, x0_hat not clipped to [-1, 1] (points never are)",
    )
    sa.add_argument(
        "--out", default="sample.png", help=".png grid, .npz uint8 images, .gif reverse process"
    )


def add_nll_flags(nl):
    nl.add_argument("--n", type=int, help="test images; None: the whole test split")
    nl.add_argument(
        "--n-rd", type=int, default=1000, help="images for 'no label', rate and distortion"
    )
    nl.add_argument("--t-draws", type=int, default=4, help="t drawn per image from q(t) ~ t^-1.25")
    nl.add_argument(
        "--full", dest="t_draws", action="store_const", const=None, help="every t: T calls an image"
    )
    nl.add_argument("--batch-size", type=int, default=64, help="test images per batch")
    nl.add_argument("--out", help="a .png of x0_hat along the reverse process (Fig. 6)")


def add_reconstruct_flags(rec):
    rec.add_argument("--n", type=int, default=100, help="the first n test images")
    rec.add_argument(
        "--steps",
        type=comma_ints,
        default=[10, 20, 50, 100],
        help="DDIM steps S, a row each (DDIM Table 2 adds 200, 500, 1000)",
    )
    rec.add_argument(
        "--refine",
        type=comma_ints,
        default=[0, 2],
        help="fixed-point iterations an encoding step, a row each; 0: the paper's encoder",
    )
    rec.add_argument("--batch-size", type=int, default=250, help="test images per batch")
    rec.add_argument("--out", help="a .png of the first 8 images and their reconstructions")


def add_interpolate_flags(ip):
    ip.add_argument(
        "--pair",
        type=lambda s: s.split(","),
        default=["0", "1"],
        metavar="I,J",
        help="two test-split indices or .png files",
    )
    ip.add_argument("--lambdas", type=int, default=9, help="columns, lam = 0..1")
    ip.add_argument("--steps", type=int, help="DDIM steps to encode and decode; None: 50")
    ip.add_argument(
        "--refine",
        type=int,
        default=2,
        help="fixed-point iterations a step; 0: the paper's encoder",
    )
    ip.add_argument(
        "--t-mix",
        type=comma_ints,
        help="DDPM Section 4.4: a row of the pair mixed at each t; None: T/4, T/2, 3T/4",
    )
    ip.add_argument("--rows", type=int, default=2, help="rows between two random x_T")
    ip.add_argument("--out", default="interpolate.png", help="the grid, a .png")


# what every numeric flag accepts, each value of a list; flags a command does not have are skipped
FLAG_RANGES = {
    "T": (lambda v: v >= 2, "at least 2"),
    "ch": (lambda v: v >= 1, "at least 1"),
    "ch_mult": (lambda v: v >= 1, "positive integers, e.g. 1,2,2"),
    "n_res": (lambda v: v >= 1, "at least 1"),
    "epochs": (lambda v: v >= 1, "at least 1"),
    "steps": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "save_every": (lambda v: v >= 1, "at least 1"),
    "sample_every": (lambda v: v >= 0, "at least 0"),
    "lr": (lambda v: v > 0 and math.isfinite(v), "a number above 0"),
    "p_uncond": (lambda v: 0 <= v <= 1, "a probability, in [0, 1]"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "n": (lambda v: v >= 1, "at least 1"),
    "n_rd": (lambda v: v >= 1, "at least 1"),
    "t_draws": (lambda v: v >= 1, "at least 1"),
    "guidance": (math.isfinite, "a finite number"),
    "guidance_t": (lambda v: not math.isnan(v), "numbers, not nan"),
    "refine": (lambda v: v >= 0, "at least 0"),
    "lambdas": (lambda v: v >= 2, "at least 2"),
    "t_mix": (lambda v: v >= 1, "at least 1"),
    "rows": (lambda v: v >= 0, "at least 0"),
}


def check_flags(args):
    for name, (ok, accepted) in FLAG_RANGES.items():
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        if value is not None and not all(map(ok, values)):
            shown = ",".join(f"{v:g}" for v in values)
            raise UserError(f"--{name.replace('_', '-')} must be {accepted} (got {shown})")


def main(argv=None):
    args = make_parser().parse_args(argv)
    try:
        check_flags(args)
        if args.cmd == "train":
            return train(args)
        if args.cmd == "nll":
            return nll(args)
        if args.cmd == "reconstruct":
            return reconstruct(args)
        if args.cmd == "interpolate":
            return interpolate(args)
        return sample(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""ddpm.py: Denoising Diffusion Probabilistic Models in one file, to read next to the papers:
  DDPM  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239
  DDIM  Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502

    python ddpm.py sample --sampler ddim      # DDIM, 50 steps, the model in samples/: sample.png
    python ddpm.py sample                     # Algorithm 2, T = 1000 steps: ~4 minutes on 2 cores
    python ddpm.py train --epochs 30          # Algorithm 1 on MNIST (downloaded), writes ckpt.pt
    python -m pytest                          # the tests: the code is the papers' math

The papers' core comes first: the schedule and forward process, Algorithm 1 and its EMA, the
bound, Algorithm 2, DDIM, the eps-networks. Then what goes beyond them (DPM-Solver++, guidance,
the eps-model every sampler calls), then the machinery of `train` and `sample`. The papers'
measurements are scripts in experiments/. Equation numbers are DDPM's unless marked otherwise.

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


def schedule_of(beta):  # every constant from beta_1..beta_T; index 0 is prepended: no noise
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
    T = len(beta) - 1
    alpha = 1 - beta
    alpha_bar = torch.cumprod(alpha, 0)
    beta_tilde = torch.zeros_like(beta)
    beta_tilde[1:] = (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]) * beta[1:]  # eq. (7)
    lam = 0.5 * (alpha_bar / (1 - alpha_bar)).log()
    return Schedule(T, beta, alpha, alpha_bar, beta_tilde, lam)


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
    mean = alpha_bar_prev.sqrt() * beta * x0 + alpha.sqrt() * (1 - alpha_bar_prev) * xt
    return mean / (1 - alpha_bar), gather(sched.beta_tilde, t, xt)


def p_mean(xt, t, eps, sched):
    """The mean of p_theta(x_{t-1} | x_t) from eps_theta, eq. (11): q_posterior's mean at x_0 =
    x0_hat, written in eps. Its coefficients are taken in float64, then cast to x's dtype."""
    coef = gather(sched.beta / (1 - sched.alpha_bar).sqrt(), t, xt)
    return (xt - coef * eps) / gather(sched.alpha.sqrt(), t, xt)


# --- Algorithm 1: training, and the EMA of the weights that is sampled from -----------------------
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


class EMA:
    """The exponential moving average of the weights (Ho et al., Appendix B: decay 0.9999), what is
    sampled from. Decay min(decay, (1 + n) / (10 + n)) after n updates, beyond the paper: a short
    run's average is then not mostly the random initial weights."""

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


def make_optimizer(model, lr):  # Ho et al.: Adam. AdamW's default decay: a deviation, measured
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def train_step(net, ema, opt, x0, sched, generator=None, y=None, objective=loss_fn, mixed=None):
    """Algorithm 1, lines 2-5, once, then the EMA update: the loss, or None if the step was skipped.
    Beyond the paper: the gradient clipped to norm 1 (as Ho et al.'s code), and a skip, not an
    update, when the loss or the gradient is not finite: no NaN reaches the weights. y: labels;
    objective: L_simple, or one of experiments/table2.py's; mixed: (autocast, GradScaler) for
    bf16/fp16 (fp16 scales the loss: its gradients would underflow); None: fp32."""
    amp, scaler = mixed or (contextlib.nullcontext(), torch.amp.GradScaler(enabled=False))
    with amp:
        loss = objective(lambda xt, t: net(xt, t, y), x0, sched, generator)  # lines 3-5's loss
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # the true gradient, for clipping
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
    if finite:
        scaler.step(opt)  # line 5: the gradient step
        ema.update(net)
    else:
        print(
            f"warning: loss {loss.item()}, grad norm {grad_norm.item()}: step skipped",
            file=sys.stderr,
        )
    scaler.update()  # fp16: after an overflow, a smaller scale next step
    return loss.item() if finite else None


# --- The bound L of eq. (5), in nats per dimension: what L_simple simplifies ----------------------
# -log p(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0. With p_theta's mean from eq. (11), each L_{t-1} is
# a KL between Gaussians: a weight times ||eps - eps_theta||^2 (eq. 12), plus, where sigma_t^2 is
# not beta_tilde_t, a constant for the variances' mismatch. L_simple (Section 3.4) keeps the squared
# error and drops the weight, sigma, the constants and L_0's bucket edges: eq. (14).
def sigma2_choice(sched, sigma2):
    """sigma_t^2 of Section 3.2: "beta" (beta_t, at every t: sigma_1^2 = beta_1) or "beta_tilde"
    (beta_tilde_t, but sigma_1^2 = beta_tilde_2, as Ho et al.'s code clips it: beta_tilde_1 = 0
    would make L_0 a decoder without noise, whose bucket probability is 0 or 1). Ho et al.'s code
    also takes beta_tilde_2 at t = 1 under beta; experiments/nll.py gives that bound beside this."""
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
    down to -inf and the last up to +inf (+-1e3: the same probabilities, and finite gradients for a
    learned sigma), so the 256 sum to 1. float64, and taken on the side of the mean where the normal
    CDF is small, so a far bucket keeps its digits."""
    x0, mean = x0.double(), mean.double()
    upper = torch.where(x0 > 1 - 1 / 255, 1e3, x0 + 1 / 255)
    lower = torch.where(x0 < -1 + 1 / 255, -1e3, x0 - 1 / 255)
    Phi = torch.special.ndtr
    above = Phi((mean - lower) / sigma) - Phi((mean - upper) / sigma)  # for buckets above the mean
    below = Phi((upper - mean) / sigma) - Phi((lower - mean) / sigma)
    return torch.where(x0 > mean, above, below)


def prior_kl(x0, sched):  # L_T of eq. (5) = KL(q(x_T | x_0) || N(0, I)), in nats per dimension
    alpha_bar = sched.alpha_bar[sched.T]
    one = torch.ones((), dtype=torch.float64)
    return normal_kl(alpha_bar.sqrt() * x0.double(), 1 - alpha_bar, 0 * one, one)


SIGMA2 = ("beta_tilde", "beta")  # the two sigma_t^2 of Section 3.2, in this order


def bound_term(x0, xt, t, mean, var, sched):
    """Each image's term of eq. (5) at its own t, nats per dimension, shaped like x0, for a reverse
    process p_theta(x_{t-1} | x_t) = N(mean, var): for t >= 2, L_{t-1} = KL(q(x_{t-1} | x_t, x_0)
    || p_theta), eqs. (6)-(7); for t = 1, L_0 = -log of x_0's bucket under N(mean, var), eq. (13).
    x0 on the 8-bit grid, in [-1, 1]."""
    q_mean, q_var = q_posterior(x0, xt, t, sched)
    first = (t == 1).view(-1, *[1] * (x0.dim() - 1))
    q_var = torch.where(first, torch.ones_like(q_var), q_var)  # beta_tilde_1 = 0: unused at t = 1
    kl = normal_kl(q_mean, q_var.expand_as(x0), mean, var)
    p = bucket_probability(x0, mean, var.sqrt()).to(x0.dtype)
    nll = -p.clamp(min=torch.finfo(p.dtype).tiny).log()  # 0 beyond ~38 sigma: not inf
    return torch.where(first, nll, kl)


def eps_bound_terms(eps_model, x0, t, sched, generator=None):
    """bound_term of an eps-model at each image's own t, from one x_t ~ q(x_t | x_0), under both
    sigma_t^2 of SIGMA2 with the mean of eq. (11): shaped (2, *x0.shape), float64; and x0_hat,
    eq. (15)."""
    eps = noise_like(x0, generator)
    xt = q_sample(x0, t, eps, sched)
    eps_theta = eps_model(xt, t).to(x0.dtype)
    mean = p_mean(xt, t, eps_theta, sched).double()
    x0_, xt_ = x0.double(), xt.double()
    var = [gather(sigma2_choice(sched, sigma2), t, xt_) for sigma2 in SIGMA2]
    terms = torch.stack([bound_term(x0_, xt_, t, mean, v, sched) for v in var])
    return terms, predict_x0(xt, t, eps_theta, sched)


# --- The steps of a sampler: all of 1..T, or a sub-sequence tau of it (DDIM Section 4.2) ----------
def ddim_timesteps(T, steps):
    """round(linspace(T, 1, steps)), `steps` distinct integers from T down to 1: the "linspace"
    spacing of Lin et al. 2024 (arXiv:2305.08891, Table 2), both ends included. DDIM's own
    tau_i = floor(c i) never reaches t = T, where training put pure noise."""
    return torch.linspace(T, 1, steps, dtype=torch.float64).round().long().tolist()


def respace(sched, steps):
    """The sub-sequence tau of ddim_timesteps as a schedule of its own, with S = steps steps:
    alpha_bar'_i = alpha_bar[tau_i], so beta'_i = 1 - alpha_bar'_i / alpha_bar'_{i-1}; and tau,
    (S + 1,) with tau[0] = 0: its step i is t = tau[i] of sched. Algorithm 2 on it with
    sigma^2 = beta' is DDIM Table 1's sigma_hat row; with beta_tilde' it is DDIM at eta = 1."""
    tau = torch.tensor([0] + ddim_timesteps(sched.T, steps)[::-1])
    alpha_bar = sched.alpha_bar[tau]
    return schedule_of(1 - alpha_bar[1:] / alpha_bar[:-1]), tau


# --- Algorithm 2: sampling ------------------------------------------------------------------------
# Every sampler takes (eps_model, sched, shape, generator, steps, x_T, trajectory), then its own
# options by name; it returns x_0, or (x_0, [x_T, ..., x_0]) with trajectory.
def initial_noise(shape, generator, x_T=None):  # x_T ~ N(0, I) on the generator's device
    if x_T is not None:
        return x_T
    return torch.randn(shape, generator=generator, device=getattr(generator, "device", None))


@torch.inference_mode()
def sample_ddpm(
    eps_model,
    sched,
    shape,
    generator=None,
    steps=None,
    x_T=None,
    trajectory=False,
    *,
    sigma2="beta_tilde",
):
    """Algorithm 2 as printed; with steps = S < T, on DDIM's sub-sequence tau as a schedule of its
    own (respace): its step i is t = tau_i, where eps_model is called. sigma2 = "beta_tilde" or
    "beta", the two sigma_t^2 of Section 3.2. Line 4 is eq. (11); the route through x0_hat and
    the posterior mean, eq. (7), is the same."""
    sub, tau = (sched, None) if not steps or steps >= sched.T else respace(sched, steps)
    x = initial_noise(shape, generator, x_T)  # line 1
    xs = [x]
    sigma = sigma2_choice(sub, sigma2).sqrt()  # sigma_1 unused: no noise at t = 1 (line 3)
    for step in range(sub.T, 0, -1):  # line 2
        i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)  # sub's step i
        t = i if tau is None else tau.to(x.device)[i]  # is t = tau_i of sched
        # line 3: no noise at the last step, otherwise every sample keeps sigma_1 * z of noise
        z = noise_like(x, generator) if step > 1 else 0
        eps = eps_model(x, t).to(x.dtype)
        x = p_mean(x, i, eps, sub) + sigma[step] * z  # line 4
        xs.append(x)
    return (x, xs) if trajectory else x  # line 6: x_0


# --- DDIM (Song et al. 2021): eq. (12) on a sub-sequence tau of 1..T ------------------------------
def ddim_sigma(sched, t, t_next, eta):  # DDIM eq. (16); eta = 1 on the full grid is beta_tilde
    alpha_bar, alpha_bar_next = sched.alpha_bar[t], sched.alpha_bar[t_next]
    return eta * ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)).sqrt()


@torch.inference_mode()
def sample_ddim(
    eps_model, sched, shape, generator=None, steps=50, x_T=None, trajectory=False, *, eta=0.0
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


@torch.inference_mode()
def ddim_encode(eps_model, sched, x0, steps=50, refine=0):
    """DDIM Section 5.4: eq. (12) at eta = 0 run upwards, from x_0 to x_T on sample_ddim's steps,
    so that sample_ddim(eps_model, sched, x0.shape, steps, x_T=x_T) decodes x_T to x_0 again.
    Eq. (12) at eta = 0 is an Euler step of DDIM's ODE, eq. (14): decoding t -> s takes eps at the
    step's start, eps(x_t, t). Encoding s -> t is the Euler step the other way, from eps(x_s, s),
    so it undoes its decoding step only up to O((t - s)^2). refine > 0, beyond the paper: that many
    fixed-point iterations x_t <- step(x_s, eps(x_t, t)), whose fixed point is the decoding step's
    exact inverse. Do not clip x0_hat here: clipping is not invertible."""
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
    # from step t down: Algorithm 2 on the schedule's first t steps
    return sample_ddpm(
        eps_model, schedule_of(sched.beta[1 : t + 1]), x0.shape, generator, x_T=x_t_bar
    )


# --- The eps-networks -----------------------------------------------------------------------------
# Any R^n -> R^n model that also takes t works (the tests use closed-form ones). For images, a small
# version of Ho et al.'s U-Net (Appendix B); for 2-D points, an MLP.
def timestep_embedding(t, dim):
    """Transformer sinusoids of the integer step t (Vaswani et al.), as Ho et al.'s: frequencies
    10000^(-i / half), i < half, where their code divides by half - 1 (shipped weights: half)."""
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
    """eps_theta(x_t, t, y): level i = 1..L has width ch * ch_mult[i-1] at resolution H / 2^(i-1)
    (H, W divide by 2^(L-1)); out_ch: in_ch, or more (experiments/table2.py's variances). y: labels
    for guidance; label n_classes is "no label", an unconditional net's (n_classes = 0) only one."""

    def __init__(self, in_ch=1, ch=64, ch_mult=(1, 2, 2), n_res=2, n_classes=0, out_ch=None):
        super().__init__()
        self.config = dict(ch=ch, ch_mult=list(ch_mult), n_res=n_res, n_classes=n_classes)
        self.config["out_ch"] = out_ch  # None: in_ch
        t_dim = 4 * ch
        widths = [ch * m for m in ch_mult]
        self.time_mlp = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.label_emb = nn.Embedding(n_classes + 1, t_dim)  # added to the time embedding
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c = ch
        for i, w in enumerate(widths, 1):  # every level but the last halves H and W
            blocks = [ResBlock(c if j == 0 else w, w, t_dim) for j in range(n_res)]
            self.down.append(nn.ModuleList(blocks))
            last = i == len(widths)
            self.downsample.append(nn.Identity() if last else nn.Conv2d(w, w, 3, 2, padding=1))
            c = w
        self.mid1 = ResBlock(c, c, t_dim)
        self.attn = Attention(c)
        self.mid2 = ResBlock(c, c, t_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths, 1))):  # a level's first block takes the skip
            blocks = [ResBlock(c + w if j == 0 else w, w, t_dim) for j in range(n_res)]
            self.up.append(nn.ModuleList(blocks))
            double = nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(w, w, 3, padding=1))
            self.upsample.append(double if i > 1 else nn.Identity())
            c = w
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, out_ch or in_ch, 3, padding=1)

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


# ==================================== Beyond the papers ====================================


# --- An eps-network for 2-D points (the swiss roll), and the one that fits a data shape ---------
class MLP(nn.Module):  # eps_theta for 2-D points (the swiss roll): residual blocks of width 4 * ch
    def __init__(self, dim=2, ch=32, n_res=2):
        super().__init__()
        self.config = dict(ch=ch, n_res=n_res)
        w = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, w), nn.SiLU(), nn.Linear(w, w))
        self.x_in = nn.Linear(dim, w)
        self.x_out = nn.Linear(w, dim)
        # (lin1, t_proj, lin2) a block: t as a bias inside the block, as in ResBlock
        blocks = [nn.ModuleList(nn.Linear(w, w) for _ in range(3)) for _ in range(n_res)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, t, y=None):  # points have no labels: y is ignored
        emb = self.time_mlp(timestep_embedding(t, self.config["ch"]))  # (B, w)
        h = self.x_in(x)
        for lin1, t_proj, lin2 in self.blocks:
            h = h + lin2(F.silu(lin1(F.silu(h)) + t_proj(emb)))
        return self.x_out(F.silu(h))


# (dim,): the MLP; (C, H, W): U-Net
def make_net(shape, ch, ch_mult=(1, 2, 2), n_res=2, n_classes=0, out_ch=None):
    if len(shape) == 1:
        return MLP(shape[0], ch, n_res)
    return UNet(shape[0], ch, ch_mult, n_res, n_classes, out_ch)


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
def sample_dpm(eps_model, sched, shape, generator=None, steps=20, x_T=None, trajectory=False):
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


# Unconditional samples of a conditional net: y ~ p(y), then x | y guided a little, in an interval
# of t (samples/README.md, "Why guidance": more confident digits, for 15 double batches of 50 calls)
UNCOND_W = 0.25
UNCOND_T = (0.3, 0.6)  # t_lo / T, t_hi / T
UNGUIDED = (None, 0.0, (0, math.inf))  # (labels, w, t_range) of the "no label" prediction alone


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


def unconditional_labels(label_freq, K, n, seed, T):
    """(labels y, guidance w, its interval of t) for n unconditional samples: the one rule that
    `sample` without --class, the training previews and experiments/interpolate.py follow. A
    conditional net (K classes) draws y ~ p(y) (uniform where no frequencies are stored), guided by
    UNCOND_W for UNCOND_T; an unconditional net (K = 0) is told "no label", unguided."""
    if not K:
        return UNGUIDED
    y = draw_labels(label_freq or [1 / K] * K, n, torch.Generator().manual_seed(seed))
    return y, UNCOND_W, [f * T for f in UNCOND_T]


# --- The eps-model a sampler calls: a network, told labels, guided, clipped -----------------------
def guided(net, y=None, w=0.0, t_range=(0, math.inf)):
    """eps_model(x_t, t) from the network net(x_t, t, y): labels y, one a row (None: "no label",
    the only label of an unconditional net), and guidance w, eq. (6) of Ho & Salimans, (1 + w)
    eps(x_t, t, y) - w eps(x_t, t), for t_range[0] <= t <= t_range[1] (Kynkaanniemi et al. 2024,
    arXiv:2404.07724). w = 0: net(x_t, t, y) alone."""
    no_label = net.config.get("n_classes", 0)  # the MLP has no labels

    def eps_model(xt, t):
        none = torch.full_like(t, no_label)
        y_t = none if y is None else y
        w_t = ((t_range[0] <= t) & (t <= t_range[1])).to(xt.dtype) * w
        w_t = w_t.view(-1, *[1] * (xt.dim() - 1))
        if not w_t.any():  # the conditional prediction alone: one call of B, not 2B
            return net(xt, t, y_t)
        both = net(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y_t, none]))  # one call
        eps_y, eps_none = both.to(xt.dtype).chunk(2)
        return (1 + w_t) * eps_y - w_t * eps_none

    return eps_model


def clipped(eps_model, sched):
    """x0_hat (eq. 15) clipped to [-1, 1], as Ho et al.'s released code samples ("clip_denoised";
    Algorithm 2 does not print it): the eps returned is the one whose x0_hat is the clipped one."""

    def eps_clipped(xt, t):
        x0_hat = predict_x0(xt, t, eps_model(xt, t).to(xt.dtype), sched).clamp(-1, 1)
        alpha_bar = gather(sched.alpha_bar, t, xt)
        return (xt - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()  # eq. (4) solved for eps

    return eps_clipped


def counted(eps_model, progress):  # a tick of the progress line per image through the network
    def eps_counted(xt, t):
        eps = eps_model(xt, t)
        progress.tick(steps=len(xt))
        return eps

    return eps_counted


# ==================================== Machinery ====================================


class UserError(Exception):
    """A mistake the user can fix: the command prints it as one line and exits with 2."""


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
    split (mnist, fashion, cifar10). Any other name is a folder, read as ImageFolder: its class
    sub-folders, sorted, are the labels."""
    if dataset == "swissroll":
        return make_swissroll(100_000, torch.Generator().manual_seed(seed)), None
    if dataset not in DATASETS:
        try:
            folder = torchvision.datasets.ImageFolder(dataset)
        except OSError as e:  # no such folder, no sub-folder, or no image file in them
            why = f"neither a known data set nor a folder of images ({e})"
            raise UserError(f"--dataset {dataset}: {why}") from None
        images = torch.stack([read_image(f, image_size) for f, _ in folder.imgs])
        return images, torch.tensor(folder.targets)
    try:
        ds = DATASETS[dataset](data_dir, train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError or URLError when it cannot download
        why = f"downloading it failed ({type(e).__name__}); pass --data-dir with the folder"
        raise UserError(f"{dataset} is not in {data_dir} and {why} that holds it") from None
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


def save_checkpoint(path, config, model, ema, opt, step, **extra):  # extra: a script's own state
    state = dict(config=config, model=model.state_dict(), ema=ema.model.state_dict())
    state.update(opt=opt.state_dict(), step=step, ema_n=ema.n, **extra)
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
        why = f"with weights that fit the architecture it names ({type(e).__name__})"
        raise UserError(f"{path} is not a ddpm.py checkpoint {why}") from None
    return ckpt, model.to(device).eval()


# images in [-1, 1]: a grid sqrt(N) wide; points: a 256 x 256 histogram of [-1.5, 1.5]^2
def grid_image(x, nrow=None):
    if x.dim() == 2:
        ij = ((x.float().clamp(-1.5, 1.5) + 1.5) * 255 / 3).round().long().cpu()  # (N, 2) pixels
        hist = torch.zeros(256, 256).index_put_((255 - ij[:, 1], ij[:, 0]), torch.ones(len(x)))
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
        # Pillow's optimize=True corrupts these frames
        gif = dict(format="GIF", save_all=True, duration=60, loop=0, optimize=False)
        atomic_write(path, lambda f: frames[0].save(f, append_images=frames[1:], **gif))


# --- Device and precision -------------------------------------------------------------------------
def has_native_bf16(device):  # CUDA with bf16, or a CPU with AVX512-BF16 (or AMX)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not os.path.exists("/proc/cpuinfo"):
        return False
    with open("/proc/cpuinfo") as f:
        return "avx512_bf16" in f.read()


# --device as a torch.device this machine has (auto: cuda, then mps, then cpu), or one line saying
# why not; precision auto: bf16 where it is native, else fp16 on CUDA, fp32 elsewhere
def pick_device(name, precision):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        name = "mps" if name == "cpu" and torch.backends.mps.is_available() else name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; auto, cpu, cuda, cuda:N or mps") from None
    mps = int(torch.backends.mps.is_available())
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": mps}.get(device.type)
    if count is None:
        raise UserError(f"--device {name}: ddpm.py runs on auto, cpu, cuda, cuda:N or mps")
    if (device.index or 0) >= count:
        raise UserError(f"--device {name}: this machine has {count} {device.type} device(s)")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
        if has_native_bf16(device):
            precision = "bf16"
    return device, precision


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


# a stop asked of one process stops them all after the same step
def on_any_rank(flag, world, device):
    if world == 1:
        return flag
    flags = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


# --- Progress -------------------------------------------------------------------------------------
def hms(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


class Progress:
    """The progress line of every long command, "<name> k/N | <fields> | <rate> | elapsed | eta",
    2 s after the start, then every 10 s and at the end, at the pace since the previous line.
    `train` counts its steps; `sample` and the experiments, images through the network."""

    def __init__(self, total, done=0, unit=None, per_step=1, log=print, name="images"):
        self.total = total
        self.k = self.k_last = done
        self.name = name
        self.log = log
        self.unit = unit  # e.g. "img": a rate of per_step units a step; None: no rate
        self.per_step = per_step
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
        times = [f"elapsed {hms(now - self.t0)}", f"eta {hms(eta)}"]
        line = [f"{self.name} {self.k}/{self.total}", *fields, *rate, *times]
        self.log(" | ".join(line), flush=True)
        self.t_last = now
        self.k_last = self.k
        self.printed = True


# --- The training loop ----------------------------------------------------------------------------
# not the paper's 2e-4 and 128 (35.7 M parameters, TPUs): at this size on a CPU more and larger
# steps win (samples/README.md, the recipe); points (a small MLP) take larger still
BATCH_SIZE = {"images": 32, "points": 128}
LR = {"images": 1e-3, "points": 2e-3}
# the flags a train command sets even with --resume: the run's length, files, cadence and machine.
# Every other flag of TRAIN_FLAGS defines the run, and --resume takes it from the checkpoint.
PER_COMMAND = ("cmd", "device", "precision", "data_dir", "out", "resume", "save_every")
PER_COMMAND += ("sample_every", "epochs", "steps")


def run_config(args):
    """The run: one record of every train flag, from the command line or, with --resume, from the
    checkpoint (all but PER_COMMAND), with the defaults left None in the flag table resolved (the
    data's kind decides them). What train reads and the checkpoint stores."""
    flags = vars(args)
    if args.resume:
        ckpt, _ = load_checkpoint(args.resume, "cpu")
        if "opt" not in ckpt:
            why = "has EMA weights only (like samples/), no training state"
            raise UserError(f"--resume {args.resume}: {why}")
        saved = ckpt["config"]["train"]
        flags = {k: v if k in PER_COMMAND or k not in saved else saved[k] for k, v in flags.items()}
    kind = "points" if flags["dataset"] == "swissroll" else "images"  # the roll has no labels
    resolved = dict(batch_size=BATCH_SIZE[kind], lr=LR[kind], cond=kind == "images")
    return argparse.Namespace(**{k: resolved.get(k) if v is None else v for k, v in flags.items()})


def training_data(cfg):
    """(data, labels, K): conditional on K classes where cfg.cond, else K = 0 and every label is 0,
    which the network reads as "no label"."""
    data, labels = load_data(cfg.dataset, cfg.data_dir, cfg.seed, cfg.image_size)
    if cfg.cond and labels is None:
        raise UserError(f"--cond: {cfg.dataset} has no labels")
    L, hw = len(cfg.ch_mult), data.shape[2:]  # the U-Net halves H and W at all levels but one
    if data.dim() > 2 and (hw[0] % 2 ** (L - 1) or hw[1] % 2 ** (L - 1)):
        why = f"{L} levels halve the images {L - 1} times, and {hw[0]} x {hw[1]} does not divide"
        raise UserError(f"--ch-mult {','.join(map(str, cfg.ch_mult))}: {why} by {2 ** (L - 1)}")
    if not cfg.cond:
        return data, torch.zeros(len(data), dtype=torch.long), 0
    return data, labels, int(labels.max()) + 1


def training_batch(data, labels, idx, p_uncond, K, gen):
    """Algorithm 1, line 2: x_0 ~ q(x_0) in [-1, 1], and its labels, some dropped (guidance);
    photographs get random horizontal flips (Ho et al., CIFAR-10), digits not."""
    x0 = to_model_range(data[idx])
    y = drop_labels(labels[idx], p_uncond, K, gen)
    if data.shape[1] == 3:
        flips = torch.rand(len(idx), 1, 1, 1, generator=gen, device=data.device) < 0.5
        x0 = torch.where(flips, x0.flip(3), x0)
    return x0, y


def save_preview(path, ema_model, config, sched, amp):
    """16 images (2,000 points) from the EMA weights, from the same noise each time and drawn as
    `sample` draws without --class: the run's progress at a glance, next to its checkpoint."""
    shape, K = config["data_shape"], ema_model.config.get("n_classes", 0)
    n = 16 if len(shape) > 1 else 2000
    device = next(ema_model.parameters()).device
    y, w, t_range = unconditional_labels(config["label_freq"], K, n, 0, sched.T)
    eps_model = guided(ema_model, y if y is None else y.to(device), w, t_range)
    if len(shape) > 1:  # images are clipped, as `sample` clips them
        eps_model = clipped(eps_model, sched)
    gen = torch.Generator(device).manual_seed(0)
    with amp:
        save_samples(path, sample_ddim(eps_model, sched, (n, *shape), gen, min(50, sched.T)))


@contextlib.contextmanager
def stop_signals():  # Ctrl-C or SIGTERM (a preempted job): noted in the list, the step finishes
    stop, signals = [], (signal.SIGINT, signal.SIGTERM)
    handlers = {s: signal.signal(s, lambda n, _: stop.append(n)) for s in signals}
    try:
        yield stop
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def train(cfg, out_ch=None, objective=loss_fn):
    """Algorithm 1 with its machinery, top to bottom: set-up, the loop (batch, step, log, save,
    preview), the last save; the exit code. cfg: run_config's; out_ch and objective: the hooks of
    experiments/table2.py (make_net's, train_step's)."""
    device, precision = pick_device(cfg.device, cfg.precision)
    rank, world, device = start_processes(device)  # rank 0 logs and saves
    log = print if rank == 0 else lambda *a, **k: None
    check_writable(cfg.out)
    ckpt = load_checkpoint(cfg.resume, device)[0] if cfg.resume else None
    data, labels, K = training_data(cfg)
    torch.manual_seed(cfg.seed)  # the initial weights, the same on every rank
    model = make_net(data.shape[1:], cfg.ch, cfg.ch_mult, cfg.n_res, K, out_ch).to(device).train()
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model, cfg.lr)
    step = ckpt["step"] if ckpt else 0  # optimizer steps taken
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        ema.n = ckpt["ema_n"]
    net = model  # what the step calls; on several processes, a wrapper averaging the gradients
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    amp = autocast(device, precision)
    mixed = amp, torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 alone scales
    sched = make_schedule(cfg.schedule, cfg.T)
    label_freq = (torch.bincount(labels, minlength=K) / len(labels)).tolist() if K else []
    # what load_checkpoint and sample need to rebuild the network and draw from it; p(y) draws
    # unconditional samples of a conditional net
    config = dict(model=model.config, data_shape=list(data.shape[1:]))
    config["train"] = dict(vars(cfg), precision=precision)  # the run, as it ran
    config["label_freq"] = label_freq
    data, labels = data.to(device), labels.to(device)  # (N, C, H, W) uint8 images or (N, 2) points

    B = min(cfg.batch_size, len(data) // world)  # per process; a step reads B * world
    per_epoch = len(data) // (B * world)  # an epoch's last, partial batch is dropped
    total = cfg.steps or cfg.epochs * per_epoch
    unit = "img" if data.dim() > 2 else "points"
    sizes = f"{sum(p.numel() for p in model.parameters()):,} parameters | {len(data)} {unit}"
    where = f"steps {step}..{total} | {device} {precision} | {world} process(es) x batch {B}"
    log(f"{type(model).__name__} {sizes} | {per_epoch} steps/epoch | {where}")
    progress = Progress(total, step, unit, B * world, log, name="step")
    smooth, perm_epoch = float("nan"), None
    with stop_signals() as stop:  # Algorithm 1's "repeat ... until converged", or a signal
        while step < total and not on_any_rank(bool(stop), world, device):
            epoch, i = divmod(step, per_epoch)
            if epoch != perm_epoch:  # the order follows from (seed, epoch): a resumed run sees it
                order = torch.Generator().manual_seed(cfg.seed + epoch)
                perm, perm_epoch = torch.randperm(len(data), generator=order).to(device), epoch
            # this step's draws (labels dropped, flips, t, eps), the same after a resume
            gen = torch.Generator(device).manual_seed(hash((cfg.seed, step, rank)))
            idx = perm[(i * world + rank) * B :][:B]  # rank r: the r-th B of B * world
            x0, y = training_batch(data, labels, idx, cfg.p_uncond, K, gen)
            loss = train_step(net, ema, opt, x0, sched, gen, y, objective, mixed)
            if loss is not None:
                smooth = loss if math.isnan(smooth) else 0.98 * smooth + 0.02 * loss
            step += 1
            progress.tick(f"epoch {epoch + 1}", f"loss {smooth:.4f}")
            if rank == 0 and step % (cfg.save_every or per_epoch) == 0:
                save_checkpoint(cfg.out, config, model, ema, opt, step)
            if rank == 0 and cfg.sample_every and step % cfg.sample_every == 0:
                path = f"{os.path.splitext(cfg.out)[0]}_step{step:07d}.png"
                save_preview(path, ema.model, config, sched, amp)

    if rank == 0:  # the last save; the exit code says whether a signal stopped the run
        save_checkpoint(cfg.out, config, model, ema, opt, step)
        print(f"saved {cfg.out} at step {step}")
    if world > 1:
        dist.barrier()  # rank 0 has saved
        dist.destroy_process_group()
    if not stop:
        return 0
    who = f"rank {rank}: " if world > 1 else ""
    resume = f"continue with --resume {cfg.out}"
    print(f"{who}stopped by signal {stop[0]} after step {step}; {resume}", file=sys.stderr)
    return 128 + stop[0]


# --- Command line: train and sample ---------------------------------------------------------------
# the model `sample` uses without --ckpt; samples/README.md says how it was trained
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "mnist.pt")


def class_labels(cls, n, K):  # --class K: n labels K; --class all: K rows of K, a row a class
    if not K:
        raise UserError(f"--class {cls}: unconditional net")
    if cls == "all":
        return torch.arange(K * K) // K
    if cls is None or not cls.isdigit() or int(cls) >= K:
        raise UserError(f"--class {cls}: 0..{K - 1} or all")
    return torch.full((n,), int(cls))


def sample_labels(args, label_freq, K, T):
    """(labels y, guidance w, t_range) for --class and --guidance: without --class, the rule of
    unconditional_labels (a conditional net: y ~ p(y), guided a little); with --class, x | y for
    that class (w = 3 by default); --class none, or an unconditional net: "no label", y None."""
    if args.guidance_t and (len(args.guidance_t) != 2 or args.guidance_t[0] > args.guidance_t[1]):
        shown = ",".join(f"{v:g}" for v in args.guidance_t)
        raise UserError(f"--guidance-t {shown}: two values LO,HI with LO <= HI")
    if args.cls is None and K:
        y, w, t_range = unconditional_labels(label_freq, K, args.n, args.seed, T)
        return y, w if args.guidance is None else args.guidance, args.guidance_t or t_range
    if args.cls not in (None, "none") or args.guidance is not None or args.guidance_t:
        y = class_labels(args.cls, args.n, K)
        w = 3.0 if args.guidance is None else args.guidance
        return y, w, args.guidance_t or (0, T)
    return UNGUIDED


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm": sample_dpm}


def sample(args):
    """Load the checkpoint; then the labels, the eps-model (guidance, clipping), the sampler, the
    file."""
    device, precision = pick_device(args.device, args.precision)
    if not 0 <= args.eta <= 1 or (args.eta and args.sampler == "dpm"):
        why = "DDIM's eta (eq. 16) lies in [0, 1]; DPM-Solver++(2M) takes none"
        raise UserError(f"--eta {args.eta}: {why}")
    if os.path.splitext(args.out)[1].lower() not in (".png", ".npz", ".gif"):
        why = "use .png (a grid), .npz (uint8 arrays) or .gif (reverse process)"
        raise UserError(f"--out {args.out}: {why}")
    check_writable(args.out)
    ckpt, model = load_checkpoint(args.ckpt or SHIPPED, device)  # no --ckpt: the shipped model
    run = ckpt["config"]["train"]
    if "cell" in run:  # its output need not be eps
        raise UserError(f"{args.ckpt}: a cell of experiments/table2.py, which samples it")
    sched = make_schedule(run["schedule"], run["T"])
    default_steps = {"ddpm": sched.T, "ddim": min(50, sched.T), "dpm": min(20, sched.T)}
    steps = args.steps or default_steps[args.sampler]
    if steps > sched.T:
        raise UserError(f"--steps {steps}: the samplers take 1..T = 1..{sched.T} steps")
    if args.sigma2 != "beta_tilde" and args.sampler != "ddpm":
        raise UserError(f"--sigma2 {args.sigma2}: Algorithm 2's choice; DDIM's is --eta")
    K = model.config.get("n_classes", 0)
    y, w, t_range = sample_labels(args, ckpt["config"].get("label_freq"), K, sched.T)
    n = args.n if y is None else len(y)
    shape = (n, *ckpt["config"]["data_shape"])

    eps_model = guided(model, y if y is None else y.to(device), w, t_range)
    if args.clip and len(shape) > 2:  # on by default: images lie in [-1, 1] (points do not)
        eps_model = clipped(eps_model, sched)
    eps_model = counted(eps_model, Progress(n * steps))  # images through the network
    options = {"ddpm": dict(sigma2=args.sigma2), "ddim": dict(eta=args.eta), "dpm": {}}
    gen = torch.Generator(device).manual_seed(args.seed)
    gif = args.out.lower().endswith(".gif")
    t0 = time.time()
    with autocast(device, precision):
        out = SAMPLERS[args.sampler](
            eps_model, sched, shape, gen, steps, trajectory=gif, **options[args.sampler]
        )
    x, xs = out if gif else (out, None)
    save_samples(args.out, x, xs)

    if run["dataset"] == "swissroll":  # how near the data, and what "near" means at this n
        gen_cpu = torch.Generator().manual_seed(args.seed)
        fresh, fresh2 = make_swissroll(2 * n, gen_cpu).split(n)
        near = sliced_wasserstein(x.cpu(), fresh, gen_cpu)
        floor = sliced_wasserstein(fresh2, fresh, gen_cpu)
        print(f"sliced W2 to fresh data {near:.4f} (two fresh sets: {floor:.4f})")
    where = f"checkpoint {args.ckpt or 'shipped in samples/'} at step {ckpt['step']}"
    done = f"{args.sampler} with {steps} steps, {time.time() - t0:.1f}s, {precision}"
    print(f"wrote {args.out}: {n} samples, {done} ({where})")
    return 0


def comma_ints(s):
    return [int(v) for v in s.split(",")]


def comma_floats(s):
    return [float(v) for v in s.split(",")]


# What a numeric flag accepts, each value of a list: (test, what the one-line error says it must be)
AT_LEAST_0 = (lambda v: v >= 0, "at least 0")
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
AT_LEAST_2 = (lambda v: v >= 2, "at least 2")
POSITIVE_INTS = (lambda v: v >= 1, "positive integers, e.g. 1,2,2")
ABOVE_0 = (lambda v: v > 0 and math.isfinite(v), "a number above 0")
PROBABILITY = (lambda v: 0 <= v <= 1, "a probability, in [0, 1]")
DECAY = (lambda v: 0 <= v < 1, "in [0, 1)")
FINITE = (math.isfinite, "a finite number")
NOT_NAN = (lambda v: not math.isnan(v), "numbers, not nan")
# what a flag is when not a plain type: argparse's keywords
BOOL = {"action": argparse.BooleanOptionalAction}
PRECISIONS = ["auto", "fp32", "bf16", "fp16"]
# the helps too long for a row
RESUME_HELP = "continue this checkpoint's run (model, data, lr...)"
COND_HELP = "class-conditional, for classifier-free guidance; None: if the data has labels"
BATCH_HELP = "per step and process; None: {images} images or {points} points".format(**BATCH_SIZE)
LR_HELP = "AdamW learning rate; None: {images:.0e} for images, {points:.0e} for points"
LR_HELP = LR_HELP.format(**LR).replace("e-0", "e-")  # 1e-3, not 0.001
STEPS_HELP = "network calls; None: T for ddpm, 50 for ddim, 20 for dpm; ddpm with S < T: "
STEPS_HELP += "Algorithm 2 on DDIM's sub-sequence of S steps"
SIGMA2_HELP = "Algorithm 2's sigma_t^2 (Section 3.2); beta with --steps: DDIM's sigma_hat"
CLASS_HELP = "a class index; all: a row per class; none: the 'no label' prediction; None: "
CLASS_HELP += "unconditional, each label drawn from the training set's frequencies"
GUIDANCE_HELP = f"classifier-free guidance w; None: 3 with --class, else {UNCOND_W}"
GUIDANCE_T_HELP = "guide only for LO <= t <= HI; None: every t with --class, else "
GUIDANCE_T_HELP += f"{UNCOND_T[0]} T..{UNCOND_T[1]} T"
CLIP_HELP = "images: Algorithm 2 as printed, x0_hat not clipped to [-1, 1] (points never are)"

# A flag table: a row a flag, (flag, type, default, accepted range, help). The type is a function,
# a list of choices, or argparse's keywords; argparse, --help (with the defaults) and the range
# checks are all built from the rows.
SYSTEM_FLAGS = [
    ("--device", str, "auto", None, "auto = cuda, then mps, then cpu"),
    ("--precision", PRECISIONS, "auto", None, None),
    ("--seed", int, 0, None, "fixes every random draw"),
]
TRAIN_FLAGS = SYSTEM_FLAGS + [
    # data and files
    ("--dataset", str, "mnist", None, "mnist, fashion, cifar10, swissroll, or a folder"),
    ("--data-dir", str, "./data", None, "mnist, fashion, cifar10 are downloaded here"),
    ("--image-size", [8, 16, 32, 64, 128], 32, None, "for folders"),
    ("--cond", BOOL, None, None, COND_HELP),
    ("--p-uncond", float, 0.1, PROBABILITY, "with --cond: how often the label is dropped"),
    ("--out", str, "ckpt.pt", None, "checkpoint path"),
    ("--resume", {"metavar": "PATH"}, None, None, RESUME_HELP),
    ("--save-every", int, None, AT_LEAST_1, "steps between checkpoints; None: once per epoch"),
    ("--sample-every", int, 0, AT_LEAST_0, "steps between EMA preview grids; 0: none"),
    # model and schedule
    ("--ch", int, 32, AT_LEAST_1, "base width of the U-Net"),
    ("--ch-mult", comma_ints, [1, 2, 2], POSITIVE_INTS, "U-Net width per level"),
    ("--n-res", int, 2, AT_LEAST_1, "residual blocks per resolution"),
    ("--schedule", ["linear", "cosine"], "linear", None, "beta_t schedule"),
    ("--T", int, 1000, AT_LEAST_2, "diffusion steps"),
    # optimization
    ("--epochs", int, 30, AT_LEAST_1, "passes over the data"),
    ("--steps", int, None, AT_LEAST_1, "total optimizer steps; overrides --epochs"),
    ("--batch-size", int, None, AT_LEAST_1, BATCH_HELP),
    ("--lr", float, None, ABOVE_0, LR_HELP),
    ("--ema-decay", float, 0.9999, DECAY, "EMA decay after warm-up"),
]
SAMPLE_FLAGS = SYSTEM_FLAGS + [
    ("--ckpt", str, None, None, "checkpoint written by train; None: the model shipped in samples/"),
    ("--sampler", list(SAMPLERS), "ddpm", None, "dpm: DPM-Solver++"),
    ("--steps", int, None, AT_LEAST_1, STEPS_HELP),
    ("--eta", float, 0.0, None, "DDIM eq. (16): 0 deterministic, 1 DDPM-like"),
    ("--sigma2", list(SIGMA2), "beta_tilde", None, SIGMA2_HELP),
    ("--n", int, 64, AT_LEAST_1, "number of samples"),
    ("--class", {"dest": "cls"}, None, None, CLASS_HELP),
    ("--guidance", float, None, FINITE, GUIDANCE_HELP),
    ("--guidance-t", {"type": comma_floats, "metavar": "LO,HI"}, None, NOT_NAN, GUIDANCE_T_HELP),
    ("--no-clip", {"dest": "clip", "action": "store_false"}, True, None, CLIP_HELP),
    ("--out", str, "sample.png", None, ".png grid, .npz uint8 images, .gif reverse process"),
]
HELP = argparse.ArgumentDefaultsHelpFormatter


def add_flags(parser, rows):  # argparse's add_argument for each row of a flag table
    for flag, kind, default, _, help in rows:
        if isinstance(kind, dict):
            parser.add_argument(flag, default=default, help=help, **kind)
        elif isinstance(kind, list):
            parser.add_argument(flag, type=type(kind[0]), choices=kind, default=default, help=help)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help)
    return parser


def check_flags(args, rows):  # each value of a numeric flag in its accepted range
    for flag, kind, _, accepted, _ in rows:
        dest = kind.get("dest") if isinstance(kind, dict) else None
        value = getattr(args, dest or flag.lstrip("-").replace("-", "_"))
        values = value if isinstance(value, list) else [value]
        if accepted and value is not None and not all(map(accepted[0], values)):
            shown = ",".join(f"{v:g}" for v in values)
            raise UserError(f"{flag} must be {accepted[1]} (got {shown})")


def command_line(description, commands, argv=None):
    """Every command line of the project, ddpm.py's and experiments/': argparse and --help from the
    flag tables, the range checks, then the command; its exit code, or for a UserError one line and
    2. commands: {name: (function, help, rows)}; a lone command named None has no sub-command."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HELP)
    if None in commands:
        add_flags(parser, commands[None][2])
    else:
        sub = parser.add_subparsers(dest="cmd", required=True)
        for name, (_, what, rows) in commands.items():
            add_flags(sub.add_parser(name, help=what, formatter_class=HELP), rows)
    args = parser.parse_args(argv)
    command, _, rows = commands[getattr(args, "cmd", None)]
    try:
        check_flags(args, rows)
        return command(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


COMMANDS = {  # name: (what runs, what it does, its flags)
    "train": (
        lambda args: train(run_config(args)),
        "train the eps-network (Algorithm 1)",
        TRAIN_FLAGS,
    ),
    "sample": (sample, "Algorithm 2, DDIM or DPM-Solver++ sampling", SAMPLE_FLAGS),
}


def main(argv=None):
    return command_line("DDPM / DDIM on MNIST in one file.", COMMANDS, argv)


# What experiments/ uses of this file, and nothing else (test_ddpm.py checks): the papers' math,
# Algorithm 1's parts, the samplers and their eps-model, the run and its files, the command line.
__all__ = """make_schedule gather q_sample predict_x0 q_posterior p_mean noise_like EMA
make_optimizer train_step SIGMA2 sigma2_choice prior_kl bound_term eps_bound_terms respace
initial_noise sample_ddim ddim_encode slerp ddpm_mix make_net drop_labels guided clipped counted
unconditional_labels UserError load_data DATASETS to_model_range to_pixels save_samples
atomic_write check_writable save_checkpoint load_checkpoint SHIPPED pick_device autocast Progress
stop_signals train run_config main command_line SYSTEM_FLAGS TRAIN_FLAGS PRECISIONS comma_ints
comma_floats AT_LEAST_0 AT_LEAST_1 AT_LEAST_2 ABOVE_0 FINITE""".split()

if __name__ == "__main__":
    sys.exit(main())

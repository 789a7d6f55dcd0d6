"""DDPM's Table 2 on MNIST, part one: the parameterisations and objectives it ablates, as functions
of a network's output, with their tests (experiments/test_table2.py). The training grid and its
command line come next (issue 29); nothing here is called by ddpm.py.

The reverse process p_theta(x_{t-1} | x_t) = N(mean, var), per dimension, from the network's output:
    param "eps": its first C channels are eps_theta, and the mean is eq. (11);
    param "mu":  they are the mean itself, mu_theta (Table 2's "mu_tilde prediction");
    sigma "beta" or "beta_tilde": var fixed per t (Section 3.2), sigma_1^2 as ddpm.sigma2_choice;
    sigma "learned": its last C channels are log var, a diagonal Sigma_theta(x_t, t) (Table 2);
    sigma "v": Nichol & Dhariwal's (arXiv:2102.09672, eq. 15): log var = v log beta_t +
        (1 - v) log beta_tilde_t, v = (out + 1) / 2 of the last C channels.
Objectives, each a per-image loss in nats per dimension:
    "L": the term of eq. (5) at the image's t (L_{t-1}, or L_0 with this var's sigma_1, eq. 13),
        weighted by 1 / q(t) for t ~ q: an unbiased estimate of sum_t L_{t-1} (L_T has no theta);
    "mse_mu": ||mu_tilde - mu_theta||^2 (Table 2's "||mu_tilde - mu_tilde_theta||^2");
    "simple": ||eps - eps_theta||^2, eq. (14);
    "hybrid": L_simple + lam * T * L_{t-1}, lam = 0.001, with the mean in L_{t-1} detached, so that
        the bound trains only the variance (Nichol & Dhariwal, Section 3.1);
    "min_snr": L_simple weighted by min(SNR_t, gamma) / SNR_t, gamma = 5 (Hang et al. 2023,
        arXiv:2303.09556, for eps-prediction), SNR_t = alpha_bar_t / (1 - alpha_bar_t).
"""

import common  # noqa: F401  (makes ddpm importable)
import torch

import ddpm

GAMMA = 5.0  # Min-SNR-gamma
HYBRID_LAM = 0.001  # L_hybrid = L_simple + lam L_vlb


def eps_from_mu(mu, xt, t, sched):  # eq. (11) solved for eps: the eps whose mean is mu
    beta = ddpm.gather(sched.beta, t, xt)
    alpha = ddpm.gather(sched.alpha, t, xt)
    alpha_bar = ddpm.gather(sched.alpha_bar, t, xt)
    return (xt - alpha.sqrt() * mu) * (1 - alpha_bar).sqrt() / beta


def mean_from_eps(eps, xt, t, sched):  # eq. (11)
    beta = ddpm.gather(sched.beta, t, xt)
    alpha_bar = ddpm.gather(sched.alpha_bar, t, xt)
    return (xt - beta / (1 - alpha_bar).sqrt() * eps) / ddpm.gather(sched.alpha, t, xt).sqrt()


def reverse_process(out, xt, t, sched, param, sigma):
    """(mean, var, eps_theta) of p_theta(x_{t-1} | x_t) from the network's output `out` (C channels,
    or 2 C with a learned sigma); eps_theta is the eps whose eq. (11) mean is `mean`."""
    C = xt.shape[1]
    head, tail = out[:, :C], out[:, C:]
    if param == "eps":
        eps, mean = head, mean_from_eps(head, xt, t, sched)
    else:
        eps, mean = eps_from_mu(head, xt, t, sched), head
    if sigma in ddpm.SIGMA2:
        var = ddpm.gather(ddpm.sigma2_choice(sched, sigma), t, xt).expand_as(xt)
    elif sigma == "learned":
        var = tail.exp()
    else:  # "v": between log beta_t and log beta_tilde_t (beta_tilde_1 clipped to beta_tilde_2)
        v = (tail + 1) / 2
        log_beta = ddpm.gather(sched.beta, t, xt).log()
        log_beta_tilde = ddpm.gather(ddpm.sigma2_choice(sched, "beta_tilde"), t, xt).log()
        var = (v * log_beta + (1 - v) * log_beta_tilde).exp()
    return mean, var, eps


def bound_term(x0, xt, t, mean, var, sched):
    """Each image's term of eq. (5) at its t, nats per dimension, shaped like x0: the KL from
    q(x_{t-1} | x_t, x_0) (eqs. 6-7) to N(mean, var) for t >= 2, and L_0 = -log of x_0's bucket
    under N(mean, var) (eq. 13) for t = 1. x0 on the 8-bit grid, in [-1, 1]."""
    q_mean, q_var = ddpm.q_posterior(x0, xt, t, sched)
    first = (t == 1).view(-1, *[1] * (x0.dim() - 1))
    q_var = torch.where(first, torch.ones_like(q_var), q_var)  # beta_tilde_1 = 0: unused at t = 1
    kl = ddpm.normal_kl(q_mean, q_var.expand_as(x0), mean, var)
    p = ddpm.bucket_probability(x0, mean, var.sqrt()).to(x0.dtype)
    nll = -p.clamp(min=torch.finfo(p.dtype).tiny).log()
    return torch.where(first, nll, kl)


def min_snr_weight(t, sched, gamma=GAMMA):  # min(SNR_t, gamma) / SNR_t, a weight per image
    snr = sched.alpha_bar[t.cpu()] / (1 - sched.alpha_bar[t.cpu()])
    return (snr.clamp(max=gamma) / snr).to(t.device)


def t_proposal(T):  # q(t) on 1..T for the bound's training estimate: ~ t^-1.25, as nll.py's draws
    q = torch.zeros(T + 1, dtype=torch.float64)
    q[1:] = torch.arange(1, T + 1, dtype=torch.float64) ** -1.25
    return q / q.sum()


def draw_t(objective, n, T, generator=None):
    """(t, weight) for n images: "L" draws t ~ t_proposal with weight 1 / q(t), so that the mean of
    weight * L_{t-1} is sum_t L_{t-1}; every other objective draws t uniformly (Algorithm 1)."""
    if objective != "L":
        t = torch.randint(1, T + 1, (n,), generator=generator)
        return t, torch.ones(n, dtype=torch.float64)
    q = t_proposal(T)
    t = torch.multinomial(q, n, replacement=True, generator=generator)
    return t, 1 / q[t]


def loss(objective, out, x0, xt, t, eps, weight, sched, param, sigma):
    """The per-image loss of `objective` (nats per dimension, shaped (B,)) for the network output
    `out` at x_t = q_sample(x0, t, eps); weight from draw_t."""
    mean, var, eps_theta = reverse_process(out, xt, t, sched, param, sigma)
    per_dim = lambda v: v.flatten(1).mean(1)  # noqa: E731
    if objective == "L":
        return weight.to(out.dtype) * per_dim(bound_term(x0, xt, t, mean, var, sched))
    if objective == "mse_mu":
        q_mean, _ = ddpm.q_posterior(x0, xt, t, sched)
        return per_dim((q_mean - mean) ** 2)
    simple = per_dim((eps - eps_theta) ** 2)
    if objective == "simple":
        return simple
    if objective == "min_snr":
        return min_snr_weight(t, sched).to(out.dtype) * simple
    vlb = bound_term(x0, xt, t, mean.detach(), var, sched)  # "hybrid": the bound trains var only
    return simple + HYBRID_LAM * sched.T * per_dim(vlb)


CELLS = {  # Table 2's rows (param, sigma, objective), then the two beyond the paper
    "mu, L, learned Sigma": ("mu", "learned", "L"),
    "mu, L, fixed isotropic Sigma": ("mu", "beta", "L"),
    "mu, ||mu_tilde - mu_theta||^2": ("mu", "beta", "mse_mu"),
    "eps, L, learned Sigma": ("eps", "learned", "L"),
    "eps, L, fixed isotropic Sigma": ("eps", "beta", "L"),
    "eps, L_simple": ("eps", "beta", "simple"),
    "eps, L_hybrid, v-interpolated Sigma": ("eps", "v", "hybrid"),
    "eps, Min-SNR-5 L_simple": ("eps", "beta", "min_snr"),
}


def out_channels(sigma, C):  # the network's output channels for a sigma choice
    return 2 * C if sigma in ("learned", "v") else C

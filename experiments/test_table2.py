"""Tests of experiments/table2.py with known answers: mu-prediction is the eps route in other
coordinates, the training estimate of L is unbiased, a learned Sigma of beta_tilde is the fixed
bound, L_hybrid's bound trains only the variance, and the Min-SNR weight."""

import math

import table2
import torch

import ddpm
from conftest import F64, gen, pixel_grid_image, toy_eps


def gaussian_x0_mean(mu, s, sched):  # E[x_0 | x_t] for data N(mu, s^2): linear in x_t
    def x0_mean(xt, t):
        ab = sched.alpha_bar[t].reshape(-1, *[1] * (xt.dim() - 1))
        return mu + s**2 * ab.sqrt() * (xt - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    return x0_mean


def test_mu_prediction_of_the_exact_posterior_mean_is_the_eps_route_draw_for_draw():
    """Data N(0.5, 0.3^2): the exact mu_tilde(x_t) is q's posterior mean (eqs. 6-7) at E[x_0 | x_t].
    A mu-network returning it, read through reverse_process("mu"), gives Algorithm 2 the eps whose
    mean it is; the samples equal, draw for draw, those of the exact eps of the same data (written
    independently: sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)), and have the data's mean
    and variance (5 standard errors and 3% for the discretisation)."""
    s, n = ddpm.make_schedule("linear", 1000), 20_000
    x0_mean = gaussian_x0_mean(0.5, 0.3, s)

    def mu_model(xt, t):  # what a mu-network would output, then read as Table 2's cells read it
        mu_tilde, _ = ddpm.q_posterior(x0_mean(xt, t), xt, t, s)
        return table2.reverse_process(mu_tilde, xt, t, s, "mu", "beta_tilde")[2]

    def eps_model(xt, t):
        ab = s.alpha_bar[t].reshape(-1, 1)
        return (1 - ab).sqrt() * (xt - ab.sqrt() * 0.5) / (ab * 0.3**2 + 1 - ab)

    x_T = torch.randn(n, 1, generator=gen(0), dtype=F64)
    via_mu = ddpm.sample_ddpm(mu_model, s, x_T.shape, gen(1), x_T=x_T)
    via_eps = ddpm.sample_ddpm(eps_model, s, x_T.shape, gen(1), x_T=x_T)
    assert torch.allclose(via_mu, via_eps, atol=1e-9)
    assert abs(via_mu.mean().item() - 0.5) < 5 * 0.3 / math.sqrt(n)
    assert abs(via_mu.var().item() / 0.3**2 - 1) < 5 * math.sqrt(2 / n) + 0.03


def test_the_training_estimate_of_L_is_unbiased_for_the_sum_of_eq_5():
    """eps-prediction with sigma^2 = beta_tilde, toy_eps, T = 100, one image on the pixel grid,
    20,000 copies each with its own t ~ q(t) and x_t: the mean of the objective "L" (weights
    1 / q(t)) against sum_{t=1}^T L_{t-1} from ddpm.bound_term at every t (its own x_t draws),
    within 5 standard errors. Without the weights the mean misses by far more."""
    s, n = ddpm.make_schedule("linear", 100), 20_000
    x0 = pixel_grid_image((1, 1, 4, 4), 2).expand(n, -1, -1, -1)
    t, w = table2.draw_t("L", n, 100, gen(0))
    eps = torch.randn(x0.shape, generator=gen(1), dtype=F64)
    xt = ddpm.q_sample(x0, t, eps, s)
    cheap = table2.loss("L", toy_eps(xt, t), x0, xt, t, eps, w, s, "eps", "beta_tilde")
    every_t = torch.arange(1, 101).repeat_interleave(200)  # 200 images at each t
    terms, _ = ddpm.bound_term(toy_eps, x0[: len(every_t)], every_t, s, gen(2))
    per_t = terms[0].flatten(1).mean(1).view(100, 200)  # (t, draws): beta_tilde, nats/dim
    full = per_t.mean(1).sum()
    se = math.sqrt(cheap.var() / n + (per_t.var(1) / 200).sum())
    assert abs(cheap.mean() - full) < 5 * se
    unweighted = (cheap / w).mean()  # E_q[L_{t-1}]: a mean over t, not the sum
    assert abs(unweighted - full) > 20 * se


def test_a_learned_sigma_of_beta_tilde_is_the_fixed_beta_tilde_bound():
    """A network whose variance channels output log beta_tilde_t (log beta_tilde_2 at t = 1) gives,
    at every t, the same terms as the fixed sigma^2 = beta_tilde, and both are ddpm.bound_term's
    (an independent code path) for the same x_t."""
    s = ddpm.make_schedule("linear", 1000)
    t = torch.arange(1, 1001)
    x0 = pixel_grid_image((1, 1, 4, 4), 4).expand(1000, -1, -1, -1)
    eps = torch.randn(x0.shape, generator=gen(5), dtype=F64)
    xt = ddpm.q_sample(x0, t, eps, s)
    eps_theta = toy_eps(xt, t)
    log_var = ddpm.gather(ddpm.sigma2_choice(s, "beta_tilde"), t, xt).log().expand_as(xt)
    learned = table2.reverse_process(torch.cat([eps_theta, log_var], 1), xt, t, s, "eps", "learned")
    fixed = table2.reverse_process(eps_theta, xt, t, s, "eps", "beta_tilde")
    a = table2.bound_term(x0, xt, t, *learned[:2], s)
    b = table2.bound_term(x0, xt, t, *fixed[:2], s)
    reference, _ = ddpm.bound_term(toy_eps, x0, t, s, gen(5))  # draws the same eps from gen(5)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)  # exp(log var) is var to rounding
    assert torch.allclose(a, reference[0], rtol=1e-9, atol=1e-12)


def test_l_hybrid_sends_the_bound_s_gradient_to_the_variance_only():
    """L_hybrid = L_simple + lam T L_{t-1} with the mean detached in L_{t-1}: the gradient of the
    difference L_hybrid - L_simple is 0 on the eps channels and not 0 on the variance channels."""
    s = ddpm.make_schedule("linear", 1000)
    x0 = pixel_grid_image((6, 1, 4, 4), 6)
    t = torch.tensor([1, 2, 10, 100, 500, 1000])
    eps = torch.randn(x0.shape, generator=gen(7), dtype=F64)
    xt = ddpm.q_sample(x0, t, eps, s)
    out = (0.1 * torch.randn(6, 2, 4, 4, generator=gen(8), dtype=F64)).requires_grad_()
    w = torch.ones(6, dtype=F64)
    hybrid = table2.loss("hybrid", out, x0, xt, t, eps, w, s, "eps", "v")
    simple = table2.loss("simple", out, x0, xt, t, eps, w, s, "eps", "v")
    (grad,) = torch.autograd.grad((hybrid - simple).sum(), out)
    assert grad[:, :1].abs().max() == 0 and grad[:, 1:].abs().max() > 1e-6


def test_the_v_interpolated_sigma_runs_from_beta_tilde_to_beta():
    """Nichol & Dhariwal's Sigma: out = -1 (v = 0) is beta_tilde_t, out = 1 (v = 1) is beta_t, and
    out = 0 the geometric mean of the two."""
    s = ddpm.make_schedule("linear", 1000)
    t, xt = torch.tensor([2, 50, 999]), torch.zeros(3, 1, 2, 2, dtype=F64)
    bt, b = s.beta_tilde[t].view(-1, 1, 1, 1), s.beta[t].view(-1, 1, 1, 1)
    for v, expected in ((-1.0, bt), (1.0, b), (0.0, (bt * b).sqrt())):
        out = torch.cat([xt, torch.full_like(xt, v)], 1)
        var = table2.reverse_process(out, xt, t, s, "eps", "v")[1]
        assert torch.allclose(var, expected.expand_as(var), rtol=1e-12)


def test_the_min_snr_weight_is_min_of_snr_and_gamma_over_snr():
    """min(SNR_t, 5) / SNR_t: 1 wherever SNR_t <= 5, 5 / SNR_t elsewhere; at t = 1 of the paper's
    schedule SNR_1 = (1 - 1e-4) / 1e-4 = 9999, so the weight is 5 / 9999; it never falls with t."""
    s = ddpm.make_schedule("linear", 1000)
    t = torch.arange(1, 1001)
    w = table2.min_snr_weight(t, s)
    snr = s.alpha_bar[1:] / (1 - s.alpha_bar[1:])
    assert math.isclose(w[0].item(), 5 / 9999, rel_tol=1e-9)
    assert (w[snr <= 5] == 1).all() and torch.allclose(
        (w * snr)[snr > 5], torch.tensor(5.0, dtype=F64)
    )
    assert (w[1:] >= w[:-1]).all() and 0 < (snr > 5).sum() < 1000

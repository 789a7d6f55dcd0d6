"""Tests of experiments/table2.py with known answers: mu-prediction is the eps route in other
coordinates, the training estimate of L is unbiased, a learned Sigma of beta_tilde is the fixed
bound, L_hybrid's bound trains only the variance, and the Min-SNR weight."""

import math
import os

import nll
import numpy as np
import table2
import torch

import ddpm
from conftest import F64, TINY, gen, pixel_grid_image, toy_eps, write_mnist


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
    1 / q(t)) against sum_{t=1}^T L_{t-1} from ddpm.eps_bound_terms at every t (its own x_t),
    within 5 standard errors. Without the weights the mean misses by far more."""
    s, n = ddpm.make_schedule("linear", 100), 20_000
    x0 = pixel_grid_image((1, 1, 4, 4), 2).expand(n, -1, -1, -1)
    t, w = table2.draw_t("L", n, 100, gen(0))
    eps = torch.randn(x0.shape, generator=gen(1), dtype=F64)
    xt = ddpm.q_sample(x0, t, eps, s)
    cheap = table2.loss("L", toy_eps(xt, t), x0, xt, t, eps, w, s, "eps", "beta_tilde")
    every_t = torch.arange(1, 101).repeat_interleave(200)  # 200 images at each t
    terms, _ = ddpm.eps_bound_terms(toy_eps, x0[: len(every_t)], every_t, s, gen(2))
    per_t = terms[0].flatten(1).mean(1).view(100, 200)  # (t, draws): beta_tilde, nats/dim
    full = per_t.mean(1).sum()
    se = math.sqrt(cheap.var() / n + (per_t.var(1) / 200).sum())
    assert abs(cheap.mean() - full) < 5 * se
    unweighted = (cheap / w).mean()  # E_q[L_{t-1}]: a mean over t, not the sum
    assert abs(unweighted - full) > 20 * se


def test_a_learned_sigma_of_beta_tilde_is_the_fixed_beta_tilde_bound_and_eq_12s_weight():
    """A network whose variance channels output log beta_tilde_t (log beta_tilde_2 at t = 1) gives,
    at every t, the same terms as the fixed sigma^2 = beta_tilde, and those are ddpm.py's for the
    eps-model; for t >= 2 they are eq. (12) written out here, beta_t^2 / (2 sigma_t^2 alpha_t
    (1 - alpha_bar_t)) ||eps - eps_theta||^2 a dimension (no variance mismatch at beta_tilde)."""
    s = ddpm.make_schedule("linear", 1000)
    t = torch.arange(1, 1001)
    x0 = pixel_grid_image((1, 1, 4, 4), 4).expand(1000, -1, -1, -1)
    eps = torch.randn(x0.shape, generator=gen(5), dtype=F64)
    xt = ddpm.q_sample(x0, t, eps, s)
    eps_theta = toy_eps(xt, t)
    log_var = ddpm.gather(ddpm.sigma2_choice(s, "beta_tilde"), t, xt).log().expand_as(xt)
    learned = table2.reverse_process(torch.cat([eps_theta, log_var], 1), xt, t, s, "eps", "learned")
    fixed = table2.reverse_process(eps_theta, xt, t, s, "eps", "beta_tilde")
    a = ddpm.bound_term(x0, xt, t, *learned[:2], s)
    b = ddpm.bound_term(x0, xt, t, *fixed[:2], s)
    reference, _ = ddpm.eps_bound_terms(toy_eps, x0, t, s, gen(5))  # the same eps from gen(5)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)  # exp(log var) is var to rounding
    assert torch.allclose(a, reference[0], rtol=1e-9, atol=1e-12)
    beta, alpha, ab = (v[2:].view(-1, 1, 1, 1) for v in (s.beta, s.alpha, s.alpha_bar))
    weight = beta**2 / (2 * s.beta_tilde[2:].view(-1, 1, 1, 1) * alpha * (1 - ab))
    eq_12 = weight * (eps - eps_theta)[1:] ** 2
    assert torch.allclose(a[1:], eq_12, rtol=1e-6, atol=1e-12)


def test_l_hybrid_s_bound_term_is_lam_times_an_unbiased_estimate_of_the_sum_of_eq_5():
    """L_hybrid - L_simple at t ~ U{1..T} is lam T L_{t-1}: its mean over t (every t here, 30 draws
    of x_t each, T = 50) is lam sum_{t=1}^T L_{t-1}, the sum from ddpm.eps_bound_terms at every t
    on the same x_t (v = 0 is sigma^2 = beta_tilde). A weight off by T (lam alone) or by 1/T
    fails by a factor of 50."""
    T, n = 50, 30
    s = ddpm.make_schedule("linear", T)
    t = torch.arange(1, T + 1).repeat_interleave(n)
    x0 = pixel_grid_image((1, 1, 4, 4), 3).expand(len(t), -1, -1, -1)
    eps = torch.randn(x0.shape, generator=gen(6), dtype=F64)
    xt = ddpm.q_sample(x0, t, eps, s)
    out = torch.cat([toy_eps(xt, t), -torch.ones_like(xt)], 1)  # v = 0: beta_tilde
    w = torch.ones(len(t), dtype=F64)
    hybrid = table2.loss("hybrid", out, x0, xt, t, eps, w, s, "eps", "v")
    simple = table2.loss("simple", out, x0, xt, t, eps, w, s, "eps", "v")
    terms, _ = ddpm.eps_bound_terms(toy_eps, x0, t, s, gen(6))  # the same eps from gen(6)
    full_sum = terms[0].flatten(1).mean(1).view(T, n).mean(1).sum()  # sum_t L_{t-1}, nats/dim
    assert torch.isclose((hybrid - simple).mean(), table2.HYBRID_LAM * full_sum, rtol=1e-9)


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


# --- The driver: cells trained, sampled and bounded through ddpm.py's own parts -----------------
def test_the_l_simple_cell_is_ddpm_s_loss_draw_for_draw():
    """cell_loss of "eps, L_simple" is ddpm.loss_fn: the same t, eps and value from the same seed;
    Min-SNR-5's differs from it wherever a t with SNR_t > 5 was drawn."""
    s = ddpm.make_schedule("linear", 1000)
    x0 = pixel_grid_image((8, 1, 4, 4), 9)
    simple = table2.cell_loss("eps", "beta", "simple")(toy_eps, x0, s, gen(3))
    assert torch.allclose(simple.double(), ddpm.loss_fn(toy_eps, x0, s, gen(3)).double(), rtol=1e-6)
    min_snr = table2.cell_loss("eps", "beta", "min_snr")(toy_eps, x0, s, gen(3))
    assert min_snr < 0.9 * simple


def test_a_fixed_sigma_cell_samples_as_ddpm_s_algorithm_2_respaced_or_not():
    """sample_cell with a fixed Sigma, on all T = 50 steps and respaced to 10, equals ddpm.py's
    Algorithm 2 on the same schedule (respaced by sample_ddpm) draw for draw, for sigma^2 =
    beta and beta_tilde; a mu-network outputting eq. (11)'s mean of toy_eps samples the same."""
    s = ddpm.make_schedule("linear", 50)

    def mu_net(xt, t):  # the mean a mu-network would output for toy_eps on the full grid
        return ddpm.p_mean(xt, t, toy_eps(xt, t), s)

    for steps, sigma in ((None, "beta_tilde"), (10, "beta_tilde"), (10, "beta")):
        expected = ddpm.sample_ddpm(toy_eps, s, (6, 1, 2, 2), gen(4), steps, sigma2=sigma)
        for param, net in (("eps", toy_eps), ("mu", mu_net)):
            x = table2.sample_cell(net, s, (6, 1, 2, 2), gen(4), param, sigma, steps)
            assert torch.allclose(x.double(), expected.double(), atol=1e-5)


def test_step_variance_keeps_a_learned_variance_and_carries_its_place_to_a_respaced_step():
    """On the full grid a variance between beta_tilde_t and beta_t is itself; respaced, its place
    v (log-linear) is kept between the respaced beta_tilde and beta; outside, it is clamped."""
    s = ddpm.make_schedule("linear", 1000)
    sub, tau = ddpm.respace(s, 10)
    i = torch.tensor([2, 5, 9])
    t = tau[i]
    shape = (3, 1, 1, 1)
    lo, hi = (ddpm.sigma2_choice(x, "beta_tilde") for x in (s, sub))
    var = (0.3 * s.beta[t].log() + 0.7 * lo[t].log()).exp().view(shape)
    assert torch.allclose(table2.step_variance(var, t, t, s, s), var, rtol=1e-9)
    carried = (0.3 * sub.beta[i].log() + 0.7 * hi[i].log()).exp().view(shape)
    assert torch.allclose(table2.step_variance(var, t, i, s, sub), carried, rtol=1e-6)
    too_big = table2.step_variance(2 * s.beta[t].view(shape), t, i, s, sub)
    assert torch.allclose(too_big, sub.beta[i].view(shape), rtol=1e-9)


def test_the_cell_bound_agrees_with_nll_py_s_full_sum():
    """table2.bound_pass (k = 4 draws of t, L_T and L_0) of an eps-cell with toy_eps against
    nll.bound_pass over every t (another code path), 1,000 copies of one image, T = 100: the mean
    bound under each fixed sigma^2 agrees within 5 standard errors."""
    sched = ddpm.make_schedule("linear", 100)
    x0 = pixel_grid_image((1, 1, 4, 4), 1).expand(1000, -1, -1, -1)
    cheap = table2.bound_pass(toy_eps, x0, sched, "eps", ddpm.SIGMA2, 4, gen(0))
    cheap = cheap.sum(1).flatten(2).sum(2)  # (2 sigma^2, n) nats
    L_T, kl, l0, _ = nll.bound_pass(lambda i: toy_eps, x0, sched, None, gen(1))
    full = (L_T + kl + l0).flatten(2).sum(2)
    for a, b in zip(cheap, full):
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 5 * se


def test_table2_trains_resumes_samples_and_bounds_a_cell_or_fails_in_one_line(tmp_path, capsys):
    """The command line: a tiny L_hybrid cell (two output channels) trains, resumes as its own cell,
    samples a .npz, prints its bound; the checkpoint names its cell. A checkpoint of ddpm.py's own
    here, a cell given to ddpm.py sample or nll.py, --steps beyond T: one line and exit code 2."""
    write_mnist(tmp_path)
    d, ckpt = str(tmp_path), str(tmp_path / "cell.pt")
    train = ["train", "--data-dir", d, "--no-cond", "--out", ckpt, *TINY]
    assert table2.main([*train, "--cell", "eps_hybrid_v", "--steps", "2"]) == 0
    assert table2.main([*train, "--resume", ckpt, "--steps", "3"]) == 0
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3 and state["config"]["train"]["cell"] == "eps_hybrid_v"
    assert state["config"]["model"]["out_ch"] == 2
    npz = str(tmp_path / "x.npz")
    assert table2.main(["sample", "--ckpt", ckpt, "--n", "3", "--steps", "5", "--out", npz]) == 0
    assert np.load(npz)["images"].shape == (3, 1, 32, 32)
    assert table2.main(["bound", "--ckpt", ckpt, "--data-dir", d, "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "Sigma v" in out and "pixel of the original image (784" in out
    plain = str(tmp_path / "plain.pt")
    assert ddpm.main(["train", "--data-dir", d, "--steps", "1", "--out", plain, *TINY]) == 0
    keep = str(tmp_path / "keep.png")
    for main, argv in (  # a plain checkpoint here, a cell elsewhere, steps beyond T
        (table2.main, ["bound", "--ckpt", plain, "--data-dir", d]),
        (table2.main, ["sample", "--ckpt", ckpt, "--steps", "21"]),
        (ddpm.main, ["sample", "--ckpt", ckpt, "--out", keep]),
        (nll.main, ["--ckpt", ckpt, "--data-dir", d]),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_likelihood_model_beside_the_shipped_one_loads_as_its_cell_and_samples(
    tmp_path, capsys
):
    """samples/eps_L_v.pt (README's likelihood run: EMA weights in fp32, so that its bound on the
    test split reproduces exactly) is the eps_L_v cell at step 44,963, within the 8 MB budget, and
    table2.py samples from it; ddpm.py's own sample refuses it in one line."""
    path = "samples/eps_L_v.pt"
    assert os.path.getsize(path) <= 8_000_000
    state = torch.load(path, weights_only=True)
    assert state["config"]["train"]["cell"] == "eps_L_v" and state["step"] == 44963
    assert "opt" not in state and state["ema"]["conv_out.weight"].dtype == torch.float32
    npz = str(tmp_path / "x.npz")
    assert table2.main(["sample", "--ckpt", path, "--n", "2", "--steps", "3", "--out", npz]) == 0
    assert np.load(npz)["images"].shape == (2, 1, 32, 32)
    capsys.readouterr()
    assert ddpm.main(["sample", "--ckpt", path, "--n", "2", "--steps", "3", "--out", npz]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

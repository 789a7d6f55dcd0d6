"""Tests of experiments/experts.py with known answers: at t0 = 0 and t0 = T the two-expert process
is each model alone, draw for draw and term for term; in between, each term is the right expert's;
the command line samples, bounds and plots, and refuses a wrong expert in one line."""

import math
import os

import experts
import nll
import numpy as np
import table2
import torch

import ddpm
from conftest import F64, TINY, gen, pixel_grid_image


def gaussian_eps(mu, s, sched):  # the exact eps of data N(mu, s^2), as in test_ddpm.py
    def eps_model(xt, t):
        ab = sched.alpha_bar[t].reshape(-1, *[1] * (xt.dim() - 1))
        return (1 - ab).sqrt() * (xt - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    return eps_model


def likelihood_net(sched, v):  # a table2 "eps, v" network: Gaussian data's eps, then v's channel
    eps = gaussian_eps(-0.2, 0.6, sched)

    def net(xt, t):
        return torch.cat([eps(xt, t), torch.full_like(xt, v)], 1)

    return net


def test_at_t0_0_and_t0_T_the_samples_are_each_model_alone_draw_for_draw():
    """t0 = 0: Algorithm 2 of the shipped expert (ddpm.sample_ddpm, sigma^2 = beta_tilde),
    respaced or not; t0 = T: table2.sample_cell of the likelihood expert; in between, neither."""
    s = ddpm.make_schedule("linear", 50)
    shipped, lik = gaussian_eps(0.5, 0.3, s), likelihood_net(s, 0.3)
    shape = (4, 1, 2, 2)
    for steps in (None, 10):
        alone = ddpm.sample_ddpm(shipped, s, shape, gen(1), steps, sigma2="beta_tilde")
        x = experts.sample_experts(shipped, lik, 0, s, shape, gen(1), steps)
        assert torch.allclose(x, alone, atol=1e-12, rtol=0)
        alone = table2.sample_cell(lik, s, shape, gen(1), "eps", "v", steps)
        x = experts.sample_experts(shipped, lik, 50, s, shape, gen(1), steps)
        assert torch.allclose(x, alone, atol=1e-12, rtol=0)
        mixed = experts.sample_experts(shipped, lik, 25, s, shape, gen(1), steps)
        assert (mixed - x).abs().max() > 1e-3 and (mixed - alone).abs().max() > 1e-3


def reference_terms(shipped, lik, x0, s, k, seed):
    """Each expert's terms from the same draws as experts.bound_pass, by other code paths: the
    shipped expert's from ddpm.eps_bound_terms (sigma^2 = beta_tilde, row 0), the likelihood
    expert's from table2.bound_pass; nats per image."""
    g = gen(seed)
    t, w = nll.draw_steps(s.T, len(x0), k, g)
    cols = [ddpm.eps_bound_terms(shipped, x0, t[:, c], s, g)[0][0] for c in range(k)]
    shipped_kl = torch.stack([c.flatten(1).sum(1) for c in cols], 1) * w
    shipped_l0 = ddpm.eps_bound_terms(shipped, x0, torch.ones(len(x0), dtype=torch.long), s, g)
    lik_terms = table2.bound_pass(lik, x0, s, "eps", ("v",), k, gen(seed))[0].flatten(2).sum(2)
    return t, shipped_kl, shipped_l0[0][0].flatten(1).sum(1), lik_terms  # lik: L_T, sum, L_0


def test_the_bound_at_t0_0_and_t0_T_is_each_model_alone_and_between_each_term_the_right_one():
    """Gaussian experts, T = 50, 300 images on the pixel grid, 4 draws of t each: the composite at
    t0 = 0 is L_T + the shipped expert's terms and L_0 + -log p(y); at t0 = T the likelihood
    expert's whole bound; at t0 = 20 it differs from t0 = T by the shipped-minus-likelihood terms of
    exactly the draws with t > 20."""
    s, k = ddpm.make_schedule("linear", 50), 4
    shipped, lik = gaussian_eps(0.5, 0.3, s), likelihood_net(s, 0.3)
    x0 = pixel_grid_image((300, 1, 2, 2), 7)
    t, terms, l0, LT = experts.bound_pass(lambda i: shipped, lik, x0, s, k, gen(3))
    t_ref, shipped_kl, shipped_l0, lik_terms = reference_terms(shipped, lik, x0, s, k, 3)
    assert torch.equal(t, t_ref)
    minus_log_p_y = torch.full((300,), 0.1, dtype=F64)
    at_0 = experts.composite(t, terms, l0, LT, minus_log_p_y, 0, s.T)
    expected = lik_terms[0] + shipped_kl.sum(1) + shipped_l0 + 0.1  # L_T is neither expert's
    assert torch.allclose(at_0, expected, rtol=1e-9)
    at_T = experts.composite(t, terms, l0, LT, minus_log_p_y, s.T, s.T)
    assert torch.allclose(at_T, lik_terms.sum(0), rtol=1e-9)  # no label drawn: no -log p(y)
    at_20 = experts.composite(t, terms, l0, LT, minus_log_p_y, 20, s.T)
    above = t > 20
    assert 0 < above.sum() < above.numel()
    lik_kl = terms[1]
    change = ((shipped_kl - lik_kl) * above).sum(1) + 0.1
    assert torch.allclose(at_20 - at_T, change, rtol=1e-9, atol=1e-9)


def test_experts_samples_bounds_and_plots_and_refuses_a_wrong_expert_in_one_line(
    trained, tmp_path, capsys
):
    """The command line on tiny models (T = 20): a tiny eps_L_v cell as the likelihood expert, the
    tiny conditional model as the shipped one; a .npz of samples, the bound's rows for each t0 and
    its picture; the experts swapped, or a t0 beyond T: one line and exit code 2."""
    d, shipped = trained
    lik = str(tmp_path / "lik.pt")
    train = ["train", "--cell", "eps_L_v", "--data-dir", str(d), "--no-cond", "--out", lik]
    assert table2.main([*train, "--steps", "2", *TINY]) == 0
    pair = ["--shipped", shipped, "--likelihood", lik]
    npz = str(tmp_path / "e.npz")
    sample = ["sample", *pair, "--n", "3", "--steps", "5", "--out", npz]
    assert experts.main([*sample, "--t0", "5"]) == 0
    assert np.load(npz)["images"].shape == (3, 1, 32, 32)
    png = str(tmp_path / "sweep.png")
    bound = ["bound", *pair, "--data-dir", str(d), "--n", "6", "--t0s", "0,5,20", "--plot", png]
    capsys.readouterr()
    assert experts.main(bound) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.strip()[:2] in ("0 ", "5 ", "20")]
    assert len(rows) == 3 and os.path.getsize(png) > 1000
    for argv in (
        ["sample", "--shipped", lik, "--likelihood", shipped, "--out", npz],
        ["sample", "--shipped", shipped, "--likelihood", shipped, "--out", npz],
        [*sample, "--t0", "21"],
    ):
        assert experts.main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not math.isnan(np.load(npz)["images"].mean())

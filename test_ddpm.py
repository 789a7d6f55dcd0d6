"""The proof that ddpm.py is the papers' math, in ddpm.py's order. Identities are checked between
two code paths, samplers against oracles that know the true noise (checking what the oracle does
not make true by construction: every intermediate x_t, each step's variance), statistics with
tolerances derived from the sample size. No network, no real data set: the tests write tiny files
of their own in each format, so torchvision's real loading code runs. conftest.py holds what this
file and the experiments' tests (experiments/test_*.py) share.

Index: each part of the papers and the tests that check it ("test_" left out).
DDPM eq. (2), the schedule: schedule_identities, linear_schedule_is_the_papers,
    cosine_alpha_bar_is_its_closed_form_where_beta_is_not_capped
DDPM eq. (4), q(x_t | x_0): q_sample_has_the_forward_marginal, gather_broadcasts_for_any_rank
DDPM eqs. (6)-(7), (11), (15), the posterior and x0_hat: schedule_identities (beta_tilde),
    posterior_mean_through_x0_equals_eq_11, ddpm_trajectory_follows_the_posterior_route_step_by_step
DDPM eq. (14) and Algorithm 1: loss_of_the_oracle_is_zero_and_of_the_zero_model_is_one,
    loss_draws_t_uniformly_from_1_to_T, the_update_is_the_gradient_clipped_to_norm_1,
    a_non_finite_loss_skips_the_update, bf16_loss_and_gradients_stay_close_to_fp32,
    fp16_loss_scaling_skips_overflowing_steps_then_trains, and end to end
    trained_samplers_land_on_the_roll_and_broken_ones_do_not
EMA (DDPM Appendix B, with a warm-up): ema_of_a_changing_weight_is_its_closed_form,
    ema_warm_up_follows_its_closed_form
DDPM eqs. (5), (13), the bound:
    with_the_exact_noise_every_kl_is_the_variance_mismatch_and_l0_a_bucket,
    the_decoders_256_bucket_probabilities_sum_to_one,
    prior_kl_is_the_kl_of_q_x_T_from_the_standard_normal; the importance-sampled estimator and the
    rate: experiments/test_nll.py
DDPM Table 2, its parameterisations, objectives and learned variances: experiments/test_table2.py
DDPM Algorithm 2, both sigma_t^2 of Section 3.2:
    each_step_of_algorithm_2_adds_noise_of_variance_sigma_t_squared,
    ddpm_first_step_adds_noise_of_variance_sigma_T_squared,
    ddpm_with_the_true_noise_steps_through_the_posterior_of_x0_and_returns_it,
    ddpm_turns_noise_into_gaussian_data, samples_land_on_the_data_points_with_their_frequencies
DDIM Section 4.2, the sub-sequence: ddim_timesteps, ddim_makes_exactly_steps_model_calls
DDIM eq. (12) at eta = 0:
    ddim_at_eta_0_keeps_every_x_t_on_the_line_of_x0_and_the_encoder_lands_on_it,
    ddim_error_shrinks_as_steps_grow, ddim_on_the_full_grid_matches_gaussian_data
DDIM eq. (16): each_ddim_step_adds_noise_of_the_variance_of_eq_16,
    ddim_with_the_true_noise_takes_every_step_of_eq_12_and_returns_x0; eta = 1 on the full grid
    is beta_tilde:
    ddim_eta_1_on_the_full_grid_has_the_posterior_variance (the identity),
    algorithm_2_on_the_respaced_schedule_is_ddim_at_eta_1 (the samplers, draw for draw)
DDIM Table 1's sigma_hat (Algorithm 2 respaced):
    algorithm_2_on_the_respaced_schedule_is_ddim_at_eta_1,
    algorithm_2_with_fewer_steps_is_algorithm_2_on_the_sub_sequence,
    sample_ddpm_with_fewer_steps_is_algorithm_2_on_the_sub_sequence
DDIM eq. (14) and Section 5.4, encoding:
    ddim_at_eta_0_keeps_every_x_t_on_the_line_of_x0_and_the_encoder_lands_on_it,
    refined_encoding_inverts_ddim_on_gaussian_data_and_the_papers_does_not,
    the_encoder_maps_gaussian_data_to_a_standard_normal_x_T,
    the_reconstruction_error_shrinks_as_steps_grow_and_refining_cuts_it;
    experiments/test_reconstruct.py
DDIM Section 5.3, slerp: slerp_returns_the_endpoints_and_keeps_a_shared_norm;
    experiments/test_interpolate.py
DDPM Section 4.4, the mix: ddpm_mix_is_affine_in_lam_and_each_end_decodes_its_own_image,
    ddpm_mix_decodes_from_t_and_at_the_ends_is_the_image_it_noised
The eps-networks (DDPM Appendix B): unet_keeps_the_shape, unet_uses_each_samples_own_t,
    the_unet_computes_the_architecture_it_describes,
    the_shipped_weights_still_denoise_the_digits_they_drew, mlp_keeps_the_shape_and_uses_t
DPM-Solver++(2M): dpm_timesteps_are_distinct_from_T_to_1_and_even_in_lambda,
    dpm_solver_with_the_true_noise_keeps_every_x_t_on_the_line_of_x0,
    dpm_solver_keeps_gaussian_data_better_than_ddim_at_the_same_calls
Classifier-free guidance: label_dropout_happens_at_the_stated_rate,
    guidance_is_linear_in_w_and_one_batched_call_equals_two,
    guided_sampling_lands_on_the_asked_class_and_unguided_on_both; the label draw:
    drawn_labels_match_the_stored_frequencies_to_within_one,
    each_drawn_label_is_distributed_as_the_stored_frequencies,
    unconditional_samples_of_a_conditional_net_draw_labels_from_the_training_frequencies
Clipping x0_hat (Ho et al.'s code): clipped_x0_is_ho_et_al_s_route_clip_then_posterior_mean,
    clipped_samples_of_every_sampler_lie_in_the_data_range,
    sample_clips_x0_of_images_unless_told_not_to
The machinery (data, files, checkpoints, several processes) and the command line: the last two
    sections; experiments_use_the_stated_api_of_ddpm_py_and_all_of_it,
    every_name_in_ddpm_py_is_defined_before_it_is_used.
"""

import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

import ddpm
from conftest import (
    TINY,
    cli,
    fails_in_one_line,
    gen,
    oracle_eps,
    pixel_grid_image,
    spy_on_labels,
    toy_eps,
    write_mnist,
)

# -------------------------------------------------------------------------------------------------
# The schedule and the forward process: DDPM eqs. (2), (4), (6), (7), (11)


F64 = torch.float64


kinds = st.sampled_from(["linear", "cosine"])


@settings(deadline=None, max_examples=60)
@given(kind=kinds, T=st.integers(2, 2000))
@example(kind="linear", T=1000)
def test_schedule_identities(kind, T):
    s = ddpm.make_schedule(kind, T)
    ab = s.alpha_bar
    assert s.beta.dtype == F64 and len(ab) == T + 1 and ab[0] == 1 and s.beta[0] == 0
    assert (ab[1:] < ab[:-1]).all() and (ab[1:] > 0).all()  # strictly decreasing in (0, 1]
    assert ab[T] < 1e-2  # the last step is (nearly) pure noise, where sampling starts
    assert torch.allclose(s.alpha[1:] * (1 - ab[:-1]) + s.beta[1:], 1 - ab[1:], rtol=0, atol=1e-12)
    assert (s.beta_tilde[1:] <= s.beta[1:] * (1 + 1e-12)).all()
    assert s.beta_tilde[1] == 0  # q(x_0 | x_1, x_0) has no variance


def test_linear_schedule_is_the_papers():
    s = ddpm.make_schedule("linear", 1000)
    np.testing.assert_allclose(s.beta[1:].numpy(), np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    assert math.isclose(
        s.alpha_bar[1000].item(),
        math.prod(1 - b for b in np.linspace(1e-4, 0.02, 1000)),
        rel_tol=1e-9,
    )


@settings(deadline=None, max_examples=40)
@given(T=st.integers(2, 2000))
def test_cosine_alpha_bar_is_its_closed_form_where_beta_is_not_capped(T):
    s = ddpm.make_schedule("cosine", T)
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    capped = (s.beta[1:] >= 0.999).nonzero()
    # after the first capped beta, alpha_bar departs from f
    last = capped[0].item() if len(capped) else T
    for t in range(last + 1):
        assert math.isclose(s.alpha_bar[t].item(), f[t] / f[0], rel_tol=1e-9, abs_tol=1e-15)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_gather_broadcasts_for_any_rank(rank):
    a = torch.arange(11, dtype=F64) * 0.5
    t = torch.tensor([3, 0, 10])
    x = torch.zeros(3, *[2] * (rank - 1), dtype=torch.float32)
    g = ddpm.gather(a, t, x)
    assert g.shape == (3,) + (1,) * (rank - 1) and g.dtype == torch.float32
    for i in range(3):
        assert ((g * torch.ones_like(x))[i] == a[t[i]].item()).all()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("t", [1, 250, 999])
def test_q_sample_has_the_forward_marginal(kind, t):
    s, N = ddpm.make_schedule(kind, 1000), 200_000
    x0 = torch.tensor([-1.0, 0.3, 2.0], dtype=F64)
    eps = torch.randn(N, 3, generator=torch.Generator().manual_seed(t), dtype=F64)
    xt = ddpm.q_sample(x0.expand(N, 3), torch.full((N,), t), eps, s)
    var = 1 - s.alpha_bar[t].item()
    # 5 standard errors: sd of the mean is sqrt(var / N), of the sample variance var * sqrt(2 / N)
    assert torch.allclose(xt.mean(0), s.alpha_bar[t].sqrt() * x0, atol=5 * math.sqrt(var / N))
    assert torch.allclose(
        xt.var(0), torch.full((3,), var, dtype=F64), atol=5 * var * math.sqrt(2 / N)
    )


@settings(deadline=None, max_examples=60)
@given(kind=kinds, T=st.integers(2, 1000), data=st.data())
@example(kind="linear", T=1000, data=None)
def test_posterior_mean_through_x0_equals_eq_11(kind, T, data):
    s = ddpm.make_schedule(kind, T)
    step = data.draw(st.integers(1, T)) if data else 1000
    g = torch.Generator().manual_seed(step)
    xt, eps = (
        torch.randn(4, 1, 3, 3, generator=g, dtype=F64),
        torch.randn(4, 1, 3, 3, generator=g, dtype=F64),
    )
    t = torch.full((4,), step)
    mean, var = ddpm.q_posterior(ddpm.predict_x0(xt, t, eps, s), xt, t, s)  # eqs. (15), (7)
    eq11 = (xt - s.beta[step] / (1 - s.alpha_bar[step]).sqrt() * eps) / s.alpha[step].sqrt()
    assert torch.allclose(mean, eq11, rtol=1e-9, atol=1e-9 / s.alpha_bar[step].sqrt().item())
    assert (var == s.beta_tilde[step]).all()


# -------------------------------------------------------------------------------------------------
# Algorithm 1: the loss of eq. (14), the step, the EMA


def test_loss_of_the_oracle_is_zero_and_of_the_zero_model_is_one():
    s = ddpm.make_schedule("linear", 1000)
    x0 = torch.rand(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    g = torch.Generator().manual_seed(1)
    assert ddpm.loss_fn(oracle_eps(x0, s), x0, s, g).item() < 1e-20
    n = x0.numel()  # mean of n squared standard normals: 1 +- sqrt(2 / n)
    assert abs(
        ddpm.loss_fn(lambda xt, t: torch.zeros_like(xt), x0, s, g).item() - 1
    ) < 5 * math.sqrt(2 / n)


def test_loss_draws_t_uniformly_from_1_to_T():
    T, N = 5, 50_000
    seen = []
    s = ddpm.make_schedule("linear", T)

    def record(xt, t):
        seen.append(t)
        return torch.zeros_like(xt)

    ddpm.loss_fn(record, torch.zeros(N, 1), s, torch.Generator().manual_seed(0))
    counts = torch.bincount(seen[0], minlength=T + 2).tolist()
    assert counts[0] == 0 and counts[T + 1] == 0  # t = 0 is data, not a step; T is trained
    sd = math.sqrt(N * (1 / T) * (1 - 1 / T))
    assert all(abs(c - N / T) < 5 * sd for c in counts[1 : T + 1])


def test_ema_of_a_changing_weight_is_its_closed_form():
    """A weight that is n + 1 at update n, from EMA weights 0: after k updates the EMA is
    sum_n (1 - d_n) (n + 1) prod_{m > n} d_m, d_n = min(decay, (1 + n) / (10 + n)), written here
    as the weighted sum it is, not the recursion the code runs. Decay 0.8: the warm-up governs the
    first 26 updates, the decay the rest. Any convex average keeps a constant weight constant; only
    this one gives these numbers (inverted, the decay fails at the second update)."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = ddpm.EMA(model, 0.8)
    with torch.no_grad():
        ema.model.weight.zero_()
    for k in range(1, 41):
        with torch.no_grad():
            model.weight.fill_(k)  # update n = k - 1 sees the weight n + 1
        ema.update(model)
        d = [min(0.8, (1 + n) / (10 + n)) for n in range(k)]
        expected = sum((1 - d[n]) * (n + 1) * math.prod(d[n + 1 :]) for n in range(k))
        assert math.isclose(ema.model.weight.item(), expected, rel_tol=1e-5), k


def test_ema_warm_up_follows_its_closed_form():
    """With EMA weights 0 and model weights 1, k updates give 1 - prod_{n<k} d_n, and the warm-up
    product prod (1 + n) / (10 + n) telescopes to 1 / C(k + 9, 9)."""
    model = ddpm.UNet(1, ch=8, ch_mult=(1,), n_res=1)
    ema = ddpm.EMA(model, 0.9999)
    with torch.no_grad():
        for e, p in zip(ema.model.parameters(), model.parameters()):
            e.zero_()
            p.fill_(1)
    for k in range(1, 31):
        ema.update(model)
        w = next(ema.model.parameters())
        assert torch.allclose(w, torch.full_like(w, 1 - 1 / math.comb(k + 9, 9)), atol=1e-6)
    ema.n, ema.decay = 10_000, 0.9  # long after warm-up, the decay is the one asked for
    with torch.no_grad():
        for e in ema.model.parameters():
            e.zero_()
    ema.update(model)
    assert torch.allclose(next(ema.model.parameters()), torch.tensor(0.1), atol=1e-6)


def test_a_non_finite_loss_skips_the_update():
    model = ddpm.UNet(1, ch=8, ch_mult=(1,), n_res=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.clone() for p in model.parameters()]
    x0 = torch.zeros(2, 1, 8, 8)
    x0[0, 0, 0, 0] = float("nan")
    ema = ddpm.EMA(model, 0.9)
    assert ddpm.train_step(model, ema, opt, x0, ddpm.make_schedule("linear", 10)) is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(not s for s in opt.state.values())  # AdamW's moments untouched too
    assert ema.n == 0  # and the EMA
    x0 = torch.zeros(2, 1, 8, 8)
    assert ddpm.train_step(model, ema, opt, x0, ddpm.make_schedule("linear", 10))
    assert not torch.equal(before[0], next(model.parameters()))  # a finite batch does update
    assert ema.n == 1


class Affine(torch.nn.Module):  # eps_theta = scale * (w x_t + b): a gradient as large as asked
    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.w = torch.nn.Parameter(torch.ones(1, 3, 1, 1))
        self.b = torch.nn.Parameter(torch.full((1, 3, 1, 1), 0.5))

    def forward(self, xt, t, y=None):
        return self.scale * (self.w * xt + self.b)


@pytest.mark.parametrize("scale", [1e-3, 1e4])
def test_the_update_is_the_gradient_clipped_to_norm_1(scale):
    """With SGD at lr 1 the update is minus the gradient train_step hands to the optimizer: the
    true gradient (autograd, same t and eps) if its norm is under 1, else scaled to norm 1."""
    sched = ddpm.make_schedule("linear", 100)
    x0 = torch.rand(8, 3, 4, 4, generator=gen(0)) * 2 - 1
    net = Affine(scale)
    loss = ddpm.loss_fn(net, x0, sched, gen(1))
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    ddpm.train_step(
        net, ddpm.EMA(net, 0.9), torch.optim.SGD(net.parameters(), lr=1.0), x0, sched, gen(1)
    )
    update = before - torch.cat([p.detach().flatten() for p in net.parameters()])
    if scale < 1:
        assert grad.norm() < 1 and torch.allclose(update, grad, rtol=1e-4)
    else:
        assert grad.norm() > 1e3 and torch.allclose(update, grad / grad.norm(), rtol=1e-4)


def test_bf16_loss_and_gradients_stay_close_to_fp32():
    """Same batch, same t and eps, fp32 and bf16 autocast. bf16 keeps 8 significant bits (unit
    roundoff 2^-9 = 0.2%) and autocast accumulates in fp32, so the loss should agree to a few
    roundoffs and the gradient to about 1% (measured: loss 1e-4, gradient 0.4-0.6% relative, widths
    8-32). Allowed: 1% and 3%. The weights and the gradients themselves stay fp32: autocast only
    casts the inputs of each matmul/conv."""
    torch.manual_seed(0)
    model, s = ddpm.UNet(1, ch=16, ch_mult=(1, 2), n_res=1), ddpm.make_schedule("linear", 1000)
    x0, out = torch.rand(16, 1, 16, 16) * 2 - 1, {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with ddpm.autocast(torch.device("cpu"), precision):
            loss = ddpm.loss_fn(model, x0, s, torch.Generator().manual_seed(0))
        loss.backward()
        out[precision] = loss, torch.cat([p.grad.flatten() for p in model.parameters()])
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    assert l16.dtype == g16.dtype == torch.float32 and all(
        p.dtype == torch.float32 for p in model.parameters()
    )
    assert abs(l16.item() - l32.item()) < 0.01 * l32.item()
    assert (g16 - g32).norm() < 0.03 * g32.norm()
    # and autocast really is on: the network's output is bf16
    with ddpm.autocast(torch.device("cpu"), "bf16"):
        assert model(x0, torch.ones(16, dtype=torch.long)).dtype == torch.bfloat16


def test_fp16_loss_scaling_skips_overflowing_steps_then_trains():
    """fp16 (for GPUs without bf16; run on the CPU here): with a loss scale far too large the scaled
    gradients overflow, train_step skips the update and GradScaler halves the scale, until steps go
    through."""
    torch.manual_seed(0)
    model, s = ddpm.UNet(1, ch=8, ch_mult=(1, 2), n_res=1), ddpm.make_schedule("linear", 100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    before, x0 = [p.clone() for p in model.parameters()], torch.rand(8, 1, 16, 16) * 2 - 1
    losses = [
        ddpm.train_step(
            model,
            ddpm.EMA(model, 0.9),
            opt,
            x0,
            s,
            torch.Generator().manual_seed(i),
            None,
            ddpm.loss_fn,
            (ddpm.autocast(torch.device("cpu"), "fp16"), scaler),
        )
        for i in range(20)
    ]
    skipped = losses.index(next(v for v in losses if v is not None))
    assert (
        skipped > 0
        and all(v is None for v in losses[:skipped])
        and all(v is not None for v in losses[skipped:])
    )
    assert scaler.get_scale() < 2.0**30
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -------------------------------------------------------------------------------------------------
# The bound: eq. (5)'s terms and the decoder of eq. (13)


def test_with_the_exact_noise_every_kl_is_the_variance_mismatch_and_l0_a_bucket():
    """One image on the pixel grid and its exact eps (oracle_eps): p_theta's mean is the
    posterior's, so under sigma^2 = beta_tilde every L_{t-1} is 0, under beta it is
    1/2 (r - 1 - log r) a dimension with r = beta_tilde / beta; and L_0 is the probability of
    x_0's bucket under N(x_0, sigma_1^2): erf(1 / (255 sqrt(2) sigma_1)), (1 + that) / 2 at the
    edges."""
    sched = ddpm.make_schedule("linear", 1000)
    x0 = pixel_grid_image((1, 4, 4), 0)
    t = torch.arange(1, 1001)
    x0_all = x0.expand(1000, -1, -1, -1)
    terms, x0_hat = ddpm.eps_bound_terms(oracle_eps(x0, sched), x0_all, t, sched)
    assert torch.allclose(x0_hat, x0.expand_as(x0_hat), atol=1e-9)
    tilde, beta = terms[0, 1:], terms[1, 1:]  # t = 2..T
    assert tilde.abs().max() < 1e-9
    r = (sched.beta_tilde[2:] / sched.beta[2:]).view(-1, 1, 1, 1)
    assert torch.allclose(beta, (0.5 * (r - 1 - r.log())).expand_as(beta), rtol=1e-6)
    for row, sigma_1 in ((0, sched.beta_tilde[2].sqrt()), (1, sched.beta[1].sqrt())):
        inner = math.erf(1 / (255 * math.sqrt(2) * sigma_1))
        edge = (1 + inner) / 2
        edges = (x0.abs() == 1)[0]
        p = torch.exp(-terms[row, 0, 0])
        assert torch.allclose(p[edges], torch.tensor(edge, dtype=F64), rtol=1e-9)
        assert torch.allclose(p[~edges], torch.tensor(inner, dtype=F64), rtol=1e-9)


@settings(deadline=None, max_examples=60)
@given(mean=st.floats(-3, 3), sigma=st.floats(1e-3, 3))
@example(mean=0.0, sigma=float(ddpm.make_schedule("linear", 1000).beta_tilde[2].sqrt()))
def test_the_decoders_256_bucket_probabilities_sum_to_one(mean, sigma):
    x0 = torch.arange(256, dtype=F64) / 127.5 - 1
    p = ddpm.bucket_probability(x0, torch.full_like(x0, mean), sigma)
    assert (p >= 0).all() and abs(p.sum().item() - 1) < 1e-9


def test_prior_kl_is_the_kl_of_q_x_T_from_the_standard_normal():
    """L_T = KL(N(sqrt(ab_T) x_0, 1 - ab_T) || N(0, 1)) = (v + m^2 - 1 - log v) / 2 a dimension,
    v = 1 - ab_T, m = sqrt(ab_T) x_0: checked where it is not ~0, five steps of beta = 0.1
    (ab_T = 0.59)."""
    s = ddpm.schedule_of(torch.full((5,), 0.1, dtype=F64))
    x0 = pixel_grid_image((2, 1, 4, 4), 3)
    v, m = 1 - s.alpha_bar[5], s.alpha_bar[5].sqrt() * x0
    assert 0.5 < s.alpha_bar[5] < 0.7
    assert torch.allclose(ddpm.prior_kl(x0, s), 0.5 * (v + m**2 - 1 - v.log()), rtol=1e-12)


# -------------------------------------------------------------------------------------------------
# Algorithm 2, against the exact noise and against data whose optimal eps is known in closed form


def test_ddpm_trajectory_follows_the_posterior_route_step_by_step():
    """Each step of Algorithm 2 (line 4, eq. 11) is the other route, x0_hat (eq. 15) then the
    posterior mean of eq. (7), plus sigma_t z with the same z: replayed here from the generator's
    stream."""
    s = ddpm.make_schedule("linear", 200)
    x_T = torch.randn(3, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    _, xs = ddpm.sample_ddpm(
        toy_eps, s, x_T.shape, torch.Generator().manual_seed(2), x_T=x_T, trajectory=True
    )
    assert len(xs) == 201
    g = torch.Generator().manual_seed(2)
    for step, (xt, x_prev) in zip(range(200, 0, -1), zip(xs, xs[1:])):
        t = torch.full((3,), step)
        z = torch.randn(xt.shape, generator=g, dtype=F64) if step > 1 else 0
        mean, var = ddpm.q_posterior(ddpm.predict_x0(xt, t, toy_eps(xt, t), s), xt, t, s)
        assert torch.allclose(x_prev, mean + var.sqrt() * z, atol=1e-9)


@pytest.mark.parametrize("sigma2", ["beta_tilde", "beta"])
def test_ddpm_first_step_adds_noise_of_variance_sigma_T_squared(sigma2):
    """From x_T = 0 with eps_theta = 0, Algorithm 2's first step gives x_{T-1} = sigma_T z. The
    cosine schedule with T = 5 has sigma_4^2 and sigma_5^2 far apart (0.53 / 0.91 for beta_tilde,
    0.72 / 0.999 for beta), so taking the wrong step's variance fails."""
    s, N = ddpm.make_schedule("cosine", 5), 100_000
    _, xs = ddpm.sample_ddpm(
        lambda xt, t: torch.zeros_like(xt),
        s,
        (N, 1),
        torch.Generator().manual_seed(0),
        sigma2=sigma2,
        x_T=torch.zeros(N, 1, dtype=F64),
        trajectory=True,
    )
    var = getattr(s, sigma2)[5].item()
    assert abs(xs[1].var().item() - var) < 5 * var * math.sqrt(2 / N)


@pytest.mark.parametrize("sigma2", ["beta_tilde", "beta"])
def test_each_step_of_algorithm_2_adds_noise_of_variance_sigma_t_squared(sigma2):
    """With the exact eps of one point x_0, line 4 of Algorithm 2 is the posterior mean of eq. (7)
    at x_0 plus sigma_t z: over 20,000 draws, each step's residual x_{t-1} - mu_tilde(x_t, x_0) has
    mean 0 and variance sigma_t^2 = beta_tilde_t or beta_t (Section 3.2), within 5 standard errors
    (sigma_t / sqrt(n), sigma_t^2 sqrt(2 / n)); the last step adds none. T = 10: neighbouring beta_t
    differ by 12-210%, so a sigma taken one step off fails, which returning x_0 at the end cannot
    show (with the exact eps only the last step decides the output)."""
    s, n = ddpm.make_schedule("linear", 10), 20_000
    x0, x_T = torch.full((n, 1), 0.3, dtype=F64), torch.randn(n, 1, generator=gen(1), dtype=F64)
    model = oracle_eps(x0, s)
    _, xs = ddpm.sample_ddpm(model, s, x0.shape, gen(0), x_T=x_T, trajectory=True, sigma2=sigma2)
    var = (s.beta if sigma2 == "beta" else s.beta_tilde).tolist()
    for t, xt, x_prev in zip(range(10, 0, -1), xs, xs[1:]):
        mean, _ = ddpm.q_posterior(x0, xt, torch.full((n,), t), s)
        r = x_prev - mean
        if t == 1:
            assert r.abs().max() < 1e-12
            continue
        assert abs(r.mean().item()) < 5 * math.sqrt(var[t] / n)
        assert abs(r.var().item() / var[t] - 1) < 5 * math.sqrt(2 / n), t


@settings(deadline=None, max_examples=30)
@given(
    kind=kinds,
    T=st.integers(2, 300),
    sigma2=st.sampled_from(["beta_tilde", "beta"]),
    seed=st.integers(0, 99),
)
@example(kind="linear", T=1000, sigma2="beta_tilde", seed=0)
def test_ddpm_with_the_true_noise_steps_through_the_posterior_of_x0_and_returns_it(
    kind, T, sigma2, seed
):
    """Over schedules and T, with the exact eps of x_0: every step of Algorithm 2 is a draw of q's
    posterior at the true x_0, x_{t-1} = mu_tilde(x_t, x_0) + sigma_t z (eqs. 6-7), sigma_t^2 =
    beta_t or beta_tilde_t, z replayed from the generator's stream; and the output is x_0. Checked
    at every step, not only at the end, which the last step (x0_hat, no noise) decides alone."""
    s, g = ddpm.make_schedule(kind, T), gen(seed)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=F64) * 2
    x_T = torch.randn(x0.shape, generator=g, dtype=F64)
    out, xs = ddpm.sample_ddpm(
        oracle_eps(x0, s), s, x0.shape, gen(seed + 1), x_T=x_T, trajectory=True, sigma2=sigma2
    )
    replay, var = gen(seed + 1), getattr(s, sigma2)
    for step, xt, x_prev in zip(range(T, 0, -1), xs, xs[1:]):
        z = torch.randn(x0.shape, generator=replay, dtype=F64) if step > 1 else 0
        mean, _ = ddpm.q_posterior(x0, xt, torch.full((3,), step), s)
        assert torch.allclose(x_prev, mean + var[step].sqrt() * z, atol=1e-9, rtol=0), step
    assert len(xs) == T + 1 and torch.allclose(out, x0, atol=1e-9, rtol=0)


def gaussian_eps(mu, s, sched):
    """For data N(mu, s^2 I): E[x_0 | x_t] is linear in x_t, so eps*(x_t, t) is closed form:
    sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)."""

    def eps_model(xt, t):
        ab = sched.alpha_bar[t].reshape(-1, *[1] * (xt.dim() - 1))
        return (1 - ab).sqrt() * (xt - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    return eps_model


POINTS = torch.tensor([[-0.8, -0.6], [0.7, -0.2], [0.0, 0.9]], dtype=F64)


WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=F64)


def points_eps(sched):
    """For data that is POINTS with probabilities WEIGHTS: E[x_0 | x_t] is the softmax-weighted mean
    of the points, with logits log w_k - |x_t - sqrt(ab) p_k|^2 / (2 (1 - ab))."""

    def eps_model(xt, t):
        ab = sched.alpha_bar[t][:, None]
        logits = WEIGHTS.log() - ((xt[:, None, :] - ab[:, None].sqrt() * POINTS) ** 2).sum(-1) / (
            2 * (1 - ab)
        )
        return (xt - ab.sqrt() * (logits.softmax(-1) @ POINTS)) / (1 - ab).sqrt()

    return eps_model


def moments_ok(x, mu, s, var_allowance):
    """Sample mean and variance of N scalars against N(mu, s^2): 5 standard errors (s / sqrt(N) for
    the mean, s^2 sqrt(2 / N) for the variance) plus the sampler's own discretisation allowance."""
    N = x.numel()
    return (
        abs(x.mean().item() - mu) < 5 * s / math.sqrt(N)
        and abs(x.var().item() / s**2 - 1) < 5 * math.sqrt(2 / N) + var_allowance
    )


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sigma2", ["beta_tilde", "beta"])
def test_ddpm_turns_noise_into_gaussian_data(kind, sigma2):
    """Algorithm 2 with the optimal eps has the data's mean and variance. Its own error at T = 1000
    was measured at -2.2% of the variance (beta_tilde) and +0.6% (beta), so 3% is allowed on top of
    5 SE."""
    s, N = ddpm.make_schedule(kind, 1000), 50_000
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N, 1, generator=g, dtype=F64)
    x = ddpm.sample_ddpm(gaussian_eps(0.5, 0.3, s), s, (N, 1), g, sigma2=sigma2, x_T=x_T)
    print(f"mean {x.mean().item():.4f} (0.5), variance / s^2 {x.var().item() / 0.09:.4f}")
    assert moments_ok(x, 0.5, 0.3, 0.03)


# -------------------------------------------------------------------------------------------------
# DDIM: the sub-sequence, eqs. (12), (16); encoding (Section 5.4), slerp (5.3); DDPM Section 4.4


@settings(deadline=None, max_examples=80)
@given(T=st.integers(1, 2000), data=st.data())
def test_ddim_timesteps(T, data):
    steps = data.draw(st.integers(1, T))
    taus = ddpm.ddim_timesteps(T, steps)
    assert len(taus) == steps and taus[0] == T and all(a > b for a, b in zip(taus, taus[1:]))
    assert taus[-1] == (1 if steps > 1 else T)


@settings(deadline=None, max_examples=30)
@given(T=st.integers(1, 300), eta=st.sampled_from([0.0, 0.5, 1.0]), data=st.data())
def test_ddim_makes_exactly_steps_model_calls(T, eta, data):
    steps, calls = data.draw(st.integers(1, T)), []
    s = ddpm.make_schedule("linear", max(T, 2))

    def counting(xt, t):
        calls.append(t[0].item())
        return toy_eps(xt, t)

    ddpm.sample_ddim(
        counting, s, (2, 3), steps=steps, eta=eta, generator=torch.Generator().manual_seed(0)
    )
    assert calls == ddpm.ddim_timesteps(s.T, steps)


@settings(deadline=None, max_examples=40)
@given(kind=kinds, T=st.integers(2, 1000))
@example(kind="linear", T=1000)
def test_ddim_eta_1_on_the_full_grid_has_the_posterior_variance(kind, T):
    s = ddpm.make_schedule(kind, T)
    assert ddpm.ddim_timesteps(T, T) == list(range(T, 0, -1))
    for t in range(1, T + 1):
        assert math.isclose(
            ddpm.ddim_sigma(s, t, t - 1, 1.0).item() ** 2,
            s.beta_tilde[t].item(),
            rel_tol=1e-9,
            abs_tol=1e-15,
        )


@pytest.mark.parametrize("eta", [0.2, 0.5, 1.0])
def test_each_ddim_step_adds_noise_of_the_variance_of_eq_16(eta):
    """With the exact eps of one point x_0 = 0, each step of eq. (12) is sqrt(ab_s) x_0 +
    sqrt(1 - ab_s - sigma^2) eps(x_t) + sigma z: over 20,000 draws the residual has mean 0 and the
    variance of eq. (16), written out here: eta^2 (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s), at
    every one of 5 steps of T = 1000 (at eta = 0.2 and 0.5 eta and sqrt(eta) differ: a sigma that
    scaled with sqrt(eta) would have 5x / 2x this variance). A wrong direction coefficient leaves a
    part of eps(x_t), which varies with x_t, in the residual; a sigma of the wrong pair of steps
    has another size."""
    s, n, steps = ddpm.make_schedule("linear", 1000), 20_000, 5
    x0 = torch.zeros(n, 1, dtype=F64)
    x_T = torch.full((n, 1), 0.7, dtype=F64)
    eps_model = oracle_eps(x0, s)
    _, xs = ddpm.sample_ddim(eps_model, s, x0.shape, gen(0), steps, x_T, True, eta=eta)
    taus = ddpm.ddim_timesteps(1000, steps) + [0]
    for t, t_next, xt, x_next in zip(taus, taus[1:], xs, xs[1:]):
        ab, ab_next = s.alpha_bar[t].item(), s.alpha_bar[t_next].item()
        var = eta**2 * (1 - ab_next) / (1 - ab) * (1 - ab / ab_next)
        eps = eps_model(xt, torch.full((n,), t))
        r = x_next - ab_next**0.5 * x0 - max(1 - ab_next - var, 0) ** 0.5 * eps
        if t_next == 0:  # the last step: sigma = 0, the output is x0_hat
            assert var == 0 and r.abs().max() < 1e-9
            continue
        assert abs(r.mean().item()) < 5 * math.sqrt(var / n), t
        assert abs(r.var().item() / var - 1) < 5 * math.sqrt(2 / n), t


@settings(deadline=None, max_examples=30)
@given(kind=kinds, T=st.integers(2, 1000), data=st.data())
@example(kind="linear", T=1000, data=None)
def test_ddim_at_eta_0_keeps_every_x_t_on_the_line_of_x0_and_the_encoder_lands_on_it(kind, T, data):
    """With the exact eps of one point x_0, DDIM at eta = 0 keeps every x_t on the line
    sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps of its x_T's own eps, and draws no noise: two generators,
    one output. The encoder starts at x_0, reads the network at t = 1 (for this oracle eps_1 =
    (1 - sqrt(ab_1)) x_0 / sqrt(1 - ab_1)) and stays on eps_1's line: every x_t it passes, and the
    x_T it returns, is sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps_1 (an encoder returning noise does not
    land there); decoding that x_T returns x_0."""
    s, g = ddpm.make_schedule(kind, T), gen(T)
    steps = data.draw(st.integers(1, T)) if data else 50
    x0 = torch.randn(3, 2, 4, generator=g, dtype=F64) * 2
    ab, taus = s.alpha_bar, ddpm.ddim_timesteps(T, steps)
    atol = 1e-12 / ab[T].sqrt().item()  # x0_hat divides by sqrt(alpha_bar_T): rounding grows so

    def on_line(x, t, eps):
        return torch.allclose(x, ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps, atol=atol, rtol=0)

    x_T = torch.randn(x0.shape, generator=g, dtype=F64)
    eps = (x_T - ab[T].sqrt() * x0) / (1 - ab[T]).sqrt()
    oracle = oracle_eps(x0, s)
    out, xs = ddpm.sample_ddim(oracle, s, x0.shape, gen(1), steps, x_T=x_T, trajectory=True)
    assert torch.equal(out, ddpm.sample_ddim(oracle, s, x0.shape, gen(2), steps, x_T=x_T))
    assert all(on_line(x, t, eps) for x, t in zip(xs, taus + [0]))
    seen = []

    def noting_x(xt, t):
        seen.append(xt.clone())
        return oracle(xt, t)

    x_T = ddpm.ddim_encode(noting_x, s, x0, steps)
    eps_1 = (1 - ab[1].sqrt()) * x0 / (1 - ab[1]).sqrt()
    assert torch.equal(seen[0], x0) and len(seen) == steps
    assert all(on_line(x, t, eps_1) for x, t in zip(seen[1:] + [x_T], taus[::-1]))
    back = ddpm.sample_ddim(oracle, s, x0.shape, steps=steps, x_T=x_T)
    assert torch.allclose(back, x0, atol=atol, rtol=0)


@settings(deadline=None, max_examples=40)
@given(kind=kinds, T=st.integers(2, 1000), eta=st.sampled_from([0.0, 0.3, 1.0]), data=st.data())
@example(kind="linear", T=1000, eta=0.0, data=None)
@example(kind="linear", T=14, eta=1.0, data=2)  # was nan: 1 - alpha_bar - sigma^2 rounded below 0
def test_ddim_with_the_true_noise_takes_every_step_of_eq_12_and_returns_x0(kind, T, eta, data):
    """Over schedules, T, eta and step counts, rounding included (the @example that was nan), with
    the exact eps of x_0: every x_t DDIM passes is sqrt(ab_t) x_0 + sqrt(1 - ab_t) e_t, where each
    step's noise part is eq. (12)'s, sqrt(1 - ab_s - sigma^2) e_t + sigma z, sigma of eq. (16)
    written out here, z replayed from the generator; and the output is x_0. Checked at every step:
    the last alone (x0_hat, sigma = 0) returns x_0 whatever came before."""
    s, g = ddpm.make_schedule(kind, T), torch.Generator().manual_seed(T)
    steps = 50
    if isinstance(data, int):  # an @example's step count
        steps = data
    elif data:
        steps = data.draw(st.integers(1, T))
    x0 = torch.randn(3, 2, 4, generator=g, dtype=F64) * 2
    x_T = torch.randn(x0.shape, generator=g, dtype=F64)
    taus = ddpm.ddim_timesteps(T, steps) + [0]
    # x0_hat divides by sqrt(alpha_bar_t): rounding grows so, most at the first step, and is carried
    atol = 1e-12 / s.alpha_bar[T].sqrt().item()
    out, xs = ddpm.sample_ddim(oracle_eps(x0, s), s, x0.shape, gen(1), steps, x_T, True, eta=eta)
    replay = gen(1)
    for t, t_next, xt, x_next in zip(taus, taus[1:], xs, xs[1:]):
        ab, ab_next = s.alpha_bar[t], s.alpha_bar[t_next]
        var = eta**2 * (1 - ab_next) / (1 - ab) * (1 - ab / ab_next)
        z = torch.randn(x0.shape, generator=replay, dtype=F64) if eta > 0 else 0
        e_t = (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
        noise = (1 - ab_next - var).clamp(min=0).sqrt() * e_t + var.sqrt() * z
        assert torch.allclose(x_next, ab_next.sqrt() * x0 + noise, atol=atol, rtol=0), t
    assert torch.allclose(out, x0, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_error_shrinks_as_steps_grow(kind):
    """Deterministic DDIM from the same x_T: the variance error is first order in the step size.
    Measured with these data (s = 0.3): -64% at 10 steps, -16% at 50, -0.9% at 1000 (linear); cosine
    about half. The test asks for a strictly shrinking error, within 10 / steps, and the right mean
    at every count."""
    s, N = ddpm.make_schedule(kind, 1000), 50_000
    x_T = torch.randn(N, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    errors = []
    for steps in (10, 20, 50, 100, 1000):
        x = ddpm.sample_ddim(gaussian_eps(0.5, 0.3, s), s, (N, 1), steps=steps, x_T=x_T)
        assert moments_ok(x, 0.5, 0.3, 10 / steps)
        errors.append(abs(x.var().item() / 0.3**2 - 1))
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 0.02


@settings(deadline=None, max_examples=10)
@given(
    mu=st.floats(-1, 1),
    s=st.floats(0.5, 1.0),
    T=st.integers(300, 1000),
    eta=st.sampled_from([0.0, 1.0]),
)
def test_ddim_on_the_full_grid_matches_gaussian_data(mu, s, T, eta):
    """DDIM with steps = T, any mean, spread and T in these ranges. The sampler's own variance error
    grows as s or T shrink; measured with N = 200,000 (linear schedule, eta = 0 / 1): T = 300, s =
    0.5: -1.9% / -4.9%; T = 1000, s = 1: -0.3% / -0.8%; outside the ranges it reaches -36% (T = 100,
    s = 0.1, eta = 1). So 6% (the worst corner, -4.9%, plus a margin) is allowed on top of 5 SE."""
    sched, N = ddpm.make_schedule("linear", T), 20_000
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(N, 1, generator=g, dtype=F64)
    x = ddpm.sample_ddim(gaussian_eps(mu, s, sched), sched, (N, 1), g, T, x_T, eta=eta)
    assert moments_ok(x, mu, s, 0.06)


def test_refined_encoding_inverts_ddim_on_gaussian_data_and_the_papers_does_not():
    """For N(0.5, 0.3^2) data, eps* is linear in x_t but not constant, so the paper's encoder
    (eps taken at x_s) misses by the steps' curvature. The fixed-point iterations converge to the
    decoder's exact inverse at every S: each shrinks the error by |c deps/dx| = 0.60 at most here
    (S = 10). Measured (RMS error): S = 10: 0.17 with the paper's encoder, 1e-2 after 5 iterations,
    9e-15 after 60; S = 100: 0.02, 1e-8, 4e-16. Not under the cosine schedule: its alpha_bar_T =
    2e-9 makes that factor 1.00 at the last step, and the iterations stall (8e-4 at S = 10)."""
    s, N = ddpm.make_schedule("linear", 1000), 2000
    x0 = 0.5 + 0.3 * torch.randn(N, 1, generator=gen(0), dtype=F64)
    eps = gaussian_eps(0.5, 0.3, s)
    for steps in (10, 20, 50, 100):
        error = []
        for refine in (0, 2, 5, 60):
            x_T = ddpm.ddim_encode(eps, s, x0, steps, refine)
            back = ddpm.sample_ddim(eps, s, x0.shape, steps=steps, x_T=x_T)
            error.append((back - x0).pow(2).mean().sqrt().item())
        assert error[0] > 1e-3 and all(a > b for a, b in zip(error, error[1:3])), error
        assert error[-1] < 1e-12, (steps, error)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_the_encoder_maps_gaussian_data_to_a_standard_normal_x_T(kind):
    """At S = T the encoder is DDIM's ODE run forwards: N(0.5, 0.3^2) goes to N(0, 1), up to 5
    standard errors at this n plus the discretisation (measured +1.3% / +1.7% of the variance,
    linear / cosine; 3% allowed)."""
    s, N = ddpm.make_schedule(kind, 1000), 20_000
    x0 = 0.5 + 0.3 * torch.randn(N, 1, generator=gen(0), dtype=F64)
    x_T = ddpm.ddim_encode(gaussian_eps(0.5, 0.3, s), s, x0, 1000)
    assert moments_ok(x_T, 0.0, 1.0, 0.03)


@settings(deadline=None, max_examples=50)
@given(seed=st.integers(0, 10_000), lam=st.floats(0, 1))
def test_slerp_returns_the_endpoints_and_keeps_a_shared_norm(seed, lam):
    z0, z1 = torch.randn(2, 3, 1, 4, 4, generator=gen(seed), dtype=F64)
    z1 = (
        z1
        * z0.flatten(1).norm(dim=1)[:, None, None, None]
        / z1.flatten(1).norm(dim=1)[:, None, None, None]
    )
    assert torch.allclose(ddpm.slerp(z0, z1, 0.0), z0, atol=1e-12)
    assert torch.allclose(ddpm.slerp(z0, z1, 1.0), z1, atol=1e-12)
    z = ddpm.slerp(z0, z1, lam)
    assert torch.allclose(z.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1), rtol=1e-10)
    # on the great circle: the angle from z0 is lam times the angle between the endpoints
    cos = lambda a, b: ((a * b).sum() / (a.norm() * b.norm())).clamp(-1, 1)  # noqa: E731
    theta = torch.arccos(cos(z0[0], z1[0]))
    assert math.isclose(torch.arccos(cos(z0[0], z[0])).item(), lam * theta.item(), abs_tol=1e-6)


def noting_t(eps_model, calls):  # eps_model, noting the t of each call in calls
    def eps_counted(xt, t):
        calls.append(t[0].item())
        return eps_model(xt, t)

    return eps_counted


def test_ddpm_mix_decodes_from_t_and_at_the_ends_is_the_image_it_noised():
    """With lam = 0 (1) the mix is x_t of the first (second) image; with that image's exact eps
    the reverse process from t returns it exactly. Each decode makes t calls, starting at t."""
    s, T = ddpm.make_schedule("linear", 1000), 300
    x0, x0_prime = torch.randn(2, 2, 1, 4, 4, generator=gen(0), dtype=F64)
    eps = torch.randn(x0.shape, generator=gen(1), dtype=F64)
    for lam, image in ((0.0, x0), (1.0, x0_prime)):
        calls = []
        out = ddpm.ddpm_mix(noting_t(oracle_eps(image, s), calls), s, x0, x0_prime, lam, T, eps)
        assert torch.allclose(out, image, atol=1e-9) and calls == list(range(T, 0, -1))


def test_ddpm_mix_is_affine_in_lam_and_each_end_decodes_its_own_image():
    """Gaussian data's exact eps is affine in x_t, so with the same z each step of Algorithm 2 is
    affine in x_t, and so is the decode of x_t_bar = (1 - lam) x_t + lam x_t' in lam: the output at
    lam is (1 - lam) out(0) + lam out(1). The ends are the decodes of each image's own x_t ~ q with
    the shared eps, and they differ (a mix that ignores lam, or swaps the images, fails)."""
    s, t = ddpm.make_schedule("linear", 1000), 300
    x0, x0_prime = torch.randn(2, 2, 1, 4, 4, generator=gen(0), dtype=F64)
    eps = torch.randn(x0.shape, generator=gen(1), dtype=F64)
    model = gaussian_eps(0.2, 0.5, s)
    out = {lam: ddpm.ddpm_mix(model, s, x0, x0_prime, lam, t, eps, gen(2)) for lam in (0, 0.3, 1)}
    for lam, image in ((0, x0), (1, x0_prime)):
        x_t = ddpm.q_sample(image, torch.full((2,), t), eps, s)
        first_t = ddpm.schedule_of(s.beta[1 : t + 1])  # the reverse process from step t
        alone = ddpm.sample_ddpm(model, first_t, x0.shape, gen(2), x_T=x_t)
        assert torch.allclose(out[lam], alone, atol=1e-12)
    assert torch.allclose(out[0.3], 0.7 * out[0] + 0.3 * out[1], atol=1e-12)
    assert (out[1] - out[0]).abs().max() > 0.1


# -------------------------------------------------------------------------------------------------
# The eps-networks: the U-Net of Appendix B, the MLP


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (16, 4)])
@pytest.mark.parametrize("in_ch", [1, 3])
def test_unet_keeps_the_shape(hw, in_ch):
    model = ddpm.UNet(in_ch, ch=8, ch_mult=(1, 2, 2), n_res=1)
    x = torch.randn(2, in_ch, *hw)
    assert model(x, torch.tensor([1, 1000])).shape == x.shape


def test_unet_uses_each_samples_own_t():
    torch.manual_seed(0)
    model = ddpm.UNet(1, ch=8, ch_mult=(1, 2), n_res=1).eval()
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    with torch.no_grad():
        both = model(x, torch.tensor([1, 700]))
        assert (both[0] - both[1]).abs().max() > 1e-3  # same x, different t: different eps
        assert torch.allclose(both[1:], model(x[1:], torch.tensor([700])), atol=1e-5)


def test_mlp_keeps_the_shape_and_uses_t():
    torch.manual_seed(0)
    net = ddpm.make_net([3], ch=8, n_res=2)
    assert isinstance(net, ddpm.MLP) and isinstance(ddpm.make_net([1, 8, 8], ch=8), ddpm.UNet)
    x = torch.randn(1, 3).repeat(2, 1)
    out = net(x, torch.tensor([1, 700]))
    assert out.shape == x.shape and (out[0] - out[1]).abs().max() > 1e-3


def reference_unet(sd, config, x, t, y):
    """The U-Net as README and the UNet docstring describe it, written again with
    torch.nn.functional straight from a state dict: the independent path the module is checked
    against. GroupNorm has gcd(32, C // 4, C) groups, as ddpm.norm's docstring specifies."""

    def groups(h):
        return math.gcd(32, max(h.shape[1] // 4, 1), h.shape[1])

    def linear(name, h):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def conv(name, h, stride=1):
        w = sd[f"{name}.weight"]
        return F.conv2d(h, w, sd[f"{name}.bias"], stride, padding=w.shape[-1] // 2)

    def silu_norm(name, h):  # SiLU(GroupNorm(h))
        return F.silu(F.group_norm(h, groups(h), sd[f"{name}.weight"], sd[f"{name}.bias"]))

    def res_block(name, h, emb):
        out = conv(f"{name}.conv1", silu_norm(f"{name}.norm1", h))
        out = out + linear(f"{name}.t_proj", emb)[:, :, None, None]
        out = conv(f"{name}.conv2", silu_norm(f"{name}.norm2", out))
        skip = conv(f"{name}.skip", h) if f"{name}.skip.weight" in sd else h
        return skip + out

    def attention(name, h):  # softmax(q k^T / sqrt(C)) v over the H * W positions, residual
        B, C, H, W = h.shape
        g = F.group_norm(h, groups(h), sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"])
        q, k, v = conv(f"{name}.qkv", g).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, HW)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(C), dim=-1)  # (B, HW, HW)
        return h + conv(f"{name}.proj", (v @ a.transpose(1, 2)).reshape(B, C, H, W))

    ch, levels, n_res = config["ch"], len(config["ch_mult"]), config["n_res"]
    half = ch // 2
    angles = t.double()[:, None] * 10000 ** (-torch.arange(half, dtype=F64) / half)
    emb = torch.cat([angles.sin(), angles.cos()], 1).float()
    emb = linear("time_mlp.2", F.silu(linear("time_mlp.0", emb))) + sd["label_emb.weight"][y]
    h = conv("conv_in", x)
    skips = []
    for i in range(levels):
        for j in range(n_res):
            h = res_block(f"down.{i}.{j}", h, emb)
        skips.append(h)  # the level's last block's output, before it is halved
        if i < levels - 1:
            h = conv(f"downsample.{i}", h, stride=2)
    h = res_block("mid2", attention("attn", res_block("mid1", h, emb)), emb)
    for k in range(levels):  # the deepest level first, each taking its own level's skip
        h = torch.cat([h, skips[levels - 1 - k]], 1)
        for j in range(n_res):
            h = res_block(f"up.{k}.{j}", h, emb)
        if k < levels - 1:
            h = conv(f"upsample.{k}.1", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return conv("conv_out", silu_norm("norm_out", h))


def grid_cells(path, n):  # the n x n cells of a committed grid_image, as (n * n, 1, 32, 32) uint8
    grid = torch.from_numpy(np.asarray(Image.open(path)).copy())
    rows = [grid[2 + 34 * i : 34 + 34 * i] for i in range(n)]
    return torch.stack([r[:, 2 + 34 * j : 34 + 34 * j] for r in rows for j in range(n)])[:, None]


@pytest.mark.parametrize("config", ["shipped", "three channels, two levels, one block"])
def test_the_unet_computes_the_architecture_it_describes(config):
    """The module against reference_unet on the shipped weights and on a small random net: a
    change to the computation that keeps every parameter name (a residual dropped, skips
    concatenated in another order, another GroupNorm) fails here."""
    if config == "shipped":
        _, model = ddpm.load_checkpoint(ddpm.SHIPPED, torch.device("cpu"))
        x = ddpm.to_model_range(grid_cells("samples/classes.png", 10)[::9])  # 12 digits
    else:
        torch.manual_seed(0)
        model = ddpm.UNet(in_ch=3, ch=16, ch_mult=(1, 2), n_res=1, n_classes=4).eval()
        x = torch.randn(5, 3, 8, 8, generator=gen(0))
    B = len(x)
    t = torch.randint(1, 1001, (B,), generator=gen(1))
    y = torch.randint(0, model.config["n_classes"] + 1, (B,), generator=gen(2))
    with torch.no_grad():
        want = reference_unet(model.state_dict(), model.config, x, t, y)
        got = model(x, t, y)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_the_shipped_weights_still_denoise_the_digits_they_drew():
    """The shipped model's eps error on digits of its own class grid (samples/classes.png, three
    a class, noised at t = 100, 300, ..., 900: a rough L_simple) is at the level of its training
    loss (0.017 at the end of its run, README), far below the same net told a wrong t, or untrained.
    Measured: 0.014; told t = 500 always 0.20; untrained 1.09."""
    cells = grid_cells("samples/classes.png", 10)
    x0 = ddpm.to_model_range(cells.reshape(10, 10, 1, 32, 32)[:, :3].flatten(0, 1))
    y = torch.arange(30) // 3  # row k of the grid: digit k
    ckpt, model = ddpm.load_checkpoint(ddpm.SHIPPED, torch.device("cpu"))
    sched = ddpm.make_schedule("linear", 1000)

    def l_simple(eps_model):
        errors = []
        g = gen(0)
        for step in range(100, 1000, 200):
            t = torch.full((30,), step)
            eps = torch.randn(x0.shape, generator=g)
            with torch.no_grad():
                errors.append(F.mse_loss(eps_model(ddpm.q_sample(x0, t, eps, sched), t), eps))
        return torch.stack(errors).mean().item()

    shipped = l_simple(lambda xt, t: model(xt, t, y))
    t_ignored = l_simple(lambda xt, t: model(xt, torch.full_like(t, 500), y))
    torch.manual_seed(0)
    untrained = ddpm.make_net([1, 32, 32], **ckpt["config"]["model"]).eval()
    assert shipped < 0.03 and t_ignored > 5 * shipped
    assert l_simple(lambda xt, t: untrained(xt, t, y)) > 0.5


# -------------------------------------------------------------------------------------------------
# Beyond the papers: DPM-Solver++(2M)


@settings(deadline=None, max_examples=60)
@given(kind=kinds, T=st.integers(1, 2000), data=st.data())
@example(kind="linear", T=1000, data=3)  # the "even in lambda" branch, at both of its ends
@example(kind="linear", T=1000, data=10)
def test_dpm_timesteps_are_distinct_from_T_to_1_and_even_in_lambda(kind, T, data):
    steps = data if isinstance(data, int) else data.draw(st.integers(1, T))
    s = ddpm.make_schedule(kind, max(T, 2))
    taus = ddpm.dpm_timesteps(s, steps)
    assert len(taus) == steps and taus[0] == s.T and all(a > b for a, b in zip(taus, taus[1:]))
    assert taus[-1] == (1 if steps > 1 else s.T)
    # the integer grid is fine enough here: the
    if kind == "linear" and T == 1000 and 3 <= steps <= 10:
        # lambda steps are equal to within 7% (measured), more near t = 1
        gaps = torch.diff(s.lam[taus])
        assert (gaps > 0).all() and (gaps.max() - gaps.min()) / gaps.mean() < 0.1


@settings(deadline=None, max_examples=30)
@given(kind=kinds, T=st.integers(2, 1000), data=st.data())
@example(kind="linear", T=1000, data=None)
def test_dpm_solver_with_the_true_noise_keeps_every_x_t_on_the_line_of_x0(kind, T, data):
    """With the true noise every x0_hat is x_0, so the extrapolation D_i is x_0 too, and each step,
    exact for a constant data prediction, keeps x_t on the line sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps
    of x_T's own eps: checked at every step (a wrong step coefficient fails there; the last step
    alone returns x_0 whatever came before), one network call a step."""
    s, g = ddpm.make_schedule(kind, T), torch.Generator().manual_seed(T)
    steps, calls = (data.draw(st.integers(1, min(T, 50))) if data else 20), []
    x0 = torch.randn(3, 2, 4, generator=g, dtype=F64) * 2
    x_T = torch.randn(x0.shape, generator=g, dtype=F64)
    ab = s.alpha_bar
    eps = (x_T - ab[T].sqrt() * x0) / (1 - ab[T]).sqrt()

    def counting(xt, t):
        calls.append(t[0].item())
        return oracle_eps(x0, s)(xt, t)

    out, xs = ddpm.sample_dpm(counting, s, x0.shape, steps=steps, x_T=x_T, trajectory=True)
    assert calls == ddpm.dpm_timesteps(s, steps)
    atol = 1e-12 / ab[T].sqrt().item()  # as for DDIM
    for t, x in zip(calls + [0], xs):
        assert torch.allclose(x, ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps, atol=atol, rtol=0), t
    assert torch.allclose(out, x0, atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpm_solver_keeps_gaussian_data_better_than_ddim_at_the_same_calls(kind):
    """Lu et al.'s claim in miniature. Measured (N(0.5, 0.3^2), from the same x_T), variance error
    DDIM / DPM-Solver++(2M): 10 calls -64% / +5.7%, 15: -47% / +5.1%, 20: -37% / +3.4% (linear);
    cosine -39% / +6.7%, -27% / +5.6%, -21% / +3.7% (4.8x smaller at worst). Required: 3x smaller,
    under 10%."""
    s, N = ddpm.make_schedule(kind, 1000), 50_000
    x_T = torch.randn(N, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    for steps in (10, 15, 20):
        err = {}
        for order in (1, 2):
            sampler = ddpm.sample_ddim if order == 1 else ddpm.sample_dpm
            x = sampler(gaussian_eps(0.5, 0.3, s), s, (N, 1), steps=steps, x_T=x_T)
            assert abs(x.mean().item() - 0.5) < 5 * 0.3 / math.sqrt(N)
            err[order] = abs(x.var().item() / 0.3**2 - 1)
        assert err[2] < 0.1 and 3 * err[2] < err[1]


@pytest.mark.parametrize(
    "sampler",
    ["ddpm beta_tilde", "ddpm beta", "ddim 50 0", "ddim 50 1", "ddim 100 0", "dpm 10", "dpm 20"],
)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_samples_land_on_the_data_points_with_their_frequencies(sampler, kind):
    """Data that is three points with probabilities 0.5, 0.3, 0.2: every sample lands on a point
    (noise added at the last step, or a final x_1 returned instead of x_0, would leave it ~0.01
    away) and each point's share is within 5 binomial standard errors."""
    s, N = ddpm.make_schedule(kind, 1000), 10_000
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(N, 2, generator=g, dtype=F64)
    name, *opts = sampler.split()
    if name == "ddpm":
        x = ddpm.sample_ddpm(points_eps(s), s, (N, 2), g, sigma2=opts[0], x_T=x_T)
    elif name == "dpm":
        x = ddpm.sample_dpm(points_eps(s), s, (N, 2), steps=int(opts[0]), x_T=x_T)
    else:
        x = ddpm.sample_ddim(points_eps(s), s, (N, 2), g, int(opts[0]), x_T, eta=float(opts[1]))
    dist, nearest = torch.cdist(x, POINTS).min(1)
    assert dist.max() < 1e-6
    share = torch.bincount(nearest, minlength=3) / N
    print(f"max distance {dist.max().item():.1e}, shares {share.tolist()}")
    assert (share - WEIGHTS).abs().lt(5 * (WEIGHTS * (1 - WEIGHTS) / N).sqrt()).all()


# -------------------------------------------------------------------------------------------------
# Beyond the papers: classifier-free guidance and the label draw (Ho & Salimans 2022)


def test_label_dropout_happens_at_the_stated_rate():
    y, N = torch.arange(200_000) % 10, 200_000
    for p in (0.0, 0.1, 0.5, 1.0):
        out = ddpm.drop_labels(y, p, 10, gen(int(p * 10)))
        dropped = out == 10
        assert torch.equal(out[~dropped], y[~dropped])  # kept labels are unchanged
        assert abs(dropped.double().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / N)


@settings(deadline=None, max_examples=50)
@given(n=st.integers(1, 2000), data=st.data())
def test_drawn_labels_match_the_stored_frequencies_to_within_one(n, data):
    weights = data.draw(st.lists(st.integers(0, 20), min_size=1, max_size=12).filter(any))
    freq = [w / sum(weights) for w in weights]
    y = ddpm.draw_labels(freq, n, gen(data.draw(st.integers(0, 1000))))
    counts = torch.bincount(y, minlength=len(freq)).double()
    assert len(y) == n and len(counts) == len(freq)
    assert ((counts - n * torch.tensor(freq, dtype=F64)).abs() < 1 + 1e-9).all()


def test_each_drawn_label_is_distributed_as_the_stored_frequencies():
    """Over many seeds, the label at each position of a draw of 3 follows p(y): the systematic
    points are shuffled, so no position is tied to the low or the high classes."""
    freq, seeds = [0.5, 0.3, 0.2, 0.0], 20_000
    y = torch.stack([ddpm.draw_labels(freq, 3, gen(s)) for s in range(seeds)])  # (seeds, 3)
    p = torch.tensor(freq, dtype=F64)
    for position in range(3):
        share = torch.bincount(y[:, position], minlength=4).double() / seeds
        assert share[3] == 0 and ((share - p).abs() <= 5 * (p * (1 - p) / seeds).sqrt()).all()


def test_guidance_is_linear_in_w_and_one_batched_call_equals_two():
    torch.manual_seed(0)
    model = ddpm.UNet(1, ch=8, ch_mult=(1, 2), n_res=1, n_classes=3).eval()
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([1, 200, 500, 999])
    y = torch.tensor([0, 1, 2, 1])
    calls = []

    def counting(*a):
        calls.append(a)
        return model(*a)

    counting.config = model.config
    with torch.no_grad():
        e_y, e_none = model(x, t, y), model(x, t)  # y = None is the "no label" index
        assert torch.allclose(e_none, model(x, t, torch.full_like(y, 3)))
        assert not torch.allclose(e_y, e_none, atol=1e-4)  # the label matters
        for w in (0.0, 1.0, 3.0):
            calls.clear()
            out = ddpm.guided(counting, y, w)(x, t)
            assert len(calls) == 1  # both predictions in one forward pass
            assert torch.allclose(out, (1 + w) * e_y - w * e_none, atol=1e-5)
        # w = 0: the conditional prediction, from a call of 4 (not 8)
        calls.clear()
        assert torch.equal(ddpm.guided(counting, y, 0.0)(x, t), model(x, t, y))
        assert len(calls[0][0]) == 4
        # in an interval: w at 200 and 500 (the bounds count), 0 at 1 and 999
        w_t = torch.tensor([0.0, 2.0, 2.0, 0.0]).view(4, 1, 1, 1)
        out = ddpm.guided(counting, y, 2.0, (200, 500))(x, t)
        assert torch.allclose(out, (1 + w_t) * e_y - w_t * e_none, atol=1e-5)
        calls.clear()  # no t inside: the conditional prediction, from a call of 4
        guided = ddpm.guided(counting, y, 2.0, (1000, 2000))
        assert torch.equal(guided(x, t), model(x, t, y))
        assert len(calls[0][0]) == 4


class TwoPointOracle:
    """Class 0 is the point A, class 1 the point B, with probabilities 0.7 and 0.3: the conditional
    eps is a point mass's, the unconditional one (label 2) the mixture's, as in points_eps."""

    config = {"n_classes": 2}
    P, W = torch.tensor([[-0.6, 0.2], [0.5, -0.4]], dtype=F64), torch.tensor([0.7, 0.3], dtype=F64)

    def __init__(self, sched):
        self.s = sched

    def __call__(self, xt, t, y):
        ab = self.s.alpha_bar[t][:, None]
        logits = self.W.log() - ((xt[:, None, :] - ab[:, None].sqrt() * self.P) ** 2).sum(-1) / (
            2 * (1 - ab)
        )
        x0 = torch.where((y == 2)[:, None], logits.softmax(-1) @ self.P, self.P[y.clamp(max=1)])
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_guided_sampling_lands_on_the_asked_class_and_unguided_on_both(sampler):
    s, N = ddpm.make_schedule("linear", 1000), 4000
    oracle, x_T = TwoPointOracle(s), torch.randn(N, 2, generator=gen(0), dtype=F64)
    run = {
        "ddpm": lambda m: ddpm.sample_ddpm(m, s, (N, 2), gen(1), x_T=x_T),
        "ddim": lambda m: ddpm.sample_ddim(m, s, (N, 2), steps=50, x_T=x_T),
        "dpm": lambda m: ddpm.sample_dpm(m, s, (N, 2), steps=20, x_T=x_T),
    }[sampler]
    for k in (0, 1):
        x = run(ddpm.guided(oracle, torch.full((N,), k), 3.0))
        assert (x - oracle.P[k]).norm(dim=1).max() < 1e-6
    x = run(lambda xt, t: oracle(xt, t, torch.full((len(xt),), 2)))
    dist, nearest = torch.cdist(x, oracle.P).min(1)
    share = (nearest == 0).double().mean().item()
    assert dist.max() < 1e-6 and abs(share - 0.7) < 5 * math.sqrt(0.7 * 0.3 / N)


# -------------------------------------------------------------------------------------------------
# Beyond the papers: the sampling eps-model, clipping x0_hat and respacing


def test_clipped_x0_is_ho_et_al_s_route_clip_then_posterior_mean():
    """Algorithm 2 with clip_x0 is the released code's step: x0_hat (eq. 15) clipped to [-1, 1],
    the posterior mean of eq. (7) at it, plus sigma_t z. x0_hat leaves [-1, 1] on most steps here,
    so a missing or misplaced clip fails; where it stays inside, the noise is the model's own."""
    s = ddpm.make_schedule("linear", 200)
    x_T = torch.randn(3, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    clipped = ddpm.clipped(toy_eps, s)
    _, xs = ddpm.sample_ddpm(
        clipped, s, x_T.shape, torch.Generator().manual_seed(2), x_T=x_T, trajectory=True
    )
    g = torch.Generator().manual_seed(2)
    steps_outside = 0
    for step, (xt, x_prev) in zip(range(200, 0, -1), zip(xs, xs[1:])):
        t = torch.full((3,), step)
        z = torch.randn(xt.shape, generator=g, dtype=F64) if step > 1 else 0
        x0_hat = ddpm.predict_x0(xt, t, toy_eps(xt, t), s)
        mean, var = ddpm.q_posterior(x0_hat.clamp(-1, 1), xt, t, s)
        assert torch.allclose(x_prev, mean + var.sqrt() * z, atol=1e-9)
        inside = x0_hat.abs() <= 1
        assert torch.allclose(clipped(xt, t)[inside], toy_eps(xt, t)[inside], atol=1e-9)
        steps_outside += int(not inside.all())
    assert steps_outside > 100 and xs[-1].abs().max() <= 1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_clipped_samples_of_every_sampler_lie_in_the_data_range(sampler):
    """eps_theta = 0 claims x0_hat = x_t / sqrt(alpha_bar_t), far outside [-1, 1]: every sampler
    ends far outside without the clip and inside with it (each ends on a clipped x0_hat)."""
    s = ddpm.make_schedule("linear", 100)
    x_T = torch.randn(64, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    run = {
        "ddpm": lambda m: ddpm.sample_ddpm(m, s, x_T.shape, torch.Generator(), x_T=x_T),
        "ddim": lambda m: ddpm.sample_ddim(m, s, x_T.shape, steps=10, x_T=x_T),
        "dpm": lambda m: ddpm.sample_dpm(m, s, x_T.shape, steps=10, x_T=x_T),
    }[sampler]

    def zero(xt, t):
        return torch.zeros_like(xt)

    assert run(zero).abs().max() > 10
    assert run(ddpm.clipped(zero, s)).abs().max() <= 1 + 1e-9


@settings(deadline=None, max_examples=20)
@given(kind=kinds, T=st.integers(20, 400), data=st.data())  # T < 20: beta near 1, ill-posed
def test_algorithm_2_on_the_respaced_schedule_is_ddim_at_eta_1(kind, T, data):
    """DDIM's eta = 1 is the posterior q(x_s | x_t, x0_hat) of the sub-sequence, so Algorithm 2
    with beta_tilde' on respaced is the same sampler, draw for draw (DDIM draws its z after each
    call, Algorithm 2 before it; the last of DDIM's is multiplied by 0). Respaced with S = T is the
    schedule itself; with sigma^2 = beta' (DDIM's sigma_hat) the samples differ."""
    s = ddpm.make_schedule(kind, T)
    steps = data.draw(st.integers(1, T))
    eps = gaussian_eps(0.5, 0.3, s)  # bounded values: the gaps are not rounding
    sub, _ = ddpm.respace(s, steps)
    assert sub.T == steps and torch.allclose(
        sub.alpha_bar[1:], s.alpha_bar[ddpm.ddim_timesteps(T, steps)[::-1]], rtol=1e-12
    )
    if steps == T:
        assert torch.allclose(sub.beta, s.beta, rtol=1e-9, atol=1e-15)
    x_T = torch.randn(3, 1, 4, 4, generator=gen(0), dtype=F64)
    ddim = ddpm.sample_ddim(eps, s, x_T.shape, gen(1), steps, x_T, eta=1.0)
    alg2 = ddpm.sample_ddpm(eps, s, x_T.shape, gen(1), steps, x_T, sigma2="beta_tilde")
    assert torch.allclose(ddim, alg2, atol=1e-7, rtol=0)
    if steps > 2:
        hat = ddpm.sample_ddpm(eps, s, x_T.shape, gen(1), steps, x_T, sigma2="beta")
        assert not torch.allclose(ddim, hat, atol=1e-3, rtol=1e-3)


@settings(deadline=None, max_examples=20)
@given(
    kind=kinds,
    T=st.integers(20, 400),
    sigma2=st.sampled_from(["beta_tilde", "beta"]),
    data=st.data(),
)
def test_algorithm_2_with_fewer_steps_is_algorithm_2_on_the_sub_sequence(kind, T, sigma2, data):
    """sample_ddpm with S < T steps, value for value at every step, against Algorithm 2 written out
    here on DDIM's sub-sequence tau: alpha_bar'_i = alpha_bar[tau_i], beta'_i = 1 - alpha_bar'_i /
    alpha_bar'_{i-1}, sigma_i^2 = beta'_i or (1 - alpha_bar'_{i-1}) / (1 - alpha_bar'_i) beta'_i,
    the network called at t = tau_i (toy_eps depends on t), z replayed from the generator."""
    s, steps = ddpm.make_schedule(kind, T), data.draw(st.integers(2, T - 1))
    tau = [0] + ddpm.ddim_timesteps(T, steps)[::-1]
    ab = s.alpha_bar[tau]
    x_T, calls = torch.randn(3, 1, 4, 4, generator=gen(0), dtype=F64), []

    def eps_model(xt, t):
        calls.append(t[0].item())
        return toy_eps(xt, t)

    _, xs = ddpm.sample_ddpm(eps_model, s, x_T.shape, gen(1), steps, x_T, True, sigma2=sigma2)
    replay, x = gen(1), x_T
    for i in range(steps, 0, -1):
        z = torch.randn(x.shape, generator=replay, dtype=F64) if i > 1 else 0
        beta = 1 - ab[i] / ab[i - 1]
        var = beta if sigma2 == "beta" else (1 - ab[i - 1]) / (1 - ab[i]) * beta
        eps = toy_eps(x, torch.full((3,), tau[i]))
        x = (x - beta / (1 - ab[i]).sqrt() * eps) / (1 - beta).sqrt() + var.sqrt() * z
        assert torch.allclose(xs[steps - i + 1], x, atol=1e-10, rtol=0), i
    assert calls == tau[:0:-1] and len(xs) == steps + 1


# -------------------------------------------------------------------------------------------------
# Machinery: data, files, the training loop on the swiss roll, checkpoints, several processes


def test_mnist_is_padded_not_resized_and_scaled_to_minus_one_one(tmp_path):
    images = write_mnist(tmp_path)
    data, labels = ddpm.load_data("mnist", str(tmp_path))
    assert data.shape == (48, 1, 32, 32) and data.dtype == torch.uint8
    assert (
        torch.equal(data[:, 0, 2:30, 2:30], images)
        and data[:, :, :2].sum() == 0
        and data[..., 30:].sum() == 0
    )
    pixels = torch.arange(256, dtype=torch.uint8)
    x = ddpm.to_model_range(pixels)
    assert x[0] == -1 and x[255] == 1 and torch.equal(ddpm.to_pixels(x), pixels)


def test_fashion_is_read_like_mnist(tmp_path):
    images = write_mnist(tmp_path, n=20, seed=3, name="FashionMNIST")
    data, labels = ddpm.load_data("fashion", str(tmp_path))
    assert data.shape == (20, 1, 32, 32) and torch.equal(data[:, 0, 2:30, 2:30], images)
    assert labels.tolist() == [i % 10 for i in range(20)]


def write_cifar10(root, n=12, seed=0):
    """Tiny CIFAR-10 in its python pickle format (rows of 3072 bytes: the red plane, green,
    blue)."""
    import pickle

    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rows = torch.randint(0, 256, (5, n, 3072), generator=gen(seed), dtype=torch.uint8).numpy()
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": rows[min(i, 4)], "labels": [(i + j) % 10 for j in range(n)]}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
    return torch.as_tensor(rows).reshape(5 * n, 3, 32, 32)


def test_cifar10_is_channels_first_with_its_labels(tmp_path, monkeypatch):
    import torchvision

    # fake files: no md5
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)
    rows = write_cifar10(tmp_path)
    data, labels = ddpm.load_data("cifar10", str(tmp_path))
    assert data.shape == (60, 3, 32, 32) and data.dtype == torch.uint8 and torch.equal(data, rows)
    assert labels[:12].tolist() == [j % 10 for j in range(12)] and labels[12:14].tolist() == [1, 2]


def write_folder(root, sizes=((48, 16), (96, 32), (16, 48))):
    """Two classes; every image is three squares in a row (or column): red, green, blue. Its centre
    is green."""
    for name in ["cats", "dogs"]:
        os.makedirs(root / name)
        for i, (w, h) in enumerate(sizes):
            a, image = min(w, h), Image.new("RGB", (w, h))
            for j, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
                image.paste(
                    colour, (j * a, 0, (j + 1) * a, h) if w > h else (0, j * a, w, (j + 1) * a)
                )
            image.save(root / name / f"{i}.png")


def test_image_folder_labels_come_from_subfolders_and_images_are_resized_then_centre_cropped(
    tmp_path,
):
    write_folder(tmp_path)
    data, labels = ddpm.load_data(str(tmp_path), "unused", image_size=8)
    assert (
        data.shape == (6, 3, 8, 8)
        and data.dtype == torch.uint8
        and labels.tolist() == [0, 0, 0, 1, 1, 1]
    )
    green = torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None]
    # the centre square, whatever the aspect
    assert (data[:, :, 2:6, 2:6].int() - green).abs().max() <= 2
    # nothing of the red and blue ends is kept but edge blending
    assert data[:, 1].float().mean() > 200


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "neither a known data set nor a folder of images"),
        (
            lambda d: os.makedirs(d / "empty_class"),
            "neither a known data set nor a folder of images",
        ),
        (
            lambda d: (os.makedirs(d / "a"), (d / "a" / "broken.png").write_bytes(b"not a png")),
            "a/broken.png",
        ),
    ],
)
def test_bad_image_folder_is_one_line_naming_the_problem(tmp_path, capsys, make, message):
    make(tmp_path)
    assert cli(f"train --dataset {tmp_path} --out {tmp_path / 'c.pt'}") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("dataset", ["mnist", "folder"])
def test_photos_are_flipped_half_the_time_and_digits_never(tmp_path, monkeypatch, dataset):
    write_mnist(tmp_path)
    os.makedirs(tmp_path / "photos" / "a")
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, :8, 0] = image[:, 8:, 2] = 255  # red on the left, blue on the right
    for i in range(40):
        Image.fromarray(image).save(tmp_path / "photos" / "a" / f"{i}.png")
    name = "mnist" if dataset == "mnist" else str(tmp_path / "photos")
    data, _ = ddpm.load_data(name, str(tmp_path), image_size=16)
    batches, train_step = [], ddpm.train_step
    monkeypatch.setattr(
        ddpm,
        "train_step",
        lambda m, e, o, x0, *a: batches.append(x0) or train_step(m, e, o, x0, *a),
    )
    assert (
        cli(
            f"train --dataset {name} --image-size 16 --data-dir {tmp_path} --steps 12 "
            f"--out {tmp_path / 'c.pt'}",
            TINY,
        )
        == 0
    )
    x0 = torch.cat(batches)
    pool = ddpm.to_model_range(data)
    flipped = [
        bool((pool == x.flip(-1)).flatten(1).all(1).any())
        and not (pool == x).flatten(1).all(1).any()
        for x in x0
    ]
    if dataset == "mnist":
        assert not any(flipped)
    else:  # blue on the left when flipped
        assert abs(sum(flipped) / len(flipped) - 0.5) < 5 * math.sqrt(0.25 / len(flipped))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous checkpoint")

    def crash(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ddpm.atomic_write(str(path), crash)
    # the half-written file is ckpt.pt.tmp, as after kill -9
    assert path.read_bytes() == b"previous checkpoint"
    ddpm.atomic_write(str(path), lambda f: f.write(b"next checkpoint"))
    assert path.read_bytes() == b"next checkpoint" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_sliced_wasserstein_is_zero_on_itself_and_grows_with_a_shift():
    x = ddpm.make_swissroll(1000, gen(0))
    assert ddpm.sliced_wasserstein(x, x, gen(1)) == 0
    # a shift by v moves each 1-D projection by <v, d>; E <v, d>^2 = |v|^2 / 2, unit d in 2-D
    shifted = ddpm.sliced_wasserstein(x + torch.tensor([0.3, 0.4]), x, gen(1), n_dirs=4096)
    assert abs(shifted - 0.5 / math.sqrt(2)) < 0.01


def test_trained_samplers_land_on_the_roll_and_broken_ones_do_not(roll):
    """The classic bugs fail here: a network that ignores t, or sampling from the untrained
    network. Measured (sliced W2, 2,000 steps): good / floor at most 1.39, bad / good at least
    4.0."""
    _, model = ddpm.load_checkpoint(roll[1], "cpu")
    sched, n = ddpm.make_schedule("linear", 1000), 1000
    fresh = ddpm.make_swissroll(n, gen(1))

    def sw(x):
        return ddpm.sliced_wasserstein(x, fresh, gen(2))

    # two samples of the data differ by this much at this n
    floor = sw(ddpm.make_swissroll(n, gen(3)))

    def t_ignored(x, t):
        return model(x, torch.full_like(t, sched.T // 2))

    torch.manual_seed(0)
    untrained = ddpm.make_net([2], ch=32).eval()
    with torch.no_grad():
        good = {
            "ddpm": sw(ddpm.sample_ddpm(model, sched, (n, 2), gen(4))),
            "ddim": sw(ddpm.sample_ddim(model, sched, (n, 2), gen(4), 50)),
            "dpm 15": sw(ddpm.sample_dpm(model, sched, (n, 2), gen(4), 15)),
        }
        with ddpm.autocast(torch.device("cpu"), "bf16"):  # the network in bf16, the sampler in fp32
            good["ddim bf16"] = sw(ddpm.sample_ddim(model, sched, (n, 2), gen(4), 50))
        bad = {
            "N(0, I)": sw(torch.randn(n, 2, generator=gen(4))),
            "t ignored": sw(ddpm.sample_ddpm(t_ignored, sched, (n, 2), gen(4))),
            "untrained": sw(ddpm.sample_ddim(untrained, sched, (n, 2), gen(4), 50)),
        }
    print(
        f"sliced W2: floor {floor:.4f} | "
        + " | ".join(f"{k} {v:.4f}" for k, v in {**good, **bad}.items())
    )
    assert max(good.values()) < 3 * floor
    assert min(bad.values()) > 3 * max(good.values())


def test_the_reconstruction_error_shrinks_as_steps_grow_and_refining_cuts_it(roll):
    """The trained swiss roll: encoding is not the identity (x_T moves 0.19-0.54 RMS away and has
    std 0.72-1.18), the paper's encoder reconstructs better with more steps, and two fixed-point
    iterations do better than it at every S. Measured (RMS, 2,000 steps): 0.23 / 0.031 / 0.0072 at
    S = 10 / 50 / 200 with the paper's encoder; 0.053 / 0.0009 / 2e-5 refined."""
    _, model = ddpm.load_checkpoint(roll[1], "cpu")
    sched = ddpm.make_schedule("linear", 1000)
    x0 = ddpm.make_swissroll(500, gen(0))
    errors = {0: [], 2: []}
    with torch.no_grad():
        for steps in (10, 50, 200):
            for refine in errors:
                x_T = ddpm.ddim_encode(model, sched, x0, steps, refine)
                back = ddpm.sample_ddim(model, sched, x0.shape, steps=steps, x_T=x_T)
                errors[refine].append((back - x0).pow(2).mean().sqrt().item())
                assert (x_T - x0).pow(2).mean().sqrt() > 0.1 and 0.6 < x_T.std() < 1.4
    paper, refined = errors[0], errors[2]
    print(f"RMS at S = 10 / 50 / 200: paper {paper}, refined {refined}")
    assert all(a > b for a, b in zip(paper, paper[1:])) and paper[-1] < paper[0] / 4
    assert all(r < p / 2 for r, p in zip(refined, paper))


def test_train_writes_a_checkpoint_that_weights_only_load_reads(trained):
    d, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    assert (
        state["step"] == 3
        and state["config"]["model"]["ch"] == 8
        and state["config"]["data_shape"] == [1, 32, 32]
    )


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    write_mnist(tmp_path)
    run = ["train", "--data-dir", str(tmp_path), "--save-every", "2"] + TINY
    assert ddpm.main(run + ["--steps", "5", "--out", str(tmp_path / "straight.pt")]) == 0
    assert ddpm.main(run + ["--steps", "2", "--out", str(tmp_path / "split.pt")]) == 0
    assert (
        ddpm.main(
            run
            + [
                "--steps",
                "5",
                "--out",
                str(tmp_path / "split.pt"),
                "--resume",
                str(tmp_path / "split.pt"),
            ]
        )
        == 0
    )
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("straight.pt", "split.pt"))
    # 48 images / 16 = 3 steps an epoch: the resume crosses an epoch
    assert a["step"] == b["step"] == 5
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_the_defaults_condition_on_labels_when_the_data_has_them(tmp_path):
    """Labelled images: a conditional net, batch 32, lr 1e-3; --no-cond: unconditional; points
    (no labels): unconditional, batch 128, lr 2e-3. A resumed run keeps what it was."""
    write_mnist(tmp_path)
    runs = {
        "images": (f"--data-dir {tmp_path}", TINY[:-2], (True, 10, 32, 1e-3)),
        "no-cond": (f"--data-dir {tmp_path} --no-cond", TINY, (False, 0, 16, 1e-3)),
        "points": ("--dataset swissroll", [], (False, 0, 128, 2e-3)),
    }
    for name, (flags, extra, expected) in runs.items():
        ckpt = str(tmp_path / f"{name}.pt")
        assert cli(f"train {flags} --steps 1 --out {ckpt}", extra) == 0
        config = torch.load(ckpt, weights_only=True)["config"]
        run = config["train"]
        got = (run["cond"], config["model"].get("n_classes", 0), run["batch_size"], run["lr"])
        assert got == expected, name
    ckpt = str(tmp_path / "no-cond.pt")
    assert cli(f"train --data-dir {tmp_path} --resume {ckpt} --steps 2 --out {ckpt}") == 0
    assert torch.load(ckpt, weights_only=True)["config"]["model"]["n_classes"] == 0


def test_training_previews_draw_as_sample_does_without_class(tmp_path, monkeypatch):
    """--sample-every grids of a conditional run: labels drawn from p(y) (not "no label"), the same
    16 each time, and x0_hat clipped, as `sample` draws without --class."""
    write_mnist(tmp_path)
    seen, forward = [], ddpm.UNet.forward
    clips = spy_on_clipping(monkeypatch)

    def recording(self, x, t, y=None):
        if not torch.is_grad_enabled():  # sampling, not a training step
            seen.append((int(t[0]), y))
        return forward(self, x, t, y)

    monkeypatch.setattr(ddpm.UNet, "forward", recording)
    ckpt = tmp_path / "p.pt"
    assert cli(f"train --data-dir {tmp_path} --steps 4 --sample-every 2 --out {ckpt}", TINY) == 0
    assert (tmp_path / "p_step0000002.png").exists() and (tmp_path / "p_step0000004.png").exists()
    freq = torch.load(ckpt, weights_only=True)["config"]["label_freq"]
    drawn = ddpm.draw_labels(freq, 16, torch.Generator().manual_seed(0))
    guided = torch.cat([drawn, torch.full_like(drawn, 10)])  # for 0.3 T <= t <= 0.6 T
    assert len(seen) == 2 * 20  # T = 20: 20 calls
    assert all(torch.equal(y, guided if 6 <= t <= 12 else drawn) for t, y in seen)
    assert clips == [True, True]


def old_unet_keys(ch_mult, n_res, ch=8):
    """The U-Net's parameter names as checkpoints have held them since the first release, spelled
    out from the architecture, not read off the code: a renamed module fails here."""
    block = ["norm1", "conv1", "t_proj", "norm2", "conv2"]
    names = ["time_mlp.0", "time_mlp.2", "conv_in"]
    c, widths = ch, [ch * m for m in ch_mult]
    for i, w in enumerate(widths):
        for j in range(n_res):
            names += [f"down.{i}.{j}.{m}" for m in block] + (
                [f"down.{i}.{j}.skip"] if j == 0 and c != w else []
            )
        names += [f"downsample.{i}"] if i < len(widths) - 1 else []
        c = w
    names += (
        [f"mid1.{m}" for m in block]
        + ["attn.norm", "attn.qkv", "attn.proj"]
        + [f"mid2.{m}" for m in block]
    )
    for k in range(len(widths)):
        for j in range(n_res):
            names += [f"up.{k}.{j}.{m}" for m in block] + ([f"up.{k}.{j}.skip"] if j == 0 else [])
        names += [f"upsample.{k}.1"] if k < len(widths) - 1 else []
    names += ["norm_out", "conv_out"]
    return ["label_emb.weight"] + [f"{n}.{p}" for n in names for p in ("weight", "bias")]


OLD_TRAIN_CONFIG = dict(  # every key the first releases' argparse wrote into config["train"]
    cmd="train",
    device="auto",
    precision="fp32",
    seed=0,
    dataset="mnist",
    data_dir="unused",
    image_size=32,
    cond=False,
    p_uncond=0.1,
    out="ckpt.pt",
    resume=None,
    save_every=None,
    sample_every=0,
    ch=8,
    ch_mult=[1, 2],
    n_res=1,
    schedule="linear",
    T=20,
    epochs=30,
    steps=3,
    batch_size=16,
    lr=2e-4,
    ema_decay=0.9999,
)


def test_a_checkpoint_in_the_format_of_earlier_releases_loads_samples_and_resumes(tmp_path):
    write_mnist(tmp_path)
    torch.manual_seed(0)
    model = ddpm.UNet(1, ch=8, ch_mult=(1, 2), n_res=1)
    names = old_unet_keys((1, 2), 1)
    assert sorted(model.state_dict()) == sorted(names)
    weights = {k: model.state_dict()[k] for k in names}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    old = {
        "config": {
            "model": {"ch": 8, "ch_mult": [1, 2], "n_res": 1, "n_classes": 0},
            "data_shape": [1, 32, 32],
            "train": OLD_TRAIN_CONFIG,
        },
        "model": weights,
        "ema": weights,
        "opt": opt.state_dict(),
        "step": 3,
        "ema_n": 3,
    }
    torch.save(old, tmp_path / "old.pt")
    assert (
        cli(
            f"sample --ckpt {tmp_path / 'old.pt'} --sampler ddim --steps 3 --n 2 "
            f"--out {tmp_path / 'old.png'}"
        )
        == 0
    )
    assert (
        cli(
            f"train --resume {tmp_path / 'old.pt'} --data-dir {tmp_path} --steps 5 "
            f"--out {tmp_path / 'resumed.pt'}"
        )
        == 0
    )
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert resumed["step"] == 5  # the same model, its config now naming its output channels
    assert resumed["config"]["model"] == {**old["config"]["model"], "out_ch": None}
    mlp = ddpm.MLP(2, ch=8, n_res=2)
    assert sorted(mlp.state_dict()) == sorted(
        f"{n}.{p}"
        for n in ["time_mlp.0", "time_mlp.2", "x_in", "x_out"]
        + [f"blocks.{i}.{j}" for i in range(2) for j in range(3)]
        for p in ("weight", "bias")
    )


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, port, root):
    """One process of a torchrun-like group (gloo): records every batch it trains on and its
    weights."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    batches, weights = [], []
    step = ddpm.train_step

    def recording(net, ema, opt, x0, *args):
        loss = step(net, ema, opt, x0, *args)
        batches.append(x0.clone())
        weights[:] = [p.detach().clone() for p in net.parameters()]
        return loss

    ddpm.train_step = recording
    code = cli(
        f"train --data-dir {root} --steps 6 --precision fp32 --out {os.path.join(root, 'ddp.pt')}",
        TINY,
    )
    torch.save(
        {"code": code, "batches": batches, "weights": weights}, os.path.join(root, f"rank{rank}.pt")
    )


def test_two_processes_read_disjoint_shards_and_keep_the_same_weights(tmp_path):
    """Each rank reads its own slice of the epoch's order (if both read the same images, this
    fails), the two slices together are the epoch's first 2 x 16 images, and averaged gradients keep
    the weights equal."""
    write_mnist(tmp_path)
    torch.multiprocessing.start_processes(
        ddp_worker, (2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["code"] == r1["code"] == 0 and len(r0["batches"]) == len(r1["batches"]) == 6
    pool = ddpm.to_model_range(ddpm.load_data("mnist", str(tmp_path))[0]).flatten(1)
    for step, (a, b) in enumerate(zip(r0["batches"], r1["batches"])):
        # which data images rank 0 read
        ia = (a.flatten(1)[:, None] == pool[None]).all(-1).nonzero()[:, 1]
        ib = (b.flatten(1)[:, None] == pool[None]).all(-1).nonzero()[:, 1]
        assert len(ia) == len(ib) == 16 and not set(ia.tolist()) & set(ib.tolist())
        # 1 step an epoch
        epoch_order = torch.randperm(48, generator=torch.Generator().manual_seed(step))
        assert (
            ia.tolist() == epoch_order[:16].tolist() and ib.tolist() == epoch_order[16:32].tolist()
        )
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(r0["weights"], r1["weights"]))
    # rank 0 saved the single-process format
    state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert set(state) == {"config", "model", "ema", "opt", "step", "ema_n"} and state["step"] == 6
    assert all(torch.allclose(state["model"][k], p) for k, p in zip(state["model"], r0["weights"]))


def train_until_first_save(tmp_path, launcher=()):
    """A long training run in a subprocess (through `launcher`, e.g. torchrun), returned once its
    first checkpoint (after 2 steps) is on disk."""
    write_mnist(tmp_path)
    out = tmp_path / "ckpt.pt"
    run = f"train --data-dir {tmp_path} --steps 100000 --save-every 2 --out {out}".split()
    command = [sys.executable, *launcher, ddpm.__file__, *run, *TINY]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not out.exists() and proc.poll() is None:
        time.sleep(0.05)
    return proc, out


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    """A preempted job: SIGTERM mid-run ends the step, saves, and exits 128 + 15."""
    proc, out = train_until_first_save(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "--resume" in err
    assert 2 <= torch.load(out, weights_only=True)["step"] < 100000


def test_torchrun_trains_on_two_processes_and_sigterm_stops_both_after_the_same_step(tmp_path):
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc, out = train_until_first_save(tmp_path, torchrun)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stops = dict(re.findall(r"rank (\d): stopped by signal 15 after step (\d+)", stderr))
    assert sorted(stops) == ["0", "1"] and stops["0"] == stops["1"], stderr
    assert stdout.count("saved") == 1 and "2 process(es) x batch 16" in stdout
    assert torch.load(out, weights_only=True)["step"] == int(stops["0"]) >= 2


# -------------------------------------------------------------------------------------------------
# The command line, end to end on tiny data, and bad input


def test_sample_writes_png_npz_and_gif(trained):
    d, ckpt = trained
    for ext in ("png", "npz", "gif"):
        assert cli(f"sample --ckpt {ckpt} --sampler ddim --n 6 --out {d / f's.{ext}'}") == 0
    png, images = Image.open(d / "s.png"), np.load(d / "s.npz")["images"]
    assert png.size == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns, 2 rows of 32 px, 2 px padding
    assert images.shape == (6, 1, 32, 32) and images.dtype == np.uint8
    # the same samples in both files
    assert np.array_equal(np.asarray(png)[2:34, 2:34], images[0, 0])
    gif = Image.open(d / "s.gif")
    first = np.asarray(gif.convert("L"))
    gif.seek(gif.n_frames - 1)  # the animation starts from noise and ends on the samples
    assert np.array_equal(np.asarray(gif.convert("L")), np.asarray(png)) and not np.array_equal(
        first, np.asarray(png)
    )


def spy_on_clipping(monkeypatch):  # a True each time an eps-model is wrapped in ddpm.clipped
    clips, clipped = [], ddpm.clipped

    def clipping(*args):
        clips.append(True)
        return clipped(*args)

    monkeypatch.setattr(ddpm, "clipped", clipping)
    return clips


def test_sample_clips_x0_of_images_unless_told_not_to(trained, monkeypatch):
    d, ckpt = trained
    clips = spy_on_clipping(monkeypatch)
    for flags, clip in (("", True), ("--no-clip", False)):
        clips.clear()
        out = d / "clip.npz"
        assert cli(f"sample --ckpt {ckpt} --sampler ddim --steps 2 --n 2 --out {out} {flags}") == 0
        assert clips == [True] * clip, flags


def test_same_seed_gives_the_same_file(trained):
    d, ckpt = trained
    files = []
    for i, seed in enumerate(["1", "1", "2"]):
        files.append(str(d / f"seed{i}.png"))
        assert (
            cli(
                f"sample --ckpt {ckpt} --sampler ddim --eta 1 --n 4 --seed {seed} --out {files[-1]}"
            )
            == 0
        )
    data = [open(f, "rb").read() for f in files]
    assert data[0] == data[1] and data[0] != data[2]


def test_sample_ddpm_with_fewer_steps_is_algorithm_2_on_the_sub_sequence(trained, monkeypatch):
    d, ckpt = trained
    seen = spy_on_labels(monkeypatch)
    out = d / "hat.npz"
    for sigma2 in ("beta", "beta_tilde"):
        seen.clear()
        command = f"sample --ckpt {ckpt} --sampler ddpm --steps 5 --sigma2 {sigma2} --out {out}"
        assert cli(command, ["--n", "4"]) == 0 and len(seen) == 5


def test_unconditional_samples_of_a_conditional_net_draw_labels_from_the_training_frequencies(
    tmp_path, monkeypatch
):
    """The checkpoint stores p(y) of the training labels; sample without --class gives each sample a
    label drawn from it (never "no label"), and --class none feeds "no label" only."""
    write_mnist(tmp_path, n=48)  # labels i % 10: 5 of each of 0..7, 4 of 8 and 9
    ckpt = str(tmp_path / "cond.pt")
    assert cli(f"train --data-dir {tmp_path} --steps 1 --out {ckpt} --cond", TINY) == 0
    freq = torch.load(ckpt, weights_only=True)["config"]["label_freq"]
    assert freq == pytest.approx([5 / 48] * 8 + [4 / 48] * 2)
    calls, forward = [], ddpm.UNet.forward

    def recording(self, x, t, y=None):
        calls.append((int(t[0]), torch.full_like(t, 10) if y is None else y))
        return forward(self, x, t, y)

    def seen():  # {t: labels}, after checking there was one call per t, from T = 20 down to 1
        assert [t for t, _ in calls] == list(range(20, 0, -1))
        return dict(calls)

    monkeypatch.setattr(ddpm.UNet, "forward", recording)
    args = ["sample", "--ckpt", ckpt, "--sampler", "ddim", "--steps", "20", "--n", "100"]
    assert ddpm.main(args + ["--out", str(tmp_path / "u.npz")]) == 0  # T = 20: every t, 20..1
    y = seen()[1]
    assert len(y) == 100 and y.max() < 10 and len(y.unique()) == 10  # never "no label"
    # guided (each label next to "no label", one call) for 0.3 T <= t <= 0.6 T, T = 20: 6..12
    y_none = torch.cat([y, torch.full_like(y, 10)])
    assert all(torch.equal(y_t, y_none if 6 <= t <= 12 else y) for t, y_t in seen().items())
    small = args[:-1] + ["20"]  # the rest checks which label each call gets: 20 samples do
    calls.clear()
    assert ddpm.main(small + ["--class", "none", "--out", str(tmp_path / "n.npz")]) == 0
    assert all((y_t == 10).all() for y_t in seen().values())
    for flags, guided_t in (("--guidance 0", []), ("--guidance 1 --guidance-t 2,19", range(2, 20))):
        calls.clear()
        assert ddpm.main(small + flags.split() + ["--out", str(tmp_path / "g.npz")]) == 0
        y = seen()[1]  # t = 1 is unguided here: the drawn labels
        y_none = torch.cat([y, torch.full_like(y, 10)])
        assert len(y) == 20 and y.max() < 10
        assert all(torch.equal(y_t, y_none if t in guided_t else y) for t, y_t in seen().items())


def test_cond_cli_trains_and_samples_a_class_and_all_classes(tmp_path, capsys):
    write_mnist(tmp_path)
    ckpt = str(tmp_path / "cond.pt")
    assert cli(f"train --data-dir {tmp_path} --steps 3 --out {ckpt} --cond", TINY) == 0
    assert torch.load(ckpt, weights_only=True)["config"]["model"]["n_classes"] == 10
    assert (
        cli(
            f"sample --ckpt {ckpt} --sampler dpm --steps 4 --class 7 --n 4 "
            f"--out {tmp_path / 'seven.png'}"
        )
        == 0
    )
    assert (
        cli(
            f"sample --ckpt {ckpt} --sampler dpm --steps 4 --class all --out {tmp_path / 'all.png'}"
        )
        == 0
    )
    assert Image.open(tmp_path / "all.png").size == (10 * 34 + 2, 10 * 34 + 2)  # a row per class
    assert cli(f"sample --ckpt {ckpt} --class 10 --out {tmp_path / 'x.png'}") == 2
    assert "--class 10: 0..9 or all" in capsys.readouterr().err
    assert cli(f"sample --ckpt {ckpt} --class none --guidance 2 --out {tmp_path / 'x.png'}") == 2
    assert "--class none: 0..9 or all" in capsys.readouterr().err  # "no label" cannot be guided
    assert (
        cli(f"sample --ckpt {ckpt} --class none --guidance-t 1,9 --out {tmp_path / 'x.png'}") == 2
    )
    assert "--class none: 0..9 or all" in capsys.readouterr().err
    for bad in ("600,300", "300"):
        assert cli(f"sample --ckpt {ckpt} --guidance-t {bad} --out {tmp_path / 'x.png'}") == 2
        assert f"--guidance-t {bad}: two values LO,HI with LO <= HI" in capsys.readouterr().err
    plain = str(tmp_path / "plain.pt")
    assert cli(f"train --data-dir {tmp_path} --steps 1 --out {plain} --no-cond", TINY) == 0
    for flag in (["--class", "3"], ["--guidance", "1"]):
        assert cli(f"sample --ckpt {plain} --out {tmp_path / 'x.png'}", flag) == 2
        assert "unconditional net" in capsys.readouterr().err
    assert cli(f"train --dataset swissroll --cond --out {tmp_path / 'r.pt'}") == 2
    assert "swissroll has no labels" in capsys.readouterr().err


def test_cond_on_an_image_folder_end_to_end(tmp_path):
    write_folder(tmp_path / "photos", sizes=[(48, 16), (16, 48)])
    ckpt = str(tmp_path / "c.pt")
    assert (
        ddpm.main(
            [
                "train",
                "--dataset",
                str(tmp_path / "photos"),
                "--image-size",
                "16",
                "--cond",
                "--steps",
                "2",
                "--out",
                ckpt,
            ]
            + TINY[:-2]
            + ["--batch-size", "4"]
        )
        == 0
    )
    assert torch.load(ckpt, weights_only=True)["config"]["model"]["n_classes"] == 2
    assert (
        cli(
            f"sample --ckpt {ckpt} --class all --sampler ddim --steps 3 "
            f"--out {tmp_path / 'all.npz'}"
        )
        == 0
    )
    assert np.load(tmp_path / "all.npz")["images"].shape == (4, 3, 16, 16)  # 2 classes x 2


def test_sample_without_ckpt_uses_the_shipped_half_precision_model_and_says_so(
    trained, tmp_path, monkeypatch, capsys
):
    """samples/ ships EMA weights in fp16 with the configuration only; sample reads them into
    fp32."""
    d, ckpt = trained
    full = torch.load(ckpt, weights_only=True)
    shipped = {
        "config": full["config"],
        "step": full["step"],
        "ema": {k: v.half() for k, v in full["ema"].items()},
    }
    torch.save(shipped, tmp_path / "mnist.pt")
    monkeypatch.setattr(ddpm, "SHIPPED", str(tmp_path / "mnist.pt"))
    args = ["sample", "--sampler", "ddim", "--steps", "5", "--n", "4"]
    assert ddpm.main(args + ["--out", str(tmp_path / "a.npz")]) == 0
    assert "shipped in samples/" in capsys.readouterr().out
    assert ddpm.main(args + ["--ckpt", ckpt, "--out", str(tmp_path / "b.npz")]) == 0
    a, b = (np.load(tmp_path / f)["images"].astype(int) for f in ("a.npz", "b.npz"))
    # fp16 rounding of the weights moves pixels by less than 2 levels
    assert np.abs(a - b).mean() < 2


def test_the_shipped_model_is_small_half_precision_conditional_and_samples_every_class(tmp_path):
    """samples/mnist.pt is what `python ddpm.py sample` uses on a fresh clone (README: how it was
    trained)."""
    assert os.path.getsize(ddpm.SHIPPED) <= 8_000_000
    state = torch.load(ddpm.SHIPPED, weights_only=True)
    config = state["config"]
    assert set(state) == {"config", "ema", "step"}
    assert all(v.dtype == torch.float16 for v in state["ema"].values())
    assert config["model"]["n_classes"] == 10 and config["data_shape"] == [1, 32, 32]
    # p(y) of MNIST's training labels, for unconditional samples: every digit 9-12%
    assert len(config["label_freq"]) == 10 and sum(config["label_freq"]) == pytest.approx(1)
    assert 0.09 < min(config["label_freq"]) and max(config["label_freq"]) < 0.12
    # no paths of the machine that trained it
    assert not {"data_dir", "out", "resume"} & set(config["train"])
    out = str(tmp_path / "s.npz")
    assert cli(f"sample --sampler dpm --steps 5 --class all --out {out}") == 0
    assert np.load(out)["images"].shape == (100, 1, 32, 32)


def test_swissroll_cli_writes_png_npz_gif_and_reports_the_distance(roll, capsys):
    d, ckpt = roll
    for ext in ("png", "npz", "gif"):
        assert (
            cli(f"sample --ckpt {ckpt} --sampler ddim --steps 20 --n 500 --out {d / f'r.{ext}'}")
            == 0
        )
    assert capsys.readouterr().out.count("sliced W2 to fresh data") == 3
    points = np.load(d / "r.npz")["points"]
    assert points.shape == (500, 2) and points.dtype == np.float32
    assert np.abs(points).max() > 1.1  # the roll reaches 1.5: points are never clipped to [-1, 1]
    png = np.asarray(Image.open(d / "r.png"))
    # one black pixel per point, some shared
    assert png.shape == (256, 256) and 100 < (png == 0).sum() <= 500
    ij = np.round((np.clip(points, -1.5, 1.5) + 1.5) * 255 / 3).astype(int)
    assert (png[255 - ij[:, 1], ij[:, 0]] == 0).all()  # y grows upwards
    gif = Image.open(d / "r.gif")
    gif.seek(gif.n_frames - 1)
    assert np.array_equal(np.asarray(gif.convert("L")), png)


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--ckpt", "{d}/missing.pt"], "no checkpoint at"),
        (["sample", "--ckpt", "{d}/corrupt.pt"], "corrupt.pt is not a ddpm.py checkpoint"),
        (
            ["sample", "--ckpt", "{d}/other_arch.pt"],
            "weights that fit the architecture it names (RuntimeError)",
        ),
        (["sample", "--sampler", "ddim", "--steps", "0"], "--steps must be at least 1"),
        (["sample", "--sampler", "ddim", "--steps", "21"], "--steps 21"),
        (["sample", "--sampler", "ddim", "--sigma2", "beta"], "DDIM's is --eta"),
        (["sample", "--eta", "-0.5"], "--eta -0.5: DDIM's eta"),
        (["sample", "--eta", "1.5"], "--eta 1.5: DDIM's eta"),
        (["sample", "--sampler", "dpm", "--eta", "0.5"], "DPM-Solver++(2M) takes none"),
        (["sample", "--n", "0"], "--n must be at least 1"),
        (["sample", "--out", "{d}/no/such/folder/x.png"], "its folder is missing or not writable"),
        (["sample", "--out", "{d}/keep.jpg"], "use .png"),
        (
            ["train", "--resume", "{d}/corrupt.pt", "--out", "{d}/keep.png"],
            "is not a ddpm.py checkpoint",
        ),
        (
            ["train", "--dataset", "{d}/no_such_folder", "--out", "{d}/keep.png"],
            "neither a known data set nor",
        ),
        (["train", "--T", "1", "--out", "{d}/keep.png"], "--T must be at least 2"),
        (["train", "--resume", "{d}/ema_only.pt", "--out", "{d}/keep.png"], "EMA weights only"),
        (["sample", "--device", "nope"], "--device nope: not a device"),
        (["train", "--device", "nope", "--out", "{d}/keep.png"], "--device nope: not a device"),
        (["sample", "--device", "cuda:99"], "--device cuda:99: this machine has"),
        pytest.param(
            ["sample", "--device", "cuda"],
            "--device cuda: this machine has 0 cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        (["sample", "--device", "meta"], "--device meta: ddpm.py runs on"),
        (["sample", "--device", "cpu:1"], "--device cpu:1: this machine has 1 cpu"),
        (
            ["train", "--data-dir", "{d}", "--ch-mult", "1,2,2,2,2,2,2", "--out", "{d}/keep.png"],
            "--ch-mult 1,2,2,2,2,2,2: 7 levels halve the images 6 times",
        ),
        (["train", "--ch-mult", "2,0", "--out", "{d}/keep.png"], "--ch-mult must be positive"),
        (["train", "--lr", "-1", "--out", "{d}/keep.png"], "--lr must be a number above 0"),
        (["train", "--lr", "nan", "--out", "{d}/keep.png"], "--lr must be a number above 0"),
        (["train", "--p-uncond", "2", "--out", "{d}/keep.png"], "--p-uncond must be a probability"),
        (["train", "--ema-decay", "1", "--out", "{d}/keep.png"], "--ema-decay must be in [0, 1)"),
        (["train", "--save-every", "0", "--out", "{d}/keep.png"], "--save-every must be at least"),
        (["train", "--sample-every", "-1", "--out", "{d}/keep.png"], "--sample-every must be at"),
        (["sample", "--guidance", "inf"], "--guidance must be a finite number"),
        (["sample", "--guidance-t", "nan,600"], "--guidance-t must be numbers, not nan"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(trained, capsys, args, message):
    fails_in_one_line(*trained, capsys, args, message)


class RunsCode:  # unpickled, it creates a file: what a malicious checkpoint would do instead
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_runs_nothing(trained, capsys):
    d, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    marker = d / "the_code_ran"
    state["config"]["train"]["note"] = RunsCode(str(marker))
    torch.save(state, d / "evil.pt")
    assert not marker.exists()
    for command in (f"sample --ckpt {d / 'evil.pt'}", f"train --resume {d / 'evil.pt'}"):
        assert cli(command, ["--out", str(d / "evil_out.png")]) == 2
        err = capsys.readouterr().err
        assert "pickles" in err and "could run code" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (d / "evil_out.png").exists()


def test_mnist_absent_and_no_network_names_the_flag(tmp_path, capsys, monkeypatch):
    import torchvision

    def offline(self):
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried ..., got: <urlopen error>"
        )

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    assert cli(f"train --data-dir {tmp_path / 'empty'} --out {tmp_path / 'c.pt'}") == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and len(err.strip().splitlines()) == 1


def test_unknown_sampler_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli("sample --sampler euler")
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_index_names_only_tests_that_exist():
    """Every test name the index at the top of this file gives is a test here or in experiments/
    (the index's other words with an underscore are the papers' symbols)."""
    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(here, "experiments")
    files = [f for f in os.listdir(folder) if f.endswith(".py")]
    sources = "".join(open(os.path.join(folder, f)).read() for f in files)
    defined = set(re.findall(r"^def (test_\w+)", sources, re.M)) | set(globals())
    index = __doc__[__doc__.index("Index:") :]
    names = set(re.findall(r"\b[a-z0-9]+(?:_[a-zA-Z0-9]+)+\b", index))
    names -= {"beta_tilde", "sigma_hat", "sigma_t", "x0_hat", "x_0", "x_t"}
    names -= {"test_nll", "test_reconstruct", "test_interpolate", "test_table2"}  # experiments/
    assert len(names) > 40 and not {n for n in names if f"test_{n}" not in defined}


def test_experiments_use_the_stated_api_of_ddpm_py_and_all_of_it():
    """The scripts in experiments/ reach ddpm.py only through the names of ddpm.__all__, and every
    name listed there is used by one of them (the list is the API, not a wish list)."""
    here = os.path.dirname(os.path.abspath(__file__))
    import ast

    used = set()
    for name in os.listdir(os.path.join(here, "experiments")):
        if name.endswith(".py") and not name.startswith("test_"):
            with open(os.path.join(here, "experiments", name)) as f:
                nodes = ast.walk(ast.parse(f.read()))
            attributes = [n for n in nodes if isinstance(n, ast.Attribute)]
            used |= {a.attr for a in attributes if getattr(a.value, "id", None) == "ddpm"}
    assert used == set(ddpm.__all__), (used - set(ddpm.__all__), set(ddpm.__all__) - used)
    assert all(hasattr(ddpm, name) for name in ddpm.__all__)


def test_every_name_in_ddpm_py_is_defined_before_it_is_used():
    """README's promise, read off the syntax tree: no top-level definition of ddpm.py refers to a
    module-level name of ddpm.py that is defined further down (the `if __name__` block aside)."""
    import ast

    with open(ddpm.__file__) as f:
        tree = ast.parse(f.read())
    defined = {}  # name: the line of its first definition
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
        targets += [t for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for t in targets:
            defined.setdefault(getattr(t, "name", None) or t.id, node.lineno)
    late = []
    for node in tree.body:
        if isinstance(node, ast.If):  # if __name__ == "__main__"
            continue
        names = [n for n in ast.walk(node) if isinstance(n, ast.Name)]
        local = {n.id for n in names if isinstance(n.ctx, ast.Store)}
        local |= {
            a.arg
            for n in ast.walk(node)
            if isinstance(n, ast.arguments)
            for a in n.args + n.kwonlyargs
        }
        for n in names:
            if n.id not in local and defined.get(n.id, 0) > node.lineno:
                late.append(f"{n.id} (line {defined[n.id]}) in line {node.lineno}")
    assert not late, late

"""Tests of experiments/nll.py: the importance-sampled estimator of eq. (5) is unbiased and agrees
with the full sum, and the command prints every branch, region and step, or fails in one line."""

import math

import nll
import pytest
import torch
from PIL import Image

import ddpm
from conftest import (
    F64,
    TINY,
    cli,
    fails_in_one_line,
    gen,
    oracle_eps,
    pixel_grid_image,
    toy_eps,
    write_mnist,
)


def test_the_weighted_draws_of_t_are_unbiased_for_any_sum_over_t():
    """sum_i w_i f(t_i) over the k draws of draw_steps has mean sum_{t=2}^T f(t) (and so for each
    partial sum of the rate): checked for terms that fall as t^-1.3 and for an indicator, over
    20,000 images, against 5 standard errors."""
    T, n, k = 1000, 20_000, 4
    t, w = nll.draw_steps(T, n, k, gen(0))
    assert t.min() >= 2 and t.max() <= T
    for f in (lambda s: s.double() ** -1.3, lambda s: (s >= 300).double()):
        estimates = (w * f(t)).sum(1)
        exact = f(torch.arange(2, T + 1)).sum()
        se = estimates.std() / math.sqrt(n)
        assert abs(estimates.mean() - exact) < 5 * se


def test_the_cheap_bound_agrees_with_the_full_sum_and_broken_means_raise_it():
    """bound_pass with k = 4 draws of t against every t, each over 1,000 copies of one image (each
    copy its own x_t draws) with toy_eps, T = 100: the means agree within 5 standard errors. And
    with the exact noise the bound is smallest: an eps-model that ignores t, or takes alpha_bar one
    index off, raises it."""
    sched = ddpm.make_schedule("linear", 100)
    x0 = pixel_grid_image((1, 1, 4, 4), 1).expand(1000, -1, -1, -1)

    def total(eps_model, k, seed):  # per image, sigma^2 = beta_tilde, in nats
        L_T, kl, l0, _ = nll.bound_pass(lambda i: eps_model, x0, sched, k, gen(seed))
        return (L_T + kl[0] + l0[0]).flatten(1).sum(1)

    cheap, full = total(toy_eps, 4, 0), total(toy_eps, None, 1)
    se = math.sqrt(cheap.var() / len(cheap) + full.var() / len(full))
    assert abs(cheap.mean() - full.mean()) < 5 * se
    exact = oracle_eps(x0, sched)

    def off_by_one(xt, t):  # alpha_bar_{t-1} where alpha_bar_t belongs (alpha_bar_1 at t = 1)
        ab = sched.alpha_bar[(t - 1).clamp(min=1)].reshape(-1, 1, 1, 1)
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()

    best = total(exact, None, 2).mean()
    assert total(lambda xt, t: exact(xt, torch.full_like(t, 50)), None, 2).mean() > best + 1
    assert total(off_by_one, None, 2).mean() > best + 1


def test_nll_prints_the_bound_of_both_branches_the_original_pixels_and_rate_distortion(
    trained, capsys
):
    d, ckpt = trained
    out = d / "progressive.png"
    command = f"nll --ckpt {ckpt} --data-dir {d} --n 20 --n-rd 8 --batch-size 8 --out {out}"
    assert cli(command, ["--plot", str(d / "rd.png")]) == 0
    assert Image.open(d / "rd.png").size[0] > 500  # Fig. 5's three panels
    text = capsys.readouterr().out
    for what in ("own label", "no label, first 8", "over 1024 dimensions", "original 784-pixel"):
        assert what in text
    rows = [line for line in text.splitlines() if line.startswith(("  own label", "  no label"))]
    assert len(rows) == 8 and all("sigma^2 = beta" in row for row in rows)  # 2 x 2 x 2 regions
    assert text.count(" | ") >= 11 and "rate and distortion" in text
    totals = [float(row.split("sigma^2 = ")[1].split()[1]) for row in rows]
    for a, b in zip(totals[:4], totals[4:]):  # the same bits an image, over the 784 digit pixels
        assert b == pytest.approx(a * 1024 / 784, abs=2e-4)
    l0 = [float(row.split("L_T / sum L_t-1 / L_0 ")[1].split(" / ")[2].split()[0]) for row in rows]
    for i in (1, 3, 5, 7):  # under beta, Ho et al.'s variant takes beta_tilde's L_0 (the row above)
        ho = float(rows[i].split("(Ho et al.'s code) ")[1].split()[0])
        assert ho == pytest.approx(totals[i] - l0[i] + l0[i - 1], abs=3e-4)
    assert Image.open(out).size == (12 * 34 + 2, 8 * 34 + 2)  # 8 digits: 11 steps and the image


def test_nll_of_an_unconditional_net_has_one_branch_and_no_label_term(tmp_path, capsys):
    write_mnist(tmp_path)
    ckpt = tmp_path / "plain.pt"
    assert cli(f"train --data-dir {tmp_path} --no-cond --steps 2 --out {ckpt}", TINY) == 0
    capsys.readouterr()
    assert cli(f"nll --ckpt {ckpt} --data-dir {tmp_path} --n 10 --n-rd 4") == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    rows = [row for row in rows if "sigma^2 = beta" in row]  # not the rate-distortion rows
    assert len(rows) == 4 and all(row.startswith("  unconditional") for row in rows)
    assert not any("p(y)" in row for row in rows)


def test_nll_on_points_is_one_line(roll, capsys):
    assert cli(f"nll --ckpt {roll[1]}") == 2
    err = capsys.readouterr().err
    assert "8-bit image" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["nll", "--ckpt", "{d}/ckpt.pt", "--n", "0"], "--n must be at least 1"),
        (["nll", "--ckpt", "{d}/ckpt.pt", "--t-draws", "0"], "--t-draws must be at least 1"),
        (
            ["nll", "--ckpt", "{d}/ckpt.pt", "--data-dir", "{d}", "--n", "49"],
            "--n 49: the mnist test split has 48 images",
        ),
        (["nll", "--ckpt", "{d}/ckpt.pt", "--out", "{d}/keep.jpg"], "is a .png"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(trained, capsys, args, message):
    fails_in_one_line(*trained, capsys, args, message)


def test_the_rate_received_down_to_each_t_sums_the_terms_from_t_up():
    """With the exact eps of the image (oracle_eps), p_theta's mean is the posterior's: every
    L_{t-1} is 0 under beta_tilde and D (r - 1 - log r) / 2 under beta, r = beta_tilde_t / beta_t,
    whatever the draws. The KL received down to each t of rd_steps, sum_{s >= t} L_{s-1}, is then
    that closed form summed over s = max(t, 2)..T (the full sum); at t = 1 it is all of the sum."""
    sched = ddpm.make_schedule("linear", 100)
    x0 = pixel_grid_image((1, 1, 4, 4), 1).expand(3, -1, -1, -1)
    r = sched.beta_tilde / sched.beta
    per_t = 16 * 0.5 * (r - 1 - r.log())  # nats an image at each t; t = 0, 1 unused
    steps = nll.rd_steps(100)
    expected = torch.tensor([per_t[max(t, 2) :].sum() for t in steps], dtype=F64)
    _, kl, _, received = nll.bound_pass(lambda i: oracle_eps(x0[i], sched), x0, sched, None, gen(0))
    assert received[0].abs().max() < 1e-9  # beta_tilde
    assert torch.allclose(received[1], expected.expand(3, -1), rtol=1e-9)
    assert torch.allclose(received[1, :, -1], kl[1].flatten(1).sum(1), rtol=1e-9)

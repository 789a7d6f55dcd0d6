"""Two experts in one reverse process: the shipped model above t0, the likelihood model below.

    python experiments/experts.py sample --t0 100 --out experts100.npz   # quality.py judges it
    python experiments/experts.py bound --data-dir ../shared/data        # every t0, the test split

Table 2's contradiction, resolved.
The shipped model (samples/mnist.pt, L_simple) samples well and bounds the test digits by 1.75
bits per pixel; the likelihood model (samples/eps_L_v.pt, L with Nichol & Dhariwal's Sigma)
bounds them by 0.97 and samples badly. The rate sits at small t, the digit is decided at large t
(experiments/README.md). So p_theta(x_{t-1} | x_t) = N(mean, var) here is, for t > t0, the shipped
model's: eq. (11)'s mean from its eps, told labels y ~ p(y) and guided as `ddpm.py sample` without
--class guides them (ddpm.unconditional_labels), var = beta_tilde_t; and for t <= t0 the
likelihood model's eps and learned var (table2.reverse_process). t0 = 0 is the shipped model
alone, t0 = T the likelihood model alone. x0_hat is not clipped: the bound is of the process
sampled.

The bound is eq. (5) of that very process, estimated as nll.py estimates it (4 draws of t an image
from q(t) ~ t^-1.25, L_0 and L_T exactly), with each test image's own label and its -log p(y) (for
t0 < T: the process draws y), the eps guided as in sampling. Both experts' terms come from the same
draws, so one pass gives every t0 of --t0s.
"""

import math
import os

import common
import nll
import table2
import torch

import ddpm

LIKELIHOOD = os.path.join(os.path.dirname(ddpm.SHIPPED), "eps_L_v.pt")
FLOWS = {"Residual Flows": 0.97, "FFJORD": 0.99, "Glow": 1.05, "RealNVP": 1.06}  # bits per pixel


def load_experts(args, device):
    """(the shipped model, its label frequencies, the likelihood model, the schedule, the data's
    shape): the first a ddpm.py checkpoint, the second a table2.py cell with eps and a
    v-interpolated Sigma, both on one schedule."""
    shipped_ckpt, shipped = ddpm.load_checkpoint(args.shipped, device)
    lik_ckpt, lik = ddpm.load_checkpoint(args.likelihood, device)
    runs = shipped_ckpt["config"]["train"], lik_ckpt["config"]["train"]
    if "cell" in runs[0]:
        raise ddpm.UserError(f"--shipped {args.shipped}: a table2.py cell, not a ddpm.py model")
    if table2.CELLS.get(runs[1].get("cell"), ("",) * 2)[:2] != ("eps", "v"):
        why = "not a table2.py cell with eps and a v-interpolated Sigma (eps_L_v, eps_hybrid_v)"
        raise ddpm.UserError(f"--likelihood {args.likelihood}: {why}")
    if (runs[0]["schedule"], runs[0]["T"]) != (runs[1]["schedule"], runs[1]["T"]):
        raise ddpm.UserError("--shipped and --likelihood were trained on different schedules")
    K = shipped.config["n_classes"]
    label_freq = shipped_ckpt["config"].get("label_freq") or [1 / K] * K
    sched = ddpm.make_schedule(runs[0]["schedule"], runs[0]["T"])
    return shipped, label_freq, lik, sched, tuple(lik_ckpt["config"]["data_shape"])


@torch.inference_mode()
def sample_experts(shipped_eps, lik_net, t0, sched, shape, generator, steps=None, progress=None):
    """Algorithm 2 on `steps` of DDIM's sub-sequence (ddpm.respace; None: all T), step i at t =
    tau_i: for t > t0 the shipped expert's eps and sigma^2 = beta_tilde' of the sub-sequence (as
    ddpm.sample_ddpm), for t <= t0 the likelihood expert's eps and its own variance, carried to the
    sub-sequence by table2.step_variance (as table2.sample_cell); the mean is eq. (11) on the
    respaced schedule. No noise at the last step."""
    sub, tau = ddpm.respace(sched, steps) if steps else (sched, torch.arange(sched.T + 1))
    sigma = ddpm.sigma2_choice(sub, "beta_tilde").sqrt()
    x = ddpm.initial_noise(shape, generator)
    for step in range(sub.T, 0, -1):
        i = torch.full((shape[0],), step, dtype=torch.long, device=x.device)
        t = tau.to(x.device)[i]
        z = ddpm.noise_like(x, generator) if step > 1 else 0
        if tau[step] > t0:  # the shipped expert
            eps = shipped_eps(x, t).to(x.dtype)
            std = ddpm.gather(sigma, i, x)
        else:  # the likelihood expert
            _, var, eps = table2.reverse_process(lik_net(x, t).to(x.dtype), x, t, sched, "eps", "v")
            std = table2.step_variance(var, t, i, sched, sub).sqrt()
        x = ddpm.p_mean(x, i, eps, sub) + std * z
        if progress:
            progress.tick(steps=len(x))
    return x


def sample(args):
    device, precision = ddpm.pick_device(args.device, args.precision)
    if not args.out.endswith((".png", ".npz")):
        raise ddpm.UserError(f"--out {args.out}: a .png grid or an .npz of uint8 images")
    ddpm.check_writable(args.out)
    shipped, label_freq, lik, sched, data_shape = load_experts(args, device)
    common.check_steps([args.steps], sched.T)
    if not 0 <= args.t0 <= sched.T:
        raise ddpm.UserError(f"--t0 {args.t0}: in 0..T = 0..{sched.T}")
    K = shipped.config["n_classes"]
    y, w, t_range = ddpm.unconditional_labels(label_freq, K, args.n, args.seed, sched.T)
    shape = (args.n, *data_shape)
    progress = ddpm.Progress(args.n * (args.steps or sched.T))
    xs = []
    for b in range(0, args.n, args.batch_size):
        gen = torch.Generator(device).manual_seed(hash((args.seed, b)))
        part = (min(args.batch_size, args.n - b), *shape[1:])
        y_b = y if y is None else y[b : b + part[0]].to(device)
        shipped_eps = ddpm.guided(shipped, y_b, w, t_range)
        with ddpm.autocast(device, precision):
            x = sample_experts(shipped_eps, lik, args.t0, sched, part, gen, args.steps, progress)
        xs.append(x)
    ddpm.save_samples(args.out, torch.cat(xs).clamp(-1, 1))
    print(f"wrote {args.out}: {args.n} samples, t0 = {args.t0}, {args.steps or sched.T} steps")
    return 0


@torch.inference_mode()
def bound_pass(shipped_eps_of, lik_net, x0, sched, k, generator):
    """Both experts' terms of eq. (5) for each image of x0, nats per image (summed over its
    dimensions), from the same draws: t and weights w (n, k) from nll.draw_steps; terms (2, n, k),
    the shipped expert's (row 0) and the likelihood expert's (row 1) L_{t-1}; L_0 (2, n); and L_T
    (n,). shipped_eps_of(i): the guided eps-model of the images i."""
    n = len(x0)
    t, w = (a.to(x0.device) for a in nll.draw_steps(sched.T, n, k, generator))
    first = torch.ones(n, dtype=torch.long, device=x0.device)
    every = torch.arange(n, device=x0.device)
    x0_ = x0.double()
    per_image = []
    for tc in [*t.T, first]:  # the k draws, then t = 1 for L_0
        xt = ddpm.q_sample(x0, tc, ddpm.noise_like(x0, generator), sched)
        xt_ = xt.double()
        eps = shipped_eps_of(every)(xt, tc).double()
        var = ddpm.gather(ddpm.sigma2_choice(sched, "beta_tilde"), tc, xt_)
        shipped = ddpm.bound_term(x0_, xt_, tc, ddpm.p_mean(xt_, tc, eps, sched), var, sched)
        out = lik_net(xt, tc).double()
        mean, var, _ = table2.reverse_process(out, xt_, tc, sched, "eps", "v")
        lik = ddpm.bound_term(x0_, xt_, tc, mean, var, sched)
        per_image.append(torch.stack([shipped, lik]).flatten(2).sum(2))  # (2, n)
    terms = torch.stack(per_image[:-1], 2) * w  # (2, n, k), weighted by 1 / (k q(t))
    LT = ddpm.prior_kl(x0, sched).flatten(1).sum(1)
    return t, terms, per_image[-1], LT


def composite(t, terms, l0, LT, minus_log_p_y, t0, T):
    """eq. (5) of the two-expert process for one t0, nats per image (n,): the shipped expert's
    terms for t > t0, the likelihood expert's for t <= t0 (L_0 too, unless t0 = 0), L_T, and
    -log p(y) wherever the process draws a label (t0 < T)."""
    kl = torch.where(t > t0, terms[0], terms[1]).sum(1)
    return LT + kl + (l0[0] if t0 == 0 else l0[1]) + (minus_log_p_y if t0 < T else 0)


def bound(args):
    device, precision = ddpm.pick_device(args.device, args.precision)
    common.check_png(args.plot, "the t0 sweep")
    shipped, label_freq, lik, sched, _ = load_experts(args, device)
    if max(args.t0s) > sched.T or min(args.t0s) < 0:
        raise ddpm.UserError(f"--t0s: each in 0..T = 0..{sched.T}")
    data, labels = ddpm.load_data("mnist", args.data_dir, train=False)
    n = min(args.n or len(data), len(data))
    region = nll.padded_region("mnist", data.shape[1:])
    K = shipped.config["n_classes"]
    _, w, t_range = ddpm.unconditional_labels(label_freq, K, 1, 0, sched.T)  # sampling's guidance
    progress = ddpm.Progress(n * (args.t_draws + 1))
    parts = []  # per batch: (t, terms, l0, LT, -log p(y))
    for b in range(0, n, args.batch_size):
        x0 = ddpm.to_model_range(data[b : min(b + args.batch_size, n)].to(device))
        y = labels[b : b + len(x0)].to(device)
        gen = torch.Generator(device).manual_seed(hash((args.seed, b)))

        def shipped_eps_of(i, y=y):  # each image told its own label, guided as sampled
            return ddpm.guided(shipped, y[i], w, t_range)

        with ddpm.autocast(device, precision):
            t, terms, l0, LT = bound_pass(shipped_eps_of, lik, x0, sched, args.t_draws, gen)
        minus_log_p_y = -torch.tensor(label_freq, dtype=torch.float64)[y.cpu()].log()
        parts.append((t.cpu(), terms.cpu(), l0.cpu(), LT.cpu(), minus_log_p_y))
        progress.tick(steps=len(x0) * (args.t_draws + 1))
    dims = (0, 1, 1, 0, 0)  # the image axis of t, terms, l0, LT, -log p(y)
    t, terms, l0, LT, minus_log_p_y = (torch.cat(p, d) for p, d in zip(zip(*parts), dims))
    D = int(region.sum())  # the padding is deterministic: the same bits over the 784 pixels
    print(f"bound of the two-expert process: {n} mnist test images, {args.t_draws} t an image")
    print(
        "  t0 | bits per pixel of the 28 x 28 digit +- 1 SE | minus the likelihood model's alone,"
    )
    print("     | paired (same images and draws) +- 1 SE | bits/dim over 32 x 32")
    alone = composite(t, terms, l0, LT, minus_log_p_y, sched.T, sched.T) / (D * math.log(2))
    rows = []
    for t0 in args.t0s:
        bits = composite(t, terms, l0, LT, minus_log_p_y, t0, sched.T) / math.log(2)
        bpp, se = (bits / D).mean().item(), (bits / D).std().item() / math.sqrt(n)
        gain = bits / D - alone
        rows.append((t0, bpp, se, gain.mean().item(), gain.std().item() / math.sqrt(n)))
        print(
            f"  {t0:4d} | {bpp:.4f} +- {se:.4f} | {gain.mean():+.4f} +- "
            f"{gain.std() / math.sqrt(n):.4f} | {(bits / data[0].numel()).mean():.4f}"
        )
    if args.plot:
        common.save_plot(args.plot, lambda fig: plot_sweep(fig, rows), (10, 4))
        print(f"wrote {args.plot}")
    return 0


def plot_sweep(fig, rows):
    """Two panels against t0 (log; t0 = 0 drawn at 1): the bound in bits per pixel, zoomed on the
    flows (marked), and its paired difference from the likelihood model alone, +- 2 SE."""
    t0s, bpp, se, gain, gain_se = zip(*rows)
    x = [max(t, 1) for t in t0s]
    ax = fig.add_subplot(1, 2, 1)
    ax.errorbar(x, bpp, yerr=[2 * s for s in se], marker="o", ms=4, capsize=3)
    for name, value in FLOWS.items():
        ax.axhline(value, color="gray", lw=0.8, ls=":")
        ax.text(
            1.0,
            value,
            f" {name} {value}",
            fontsize=7,
            color="gray",
            va="center",
            transform=ax.get_yaxis_transform(),
        )
    low = min(bpp) - 0.02
    ax.set_ylim(low, max(FLOWS.values()) + 0.03)
    for t, b in zip(x, bpp):
        if b > max(FLOWS.values()) + 0.03:  # the shipped model alone, far above
            ax.annotate(f"t0 = 0: {b:.3f}", (t, max(FLOWS.values()) + 0.025), fontsize=7, ha="left")
    ax.set(xscale="log", xlabel="t0", ylabel="bound, bits per 28 x 28 pixel (+- 2 SE)")
    ax.set_title("the shipped model above t0, the likelihood model below", fontsize=9)
    ax = fig.add_subplot(1, 2, 2)
    ax.errorbar(x, gain, yerr=[2 * s for s in gain_se], marker="o", ms=4, capsize=3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_ylim(min(gain) - 0.005, 0.05)
    ax.set(xscale="log", xlabel="t0", ylabel="minus the likelihood model alone (paired)")
    ax.set_title("what the shipped model's large t buy", fontsize=9)


EXPERT_FLAGS = [
    ("--shipped", str, ddpm.SHIPPED, None, "the sampling expert: a ddpm.py checkpoint"),
    ("--likelihood", str, LIKELIHOOD, None, "the likelihood expert: a table2.py eps_L_v cell"),
]
SAMPLE_FLAGS = (
    ddpm.SYSTEM_FLAGS
    + EXPERT_FLAGS
    + [
        ("--t0", int, 100, None, "the likelihood expert for t <= t0; 0: the shipped model alone"),
        ("--n", int, 1000, ddpm.AT_LEAST_1, "number of samples"),
        (
            "--steps",
            int,
            100,
            ddpm.AT_LEAST_1,
            "Algorithm 2 on S respaced steps; S = T: as printed",
        ),
        ("--batch-size", int, 250, ddpm.AT_LEAST_1, "samples per batch"),
        (
            "--out",
            str,
            "experts.npz",
            None,
            ".png grid or .npz uint8 images (experiments/quality.py)",
        ),
    ]
)
BOUND_FLAGS = (
    common.system_flags(nll.BF16_WHY)[:3]
    + EXPERT_FLAGS
    + [
        ("--data-dir", str, "./data", None, "the MNIST test split is read, or downloaded, here"),
        ("--t0s", ddpm.comma_ints, [0, 3, 10, 30, 50, 100, 200, 300, 500, 1000], None, "the sweep"),
        ("--n", int, None, ddpm.AT_LEAST_1, "test images; None: the whole test split"),
        ("--t-draws", int, 4, ddpm.AT_LEAST_1, "t drawn per image from q(t) ~ t^-1.25"),
        ("--batch-size", int, 250, ddpm.AT_LEAST_1, "test images per batch"),
        ("--plot", str, None, None, "a .png of the bound against t0, the flows marked"),
    ]
)
COMMANDS = {  # name: (what runs, what it does, its flags)
    "sample": (sample, "Algorithm 2 with the two experts", SAMPLE_FLAGS),
    "bound": (bound, "eq. (5) of the two-expert process on the test split, every t0", BOUND_FLAGS),
}


def main(argv=None):
    return ddpm.command_line(__doc__.splitlines()[0], COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())

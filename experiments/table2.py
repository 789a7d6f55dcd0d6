"""DDPM's Table 2 on MNIST: each parameterisation and objective trained, sampled and bounded.

ddpm.py's own parts do it: its train loop takes this file's losses and output channels.

    python experiments/table2.py train --cell eps_hybrid_v --no-cond --steps 4102 --out c.pt
    python experiments/table2.py sample --ckpt c.pt --precision bf16 --out c.npz  # quality.py
    python experiments/table2.py bound --ckpt c.pt --data-dir ../shared/data --n 2000

The grid, its commands and its results: experiments/README.md, "DDPM's Table 2 on MNIST".

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

import csv
import math

import common
import nll
import torch

import ddpm

GAMMA = 5.0  # Min-SNR-gamma
HYBRID_LAM = 0.001  # L_hybrid = L_simple + lam L_vlb


def eps_from_mu(mu, xt, t, sched):  # eq. (11) solved for eps: the eps whose mean is mu
    beta = ddpm.gather(sched.beta, t, xt)
    alpha = ddpm.gather(sched.alpha, t, xt)
    alpha_bar = ddpm.gather(sched.alpha_bar, t, xt)
    return (xt - alpha.sqrt() * mu) * (1 - alpha_bar).sqrt() / beta


def reverse_process(out, xt, t, sched, param, sigma):
    """(mean, var, eps_theta) of p_theta(x_{t-1} | x_t) from the network's output `out` (C channels,
    or 2 C with a learned sigma); eps_theta is the eps whose eq. (11) mean is `mean`."""
    C = xt.shape[1]
    head, tail = out[:, :C], out[:, C:]
    if param == "eps":
        eps, mean = head, ddpm.p_mean(xt, t, head, sched)
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


def min_snr_weight(t, sched, gamma=GAMMA):  # min(SNR_t, gamma) / SNR_t, a weight per image
    snr = sched.alpha_bar[t.cpu()] / (1 - sched.alpha_bar[t.cpu()])
    return (snr.clamp(max=gamma) / snr).to(t.device)


def draw_t(objective, n, T, generator=None):
    """(t, weight) for n images: "L" draws t from nll.t_proposal on 1..T (t = 1 too: L_0 is
    trained) with weight 1 / q(t), so that the mean of weight * L_{t-1} is sum_t L_{t-1}; every
    other objective draws t uniformly (Algorithm 1)."""
    if objective != "L":
        t = torch.randint(1, T + 1, (n,), generator=generator)
        return t, torch.ones(n, dtype=torch.float64)
    q = nll.t_proposal(T, first=1)
    t = torch.multinomial(q, n, replacement=True, generator=generator)
    return t, 1 / q[t]


def loss(objective, out, x0, xt, t, eps, weight, sched, param, sigma):
    """The per-image loss of `objective` (nats per dimension, shaped (B,)) for the network output
    `out` at x_t = q_sample(x0, t, eps); weight from draw_t."""
    mean, var, eps_theta = reverse_process(out, xt, t, sched, param, sigma)
    per_dim = lambda v: v.flatten(1).mean(1)  # noqa: E731
    if objective == "L":
        return weight.to(out.dtype) * per_dim(ddpm.bound_term(x0, xt, t, mean, var, sched))
    if objective == "mse_mu":
        q_mean, _ = ddpm.q_posterior(x0, xt, t, sched)
        return per_dim((q_mean - mean) ** 2)
    simple = per_dim((eps - eps_theta) ** 2)
    if objective == "simple":
        return simple
    if objective == "min_snr":
        return min_snr_weight(t, sched).to(out.dtype) * simple
    vlb = ddpm.bound_term(
        x0, xt, t, mean.detach(), var, sched
    )  # "hybrid": the bound trains var only
    return simple + HYBRID_LAM * sched.T * per_dim(vlb)


CELLS = {  # --cell: (param, sigma, objective, Table 2's row); the last three are beyond the paper
    "mu_L_learned": ("mu", "learned", "L", "mu_tilde, L, learned diagonal Sigma"),
    "mu_L_fixed": ("mu", "beta", "L", "mu_tilde, L, fixed isotropic Sigma"),
    "mu_mse": ("mu", "beta", "mse_mu", "mu_tilde, ||mu_tilde - mu_tilde_theta||^2"),
    "eps_L_learned": ("eps", "learned", "L", "eps, L, learned diagonal Sigma"),
    "eps_L_fixed": ("eps", "beta", "L", "eps, L, fixed isotropic Sigma"),
    "eps_simple": ("eps", "beta", "simple", "eps, L_simple (the paper's and ddpm.py's)"),
    "eps_hybrid_v": ("eps", "v", "hybrid", "eps, L_hybrid, v-interpolated Sigma (Nichol 2021)"),
    "eps_min_snr": ("eps", "beta", "min_snr", "eps, Min-SNR-5 L_simple (Hang et al. 2023)"),
    "eps_L_v": ("eps", "v", "L", "eps, L, v-interpolated Sigma (Nichol 2021's L_vlb)"),
}


def out_channels(sigma, C):  # the network's output channels for a sigma choice
    return 2 * C if sigma in ("learned", "v") else C


def cell_loss(param, sigma, objective):
    """The objective as a loss of ddpm.loss_fn's signature, for ddpm.train_step: t from draw_t,
    then x_t, the network's output and the batch's mean loss, in fp32."""

    def loss_fn(model, x0, sched, generator=None):
        t, weight = draw_t(objective, len(x0), sched.T, generator)
        t = t.to(x0.device)
        weight = weight.to(x0.device)
        eps = ddpm.noise_like(x0, generator)
        xt = ddpm.q_sample(x0, t, eps, sched)
        out = model(xt, t).float()
        return loss(objective, out, x0, xt, t, eps, weight, sched, param, sigma).mean()

    return loss_fn


# --- The grid's commands: train a cell, sample it, bound it -------------------------------------
def train(args):
    """ddpm.py's `train` with the cell's output channels and objective; --resume takes the cell
    from its checkpoint, as ddpm.py takes the rest of the run's definition."""
    cfg = ddpm.run_config(args)
    if args.resume and "cell" not in ddpm.load_checkpoint(args.resume, "cpu")[0]["config"]["train"]:
        raise ddpm.UserError(f"--resume {args.resume}: not a table2.py checkpoint")
    param, sigma, objective, _ = CELLS[cfg.cell]
    out_ch = out_channels(sigma, 3 if cfg.dataset == "cifar10" else 1)
    return ddpm.train(cfg, out_ch, cell_loss(param, sigma, objective))


def load(args):  # (device, precision, checkpoint, EMA network, schedule, its cell's param, sigma)
    device, precision, ckpt, model, run, sched = common.load(args, cell=True)
    param, sigma, _, _ = CELLS[run["cell"]]
    return device, precision, ckpt, model, sched, param, sigma


def step_variance(var, t, i, sched, sub):
    """A variance of sched's step t, carried to step i of the respaced schedule sub: by its place
    v between log beta_tilde_t and log beta_t, clamped to [0, 1], set between sub's beta_tilde_i
    and beta_i (for sigma "v" this is Nichol & Dhariwal's respacing; beta stays beta, beta_tilde
    stays beta_tilde; with sub = sched, any var in [beta_tilde_t, beta_t] is itself)."""
    ends = [ddpm.sigma2_choice(s, "beta_tilde") for s in (sched, sub)]
    lo, hi = ddpm.gather(ends[0], t, var).log(), ddpm.gather(sched.beta, t, var).log()
    v = ((var.log() - lo) / (hi - lo)).clamp(0, 1).nan_to_num(1.0)
    lo, hi = ddpm.gather(ends[1], i, var).log(), ddpm.gather(sub.beta, i, var).log()
    return (v * hi + (1 - v) * lo).exp()


@torch.inference_mode()
def sample_cell(net, sched, shape, generator, param, sigma, steps=None, progress=None):
    """Algorithm 2 with the cell's p_theta(x_{t-1} | x_t) = N(mean, var), on `steps` of the
    sub-sequence of ddpm.respace (None: all T): the mean is eq. (11) on the respaced schedule from
    the cell's eps, the variance the cell's, carried over by step_variance. No noise at t = 1."""
    sub, tau = ddpm.respace(sched, steps) if steps else (sched, torch.arange(sched.T + 1))
    x = ddpm.initial_noise(shape, generator)
    for step in range(sub.T, 0, -1):
        i = torch.full((shape[0],), step, dtype=torch.long, device=x.device)
        t = tau.to(x.device)[i]
        out = net(x, t).to(x.dtype)
        _, var, eps = reverse_process(out, x, t, sched, param, sigma)
        mean = ddpm.p_mean(x, i, eps, sub)
        z = ddpm.noise_like(x, generator) if step > 1 else 0
        x = mean + step_variance(var, t, i, sched, sub).sqrt() * z
        if progress:
            progress.tick(steps=len(x))
    return x


def sample(args):
    device, precision, ckpt, model, sched, param, sigma = load(args)
    common.check_steps([args.steps], sched.T)
    if not args.out.endswith((".png", ".npz")):
        raise ddpm.UserError(f"--out {args.out}: a .png grid or an .npz of uint8 images")
    ddpm.check_writable(args.out)
    if sigma in ddpm.SIGMA2:  # a fixed Sigma: the sampling choice is free (its mean is the same)
        sigma = args.sigma2
    shape = (args.n, *ckpt["config"]["data_shape"])
    progress = ddpm.Progress(args.n * (args.steps or sched.T))
    xs = []
    for b in range(0, args.n, args.batch_size):
        gen = torch.Generator(device).manual_seed(hash((args.seed, b)))
        part = (min(args.batch_size, args.n - b), *shape[1:])
        with ddpm.autocast(device, precision):
            xs.append(sample_cell(model, sched, part, gen, param, sigma, args.steps, progress))
    ddpm.save_samples(args.out, torch.cat(xs).clamp(-1, 1))
    print(f"wrote {args.out}: {args.n} samples of {ckpt['config']['train']['cell']}, {sigma}")
    return 0


@torch.inference_mode()
def bound_pass(net, x0, sched, param, sigmas, k, generator):
    """One estimate of eq. (5) for each image of x0 in nats per dimension, shaped (len(sigmas),
    3, n, ...): L_T, sum_{t>=2} L_{t-1} from k draws of t (nll.draw_steps: t ~ t^-1.25, weighted
    by 1 / (k q(t))), and L_0 with the cell's own sigma_1, all under each variance of sigmas."""
    t, w = nll.draw_steps(sched.T, len(x0), k, generator)
    w = w.to(x0.device).view(*t.shape, *[1] * (x0.dim() - 1))
    t = t.to(x0.device)
    terms = torch.zeros(len(sigmas), 3, *x0.shape, dtype=torch.float64, device=x0.device)
    terms[:, 0] = ddpm.prior_kl(x0, sched)
    first = torch.ones(len(x0), dtype=torch.long, device=x0.device)
    for c, tc in enumerate([*t.T, first]):
        xt = ddpm.q_sample(x0, tc, ddpm.noise_like(x0, generator), sched)
        out = net(xt, tc).double()
        xt = xt.double()
        for s, sigma in enumerate(sigmas):
            mean, var, _ = reverse_process(out, xt, tc, sched, param, sigma)
            term = ddpm.bound_term(x0.double(), xt, tc, mean, var, sched)
            if c < k:
                terms[s, 1] += w[:, c] * term
            else:
                terms[s, 2] = term
    return terms


def bound(args):
    """The bound on --n test images, bits per 32 x 32 dimension and per 28 x 28 pixel."""
    device, precision, ckpt, model, sched, param, sigma = load(args)
    run = ckpt["config"]["train"]
    common.check_test_split(run, "bound")
    data, _ = ddpm.load_data(run["dataset"], args.data_dir, train=False)
    n = min(args.n or len(data), len(data))
    sigmas = ddpm.SIGMA2 if sigma in ddpm.SIGMA2 else (sigma,)
    region = nll.padded_region(run["dataset"], data.shape[1:])
    progress = ddpm.Progress(n * (args.t_draws + 1))
    bits = []  # per batch, (sigmas, 3 terms, 2, B) nats: over the whole image, over the region
    for b in range(0, n, args.batch_size):
        x0 = ddpm.to_model_range(data[b : min(b + args.batch_size, n)].to(device))
        gen = torch.Generator(device).manual_seed(hash((args.seed, b)))
        with ddpm.autocast(device, precision):
            terms = bound_pass(model, x0, sched, param, sigmas, args.t_draws, gen)
        bits.append(torch.stack([terms.flatten(3).sum(3), terms[..., region].sum(3)], 2))
        progress.tick(steps=len(x0) * (args.t_draws + 1))
    bits = torch.cat(bits, -1).cpu() / math.log(2)
    print(f"bound: {common.where(args, ckpt, run, n)}, cell {run['cell']}, {args.t_draws} t")
    D, D_image = data[0].numel(), int(region.sum())  # the padding is deterministic: the same bits
    units = [(D, "dimension")] + [(D_image, "pixel of the original image")] * (D_image < D)
    for dims, what in units:
        print(f"bits per {what} ({dims}; eq. 5, +- 1 standard error):")
        for s, name in enumerate(sigmas):
            total = bits[s, :, 0].sum(0) / dims
            split = " / ".join(f"{x:.4f}" for x in (bits[s, :, 0].mean(1) / dims).tolist())
            se = total.std() / math.sqrt(n)
            print(
                f"  Sigma {name:10} {total.mean():.4f} +- {se:.4f} | L_T / sum L_t-1 / L_0 {split}"
            )
    padding = (bits[0, :, 0] - bits[0, :, 1]).sum(0).mean()
    print(f"the {D - D_image} padding pixels: {padding:.1f} bits an image (Sigma {sigmas[0]})")
    return 0


def plot(args):
    """The grid's recorded results (--results, a .csv: cell, steps, bits_per_pixel, p_confident,
    fd_over_floor) drawn as the bound against sample quality, the flows marked."""
    common.check_png(args.plot, "the plot of the grid")
    try:
        with open(args.results) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError("no rows")
        points = [(r["cell"], int(r["steps"]), float(r["bits_per_pixel"])) for r in rows]
        points = [
            (*p, float(r["fd_over_floor"]), float(r["p_confident"])) for p, r in zip(points, rows)
        ]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ddpm.UserError(
            f"--results {args.results}: not a table2.py results .csv ({type(e).__name__})"
        ) from None

    def draw(fig):
        ax = fig.add_subplot()
        for cell, steps, bpp, fd, sure in points:
            long = steps > 4102
            ax.scatter(
                fd,
                bpp,
                marker="*" if long else "o",
                s=60 if long else 25,
                color="C1" if long else "C0",
            )
            ax.annotate(
                f"{cell}{f' ({steps:,} steps)' if long else ''} {sure:.0%}",
                (fd, bpp),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
        for name, value in {"Residual Flows": 0.97, "RealNVP": 1.06}.items():
            ax.axhline(value, color="gray", lw=0.8, ls=":")
            ax.text(
                ax.get_xlim()[0], value, f" {name} {value}", fontsize=6, color="gray", va="bottom"
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="feature distance / the floor's (samples; lower is better)",
            ylabel="bound, bits per pixel (28 x 28)",
        )
        ax.set_title(
            "DDPM Table 2 on MNIST: bound against sample quality (p > 0.9 in the labels)",
            fontsize=9,
        )

    common.save_plot(args.plot, draw, (7, 4.5))
    print(f"wrote {args.plot} from {len(points)} rows of {args.results}")
    return 0


TRAIN_FLAGS = ddpm.TRAIN_FLAGS + [("--cell", list(CELLS), "eps_simple", None, "Table 2's cell")]
CKPT = ("--ckpt", str, None, None, "a checkpoint written by this script's train")
SAMPLE_FLAGS = ddpm.SYSTEM_FLAGS + [
    CKPT,
    ("--n", int, 1000, ddpm.AT_LEAST_1, "number of samples"),
    ("--steps", int, 100, ddpm.AT_LEAST_1, "Algorithm 2 on S respaced steps; S = T: as printed"),
    ("--sigma2", list(ddpm.SIGMA2), "beta_tilde", None, "for a cell with a fixed Sigma"),
    ("--batch-size", int, 250, ddpm.AT_LEAST_1, "samples per batch"),
    ("--out", str, "cell.npz", None, ".png grid or .npz uint8 images (experiments/quality.py)"),
]
BOUND_FLAGS = [CKPT if row[0] == "--ckpt" else row for row in common.system_flags(nll.BF16_WHY)]
BOUND_FLAGS += [
    ("--n", int, None, ddpm.AT_LEAST_1, "test images; None: the whole test split"),
    ("--t-draws", int, 4, ddpm.AT_LEAST_1, "t drawn per image from q(t) ~ t^-1.25"),
    ("--batch-size", int, 250, ddpm.AT_LEAST_1, "test images per batch"),
]
PLOT_FLAGS = [
    ("--results", str, "experiments/results/table2.csv", None, "the grid's recorded results"),
    ("--plot", str, "table2.png", None, "the .png written"),
]
COMMANDS = {  # name: (what runs, what it does, its flags)
    "train": (train, "train a cell (ddpm.py train's flags, and --cell)", TRAIN_FLAGS),
    "sample": (sample, "Algorithm 2 with the cell's mean and variance", SAMPLE_FLAGS),
    "bound": (bound, "eq. (5) on the test split with the cell's variance", BOUND_FLAGS),
    "plot": (plot, "the grid's recorded results as a picture: bound against quality", PLOT_FLAGS),
}


def main(argv=None):
    return ddpm.command_line(__doc__.splitlines()[0], COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())

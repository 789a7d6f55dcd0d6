"""The bound of DDPM eq. (5) in bits/dim on the test split (DDPM Table 1), Section 4.3's rate and
distortion, and Fig. 6's picture of x0_hat along the reverse process.

    python experiments/nll.py --data-dir ../shared/data        # the shipped model: 7 min on 2 cores
    python experiments/nll.py --ckpt ckpt.pt --full --n 100    # every t: T network calls an image

The terms are ddpm.eps_bound_terms' (KL terms, the discretized decoder of eq. 13, both sigma_t^2 of
Section 3.2). A conditional net is measured with each image's own label, adding -log p(y) for the
bound on p(x), and through its "no label" branch on the first --n-rd images. The bound is given
over the 32 x 32 padded image and over the original 28 x 28 pixels: the padding is deterministic,
so the total bits over 784 still bound MNIST as distributed.

The full sum of eq. (5) costs T network calls an image. Its terms fall about as t^-1.3 (measured on
the shipped model, experiments/README.md), so k steps drawn from q(t) ~ t^-1.25, each term weighted
by 1 / (k q(t)), estimate sum_{t>=2} L_{t-1} without bias at k network calls, not T - 1: at k = 4
its own scatter is 0.05 bits/dim an image, where uniform draws of t scatter by 1.9.
"""

import math
import time

import common
import torch

import ddpm

T_POWER = 1.25


def rd_steps(T):  # where DDPM's Table 4 and Fig. 5 look: t = T, 0.9 T, ..., 0.1 T, and 1
    return [T * (10 - i) // 10 for i in range(10)] + [1]


def t_proposal(T, first=2):
    """q(t) ~ t^-1.25 for t = first..T, 0 below: the bound here draws t = 2..T (L_0 is always
    computed); table2.py's objective "L" trains on t = 1..T."""
    q = torch.zeros(T + 1, dtype=torch.float64)
    q[first:] = torch.arange(first, T + 1, dtype=torch.float64) ** -T_POWER
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


@torch.inference_mode()
def bound_pass(eps_model_of, x0, sched, k=8, generator=None, chunk=256):
    """One estimate of eq. (5) for each of the n images x0, in nats per dimension: L_T (n, ...);
    sum_{t>=2} L_{t-1} and L_0, each (2, n, ...) for the two sigma_t^2 of ddpm.SIGMA2; and the KL
    received down to each t of rd_steps(T), sum_{s >= t} L_{s-1}, per image (2, n, 11).
    k draws of t an image (k = None: the full sum), at most `chunk` images a network call.
    eps_model_of(i): the eps-model of a batch whose rows are the images i of x0."""
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
        terms, _ = ddpm.eps_bound_terms(eps_model_of(i), x0[i], tc.flatten(), sched, generator)
        weights = w[:, c : c + cols].view(1, n, m, *[1] * (x0.dim() - 1))
        terms = terms.view(2, n, m, *x0.shape[1:]) * weights
        kl += terms.sum(2)
        after = (tc[..., None] >= steps).double()  # (n, m, 11): t_i counts for the steps below
        received += torch.einsum("snm,nmr->snr", terms.flatten(3).sum(3), after)
    first = torch.ones(n, dtype=torch.long, device=x0.device)
    l0, _ = ddpm.eps_bound_terms(eps_model_of(every), x0, first, sched, generator)
    return ddpm.prior_kl(x0, sched), kl, l0, received


@torch.inference_mode()
def progressive_x0(eps_model, x0, sched, generator=None):
    """x0_hat (eq. 15) from x_t ~ q(x_t | x_0) at each t of rd_steps(T), shaped (11, *x0.shape):
    what a receiver of x_t reconstructs (DDPM Section 4.3, Fig. 6)."""
    x0_hats = []
    for step in rd_steps(sched.T):
        t = torch.full((len(x0),), step, device=x0.device)
        xt = ddpm.q_sample(x0, t, ddpm.noise_like(x0, generator), sched)
        x0_hats.append(ddpm.predict_x0(xt, t, eps_model(xt, t).to(x0.dtype), sched))
    return torch.stack(x0_hats)


def nll(args):
    """The bound on --n test images with each image's own label (plus -log p(y)); the "no label"
    branch, and Section 4.3's rate and distortion, on the first --n-rd of them."""
    device, precision, ckpt, model, run, sched = common.load(args)
    common.check_test_split(run, "nll: the bound")
    common.check_png(args.out, "the picture of x0_hat along the reverse process")
    common.check_png(args.plot, "the rate-distortion plot")
    data, labels = ddpm.load_data(run["dataset"], args.data_dir, train=False)
    n = args.n or len(data)
    if n > len(data):
        raise ddpm.UserError(f"--n {n}: the {run['dataset']} test split has {len(data)} images")
    n_rd = min(args.n_rd, n)
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
    progress = ddpm.Progress(per_image * (n + (n_rd if K else 0)) + len(steps) * n_rd)
    t0 = time.time()
    for b in range(0, n, args.batch_size):
        x0 = ddpm.to_model_range(data[b : min(b + args.batch_size, n)].to(device))
        m = max(0, min(n_rd - b, len(x0)))  # how many of them are among the first n_rd
        for name, y in branches.items():
            x = x0[:m] if name == "no label" else x0
            if not len(x):
                continue
            y = y[b : b + len(x)].to(device)

            def eps_model_of(i, y=y):  # images i, each told its own label
                return ddpm.counted(ddpm.guided(model, y[i]), progress)

            # the same draws of t and eps in every branch: their difference is the labels'
            gen = torch.Generator(device).manual_seed(hash((args.seed, b)))
            with ddpm.autocast(device, precision):
                LT, kl, l0, received = bound_pass(eps_model_of, x, sched, args.t_draws, gen)
            terms = torch.stack([LT[None].expand_as(kl), kl, l0], 1)  # (2 sigma^2, 3, B, C, H, W)
            totals[name].append(torch.stack([terms.flatten(3).sum(3), terms[..., region].sum(3)]))
            if name != list(branches)[0] or not m:
                continue
            rate += (received[:, :m] + LT[:m].flatten(1).sum(1)[None, :, None]).sum(1).cpu()
            with ddpm.autocast(device, precision):
                x0_hats = progressive_x0(eps_model_of(torch.arange(m)), x0[:m], sched, gen)
            error = ddpm.to_pixels(x0_hats).double() - ddpm.to_pixels(x0[:m]).double()
            squared_error += error.pow(2).flatten(1).sum(1).cpu()
            if b == 0 and args.out:
                grid = torch.cat([x0_hats[:, :8], x0[None, :8]]).transpose(0, 1).flatten(0, 1)
                ddpm.save_samples(args.out, grid, nrow=len(steps) + 1)
    nats = {name: torch.cat(v, -1).cpu() for name, v in totals.items()}
    draws = f"{args.t_draws or 'every'} t an image, {precision}"
    print(f"nll: {common.where(args, ckpt, run, n)}, {draws}")
    report_bound(nats, minus_log_p_y(ckpt, labels[:n], K), data[0].numel(), int(region.sum()), n_rd)
    mse = squared_error / (n_rd * data[0].numel())
    bits, rmse = report_rate_distortion(steps, rate / n_rd, mse, data[0].numel())
    if args.plot:
        common.save_plot(
            args.plot, lambda fig: plot_rate_distortion(fig, steps, bits, rmse), (11, 3.4)
        )
        print(f"wrote {args.plot}")
    print(f"{time.time() - t0:.0f}s")
    return 0


def minus_log_p_y(ckpt, labels, K):  # -log p(x) <= -log p(x | y) - log p(y); 0 if unconditional
    if not K:
        return torch.zeros(len(labels), dtype=torch.float64)
    label_freq = ckpt["config"].get("label_freq", [1 / K] * K)  # older checkpoints: uniform
    return -torch.tensor(label_freq, dtype=torch.float64)[labels].log()


def padded_region(dataset, shape):  # the pixels of the original image: 28 x 28 digits padded to 32
    region = torch.ones(shape, dtype=torch.bool)
    if dataset in ("mnist", "fashion"):
        region[..., :2, :] = region[..., -2:, :] = False
        region[..., :, :2] = region[..., :, -2:] = False
    return region


def report_bound(nats, minus_log_p_y, D, D_image, n_rd):
    """Bits/dim and its standard error over images, split into L_T / sum L_{t-1} / L_0, for each
    branch and sigma^2: per dimension of the network's D; then, for padded images, the same total
    bits per pixel of the original image (D_image pixels): the padding is deterministic, so the
    bits over D_image still bound the data set as distributed; and what the padding pixels cost."""
    for dims in [D, D_image] if D_image != D else [D]:
        what = f"bits/dim over {dims} dimensions"
        if dims != D:
            what = f"bits per pixel of the original {dims}-pixel image (the same bits)"
        print(f"{what} (eq. 5: L_T + sum L_t-1 + L_0; +- 1 standard error)")
        for name, v in nats.items():
            extra = minus_log_p_y if name == "own label" else 0 * minus_log_p_y
            for s, sigma2 in enumerate(ddpm.SIGMA2):
                terms = v[0, s] / (dims * math.log(2))  # bits/dim: (3 terms, images)
                total = terms.sum(0) + extra[: terms.shape[1]] / (dims * math.log(2))
                se = total.std() / math.sqrt(len(total)) if len(total) > 1 else math.nan
                split = " / ".join(f"{x:.4f}" for x in terms.mean(1).tolist())
                label = f"{name}, first {n_rd}" if name == "no label" and len(nats) > 1 else name
                line = f"  {label:18} sigma^2 = {sigma2:10} {total.mean():.4f} +- {se:.4f}"
                if name == "own label":
                    split += f" | -log p(y) {extra.mean() / (dims * math.log(2)):.4f}"
                if sigma2 == "beta":  # Ho et al.'s code: sigma_1^2 = beta_tilde_2 under beta too
                    ho = total - terms[2] + v[0, 0, 2] / (dims * math.log(2))
                    split += f" | with L_0 of beta_tilde_2 (Ho et al.'s code) {ho.mean():.4f}"
                if name == "no label" and len(nats) > 1:  # the same images with their labels
                    own = nats["own label"][0, s, :, : len(total)].sum(0)
                    own = own + minus_log_p_y[: len(total)]
                    split += f" | own label on them {own.mean() / (dims * math.log(2)):.4f}"
                print(f"{line} | L_T / sum L_t-1 / L_0 {split}")
    if D_image != D:  # the bits an image spent on its padding pixels, which are black in every one
        v = next(iter(nats.values()))[:, 0].sum(1) / math.log(2)  # (2 regions, images): bits
        padding = f"the {D - D_image} padding pixels: {(v[0] - v[1]).mean():.1f} bits an image"
        print(f"{padding} of {v[0].mean():.1f} (sigma^2 = beta_tilde, {next(iter(nats))})")


def report_rate_distortion(steps, rate, mse, D):
    """DDPM Table 4: at step t a receiver holds x_t ~ q(x_t | x_0), for which it has paid the rate
    L_T + sum_{s >= t} L_{s-1} (nats an image here), and reconstructs x0_hat (eq. 15): the
    distortion is its RMSE on 0..255 (mse: per dimension)."""
    print(
        "rate and distortion (Section 4.3): t | rate, bits/dim, sigma^2 = beta_tilde, beta | RMSE"
    )
    bits, rmse = rate / (D * math.log(2)), mse.sqrt()
    for j, step in enumerate(steps):
        print(f"  {step:5d} | {bits[0, j]:.4f} {bits[1, j]:.4f} | {rmse[j]:.2f}")
    return bits, rmse


def plot_rate_distortion(fig, steps, bits, rmse):
    """DDPM Fig. 5's three panels: distortion and rate against the step t, distortion against
    rate (sigma^2 = beta_tilde; the rate is what a receiver of x_t has paid, from t = T down)."""
    panels = [
        ("t", "distortion, RMSE on 0..255", steps, rmse),
        ("t", "rate, bits/dim", steps, bits[0]),
    ]
    panels.append(("rate, bits/dim", "distortion, RMSE on 0..255", bits[0], rmse))
    for k, (x_label, y_label, x, y) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 3, k)
        ax.plot(list(x), list(y), marker="o", ms=3)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
    fig.suptitle("Rate and distortion along the reverse process (DDPM Fig. 5), the shipped model")


BF16_WHY = "fp32: bf16 raises the shipped model's bound by 0.04 bits/dim (experiments/README.md)"
FLAGS = common.system_flags(BF16_WHY) + [
    ("--n", int, None, ddpm.AT_LEAST_1, "test images; None: the whole test split"),
    ("--n-rd", int, 1000, ddpm.AT_LEAST_1, "images for 'no label', rate and distortion"),
    ("--t-draws", int, 4, ddpm.AT_LEAST_1, "t drawn per image from q(t) ~ t^-1.25"),
    (
        "--full",
        {"dest": "t_draws", "action": "store_const", "const": None},
        None,
        None,
        "every t: T calls an image",
    ),
    ("--batch-size", int, 64, ddpm.AT_LEAST_1, "test images per batch"),
    ("--out", str, None, None, "a .png of x0_hat along the reverse process (Fig. 6)"),
    ("--plot", str, None, None, "a .png of the rate and distortion (Fig. 5)"),
]


def main(argv=None):
    return common.main(nll, FLAGS, argv)


if __name__ == "__main__":
    raise SystemExit(main())

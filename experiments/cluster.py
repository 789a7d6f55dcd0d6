"""Clustering by diffusion: a DDPM conditioned on Q unknown clusters, learned by EM from unlabelled
images, and measured against the digits it was never told.

    python experiments/cluster.py train --data-dir ../shared/data --out runs/cluster.ckpt
    python experiments/cluster.py evaluate --ckpt samples/cluster.pt --data-dir ../shared/data

The model is the mixture p(x) = sum_q pi_q p_theta(x | q): ddpm.py's U-Net, told the cluster
q = 0..Q-1 as its label, is p_theta(x | q). `train` never reads a label of the data set. It runs EM
one batch at a time (incremental EM, Neal & Hinton 1998), after --warmup steps on random clusters:
  E-step: each image's loss under every cluster, L(x | q): eq. (14)'s squared error summed over
      pixels, at --draws draws of (t, eps) shared by the Q clusters (their differences are then
      the network's alone), t uniform in --e-t; the responsibilities r_q = softmax(log pi_q -
      L(x | q) / tau). These are the terms of eq. (5) that depend on q, weighted as L_simple
      weights them, and only at the t where q matters (experiments/README.md, "Clustering");
      tau < 1 sharpens them, towards hard EM.
  M-step: one step of Algorithm 1 (ddpm.train_step), each image's label drawn from its
      responsibilities: a one-sample estimate of sum_q r_q L_simple(x | q).
The guard against collapse is pi (--prior): "em" re-estimates it as the mean responsibility (the
textbook M-step), "uniform" keeps it at 1/Q, "balanced" sets it so that each cluster holds 1/Q of
the responsibility (Sinkhorn's equipartition, Asano et al. 2020). It is set at every step from the
L of the last --window batches: a cluster's L drifts as the network learns, so older L's would set
it wrong. Each image's latest L(x | q) is kept, with pi, in the checkpoint.
"""

import collections
import math
import os

import common
import numpy as np
import torch

import ddpm

PRIORS = ["balanced", "uniform", "em"]
SHIPPED = os.path.join(os.path.dirname(ddpm.SHIPPED), "cluster.pt")


# --- EM's parts -----------------------------------------------------------------------------------
@torch.inference_mode()
def cluster_losses(net, x0, sched, Q, t_range, draws, generator=None):
    """The E-step's L(x | q), (B, Q): ||eps - eps_theta(x_t, t, q)||^2 summed over pixels, the mean
    over `draws` draws of t ~ U{t_range[0]..t_range[1]} and eps ~ N(0, I) an image. All Q
    clusters see the same x_t: one network call of Q B images a draw."""
    B = len(x0)
    L = torch.zeros(B, Q, dtype=torch.float64, device=x0.device)
    q = torch.arange(Q, device=x0.device).repeat_interleave(B)  # (Q B,): cluster 0's B, then 1's
    for _ in range(draws):
        t = torch.randint(t_range[0], t_range[1] + 1, (B,), generator=generator, device=x0.device)
        eps = ddpm.noise_like(x0, generator)
        xt = ddpm.q_sample(x0, t, eps, sched)
        copies = [Q] + [1] * (x0.dim() - 1)
        eps_theta = net(xt.repeat(copies), t.repeat(Q), q).float()  # (Q B, C, H, W)
        error = (eps_theta - eps.float().repeat(copies)) ** 2
        L += error.flatten(1).sum(1).view(Q, B).T.double()
    return L / draws


def e_step_steps(e_t, T):  # --e-t's fractions of T as steps: (lo, hi), 1 <= lo <= hi <= T
    lo = max(1, round(e_t[0] * T))
    return lo, max(lo, round(e_t[1] * T))


def responsibilities(L, log_pi, tau):  # r_iq = pi_q exp(-L_iq / tau) / sum_q' (...), rows sum to 1
    return torch.softmax(log_pi - L / tau, dim=1)


def balanced_log_pi(L, tau, iters=100):
    """log pi with which every cluster holds 1/Q of the responsibility over the images of L:
    Sinkhorn-Knopp's column step alone (each row is a softmax, so rows always sum to 1)."""
    log_pi = torch.zeros(L.shape[1], dtype=L.dtype)
    for _ in range(iters):
        share = responsibilities(L, log_pi, tau).mean(0)
        log_pi = log_pi - (share * len(share)).log()
    return log_pi - log_pi.logsumexp(0)  # a distribution


def update_log_pi(prior, L, log_pi, tau):
    """pi for the next steps from the kept losses L: fixed 1/Q ("uniform"), the mean
    responsibility under the current pi ("em", one M-step), or balanced."""
    Q = L.shape[1]
    if prior == "uniform" or len(L) == 0:
        return torch.full((Q,), -math.log(Q), dtype=torch.float64)
    if prior == "em":
        return responsibilities(L, log_pi, tau).mean(0).clamp(min=1e-12).log()
    return balanced_log_pi(L, tau)


def matched_accuracy(pred, true):
    """(accuracy, the cluster -> class map, the confusion matrix, clusters x classes): the share of
    images whose cluster's class, under the best one-to-one matching of clusters to classes
    (Hungarian method, scipy), is their class. Clusters left unmatched (Q > classes) count wrong."""
    from scipy.optimize import linear_sum_assignment

    pred, true = np.asarray(pred), np.asarray(true)
    confusion = np.zeros((pred.max() + 1, true.max() + 1), dtype=np.int64)
    np.add.at(confusion, (pred, true), 1)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    return confusion[rows, cols].sum() / len(pred), dict(zip(rows, cols)), confusion


# --- train: EM from a random start, one batch at a time -------------------------------------------
def run_summary(L, log_pi, tau):  # the share of the kept images in each cluster, their mean max r
    r = responsibilities(L, log_pi, tau)
    share = torch.bincount(r.argmax(1), minlength=L.shape[1]) / max(len(L), 1)
    return share, r.max(1).values.mean().item()


def em_data(cfg):
    """The run's checks, then its images as uint8 (N, C, H, W); their labels are never read."""
    resumed = ddpm.load_checkpoint(cfg.resume, "cpu")[0]["config"]["train"] if cfg.resume else {}
    if cfg.resume and "clusters" not in resumed:
        raise ddpm.UserError(f"--resume {cfg.resume}: not a cluster.py checkpoint")
    lo, hi = cfg.e_t
    if not 0 < lo <= hi <= 1:
        raise ddpm.UserError(f"--e-t {lo:g},{hi:g}: LO,HI with 0 < LO <= HI <= 1, fractions of T")
    ddpm.check_writable(cfg.out)
    data, _ = ddpm.load_data(cfg.dataset, cfg.data_dir, cfg.seed, cfg.image_size)
    if data.dim() != 4:
        raise ddpm.UserError(f"--dataset {cfg.dataset}: cluster.py clusters images")
    if len(data) < 2 * cfg.clusters:
        why = f"has {len(data)} images: {cfg.clusters} clusters need at least {2 * cfg.clusters}"
        raise ddpm.UserError(f"--clusters {cfg.clusters}: the data set {why}, two a cluster")
    return data


def em_state(cfg, shape, n, device):
    """(network, EMA, optimizer, kept L (n, Q), log pi, step): new, or from --resume. Each image's
    L is nan until its first E-step; pi starts uniform."""
    torch.manual_seed(cfg.seed)
    model = ddpm.make_net(shape, cfg.ch, cfg.ch_mult, cfg.n_res, cfg.clusters).to(device).train()
    ema = ddpm.EMA(model, cfg.ema_decay)
    opt = ddpm.make_optimizer(model, cfg.lr)
    L = torch.full((n, cfg.clusters), math.nan, dtype=torch.float64)
    log_pi = update_log_pi("uniform", L[:0], None, cfg.tau)
    if not cfg.resume:
        return model, ema, opt, L, log_pi, 0
    ckpt = ddpm.load_checkpoint(cfg.resume, device)[0]
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    ema.n = ckpt["ema_n"]
    return model, ema, opt, ckpt["losses"], ckpt["log_pi"], ckpt["step"]


def e_step(model, x0, idx, L, recent, log_pi, sched, cfg, generator, draw):
    """This batch's L(x | q) kept in L; pi from the last --window batches (the same network's L:
    a cluster's L drifts as the network learns); each image's label drawn from its
    responsibilities. (labels, log pi)."""
    t_range = e_step_steps(cfg.e_t, cfg.T)
    L[idx] = cluster_losses(model, x0, sched, cfg.clusters, t_range, cfg.draws, generator).cpu()
    recent.append(idx)
    log_pi = update_log_pi(cfg.prior, L[torch.cat(list(recent))], log_pi, cfg.tau)
    r = responsibilities(L[idx], log_pi, cfg.tau)
    return torch.multinomial(r, 1, generator=draw)[:, 0], log_pi


def train(args):
    """EM over ddpm.py's parts: its run config, training step, EMA, checkpoints and progress line.
    The first --warmup steps train on the random start (each image a cluster drawn uniformly: the
    network learns to denoise, its label means nothing yet); then each batch is an E-step and an
    M-step. The kept L and pi are saved with the weights, so that --resume continues EM."""
    cfg = ddpm.run_config(args)
    data = em_data(cfg)
    device, precision = ddpm.pick_device(cfg.device, cfg.precision)
    model, ema, opt, L, log_pi, step = em_state(cfg, data.shape[1:], len(data), device)
    Q = cfg.clusters
    start = torch.randint(0, Q, (len(data),), generator=torch.Generator().manual_seed(cfg.seed))
    amp = ddpm.autocast(device, precision)
    mixed = amp, torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    sched = ddpm.make_schedule(cfg.schedule, cfg.T)
    config = dict(model=model.config, data_shape=list(data.shape[1:]))
    config["train"] = dict(vars(cfg), precision=precision)
    data = data.to(device)

    B = min(cfg.batch_size, len(data))
    per_epoch = len(data) // B
    total = cfg.steps or cfg.epochs * per_epoch
    sizes = f"{sum(p.numel() for p in model.parameters()):,} parameters | {len(data)} images"
    print(f"{Q} clusters | {sizes} | {per_epoch} steps/epoch | steps {step}..{total} | {precision}")
    progress = ddpm.Progress(total, step, "img", B, name="step")
    smooth, perm_epoch, share, r_max = math.nan, None, torch.ones(Q) / Q, 1 / Q
    recent = collections.deque(maxlen=cfg.window)  # the last batches' images
    with ddpm.stop_signals() as stop:
        while step < total and not stop:
            epoch, i = divmod(step, per_epoch)
            if epoch != perm_epoch:  # the order follows from (seed, epoch), as in ddpm.train
                order = torch.Generator().manual_seed(cfg.seed + epoch)
                perm, perm_epoch = torch.randperm(len(data), generator=order), epoch
            gen = torch.Generator(device).manual_seed(hash((cfg.seed, step)))
            idx = perm[i * B :][:B]
            x0 = ddpm.to_model_range(data[idx.to(device)])
            y = start[idx]  # the random start, until --warmup
            if step >= cfg.warmup:
                draw = torch.Generator().manual_seed(step)  # the labels' draw, on the CPU
                with amp:
                    y, log_pi = e_step(model, x0, idx, L, recent, log_pi, sched, cfg, gen, draw)
            y = ddpm.drop_labels(y.to(device), cfg.p_uncond, Q, gen)
            loss = ddpm.train_step(model, ema, opt, x0, sched, gen, y, mixed=mixed)  # M-step
            if loss is not None:
                smooth = loss if math.isnan(smooth) else 0.98 * smooth + 0.02 * loss
            step += 1
            if step > cfg.warmup and step % 20 == 0:  # every kept L under this pi
                share, r_max = run_summary(L[~L[:, 0].isnan()], log_pi, cfg.tau)
            clusters = f"clusters {100 * share.min():.1f}..{100 * share.max():.1f}%"
            progress.tick(f"epoch {epoch + 1}", f"loss {smooth:.4f}", clusters, f"r {r_max:.2f}")
            if step % (cfg.save_every or per_epoch) == 0:
                save(cfg.out, config, model, ema, opt, step, L, log_pi)
    save(cfg.out, config, model, ema, opt, step, L, log_pi)
    print(f"saved {cfg.out} at step {step}")
    if stop:
        print(f"stopped by signal {stop[0]} after step {step}; continue with --resume {cfg.out}")
        return 128 + stop[0]
    return 0


def save(path, config, model, ema, opt, step, L, log_pi):  # pi also as ddpm.py's label_freq
    config = dict(config, label_freq=log_pi.exp().tolist())  # ddpm.py sample draws q ~ pi
    ddpm.save_checkpoint(path, config, model, ema, opt, step, losses=L, log_pi=log_pi)


# --- evaluate: the test split's clusters against its digits, and k-means beside them --------------
@torch.inference_mode()
def assign(model, x, sched, run, log_pi, draws, precision, generator, chunk=100):
    """Each image's most responsible cluster, argmax_q r_q, with `draws` draws of the E-step."""
    Q, device = run["clusters"], next(model.parameters()).device
    t_range = e_step_steps(run["e_t"], run["T"])
    progress = ddpm.Progress(len(x) * Q * draws)
    out = []
    for batch in x.split(chunk):
        x0 = ddpm.to_model_range(batch.to(device))
        with ddpm.autocast(device, precision):
            L = cluster_losses(model, x0, sched, Q, t_range, draws, generator).cpu()
        out.append(responsibilities(L, log_pi, run["tau"]).argmax(1))
        progress.tick(steps=len(batch) * Q * draws)
    return torch.cat(out).numpy()


def report(name, pred, true):  # one line: the matched accuracy and the NMI (scikit-learn)
    from sklearn.metrics import normalized_mutual_info_score

    accuracy, mapping, confusion = matched_accuracy(pred, true)
    nmi = normalized_mutual_info_score(true, pred)
    print(f"{name}: accuracy {accuracy:.4f} | NMI {nmi:.4f}")
    return mapping, confusion


def print_confusion(confusion, mapping):  # rows: clusters, in the order of their matched digit
    rows = sorted(range(len(confusion)), key=lambda q: mapping.get(q, len(confusion)))
    print("cluster -> digit | " + " ".join(f"{c:>5}" for c in range(confusion.shape[1])))
    for q in rows:
        digit = mapping.get(q, "-")
        print(f"{q:>7} -> {digit:>5} | " + " ".join(f"{n:>5}" for n in confusion[q]))
    return rows


def kmeans(x, Q, seed):  # k-means on the pixels in [0, 1], 10 restarts (scikit-learn)
    from sklearn.cluster import KMeans

    pixels = x.flatten(1).float().numpy() / 255
    return KMeans(Q, n_init=10, random_state=seed).fit_predict(pixels)


def evaluate(args):
    device, precision = ddpm.pick_device(args.device, args.precision)
    path = args.ckpt or SHIPPED
    ckpt, model = ddpm.load_checkpoint(path, device)
    run = ckpt["config"]["train"]
    if "clusters" not in run:
        why = "not a cluster.py checkpoint (train one with: python experiments/cluster.py train)"
        raise ddpm.UserError(f"--ckpt {path}: {why}")
    common.check_test_split(run, "evaluate")
    common.check_png(args.out, "the clusters' samples")
    common.check_png(args.plot, "the confusion matrices")
    x, true = ddpm.load_data(run["dataset"], args.data_dir, train=False)
    x, true = x[: args.n], true[: args.n].numpy()
    sched = ddpm.make_schedule(run["schedule"], run["T"])
    log_pi = torch.tensor(ckpt["config"]["label_freq"], dtype=torch.float64).log()
    Q = run["clusters"]
    gen = torch.Generator(device).manual_seed(args.seed)
    pred = assign(model, x, sched, run, log_pi, args.draws, precision, gen)
    lo, hi = e_step_steps(run["e_t"], run["T"])
    where = common.where(args, ckpt, run, len(x))
    print(where.replace(", checkpoint", f", {Q} clusters, checkpoint"))
    print(f"E-step: {args.draws} draws of t in {lo}..{hi} an image; k-means: the same pixels")
    mapping, confusion = report("diffusion EM", pred, true)
    k_pred = kmeans(x, Q, args.seed)
    k_mapping, k_confusion = report(f"k-means ({Q} clusters, 10 restarts)", k_pred, true)
    rows = print_confusion(confusion, mapping)
    if args.plot:
        k_rows = sorted(range(Q), key=lambda q: k_mapping.get(q, Q))
        panels = [("diffusion EM", confusion[rows], rows), ("k-means", k_confusion[k_rows], k_rows)]
        common.save_plot(args.plot, lambda fig: draw_confusions(fig, panels), size=(10, 4.5))
        print(f"wrote {args.plot}")
    if args.out:
        shape = ckpt["config"]["data_shape"]
        save_cluster_samples(args, model, sched, rows, shape, precision, device)
    return 0


def draw_confusions(fig, panels):  # each panel: a heat map, clusters (rows) against digits
    for i, (name, confusion, rows) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        ax.imshow(confusion, cmap="Blues")
        for (q, c), n in np.ndenumerate(confusion):
            ax.text(c, q, n, ha="center", va="center", fontsize=6)
        ax.set(xlabel="digit", ylabel="cluster", title=name)
        ax.set_xticks(range(confusion.shape[1]))
        ax.set_yticks(range(len(rows)), rows)


def save_cluster_samples(args, model, sched, rows, data_shape, precision, device):
    """10 samples of p(x | q) a row, a row a cluster, in the order of the confusion matrix: DDIM,
    50 steps, x0_hat clipped, guided with --guidance (0: the mixture component itself)."""
    y = torch.tensor(rows).repeat_interleave(10).to(device)
    eps_model = ddpm.clipped(ddpm.guided(model, y, args.guidance), sched)
    gen = torch.Generator(device).manual_seed(args.seed)
    shape = (len(y), *data_shape)
    with ddpm.autocast(device, precision):
        x = ddpm.sample_ddim(eps_model, sched, shape, gen, min(50, sched.T))
    ddpm.save_samples(args.out, x, nrow=10)
    print(f"wrote {args.out}")


# --- The command line -----------------------------------------------------------------------------
# ddpm.py's train flags that a clustering run has, some with other defaults; then EM's own
CHANGED = {"--out": "cluster.ckpt", "--ch": 16, "--epochs": 15, "--ema-decay": 0.999}
LEFT_OUT = ("--cond", "--sample-every")  # always conditional (on q); the pictures: evaluate
SHARED = [
    (f, k, CHANGED.get(f, d), a, h) for f, k, d, a, h in ddpm.TRAIN_FLAGS if f not in LEFT_OUT
]
E_T_HELP = "E-step: t drawn from LO T..HI T"
TAU_HELP = "temperature of the responsibilities, in units of L(x | q) (summed squared error)"
TRAIN_ROWS = SHARED + [
    ("--clusters", int, 10, ddpm.AT_LEAST_2, "Q, the number of clusters"),
    ("--prior", PRIORS, "balanced", None, "pi, the guard against collapse (the docstring)"),
    ("--window", int, 20, ddpm.AT_LEAST_1, "pi from the E-steps of this many last batches"),
    ("--tau", float, 0.05, ddpm.ABOVE_0, TAU_HELP),
    ("--draws", int, 1, ddpm.AT_LEAST_1, "E-step: draws of (t, eps) an image"),
    ("--e-t", {"type": ddpm.comma_floats, "metavar": "LO,HI"}, [0.45, 0.6], None, E_T_HELP),
    ("--warmup", int, 300, ddpm.AT_LEAST_0, "steps on the random start before EM"),
]

# evaluate runs the network as train does: bf16 where native (2.5x fp32's speed here)
AUTO = "auto: bf16 where native, as train"
SYSTEM = [
    (f, k, "auto" if f == "--precision" else d, a, h) for f, k, d, a, h in common.system_flags()
]
EVALUATE_ROWS = [(f, k, d, a, AUTO if f == "--precision" else h) for f, k, d, a, h in SYSTEM] + [
    ("--n", int, 10_000, ddpm.AT_LEAST_1, "test images, from the first"),
    ("--draws", int, 4, ddpm.AT_LEAST_1, "E-step: draws of (t, eps) an image"),
    ("--out", str, None, None, "a .png of 10 samples of each cluster, a row a cluster"),
    ("--plot", str, None, None, "a .png of the confusion matrices"),
    ("--guidance", float, 0.0, ddpm.FINITE, "--out: classifier-free guidance w"),
]


def main(argv=None):
    commands = {
        "train": (train, "EM on unlabelled images", TRAIN_ROWS),
        "evaluate": (evaluate, "the test split's clusters against its digits", EVALUATE_ROWS),
    }
    return ddpm.command_line(__doc__.splitlines()[0], commands, argv)


if __name__ == "__main__":
    raise SystemExit(main())

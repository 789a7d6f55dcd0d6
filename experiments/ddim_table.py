"""DDIM's Table 1 on MNIST: sample quality against the steps S and eta, judged by quality.py.

    python experiments/quality.py train --data-dir ../shared/data --out clf.pt
    python experiments/ddim_table.py --clf clf.pt --data-dir ../shared/data --n 300 --out table

Each cell is `ddpm.py sample --sampler ddim --steps S --eta ETA --guidance 0 --n N --seed 0` (the
sigma_hat row: `--sampler ddpm --steps S --sigma2 beta`, Algorithm 2 on the sub-sequence), for each
S of --steps and then S = T at eta 0 and 1, saved as OUT/<cell>.npz and judged against the test
split: the share of confident digits and the Frechet distance in the classifier's features, over
the floor of N real training images. A cell whose .npz exists is judged, not sampled again, so a
stopped run resumes. Every cell starts from the same x_T (the same seed), so OUT/fig5.png shows
DDIM's Fig. 5: the first 8 samples at eta = 0, a row an S; and it prints how often each S gives
the digit S = T gives from the same x_T. OUT/eta.png: the first 8 samples at the first S, a row an
eta (0, 0.2, 0.5, 1, sigma_hat): what eta does to the pixels.
"""

import csv
import os
import time

import common
import numpy as np
import quality
import torch

import ddpm

ETAS = ("0", "0.2", "0.5", "1", "hat")  # "hat": DDIM's sigma_hat row


def sample_flags(S, eta):
    if eta == "hat":
        return ["--sampler", "ddpm", "--steps", str(S), "--sigma2", "beta"]
    return ["--sampler", "ddim", "--steps", str(S), "--eta", eta]


def ddim_table(args):
    common.check_png(args.plot, "the plot of the table")
    if args.results:  # a recorded table, drawn: nothing sampled or judged
        if not args.plot:
            raise ddpm.UserError(f"--results {args.results}: draws a table; give --plot FILE.png")
        rows = read_results(args.results)
        common.save_plot(args.plot, lambda fig: plot_table(fig, rows), (9, 3.8))
        print(f"wrote {args.plot} from {len(rows)} rows of {args.results}")
        return 0
    ckpt, _ = ddpm.load_checkpoint(args.ckpt or ddpm.SHIPPED, "cpu")  # a bad --ckpt: one line, now
    T = ckpt["config"]["train"]["T"]
    if max(args.steps) >= T:
        raise ddpm.UserError(f"--steps {max(args.steps)}: below T = {T}, which is a row of its own")
    os.makedirs(args.out, exist_ok=True)
    ddpm.check_writable(os.path.join(args.out, "fig5.png"))
    clf, reference, (real, _, _, floor) = quality.judge_setup(args.clf, args.data_dir, args.n)
    print(f"{args.n} real training images: p > 0.9 {real:.1%}, FD {floor:.2f} (the floor)")
    print("| S | eta | p > 0.9 | FD (x floor) | sampling time |")
    print("| --- | --- | --- | --- | --- |")
    cells = [(S, eta) for S in args.steps for eta in ETAS] + [(T, "0"), (T, "1")]
    rows = []  # (S, eta, p > 0.9, FD, the floor's FD): OUT/results.csv
    for S, eta in cells:
        path = os.path.join(args.out, f"S{S}_eta{eta}.npz")
        seconds = "(sampled before)"
        if not os.path.exists(path):
            t0 = time.time()
            flags = sample_flags(S, eta) + ["--guidance", f"{args.guidance:g}", "--n", str(args.n)]
            flags += ["--seed", str(args.seed), "--out", path]
            flags += ["--ckpt", args.ckpt] if args.ckpt else []
            code = ddpm.main(["sample", *flags])
            if code:  # ddpm.py has said why, in one line
                return code
            seconds = f"{time.time() - t0:.0f} s"
        sure, _, _, fd = quality.judge_images(clf, quality.load_images(path), reference)
        rows.append((S, eta, sure, fd, floor))
        print(
            f"| {S} | {eta} | {sure:.1%} | {fd:.2f} ({fd / floor:.1f}x) | {seconds} |", flush=True
        )
    results = os.path.join(args.out, "results.csv")
    ddpm.atomic_write(results, lambda f: f.write(results_csv(rows).encode()))
    if args.plot:
        common.save_plot(args.plot, lambda fig: plot_table(fig, rows), (9, 3.8))
    steps = args.steps + [T]  # the rows of Fig. 5
    at_eta0 = {S: quality.load_images(os.path.join(args.out, f"S{S}_eta0.npz")) for S in steps}
    print(f"Fig. 5, eta = 0: each S against S = {T} from the same x_T")
    x_T_steps = ddpm.to_model_range(torch.as_tensor(at_eta0[T]))
    with torch.no_grad():
        digit_T = clf(x_T_steps).argmax(1)
    for S in steps[:-1]:
        x = ddpm.to_model_range(torch.as_tensor(at_eta0[S]))
        with torch.no_grad():
            same = (clf(x).argmax(1) == digit_T).float().mean()
        rms = ((x - x_T_steps) / 2).pow(2).mean().sqrt()  # on [0, 1]
        print(f"  S = {S}: the same digit {same:.1%}, pixel RMS difference {rms:.3f} on [0, 1]")
    save_rows(os.path.join(args.out, "fig5.png"), [at_eta0[S] for S in steps])
    first = [os.path.join(args.out, f"S{args.steps[0]}_eta{eta}.npz") for eta in ETAS]
    save_rows(os.path.join(args.out, "eta.png"), [quality.load_images(p) for p in first])
    what = f"(eta = 0, a row an S), {args.out}/eta.png (S = {args.steps[0]}, a row an eta)"
    print(f"wrote {args.out}/fig5.png {what}")
    return 0


COLUMNS = ["S", "eta", "p_confident", "fd", "floor_fd"]


def results_csv(rows):
    return "\n".join([",".join(COLUMNS)] + [",".join(map(str, row)) for row in rows]) + "\n"


def read_results(path):  # the rows of a results.csv, as ddim_table wrote them
    try:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError("no rows")
        return [
            (int(r["S"]), r["eta"], float(r["p_confident"]), float(r["fd"]), float(r["floor_fd"]))
            for r in rows
        ]
    except (OSError, KeyError, ValueError, TypeError) as e:
        why = f"not a results.csv of ddim_table.py ({type(e).__name__})"
        raise ddpm.UserError(f"--results {path}: {why}") from None


def plot_table(fig, rows):
    """DDIM Table 1 as two panels against S (log), a line per eta: the feature distance over the
    floor's, and the confident share."""
    for k, (column, label) in enumerate([(3, "feature distance / the floor's"), (2, "p > 0.9")], 1):
        ax = fig.add_subplot(1, 2, k)
        for eta in ETAS:
            cell = sorted(
                (r[0], r[column] / (r[4] if column == 3 else 1)) for r in rows if r[1] == eta
            )
            if cell:
                ax.plot(
                    *zip(*cell),
                    marker="o",
                    ms=3,
                    label="sigma_hat" if eta == "hat" else f"eta = {eta}",
                )
        ax.set_xscale("log")
        ax.set_xlabel("S, steps")
        ax.set_ylabel(label)
        if column == 3:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
    fig.suptitle("DDIM Table 1 on MNIST: quality against S, a line per eta")


def save_rows(path, cells):  # the first 8 samples of each cell, a row a cell
    x = ddpm.to_model_range(torch.as_tensor(np.concatenate([c[:8] for c in cells])))
    ddpm.save_samples(path, x, nrow=8)


FLAGS = [
    ("--clf", str, "clf.pt", None, "the classifier from experiments/quality.py train"),
    ("--data-dir", str, "./data", None, "MNIST is read, or downloaded, here"),
    ("--ckpt", str, None, None, "checkpoint written by train; None: the model shipped in samples/"),
    ("--steps", ddpm.comma_ints, [10, 20, 50, 100], ddpm.AT_LEAST_1, "S below T, a row each"),
    ("--n", int, 300, ddpm.AT_LEAST_1, "samples a cell"),
    ("--guidance", float, 0.0, None, "0: the sampler alone, p(x) itself"),
    ("--seed", int, 0, None, "the same x_T in every cell"),
    ("--out", str, "table", None, "a folder for the cells' .npz, the two pictures, results.csv"),
    ("--plot", str, None, None, "a .png of the table: quality against S, a line per eta"),
    ("--results", str, None, None, "draw this results.csv (--plot), sampling nothing"),
]


def main(argv=None):
    return common.main(ddim_table, FLAGS, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""DDIM's Table 1 on MNIST: sample quality against the steps S and eta, judged by quality.py.

    python experiments/quality.py train --data-dir ../shared/data --out clf.pt
    python experiments/ddim_table.py --clf clf.pt --data-dir ../shared/data --n 300 --out table

Each cell is `ddpm.py sample --sampler ddim --steps S --eta ETA --guidance 0 --n N --seed 0` (the
sigma_hat row: `--sampler ddpm --steps S --sigma2 beta`, Algorithm 2 on the sub-sequence), saved as
OUT/<cell>.npz and judged against the test split: the share of confident digits and the Frechet
distance in the classifier's features, over the floor of N real training images. A cell whose .npz
exists is judged, not sampled again, so a stopped run resumes. Every cell starts from the same x_T
(the same seed), so OUT/fig5.png shows DDIM's Fig. 5: the first 8 samples at eta = 0, a row an S;
and it prints how often each S gives the digit S = 1000 gives from the same x_T. OUT/eta.png: the
first 8 samples at S = 10, a row an eta (0, 0.2, 0.5, 1, sigma_hat): what eta does to the pixels.
"""

import argparse
import os
import time

import common  # noqa: F401  (makes ddpm importable)
import numpy as np
import quality
import torch

import ddpm

CELLS = [(S, eta) for S in (10, 20, 50, 100) for eta in ("0", "0.2", "0.5", "1", "hat")]
CELLS += [(1000, "0"), (1000, "1")]
STEPS = (10, 20, 50, 100, 1000)  # the rows of Fig. 5


def sample_flags(S, eta):
    if eta == "hat":
        return ["--sampler", "ddpm", "--steps", str(S), "--sigma2", "beta"]
    return ["--sampler", "ddim", "--steps", str(S), "--eta", eta]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clf", default="clf.pt", help="from experiments/quality.py train")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--ckpt", help="None: the model shipped in samples/")
    parser.add_argument("--n", type=int, default=300, help="samples a cell")
    parser.add_argument("--guidance", default="0", help="0: the sampler alone, p(x) itself")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="table", help="a folder for the cells' .npz")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = quality.make_classifier()
    model.load_state_dict(torch.load(args.clf, weights_only=True))
    model.eval()
    x_test, _ = quality.mnist(args.data_dir, False)
    x_train, _ = quality.mnist(args.data_dir, True)
    with torch.no_grad():
        reference = model[0](ddpm.to_model_range(x_test)).double()
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[: args.n]
    real, _, _, floor = quality.judge_images(model, x_train[idx], reference)
    print(f"{args.n} real training images: p > 0.9 {real:.1%}, FD {floor:.2f} (the floor)")
    print("| S | eta | p > 0.9 | FD (x floor) | sampling time |")
    print("| --- | --- | --- | --- | --- |")
    for S, eta in CELLS:
        path = os.path.join(args.out, f"S{S}_eta{eta}.npz")
        seconds = "(sampled before)"
        if not os.path.exists(path):
            t0 = time.time()
            flags = sample_flags(S, eta) + ["--guidance", args.guidance, "--n", str(args.n)]
            flags += ["--seed", str(args.seed), "--out", path]
            flags += ["--ckpt", args.ckpt] if args.ckpt else []
            assert ddpm.main(["sample", *flags]) == 0
            seconds = f"{time.time() - t0:.0f} s"
        sure, _, _, fd = quality.judge_images(model, np.load(path)["images"], reference)
        print(
            f"| {S} | {eta} | {sure:.1%} | {fd:.2f} ({fd / floor:.1f}x) | {seconds} |", flush=True
        )
    at_eta0 = {S: np.load(os.path.join(args.out, f"S{S}_eta0.npz"))["images"] for S in STEPS}
    print("Fig. 5, eta = 0: each S against S = 1000 from the same x_T")
    x_1000 = ddpm.to_model_range(torch.as_tensor(at_eta0[1000]))
    with torch.no_grad():
        digit_1000 = model(x_1000).argmax(1)
    for S in STEPS[:-1]:
        x = ddpm.to_model_range(torch.as_tensor(at_eta0[S]))
        with torch.no_grad():
            same = (model(x).argmax(1) == digit_1000).float().mean()
        rms = ((x - x_1000) / 2).pow(2).mean().sqrt()  # on [0, 1]
        print(f"  S = {S}: the same digit {same:.1%}, pixel RMS difference {rms:.3f} on [0, 1]")
    save_rows(os.path.join(args.out, "fig5.png"), [at_eta0[S] for S in STEPS])
    at_10 = [np.load(os.path.join(args.out, f"S10_eta{e}.npz"))["images"] for S, e in CELLS[:5]]
    save_rows(os.path.join(args.out, "eta.png"), at_10)
    print(f"wrote {args.out}/fig5.png (eta = 0, a row an S), {args.out}/eta.png (S = 10, an eta)")


def save_rows(path, cells):  # the first 8 samples of each cell, a row a cell
    x = ddpm.to_model_range(torch.as_tensor(np.concatenate([c[:8] for c in cells])))
    ddpm.save_samples(path, x, nrow=8)


if __name__ == "__main__":
    main()

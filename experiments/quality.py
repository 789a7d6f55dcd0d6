"""How good are MNIST samples? A small classifier of this project's own, outside the reference.

    python experiments/quality.py train --data-dir ../shared/data --out clf.pt  # 2 min on 2 cores
    python experiments/quality.py judge --clf clf.pt s.npz [more.npz ...]  # from ddpm.py sample

For each .npz of uint8 images (N, 1, 32, 32) it reports the share classified with p > 0.9, the
class histogram of those confident ones, and the Frechet distance between the classifier's 128
penultimate features of the samples and of the MNIST test split (the FID recipe with an MNIST
network in place of Inception). The same numbers for N real training images are printed first:
at a finite N the distance is not 0, and that floor is what a sample set is compared with.
"""

import argparse
import time

import common  # noqa: F401  (makes ddpm importable)
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import ddpm  # the pixel scaling is the reference's own


def make_classifier():
    features = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16 x 16
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8 x 8
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
    )
    return nn.Sequential(features, nn.Linear(128, 10))


def mnist(data_dir, train):
    ds = torchvision.datasets.MNIST(data_dir, train=train, download=True)
    x = F.pad(torch.as_tensor(ds.data), (2, 2, 2, 2)).unsqueeze(1)  # as ddpm.load_data pads
    return x, torch.as_tensor(ds.targets)


def train(args):
    torch.manual_seed(0)
    x, y = mnist(args.data_dir, True)
    x_test, y_test = mnist(args.data_dir, False)
    model = make_classifier()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t0 = time.time()
    for _ in range(args.epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(model(ddpm.to_model_range(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        p = model(ddpm.to_model_range(x_test)).softmax(1)
    acc = (p.argmax(1) == y_test).float().mean().item()
    sure = (p.max(1).values > 0.9).float().mean().item()
    print(
        f"test accuracy {acc:.2%}, p > 0.9 on {sure:.1%} of test images ({time.time() - t0:.0f} s)"
    )
    torch.save(model.state_dict(), args.out)


def frechet(f1, f2):  # |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(s1)
    s1_half = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(s1_half @ s2 @ s1_half).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross).item()


@torch.no_grad()
def judge_images(model, images, reference):
    x = ddpm.to_model_range(torch.as_tensor(images))
    feats = model[0](x)
    p = model[1](feats).softmax(1)
    conf, pred = p.max(1)
    sure = conf > 0.9
    hist = torch.bincount(pred[sure], minlength=10)
    shares = hist.float() / max(int(sure.sum()), 1)
    fd = frechet(feats.double(), reference)
    return sure.float().mean().item(), hist.tolist(), shares, fd


def judge(args):
    model = make_classifier()
    model.load_state_dict(torch.load(args.clf, weights_only=True))
    model.eval()
    x_test, _ = mnist(args.data_dir, False)
    x_train, _ = mnist(args.data_dir, True)
    with torch.no_grad():
        reference = model[0](ddpm.to_model_range(x_test)).double()
    n = args.n_real
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:n]
    sets = [(f"{n} real training images (the floor)", x_train[idx])]
    sets += [(path, np.load(path)["images"]) for path in args.npz]
    floor = None
    for name, images in sets:
        sure, hist, shares, fd = judge_images(model, images, reference)
        floor = floor or fd
        print(
            f"{name}: n {len(images)} | p > 0.9: {sure:.1%} | confident per class {hist} "
            f"({shares.min():.1%}..{shares.max():.1%}) | FD {fd:.2f} ({fd / floor:.1f}x floor)"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--data-dir", default="./data")
    tr.add_argument("--epochs", type=int, default=3)
    tr.add_argument("--out", default="clf.pt")
    ju = sub.add_parser("judge")
    ju.add_argument("npz", nargs="*")
    ju.add_argument("--clf", default="clf.pt")
    ju.add_argument("--data-dir", default="./data")
    ju.add_argument("--n-real", type=int, default=1000, help="real images for the floor")
    args = parser.parse_args()
    train(args) if args.cmd == "train" else judge(args)


if __name__ == "__main__":
    main()

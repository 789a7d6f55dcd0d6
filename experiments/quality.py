"""How good are MNIST samples? A small classifier of this project's own, outside the reference.

    python experiments/quality.py train --data-dir ../shared/data --out clf.pt  # 2 min on 2 cores
    python experiments/quality.py judge --clf clf.pt s.npz [more.npz ...]  # from ddpm.py sample

For each .npz of uint8 images (N, 1, 32, 32) it reports the share classified with p > 0.9, the
class histogram of those confident ones, and the Frechet distance between the classifier's 128
penultimate features of the samples and of the MNIST test split (the FID recipe with an MNIST
network in place of Inception). The same numbers for N real training images are printed first:
at a finite N the distance is not 0, and that floor is what a sample set is compared with.
"""

import io
import time

import common  # noqa: F401  (makes ddpm importable)
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm  # the data and the pixel scaling are the reference's own


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


def mnist(data_dir, train):  # (N, 1, 32, 32) uint8 digits, padded as ddpm.py pads them; labels
    return ddpm.load_data("mnist", data_dir, train=train)


def load_classifier(path):
    """The classifier `train` wrote, in eval mode; a missing or foreign file is one line."""
    model = make_classifier()
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
    except FileNotFoundError:
        why = "train one with: python experiments/quality.py train"
        raise ddpm.UserError(f"--clf {path}: no such file ({why})") from None
    except Exception as e:
        why = f"not a classifier written by quality.py train ({type(e).__name__})"
        raise ddpm.UserError(f"--clf {path}: {why}") from None
    return model.eval()


def load_images(path):  # the uint8 images of a .npz that ddpm.py sample wrote
    try:
        images = np.load(path)["images"]
    except Exception as e:  # missing, not an .npz, or without "images"
        why = f"cannot read the images of an .npz from ddpm.py sample ({type(e).__name__})"
        raise ddpm.UserError(f"{path}: {why}") from None
    if images.dtype != np.uint8 or images.shape[1:] != (1, 32, 32):
        shape = "x".join(map(str, images.shape))
        raise ddpm.UserError(
            f"{path}: {shape} {images.dtype} images; judge takes N x 1 x 32 x 32 uint8"
        )
    return images


def train(args):
    ddpm.check_writable(args.out)
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
    seconds = time.time() - t0
    print(f"test accuracy {acc:.2%}, p > 0.9 on {sure:.1%} of test images ({seconds:.0f} s)")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    ddpm.atomic_write(args.out, lambda f: f.write(buffer.getvalue()))
    return 0


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


@torch.no_grad()
def judge_setup(clf, data_dir, n_real):
    """(the classifier, the test split's features, the floor: judge_images of n_real training
    images), what every judgement is compared with."""
    model = load_classifier(clf)
    x_test, _ = mnist(data_dir, False)
    x_train, _ = mnist(data_dir, True)
    reference = model[0](ddpm.to_model_range(x_test)).double()
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:n_real]
    return model, reference, judge_images(model, x_train[idx], reference)


def judge(args):
    sets = [(path, load_images(path)) for path in args.npz]  # every file read before the work
    model, reference, floor = judge_setup(args.clf, args.data_dir, args.n_real)
    sets = [(f"{args.n_real} real training images (the floor)", None)] + sets
    for name, images in sets:
        sure, hist, shares, fd = floor if images is None else judge_images(model, images, reference)
        print(
            f"{name}: n {args.n_real if images is None else len(images)} | p > 0.9: {sure:.1%} | "
            f"confident per class {hist} ({shares.min():.1%}..{shares.max():.1%}) | "
            f"FD {fd:.2f} ({fd / floor[3]:.1f}x floor)"
        )
    return 0


DATA_DIR = ("--data-dir", str, "./data", None, "MNIST is read, or downloaded, here")
CLF = ("--clf", str, "clf.pt", None, "the classifier from quality.py train")
COMMANDS = {  # name: (what runs, what it does, its flags)
    "train": (
        train,
        "train the judge's classifier on MNIST",
        [
            DATA_DIR,
            ("--epochs", int, 3, ddpm.AT_LEAST_1, "passes over the training split"),
            ("--out", str, "clf.pt", None, "the classifier's file"),
        ],
    ),
    "judge": (
        judge,
        "judge .npz files of samples against the MNIST test split",
        [
            ("npz", {"nargs": "*"}, [], None, ".npz files from ddpm.py sample"),
            CLF,
            DATA_DIR,
            ("--n-real", int, 1000, ddpm.AT_LEAST_1, "real images for the floor"),
        ],
    ),
}


def main(argv=None):
    return ddpm.command_line(__doc__.splitlines()[0], COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())

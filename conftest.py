"""What test_ddpm.py and the experiments' tests share: tiny data in MNIST's own format, a command
line runner, closed-form eps-models, and two trained checkpoints (made once a test session)."""

import importlib
import os
import struct
import sys

import pytest
import torch
from PIL import Image

import ddpm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
F64 = torch.float64
TINY = ["--ch", "8", "--ch-mult", "1,2", "--n-res", "1", "--T", "20", "--batch-size", "16"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cli(command, extra=()):
    """A command line written as one string: `train ...` and `sample ...` run ddpm.main; `nll ...`,
    `reconstruct ...` and `interpolate ...` the main of that script in experiments/."""
    argv = command.split() + list(extra)
    if argv[0] in ("nll", "reconstruct", "interpolate"):
        return importlib.import_module(argv[0]).main(argv[1:])
    return ddpm.main(argv)


def write_mnist(root, n=48, seed=0, name="MNIST"):
    """Tiny MNIST (or FashionMNIST) in the original IDX format, where torchvision looks for it:
    root/name/raw. Image i has label i % 10."""
    raw = os.path.join(root, name, "raw")
    os.makedirs(raw, exist_ok=True)
    images = torch.randint(0, 256, (n, 28, 28), generator=gen(seed), dtype=torch.uint8)
    for split in ("train", "t10k"):
        with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
        with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + bytes(i % 10 for i in range(n)))
    return images


def oracle_eps(x0, sched):
    """The true noise for a fixed x_0: eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t),
    eq. (4)."""

    def eps_model(xt, t):
        ab = sched.alpha_bar[t].reshape(-1, *[1] * (xt.dim() - 1))
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()

    return eps_model


def toy_eps(xt, t):
    """A smooth model that depends on x and t, for properties that must hold for any eps_theta."""
    return torch.tanh(xt) * (t.to(xt.dtype) / 1000).reshape(-1, *[1] * (xt.dim() - 1))


def pixel_grid_image(shape, seed):  # an image whose pixels are on the 8-bit grid, in [-1, 1]
    pixels = torch.randint(0, 256, shape, generator=gen(seed))
    pixels[..., 0, 0], pixels[..., 0, 1] = 0, 255  # both edge buckets occur
    return pixels.to(F64) / 127.5 - 1


def spy_on_labels(monkeypatch):
    """Every label the network is told, one list a call, as load_checkpoint's model is called."""
    seen, load_checkpoint = [], ddpm.load_checkpoint

    def loading(path, device):
        ckpt, model = load_checkpoint(path, device)

        def spy(xt, t, y):
            seen.append(y.tolist())
            return model(xt, t, y)

        spy.config, spy.parameters = model.config, model.parameters
        return ckpt, spy

    monkeypatch.setattr(ddpm, "load_checkpoint", loading)
    return seen


def bad_checkpoints(d, ckpt):  # next to a good checkpoint: files a user might pass by mistake
    (d / "corrupt.pt").write_bytes(b"not a checkpoint")
    state = torch.load(ckpt, weights_only=True)
    # as shipped in samples/
    torch.save({k: state[k] for k in ("config", "ema", "step")}, d / "ema_only.pt")
    state["config"]["model"]["ch"] = 16  # claims another architecture than its weights
    torch.save(state, d / "other_arch.pt")
    Image.new("L", (20, 20)).save(d / "small.png")


def fails_in_one_line(d, ckpt, capsys, args, message):
    """A bad command line: exit code 2, one line of stderr saying `message`, no traceback, and the
    file at --out (and any other) untouched."""
    bad_checkpoints(d, ckpt)
    (d / "keep.png").write_bytes(b"precious")
    args = [a.format(d=d) for a in args]
    if args[0] in ("sample", "reconstruct", "interpolate"):
        args += ["--ckpt", ckpt] if "--ckpt" not in args else []
        args += ["--out", str(d / "keep.png")] if "--out" not in args else []
    assert cli(args[0], args[1:]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (d / "keep.png").read_bytes() == b"precious"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):  # 3 steps of a tiny conditional U-Net on tiny MNIST, T = 20
    d = tmp_path_factory.mktemp("run")
    write_mnist(d)
    ckpt = str(d / "ckpt.pt")
    assert cli(f"train --data-dir {d} --steps 3 --out {ckpt}", TINY) == 0
    return d, ckpt


@pytest.fixture(scope="session")
def roll(tmp_path_factory):
    """A short run with the defaults (lr 2e-3, batch 128, T 1000): 2,000 of the 23,430 default
    steps."""
    d = tmp_path_factory.mktemp("roll")
    assert cli(f"train --dataset swissroll --steps 2000 --out {d / 'roll.pt'}") == 0
    return d, str(d / "roll.pt")

"""Tests of the judge (experiments/quality.py) and of DDIM's Table 1 driver (ddim_table.py): the
Frechet distance against its closed form, the test split judged against itself, a tiny table that
resumes, and every bad file of every command in experiments/ answered in one line."""

import math
import os
import re

import ddim_table
import interpolate
import nll
import numpy as np
import pytest
import quality
import reconstruct
import shared_latent
import table2
import torch
from PIL import Image

from conftest import F64, gen, write_mnist


def exact_sample(mean, cov, n, seed):
    """n points whose sample mean and covariance (torch.cov's, n - 1) are exactly mean and cov."""
    z = torch.randn(n, len(mean), generator=gen(seed), dtype=F64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample covariance I
    return mean + z @ torch.linalg.cholesky(cov).T


def test_the_frechet_distance_is_its_closed_form_on_gaussian_features():
    """Features with exactly known sample moments. Equal covariances: |mu1 - mu2|^2, the trace
    terms cancel. Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2. Two 2 x 2
    covariances that do not commute: tr (S1^1/2 S2 S1^1/2)^1/2 = sqrt(tr(S1 S2) + 2 sqrt(det S1
    det S2)), since tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for a 2 x 2 M >= 0."""
    mu1, mu2 = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0], dtype=F64), torch.zeros(5, dtype=F64)
    shift = (mu1 - mu2).pow(2).sum().item()
    s = torch.diag(torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=F64))
    same = quality.frechet(exact_sample(mu1, s, 400, 0), exact_sample(mu2, s, 300, 1))
    assert math.isclose(same, shift, rel_tol=1e-9)
    a, b = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=F64), torch.tensor([4.0, 1, 1, 0.2, 2])
    diag = quality.frechet(
        exact_sample(mu1, torch.diag(a), 400, 2), exact_sample(mu2, torch.diag(b.double()), 300, 3)
    )
    assert math.isclose(diag, shift + (a.sqrt() - b.double().sqrt()).pow(2).sum(), rel_tol=1e-9)
    s1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=F64)
    s2 = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=F64)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    cross = math.sqrt((s1 @ s2).trace() + 2 * math.sqrt(s1.det() * s2.det()))
    closed = 1.25 + s1.trace() + s2.trace() - 2 * cross  # |(1, -0.5) - 0|^2 = 1.25
    m1 = torch.tensor([1.0, -0.5], dtype=F64)
    fd = quality.frechet(exact_sample(m1, s1, 500, 4), exact_sample(torch.zeros(2), s2, 200, 5))
    assert math.isclose(fd, closed, rel_tol=1e-9)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):  # the judge's classifier, one epoch on tiny MNIST (48 images)
    d = tmp_path_factory.mktemp("clf")
    write_mnist(d)
    path = str(d / "clf.pt")
    assert quality.main(["train", "--data-dir", str(d), "--epochs", "1", "--out", path]) == 0
    return d, path


def test_the_test_split_judged_against_itself_is_at_distance_0(clf, capsys):
    """judge compares a sample set's features with the test split's: the test split itself is at
    Frechet distance 0 (to rounding), its n and histogram over its 48 images as given; the floor
    of 20 training images is printed first."""
    d, path = clf
    images, _ = quality.mnist(str(d), False)
    np.savez(d / "test.npz", images=images.numpy())
    argv = ["judge", "--clf", path, "--data-dir", str(d), "--n-real", "20", str(d / "test.npz")]
    assert quality.main(argv) == 0
    floor, itself = capsys.readouterr().out.strip().splitlines()
    assert floor.startswith("20 real training images (the floor): n 20")
    fd = float(re.search(r"\| FD (\S+) ", itself).group(1))
    assert "n 48 |" in itself and abs(fd) < 0.005


def test_the_ddim_table_samples_every_cell_then_resumes_from_its_files(trained, clf, capsys):
    """A tiny table (the tiny trained model, T = 20, S = 2 and 5): 5 rows an S and two at S = T,
    Fig. 5 and the eta picture written; run again, every cell is judged from its file."""
    _, ckpt = trained
    d, path = clf
    out = str(d / "table")
    argv = ["--ckpt", ckpt, "--clf", path, "--data-dir", str(d), "--steps", "2,5", "--n", "4"]
    assert ddim_table.main([*argv, "--out", out]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and " s |" in r]
    assert len(rows) == 2 * 5 + 2 and rows[-1].startswith("| 20 | 1 |")
    assert os.path.exists(os.path.join(out, "fig5.png")) and os.path.exists(f"{out}/eta.png")
    assert ddim_table.main([*argv, "--out", out, "--plot", str(d / "t1.png")]) == 0
    assert capsys.readouterr().out.count("(sampled before)") == 12
    assert os.path.getsize(d / "t1.png") > 1000  # drawn from the rows judged
    results = os.path.join(out, "results.csv")  # and again from the rows recorded, nothing sampled
    assert ddim_table.main(["--results", results, "--plot", str(d / "t1b.png")]) == 0
    assert os.path.getsize(d / "t1b.png") > 1000 and "from 12 rows" in capsys.readouterr().out


def test_table2_draws_its_recorded_results_and_refuses_another_file_in_one_line(tmp_path, capsys):
    """table2.py plot: a results .csv of the grid as bound against quality; a file of other
    columns is one line and exit code 2."""
    good, bad = tmp_path / "grid.csv", tmp_path / "other.csv"
    good.write_text("cell,steps,bits_per_pixel,p_confident,fd_over_floor\na,4102,1.2,0.5,9\n")
    bad.write_text("S,eta\n10,0\n")
    assert table2.main(["plot", "--results", str(good), "--plot", str(tmp_path / "g.png")]) == 0
    assert os.path.getsize(tmp_path / "g.png") > 1000
    capsys.readouterr()
    for results in (bad, tmp_path / "missing.csv"):
        assert (
            table2.main(["plot", "--results", str(results), "--plot", str(tmp_path / "b.png")]) == 2
        )
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "b.png")


def test_shared_latent_draws_a_row_per_t_from_one_x_t(trained, capsys):
    """DDPM Fig. 7's grid: a row per t of the digit, x_t and --n draws; at t = 1 every draw is the
    one noiseless step from the same x_1, so the draws are the same image, while from t = T they
    are not."""
    d, ckpt = trained
    out = d / "shared.png"
    argv = ["--ckpt", ckpt, "--data-dir", str(d), "--n", "3", "--out", str(out)]
    assert shared_latent.main([*argv, "--t", "20,1"]) == 0
    grid = np.asarray(Image.open(out).convert("L"))
    assert grid.shape == (2 * 34 + 2, 5 * 34 + 2)

    def draws(row):  # the --n draws of a row, each 32 x 32
        return [grid[2 + 34 * row :][:32, 2 + 34 * c :][:, :32] for c in range(2, 5)]

    from_T, from_1 = draws(0), draws(1)
    assert all(np.array_equal(from_1[0], x) for x in from_1[1:])  # x_1's last step adds no noise
    assert not all(np.array_equal(from_T[0], x) for x in from_T[1:])
    assert shared_latent.main([*argv, "--t", "21"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--t 21" in err


def bad_files(d):  # a corrupt file of each kind a command reads, and a path that does not exist
    (d / "corrupt.pt").write_bytes(b"not a checkpoint")
    (d / "corrupt.npz").write_bytes(b"not an npz")
    (d / "corrupt.png").write_bytes(b"not a png")
    np.savez(d / "wrong.npz", images=np.zeros((2, 3, 8, 8), np.uint8))
    return {k: str(d / v) for k, v in [("missing", "missing.pt"), ("pt", "corrupt.pt")]}


CKPT_COMMANDS = [  # each with a missing and with a corrupt file at {bad}
    "nll --ckpt {bad} --data-dir {d}",
    "reconstruct --ckpt {bad} --data-dir {d}",
    "interpolate --ckpt {bad} --data-dir {d}",
    "table2 sample --ckpt {bad}",
    "table2 bound --ckpt {bad} --data-dir {d}",
    "table2 train --resume {bad} --data-dir {d}",
    "quality judge --clf {bad} --data-dir {d}",
    "ddim_table --clf {bad} --data-dir {d}",
    "ddim_table --clf {clf} --ckpt {bad} --data-dir {d}",
    "shared_latent --ckpt {bad} --data-dir {d}",
]
OTHER_FILES = [
    "ddim_table --results {d}/corrupt.npz --plot {d}/t.png --data-dir {d}",
    "ddim_table --results {d}/corrupt.npz --data-dir {d}",
    "interpolate --pair {d}/corrupt.png,1 --data-dir {d}",
    "quality judge --clf {clf} {d}/corrupt.npz --data-dir {d}",
    "quality judge --clf {clf} {d}/wrong.npz --data-dir {d}",
    "quality judge --clf {clf} {d}/missing.npz --data-dir {d}",
    "quality train --out {d}/no/such/folder/clf.pt --data-dir {d}",
]


@pytest.mark.parametrize(
    "command, bad",
    [(c, b) for c in CKPT_COMMANDS for b in ("missing", "pt")] + [(c, None) for c in OTHER_FILES],
)
def test_every_command_answers_a_missing_or_corrupt_file_in_one_line(clf, capsys, command, bad):
    """Each command of experiments/, given a file that does not exist or is not what it reads: exit
    code 2, one line on stderr, no traceback."""
    d, path = clf
    files = bad_files(d)
    script, *argv = command.format(bad=files.get(bad), d=d, clf=path).split()
    mains = dict(nll=nll.main, reconstruct=reconstruct.main, interpolate=interpolate.main)
    mains.update(table2=table2.main, quality=quality.main, ddim_table=ddim_table.main)
    mains.update(shared_latent=shared_latent.main)
    assert mains[script](argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err

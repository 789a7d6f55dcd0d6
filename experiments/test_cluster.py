"""Tests of experiments/cluster.py with known answers: the matching of clusters to classes, the
E-step of closed-form eps-models of two Gaussian clusters, a tiny EM run that finds two kinds of
image from a random start, the balance guard on data made to collapse, and the command line."""

import math
import os
import struct

import cluster
import numpy as np
import pytest
import torch

import ddpm
from conftest import F64, TINY, cli, gen, write_mnist

MEANS = torch.tensor([[-0.6, 0.5], [0.7, -0.4]], dtype=F64)  # two clusters of 2-D points
S = 0.1  # their standard deviation


def test_a_permutation_of_the_labels_is_matched_with_accuracy_1():
    """Clusters named by a permutation of the classes: accuracy 1, and the map is the permutation's
    inverse. One image moved to another cluster: accuracy 1 - 1/n exactly."""
    true = torch.randint(0, 10, (500,), generator=gen(0)).numpy()
    perm = torch.randperm(10, generator=gen(1)).numpy()
    accuracy, mapping, confusion = cluster.matched_accuracy(perm[true], true)
    assert accuracy == 1
    assert all(mapping[perm[c]] == c for c in range(10))
    assert confusion.sum() == 500 and (confusion > 0).sum() == 10
    moved = perm[true]
    moved[0] = (moved[0] + 1) % 10
    assert cluster.matched_accuracy(moved, true)[0] == 1 - 1 / 500


def test_the_matching_is_the_best_one_to_one_not_each_clusters_majority():
    """Two clusters whose majority is the same class: one of them must take the other class. The
    best one-to-one map scores (40 + 30) / 100; majority voting would claim (40 + 35) / 100."""
    pred = np.array([0] * 50 + [1] * 50)
    true = np.array([0] * 40 + [1] * 10 + [0] * 35 + [1] * 15)
    accuracy, mapping, _ = cluster.matched_accuracy(pred, true)
    assert mapping == {0: 0, 1: 1}
    assert accuracy == pytest.approx(0.55)
    pred = np.array([0] * 50 + [1] * 50)
    true = np.array([0] * 40 + [1] * 10 + [0] * 20 + [1] * 30)
    assert cluster.matched_accuracy(pred, true)[0] == pytest.approx(0.70)


def two_gaussians_net(sched):
    """net(x_t, t, q): the exact eps of data N(MEANS[q], S^2 I), q = 0, 1 (q = 2, "no label": the
    mixture's first component; unused here)."""

    def net(xt, t, q):
        ab = sched.alpha_bar[t].reshape(-1, 1)
        mu = MEANS[q.clamp(max=1)]
        return (1 - ab).sqrt() * (xt - ab.sqrt() * mu) / (ab * S**2 + 1 - ab)

    return net


def test_the_e_step_of_two_gaussian_clusters_picks_each_points_own_cluster():
    """Points of N(MEANS[0], S^2) and of N(MEANS[1], S^2), eps-models exact for each: at t in
    20..100 of T = 1000, one draw an image, every point's responsibility is above 0.99 for its own
    cluster, and the mean loss under its own cluster is the exact eps's, within 5 SE of
    E ||eps - eps*||^2 = d Var(eps | x_t) = d alpha_bar S^2 / (alpha_bar S^2 + 1 - alpha_bar),
    d = 2, written out here. (At large t the clusters overlap in x_t: one draw can't tell.)"""
    s = ddpm.make_schedule("linear", 1000)
    own = torch.arange(400) % 2
    x0 = MEANS[own] + S * torch.randn(400, 2, generator=gen(0), dtype=F64)
    L = cluster.cluster_losses(two_gaussians_net(s), x0, s, 2, (20, 100), 1, gen(1))
    r = cluster.responsibilities(L, torch.zeros(2, dtype=F64), 1.0)
    assert (r[torch.arange(400), own] > 0.99).all()
    ab = s.alpha_bar[20:101]
    expected = (2 * ab * S**2 / (ab * S**2 + 1 - ab)).mean()  # E||eps - eps*||^2 at uniform t
    mine = L[torch.arange(400), own]
    assert abs(mine.mean() - expected) < 5 * mine.std() / math.sqrt(400)


def test_the_clusters_share_each_draw_so_an_unused_label_scores_the_same():
    """A network that ignores q: every cluster's L is the same number, draw for draw (one x_t,
    one eps for all Q), so the responsibilities are exactly pi."""
    s = ddpm.make_schedule("linear", 100)
    net = two_gaussians_net(s)
    x0 = torch.randn(50, 2, generator=gen(2), dtype=F64)
    L = cluster.cluster_losses(lambda xt, t, q: net(xt, t, 0 * q), x0, s, 3, (1, 100), 2, gen(3))
    assert torch.equal(L, L[:, :1].expand(-1, 3))
    log_pi = torch.tensor([0.2, 0.3, 0.5], dtype=F64).log()
    assert torch.allclose(cluster.responsibilities(L, log_pi, 1.0), log_pi.exp().expand(50, -1))


def collapsing_losses(n=300, Q=4):
    """Losses made to collapse: cluster 0 is the best for every image (by 1 to 3), the others
    ordered by a feature of the image: under "em", pi flows to cluster 0 and stays."""
    feature = torch.rand(n, generator=gen(4), dtype=F64)
    L = 5 + (feature[:, None] - torch.linspace(0, 1, Q, dtype=F64)[None]).abs() * 4
    L[:, 0] = L.min(1).values - 1 - 2 * torch.rand(n, generator=gen(5), dtype=F64)
    return L


def test_the_balanced_prior_keeps_every_cluster_in_use_where_em_collapses():
    """Ten M-steps of pi on the same losses: "em" sends every image to cluster 0 (pi_0 > 0.99);
    "balanced" gives each cluster 1/Q of the responsibility (to 1e-6) and at least a sixth of
    its share of the images by argmax; "uniform" keeps pi at 1/Q."""
    L, Q = collapsing_losses(), 4
    log_pi = {p: cluster.update_log_pi("uniform", L, None, 1.0) for p in cluster.PRIORS}
    for _ in range(10):
        log_pi = {p: cluster.update_log_pi(p, L, log_pi[p], 1.0) for p in cluster.PRIORS}
    r_em = cluster.responsibilities(L, log_pi["em"], 1.0)
    assert log_pi["em"].exp()[0] > 0.99 and (r_em.argmax(1) == 0).all()
    r = cluster.responsibilities(L, log_pi["balanced"], 1.0)
    assert torch.allclose(r.mean(0), torch.full((Q,), 1 / Q, dtype=F64), atol=1e-6)
    share = torch.bincount(r.argmax(1), minlength=Q) / len(L)
    assert (share > 1 / (6 * Q)).all()
    assert torch.allclose(log_pi["uniform"].exp(), torch.full((Q,), 1 / Q, dtype=F64))


def write_two_kinds(root, n=64):
    """Tiny MNIST of two kinds of image, in the IDX format: dark (pixels 0..59, label 0) and light
    (160..219, label 1), each pixel uniform. Even images are dark, odd ones light."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    images = torch.randint(0, 60, (n, 28, 28), generator=gen(6), dtype=torch.uint8)
    images[1::2] += 160
    for split in ("train", "t10k"):
        with open(os.path.join(raw, f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
        with open(os.path.join(raw, f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + bytes(i % 2 for i in range(n)))


@pytest.fixture(scope="module")
def two_kinds(tmp_path_factory):
    """EM from a random start on the two kinds, Q = 2, the tiny U-Net at T = 20: 20 M-steps on the
    random start, then 40 of EM, pi balanced on each batch alone. Never shown a label (the file's
    labels are only read by evaluate)."""
    d = tmp_path_factory.mktemp("two")
    write_two_kinds(d)
    ckpt = str(d / "c.pt")
    args = f"train --data-dir {d} --clusters 2 --steps 60 --warmup 20 --e-t 0.1,0.3 --window 1"
    assert cluster.main(args.split() + ["--out", ckpt, "--lr", "3e-3"] + TINY) == 0
    return d, ckpt


def test_a_tiny_em_run_finds_two_kinds_of_image_from_a_random_start(two_kinds, capsys):
    """evaluate on the test split (the same two kinds): accuracy >= 0.95 and the confusion matrix
    printed; the kept E-step of the training images agrees; the random start alone is near 0.5."""
    d, ckpt = two_kinds
    capsys.readouterr()
    assert cluster.main(["evaluate", "--ckpt", ckpt, "--data-dir", str(d), "--draws", "4"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("diffusion EM"))
    assert float(line.split("accuracy ")[1].split()[0]) >= 0.95
    assert "cluster -> digit" in out and "k-means" in out
    state = torch.load(ckpt, weights_only=True)
    tau = state["config"]["train"]["tau"]
    kept = cluster.responsibilities(state["losses"], state["log_pi"], tau).argmax(1)
    assert cluster.matched_accuracy(kept.numpy(), np.arange(64) % 2)[0] >= 0.95
    start = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(0))
    assert cluster.matched_accuracy(start.numpy(), np.arange(64) % 2)[0] < 0.75


def test_resume_continues_em_from_the_kept_losses_and_pi(two_kinds, tmp_path):
    """--resume: the run's flags, weights, kept losses and pi come from the checkpoint; 10 more
    steps change the weights and go on from step 60."""
    d, ckpt = two_kinds
    out = str(tmp_path / "more.pt")
    args = ["train", "--resume", ckpt, "--data-dir", str(d), "--steps", "70", "--out", out]
    assert cluster.main(args) == 0
    before, after = torch.load(ckpt, weights_only=True), torch.load(out, weights_only=True)
    assert after["step"] == 70 and after["config"]["train"]["clusters"] == 2
    assert not torch.equal(before["model"]["conv_in.weight"], after["model"]["conv_in.weight"])
    assert after["losses"].shape == before["losses"].shape


def test_the_clusters_samples_and_confusion_pictures(two_kinds, tmp_path):
    """--out: 10 samples a cluster, a row each (2 rows of 32 x 32 with make_grid's 2-pixel
    border); --plot: the confusion matrices. ddpm.py samples a cluster too (its label)."""
    d, ckpt = two_kinds
    png, plot = tmp_path / "c.png", tmp_path / "m.png"
    args = ["evaluate", "--ckpt", ckpt, "--data-dir", str(d), "--out", str(png)]
    assert cluster.main(args + ["--plot", str(plot), "--n", "20"]) == 0
    from PIL import Image

    assert Image.open(png).size == (10 * 34 + 2, 2 * 34 + 2)
    assert Image.open(plot).size[0] > 600
    assert cli(f"sample --ckpt {ckpt} --class 1 --n 4 --out {tmp_path / 's.png'}") == 0


@pytest.mark.parametrize(
    "args, message",
    [
        ("train --clusters 1", "--clusters must be at least 2"),
        ("train --clusters 0", "--clusters must be at least 2"),
        ("train --clusters 30", "--clusters 30: the data set has 48 images"),
        ("train --e-t 0,0.5", "--e-t 0,0.5: LO,HI with 0 < LO <= HI <= 1"),
        ("train --e-t 0.5,1.5", "--e-t 0.5,1.5: LO,HI with 0 < LO <= HI <= 1"),
        ("train --resume {ckpt}", "not a cluster.py checkpoint"),
        ("evaluate --ckpt {ckpt}", "not a cluster.py checkpoint"),
        ("evaluate --ckpt {d}/missing.pt", "no checkpoint at"),
        ("evaluate --ckpt {d}/corrupt.pt", "is not a ddpm.py checkpoint"),
        ("evaluate --ckpt {two} --out {d}/c.jpg", "--out {d}/c.jpg: the clusters' samples"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_file_touched(
    trained, two_kinds, tmp_path, capsys, args, message
):
    """Each mistake: exit code 2, one line on stderr, no traceback; --out's file as it was."""
    d, ckpt = trained
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    keep = tmp_path / "keep.ckpt"
    keep.write_bytes(b"precious")
    fill = dict(d=tmp_path, ckpt=ckpt, two=two_kinds[1])
    argv = args.format(**fill).split()
    if argv[0] == "train":
        argv += ["--data-dir", str(d), "--out", str(keep)] + TINY
    else:
        argv += ["--data-dir", str(two_kinds[0])]
    capsys.readouterr()
    assert cluster.main(argv) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert keep.read_bytes() == b"precious"


def test_help_lists_train_and_evaluate(capsys):
    with pytest.raises(SystemExit):
        cluster.main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "evaluate" in out


def test_the_shipped_cluster_model_is_small_half_precision_and_knows_its_clusters(tmp_path, capsys):
    """samples/cluster.pt (experiments/README.md: the headline run's EMA weights) is what evaluate
    uses on a fresh clone: fp16, 10 clusters, no paths of the machine that trained it.
    evaluate runs on it; DDIM samples of a cluster go back to it more often than chance."""
    assert os.path.getsize(cluster.SHIPPED) <= 8_000_000
    state = torch.load(cluster.SHIPPED, weights_only=True)
    assert set(state) == {"config", "ema", "step"}
    assert all(v.dtype == torch.float16 for v in state["ema"].values())
    run, pi = state["config"]["train"], torch.tensor(state["config"]["label_freq"])
    assert run["clusters"] == 10 and not {"data_dir", "out", "resume"} & set(run)
    assert len(pi) == 10 and pi.sum() == pytest.approx(1, abs=1e-5)  # Sinkhorn's pi: not 1/Q
    write_mnist(tmp_path, n=20)
    capsys.readouterr()
    assert cluster.main(["evaluate", "--data-dir", str(tmp_path), "--n", "20", "--draws", "1"]) == 0
    out = capsys.readouterr().out
    assert "diffusion EM: accuracy" in out and "k-means" in out and "cluster -> digit" in out
    _, model = ddpm.load_checkpoint(cluster.SHIPPED, torch.device("cpu"))
    sched = ddpm.make_schedule(run["schedule"], run["T"])
    q = torch.arange(10).repeat(2)
    with torch.inference_mode():
        x = ddpm.sample_ddim(
            ddpm.clipped(ddpm.guided(model, q, 0), sched), sched, (20, 1, 32, 32), gen(0), 20
        )
    log_pi = pi.double().log()
    pred = cluster.assign(model, ddpm.to_pixels(x), sched, run, log_pi, 2, "fp32", gen(1))
    # measured 0.35 (7 of 20); a network that ignored q would put all 20 in pi's largest: 0.1
    assert (torch.from_numpy(pred) == q).float().mean() >= 0.25

"""Tests of experiments/reconstruct.py: a row a run, each image told its own label both ways."""

import re

import pytest
from PIL import Image

from conftest import cli, fails_in_one_line, spy_on_labels


def test_reconstruct_prints_a_row_a_run_and_tells_each_image_its_own_label_both_ways(
    trained, capsys, monkeypatch
):
    d, ckpt = trained
    seen = spy_on_labels(monkeypatch)
    out = d / "reconstruct.png"
    command = f"reconstruct --ckpt {ckpt} --data-dir {d} --n 12 --batch-size 8 --steps 3,20"
    assert cli(command, ["--refine", "0,2", "--out", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r" +\d+ \|", line)]
    runs = [(3, 0), (3, 2), (20, 0), (20, 2)]
    assert [tuple(map(int, row.split("|")[:2])) for row in rows] == runs
    assert [int(row.split("|")[-1]) for row in rows] == [s * (2 + r) for s, r in runs]
    # write_mnist labels image i with i % 10; 2 batches, each call told its batch's own labels
    per_image = sum(s * (2 + r) for s, r in runs)
    assert seen == [[i % 10 for i in range(8)]] * per_image + [[8, 9, 0, 1]] * per_image
    assert Image.open(out).size == (8 * 34 + 2, 5 * 34 + 2)  # the images, then a row a run


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["reconstruct", "--data-dir", "{d}", "--n", "49", "--steps", "5"],
            "--n 49: the mnist test",
        ),
        (["reconstruct", "--steps", "10,21"], "--steps 21: DDIM takes 1..T = 1..20"),
        (["reconstruct", "--refine", "0,-1"], "--refine must be at least 0 (got 0,-1)"),
        (["reconstruct", "--steps", "5", "--out", "{d}/keep.jpg"], "is a .png"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(trained, capsys, args, message):
    fails_in_one_line(*trained, capsys, args, message)

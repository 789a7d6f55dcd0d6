"""Tests of experiments/interpolate.py: the rows it promises, the pair at their ends, the labels
each row is told, and its bad inputs."""

import numpy as np
import pytest
from PIL import Image

import ddpm
from conftest import cli, fails_in_one_line, spy_on_labels, write_mnist


def test_interpolate_draws_the_pair_by_ddim_and_ddpm_and_random_rows(trained, capsys, monkeypatch):
    """Rows: the pair by DDIM, DDPM's mix at each --t-mix, --rows random pairs; the pair rows have
    the two images at their ends and ask the "no label" branch (label 10) every time; a random row
    is told one label. A 28 x 28 .png of test image 0 is test image 0, padded."""
    d, ckpt = trained
    seen = spy_on_labels(monkeypatch)
    images = write_mnist(d)
    Image.fromarray(images[0].numpy()).save(d / "digit.png")
    flags = f"--ckpt {ckpt} --data-dir {d} --lambdas 3 --steps 4 --t-mix 5,10 --rows 2"
    files = []
    for pair in ("0,1", f"{d / 'digit.png'},1"):
        files.append(d / f"interpolate{len(files)}.png")
        seen.clear()
        assert cli(f"interpolate {flags} --pair {pair} --out {files[-1]}") == 0
    grid = np.asarray(Image.open(files[0]))
    assert grid.shape == (5 * 34 + 2, 5 * 34 + 2)  # 5 rows; 3 lambdas between the two images
    assert files[0].read_bytes() == files[1].read_bytes()
    pixels = ddpm.load_data("mnist", str(d), train=False)[0]
    for row in range(3):  # the pair's rows: DDIM, mixes at t = 5 and 10
        y0 = 2 + 34 * row
        assert np.array_equal(grid[y0 : y0 + 32, 2:34], pixels[0, 0].numpy())
        assert np.array_equal(grid[y0 : y0 + 32, 4 * 34 + 2 : 5 * 34], pixels[1, 0].numpy())
    encode_decode = [y for y in seen if len(y) in (2, 3)] + [y for y in seen if len(y) == 1]
    assert len(encode_decode) == 4 * 3 + 4 + 3 * (5 + 10) and all(
        set(y) == {10} for y in encode_decode
    )
    random_rows = [y for y in seen if len(y) not in (1, 2, 3)]  # 2 x 3 lambdas; guided: twice
    assert len(random_rows) == 4 and all(len(y) in (6, 12) for y in random_rows)
    assert all(len(set(y[:3])) == len(set(y[3:6])) == 1 and max(y[:6]) < 10 for y in random_rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["interpolate", "--data-dir", "{d}", "--pair", "0,48"], "--pair 48: the mnist test"),
        (
            ["interpolate", "--pair", "{d}/small.png,0"],
            "20 x 20 image with 1 channel(s); the model",
        ),
        (["interpolate", "--pair", "{d}/corrupt.pt,0"], "neither a test index nor a readable"),
        (["interpolate", "--pair", "0"], "two test indices or .png files"),
        (["interpolate", "--lambdas", "1"], "--lambdas must be at least 2"),
        (["interpolate", "--t-mix", "10,21"], "--t-mix 21: DDPM Section 4.4 mixes at t in 1..20"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(trained, capsys, args, message):
    fails_in_one_line(*trained, capsys, args, message)

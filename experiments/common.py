"""What the measurement scripts share: `ddpm` importable from here, the flags each of them has, and
the checkpoint they measure (without --ckpt, the model shipped in samples/)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ddpm  # noqa: E402

FP32_WHY = "fp32; bf16 measured 1.8x faster, no worse at S = 10, 50 (experiments/README.md)"


def system_flags(precision_why=FP32_WHY, seed=True):  # the rows of ddpm's flag table all share
    rows = [
        ("--device", str, "auto", None, "auto = cuda, then mps, then cpu"),
        ("--precision", ddpm.PRECISIONS, "fp32", None, precision_why),
        ("--seed", int, 0, None, "fixes every random draw"),
        (
            "--ckpt",
            str,
            None,
            None,
            "checkpoint written by train; None: the model shipped in samples/",
        ),
        ("--data-dir", str, "./data", None, "the test split is read, or downloaded, here"),
    ]
    return rows if seed else rows[:2] + rows[3:]


def main(command, rows, argv=None):  # a script of one command: ddpm.py's command line for it
    description = sys.modules[command.__module__].__doc__.splitlines()[0]
    return ddpm.command_line(description, {None: (command, None, rows)}, argv)


def load(args, cell=False):
    """(device, precision, checkpoint, its EMA network, the flags it was trained with, schedule).
    A cell of table2.py (whose output need not be eps) only where cell is True, and then only it."""
    device, precision = ddpm.pick_device(args.device, args.precision)
    ckpt, model = ddpm.load_checkpoint(args.ckpt or ddpm.SHIPPED, device)
    run = ckpt["config"]["train"]
    if ("cell" in run) != cell:
        why = "table2.py measures it" if "cell" in run else "not a table2.py cell (no --cell)"
        raise ddpm.UserError(f"--ckpt {args.ckpt or ddpm.SHIPPED}: {why}")
    return device, precision, ckpt, model, run, ddpm.make_schedule(run["schedule"], run["T"])


def check_test_split(run, what):
    if run["dataset"] not in ddpm.DATASETS:
        why = "needs the test split of an 8-bit image data set (mnist, fashion, cifar10)"
        raise ddpm.UserError(f"{what} {why}; this checkpoint was trained on {run['dataset']}")


def check_steps(steps, T):
    if max(steps) > T:
        raise ddpm.UserError(f"--steps {max(steps)}: DDIM takes 1..T = 1..{T} steps")


def check_png(path, what):  # --out: a .png, in a folder that can be written
    if path and not path.lower().endswith(".png"):
        raise ddpm.UserError(f"--out {path}: {what} is a .png")
    if path:
        ddpm.check_writable(path)


def where(args, ckpt, run, n):  # the first line of a report: what was measured
    shipped = args.ckpt or "shipped in samples/"
    return f"{n} {run['dataset']} test images, checkpoint {shipped} at step {ckpt['step']}"


def save_plot(path, draw, size=(6, 4)):
    """draw(fig) on a matplotlib figure, then the .png written atomically. matplotlib is in
    experiments/requirements.txt and imported here only: a script without --plot runs without it."""
    import matplotlib

    matplotlib.use("Agg")  # no screen
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size)
    draw(fig)
    fig.tight_layout()
    ddpm.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)

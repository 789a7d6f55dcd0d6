"""DDIM Section 5.3 and DDPM Section 4.4, one grid whose columns are lam = 0..1: the --pair of
images encoded by ddpm.ddim_encode and slerped; the pair mixed by ddpm.ddpm_mix at each of --t-mix
and decoded by Algorithm 2; --rows pairs of random x_T slerped.

    python experiments/interpolate.py --data-dir ../shared/data    # test digits 0 and 1, 3 min

Pair rows have the images at both ends and use the "no label" branch of a conditional net (two
digits have no one label); a random row draws one label and is guided as `ddpm.py sample` is.
"""

import functools
import time

import common
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import ddpm


def interpolate(args):
    device, precision, ckpt, model, run, sched = common.load(args)
    shape = tuple(ckpt["config"]["data_shape"])
    if len(shape) != 3:
        raise ddpm.UserError("interpolate: the checkpoint is not an image model")
    steps = args.steps or min(50, sched.T)
    common.check_steps([steps], sched.T)
    if len(args.pair) != 2:
        raise ddpm.UserError(f"--pair {','.join(args.pair)}: two test indices or .png files, I,J")
    t_mix = args.t_mix or [sched.T // 4, sched.T // 2, 3 * sched.T // 4]
    if max(t_mix) > sched.T:
        raise ddpm.UserError(f"--t-mix {max(t_mix)}: DDPM Section 4.4 mixes at t in 1..{sched.T}")
    common.check_png(args.out or "no.out", "the interpolation grid")
    test = functools.cache(lambda: ddpm.load_data(run["dataset"], args.data_dir, train=False)[0])
    x0 = torch.stack([pair_image(s, run, shape, test) for s in args.pair]).to(device)
    L = args.lambdas
    # images through the network: the pair encoded and its row decoded, the mixes one lam at a
    # time, the random rows
    progress = ddpm.Progress(
        2 * steps * (1 + args.refine) + L * (steps + sum(t_mix) + args.rows * steps)
    )
    no_label = ddpm.counted(ddpm.guided(model), progress)
    lam = torch.linspace(0, 1, L, dtype=torch.float64)[:, None]
    gen = torch.Generator(device).manual_seed(args.seed)
    t0 = time.time()
    with ddpm.autocast(device, precision):
        x_T = ddpm.ddim_encode(no_label, sched, x0, steps, args.refine)
        z = ddpm.slerp(x_T[:1].expand(L, *shape), x_T[1:].expand(L, *shape), lam)
        rows = [ddpm.sample_ddim(no_label, sched, z.shape, steps=steps, x_T=z)]
        rows += [mix_row(no_label, sched, x0, lam, t, gen) for t in t_mix]
        if args.rows:
            rows += random_rows(model, ckpt, sched, steps, lam, args, gen, progress)
    blank = -torch.ones(1, *shape, device=device)  # black
    grid = []
    for i, row in enumerate(rows):
        ends = (x0[:1], x0[1:]) if i <= len(t_mix) else (blank, blank)
        grid += [ends[0], row.float(), ends[1]]
    ddpm.save_samples(args.out, torch.cat(grid), nrow=L + 2)
    mixes = ", ".join(map(str, t_mix)) or "-"
    what = f"the pair by DDIM ({steps} steps, refine {args.refine}), DDPM's mix at t = {mixes}"
    what += f", {args.rows} random pairs; {time.time() - t0:.0f}s, {precision}"
    print(f"wrote {args.out}: lam = 0..1 in {L} columns; rows: {what}")
    return 0


def mix_row(eps_model, sched, x0, lam, t, gen):  # DDPM Section 4.4 at t, a column a lam
    eps = torch.randn(1, *x0.shape[1:], generator=gen, device=x0.device)  # one eps for both
    seed = int(torch.randint(2**62, (1,), generator=gen, device=x0.device))
    mixes = []
    for j in range(len(lam)):  # one lam at a time, each decoded with the same z
        gen_t = torch.Generator(x0.device).manual_seed(seed)
        mixes.append(ddpm.ddpm_mix(eps_model, sched, x0[:1], x0[1:], lam[j].item(), t, eps, gen_t))
    return torch.cat(mixes)


def random_rows(model, ckpt, sched, steps, lam, args, gen, progress):  # slerps of random x_T pairs
    shape = tuple(ckpt["config"]["data_shape"])
    L = len(lam)
    z0 = torch.randn(args.rows, *shape, generator=gen, device=gen.device)
    z1 = torch.randn(args.rows, *shape, generator=gen, device=gen.device)
    z = ddpm.slerp(z0.repeat_interleave(L, 0), z1.repeat_interleave(L, 0), lam.repeat(args.rows, 1))
    label_freq, K = ckpt["config"].get("label_freq"), model.config["n_classes"]
    # one label a row, drawn and guided as `sample` draws without --class
    y, w, t_range = ddpm.unconditional_labels(label_freq, K, args.rows, args.seed, sched.T)
    y = y if y is None else y.repeat_interleave(L).to(gen.device)
    eps_model = ddpm.counted(ddpm.guided(model, y, w, t_range), progress)
    x = ddpm.sample_ddim(eps_model, sched, z.shape, steps=steps, x_T=z)
    return list(x.float().split(L))


def pair_image(s, run, shape, test):  # --pair: an index into test(), or a .png of the model's shape
    if s.isdigit():
        common.check_test_split(run, f"--pair {s}: a test index")
        data = test()  # loaded once for both indices
        if int(s) >= len(data):
            raise ddpm.UserError(
                f"--pair {s}: the {run['dataset']} test split has {len(data)} images"
            )
        return ddpm.to_model_range(data[int(s)])
    try:
        image = Image.open(s).convert("L" if shape[0] == 1 else "RGB")
    except OSError as e:
        why = f"neither a test index nor a readable image ({e})"
        raise ddpm.UserError(f"--pair {s}: {why}") from None
    x = torchvision.transforms.functional.pil_to_tensor(image)
    if x.shape[1:] == (28, 28) and run["dataset"] in ("mnist", "fashion"):
        x = F.pad(x, (2, 2, 2, 2))  # as load_data pads the digits
    if tuple(x.shape) != shape:
        got = f"a {x.shape[2]} x {x.shape[1]} image with {x.shape[0]} channel(s)"
        takes = f"the model takes {shape[2]} x {shape[1]} with {shape[0]}"
        raise ddpm.UserError(f"--pair {s}: {got}; {takes}")
    return ddpm.to_model_range(x)


FLAGS = common.system_flags() + [
    (
        "--pair",
        {"type": lambda s: s.split(","), "metavar": "I,J"},
        ["0", "1"],
        None,
        "two test-split indices or .png files",
    ),
    ("--lambdas", int, 9, ddpm.AT_LEAST_2, "columns, lam = 0..1"),
    ("--steps", int, None, ddpm.AT_LEAST_1, "DDIM steps to encode and decode; None: 50"),
    ("--refine", int, 2, ddpm.AT_LEAST_0, "fixed-point iterations a step; 0: the paper's encoder"),
    (
        "--t-mix",
        ddpm.comma_ints,
        None,
        ddpm.AT_LEAST_1,
        "DDPM Section 4.4: a row of the pair mixed at each t; None: T/4, T/2, 3T/4",
    ),
    ("--rows", int, 2, ddpm.AT_LEAST_0, "rows between two random x_T"),
    ("--out", str, "interpolate.png", None, "the grid, a .png"),
]


def main(argv=None):
    return common.main(interpolate, FLAGS, argv)


if __name__ == "__main__":
    raise SystemExit(main())

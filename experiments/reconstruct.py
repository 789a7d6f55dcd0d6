"""DDIM Section 5.4, Table 2: test images encoded to x_T by ddpm.ddim_encode and decoded by
ddpm.sample_ddim (eta = 0), and the per-dimension MSE on [0, 1].

    python experiments/reconstruct.py --data-dir ../shared/data     # 100 digits, 18 min on 2 cores

Each of --steps is a row for each of --refine (0: the paper's encoder; > 0: that many fixed-point
iterations a step, beyond the paper). A conditional net is told each image's own label, the same y
both ways.
"""

import math
import time

import common
import torch

import ddpm


def reconstruct(args):
    device, precision, ckpt, model, run, sched = common.load(args)
    common.check_test_split(run, "reconstruct")
    common.check_steps(args.steps, sched.T)
    common.check_png(args.out, "the picture of the reconstructions")
    data, labels = ddpm.load_data(run["dataset"], args.data_dir, train=False)
    if args.n > len(data):
        raise ddpm.UserError(
            f"--n {args.n}: the {run['dataset']} test split has {len(data)} images"
        )
    runs = [(steps, refine) for steps in args.steps for refine in args.refine]
    calls = [steps * (2 + refine) for steps, refine in runs]  # encode 1 + refine a step, decode 1
    progress = ddpm.Progress(args.n * sum(calls))
    mse = {r: [] for r in runs}  # per image
    x_T_std = {r: [] for r in runs}
    shown = [ddpm.to_model_range(data[:8].to(device))]  # the first 8 images, then their rows
    K = model.config["n_classes"]
    t0 = time.time()
    for b in range(0, args.n, args.batch_size):
        x0 = ddpm.to_model_range(data[b : min(b + args.batch_size, args.n)].to(device))
        y = labels[b : b + len(x0)].to(device) if K else None  # the same y to encode and decode
        eps_model = ddpm.counted(ddpm.guided(model, y), progress)
        for steps, refine in runs:
            with ddpm.autocast(device, precision):
                x_T = ddpm.ddim_encode(eps_model, sched, x0, steps, refine)
                x0_back = ddpm.sample_ddim(eps_model, sched, x0.shape, steps=steps, x_T=x_T)
            error = (x0_back.double() - x0.double()) / 2  # on [0, 1]
            mse[(steps, refine)].append(error.pow(2).flatten(1).mean(1).cpu())
            x_T_std[(steps, refine)].append(x_T.double().flatten(1).std(1).cpu())
            if b == 0:
                shown.append(x0_back[:8])
    label = ", own label both ways" if K else ""
    print(f"reconstruct: {common.where(args, ckpt, run, args.n)}{label}, {precision}")
    columns = "MSE per dim on [0, 1] +- 1 SE | median | worst image | std of x_T"
    print(f"  steps | refine | {columns} | network calls an image")
    for r, c in zip(runs, calls):
        e = torch.cat(mse[r])
        se = e.std() / math.sqrt(len(e)) if len(e) > 1 else math.nan
        spread = f"{e.median():.1e} | {e.max():.1e}"  # a few images can carry the mean
        std = torch.cat(x_T_std[r]).mean()
        print(f"  {r[0]:5d} | {r[1]:6d} | {e.mean():.2e} +- {se:.1e} | {spread} | {std:.3f} | {c}")
    if args.out:
        ddpm.save_samples(args.out, torch.cat(shown).float(), nrow=len(shown[0]))
        print(f"wrote {args.out}: the first {len(shown[0])} images, then a row a line above")
    print(f"{time.time() - t0:.0f}s")
    return 0


STEPS_HELP = "DDIM steps S, a row each (DDIM Table 2 adds 200, 500, 1000)"
REFINE_HELP = "fixed-point iterations an encoding step, a row each; 0: the paper's encoder"
FLAGS = common.system_flags(seed=False) + [
    ("--n", int, 100, ddpm.AT_LEAST_1, "the first n test images"),
    ("--steps", ddpm.comma_ints, [10, 20, 50, 100], ddpm.AT_LEAST_1, STEPS_HELP),
    ("--refine", ddpm.comma_ints, [0, 2], ddpm.AT_LEAST_0, REFINE_HELP),
    ("--batch-size", int, 250, ddpm.AT_LEAST_1, "test images per batch"),
    ("--out", str, None, None, "a .png of the first 8 images and their reconstructions"),
]


def main(argv=None):
    return common.main(reconstruct, FLAGS, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""DDPM Fig. 7: samples that share a latent x_t, a row per t: what x_t still holds of the digit.

    python experiments/shared_latent.py --data-dir ../shared/data --out samples/shared_latent.png

One test digit (--index) is noised once to x_t ~ q(x_t | x_0) at each t of --t (one eps for all),
and the reverse process (Algorithm 2 from step t, ddpm.ddpm_mix with lam = 0) draws --n samples of
p_theta(x_0 | x_t) from it, each with its own noise. A row per t: the digit, x_t, then the draws.
At large t the draws are other digits; as t falls they keep the digit's class, then its shape. A
conditional net is told "no label": the draws are the model's p(x_0 | x_t), nothing else.
"""

import time

import common
import torch

import ddpm


def shared_latent(args):
    device, precision, ckpt, model, run, sched = common.load(args)
    common.check_test_split(run, "shared_latent")
    common.check_png(args.out, "the grid of shared-latent samples")
    if max(args.t) > sched.T:
        raise ddpm.UserError(f"--t {max(args.t)}: the reverse process starts at t in 1..{sched.T}")
    data, _ = ddpm.load_data(run["dataset"], args.data_dir, train=False)
    if args.index >= len(data):
        raise ddpm.UserError(f"--index {args.index}: the test split has {len(data)} images")
    x0 = ddpm.to_model_range(data[args.index : args.index + 1].to(device))
    x0 = x0.expand(args.n, *x0.shape[1:])
    gen = torch.Generator(device).manual_seed(args.seed)
    progress = ddpm.Progress(args.n * sum(args.t))
    eps_model = ddpm.counted(ddpm.guided(model), progress)  # "no label"
    rows, t0 = [], time.time()
    for t in args.t:
        eps = torch.randn(1, *x0.shape[1:], generator=gen, device=device).expand_as(x0)
        x_t = ddpm.q_sample(x0[:1], torch.full((1,), t, device=device), eps[:1], sched)
        with ddpm.autocast(device, precision):
            draws = ddpm.ddpm_mix(eps_model, sched, x0, x0, 0.0, t, eps, gen).float()
        scale = (1 - sched.alpha_bar[t]).sqrt().item() + sched.alpha_bar[t].sqrt().item()
        rows += [x0[:1], (x_t / scale).float(), draws]  # x_t shown scaled into [-1, 1]
    ddpm.save_samples(args.out, torch.cat(rows), nrow=args.n + 2)
    what = f"test digit {args.index}, t = {', '.join(map(str, args.t))}, {args.n} draws each"
    print(f"wrote {args.out}: {what}; {time.time() - t0:.0f}s, {precision}")
    return 0


FLAGS = common.system_flags() + [
    ("--index", int, 0, ddpm.AT_LEAST_0, "the test digit"),
    ("--t", ddpm.comma_ints, [1000, 750, 500, 250], ddpm.AT_LEAST_1, "a row for each t"),
    ("--n", int, 8, ddpm.AT_LEAST_1, "draws a row"),
    ("--out", str, "shared_latent.png", None, "the grid, a .png"),
]


def main(argv=None):
    return common.main(shared_latent, FLAGS, argv)


if __name__ == "__main__":
    raise SystemExit(main())

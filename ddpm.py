"""ddpm.py: Denoising Diffusion Probabilistic Models in one file, to read next to the papers:
  DDPM  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239
  DDIM  Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502
Sections follow the papers, then the networks, data, training and CLI; eq. numbers are DDPM's unless "DDIM".

    python ddpm.py sample --sampler ddim      # DDIM, 50 steps, from the model in samples/: writes sample.png
    python ddpm.py train --epochs 30          # Algorithm 1 on MNIST, writes ckpt.pt
    python -m pytest                          # the tests: the code is the paper's math

Time index, used everywhere: t = 1..T as in the paper. Every schedule tensor has length T + 1 and index
0 means "no noise": beta[0] = 0, alpha_bar[0] = 1, so x_0 is data and the network only sees t >= 1.
"""
import argparse, copy, math, os, signal, sys, time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

# --- Noise schedule and forward process q(x_t | x_0) --------------------------------------------------------
@dataclass
class Schedule:  # float64 on the CPU; gather() moves the few values a batch needs to its device
    T: int
    beta: torch.Tensor        # (T+1,) variance added at step t, eq. (2); beta[0] = 0
    alpha: torch.Tensor       # 1 - beta
    alpha_bar: torch.Tensor   # prod_{s<=t} alpha_s, eq. (4); alpha_bar[0] = 1
    beta_tilde: torch.Tensor  # posterior variance of q(x_{t-1} | x_t, x_0), eq. (7); beta_tilde[1] = 0
    lam: torch.Tensor         # lambda_t = log(sqrt(alpha_bar_t) / sqrt(1 - alpha_bar_t)), DPM-Solver's time

def make_schedule(kind, T):  # every per-step constant, computed once in float64
    assert kind in ("linear", "cosine"), kind
    if kind == "linear":  # Ho et al.: 1e-4 .. 0.02 at T = 1000; x 1000/T keeps alpha_bar_T ~ exp(-10)
        beta = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    else:  # cosine: Nichol & Dhariwal 2021, eq. (17): alpha_bar from f(t) = cos^2(...)
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        beta = 1 - f[1:] / f[:-1]
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta.clamp(max=0.999)])  # cap: no step may erase x
    alpha_bar = torch.cumprod(1 - beta, 0)
    beta_tilde = torch.cat([beta[:1], (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]) * beta[1:]])  # eq. (7)
    return Schedule(T, beta, 1 - beta, alpha_bar, beta_tilde, 0.5 * (alpha_bar / (1 - alpha_bar)).log())

def gather(a, t, x):  # a[t] per sample, shaped (B, 1, ..., 1) to broadcast against x of any rank
    return a[t.cpu()].to(x.device, x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
def q_sample(x0, t, eps, sched):  # q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), eq. (4)
    return gather(sched.alpha_bar, t, x0).sqrt() * x0 + (1 - gather(sched.alpha_bar, t, x0)).sqrt() * eps
def predict_x0(xt, t, eps, sched):  # eq. (4) solved for x_0 given the noise: the x_0-prediction of eq. (15)
    return (xt - (1 - gather(sched.alpha_bar, t, xt)).sqrt() * eps) / gather(sched.alpha_bar, t, xt).sqrt()
def q_posterior(x0, xt, t, sched):  # mean and variance of q(x_{t-1} | x_t, x_0), eqs. (6)-(7)
    ab, ab_prev = gather(sched.alpha_bar, t, xt), gather(sched.alpha_bar, t - 1, xt)
    mean = (ab_prev.sqrt() * gather(sched.beta, t, xt) * x0
            + gather(sched.alpha, t, xt).sqrt() * (1 - ab_prev) * xt) / (1 - ab)
    return mean, gather(sched.beta_tilde, t, xt)

# --- Training objective (Algorithm 1) -----------------------------------------------------------------------
def randn_like(x, generator):  # z ~ N(0, I) from the caller's generator: one seed fixes every sample
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
def loss_fn(eps_model, x0, sched, generator=None):  # L_simple, eq. (14): t ~ U{1..T}, eps ~ N(0, I), MSE
    t = torch.randint(1, sched.T + 1, (x0.shape[0],), generator=generator, device=x0.device)
    eps = randn_like(x0, generator)
    return F.mse_loss(eps_model(q_sample(x0, t, eps, sched), t).float(), eps.float())

# --- Sampling: Algorithm 2 (DDPM), DDIM, DPM-Solver++; any eps_model(x_t, t) -> eps works (tests: oracles) -
@torch.inference_mode()
def sample_ddpm(eps_model, sched, shape, generator=None, sigma2="beta_tilde", x_T=None, trajectory=False):
    """Algorithm 2. sigma2 = "beta_tilde" or "beta": the two choices of sigma_t^2 in Section 3.2."""
    device = getattr(generator, "device", None)
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T  # line 1
    xs = [x]
    var = {"beta_tilde": sched.beta_tilde, "beta": sched.beta}[sigma2]
    for step in range(sched.T, 0, -1):  # line 2
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        # line 3: no noise at the last step, otherwise every sample keeps sigma_1 * z of noise
        z = randn_like(x, generator) if step > 1 else 0
        eps = eps_model(x, t).to(x.dtype)
        mean = (x - sched.beta[step] / (1 - sched.alpha_bar[step]).sqrt() * eps) / sched.alpha[step].sqrt()
        x = mean + var[step].sqrt() * z  # line 4
        xs.append(x)
    return (x, xs) if trajectory else x  # line 6

def ddim_timesteps(T, steps):  # DDIM's tau: `steps` distinct integers, T to 1 (a spacing >= 1 rounds apart)
    return torch.linspace(T, 1, steps, dtype=torch.float64).round().long().tolist()
def ddim_sigma(sched, t, t_prev, eta):  # DDIM eq. (16): eta = 1 on the full grid is beta_tilde, 0 no noise
    ab, ab_prev = sched.alpha_bar[t], sched.alpha_bar[t_prev]
    return eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
def dpm_timesteps(sched, steps):  # T, then even in lambda from max(lambda_T, -5) to lambda_1 ("logSNR" steps)
    taus = [sched.T]
    for target in torch.linspace(max(sched.lam[sched.T].item(), -5), sched.lam[1].item(), steps)[1:]:
        t = int((sched.lam[1:] - target).abs().argmin()) + 1
        taus.append(max(min(t, taus[-1] - 1), steps - len(taus)))  # distinct, and room for the rest
    return taus

@torch.inference_mode()
def sample_ddim(eps_model, sched, shape, steps=50, eta=0.0, generator=None, x_T=None, trajectory=False,
                order=1):
    """DDIM eq. (12) on ddim_timesteps(T, steps): `steps` network calls; the last goes to t_prev = 0, where
    alpha_bar = 1 and sigma = 0: it returns x0_hat, no special case. order=2: DPM-Solver++(2M) (Lu et al.
    2022, Alg. 2) on dpm_timesteps, x0_hat extrapolated linearly in lambda from the last step's."""
    device = getattr(generator, "device", None)
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T  # x_T ~ N(0, I)
    xs = [x]
    taus = ddim_timesteps(sched.T, steps) if order == 1 else dpm_timesteps(sched, steps)
    for i, (step, step_prev) in enumerate(zip(taus, taus[1:] + [0])):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        eps = eps_model(x, t).to(x.dtype)
        x0_hat = x0_net = predict_x0(x, t, eps, sched)
        if order == 2 and i > 0 and step_prev > 0:  # D_i of Algorithm 2, with r_i = h_{i-1} / h_i
            r = (sched.lam[step] - sched.lam[taus[i - 1]]) / (sched.lam[step_prev] - sched.lam[step])
            x0_hat = x0_net + (x0_net - x0_prev) / (2 * r)
            eps = (x - sched.alpha_bar[step].sqrt() * x0_hat) / (1 - sched.alpha_bar[step]).sqrt()  # eq. (15)
        x0_prev = x0_net
        ab_prev, sigma = sched.alpha_bar[step_prev], ddim_sigma(sched, step, step_prev, eta)
        z = randn_like(x, generator) if eta > 0 else 0
        x = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma ** 2).sqrt() * eps + sigma * z  # eq. (12)
        xs.append(x)
    return (x, xs) if trajectory else x

# --- The epsilon-network ------------------------------------------------------------------------------------
# Any R^n -> R^n model that also takes t works. For images, a small U-Net of Ho et al. (Appendix B).
def timestep_embedding(t, dim):  # Transformer sinusoids of the integer step t (Vaswani et al.), as Ho et al.
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, dim)
def norm(c):  # 32 groups (Ho et al.) from c = 128 up, else 4 channels a group: 1 erases ResBlock's t bias
    return nn.GroupNorm(math.gcd(32, max(c // 4, 1)), c)

class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t_proj = nn.Linear(t_dim, c_out)  # the time embedding enters as a per-channel bias
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.t_proj(emb)[:, :, None, None]  # (B, c_out, H, W)
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))

class Attention(nn.Module):  # single-head self-attention over all H*W positions, residual
    def __init__(self, c):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)

class UNet(nn.Module):
    """eps_theta(x_t, t). Level i: width ch * ch_mult[i] at H / 2^i; H, W must divide by 2^(levels - 1)."""
    def __init__(self, in_ch=1, ch=64, ch_mult=(1, 2, 2), n_res=2, n_classes=0):
        super().__init__()
        self.config = dict(ch=ch, ch_mult=list(ch_mult), n_res=n_res, n_classes=n_classes)  # in checkpoints
        t_dim, widths = 4 * ch, [ch * m for m in ch_mult]
        self.time_mlp = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.label_emb = nn.Embedding(n_classes + 1, t_dim)  # label n_classes means "no label"
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, self.downsample, c = nn.ModuleList(), nn.ModuleList(), ch
        for i, w in enumerate(widths, 1):  # levels 1..L; all but the last halve H and W (a stride-2 conv)
            self.down.append(nn.ModuleList([ResBlock(c if j == 0 else w, w, t_dim) for j in range(n_res)]))
            self.downsample.append(nn.Conv2d(w, w, 3, 2, padding=1) if i < len(widths) else nn.Identity())
            c = w
        self.mid1, self.attn, self.mid2 = ResBlock(c, c, t_dim), Attention(c), ResBlock(c, c, t_dim)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths, 1))):  # a level's first block also takes the skip
            self.up.append(nn.ModuleList([ResBlock(c + w if j == 0 else w, w, t_dim) for j in range(n_res)]))
            self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(w, w, 3, padding=1))
                                 if i > 1 else nn.Identity())
            c = w
        self.norm_out, self.conv_out = norm(c), nn.Conv2d(c, in_ch, 3, padding=1)
    def forward(self, x, t, y=None):  # y: class labels; None: "no label", as always when n_classes = 0
        y = torch.full_like(t, self.config["n_classes"]) if y is None else y
        emb = self.time_mlp(timestep_embedding(t, self.config["ch"])) + self.label_emb(y)  # (B, t_dim)
        h, skips = self.conv_in(x), []
        for blocks, down in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)  # lowest resolution
        for blocks, up in zip(self.up, self.upsample):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))

class MLP(nn.Module):  # eps_theta for points (swiss roll): residual blocks of width 4 * ch, t a bias in each
    def __init__(self, dim=2, ch=32, n_res=2):
        super().__init__()
        self.config, w = dict(ch=ch, n_res=n_res), 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, w), nn.SiLU(), nn.Linear(w, w))
        self.x_in, self.x_out = nn.Linear(dim, w), nn.Linear(w, dim)
        self.blocks = nn.ModuleList(nn.ModuleList(nn.Linear(w, w) for _ in range(3)) for _ in range(n_res))
    def forward(self, x, t, y=None):  # no labels for points
        emb, h = self.time_mlp(timestep_embedding(t, self.config["ch"])), self.x_in(x)  # (B, w)
        for lin1, t_proj, lin2 in self.blocks:
            h = h + lin2(F.silu(lin1(F.silu(h)) + t_proj(emb)))
        return self.x_out(F.silu(h))
def make_net(shape, ch, ch_mult=(1, 2, 2), n_res=2, n_classes=0):  # points (dim,): the MLP; (C, H, W): U-Net
    return MLP(shape[0], ch, n_res) if len(shape) == 1 else UNet(shape[0], ch, ch_mult, n_res, n_classes)

def guided(model, y, w):  # classifier-free guidance (Ho & Salimans 2022, eq. 6) for labels y, weight w
    y2 = torch.cat([y, torch.full_like(y, model.config["n_classes"])])  # each label, then "no label"
    def eps_model(xt, t):  # eps(x_t, t, y) and eps(x_t, t) from one batched call
        e_y, e_none = model(torch.cat([xt, xt]), torch.cat([t, t]), y2).to(xt.dtype).chunk(2)
        return (1 + w) * e_y - w * e_none  # w = 0: the conditional model; w > 0 pushes away from e_none
    return eps_model

class EMA:  # the weights' moving average, sampled from; decay min(decay, (1 + n) / (10 + n)) after n updates
    def __init__(self, model, decay):
        self.decay, self.n = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
    @torch.no_grad()
    def update(self, model):
        d, self.n = min(self.decay, (1 + self.n) / (10 + self.n)), self.n + 1
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)  # e = d * e + (1 - d) * p

# --- Data: images as one uint8 tensor, scaled to [-1, 1] like the paper's (Section 4); the swiss roll ------
class UserError(Exception): """A mistake the user can fix: main() prints it as one line and exits non-zero."""

def to_model_range(x):
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x  # uint8 0..255 -> [-1, 1]; points: as is
def to_pixels(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> uint8 0..255
def make_swissroll(n, generator):  # Sohl-Dickstein et al. 2015, Fig. 1: (n, 2) points on a spiral, |x| < 1.5
    u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    return (torch.stack([u * u.cos(), u * u.sin()], dim=1) / 10).float()
def sliced_wasserstein(x, y, generator, n_dirs=256):  # two equal-size sets; sqrt of the mean 1-D W2^2 over
    # random directions. In 1-D, W2 pairs sorted samples in order; two samples of one law are ~ n^-1/2 apart
    d = F.normalize(torch.randn(x.shape[1], n_dirs, generator=generator, dtype=x.dtype), dim=0)
    return ((x @ d).sort(0).values - (y @ d).sort(0).values).pow(2).mean().sqrt().item()

def read_image(path, size):  # (3, size, size) uint8: the shorter side resized to size, then centre-cropped
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise UserError(f"cannot read the image {path} ({type(e).__name__})") from None
    tf = torchvision.transforms.functional
    return tf.pil_to_tensor(tf.center_crop(tf.resize(image, size), size))

DATASETS = {"mnist": torchvision.datasets.MNIST, "fashion": torchvision.datasets.FashionMNIST,
            "cifar10": torchvision.datasets.CIFAR10}  # downloaded to --data-dir when absent
def load_data(dataset, data_dir, seed=0, image_size=32):
    """((N, C, H, W) uint8 images, (N,) labels); 28 x 28 digits are padded to 32 x 32 (resizing blurs)."""
    if dataset == "swissroll":
        return make_swissroll(100_000, torch.Generator().manual_seed(seed)), None
    if dataset not in DATASETS:
        try:
            folder = torchvision.datasets.ImageFolder(dataset)  # class sub-folders, in name order, are labels
        except OSError as e:  # no such folder, no sub-folder, or no image file in them
            raise UserError(f"--dataset {dataset}: neither a known data set nor a folder of images ({e})")
        return torch.stack([read_image(f, image_size) for f, _ in folder.imgs]), torch.tensor(folder.targets)
    try:
        ds = DATASETS[dataset](data_dir, train=True, download=True)
    except Exception as e:  # torchvision raises RuntimeError or URLError when it cannot download
        raise UserError(f"{dataset} is not in {data_dir} and downloading it failed ({type(e).__name__}); "
                        "pass --data-dir with the folder that holds it") from None
    data = torch.as_tensor(ds.data)  # MNIST, Fashion: (N, 28, 28); CIFAR-10: (N, 32, 32, 3)
    data = data.permute(0, 3, 1, 2) if data.dim() == 4 else F.pad(data, (2, 2, 2, 2)).unsqueeze(1)
    return data.contiguous(), torch.as_tensor(ds.targets)

# --- Files: checkpoints and images, every one written atomically --------------------------------------------
def atomic_write(path, write):  # write(f) to path.tmp, then rename it: a crash midway keeps the old file
    with open(f"{path}.tmp", "wb") as f:
        write(f), f.flush(), os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)
def check_writable(path):  # before hours of work, not after
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        raise UserError(f"cannot write {path}: its folder is missing or not writable")

def load_checkpoint(path, device):  # (dict, EMA net); weights_only: unpickling a download could run code
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path} (train one with: python ddpm.py train)")
    try:  # fp16 weights (samples/) are cast to the model's fp32 by load_state_dict
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = make_net(ckpt["config"]["data_shape"], **ckpt["config"]["model"]).to(device).eval()
        model.load_state_dict(ckpt["ema"])
    except Exception as e:
        raise UserError(f"{path} is not a ddpm.py checkpoint with weights that fit the architecture it names "
                        f"({type(e).__name__})") from None
    return ckpt, model

def grid_image(x):  # images in [-1, 1]: a grid, sqrt(N) wide; points: a 256 x 256 histogram of [-1.5, 1.5]^2
    if x.dim() == 2:
        ij = ((x.float().clamp(-1.5, 1.5) + 1.5) * 255 / 3).round().long().cpu()  # (N, 2) pixel positions
        hist = torch.zeros(256, 256).index_put_((255 - ij[:, 1], ij[:, 0]), torch.ones(len(x)), True)
        return Image.fromarray(((hist == 0) * 255).to(torch.uint8).numpy())  # y grows upwards
    grid = torchvision.utils.make_grid(to_pixels(x).cpu(), nrow=math.ceil(math.sqrt(len(x))))  # (3, H, W)
    return Image.fromarray(grid[0].numpy() if x.shape[1] == 1 else grid.permute(1, 2, 0).numpy())

def save_samples(path, x, xs=None):  # .png grid; .npz uint8 "images" or float "points"; .gif reverse process
    ext = os.path.splitext(path)[1].lower()
    if ext == ".png":
        atomic_write(path, lambda f: grid_image(x).save(f, format="PNG"))
    elif ext == ".npz":
        arrays = {"points": x.cpu().numpy()} if x.dim() == 2 else {"images": to_pixels(x).cpu().numpy()}
        atomic_write(path, lambda f: np.savez(f, **arrays))
    elif ext == ".gif":
        frames = [grid_image(x) for x in xs[::math.ceil(len(xs) / 60)]] + [grid_image(xs[-1])] * 20  # hold it
        atomic_write(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                    duration=60, loop=0, optimize=False))  # optimize corrupts

# --- Training (Algorithm 1) ---------------------------------------------------------------------------------
def pick_device(name, precision):  # auto: cuda, mps, cpu; bf16 where native (CUDA, AVX512-BF16); CUDA fp16
    device = torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available()
                          else "mps" if torch.backends.mps.is_available() else "cpu")
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and \
        "avx512_bf16" in (open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else "")
    fast = "bf16" if native else "fp16" if device.type == "cuda" else "fp32"
    return device, fast if precision == "auto" else precision
def autocast(device, precision):  # bf16/fp16 for matmuls and convolutions; weights and all else stay fp32
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
def drop_labels(y, p, n_classes, generator):  # for classifier-free guidance: "no label" with probability p
    return torch.where(torch.rand(y.shape, generator=generator, device=y.device) < p, n_classes, y)

def train_step(model, ema, opt, x0, sched, generator, amp=torch.autocast("cpu", enabled=False),
               scaler=torch.amp.GradScaler("cpu", enabled=False), y=None):  # scaler: fp16 loss scaling
    """Algorithm 1, one step (y: labels). A non-finite loss or gradient skips it: no NaN in the weights."""
    with amp:
        loss = loss_fn(lambda xt, t: model(xt, t, y), x0, sched, generator)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # clip the true gradient
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        scaler.update()  # fp16 overflow: a smaller loss scale next step
        print(f"warning: loss {loss.item()}, grad norm {grad_norm.item()}: update skipped", file=sys.stderr)
        return None
    scaler.step(opt), scaler.update(), ema.update(model)
    return loss.item()

def train(args):
    device, args.precision = pick_device(args.device, args.precision)
    check_writable(args.out)
    ckpt = load_checkpoint(args.resume, device)[0] if args.resume else None
    if ckpt and "opt" not in ckpt:
        raise UserError(f"--resume {args.resume}: has EMA weights only (like samples/), no training state")
    if ckpt:  # what defines the run comes from the checkpoint; length, files and cadence from this command
        run = "dataset image_size cond p_uncond ch ch_mult n_res schedule T batch_size lr ema_decay seed"
        vars(args).update({k: v for k, v in ckpt["config"]["train"].items() if k in run.split()})
    data, labels = load_data(args.dataset, args.data_dir, args.seed, args.image_size)
    if args.cond and labels is None:
        raise UserError(f"--cond: {args.dataset} has no labels")
    K = int(labels.max()) + 1 if args.cond else 0  # classes; label K means "no label", the only one if K = 0
    labels = labels if args.cond else torch.zeros(len(data), dtype=torch.long)
    data, labels, flip = data.to(device), labels.to(device), data.shape[1] == 3  # photos are flipped (below)
    args.lr = args.lr or (2e-4 if data.dim() > 2 else 2e-3)  # a small MLP takes a larger step
    sched = make_schedule(args.schedule, args.T)
    torch.manual_seed(args.seed)  # the initial weights
    model = make_net(data.shape[1:], args.ch, args.ch_mult, args.n_res, K).to(device).train()
    ema, opt = EMA(model, args.ema_decay), torch.optim.AdamW(model.parameters(), lr=args.lr)
    if ckpt:
        model.load_state_dict(ckpt["model"]), ema.model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
    step, ema.n = (ckpt["step"], ckpt["ema_n"]) if ckpt else (0, 0)
    amp = autocast(device, args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 needs loss scaling
    B = min(args.batch_size, len(data))
    per_epoch = len(data) // B  # an epoch's last, partial batch is dropped
    total, save_every = args.steps or args.epochs * per_epoch, args.save_every or per_epoch
    unit, hms = "img" if data.dim() > 2 else "points", lambda s: time.strftime("%H:%M:%S", time.gmtime(s))
    print(f"{type(model).__name__} {sum(p.numel() for p in model.parameters()):,} parameters | {len(data)} "
          f"{unit} | {per_epoch} steps/epoch | steps {step}..{total} | {device} {args.precision}")
    def save():
        config = {"model": model.config, "data_shape": list(data.shape[1:]), "train": dict(vars(args))}
        state = {"config": config, "model": model.state_dict(), "ema": ema.model.state_dict(),
                 "opt": opt.state_dict(), "step": step, "ema_n": ema.n}
        atomic_write(args.out, lambda f: torch.save(state, f))
    stop = []  # Ctrl-C or SIGTERM (a preempted job): finish the step, save, exit
    handlers = {s: signal.signal(s, lambda n, _: stop.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        perm_epoch, smooth, t0, t_log, n_log = None, float("nan"), time.time(), time.time(), 0
        while step < total and not stop:
            epoch, i = divmod(step, per_epoch)
            if epoch != perm_epoch:  # the order follows from (seed, epoch): a resumed run sees the same data
                perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + epoch))
                perm, perm_epoch = perm.to(device), epoch
            gen = torch.Generator(device).manual_seed(hash((args.seed, step)))  # t and eps of this step
            idx = perm[i * B:(i + 1) * B]
            x0, y = to_model_range(data[idx]), drop_labels(labels[idx], args.p_uncond, K, gen)
            if flip:  # random horizontal flips, as Ho et al. for CIFAR10; never for digits
                x0 = torch.where(torch.rand(B, 1, 1, 1, generator=gen, device=device) < 0.5, x0.flip(3), x0)
            loss = train_step(model, ema, opt, x0, sched, gen, amp, scaler, y)
            step, n_log = step + 1, n_log + B
            smooth = smooth if loss is None else loss if math.isnan(smooth) else 0.98 * smooth + 0.02 * loss
            if (now := time.time()) - t_log >= 10 or step == total:  # a progress line every 10 s
                print(f"step {step}/{total} | epoch {epoch + 1} | loss {smooth:.4f} | "
                      f"{n_log / (now - t_log):.0f} {unit}/s | elapsed {hms(now - t0)} | "
                      f"eta {hms((total - step) * (now - t_log) * B / n_log)}", flush=True)
                t_log, n_log = now, 0
            if step % save_every == 0:
                save()
            if args.sample_every and step % args.sample_every == 0:  # EMA previews, all from one seed
                with amp:
                    x = sample_ddim(ema.model, sched, (16 if data.dim() > 2 else 2000, *data.shape[1:]),
                                    min(50, args.T), generator=torch.Generator(device).manual_seed(0))
                save_samples(f"{os.path.splitext(args.out)[0]}_step{step:07d}.png", x)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    save()
    print(f"saved {args.out} at step {step}")
    if stop:
        print(f"stopped by signal {stop[0]}; continue with --resume {args.out}", file=sys.stderr)
    return 128 + stop[0] if stop else 0

# --- Command line: sample from a checkpoint, and main -------------------------------------------------------
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "mnist.pt")  # recipe: README
def sample(args):
    device, precision = pick_device(args.device, args.precision)
    if not 0 <= args.eta <= 1 or args.eta and args.sampler == "dpm":
        raise UserError(f"--eta {args.eta}: DDIM's eta (eq. 16) lies in [0, 1]; DPM-Solver++(2M) takes none")
    if os.path.splitext(args.out)[1].lower() not in (".png", ".npz", ".gif"):
        raise UserError(f"--out {args.out}: use .png (a grid), .npz (uint8 arrays) or .gif (reverse process)")
    check_writable(args.out)
    ckpt, model = load_checkpoint(args.ckpt or SHIPPED, device)  # no --ckpt: the model shipped in samples/
    sched = make_schedule(ckpt["config"]["train"]["schedule"], ckpt["config"]["train"]["T"])
    steps = args.steps or {"ddpm": sched.T, "ddim": min(50, sched.T), "dpm": min(20, sched.T)}[args.sampler]
    if steps > sched.T or (args.sampler == "ddpm" and steps != sched.T):
        raise UserError(f"--steps {steps}: DDIM and DPM-Solver take 1..T = 1..{sched.T}; DDPM always takes T")
    gen, gen_cpu = torch.Generator(device).manual_seed(args.seed), torch.Generator().manual_seed(args.seed)
    K, eps_model = model.config.get("n_classes", 0), model  # the MLP has no labels
    if args.cls is not None or args.guidance is not None:  # a class, or "all": K rows of K, a row a class
        if not K or not (args.cls == "all" or args.cls and args.cls.isdigit() and int(args.cls) < K):
            raise UserError(f"--class {args.cls}: " + (f"0..{K - 1} or all" if K else "unconditional net"))
        y = torch.arange(K * K) // K if args.cls == "all" else torch.full((args.n,), int(args.cls))
        eps_model = guided(model, y.to(device), 3.0 if args.guidance is None else args.guidance)
        args.n = len(y)
    shape, gif, t0 = (args.n, *ckpt["config"]["data_shape"]), args.out.lower().endswith(".gif"), time.time()
    order = 2 if args.sampler == "dpm" else 1  # DPM-Solver++(2M) is DDIM's second-order form
    with autocast(device, precision):
        out = sample_ddpm(eps_model, sched, shape, gen, trajectory=gif) if args.sampler == "ddpm" else \
            sample_ddim(eps_model, sched, shape, steps, args.eta, gen, trajectory=gif, order=order)
    save_samples(args.out, *(out if gif else (out,)))
    if ckpt["config"]["train"]["dataset"] == "swissroll":  # how near the data; what "near" means at this n
        x, (fresh, fresh2) = (out[0] if gif else out).cpu(), make_swissroll(2 * args.n, gen_cpu).split(args.n)
        print(f"sliced W2 to fresh data {sliced_wasserstein(x, fresh, gen_cpu):.4f} "
              f"(two fresh sets: {sliced_wasserstein(fresh2, fresh, gen_cpu):.4f})")
    print(f"wrote {args.out}: {args.n} samples, {args.sampler} with {steps} steps, {time.time() - t0:.1f}s, "
          f"{precision} (checkpoint {args.ckpt or 'shipped in samples/'} at step {ckpt['step']})")
    return 0

def main(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description="DDPM / DDIM on MNIST in one file.", formatter_class=fmt)
    sub = parser.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train the epsilon-network (Algorithm 1)", formatter_class=fmt)
    sa = sub.add_parser("sample", help="Algorithm 2, DDIM or DPM-Solver++ sampling", formatter_class=fmt)
    for p in (tr, sa):
        p.add_argument("--device", default="auto", help="auto = cuda, then mps, then cpu")
        p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
        p.add_argument("--seed", type=int, default=0, help="fixes every random draw")
    # train: system
    tr.add_argument("--dataset", default="mnist", help="mnist, fashion, cifar10, swissroll, or a folder")
    tr.add_argument("--data-dir", default="./data", help="mnist, fashion, cifar10 are downloaded here")
    tr.add_argument("--image-size", type=int, choices=[8, 16, 32, 64, 128], default=32, help="for folders")
    tr.add_argument("--cond", action="store_true", help="class-conditional, for classifier-free guidance")
    tr.add_argument("--p-uncond", type=float, default=0.1, help="with --cond: how often the label is dropped")
    tr.add_argument("--out", default="ckpt.pt", help="checkpoint path")
    tr.add_argument("--resume", metavar="PATH", help="continue this checkpoint's run (model, data, lr...)")
    tr.add_argument("--save-every", type=int, help="steps between checkpoints; None: once per epoch")
    tr.add_argument("--sample-every", type=int, default=0, help="steps between EMA preview grids; 0: none")
    # train: model and schedule
    tr.add_argument("--ch", type=int, default=32, help="base width of the U-Net")
    tr.add_argument("--ch-mult", type=lambda s: list(map(int, s.split(","))), default=[1, 2, 2], help="U-Net")
    tr.add_argument("--n-res", type=int, default=2, help="residual blocks per resolution")
    tr.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="beta_t schedule")
    tr.add_argument("--T", type=int, default=1000, help="diffusion steps")
    # train: optimization
    tr.add_argument("--epochs", type=int, default=30, help="passes over the data")
    tr.add_argument("--steps", type=int, help="total optimizer steps; overrides --epochs")
    tr.add_argument("--batch-size", type=int, default=128, help="images (or points) per step")
    tr.add_argument("--lr", type=float, help="AdamW learning rate; None: 2e-4 for images, 2e-3 for points")
    tr.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay after warm-up")
    sa.add_argument("--ckpt", help="checkpoint written by train; None: the model shipped in samples/")
    sa.add_argument("--sampler", choices=["ddpm", "ddim", "dpm"], default="ddpm", help="dpm: DPM-Solver++")
    sa.add_argument("--steps", type=int, help="network calls; None: T for ddpm, 50 for ddim, 20 for dpm")
    sa.add_argument("--eta", type=float, default=0.0, help="DDIM eq. (16): 0 deterministic, 1 DDPM-like")
    sa.add_argument("--n", type=int, default=64, help="number of samples")
    sa.add_argument("--class", dest="cls", help="a class index or all (a row per class); None: unconditional")
    sa.add_argument("--guidance", type=float, help="classifier-free guidance w, for --class; None: 3")
    sa.add_argument("--out", default="sample.png", help=".png grid, .npz uint8 images, .gif reverse process")
    args = parser.parse_args(argv)
    try:
        for k, low in {"T": 2, "ch": 1, "n_res": 1, "epochs": 1, "steps": 1, "batch_size": 1, "n": 1,
                       "save_every": 1}.items():
            if getattr(args, k, None) is not None and getattr(args, k) < low:
                raise UserError(f"--{k.replace('_', '-')} must be at least {low}")
        return train(args) if args.cmd == "train" else sample(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())

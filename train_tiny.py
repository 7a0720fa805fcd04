"""Train a small class-conditional DiG (or its DiT twin) on CIFAR-10, or on latents precomputed with a VAE.

    python train_tiny.py                          # GPU: DiG-S/2 on CIFAR-10 for 15 minutes; CPU: a smoke run
    python train_tiny.py --model DiT-S/2          # the softmax-attention twin, same recipe
    python train_tiny.py --resume runs/DiG-S-2    # continue a run where its last checkpoint left it
    torchrun --nproc_per_node=4 train_tiny.py     # several GPUs, the global batch split between them
    python results/judge.py runs/DiG-S-2 --classifier resnet56-4bfd9763.th   # its samples, judged by a ResNet-56

Outputs go to runs/<model>: ckpt.pt, log.csv, samples_<step>.png, loss.png. Sections 1-3: the recipe, the step,
the loop; 4-9 the machinery: command line, data, checkpoints, pictures, speed, processes and log."""

import argparse
import collections
import contextlib
import copy
import csv
import hashlib
import io
import math
import os
import pickle
import signal
import sys
import tarfile
import time
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

import dig

# -----------------------------------------------------------------------------------------------------------
# 1. The recipe. Every setting is a command-line flag; these are the defaults on a GPU and on a CPU.
#
# GPU: recognisable class-conditional CIFAR-10 samples in minutes. The official DiT recipe (AdamW lr 1e-4,
# constant; EMA 0.9999; no warm-up; guidance 1.5) is made for 400K steps; in the few thousand of a short run it
# leaves blurry blobs. What changes, and why (results/ablations.md has the tries):
#   * lr 9e-4: a small model on 256 tokens takes a far larger step than DiT-XL, and a short run has no steps to
#     spare. A 1000-step warm-up lets the adaLN modulations grow from zero first; gradients are clipped at norm 1.
#   * AdamW's beta2 0.95, not 0.999: steps are divided by the root of a mean of recent squared gradients; one over
#     ~1000 steps lags a gradient that suddenly grows, and at this rate the loss spiked; one over ~20 keeps up.
#   * the rate falls linearly to 0 over the last 30% of the budget (--minutes or --steps; --decay): large
#     steps learn fast but leave the weights noisy; the shrinking steps at the end let them settle.
#   * an EMA that warms up, decay = min(0.9995, (1 + step) / (10 + step)), averages about the last step/9
#     updates; a fixed 0.9999 would keep a share of the random initial weights for ~10,000 steps.
#   * random horizontal flips: CIFAR-10 classes look the same mirrored, and over hundreds of epochs the flips
#     double the data. (Not for latents: a mirrored latent is not the latent of a mirror image.)
#   * classifier-free guidance at scale 3: a young model's conditional and unconditional predictions differ
#     little, and guidance amplifies exactly that difference, the class. 100 ancestral steps suffice at 32x32.
# CPU: a smoke test of the whole pipeline in 1-2 minutes. Both keep DiT's diffusion and its label dropout of 0.1.

def default_config(on_gpu):
    if on_gpu:
        return dict(model="DiG-S/2", depth=None, hidden_size=None, num_heads=None, steps=None, minutes=15.0,
                    batch_size=256, lr=9e-4, warmup=1000, decay=0.3, ema=0.9995, sample_steps=100, cfg_scale=3.0,
                    sample_every=2500, ckpt_every=2000, log_every=100)
    return dict(model="DiG-S/4", depth=4, hidden_size=128, num_heads=2, steps=200, minutes=None,
                batch_size=32, lr=1e-3, warmup=20, decay=0.0, ema=0.99, sample_steps=25, cfg_scale=3.0,
                sample_every=100, ckpt_every=100, log_every=10)


CLASS_DROPOUT = 0.1


def learning_rate(step, progress, args):
    """Warm-up, stable, decay: a linear rise over the first args.warmup steps, then args.lr, and a linear fall to 0
    over the last args.decay of the budget (progress: the fraction of --steps or --minutes done)."""
    warm = min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else 1.0
    return args.lr * warm * (min(1.0, max(0.0, 1 - progress) / args.decay) if args.decay > 0 else 1.0)


def ema_decay(step, target):
    return min(target, (1 + step) / (10 + step))


# -----------------------------------------------------------------------------------------------------------
# 2. One training step
#
# Everything random about step s (examples, flips, diffusion steps t, noise, dropped labels) is drawn for the
# whole global batch from a generator seeded by (seed, s), and each process takes its slice: a resumed run draws
# what an uninterrupted one would, and 1 or N processes train on the same numbers. The step has three parts, so
# that the host sees the loss before any weight moves:
#   1. forward and backward: the diffusion loss of this process's slice, and its gradients
#   2. the gradients averaged over processes (what DistributedDataParallel does), and their norm
#   3. update: gradient clipping, AdamW and the EMA, once the loop has seen that loss and norm are finite

Data = collections.namedtuple("Data", "x y latent num_classes")   # x: [N, C, H, W] uint8 pixels or float latents


def draw_batch(data, step, args, rank, world, generator):
    """This process's slice of step `step`: x (pixels in [-1, 1], flipped at random, or latents), labels y,
    diffusion steps t, noise, and the labels dropped for guidance."""
    n, device = args.batch_size, generator.device
    generator.manual_seed(args.seed * 1_000_003 + step)     # a seed of its own for every (seed, step < 1,000,003)
    mine = slice(rank * n // world, (rank + 1) * n // world)
    idx = batch_indices(step, len(data.x), n, args.seed)[mine].to(data.x.device)   # an epoch's permutation, seeded
    x, y = data.x[idx].to(device), data.y[idx].to(device)
    if not data.latent:
        flip = torch.rand(n, 1, 1, 1, generator=generator, device=device)[mine] < 0.5
        x = torch.where(flip, x.flip(3), x).float() / 127.5 - 1
    t = torch.randint(0, 1000, (n,), generator=generator, device=device)[mine]      # DiT's 1000 steps
    noise = torch.randn((n, *x.shape[1:]), generator=generator, device=device)[mine]
    drop = (torch.rand(n, generator=generator, device=device) < CLASS_DROPOUT)[mine]
    return dict(x=x, y=y, t=t, noise=noise, drop=drop)


class TrainStep:
    """`loss, grad_norm = step(batch)` runs parts 1 and 2; `step.update(lr, ema_decay)` then runs part 3."""
    def __init__(self, model, ema, opt, diffusion, grad_clip, world):
        self.model, self.opt, self.diffusion, self.grad_clip, self.world = model, opt, diffusion, grad_clip, world
        self.model_params, self.ema_params = list(model.parameters()), list(ema.parameters())
        self.trained = [p for p in self.model_params if p.requires_grad]
        # All gradients live in one flat buffer (each .grad a view of it): one zero_, all_reduce and norm for all.
        sizes = [p.numel() for p in self.trained]
        self.flat_grad = torch.zeros(sum(sizes), device=self.trained[0].device)
        self.grad_views = [view.view_as(p) for view, p in zip(self.flat_grad.split(sizes), self.trained)]
        self.set_grads(self.grad_views)

    def set_grads(self, grads):
        for i, p in enumerate(self.trained):
            p.grad = None if grads is None else grads[i]

    def forward_backward(self, batch, autocast_cache=True):   # autocast_cache: False in a CUDA graph (section 8)
        """Part 1: the batch's loss (detached); backward adds the gradients into each p.grad."""
        device = self.flat_grad.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda",
                            cache_enabled=autocast_cache):
            losses = self.diffusion.training_losses(self.model, batch["x"], batch["t"], noise=batch["noise"],
                                                    model_kwargs=dict(y=batch["y"], force_drop_ids=batch["drop"]))
        loss = losses["loss"].mean()
        loss.backward()
        return loss.detach()

    def __call__(self, batch):
        self.flat_grad.zero_()
        return self.forward_backward(batch), self.average_gradients()

    def average_gradients(self):
        """Part 2: every process then holds the gradient of the whole global batch; returns its norm."""
        if self.world > 1:
            dist.all_reduce(self.flat_grad)
            self.flat_grad.div_(self.world)
        self.grad_norm = torch.linalg.vector_norm(self.flat_grad)
        return self.grad_norm

    @torch.no_grad()
    def update(self, lr, decay):
        """Part 3: clip as nn.utils.clip_grad_norm_ does (with the norm of part 2), AdamW, EMA."""
        self.flat_grad.mul_((self.grad_clip / (self.grad_norm + 1e-6)).clamp(max=1.0))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        update_ema(self.ema_params, self.model_params, decay)


@torch.no_grad()
def update_ema(ema_params, model_params, decay):
    """ema <- decay * ema + (1 - decay) * model, in place (decay 0 copies the model, 1 changes nothing)."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, torch._foreach_mul(model_params, 1 - decay))


# -----------------------------------------------------------------------------------------------------------
# 3. The training loop (main, section 4, reads the command line and calls train in every process)

def train(args, ckpt, rank, world, device):
    data = load_data(args, rank, world, device)
    model, ema, opt, step, elapsed = build_run(args, ckpt, data_shape(data), device)
    log = Progress(args, step, elapsed, rank)
    log.say(f"{args.model} ({len(model.blocks)} blocks, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters) | {len(data.x)} {'latents' if data.latent else 'images'} {tuple(data.x.shape[1:])}, "
            f"{data.num_classes} classes | {world} process(es) on {device.type} | global batch {args.batch_size}"
            f" | out {args.out}" + (f" | resuming at step {step}" if ckpt else ""))
    generator = torch.Generator(device=device)
    # train_step: a TrainStep (on a GPU compiled, a CUDA graph: this file's section 8); sample_net: the EMA
    # network as the sampler calls it. Compiling counts against --minutes, not against the speed.
    with log.paused():
        train_step, sample_net = make_train_step(model, ema, opt, args, world, log,
                                                 draw_batch(data, step, args, rank, world, generator))
    last_ckpt, done = step, log.progress(step, log.time_used(elapsed)) >= 1   # a resumed run's budget may be spent
    with StopRequests() as stop_requests:
        while not done:
            # 1 + 2: forward and backward, gradients averaged; the step's one synchronisation (agree) gives every
            # process the mean loss, the share of --minutes used, and any stop signal (StopRequests, section 9 here)
            loss, grad_norm = train_step(draw_batch(data, step, args, rank, world, generator))
            loss, grad_norm, time_used, stop = agree(loss, grad_norm, log.time_used(), stop_requests.signal)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                stop_on_nan(loss, grad_norm, step, last_ckpt, args)     # exits, naming the last checkpoint
            # 3: clip, AdamW, EMA
            lr = learning_rate(step, log.progress(step, time_used), args)
            train_step.update(lr, ema_decay(step, args.ema))
            step += 1
            done = log.progress(step, time_used) >= 1
            # log, checkpoint, samples; stop when asked to (a signal) or out of time
            log.losses.append(loss)
            if step % args.log_every == 0 or done or stop:
                log.report(step, lr)
            with log.paused():      # checkpoints and samples do not count against the speed
                if (args.ckpt_every and step % args.ckpt_every == 0) or stop:
                    last_ckpt = save_checkpoint(args, model, ema, opt, data, step, log, rank, world)
                if stop:
                    log.say(f"stopped by {signal.Signals(stop).name} after step {step}, checkpoint written; "
                            f"continue with: python train_tiny.py --resume {args.out}")
                    return dict(step=step, out=args.out, stopped=stop)
                if args.sample_every and step % args.sample_every == 0:
                    save_sample_grid(sample_net, data, step, args, rank, world)
        # Still inside StopRequests: a signal now is only noted, and this last checkpoint is written whole.
        if last_ckpt != step or not os.path.exists(os.path.join(args.out, "ckpt.pt")):
            save_checkpoint(args, model, ema, opt, data, step, log, rank, world)
    if not args.sample_every or step % args.sample_every:
        save_sample_grid(sample_net, data, step, args, rank, world)
    on_rank0(lambda: plot_loss(os.path.join(args.out, "log.csv"), os.path.join(args.out, "loss.png")), rank, world)
    log.say(f"done: {step} steps, {log.elapsed() / 60:.1f} min; checkpoint {os.path.join(args.out, 'ckpt.pt')}")
    return dict(step=step, out=args.out)


# -----------------------------------------------------------------------------------------------------------
# 4. Command line

def main(argv=None):
    """Train as the command line says; returns the last step, the output folder and, if stopped, the signal."""
    args, ckpt = parse_args(argv)
    with processes(args.device) as (rank, world, device):
        settle_args(args, ckpt, world)
        return train(args, ckpt, rank, world, device)


def checked(kind, ok, what):
    """An argparse type that also refuses values outside `ok`, saying what is accepted."""
    def convert(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}; got {text}")
        return value
    return convert


count, positive_count = checked(int, lambda v: v >= 0, "at least 0"), checked(int, lambda v: v >= 1, "at least 1")
positive = checked(float, lambda v: 0 < v < math.inf, "positive")
at_least_0 = checked(float, lambda v: 0 <= v < math.inf, "at least 0")
fraction = checked(float, lambda v: 0 <= v <= 1, "between 0 and 1")


def parse_args(argv=None):
    """The settings of this run, and the checkpoint to resume from (or None). With --resume, flags left out
    take the settings of the run being continued and flags given now win, except those that define the
    network; a budget given now (--steps or --minutes, both counted across resumes) replaces the saved one."""
    p = argparse.ArgumentParser(description="Train a small class-conditional DiG on CIFAR-10 or on latents. "
                                "Options left out get defaults for the device (see default_config).")
    p.error = lambda message: p.exit(2, f"error: {message} (python train_tiny.py --help lists the options)\n")
    p.add_argument("--model", help="a key of dig.DiG_models or dig.DiT_models, e.g. DiG-S/2 or DiT-S/2")
    p.add_argument("--depth", type=positive_count, help="override the number of blocks of --model (DiG: 4, 8, ...)")
    p.add_argument("--hidden-size", type=positive_count, help="override the width of --model")
    p.add_argument("--num-heads", type=positive_count, help="override the number of heads of --model")
    p.add_argument("--data-dir", default="data", help="folder holding (or receiving) cifar-10-batches-py/")
    p.add_argument("--latents", help=".npz with 'latents' [N,C,H,W] and 'labels' [N]; replaces CIFAR-10")
    p.add_argument("--steps", type=count, help="stop after this many optimizer steps in all")
    p.add_argument("--minutes", type=at_least_0, help="stop after this much time in all (or at --steps, if sooner)")
    p.add_argument("--batch-size", type=positive_count, help="global batch size, split evenly across processes")
    p.add_argument("--lr", type=positive, help="AdamW learning rate")
    p.add_argument("--beta2", type=checked(float, lambda v: 0 <= v < 1, "in [0, 1)"), default=0.95, help="AdamW beta2")
    p.add_argument("--warmup", type=count, help="linear learning-rate warm-up, in steps")
    p.add_argument("--decay", type=fraction, help="the rate falls linearly to 0 over this last share of the budget")
    p.add_argument("--ema", type=fraction, help="EMA decay (reached gradually: min(ema, (1+step)/(10+step)))")
    p.add_argument("--grad-clip", type=positive, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--sample-steps", type=checked(int, lambda v: 2 <= v <= 1000, "between 2 and 1000"),
                   help="sampling steps for the sample grids")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--cfg-scale", type=at_least_0, help="classifier-free guidance scale (1: none, 0: unconditional)")
    p.add_argument("--sample-every", type=count, help="save a sample grid every this many steps (0: only at end)")
    p.add_argument("--ckpt-every", type=count, help="save a checkpoint every this many steps (0: only at end)")
    p.add_argument("--log-every", type=positive_count, help="print and log the loss every this many steps")
    p.add_argument("--out", help="output folder (default: runs/<model>, or the folder of --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="checkpoint file, or a folder holding ckpt.pt, to continue from")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: the resumed run's, else cuda if there is one")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=False,
                   help="GPU: plain PyTorch, no compiled blocks or CUDA graphs (slower; for debugging)")
    args, ckpt = p.parse_args(argv), None
    if args.resume:
        path, ckpt = load_checkpoint(args.resume)
        saved = {k: v for k, v in ckpt["args"].items() if k not in ("resume", "out")}
        if args.steps is not None or args.minutes is not None:
            saved.update(steps=None, minutes=None)
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        network = ("model", "depth", "hidden_size", "num_heads")
        if any(getattr(args, k) != saved[k] for k in network):
            raise SystemExit(f"error: {path} holds a {saved['model']} with depth/hidden-size/heads "
                             f"{[saved[k] for k in network[1:]]}; --resume continues that network")
        args.out = args.out or os.path.dirname(path)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here" + ("; pass --device cpu to continue the run on the CPU"
                                                       if ckpt else ""))
    return args, ckpt


def settle_args(args, ckpt, world):
    """Fill in the device's defaults for what is still unset; refuse impossible settings before anything is built."""
    defaults = default_config(on_gpu=args.device == "cuda")
    if args.model is not None:          # a model named on the command line comes at its own size
        defaults.update(depth=None, hidden_size=None, num_heads=None)
    if args.steps is not None or args.minutes is not None:   # a budget given replaces the default budget
        defaults.update(steps=None, minutes=None)
    defaults["batch_size"] -= defaults["batch_size"] % world     # a multiple of the number of processes
    for k, v in defaults.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.out = args.out or os.path.join("runs", args.model.replace("/", "-"))
    for problem, message in [
        (args.batch_size % world, f"--batch-size {args.batch_size} must divide evenly across {world} processes"),
        (args.model not in {**dig.DiG_models, **dig.DiT_models}, f"unknown model {args.model!r}; choose one of "
         f"{sorted(dig.DiG_models) + sorted(dig.DiT_models)}"),
        (os.path.isfile(args.out), f"--out {args.out} is a file; give a folder for the run's outputs"),
        (not ckpt and os.path.exists(os.path.join(args.out, "ckpt.pt")), f"{args.out} already holds a run; "
         f"continue it with --resume {args.out}, or give another --out")]:
        if problem:
            raise SystemExit(f"error: {message}")
    os.makedirs(args.out, exist_ok=True)


# -----------------------------------------------------------------------------------------------------------
# 5. Data: CIFAR-10 in the official python layout, or an .npz of latents, as CPU tensors (uint8 pixels or
# float latents, int64 labels); small data sets then move to the GPU, where a step gathers its batch.

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


def load_data(args, rank, world, device):
    if args.latents:
        data = load_latents(args.latents)
    else:   # rank 0 downloads CIFAR-10 if it is missing, while the others wait
        on_rank0(lambda: cifar_batch_files(args.data_dir) or download_cifar10(args.data_dir), rank, world)
        data = Data(*load_cifar10(args.data_dir), False, 10)
    if len(data.x) < args.batch_size:
        raise SystemExit(f"error: {len(data.x)} training examples are fewer than one batch ({args.batch_size})")
    if device.type == "cuda" and data.x.numel() * data.x.element_size() < 2 ** 31:
        data = data._replace(x=data.x.to(device), y=data.y.to(device))
    return data


def data_shape(data):
    """What a model for this data is built for (saved in checkpoints, so that sampling a run needs no data)."""
    return dict(input_size=data.x.shape[-1], in_channels=data.x.shape[1], num_classes=data.num_classes,
                latent=data.latent)


def batch_indices(step, n_examples, global_batch, seed):
    """Global batch `step`: from a permutation seeded by (seed, epoch); an epoch's incomplete last batch is skipped."""
    epoch, i = divmod(step, n_examples // global_batch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * global_batch:(i + 1) * global_batch]


def cifar_batch_files(data_dir):
    """The official data_batch_{1..5} in data_dir/cifar-10-batches-py/ (or in data_dir, if it is that folder)."""
    for folder in (os.path.join(data_dir, "cifar-10-batches-py"), data_dir):
        files = [os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)]
        if any(map(os.path.isfile, files)):
            return [f for f in files if os.path.isfile(f)]
    return []


def download_cifar10(data_dir):
    """Fetch the official archive, check its MD5, and extract cifar-10-batches-py/ into data_dir."""
    print(f"downloading {CIFAR_URL} (170 MB) ...", flush=True)
    try:
        with urllib.request.urlopen(CIFAR_URL, timeout=60) as r:
            archive = r.read()
    except OSError as e:  # no network, DNS failure, HTTP error, timeout
        raise SystemExit(f"error: CIFAR-10 is not in {os.path.abspath(data_dir)} and downloading it failed ({e}). "
                         f"Get {CIFAR_URL} (MD5 {CIFAR_MD5}) and extract it into DATA_DIR (--data-dir).")
    if hashlib.md5(archive).hexdigest() != CIFAR_MD5:
        raise SystemExit(f"error: the download of {CIFAR_URL} is corrupt (MD5 {hashlib.md5(archive).hexdigest()}, "
                         f"expected {CIFAR_MD5}); nothing was written. Run again to retry.")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(data_dir, filter="data")


class CifarUnpickler(pickle.Unpickler):
    """Unpickling runs whatever a file names: only what CIFAR-10's dicts of bytes, lists and numpy arrays need
    (and the bytes encoder of Python 3's protocol-2 pickles) is let through."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch; refusing to load it")
        return super().find_class(module, name)


def load_cifar10(data_dir):
    """All official training batches found: uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    files, xs, ys = cifar_batch_files(data_dir), [], []
    if not files:
        raise SystemExit(f"error: no CIFAR-10 training batches (data_batch_*) in {os.path.abspath(data_dir)}/"
                         f"cifar-10-batches-py. Put that folder from {CIFAR_URL} under DATA_DIR (--data-dir).")
    for path in files:   # each a pickled dict with b'data' (uint8 [N, 3072], RGB planes) and b'labels'
        try:
            with open(path, "rb") as f:
                d = CifarUnpickler(f, encoding="bytes").load()
            x, y = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[b"labels"], dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x) or not 0 <= y.min() <= y.max() <= 9:
                raise ValueError(f"data of shape {x.shape} and {len(y)} labels, not [N, 3072] and N in 0..9")
        except Exception as e:
            raise SystemExit(f"error: cannot read CIFAR-10 batch {path} ({type(e).__name__}: {e}): it is corrupt "
                             f"or not a CIFAR-10 python batch; replace it with one from the official archive.")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_latents(path):
    """An .npz with 'latents' (float [N,C,H,W]) and 'labels' (int [N]), as Data of float32 and int64 CPU tensors."""
    try:
        with np.load(path) as f:
            x, y = f["latents"], f["labels"]
        ok = (x.ndim == 4 and x.shape[2] == x.shape[3] and y.shape == (len(x),) and len(y) > 0
              and np.issubdtype(y.dtype, np.integer) and y.min() >= 0 and np.isfinite(x).all())
        found = f"latents {x.shape}, finite: {np.isfinite(x).all()}; labels {y.shape} {y.dtype} {y[:8].tolist()}"
    except Exception as e:
        found, ok = f"{type(e).__name__}: {e}", False
    if not ok:
        raise SystemExit(f"error: cannot use latents file {path} ({found}); expected an .npz with finite 'latents' "
                         f"[N, C, H, H] and integer 'labels' [N] >= 0, N >= 1.")
    return Data(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64)), True, int(y.max()) + 1)


# -----------------------------------------------------------------------------------------------------------
# 6. The model, its EMA and optimizer, and checkpoints

def build_run(args, ckpt, shape, device):
    """(model, ema, optimizer, step, elapsed seconds): fresh, or as the checkpoint left them."""
    make = dig.DiG_models.get(args.model) or dig.DiT_models.get(args.model)
    size = {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads") if getattr(args, k) is not None}
    torch.manual_seed(args.seed)     # the same initial weights in every process
    try:
        model = make(input_size=shape["input_size"], in_channels=shape["in_channels"],
                     num_classes=shape["num_classes"], learn_sigma=True, class_dropout_prob=CLASS_DROPOUT, **size)
    except ValueError as e:   # e.g. a patch that does not divide the image, or heads that do not divide the width
        raise SystemExit(f"error: cannot build {args.model} with {size or 'its own size'} for {shape}: {e}")
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.beta2), weight_decay=0, fused=True)
    return (model, ema, opt) + ((0, 0.0) if ckpt is None else restore(ckpt, model, ema, opt))


def save_checkpoint(args, model, ema, opt, data, step, log, rank, world):
    """ckpt.pt in the output folder, written by rank 0 to a temporary file, then renamed over the old one (atomic);
    tensors, numbers and strings only, for torch.load(..., weights_only=True). Returns the step."""
    def save():
        state = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                     elapsed=log.elapsed(), args=vars(args), data=data_shape(data))
        path = os.path.join(args.out, "ckpt.pt")
        with open(path + ".tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    on_rank0(save, rank, world)
    return step


def load_checkpoint(path):
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "ema", "opt", "step", "elapsed", "args", "data"} - set(ckpt)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}: {e}. It is truncated or "
                         f"corrupt (was a copy interrupted?); resume from another checkpoint.")
    if missing:
        raise SystemExit(f"error: {path} is not a train_tiny.py checkpoint (missing {sorted(missing)})")
    return path, ckpt


def restore(ckpt, model, ema, opt):
    """Load a checkpoint into a freshly built run; returns its (step, elapsed seconds). The step is all of "where
    were we" (step s draws from (seed, s)): a resumed run matches an uninterrupted one, on a CPU bit for bit."""
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(ckpt["opt"])   # the moments and step counts, under this run's settings (device, lr, beta2)
    for group, own in zip(opt.param_groups, settings):
        group.update(own)
    for p, s in opt.state.items():   # the fused kernels want the step count as float32 beside the weights
        s["step"] = s["step"].to(device=p.device, dtype=torch.float32)
    return ckpt["step"], ckpt["elapsed"]


def stop_on_nan(loss, grad_norm, step, last_ckpt, args):
    ckpt = os.path.join(args.out, "ckpt.pt")
    last = f"The last good checkpoint is {ckpt} (step {last_ckpt})." if os.path.exists(ckpt) else "No checkpoint yet."
    raise SystemExit(f"error: loss {loss} (gradient norm {grad_norm}) at step {step + 1}: stopping. {last} "
                     f"Try a lower --lr, or --resume {args.out} with another --seed.")


# -----------------------------------------------------------------------------------------------------------
# 7. Sampling with the EMA weights, and pictures (pillow only): sample grids and the loss curve

@torch.no_grad()
def generate(net, labels, args, seed, progress=False):
    """Samples for `labels` (on the network's device), from noise fixed by `seed`: grids stay comparable."""
    g = torch.Generator(device=labels.device).manual_seed(seed)
    noise = torch.randn(len(labels), net.in_channels, net.input_size, net.input_size, generator=g, device=g.device)
    with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=labels.device.type == "cuda"):
        return dig.sample(net, labels, steps=args.sample_steps, cfg_scale=args.cfg_scale, sampler=args.sampler,
                          noise=noise, generator=g, progress=progress).float()


def save_sample_grid(net, data, step, args, rank, world):
    """samples_<step>.png (rank 0): a row for each class (at most 10 rows), 10 samples each."""
    def save():
        classes = torch.linspace(0, data.num_classes - 1, min(data.num_classes, 10)).round().long()
        labels = classes.repeat_interleave(10).to(next(net.parameters()).device)
        save_grid(generate(net, labels, args, seed=args.seed), os.path.join(args.out, f"samples_{step:07d}.png"),
                  ncol=10, latent=data.latent)
    on_rank0(save, rank, world)


def to_uint8(x):  # pixels in [-1, 1] -> uint8 0..255
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(x, path, ncol, latent=False):
    """[N, C, H, W] pixels (in [-1, 1], or already uint8) or latents (unbounded) -> a PNG grid with 2-pixel gaps.
    Latents show their first three channels, each stretched to the full range over the grid."""
    x = x.detach().cpu()
    if latent:
        x = x.float()[:, :3] if x.shape[1] >= 3 else x.float()[:, :1].expand(-1, 3, -1, -1)
        lo, hi = x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1
        x = F.interpolate(x, scale_factor=max(1, 32 // x.shape[-1]), mode="nearest")
    x = x if x.dtype == torch.uint8 else to_uint8(x)
    n, c, h, w = x.shape
    grid = torch.full((c, math.ceil(n / ncol) * (h + 2) + 2, ncol * (w + 2) + 2), 255, dtype=torch.uint8)
    for i in range(n):
        top, left = 2 + (i // ncol) * (h + 2), 2 + (i % ncol) * (w + 2)
        grid[:, top:top + h, left:left + w] = x[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def plot_loss(log_path, png_path, width=640, height=360):
    """Loss against step on a log scale: the interval means in grey, a smoothed curve in blue."""
    with open(log_path, newline="") as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if 0 < float(r["loss"]) < math.inf]
    if len(rows) < 2:
        return
    steps, losses = zip(*rows)
    w = max(1, len(losses) // 25)  # trailing mean over 4% of the run
    smooth = [sum(losses[max(0, i - w + 1):i + 1]) / min(w, i + 1) for i in range(len(losses))]
    left, right, top, bottom = 60, 20, 30, 40
    lo, hi = math.log10(min(losses)), math.log10(max(losses))
    hi = hi if hi > lo else lo + 1
    sx = lambda s: left + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (width - left - right)
    sy = lambda l: top + (hi - math.log10(l)) / (hi - lo) * (height - top - bottom)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, width - right, height - bottom], outline="black")
    d.line([(sx(s), sy(l)) for s, l in zip(steps, losses)], fill=(180, 180, 180))
    d.line([(sx(s), sy(l)) for s, l in zip(steps, smooth)], fill=(30, 80, 200), width=2)
    for xy, text in [((left, 8), "training loss (log scale)"), ((4, top), f"{10 ** hi:.3g}"),
                     ((4, height - bottom - 10), f"{10 ** lo:.3g}"), ((left, height - bottom + 6), f"step {steps[0]}"),
                     ((width - right - 70, height - bottom + 6), f"step {steps[-1]}")]:
        d.text(xy, text, fill="black")
    img.save(png_path)


# -----------------------------------------------------------------------------------------------------------
# 8. Speed, the GPU default (--eager turns it off): the blocks compiled (dig.compile_blocks), the forward and
# backward replayed as one CUDA graph (dig.capture_cuda_graph), and the sampler's network a dig.GraphedDenoiser.

def make_train_step(model, ema, opt, args, world, log, example_batch):
    """The training step and the network the sampler calls: on a GPU (unless --eager) compiled, from CUDA graphs."""
    diffusion = dig.create_diffusion()
    if model.pos_embed.device.type != "cuda" or args.eager:
        return TrainStep(model, ema, opt, diffusion, args.grad_clip, world), ema
    start = time.time()
    step = CompiledTrainStep(dig.compile_blocks(model), ema, opt, diffusion, args.grad_clip, world, example_batch)
    log.say(f"compiled the blocks and captured the training step as a CUDA graph in {time.time() - start:.0f} s")
    return step, sampling_network(ema, args)


def sampling_network(ema, args):
    """The EMA network as the sampler calls it: on a GPU (without --eager) replayed from CUDA graphs."""
    fast = ema.pos_embed.device.type == "cuda" and not args.eager
    return dig.GraphedDenoiser(dig.compile_blocks(ema)) if fast else ema


class CompiledTrainStep(TrainStep):
    """TrainStep with part 1 (its blocks compiled already) replayed as one CUDA graph that reads each batch from
    fixed input tensors. Parts 2 and 3 stay eager: a few kernels, with the all-reduce and NaN check between."""
    def __init__(self, model, ema, opt, diffusion, grad_clip, world, example_batch):
        super().__init__(model, ema, opt, diffusion, grad_clip, world)
        self.static_batch = {k: v.clone() for k, v in example_batch.items()}

        def loss_and_gradients():
            # The backward makes the gradients afresh (inside the graph's memory), and the graph then copies
            # them into the flat buffer; they are returned only to stay alive beside the graph.
            self.set_grads(None)
            loss = self.forward_backward(self.static_batch, autocast_cache=False)
            grads = [p.grad for p in self.trained]
            torch._foreach_copy_(self.grad_views, grads)
            return loss, grads

        self.graph, (self.static_loss, self.graph_grads) = dig.capture_cuda_graph(loss_and_gradients)
        self.set_grads(self.grad_views)

    def __call__(self, batch):
        for name, x in batch.items():
            self.static_batch[name].copy_(x)
        self.graph.replay()
        return self.static_loss, self.average_gradients()


# -----------------------------------------------------------------------------------------------------------
# 9. Processes, signals, and the progress log. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run is rank
# 0 of 1. Work only rank 0 does goes through on_rank0: a failure there stops every process, with its message.

@contextlib.contextmanager
def processes(device_type):
    """(rank, world size, device) of this process, inside its process group."""
    if "RANK" not in os.environ:
        yield 0, 1, torch.device(device_type)
        return
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cuda", local) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.index else None)
    try:
        yield rank, world, device
        # Leave together: a process that tears down its connections while a peer still works can abort it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def on_rank0(work, rank, world):
    """work() on rank 0 while the others wait; its result on every process. A failure stops them all."""
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except BaseException as e:   # SystemExit (our own errors) and KeyboardInterrupt too
            error = e
    if world > 1:
        message = [f"{type(error).__name__}: {error}" if error is not None else None, result]
        dist.broadcast_object_list(message, src=0)
        if rank != 0 and message[0] is not None:
            raise SystemExit(f"error: process 0 failed, so process {rank} stops too. It said: {message[0]}")
        result = message[1]
    if error is not None:
        raise error
    return result


def agree(loss, grad_norm, time_used, signal_received):
    """The step's one synchronisation: loss, gradient norm and the share of --minutes used (means over processes,
    so that all set the same learning rate and stop at the same step), and any process's stop signal (0: none)."""
    flags = [time_used, signal_received == signal.SIGINT, signal_received == signal.SIGTERM]
    stats = torch.cat([loss.detach().float().view(1), grad_norm.float().view(1),
                       torch.tensor(flags, dtype=torch.float32).to(loss.device, non_blocking=True)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(stats)
    loss, grad_norm, time_used, sigint, sigterm = stats.tolist()
    stop = signal.SIGINT if sigint else signal.SIGTERM if sigterm else 0
    return loss / world, grad_norm / world, time_used / world, stop


class StopRequests:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's warning before it kills a job) only note the signal; the loop
    then writes a checkpoint, stops, and exits with status 128 + its number. A second signal acts at once."""
    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Progress:
    """The run's clock (across resumes, against --minutes) and log: each interval's mean loss and speed (without
    the time of checkpoints and samples), printed and appended to log.csv by rank 0."""
    def __init__(self, args, step, elapsed, rank):
        self.args, self.path, self.enabled = args, os.path.join(args.out, "log.csv"), rank == 0
        self.start, self.budget = time.time() - elapsed, math.inf if args.minutes is None else args.minutes * 60
        self.losses, self.step, self.time = [], step, time.time()
        if self.enabled:   # a new log, or the old one without rows a crashed run wrote after its last checkpoint
            rows = [["step", "loss", "lr", "images_per_s", "elapsed_s"]]
            if step > 0 and os.path.exists(self.path):
                with open(self.path, newline="") as f:
                    rows = [r for i, r in enumerate(csv.reader(f)) if i == 0 or int(r[0]) <= step]
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerows(rows)

    def elapsed(self):
        return time.time() - self.start

    def time_used(self, elapsed=None):
        """The share of --minutes used (after `elapsed` seconds, or now); a budget of 0 is used up at once."""
        return (self.elapsed() if elapsed is None else elapsed) / self.budget if self.budget > 0 else math.inf

    def progress(self, step, time_used):
        """The share of the budget done: of --steps after `step` steps or of --minutes, whichever is further."""
        return max(step / self.args.steps if self.args.steps else float(self.args.steps == 0), time_used)

    def say(self, text):
        if self.enabled:
            print(text, flush=True)

    @contextlib.contextmanager
    def paused(self):
        start = time.time()
        yield
        self.time += time.time() - start

    def report(self, step, lr):
        now = time.time()
        sec_per_step = (now - self.time) / (step - self.step)
        steps_left = self.args.steps - step if self.args.steps else math.inf
        left = min(self.budget - self.elapsed(), steps_left * sec_per_step)
        loss, speed = sum(self.losses) / len(self.losses), self.args.batch_size / sec_per_step
        self.say(f"step {step}{f'/{self.args.steps}' if self.args.steps else ''} | loss {loss:.4f} | {speed:.0f} "
                 f"img/s | elapsed {self.elapsed() / 60:.1f} min | left {max(0, left) / 60:.1f} min")
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(f"{step},{loss:.6f},{lr:.3e},{speed:.1f},{self.elapsed():.1f}\n")
        self.losses, self.step, self.time = [], step, now


if __name__ == "__main__":
    stopped = main().get("stopped")
    # All is written. Skip the interpreter's teardown: under torchrun with gloo, it can abort (SIGABRT).
    sys.stdout.flush()
    os._exit(128 + stopped if stopped else 0)

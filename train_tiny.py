"""
Train a small class-conditional DiG (or its DiT twin) on CIFAR-10 pixels or on precomputed latents.

    python train_tiny.py                          # GPU: DiG-S/2 on CIFAR-10 for 15 minutes; CPU: a smoke run
    python train_tiny.py --model DiT-S/2          # the softmax-attention twin, same recipe
    python train_tiny.py --classifier resnet56.th # and judge the final samples with a CIFAR-10 ResNet-56
    torchrun --nproc_per_node=4 train_tiny.py     # several GPUs (gradients averaged over processes)
    python train_tiny.py --resume runs/DiG-S-2    # continue a run exactly where its checkpoint left it
    python train_tiny.py --latents latents.npz    # train on VAE latents instead of pixels (see below)
    python train_tiny.py --resume runs/DiG-S-2 --sample 5000   # more samples from a run, no training

Everything goes into the output folder (default runs/<model>): ckpt.pt (latest checkpoint), log.csv (loss
per logging interval), samples_<step>.png (one row per class, EMA weights), loss.png and, with --classifier,
eval.json (class accuracy and a Frechet distance between ResNet-56 features of samples and training images).
With --sample N: samples_<step>_<N>.png (the first 100) and .npz (all N, uint8 images NHWC and labels).
Defaults depend on the device (see default_config) and every one of them can be overridden.

Speed. On a GPU the training step and the sampler run compiled (torch.compile of every block) and replayed from
CUDA graphs (CompiledTrainStep, GraphedDenoiser); compiling takes about half a minute at the start of a run and
counts against --minutes. --eager runs them as plain PyTorch instead, as on a CPU.

Stopping. Ctrl-C or SIGTERM (what a cluster scheduler sends) ends the run at the end of the current step with
a checkpoint; --resume carries on. Checkpoints are written atomically, so even a SIGKILL (or a power cut) at
any moment leaves the previous one intact.

CIFAR-10 is read in its official python layout, DATA_DIR/cifar-10-batches-py/data_batch_{1..5}; any subset of
the five batches works. If the folder is missing the official archive is downloaded and checked (MD5).

Latents. No VAE ships with this project, so latents are precomputed by the user into an .npz file holding
`latents` (float, N x C x H x W) and `labels` (int, N). For example with Stable Diffusion's VAE (an extra
package, `pip install diffusers`, used only for this step):

    import numpy as np, torch
    from diffusers.models import AutoencoderKL
    vae = AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema").cuda().eval()
    # images: uint8 [N, 256, 256, 3] (e.g. ImageNet, centre-cropped), labels: int [N]
    chunks = []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            x = torch.from_numpy(images[i:i + 64]).cuda().permute(0, 3, 1, 2).float() / 127.5 - 1
            chunks.append((vae.encode(x).latent_dist.sample() * 0.18215).cpu())  # 0.18215: unit variance
    np.savez("latents.npz", latents=torch.cat(chunks).numpy(), labels=np.asarray(labels, dtype=np.int64))
    # and to look at samples later: images = vae.decode(latents / 0.18215).sample  (in [-1, 1])

Without the VAE here, latent sample grids show the first three latent channels, each stretched to the full
grey range over the grid: enough to see structure emerge, not a picture.
"""

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import tarfile
import time
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import dig
import gla_kernel

# -----------------------------------------------------------------------------------------------------------
# Settings that depend on the device. Each is a command-line flag; these are only the defaults.
#
# GPU: a run that gives recognisable class-conditional CIFAR-10 samples in minutes on one H100. The official
# DiT recipe (AdamW lr 1e-4, constant; EMA 0.9999; no warm-up; no guidance) is made for 400K steps; in the few
# thousand steps of a short run it leaves blurry blobs. What changes, and why:
#   * lr 6e-4 after a 1000-step linear warm-up: a small model on 256 tokens takes a much larger step than
#     DiT-XL does, and the warm-up lets the adaLN modulations grow from their zero initialisation before the
#     steps get large; the gradient norm is clipped at 1 as a second guard against early spikes.
#   * an EMA that warms up, decay = min(0.9995, (1 + step) / (10 + step)): the average covers roughly the last
#     step/9 updates until it reaches the ~2000-step memory of 0.9995. A fixed decay would keep a share of the
#     random initial weights for ~1/(1 - decay) steps: 0.9999 means 10,000 steps, half of a short run.
#   * random horizontal flips: CIFAR-10 classes look the same mirrored, and at hundreds of epochs over 20,000
#     to 50,000 images the flips double the data the model sees. (Not for latents: the mirror image of a
#     latent is not the latent of the mirrored image.)
#   * classifier-free guidance at scale 3 for samples: a young model's conditional and unconditional
#     predictions differ only a little, and guidance amplifies exactly that difference, the class. 100
#     ancestral steps are plenty at 32x32.
#   * a time budget (--minutes) instead of a step count, since the speed of the GPU is not known in advance;
#     the learning rate is constant after warm-up so that nothing depends on the total number of steps.
# CPU: a smoke test, a 4-block, 128-wide DiG on 4x4 patches, that shows the whole pipeline in a few minutes.
def default_config(on_gpu):
    if on_gpu:
        return dict(model="DiG-S/2", depth=None, hidden_size=None, num_heads=None, steps=None, minutes=15.0,
                    batch_size=256, lr=6e-4, warmup=1000, ema=0.9995, sample_steps=100, cfg_scale=3.0,
                    sample_every=2500, ckpt_every=2000, log_every=100)
    return dict(model="DiG-S/4", depth=4, hidden_size=128, num_heads=2, steps=200, minutes=None,
                batch_size=32, lr=1e-3, warmup=20, ema=0.99, sample_steps=25, cfg_scale=3.0,
                sample_every=100, ckpt_every=100, log_every=10)


def parse_args(argv=None):
    """The settings of this run, and the checkpoint to resume from (or None).

    With --resume, unset flags take the settings of the run being continued, so `--resume DIR` alone carries
    on exactly; flags given now still win (e.g. a larger --steps), except those that define the network.
    Flags still unset after that get the device's defaults (fill_defaults)."""
    p = argparse.ArgumentParser(description="Train a small class-conditional DiG on CIFAR-10 or on latents. "
                                "Options left out get defaults for the device (see default_config).")
    p.add_argument("--model", help="a key of dig.DiG_models or dig.DiT_models, e.g. DiG-S/2 or DiT-S/2")
    p.add_argument("--depth", type=int, help="override the number of blocks of --model (DiG: a multiple of 4)")
    p.add_argument("--hidden-size", type=int, help="override the width of --model")
    p.add_argument("--num-heads", type=int, help="override the number of heads of --model")
    p.add_argument("--data-dir", default="data", help="folder holding (or receiving) cifar-10-batches-py/")
    p.add_argument("--latents", help=".npz with 'latents' [N,C,H,W] and 'labels' [N]; replaces CIFAR-10")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps (counted across resumes)")
    p.add_argument("--minutes", type=float, help="stop after this much wall-clock time (counted across "
                                                 "resumes); with --steps, whichever comes first")
    p.add_argument("--batch-size", type=int, help="global batch size, split evenly across processes")
    p.add_argument("--lr", type=float, help="AdamW learning rate after warm-up")
    p.add_argument("--warmup", type=int, help="linear learning-rate warm-up, in steps")
    p.add_argument("--ema", type=float, help="EMA decay (reached gradually: min(ema, (1+step)/(10+step)))")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--sample-steps", type=int, help="sampling steps for the sample grids and --classifier")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = no guidance)")
    p.add_argument("--sample-every", type=int, help="save a sample grid every this many steps (0: only at end)")
    p.add_argument("--ckpt-every", type=int, help="save a checkpoint every this many steps (0: only at end)")
    p.add_argument("--log-every", type=int, help="print and log the loss every this many steps")
    p.add_argument("--out", help="output folder (default: runs/<model>, or the folder of --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="checkpoint file, or a folder holding ckpt.pt, to continue from")
    p.add_argument("--classifier", help="CIFAR-10 ResNet-56 weights: report how often final samples are "
                                        "classified as the class they were asked for")
    p.add_argument("--eval-per-class", type=int, default=100, help="samples per class for --classifier")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: the resumed run's device, else cuda when there is a GPU")
    p.add_argument("--eager", action="store_true", help="GPU: run the training step and the sampler as plain "
                   "PyTorch, not compiled and replayed from CUDA graphs (slower; for debugging)")
    p.add_argument("--sample", type=int, metavar="N", help="with --resume: make N samples from the EMA weights "
                   "(a grid and an .npz; scored too with --classifier) instead of training")
    args, ckpt = p.parse_args(argv), None
    if args.sample is not None and not args.resume:
        raise SystemExit("error: --sample N makes samples from a finished run: give --resume RUN_DIR too")
    if args.sample is not None and args.sample < 1:
        raise SystemExit(f"error: --sample must be at least 1; got {args.sample}")
    if args.resume:
        path, ckpt = load_checkpoint(args.resume)
        saved = {k: v for k, v in ckpt["args"].items() if k not in ("resume", "out", "sample")}
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        network = ("model", "depth", "hidden_size", "num_heads")
        if any(getattr(args, k) != saved[k] for k in network):
            raise SystemExit(f"error: {path} holds a {saved['model']} with depth/hidden-size/heads "
                             f"{[saved[k] for k in network[1:]]}; --resume continues that network")
        args.out = args.out or os.path.dirname(path)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here" + (" (the run being resumed ran on one); pass --device cpu "
                                                       "to continue it on the CPU" if ckpt else ""))
    return args, ckpt


def fill_defaults(args, world):
    defaults = default_config(on_gpu=args.device == "cuda")
    if args.model is not None:  # a model named on the command line comes at its own size
        defaults.update(depth=None, hidden_size=None, num_heads=None)
    if args.steps is not None or args.minutes is not None:  # a budget given replaces the default budget
        defaults.update(steps=None, minutes=None)
    if args.batch_size is None:  # the default batch, rounded down to a multiple of the number of processes
        defaults["batch_size"] -= defaults["batch_size"] % world
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps is None and args.minutes is None:
        raise SystemExit("error: give --steps or --minutes (or both)")
    for k in ("batch_size", "log_every", "sample_steps"):
        if getattr(args, k) < 1:
            raise SystemExit(f"error: --{k.replace('_', '-')} must be at least 1; got {getattr(args, k)}")
    for k in ("steps", "minutes", "warmup", "sample_every", "ckpt_every"):
        if getattr(args, k) is not None and getattr(args, k) < 0:
            raise SystemExit(f"error: --{k.replace('_', '-')} must not be negative; got {getattr(args, k)}")
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} must divide evenly across {world} processes")
    args.out = args.out or os.path.join("runs", args.model.replace("/", "-"))


# -----------------------------------------------------------------------------------------------------------
# Data: CIFAR-10 in the official python layout, or an .npz of latents. Both end up as CPU tensors
# (uint8 pixels or float latents, and int64 labels); batches are gathered by index and moved to the device.

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"


def cifar_batch_files(data_dir):
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        return []
    names = [f"data_batch_{i}" for i in range(1, 6)]       # the official names, nothing else (no .bak)
    return [os.path.join(folder, f) for f in names if os.path.isfile(os.path.join(folder, f))]


def download_cifar10(data_dir):
    """Fetch the official archive into data_dir, check its MD5, and extract cifar-10-batches-py/ there."""
    os.makedirs(data_dir, exist_ok=True)
    archive = os.path.join(data_dir, "cifar-10-python.tar.gz")
    if not os.path.exists(archive):
        print(f"downloading {CIFAR_URL} (170 MB) ...", flush=True)
        try:
            with urllib.request.urlopen(CIFAR_URL, timeout=60) as r, open(archive + ".part", "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:  # no network, DNS failure, HTTP error, timeout
            raise SystemExit(
                f"error: CIFAR-10 is not in {os.path.abspath(data_dir)} and downloading it failed ({e}).\n"
                f"On a machine with internet, get {CIFAR_URL} (MD5 {CIFAR_MD5}), extract it, and put the "
                f"resulting cifar-10-batches-py/ folder under DATA_DIR (here {os.path.abspath(data_dir)}), "
                f"or point --data-dir at the folder that holds it.")
        os.replace(archive + ".part", archive)
    digest = hashlib.md5()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    md5 = digest.hexdigest()
    if md5 != CIFAR_MD5:
        os.remove(archive)  # so that the next run downloads it afresh
        raise SystemExit(f"error: {archive} has MD5 {md5}, expected {CIFAR_MD5}: the download is corrupt "
                         f"and was deleted; run again to retry.")
    with tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")


class CifarUnpickler(pickle.Unpickler):
    """The official batches are pickles: a dict of bytes, lists and a numpy array. Unpickling runs whatever a
    file names, so only what such a dict needs is let through: numpy's array constructors, and the bytes
    encoder that protocol-2 pickles written by Python 3 use."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch; refusing to load it")
        return super().find_class(module, name)


def read_cifar_batch(path):
    """One official batch file: a pickled dict with b'data' (uint8 [N, 3072], RGB planes) and b'labels'."""
    try:
        with open(path, "rb") as f:
            d = CifarUnpickler(f, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise SystemExit(f"error: cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}. The file is "
                         f"corrupt or not a CIFAR-10 python batch; replace it with one from the official "
                         f"archive.")
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x) or (len(y) and not 0 <= y.min() <= y.max() <= 9):
        raise SystemExit(f"error: CIFAR-10 batch {path} has data of shape {x.shape} and {len(y)} labels; "
                         f"expected [N, 3072] uint8 and N labels in 0..9.")
    return x.reshape(-1, 3, 32, 32), y


def load_cifar10(data_dir, download=True):
    """All data_batch_* files found (downloading the archive if there are none): uint8 [N,3,32,32], int64 [N]."""
    files = cifar_batch_files(data_dir)
    if not files and download:
        download_cifar10(data_dir)
        files = cifar_batch_files(data_dir)
    if not files:
        raise SystemExit(f"error: no CIFAR-10 training batches (data_batch_*) in "
                         f"{os.path.abspath(os.path.join(data_dir, 'cifar-10-batches-py'))}. Put the "
                         f"cifar-10-batches-py/ folder from {CIFAR_URL} under DATA_DIR (--data-dir).")
    xs, ys = zip(*(read_cifar_batch(f) for f in files))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_latents(path):
    """An .npz with 'latents' (float [N,C,H,W]) and 'labels' (int [N]): float32 and int64 CPU tensors."""
    try:
        with np.load(path) as f:
            x, y = f["latents"], f["labels"]
    except Exception as e:
        raise SystemExit(f"error: cannot read latents file {path}: {type(e).__name__}: {e}. Expected an .npz "
                         f"with arrays 'latents' [N, C, H, W] and 'labels' [N].")
    if x.ndim != 4 or x.shape[2] != x.shape[3] or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise SystemExit(f"error: latents file {path} has latents {x.shape} and labels {y.shape} {y.dtype}; "
                         f"expected square latents [N, C, H, H] and integer labels [N].")
    if len(y) == 0 or y.min() < 0 or not np.isfinite(x).all():
        raise SystemExit(f"error: latents file {path} must hold at least one example, labels >= 0 and finite "
                         f"latents; got {len(y)} examples"
                         + (f", labels from {y.min()} to {y.max()}, finite: {bool(np.isfinite(x).all())}" if len(y) else ""))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def batch_indices(step, n_examples, global_batch, seed, rank, world):
    """The examples this process trains on at `step`: a pure function of its arguments, so a resumed run
    sees exactly the batches an uninterrupted one would. Each epoch is a fresh permutation (seeded by the
    epoch number, identical on every process); each global batch is split evenly across processes."""
    per_epoch = n_examples // global_batch  # the last, incomplete batch of an epoch is skipped
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    local = global_batch // world
    start = i * global_batch + rank * local
    return perm[start:start + local]


# -----------------------------------------------------------------------------------------------------------
# Model and EMA

def build_model(args, input_size, in_channels, num_classes):
    """A model from dig's registry. --depth, --hidden-size and --num-heads replace those of the named size
    (the CPU smoke run and the tests use this for models small enough for a CPU)."""
    make = dig.DiG_models.get(args.model) or dig.DiT_models.get(args.model)
    if make is None:
        raise SystemExit(f"error: unknown model {args.model!r}; choose one of "
                         f"{sorted(dig.DiG_models) + sorted(dig.DiT_models)}")
    size = {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads") if getattr(args, k) is not None}
    try:
        return make(input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=True,
                    class_dropout_prob=0.1, **size)
    except ValueError as e:   # e.g. a patch that does not divide the image, or heads that do not divide the width
        raise SystemExit(f"error: cannot build {args.model} for {in_channels}x{input_size}x{input_size} inputs "
                         f"with {size or 'its own size'}: {e}")


@torch.no_grad()
def update_ema(ema_params, model_params, decay):
    """ema <- decay * ema + (1 - decay) * model, in place."""
    torch._foreach_mul_(ema_params, decay)      # decay 0 copies the model exactly, decay 1 changes nothing
    torch._foreach_add_(ema_params, torch._foreach_mul(model_params, 1 - decay))


def ema_decay(step, target):
    return min(target, (1 + step) / (10 + step))


def learning_rate(step, args):
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else args.lr


# -----------------------------------------------------------------------------------------------------------
# One training step. Everything random about a step is drawn first (draw_batch), outside the network, from a
# generator seeded by (seed, step, rank): a resumed run draws exactly what an uninterrupted one would. The step
# then runs in three parts, so that the host sees the loss before any weight moves:
#   1. forward and backward: the diffusion loss of this process's share of the batch, and its gradients
#   2. the gradients averaged over processes (what DistributedDataParallel does), and their norm
#   3. update: gradient clipping, AdamW and the EMA, run only when the loss and the gradient norm are finite
# On a GPU, part 1 is compiled and replayed from a CUDA graph (CompiledTrainStep); --eager runs it as plain
# PyTorch (TrainStep), as on a CPU.

def draw_batch(x_all, y_all, step, args, rank, world, device, latent, num_timesteps, drop_prob, generator):
    """Step `step` on this process: images (pixels in [-1, 1], randomly flipped) or latents, labels, diffusion
    steps t, noise, and which labels are dropped for guidance. A pure function of (seed, step, rank, world)."""
    generator.manual_seed(args.seed * 1_000_003 + step * world + rank)
    idx = batch_indices(step, len(x_all), args.batch_size, args.seed, rank, world)
    x, y = x_all[idx].to(device), y_all[idx].to(device)
    n = len(x)
    if not latent:
        x = x.float() / 127.5 - 1
        flip = torch.rand(n, 1, 1, 1, generator=generator, device=device) < 0.5
        x = torch.where(flip, x.flip(3), x)
    t = torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
    noise = torch.randn(x.shape, generator=generator, device=device)
    drop = torch.rand(n, generator=generator, device=device) < drop_prob
    return dict(x=x, y=y, t=t, noise=noise, drop=drop)


class TrainStep:
    """`loss, grad_norm = step(batch)` computes the loss and the averaged gradients of a batch (parts 1 and 2;
    the weights are untouched); `step.update(lr, ema_decay)` then clips, steps AdamW and moves the EMA."""

    def __init__(self, model, ema, opt, diffusion, grad_clip, world):
        self.model, self.opt, self.diffusion = model, opt, diffusion
        self.grad_clip, self.world = grad_clip, world
        self.model_params, self.ema_params = list(model.parameters()), list(ema.parameters())
        self.trained = [p for p in self.model_params if p.requires_grad]
        # Every gradient lives in one flat buffer (each .grad is a view of its slice, which backward adds
        # into): one zero_, one all_reduce and one norm for all of them.
        sizes = [p.numel() for p in self.trained]
        self.flat_grad = torch.zeros(sum(sizes), device=self.trained[0].device)
        self.grad_views = [view.view_as(p) for view, p in zip(self.flat_grad.split(sizes), self.trained)]
        self._set_grads(self.grad_views)
        self.grad_norm = None

    def _set_grads(self, grads):
        for i, p in enumerate(self.trained):
            p.grad = None if grads is None else grads[i]

    def forward_backward(self, batch, autocast_cache=True):
        """Part 1: the loss of the batch (detached); backward adds the gradients into each p.grad."""
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
    def update(self, lr, ema_decay):
        """Part 3."""
        # Clip as nn.utils.clip_grad_norm_ does, with the norm taken above.
        self.flat_grad.mul_((self.grad_clip / (self.grad_norm + 1e-6)).clamp(max=1.0))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        update_ema(self.ema_params, self.model_params, ema_decay)


class CompiledTrainStep(TrainStep):
    """The same step, with part 1 compiled and replayed as a CUDA graph. Call it exactly like TrainStep.

    Why: at CIFAR-10 sizes a step is ~1,000 small kernels. Eagerly, most of the GPU time goes to element-wise
    work between the matmuls, and launching the kernels takes the host about as long as the GPU takes to run
    them. dig.compile_blocks fuses the element-wise work (fewer, larger kernels); the CUDA graph launches the
    whole forward and backward at once. The batch is copied into the graph's fixed input tensors before each
    replay. Parts 2 and 3 stay eager: they are a handful of kernels, and NCCL and the host's NaN check sit
    between them. The model's blocks must already be compiled (dig.compile_blocks).
    """

    def __init__(self, model, ema, opt, diffusion, grad_clip, world, example_batch):
        super().__init__(model, ema, opt, diffusion, grad_clip, world)
        self.static_batch = {k: v.clone() for k, v in example_batch.items()}
        # The captured backward must create the gradients itself (into memory the graph owns), not add into
        # tensors made outside the capture; after capture the graph copies them into the flat buffer.
        self._set_grads(None)
        side = torch.cuda.Stream()          # warm up off the default stream: compile, Triton, cuBLAS handles
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.forward_backward(self.static_batch, autocast_cache=False)
                self._set_grads(None)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()            # the capture's private pool should not sit beside unused blocks
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            # No autocast cache: it would keep bf16 weight copies made during capture, stale after an update.
            self.static_loss = self.forward_backward(self.static_batch, autocast_cache=False)
            self.graph_grads = [p.grad for p in self.trained]   # written by every replay; kept alive here
            torch._foreach_copy_(self.grad_views, self.graph_grads)
        self._set_grads(self.grad_views)

    def __call__(self, batch):
        for name, x in batch.items():
            self.static_batch[name].copy_(x)
        self.graph.replay()
        return self.static_loss, self.average_gradients()


def make_optimizer(model, args):
    """AdamW, fused: one kernel updates every parameter."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0, fused=True)


def load_optimizer_state(opt, state):
    """The moments and step counts of a checkpoint, under this run's settings (device, learning rate, fused),
    whatever the checkpoint was written with (e.g. a GPU run continued on the CPU)."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, own in zip(opt.param_groups, settings):
        group.update(own)
    for p, s in opt.state.items():   # the fused kernels want the step count as float32 beside the weights
        s["step"] = s["step"].to(device=p.device, dtype=torch.float32)


# -----------------------------------------------------------------------------------------------------------
# Checkpoints. Written to a temporary file in the same folder and renamed over the old one (os.replace is
# atomic), so a crash mid-write leaves the previous checkpoint intact. They hold only tensors, dicts, lists,
# numbers and strings, so torch.load(..., weights_only=True) reads them. No RNG states are needed: every
# random number of step s (data order, flips, timesteps, noise, label dropout) comes from generators seeded
# by (seed, s, rank), so the step number is the whole of the "where were we" state. On a CPU a resumed run
# matches an uninterrupted one bit for bit (a test checks it); GPU kernels are not bitwise deterministic, so
# there it matches up to rounding. The one thing not carried over is the running loss of a log interval that a
# checkpoint cuts in two: the first log row after resuming averages only the steps since the checkpoint.

def save_checkpoint(path, model, ema, opt, step, elapsed, args):
    state = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
                 elapsed=elapsed, args=vars(args))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"model", "ema", "opt", "step", "elapsed", "args"} - set(ckpt)
    except Exception as e:
        raise SystemExit(f"error: cannot read checkpoint {path}: {type(e).__name__}: {e}. It is truncated or "
                         f"corrupt (was a copy interrupted?); resume from another checkpoint.")
    if missing:
        raise SystemExit(f"error: {path} is not a train_tiny.py checkpoint (missing {sorted(missing)})")
    return path, ckpt


# -----------------------------------------------------------------------------------------------------------
# Pictures, with pillow only: sample grids and the loss curve.

def to_uint8_grid(x, ncol, latent=False):
    """[N, C, H, W] pixels (in [-1, 1], or uint8) or latents (unbounded) -> HWC uint8 grid, 2-pixel gaps."""
    x = x.detach().float().cpu()
    if latent:  # show the first three channels, each stretched to [-1, 1] over the whole grid
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
        lo = x.amin(dim=(0, 2, 3), keepdim=True)
        hi = x.amax(dim=(0, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8) * 2 - 1
        x = F.interpolate(x, scale_factor=max(1, 32 // x.shape[-1]), mode="nearest")
    x = x if x.dtype == torch.uint8 else to_uint8(x)
    n, c, h, w = x.shape
    nrow, pad = math.ceil(n / ncol), 2
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_grid(x, path, ncol, latent=False):
    Image.fromarray(to_uint8_grid(x, ncol, latent)).save(path)


def read_log(path):
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def plot_loss(log_path, png_path, width=640, height=360):
    """Loss against step on a log scale: the raw interval means in grey, a smoothed curve in blue."""
    rows = [(s, l) for s, l in read_log(log_path) if math.isfinite(l) and l > 0]
    if len(rows) < 2:
        return
    steps, losses = zip(*rows)
    w = max(1, len(losses) // 25)  # trailing mean over 4% of the run
    smooth = [sum(losses[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(losses))]
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
    d.text((left, 8), "training loss (log scale)", fill="black")
    d.text((4, top), f"{10 ** hi:.3g}", fill="black")
    d.text((4, height - bottom - 10), f"{10 ** lo:.3g}", fill="black")
    d.text((left, height - bottom + 6), f"step {steps[0]}", fill="black")
    d.text((width - right - 70, height - bottom + 6), f"step {steps[-1]}", fill="black")
    img.save(png_path)


def fmt_time(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -----------------------------------------------------------------------------------------------------------
# A judge for CIFAR-10 samples: ResNet-56 (He et al. 2015, section 4.2), with "option A" shortcuts: where a
# stage halves the resolution and doubles the channels, the shortcut subsamples by 2 and pads the new channels
# with zeros, so it has no weights. Attribute names match the public pretrained weights (akamaster).
# It scores samples twice: does it see the class they were asked for, and how far are its 64 pooled features
# of the samples, as a Gaussian, from those of the training images (the Frechet distance FID uses, here with
# the classifier this project ships instead of an Inception network that cannot be had offline)?

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.extra:
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.extra // 2, self.extra // 2))
        return F.relu(out + shortcut)


class ResNet56(nn.Module):
    def __init__(self, blocks_per_stage=9, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stage = lambda cin, cout, stride: nn.Sequential(
            BasicBlock(cin, cout, stride), *[BasicBlock(cout, cout, 1) for _ in range(blocks_per_stage - 1)])
        self.layer1, self.layer2, self.layer3 = stage(16, 16, 1), stage(16, 32, 2), stage(32, 64, 2)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):  # x: RGB in [0, 1], [N, 3, 32, 32]
        return self.linear(self.features(x))

    def features(self, x):  # the 64 globally average-pooled features that the final Linear reads
        mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = F.relu(self.bn1(self.conv1((x - mean) / std)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


def load_classifier(path, device):
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)   # the published file wraps the weights; a bare state_dict works too
        net = ResNet56()
        missing, unexpected = net.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()},
                                                  strict=False)  # the file has no BatchNorm step counters
        if unexpected or not all(k.endswith("num_batches_tracked") for k in missing):
            raise ValueError(f"not a CIFAR-10 ResNet-56: missing {missing[:4]}, unexpected {unexpected[:4]}")
    except Exception as e:
        raise SystemExit(f"error: cannot load the ResNet-56 classifier from {path}: {type(e).__name__}: {e}")
    return net.to(device).eval()


@torch.no_grad()
def pooled_features(classifier, images, device, chunk=500):
    """The classifier's 64 pooled features of uint8 images [N, 3, 32, 32]: float32 [N, 64] on the CPU."""
    return torch.cat([classifier.features(images[i:i + chunk].to(device).float() / 255).cpu()
                      for i in range(0, len(images), chunk)])


def gaussian_stats(feats):
    """Mean and covariance (float64, numpy) of features [N, 64]."""
    feats = feats.double().numpy()
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def feature_stats(classifier, images, device, chunk=500):
    """Mean and covariance (float64, numpy) of the classifier's pooled features of uint8 images [N,3,32,32]."""
    return gaussian_stats(pooled_features(classifier, images, device, chunk))


def frechet_distance(mu1, cov1, mu2, cov2):
    """The Frechet (2-Wasserstein) distance between Gaussians N(mu1, cov1) and N(mu2, cov2), as in FID:
    |mu1 - mu2|^2 + Tr(cov1) + Tr(cov2) - 2 Tr((cov1^1/2 cov2 cov1^1/2)^1/2), in float64. Both roots are of
    symmetric positive semi-definite matrices, so symmetric eigendecompositions give them (negative
    eigenvalues are rounding and are clipped to 0)."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, cov1, cov2))
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    middle = root1 @ cov2 @ root1
    trace_root = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


@torch.no_grad()
def judge(classifier, images, labels, reference_stats, device, chunk=500):
    """How the ResNet-56 sees uint8 samples [N,3,32,32] asked for `labels`: the fraction put in the class they
    were asked for (overall, and per class), and the Frechet distance between its pooled features of the
    samples and reference_stats (feature_stats of the training images). Like FID, with this classifier instead
    of Inception: 0 for two sets of images alike to the classifier; comparable only between equal numbers of
    samples (fewer samples give larger distances)."""
    feats = pooled_features(classifier, images, device, chunk)   # one pass of the network serves both scores
    preds = classifier.linear(feats.to(device)).argmax(dim=1).cpu()
    per_class = [((preds == labels) & (labels == c)).sum().item() / max(1, (labels == c).sum().item())
                 for c in range(10)]
    fd = frechet_distance(*gaussian_stats(feats), *reference_stats)
    return (preds == labels).float().mean().item(), per_class, fd


# -----------------------------------------------------------------------------------------------------------
# Sampling with the EMA weights. On a GPU (without --eager) the sampler calls the EMA network through
# GraphedDenoiser: its blocks compiled, each call replayed from a CUDA graph.

class GraphedDenoiser:
    """Stands in for a DiG/DiT network in dig.sample: net(x, t, y) and net.forward_with_cfg(x, t, y, scale),
    each replayed from a CUDA graph captured the first time its batch shape (and guidance scale) is seen.
    A sampler calls the same network a hundred times on the same shapes, so a capture pays for itself in the
    first few steps."""

    def __init__(self, net):
        self.net, self.graphs = net, {}
        self.in_channels, self.input_size, self.num_classes = net.in_channels, net.input_size, net.num_classes

    def parameters(self):
        return self.net.parameters()

    def __call__(self, x, t, y):
        return self._replay(x, t, y, cfg_scale=None)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        return self._replay(x, t, y, cfg_scale)

    def _replay(self, x, t, y, cfg_scale):
        key = (tuple(x.shape), x.dtype, cfg_scale, torch.is_autocast_enabled("cuda"))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, t, y, cfg_scale)
        inputs, output, graph = self.graphs[key]
        for static, new in zip(inputs, (x, t, y)):
            static.copy_(new)
        graph.replay()
        return output.clone()    # the next replay overwrites `output`; the sampler may still hold this one

    @torch.no_grad()
    def _capture(self, x, t, y, cfg_scale):
        inputs = [a.clone() for a in (x, t, y)]
        autocast = torch.is_autocast_enabled("cuda")

        def run():
            # No autocast cache inside a graph: the bf16 weight copies must be made afresh at every replay.
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
                if cfg_scale is None:
                    return self.net(*inputs)
                return self.net.forward_with_cfg(*inputs, cfg_scale)

        side = torch.cuda.Stream()     # warm up (compile, Triton) off the default stream, as CUDA graphs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run()
        return inputs, output, graph


@torch.no_grad()
def generate(net, labels, args, device, seed):
    """Samples for `labels`, from noise fixed by `seed` (so grids at different steps are comparable)."""
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(len(labels), net.in_channels, net.input_size, net.input_size, generator=g, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        x = dig.sample(net, labels, steps=args.sample_steps, cfg_scale=args.cfg_scale, sampler=args.sampler,
                       noise=noise, generator=g)
    return x.float()


@torch.no_grad()
def generate_many(net, labels, args, device, chunk=500):
    """Samples for many labels, `chunk` at a time (each chunk's noise seeded by its position), on the CPU:
    uint8 images [N, C, H, W] for pixels, float latents for latents."""
    out = []
    for i in range(0, len(labels), chunk):
        x = generate(net, labels[i:i + chunk].to(device), args, device, seed=args.seed + 1 + i).cpu()
        out.append(x if args.latents else to_uint8(x))
    return torch.cat(out)


def to_uint8(x):
    """Pixels in [-1, 1] -> uint8 0..255."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_labels(num_classes, per_class, device):
    """One row per class (at most 10 rows, spread evenly over the classes), `per_class` samples per row."""
    classes = torch.linspace(0, num_classes - 1, min(num_classes, 10)).round().long()
    return classes.repeat_interleave(per_class).to(device)


def evaluate(net, classifier, labels, train_images, args, device, out_name, samples=None):
    """Judge samples for `labels` (made now unless given) with the classifier: print and write out_name."""
    seconds = None
    if samples is None:
        t0 = time.time()
        samples = generate_many(net, labels, args, device)
        seconds = round(time.time() - t0, 1)
        print(f"sampled {len(labels)} images in {seconds} s")
    acc, per_class, fd = judge(classifier, samples, labels, feature_stats(classifier, train_images, device), device)
    print(f"ResNet-56 finds the requested class in {100 * acc:.1f}% of {len(labels)} EMA samples (cfg "
          f"{args.cfg_scale}, {args.sample_steps} {args.sampler} steps); Frechet distance of its features to "
          f"the training images' {fd:.2f}; per class (%): " + " ".join(f"{100 * a:.0f}" for a in per_class))
    result = dict(accuracy=acc, per_class=per_class, frechet_distance=fd, samples=len(labels),
                  sampling_seconds=seconds,
                  cfg_scale=args.cfg_scale, sample_steps=args.sample_steps, sampler=args.sampler)
    with open(os.path.join(args.out, out_name), "w") as f:
        json.dump(result, f, indent=1)
    return result


# -----------------------------------------------------------------------------------------------------------
# Before GPU time goes into the Triton kernel, it must agree with the reference recurrence.

def check_gla_kernel(device, tolerances={torch.float32: 2e-3, torch.bfloat16: 1e-2}):
    """Outputs and gradients of chunk_gla vs naive_gla on a small input; returns the worst relative error."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 reference must be true fp32
    try:
        return _worst_kernel_error(device, tolerances)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _worst_kernel_error(device, tolerances):
    torch.manual_seed(0)
    worst = 0.0
    B, T, H, K, V = 2, 200, 2, 32, 64  # 200: several chunks and a partial one
    for dtype, tol in tolerances.items():
        q, k = (torch.randn(B, T, H, K, device=device) for _ in range(2))
        v = torch.randn(B, T, H, V, device=device)
        g = F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16
        do = torch.randn(B, T, H, V, device=device)
        results = []
        for fn, dt in ((gla_kernel.chunk_gla, dtype), (gla_kernel.naive_gla, torch.float32)):
            # the reference sees the same (rounded) inputs, in float32
            inputs = [x.to(dtype).to(dt).requires_grad_() for x in (q, k, v, g)]
            o, _ = fn(*inputs)
            grads = torch.autograd.grad(o.float().mul(do).sum(), inputs)
            results.append([o, *grads])
        for name, a, b in zip(("o", "dq", "dk", "dv", "dg"), *results):
            err = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
            if not err < tol:
                raise SystemExit(f"error: the Triton GLA kernel disagrees with the reference ({name} in {dtype}: "
                                 f"relative error {err:.2e} >= {tol}); refusing to train.")
            worst = max(worst, err)
    return worst


# -----------------------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python train_tiny.py` is rank 0 of 1.

def setup_distributed(device_type):
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_type)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def load_data(args, rank):
    """(examples, labels, is_latent) as CPU tensors. CIFAR-10 is downloaded, if needed, by rank 0 alone."""
    if args.latents:
        x, y = load_latents(args.latents)
        return x, y, True
    if rank == 0 and not cifar_batch_files(args.data_dir):
        download_cifar10(args.data_dir)  # the other processes wait at the barrier
    if dist.is_initialized():
        dist.barrier()
    x, y = load_cifar10(args.data_dir, download=False)
    return x, y, False


def agree(loss, grad_norm, out_of_time, stop_requested, world):
    """The step's one synchronisation: loss and gradient norm as floats (means over processes), and whether
    any process has run out of time or been asked to stop, so that all of them stop at the same step."""
    flags = torch.tensor([float(out_of_time), float(stop_requested)], device=loss.device)
    stats = torch.cat([loss.detach().float().view(1), grad_norm.float().view(1), flags])
    if world > 1:
        dist.all_reduce(stats)
    loss, grad_norm, late, stop = stats.tolist()
    return loss / world, grad_norm / world, late > 0, stop > 0


class StopRequests:
    """Ctrl-C (SIGINT) and SIGTERM (what a cluster scheduler sends before it kills a job) only raise a flag
    here; the training loop looks at it between steps, writes a checkpoint and exits cleanly. A second signal
    of the same kind acts as it would have without this (Ctrl-C twice interrupts at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Progress:
    """Mean loss and speed over each logging interval: printed, and appended to log.csv (rank 0 only)."""

    def __init__(self, log_path, global_batch, step, enabled):
        self.log_path, self.global_batch, self.enabled = log_path, global_batch, enabled
        self.losses, self.step, self.time = [], step, time.time()
        if enabled and (step == 0 or not os.path.exists(log_path)):
            with open(log_path, "w") as f:
                f.write("step,loss,lr,images_per_s,elapsed_s\n")
        elif enabled:  # resumed: drop the rows a crashed run wrote after its last checkpoint
            with open(log_path, newline="") as f:
                rows = list(csv.reader(f))
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) <= step])

    def add(self, loss):
        self.losses.append(loss)

    def pause(self, seconds):  # time spent on checkpoints and samples does not count against the speed
        self.time += seconds

    def report(self, step, lr, elapsed, time_left, total_steps):
        now = time.time()
        sec_per_step = (now - self.time) / (step - self.step)
        if total_steps:
            time_left = min(time_left, (total_steps - step) * sec_per_step)
        loss, speed = sum(self.losses) / len(self.losses), self.global_batch / sec_per_step
        if self.enabled:
            print(f"step {step}{f'/{total_steps}' if total_steps else ''} | loss {loss:.4f} | {speed:.0f} img/s | "
                  f"elapsed {fmt_time(elapsed)} | left {fmt_time(max(0, time_left))}", flush=True)
            with open(self.log_path, "a") as f:
                f.write(f"{step},{loss:.6f},{lr:.3e},{speed:.1f},{elapsed:.1f}\n")
        self.losses, self.step, self.time = [], step, now


# -----------------------------------------------------------------------------------------------------------
# Training

def main(argv=None):
    args, ckpt = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        fill_defaults(args, world)
        result = train(args, ckpt, rank, world, device)
        if dist.is_initialized():
            # Leave together: the other processes finish first (only rank 0 writes the last checkpoint, the
            # samples and the loss curve), and one tearing down its connections while a peer is still at work
            # has been seen to abort it (SIGABRT in the process-group shutdown) with all the work done.
            dist.barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, ckpt, rank, world, device):
    master, on_gpu = rank == 0, device.type == "cuda"
    say = print if master else (lambda *a, **k: None)
    if on_gpu:
        if args.model.startswith("DiG"):
            say(f"GLA kernel check passed: Triton vs reference, outputs and gradients in fp32 and bf16, worst "
                f"relative error {check_gla_kernel(device):.1e}")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    x_all, y_all, latent = load_data(args, rank)
    n, channels, size = len(x_all), x_all.shape[1], x_all.shape[-1]
    num_classes = int(y_all.max()) + 1 if latent else 10
    if on_gpu and x_all.numel() * x_all.element_size() < 2 ** 31:
        # Small data sets (CIFAR-10: 150 MB of uint8) live on the GPU: a step gathers its batch there, with no
        # copy from host memory that the GPU would wait for.
        x_all, y_all = x_all.to(device), y_all.to(device)
    if n < args.batch_size:
        raise SystemExit(f"error: {n} training examples are fewer than one batch ({args.batch_size})")
    classifier = load_classifier(args.classifier, device) if args.classifier and master else None
    if args.classifier and (latent or channels != 3 or size != 32):
        raise SystemExit("error: --classifier judges CIFAR-10 pixel samples only")

    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = build_model(args, size, channels, num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer(model, args)
    step, elapsed_before = 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        load_optimizer_state(opt, ckpt["opt"])
        step, elapsed_before = ckpt["step"], ckpt["elapsed"]
        say(f"resuming {args.resume} at step {step}")
    diffusion = dig.create_diffusion(timestep_respacing="")
    # The fast mode (see CompiledTrainStep). The EMA network gets its own compiled blocks for sampling.
    fast = on_gpu and not args.eager
    sample_net = GraphedDenoiser(dig.compile_blocks(ema)) if fast else ema
    if args.sample is not None:
        return more_samples(sample_net, classifier, x_all, num_classes, latent, step, args, device)

    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if ckpt is None and os.path.exists(ckpt_path):   # never start over on top of another run's work
        raise SystemExit(f"error: {args.out} already holds a run ({ckpt_path}); continue it with --resume "
                         f"{args.out}, or give another --out")
    os.makedirs(args.out, exist_ok=True)
    progress = Progress(os.path.join(args.out, "log.csv"), args.batch_size, step, enabled=master)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{args.model} ({len(model.blocks)} blocks, {n_params / 1e6:.2f}M parameters) | {n} "
        f"{'latents' if latent else 'images'} {channels}x{size}x{size}, {num_classes} classes | "
        f"{world} process(es) on {device.type} | global batch {args.batch_size} | out {args.out}")

    # budget comes from the checkpoint, so every process agrees on it.
    budget = args.minutes * 60 - elapsed_before if args.minutes is not None else math.inf
    t_start = time.time()
    elapsed = lambda: elapsed_before + time.time() - t_start
    last_ckpt_step = step
    sample_labels = grid_labels(num_classes, 10, device)
    generator = torch.Generator(device=device)
    batch = lambda s: draw_batch(x_all, y_all, s, args, rank, world, device, latent, diffusion.num_timesteps,
                                 model.y_embedder.dropout_prob, generator)
    if fast:
        t_compile = time.time()
        train_step = CompiledTrainStep(dig.compile_blocks(model), ema, opt, diffusion, args.grad_clip, world,
                                       example_batch=batch(step))
        say(f"compiled the blocks and captured the training step as a CUDA graph in {time.time() - t_compile:.0f} s "
            f"(part of the time budget)")
        progress.pause(time.time() - t_compile)
    else:
        train_step = TrainStep(model, ema, opt, diffusion, args.grad_clip, world)

    def save_state():
        nonlocal last_ckpt_step
        if master:
            save_checkpoint(ckpt_path, model, ema, opt, step, elapsed(), args)
        last_ckpt_step = step

    def save_samples():
        if master:
            save_grid(generate(sample_net, sample_labels, args, device, seed=args.seed),
                      os.path.join(args.out, f"samples_{step:07d}.png"), ncol=10, latent=latent)

    with StopRequests() as stop_requests:
        while (args.steps is None or step < args.steps) and budget > 0:
            # 1. forward and backward on this step's batch; loss and gradients averaged over processes
            loss, grad_norm = train_step(batch(step))
            loss, grad_norm, time_up, stop = agree(loss, grad_norm, time.time() - t_start > budget,
                                                   stop_requests.received is not None, world)
            # 2. stop before a non-finite update spoils the weights
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = (f"The last good checkpoint is {ckpt_path} (step {last_ckpt_step}); no checkpoint was "
                        f"written after it." if os.path.exists(ckpt_path) else "No checkpoint was written yet.")
                raise SystemExit(f"error: loss {loss} (gradient norm {grad_norm}) at step {step + 1}: stopping. "
                                 f"{last} Try a lower --lr, or --resume {args.out} with another --seed.")
            # 3. clip, AdamW, EMA
            lr = learning_rate(step, args)
            train_step.update(lr, ema_decay(step, args.ema))
            step += 1
            progress.add(loss)

            # 4. log, checkpoint, samples; stop when asked to (a signal) or out of time
            if step % args.log_every == 0 or step == args.steps or time_up or stop:
                progress.report(step, lr, elapsed(), budget - (time.time() - t_start), args.steps)
            t_pause = time.time()
            if (args.ckpt_every and step % args.ckpt_every == 0) or stop:
                save_state()
            if stop:
                say(f"stopped by {stop_requests.received or 'a signal to another process'} after step {step}; "
                    f"checkpoint {ckpt_path}. Continue with: python train_tiny.py --resume {args.out}")
                return dict(step=step, ckpt=ckpt_path, out=args.out, stopped=True)
            if args.sample_every and step % args.sample_every == 0:
                save_samples()
            progress.pause(time.time() - t_pause)
            if time_up:
                break
        # The end: a final checkpoint (still shielded from Ctrl-C and SIGTERM) and sample grid (unless this
        # step already has them), the loss curve, and with --classifier the class accuracy and Frechet
        # distance of samples judged by the ResNet-56.
        if last_ckpt_step != step or not os.path.exists(ckpt_path):
            save_state()
    if not args.sample_every or step % args.sample_every:
        save_samples()
    result = dict(step=step, ckpt=ckpt_path, out=args.out)
    if master:
        plot_loss(os.path.join(args.out, "log.csv"), os.path.join(args.out, "loss.png"))
        say(f"done: {step} steps, {fmt_time(elapsed())}; checkpoint {ckpt_path}")
    if classifier is not None:
        labels = torch.arange(10).repeat_interleave(args.eval_per_class)
        scores = evaluate(sample_net, classifier, labels, x_all, args, device, "eval.json")
        result.update(scores)
    return result


def more_samples(net, classifier, x_all, num_classes, latent, step, args, device):
    """--sample N: N samples from the EMA weights of a run (labels 0, 1, ..., num_classes - 1, 0, 1, ...), as
    an .npz (uint8 NHWC images, or float latents, and labels) and a grid of the first 100; judged too with
    --classifier. Only the first process works; no training, no checkpoint."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return dict(step=step, out=args.out)
    labels = torch.arange(args.sample) % num_classes
    t0 = time.time()
    x = generate_many(net, labels, args, device)
    name = os.path.join(args.out, f"samples_{step:07d}_{args.sample}")
    arrays = dict(latents=x.numpy()) if latent else dict(images=x.permute(0, 2, 3, 1).numpy())
    np.savez(name + ".npz", labels=labels.numpy(), **arrays)
    save_grid(x[:100], name + ".png", ncol=min(10, len(x)), latent=latent)
    print(f"{args.sample} samples (cfg {args.cfg_scale}, {args.sample_steps} {args.sampler} steps) from step "
          f"{step} in {time.time() - t0:.0f} s: {name}.npz, {name}.png")
    result = dict(step=step, out=args.out, npz=name + ".npz")
    if classifier is not None:
        result.update(evaluate(net, classifier, labels, x_all, args, device, f"eval_{step:07d}_{args.sample}.json",
                               samples=x))
    return result


if __name__ == "__main__":
    main()

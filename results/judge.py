"""
Judge a run of train_tiny.py: samples from its EMA weights, scored by a pretrained CIFAR-10 ResNet-56.

    python results/judge.py runs/DiG-S-2 --classifier resnet56-4bfd9763.th     # 1,000 samples, 100 per class
    python results/judge.py runs/DiG-S-2 --classifier W --samples 2000 --cfg-scale 2   # train_tiny's sampling flags
    python results/judge.py runs/DiG-S-2 --samples 5000                         # samples only, no scores
    torchrun --nproc_per_node=4 results/judge.py runs/DiG-S-2 --classifier W    # the processes share the sampling

The samples (labels 0, 1, ..., 9, 0, 1, ...) go to the run's folder as samples_<tag>.npz (uint8 NHWC images, or
latents, and the labels) and a grid of the first 100; the scores to eval_<tag>.json. train_tiny.py's sampling
flags (--cfg-scale, --sample-steps, --sampler, --device, --eager, --data-dir, --out) apply; left out, a run's own.

The judge scores the samples twice: does the ResNet-56 see the class they were asked for, and how far are its 64
pooled features of the samples, as a Gaussian, from those of the training images (FID's Frechet distance, with
this network in place of Inception)? The network (He et al. 2015) has "option A" shortcuts (subsample by 2 and pad
the new channels with zeros: no weights) and is named as the public pretrained weights (akamaster's).
"""

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_tiny  # noqa: E402

# -----------------------------------------------------------------------------------------------------------
# The judge: the ResNet-56, its pooled features, the Frechet distance, and the scores


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        shortcut = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.extra // 2, self.extra // 2))
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + shortcut)


class ResNet56(nn.Module):
    def __init__(self, blocks_per_stage=9, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        stage = lambda cin, cout, stride: nn.Sequential(
            BasicBlock(cin, cout, stride), *[BasicBlock(cout, cout, 1) for _ in range(blocks_per_stage - 1)])
        self.layer1, self.layer2, self.layer3 = stage(16, 16, 1), stage(16, 32, 2), stage(32, 64, 2)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):  # x: RGB in [0, 1], [N, 3, 32, 32]
        return self.linear(self.features(x))

    def features(self, x):  # the 64 globally average-pooled features that the final Linear reads
        mean, std = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), x.new_tensor([0.229, 0.224, 0.225])
        x = F.relu(self.bn1(self.conv1((x - mean) / std.view(1, 3, 1, 1))))
        return self.layer3(self.layer2(self.layer1(x))).mean(dim=(2, 3))


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
def pooled_features(classifier, images, chunk=500):
    """The classifier's 64 pooled features of uint8 images [N, 3, 32, 32]: float32 [N, 64] on the CPU."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier.features(images[i:i + chunk].to(device).float() / 255).cpu()
                      for i in range(0, len(images), chunk)])


def gaussian_stats(features):
    """Mean and covariance (float64, numpy) of features [N, 64]."""
    features = features.double().numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2):
    """The Frechet (2-Wasserstein) distance between Gaussians N(mu1, cov1) and N(mu2, cov2), as in FID:
    |mu1 - mu2|^2 + Tr(cov1) + Tr(cov2) - 2 Tr((cov1^1/2 cov2 cov1^1/2)^1/2), in float64.

    The last trace is the sum of the singular values of cov1^1/2 cov2^1/2 (their squares are the eigenvalues of
    cov1^1/2 cov2 cov1^1/2), symmetric in the two Gaussians by construction. Each root comes from a symmetric
    eigendecomposition with negative eigenvalues (rounding) clipped to 0. Rounding can also take nearly equal
    Gaussians just below 0; a distance is never negative, so the result is clipped there too."""
    def root(cov):
        w, v = np.linalg.eigh(np.asarray(cov, dtype=np.float64))
        return (v * np.sqrt(w.clip(min=0))) @ v.T
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    trace_root = np.linalg.svd(root(cov1) @ root(cov2), compute_uv=False).sum()
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_root))


def judge(classifier, images, labels, reference_stats):
    """How the ResNet-56 sees uint8 samples [N,3,32,32] asked for `labels`: the fraction put in the class they
    were asked for (overall, and per class), and the Frechet distance between its pooled features of the
    samples and reference_stats (of the training images). Like FID with this classifier instead of Inception:
    0 for sets it sees alike; comparable only between equal numbers of samples (fewer give larger distances)."""
    features = pooled_features(classifier, images)   # one pass of the network serves both scores
    preds = classifier.linear(features.to(next(classifier.parameters()).device)).argmax(dim=1).cpu()
    per_class = [((preds == labels) & (labels == c)).sum().item() / max(1, (labels == c).sum().item())
                 for c in range(10)]
    fd = frechet_distance(*gaussian_stats(features), *reference_stats)
    return (preds == labels).float().mean().item(), per_class, fd


# -----------------------------------------------------------------------------------------------------------
# Samples from a run, shared between processes, and their scores


@contextlib.contextmanager
def run_network(run, *flags):
    """(args, EMA network, the network the sampler calls, step, data shape, rank, world) of a finished run;
    flags are train_tiny.py's, over the run's own settings."""
    args, ckpt = train_tiny.parse_args(["--resume", run, *flags])
    with train_tiny.processes(args.device) as (rank, world, device):
        train_tiny.settle_args(args, ckpt, world)
        _, ema, _, step, _ = train_tiny.build_run(args, ckpt, ckpt["data"], device)
        yield args, ema, train_tiny.sampling_network(ema, args), step, ckpt["data"], rank, world


def sample_and_judge(net, n, step, shape, args, rank, world, classifier=None, chunk=500):
    """n samples (labels 0, 1, ..., 0, 1, ...) saved as samples_<tag>.npz and a grid of the first 100, judged
    with the classifier's weights if given (eval_<tag>.json). Process i % world makes chunk i, from noise seeded
    by its position, so that the samples do not depend on the number of processes. Returns the .npz's path and
    the scores."""
    if classifier and (shape["latent"] or (shape["in_channels"], shape["input_size"]) != (3, 32)):
        raise SystemExit(f"error: the ResNet-56 judges CIFAR-10 pixel samples (3 x 32 x 32) only; this run makes "
                         f"{'latents' if shape['latent'] else 'images'} of {shape['in_channels']} x "
                         f"{shape['input_size']} x {shape['input_size']}")
    labels, mine, start = torch.arange(n) % shape["num_classes"], {}, time.time()
    for i in range(rank * chunk, n, world * chunk):
        if rank == 0:
            print(f"sampling images {i + 1} to {min(i + chunk, n)} of {n}", flush=True)
        x = train_tiny.generate(net, labels[i:i + chunk].to(next(net.parameters()).device), args, args.seed + 1 + i,
                                progress=rank == 0)
        mine[i] = x.cpu() if shape["latent"] else train_tiny.to_uint8(x).cpu()
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        mine = {i: x for part in everyone for i, x in part.items()}
    samples, seconds = torch.cat([mine[i] for i in sorted(mine)]), time.time() - start
    tag = f"{step:07d}_n{n}_cfg{args.cfg_scale:g}_{args.sampler}{args.sample_steps}"
    path = os.path.join(args.out, f"samples_{tag}")

    def save_and_judge():
        arrays = dict(latents=samples.numpy()) if shape["latent"] else dict(images=samples.permute(0, 2, 3, 1).numpy())
        np.savez(path + ".npz", labels=labels.numpy(), **arrays)
        train_tiny.save_grid(samples[:100], path + ".png", ncol=min(10, n), latent=shape["latent"])
        print(f"{n} samples in {seconds:.0f} s: {path}.npz and .png", flush=True)
        if not classifier:
            return dict(npz=path + ".npz")
        return dict(npz=path + ".npz", **evaluate(samples, labels, seconds, args, classifier, f"eval_{tag}.json"))
    return train_tiny.on_rank0(save_and_judge, rank, world)


_references = {}


def classifier_and_reference(classifier, args):
    """The ResNet-56 and the Gaussian of its features of the training images (and their number): made once per
    process for a weights file, data folder and device, and kept, as ablate.py judges several EMAs of a run."""
    key = (os.path.abspath(classifier), os.path.getmtime(classifier), os.path.abspath(args.data_dir), args.device)
    if key not in _references:
        net = load_classifier(classifier, torch.device(args.device))
        images = train_tiny.load_data(args, 0, 1, torch.device("cpu")).x
        _references[key] = net, gaussian_stats(pooled_features(net, images)), len(images)
    return _references[key]


def evaluate(samples, labels, seconds, args, classifier, out_name):
    """Judge uint8 samples against the training images: print, write out_name in args.out, return the scores."""
    net, reference, n_reference = classifier_and_reference(classifier, args)
    print(f"judging {len(samples)} samples with the ResNet-56 (and the {n_reference} training images)", flush=True)
    acc, per_class, fd = judge(net, samples, labels, reference)
    print(f"ResNet-56 finds the requested class in {100 * acc:.1f}% of {len(labels)} EMA samples (cfg "
          f"{args.cfg_scale}, {args.sample_steps} {args.sampler} steps); Frechet distance of its features to "
          f"the training images' {fd:.2f}; per class (%): " + " ".join(f"{100 * a:.0f}" for a in per_class))
    result = dict(accuracy=acc, per_class=per_class, frechet_distance=fd, samples=len(labels),
                  sampling_seconds=round(seconds, 1), cfg_scale=args.cfg_scale, sample_steps=args.sample_steps,
                  sampler=args.sampler)
    with open(os.path.join(args.out, out_name), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None):
    """Sample (and judge) a run as the command line says; returns the .npz's path and the scores."""
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0], epilog="Other flags are train_tiny.py's "
                                "sampling flags (--cfg-scale, --sample-steps, --sampler, --device, --eager, ...).")
    p.add_argument("run", help="a run's folder (or its ckpt.pt), as train_tiny.py --resume takes it")
    p.add_argument("--samples", type=train_tiny.positive_count, default=1000, help="how many samples (default 1000)")
    p.add_argument("--classifier", help="CIFAR-10 ResNet-56 weights (resnet56-4bfd9763.th): judge the samples")
    opts, flags = p.parse_known_args(argv)
    if opts.classifier and not os.path.isfile(opts.classifier):
        raise SystemExit(f"error: --classifier {opts.classifier}: no such file")
    with run_network(opts.run, *flags) as (args, _, net, step, shape, rank, world):   # settle_args made args.out
        return sample_and_judge(net, opts.samples, step, shape, args, rank, world, opts.classifier)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)     # as train_tiny.py: skip the interpreter's teardown, which can abort under torchrun with gloo

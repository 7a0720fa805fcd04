"""
Recipe ablations for train_tiny.py on CIFAR-10: short runs judged like the README's six-minute runs (2,000 EMA
samples, 100 DDPM steps, the ResNet-56's class accuracy and Frechet distance), and a guidance sweep of a run.

    python results/ablate.py train --steps 2000 --data-dir data --classifier resnet56-4bfd9763.th \
        base="--warmup 300" wsd="--warmup 300 --decay 0.3" ...
    python results/ablate.py guidance runs/DiG-S-2-6min --classifier resnet56-4bfd9763.th --cfg 1.5 2 3 4 \
        --sample-steps 100
    python results/ablate.py table runs/ablate > results/ablations.md

`train` runs every variant (name="train_tiny flags") for the same number of steps, several side by side on the
GPU (a fixed step count makes the result independent of how the GPU is shared). Each run also keeps EMAs whose
warm-up differs from train_tiny's, decay_c(step) = min(ema, (1 + step) / (c + step)) for each c of --ema-warmups
(train_tiny's own is c = 10: the EMA spans about the last step / 9 updates), and judges each of them too.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_tiny  # noqa: E402
from results.judge import run_network, sample_and_judge  # noqa: E402


def train_variant(out, argv, ema_warmups, eval_per_class, classifier):
    """One run of train_tiny.main with extra EMAs tracked beside its own; then every EMA judged."""
    extra, steps = {}, [0]
    main_update = train_tiny.update_ema

    def update_ema(ema_params, model_params, decay):    # called once per step, after AdamW (TrainStep.update)
        if not extra:    # the first call: every EMA starts from the initial weights, as train_tiny's does
            extra.update({c: [p.clone() for p in ema_params] for c in ema_warmups})
        for c, params in extra.items():
            main_update(params, model_params, min(args.ema, (1 + steps[0]) / (c + steps[0])))
        main_update(ema_params, model_params, decay)
        steps[0] += 1
    train_tiny.update_ema = update_ema
    args, _ = train_tiny.parse_args(argv)
    train_tiny.settle_args(args, None, 1)
    train_tiny.main(argv)
    results = {}
    # train_tiny's own EMA (c = 10), then the extra ones, their weights copied into the run's EMA network
    with run_network(out) as (args, ema, net, step, shape, rank, world):
        for c, params in [(10, None), *extra.items()]:
            if params is not None:
                with torch.no_grad():
                    torch._foreach_copy_(list(ema.parameters()), params)
                args.out = os.path.join(out, f"ema_warmup{c}")
                os.makedirs(args.out, exist_ok=True)
            scores = sample_and_judge(net, 10 * eval_per_class, step, shape, args, rank, world, classifier)
            results[c] = {k: scores[k] for k in ("accuracy", "frechet_distance")}
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(dict(argv=argv, step=step, cfg_scale=args.cfg_scale, sample_steps=args.sample_steps,
                       ema_warmup=results), f, indent=1)
    return results


def train(opts):
    """Every variant as its own process, --parallel at a time; their outputs in <out>/<name>.txt."""
    pending, running = list(opts.variants), []
    os.makedirs(opts.out, exist_ok=True)
    while pending or running:
        while pending and len(running) < opts.parallel:
            name, flags = pending.pop(0).split("=", 1)
            out = os.path.join(opts.out, name)
            argv = ["--steps", str(opts.steps), "--data-dir", opts.data_dir, "--sample-every", "0", "--out", out,
                    *flags.split()]
            cmd = [sys.executable, __file__, "one", out, json.dumps(argv), *map(str, opts.ema_warmups),
                   "--eval-per-class", str(opts.eval_per_class), "--classifier", opts.classifier]
            log = open(os.path.join(opts.out, f"{name}.txt"), "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time()))
            print(f"started {name}: train_tiny.py {' '.join(argv)}", flush=True)
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            print(f"{item[0]} finished with status {item[1].returncode} in {time.time() - item[2]:.0f} s",
                  flush=True)


def guidance(opts):
    """One run's EMA network judged at every guidance scale and number of sampling steps asked for."""
    n = 10 * opts.eval_per_class
    with run_network(opts.run) as (args, _, net, step, shape, rank, world):
        args.out = os.path.join(opts.run, "guidance")
        os.makedirs(args.out, exist_ok=True)
        for steps in opts.sample_steps:
            for cfg in opts.cfg:
                args.cfg_scale, args.sample_steps = cfg, steps
                sample_and_judge(net, n, step, shape, args, rank, world, opts.classifier)


def table(opts):
    """A markdown table of every ablation.json and eval_*.json under the folder."""
    print("| run | flags | steps | EMA warm-up c | guidance | sampling steps | class accuracy | Frechet distance |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(opts.folder, "**", "ablation.json"), recursive=True)):
        r = json.load(open(path))
        flags = " ".join(a for a in r["argv"][r["argv"].index("--out") + 2:])
        for c, s in sorted(r["ema_warmup"].items(), key=lambda kv: int(kv[0])):
            print(f"| {os.path.basename(os.path.dirname(path))} | `{flags}` | {r['step']} | {c} | {r['cfg_scale']:g} | "
                  f"{r['sample_steps']} | "
                  f"{100 * s['accuracy']:.1f}% | {s['frechet_distance']:.2f} |")
    for path in sorted(glob.glob(os.path.join(opts.folder, "**", "eval_*_n*.json"), recursive=True)):
        if "ema_warmup" in path or os.path.exists(os.path.join(os.path.dirname(path), "ablation.json")):
            continue
        s = json.load(open(path))
        print(f"| {os.path.relpath(os.path.dirname(path), opts.folder)} | | {path.split('_')[-4]} | 10 | "
              f"{s['cfg_scale']:g} | {s['sample_steps']} | {100 * s['accuracy']:.1f}% | "
              f"{s['frechet_distance']:.2f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("variants", nargs="+", help='name="train_tiny flags"')
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--parallel", type=int, default=3)
    t.add_argument("--ema-warmups", type=int, nargs="*", default=[3, 30])
    t.add_argument("--data-dir", default="data")
    t.add_argument("--classifier", required=True)
    t.add_argument("--eval-per-class", type=int, default=200)
    t.add_argument("--out", default="runs/ablate")
    o = sub.add_parser("one")     # one variant, in its own process (started by `train`)
    o.add_argument("out")
    o.add_argument("argv")
    o.add_argument("ema_warmups", type=int, nargs="*")
    o.add_argument("--eval-per-class", type=int, default=200)
    o.add_argument("--classifier", required=True)
    g = sub.add_parser("guidance")
    g.add_argument("run")
    g.add_argument("--classifier", required=True)
    g.add_argument("--cfg", type=float, nargs="+", default=[1.5, 2, 3, 4, 5])
    g.add_argument("--sample-steps", type=int, nargs="+", default=[100])
    g.add_argument("--eval-per-class", type=int, default=200)
    s = sub.add_parser("table")
    s.add_argument("folder")
    opts = p.parse_args()
    if opts.what == "one":
        train_variant(opts.out, json.loads(opts.argv), opts.ema_warmups, opts.eval_per_class, opts.classifier)
    else:
        dict(train=train, guidance=guidance, table=table)[opts.what](opts)

"""
One training step of DiG against DiT, side by side, on a GPU: the table in the README.

    python results/bench_model.py                        # S/2 at 256, 1024, 1792, 2048 px; XL/2 at 2048 px
    python results/bench_model.py --cifar                # S/2 at 256 tokens (CIFAR-10's), batch 256 and 64
    python results/bench_model.py --profile 256          # GPU time of one DiG-S/2 step, op by op
    python results/bench_model.py --profile 256 --model DiT-S/2 --batch 256

A step is train_tiny.py's default GPU step (CompiledTrainStep: every block compiled, forward and backward replayed
from one CUDA graph, then clipping, fused AdamW and the EMA) on random latents of 4 x px/8 x px/8 (a Stable
Diffusion VAE's), under bf16 autocast, for DiG, DiT with softmax attention through SDPA (FlashAttention), and DiT
with materialised attention (softmax(QK^T)V written out, the quadratic memory). S/2 runs 16,384 tokens per step
(12,544 at 1792 px), XL/2 one 2048 px image; DiT-XL/2 with materialised attention cannot fit and is not run.
Times are medians of triton.testing.do_bench; memory is torch.cuda.max_memory_allocated above what was there.
"""

import argparse
import copy
import functools
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dig  # noqa: E402
import train_tiny  # noqa: E402

RUNS = [("S/2", 256, 64), ("S/2", 1024, 4), ("S/2", 1792, 1), ("S/2", 2048, 1), ("XL/2", 2048, 1)]
CIFAR_RUNS = [("S/2", 256, 256), ("S/2", 256, 64)]    # 256 tokens: train_tiny's default model and batch, and 64
MODELS = {"DiG": lambda size: dig.DiG_models[f"DiG-{size}"],
          "DiT-SDPA": lambda size: dig.DiT_models[f"DiT-{size}"],
          "DiT-mat": lambda size: functools.partial(dig.DiT_models[f"DiT-{size}"], attention="materialized")}


def train_step(make_model, px, batch):
    """(step, batch): train_tiny's compiled training step for a fresh model, and a random batch of latents."""
    device = torch.device("cuda")
    with device:
        model = make_model(input_size=px // 8, in_channels=4, num_classes=1000).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)
    x = torch.randn(batch, 4, px // 8, px // 8, device=device)
    data = dict(x=x, y=torch.randint(0, 1000, (batch,), device=device), t=torch.randint(0, 1000, (batch,), device=device),
                noise=torch.randn_like(x), drop=torch.rand(batch, device=device) < 0.1)
    step = train_tiny.CompiledTrainStep(dig.compile_blocks(model), ema, opt, dig.create_diffusion(), 1.0, 1, data)

    def one_step():
        step(data)
        step.update(1e-4, 0.9999)
    return one_step


def measure(make_model, px, batch):
    """(ms per step, peak GiB) of one model at one resolution."""
    import triton.testing
    torch._dynamo.reset()                          # forget the last model's compiled blocks (and its tensors)
    gc.collect()                                   # a failed (out of memory) step's tensors die with its traceback
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step = train_step(make_model, px, batch)
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30   # before do_bench adds its flush buffer
    return triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median"), peak


def bench(runs=RUNS, models=MODELS):
    rows = []
    for size, px, batch in runs:
        results = {}
        for name, make in models.items():
            if name == "DiT-mat" and size == "XL/2":   # its T x T attention weights need far more than a GPU has
                results[name] = "not run"
                continue
            try:
                results[name] = measure(make(size), px, batch)
                print(f"{name:>9} {size:>4} {px:5d} px batch {batch:3d}: {results[name][0]:8.1f} ms "
                      f"{results[name][1]:6.1f} GiB", flush=True)
            except torch.cuda.OutOfMemoryError:
                results[name] = "OOM"
                print(f"{name:>9} {size:>4} {px:5d} px batch {batch:3d}: out of memory", flush=True)
        rows.append((size, px, batch, results))
    print(f"\nOne training step of train_tiny.py (compiled, CUDA graph, fused AdamW + EMA), bf16 autocast, latents "
          f"4 x px/8 x px/8; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("per model: median ms per step, images per second, peak GiB\n")
    print(f"{'model':>5} {'px':>5} {'batch':>5}" + "".join(f" | {name + ' ms':>12} {'img/s':>7} {'GiB':>5}"
                                                        for name in models) + " | DiT-SDPA ms / DiG ms")
    for size, px, batch, results in rows:
        line = f"{size:>5} {px:5d} {batch:5d}"
        for name in models:
            r = results[name]
            line += f" | {r:>26}" if isinstance(r, str) else f" | {r[0]:12.1f} {1000 * batch / r[0]:7.1f} {r[1]:5.1f}"
        dig_r, sdpa_r = results["DiG"], results["DiT-SDPA"]
        print(line + (f" | {sdpa_r[0] / dig_r[0]:.2f}x" if not isinstance(dig_r, str) and not isinstance(sdpa_r, str)
                      else " | -"))


def profile(px, name, batch):
    """torch.profiler on one step; prints the ops that take the most GPU time."""
    registry = dig.DiG_models if name.startswith("DiG") else dig.DiT_models
    batch = batch or max(1, 16384 // (px // 8 // registry[name].keywords["patch_size"]) ** 2)
    step = train_step(registry[name], px, batch)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"{name} at {px} px, batch {batch}, train_tiny's compiled step, {torch.cuda.get_device_name()}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DiG vs DiT training steps on a GPU, or the profile of one")
    parser.add_argument("--profile", type=int, metavar="PX", help="profile one training step at PX pixels")
    parser.add_argument("--model", default="DiG-S/2", help="model for --profile, e.g. DiG-XL/2 or DiT-S/2")
    parser.add_argument("--batch", type=int, help="batch for --profile (default: 16384 tokens per step)")
    parser.add_argument("--cifar", action="store_true", help="only S/2 at 256 tokens, batch 256 and 64, DiG and DiT")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU; `pytest test_dig.py` checks correctness on a CPU")
    if args.profile:
        profile(args.profile, args.model, args.batch)
    elif args.cifar:
        bench(CIFAR_RUNS, {name: MODELS[name] for name in ("DiG", "DiT-SDPA")})
    else:
        bench()

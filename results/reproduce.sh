#!/usr/bin/env bash
# Regenerates the README's results on a CUDA machine. Each part runs alone (on one GPU; scaling on two) and
# writes its printed output to results/, headed by the card, the versions and the commit:
#
#   bash results/reproduce.sh tests         # pytest -n 8 test_dig.py on the GPU (8 processes, WORKERS=0 for
#                                           #   one), from empty compile caches -> results/tests_gpu.txt
#   bash results/reproduce.sh kernel        # python gla_kernel.py --paths (kernel, both paths, SDPA)
#                                           #   -> results/gla_bench.txt
#   bash results/reproduce.sh model         # python results/bench_model.py (DiG vs DiT training steps)
#                                           #   -> results/model_bench.txt
#   bash results/reproduce.sh cifar-step    # the same at CIFAR-10's 256 tokens, batch 256 and 64
#                                           #   -> results/model_bench_cifar.txt
#   bash results/reproduce.sh train DiG-S/2 # 6 minutes of train_tiny.py, 2,000 samples judged by the ResNet-56
#                                           #   -> results/train_DiG-S-2.* (output, log, scores, grid, curve)
#   bash results/reproduce.sh train DiT-S/2 # the DiT twin, same recipe and time
#   bash results/reproduce.sh scaling       # images/s of 2 GPUs (torchrun) vs 1 GPU  -> results/scaling.txt
#   bash results/reproduce.sh ablate        # recipe variants at 1,800 steps, 3 side by side (results/ablate.py)
#                                           #   -> results/ablation_runs.md
#   bash results/reproduce.sh guidance RUN  # a run's EMA judged at guidance 1.5, 2, 4, 5 -> results/guidance.md
#
# The training parts read CIFAR-10 from data/cifar-10-batches-py (downloaded if missing, see train_tiny.py)
# and the ResNet-56 weights from resnet56-4bfd9763.th (or $RESNET56). Parts use the GPUs that
# CUDA_VISIBLE_DEVICES names, so independent parts can run side by side on a machine with several.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
RESULTS=${RESULTS:-results}
RESNET56=${RESNET56:-resnet56-4bfd9763.th}
MINUTES=${MINUTES:-6}
WORKERS=${WORKERS:-8}
export SCALE_MINUTES=${SCALE_MINUTES:-1.5}
mkdir -p "$RESULTS"

header() {   # card, versions and commit, at the top of every result file
    python3 - "$@" <<'PY'
import subprocess, sys, torch, triton
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
import os
commit = os.environ.get("DIG_COMMIT") or commit or "unknown"
gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"
print(f"# {' '.join(sys.argv[1:])}\n# {gpus} | torch {torch.__version__} | triton {triton.__version__} | commit {commit}")
PY
}

run_part() {   # run_part FILE COMMAND...: the header, then the command's output, into FILE and the terminal
    local file=$1; shift
    { header "$@"; "$@" 2>&1; } | tee "$RESULTS/$file"
}

train_and_judge() {   # train_and_judge OUT TRAIN_TINY_FLAGS...: the run, then 2,000 of its samples judged
    local out=$1; shift
    python3 train_tiny.py --data-dir data --out "$out" "$@"
    python3 results/judge.py "$out" --classifier "$RESNET56" --samples 2000
}

train() {   # results/train_<model>.* for the six-minute run; MINUTES=15 makes train_<model>-15min.*
    local model=$1 name=${1//\//-}
    [ "$MINUTES" = 6 ] || name=$name-${MINUTES}min
    local out=runs/${1//\//-}-${MINUTES}min
    rm -rf "$out"
    # shellcheck disable=SC2086
    run_part "train_$name.txt" train_and_judge "$out" --model "$model" --minutes "$MINUTES" ${TRAIN_FLAGS:-}
    cp "$out/log.csv" "$RESULTS/train_$name.csv"
    cp "$out"/eval_*.json "$RESULTS/train_$name.eval.json"
    cp "$(ls "$out"/samples_???????.png | tail -n 1)" "$RESULTS/train_${name}_samples.png"
    cp "$out/loss.png" "$RESULTS/train_${name}_loss.png"
}

scaling() {   # the default DiG run for SCALE_MINUTES on 1 GPU, then on 2 GPUs; images/s from their logs
    local gpus=${CUDA_VISIBLE_DEVICES:-0,1}
    rm -rf runs/scaling-1gpu runs/scaling-2gpu && mkdir -p runs
    CUDA_VISIBLE_DEVICES=${gpus%%,*} python3 train_tiny.py --data-dir data --minutes "$SCALE_MINUTES" --sample-every 0 \
        --log-every 25 --out runs/scaling-1gpu > runs/scaling-1gpu.txt 2>&1
    CUDA_VISIBLE_DEVICES=$gpus torchrun --standalone --nproc_per_node=2 train_tiny.py --data-dir data \
        --minutes "$SCALE_MINUTES" --sample-every 0 --log-every 25 --out runs/scaling-2gpu > runs/scaling-2gpu.txt 2>&1
    { header scaling; python3 - <<'PY'
import csv, os
def speed(run):   # images/s over the second half of the logged steps (compilation and warm-up excluded)
    rows = list(csv.DictReader(open(f"runs/{run}/log.csv")))
    rows = rows[len(rows) // 2:]
    return sum(float(r["images_per_s"]) for r in rows) / len(rows), int(rows[-1]["step"])
one, two = speed("scaling-1gpu"), speed("scaling-2gpu")
print(f"DiG-S/2, global batch 256, {os.environ['SCALE_MINUTES']} minutes: 1 GPU {one[0]:.0f} images/s ({one[1]} steps), "
      f"2 GPUs {two[0]:.0f} images/s ({two[1]} steps): {two[0] / one[0]:.2f}x")
PY
    } | tee "$RESULTS/scaling.txt"
}

case "${1:-}" in
    tests)   # the whole suite as a user runs it, with empty Triton and Inductor caches: compilation included.
             # pytest-xdist spreads it over processes, which compile Triton and Inductor kernels side by side.
             export TRITON_CACHE_DIR=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
             { header pytest -n "$WORKERS" test_dig.py
               python3 -m pytest -n "$WORKERS" test_dig.py -q -rs --durations=30 -p no:cacheprovider 2>&1; } \
                 | tee "$RESULTS/tests_gpu.txt" ;;
    kernel)  run_part gla_bench.txt python3 gla_kernel.py --paths ;;
    model)   run_part model_bench.txt python3 results/bench_model.py ;;
    cifar-step) run_part model_bench_cifar.txt python3 results/bench_model.py --cifar ;;
    train)   train "${2:?which model, e.g. DiG-S/2 or DiT-S/2}" ;;
    scaling) scaling ;;
    ablate)  python3 results/ablate.py train --steps 1800 --parallel 3 --ema-warmups 3 30 --data-dir data \
                 --classifier "$RESNET56" --out runs/ablate base="--warmup 300 --lr 6e-4 --decay 0" \
                 wsd="--warmup 300 --lr 6e-4 --decay 0.3" wsd_lr12="--warmup 300 --lr 1.2e-3 --decay 0.3"
             { header ablate; python3 results/ablate.py table runs/ablate; } | tee "$RESULTS/ablation_runs.md" ;;
    guidance) python3 results/ablate.py guidance "${2:?a run folder, e.g. runs/DiG-S-2-6min}" --classifier "$RESNET56"
             { header guidance "$2"; python3 results/ablate.py table "$2"; } | tee "$RESULTS/guidance.md" ;;
    *)       sed -n '2,23p' "$0"; exit 2 ;;
esac

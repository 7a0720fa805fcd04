"""Tests of train_tiny.py: data loading, a smoke run, exact resume, NaN stop, bad checkpoints, latents, two
processes under torchrun (gloo), the kernel check and the ResNet-56 judge. Tiny models and datasets; the
training runs use the CPU (bitwise-exact resume needs deterministic kernels), plus one smoke run on a GPU
when there is one."""
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel check runs in Triton's interpreter; before import

from PIL import Image

import train_tiny

HERE = os.path.dirname(os.path.abspath(__file__))
# A DiG small enough for a CPU: 4 blocks, width 64, one head, 4x4 patches (64 tokens for 32x32 images).
TINY = ["--model", "DiG-S/4", "--depth", "4", "--hidden-size", "64", "--num-heads", "1", "--batch-size", "8",
        "--lr", "1e-3", "--warmup", "2", "--ema", "0.9", "--sample-steps", "2", "--log-every", "1",
        "--device", "cpu"]


def write_cifar(root, n_per_batch=(120, 80), seed=0):
    """Random images and labels in the official cifar-10-batches-py layout; returns (data, labels)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    xs, ys = [], []
    for i, n in enumerate(n_per_batch, start=1):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": b"test"}, f, protocol=2)
        xs.append(x)
        ys += y
    return np.concatenate(xs), np.array(ys)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_cifar(root)
    return root


@pytest.fixture(scope="module")
def smoke_run(cifar_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smoke"))
    result = train_tiny.main(TINY + ["--data-dir", cifar_dir, "--out", out, "--steps", "4",
                                     "--ckpt-every", "2", "--sample-every", "2"])
    return out, result


def weights(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


# --- data -----------------------------------------------------------------------------------------------------

def test_cifar_loader_reads_official_layout(tmp_path):
    data, labels = write_cifar(str(tmp_path))
    x, y = train_tiny.load_cifar10(str(tmp_path), download=False)
    assert x.dtype == torch.uint8 and x.shape == (200, 3, 32, 32)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    # rows are 1024 red, 1024 green, 1024 blue values, each plane row-major
    assert x[7, 1, 3, 5] == data[7, 1024 + 3 * 32 + 5]
    assert torch.equal(x.reshape(200, -1), torch.from_numpy(data))


def test_cifar_missing_folder_error(tmp_path):
    with pytest.raises(SystemExit, match="cifar-10-batches-py"):
        train_tiny.load_cifar10(str(tmp_path / "nowhere"), download=False)


def test_cifar_download_failure_says_where_to_put_files(tmp_path, monkeypatch):
    monkeypatch.setattr(train_tiny, "CIFAR_URL", (tmp_path / "no-such-archive.tar.gz").as_uri())
    with pytest.raises(SystemExit, match="DATA_DIR"):
        train_tiny.load_cifar10(str(tmp_path / "data"))


def test_cifar_download_checks_md5(tmp_path, monkeypatch):
    fake = tmp_path / "fake.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(__file__, arcname="cifar-10-batches-py/data_batch_1")
    monkeypatch.setattr(train_tiny, "CIFAR_URL", fake.as_uri())
    with pytest.raises(SystemExit, match="MD5"):
        train_tiny.load_cifar10(str(tmp_path / "data"))
    assert not (tmp_path / "data" / "cifar-10-python.tar.gz").exists()  # deleted, so a rerun retries


def test_cifar_corrupt_file_is_named(tmp_path):
    write_cifar(str(tmp_path))
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="data_batch_2"):
        train_tiny.load_cifar10(str(tmp_path), download=False)


# --- training -------------------------------------------------------------------------------------------------

def test_smoke_run_writes_checkpoint_samples_and_log(smoke_run):
    out, result = smoke_run
    assert result["step"] == 4
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["args"]["model"] == "DiG-S/4"
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values() if v.is_floating_point())
    for name in ("samples_0000002.png", "samples_0000004.png", "loss.png"):
        assert Image.open(os.path.join(out, name)).size[0] > 0
    assert Image.open(os.path.join(out, "samples_0000004.png")).size == (10 * 34 + 2, 10 * 34 + 2)
    rows = train_tiny.read_log(os.path.join(out, "log.csv"))
    assert [s for s, _ in rows] == [1, 2, 3, 4]


def test_time_budget_stops_the_run(cifar_dir, tmp_path):
    out = str(tmp_path / "timed")
    result = train_tiny.main(TINY + ["--data-dir", cifar_dir, "--out", out, "--minutes", "0"])
    assert result["step"] == 1  # out of time after the first step; checkpoint and samples still written
    assert os.path.exists(os.path.join(out, "ckpt.pt")) and os.path.exists(os.path.join(out, "samples_0000001.png"))


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_gpu_smoke_run(cifar_dir, tmp_path):  # bf16 autocast, and the kernel check before training
    out = str(tmp_path / "gpu")
    argv = TINY[:-1] + ["cuda", "--data-dir", cifar_dir, "--out", out, "--steps", "3"]
    assert train_tiny.main(argv)["step"] == 3
    assert os.path.exists(os.path.join(out, "samples_0000003.png"))


def test_resume_matches_uninterrupted_run(cifar_dir, tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    base = TINY + ["--data-dir", cifar_dir, "--sample-every", "0"]
    train_tiny.main(base + ["--out", straight, "--steps", "6"])
    train_tiny.main(base + ["--out", split, "--steps", "3"])
    train_tiny.main(base + ["--resume", split, "--steps", "6"])
    for key in ("model", "ema"):
        a, b = weights(os.path.join(straight, "ckpt.pt"), key), weights(os.path.join(split, "ckpt.pt"), key)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{key}.{name} differs after resume"
    assert [s for s, _ in train_tiny.read_log(os.path.join(split, "log.csv"))] == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cifar_dir, tmp_path, monkeypatch):
    real = train_tiny.dig.create_diffusion

    def poisoned(**kwargs):  # the 5th training step sees a NaN loss
        diffusion, calls = real(**kwargs), []
        clean = diffusion.training_losses

        def training_losses(*a, **k):
            out = clean(*a, **k)
            calls.append(1)
            if len(calls) == 5:
                out["loss"] = out["loss"] * float("nan")
            return out
        diffusion.training_losses = training_losses
        return diffusion

    monkeypatch.setattr(train_tiny.dig, "create_diffusion", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match=r"(?s)nan.*step 5.*step 4"):
        train_tiny.main(TINY + ["--data-dir", cifar_dir, "--out", out, "--steps", "8", "--ckpt-every", "2",
                                "--sample-every", "0"])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_corrupt_or_missing_checkpoint_errors(smoke_run, tmp_path):
    good = os.path.join(smoke_run[0], "ckpt.pt")
    truncated = tmp_path / "ckpt.pt"
    truncated.write_bytes(open(good, "rb").read()[:5000])
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        train_tiny.main(["--resume", str(truncated), "--steps", "5"])
    with pytest.raises(SystemExit, match="does not exist"):
        train_tiny.main(["--resume", str(tmp_path / "missing.pt"), "--steps", "5"])
    with pytest.raises(SystemExit, match="continues that network"):
        train_tiny.main(["--resume", good, "--model", "DiT-S/4"])


def test_latents_run(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "latents.npz")
    np.savez(path, latents=rng.standard_normal((48, 4, 8, 8)).astype(np.float32),
             labels=rng.integers(0, 5, 48))
    out = str(tmp_path / "lat")
    tiny = TINY[:1] + ["DiG-S/2"] + TINY[2:]  # 8x8 latents in 2x2 patches: 16 tokens
    result = train_tiny.main(tiny + ["--latents", path, "--out", out, "--steps", "3"])
    assert result["step"] == 3
    model = weights(os.path.join(out, "ckpt.pt"))
    assert any(v.ndim == 4 and v.shape[1] == 4 for v in model.values())  # the patch embedding takes 4 channels
    # 5 classes, 10 samples each; 8x8 latents are enlarged 4x to 32x32 tiles
    assert Image.open(os.path.join(out, "samples_0000003.png")).size == (10 * 34 + 2, 5 * 34 + 2)


def test_torchrun_two_processes_gloo(cifar_dir, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train_tiny.py")] + TINY + ["--data-dir", cifar_dir, "--out", out, "--steps", "2"]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)["step"] == 2


# --- the kernel check ---------------------------------------------------------------------------------------

def test_gla_kernel_check_passes():  # on a CPU: fp32 in Triton's interpreter (it has no bf16)
    dtypes = (torch.float32, torch.bfloat16) if GPU else (torch.float32,)
    assert train_tiny.check_gla_kernel(torch.device("cuda" if GPU else "cpu"), dtypes) < 1e-2


def test_gla_kernel_check_refuses_a_wrong_kernel(monkeypatch):
    def wrong(*args, **kwargs):  # the reference, 5% off
        o, state = train_tiny.gla_kernel.naive_gla(*args, **kwargs)
        return o * 1.05, state
    monkeypatch.setattr(train_tiny.gla_kernel, "chunk_gla", wrong)
    with pytest.raises(SystemExit, match="refusing to train"):
        train_tiny.check_gla_kernel(torch.device("cpu"), (torch.float32,))


# --- the ResNet-56 judge ---------------------------------------------------------------------------------------

def test_resnet56_matches_pretrained_weights_layout(tmp_path):
    net = train_tiny.ResNet56()
    assert sum(p.numel() for p in net.parameters()) == 853_018  # He et al.: ResNet-56 has 0.85M parameters
    path = tmp_path / "r56.th"  # the pretrained file's layout: {'state_dict': {'module.' + name: tensor}}
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()
                               if "num_batches_tracked" not in k}, "best_prec1": 0.0}, path)
    judge = train_tiny.load_classifier(str(path), torch.device("cpu"))
    assert judge(torch.rand(2, 3, 32, 32)).shape == (2, 10)

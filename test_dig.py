"""
Tests of dig: the GLA kernel (gla_kernel.py), the DiG / DiT models, the diffusion maths and sampling (dig.py)
and the training script (train_tiny.py). Run them with

    pytest test_dig.py          # or pytest -n 8 test_dig.py: 8 processes (pytest-xdist), for a GPU machine

Sections, in reading order: 1. GLA kernel  2. model  3. diffusion  4. training.

Everything here runs on a CPU in a few minutes, with tiny models and datasets. Tests that need a CUDA GPU
(the kernel in half precision and on long sequences, a GPU training run) are skipped without one. On a CPU
the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1). The interpreter is chosen when triton is
first imported, so the variable is set below, before gla_kernel, dig and train_tiny (which import triton).
"""

import copy
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

# The tensors here are tiny, so threads mostly wait for each other. On a 2-core machine one thread takes
# ~48 s for the suite against ~44 s for two when the machine is idle, but ~46 s against ~72 s when another
# process keeps one core busy.
torch.set_num_threads(1)

import dig  # noqa: E402  (after TRITON_INTERPRET)
import gla_kernel  # noqa: E402
import train_tiny  # noqa: E402
from gla_kernel import chunk_gla, chunk_gla_torch, naive_gla  # noqa: E402

needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
DEVICE = "cuda" if GPU else "cpu"  # where the Triton kernel runs (on a CPU: in the interpreter)
HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")
REAL_RESNET = os.path.join(SHARED_DATA, "resnet56-4bfd9763.th")
needs_shared_data = pytest.mark.skipif(not os.path.exists(REAL_RESNET), reason="the pretrained ResNet-56 and "
                                       "real CIFAR-10 images are not in ../shared/data")


# =========================================================================================================
# 1. GLA kernel: the Triton kernel and the PyTorch chunked path against the naive recurrence


def fresh_seed():
    """A new seed on every run, drawn without touching torch's global generator; failures print it."""
    return random.SystemRandom().randrange(2**31)


def make_gla_inputs(B, T, H, K, V, gates, with_initial_state, device="cpu", seed=None):
    gen = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    x = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    if gates == "mild":            # DiG's gate
        g = F.logsigmoid(x) / 16
    elif gates == "strong":        # per-step gates spread down to -10: exp(-G) alone would overflow
        g = -10 * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
    elif gates == "edge":          # each 16-token sub-chunk sums to about -59: the kernel's factored path at its limit
        g = (-3.7 + 0.05 * x).clamp(max=0)
    else:                          # a mix: most dims keep their memory, some forget at once
        g = torch.where(x > 1, -8.0 + x, F.logsigmoid(x) / 4)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64) if with_initial_state else None
    return [t.to(device) for t in (q, k, v, g)], (h0.to(device) if h0 is not None else None)


def gla_and_grads(fn, inputs, h0, do, dht, dtype):
    """Run fn in `dtype`, backpropagate the given output and final-state gradients, return all results.
    dht=None: the final state is not asked for (it comes back as None), only the output is backpropagated."""
    xs = [x.to(dtype).detach().requires_grad_() for x in inputs]
    h = h0.to(torch.float32 if dtype != torch.float64 else dtype).detach().requires_grad_() if h0 is not None else None
    o, s = fn(*xs, initial_state=h, output_final_state=dht is not None)
    loss = (o.to(do.dtype) * do).sum()
    if dht is not None:
        loss = loss + (s.to(dht.dtype) * dht).sum()
    loss.backward()
    grads = [x.grad for x in xs] + ([h.grad] if h is not None else [])
    return [o, s] + grads


def assert_close(name, got, ref, tol, magnitude=0.0):
    """Relative error of got against ref, in norm. `magnitude` is the size of the terms ref is a sum of:
    where those cancel (dg at T = 1 is exactly 0), the error is judged against them instead."""
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - ref).norm().item()
    bound = tol * max(ref.norm().item(), magnitude)
    assert err <= bound, f"{name}: |got - ref| = {err:.3e} > {bound:.3e} (|ref| = {ref.norm().item():.3e})"


GLA_RESULTS = ["o", "final_state", "dq", "dk", "dv", "dg", "d_initial_state"]
GLA_SHAPES = [  # B, T, H, K, V: T = 1, lengths off the chunk grid, K != V both ways. Few (K, V) pairs: on a
    (2, 1, 2, 32, 64),   # GPU each pair and dtype is a set of kernels that Triton compiles, which is most of
    (2, 17, 2, 32, 16),  # what the GPU tests cost (other lengths, head counts and options reuse them).
    (1, 64, 3, 16, 32),
    (2, 100, 2, 32, 64),
    (1, 300, 2, 16, 32),
]


_SEEDS, _REFERENCES = {}, {}


def cached_seed(*key):
    """One fresh seed per key and test run: tests that share it share their float64 reference."""
    return _SEEDS.setdefault(key, fresh_seed())


def naive_reference(inputs, h0, do, dht, key):
    # The float64 recurrence is the slow part of a GPU test (a Python loop over T); keep the last one.
    if key not in _REFERENCES:
        _REFERENCES.clear()
        _REFERENCES[key] = gla_and_grads(naive_gla, inputs, h0, do, dht, torch.float64)
    return _REFERENCES[key]


def check_against_naive(fn, shape, gates, with_h0, dtype, tol, device, seed=None, final_state_used=True):
    seed = fresh_seed() if seed is None else seed
    inputs, h0 = make_gla_inputs(*shape, gates, with_h0, seed=seed)
    B, T, H, K, V = shape
    gen = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64).to(device)
    dht = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64).to(device) if final_state_used else None
    inputs = [x.to(device) for x in inputs]
    h0 = h0.to(device) if h0 is not None else None
    key = (seed, shape, gates, with_h0, final_state_used)
    ref = naive_reference(inputs, h0, do, dht, key)   # on the GPU when there is one
    got = gla_and_grads(fn, inputs, h0, do, dht, dtype)
    q, k = inputs[:2]
    dq, dk = ref[2:4]
    dg_terms = (q * dq).norm().item() + (k * dk).norm().item()   # dg sums q*dq - k*dk over later tokens
    for name, a, b in zip(GLA_RESULTS, got, ref):
        if b is None:       # the final state, when it was not asked for
            assert a is None, f"{name}: returned although not asked for"
            continue
        assert_close(f"{name} (seed {seed})", a, b, tol, magnitude=dg_terms if name == "dg" else 0.0)


@pytest.mark.parametrize("shape", GLA_SHAPES)
@pytest.mark.parametrize("gates,with_h0", [("mild", True), ("strong", False), ("mixed", True)])
def test_torch_chunked_matches_naive(shape, gates, with_h0):
    check_against_naive(chunk_gla_torch, shape, gates, with_h0, torch.float64, 1e-10, "cpu")


# The Triton operator runs one of two paths, chosen by the length (gla_kernel._one_pass): every test of the
# kernel's numbers runs on both, forced by moving the length limit.
PATHS = {"one pass": 10 ** 9, "three phases": 0}


def force_path(monkeypatch, path):
    monkeypatch.setattr(gla_kernel, "ONE_PASS_MAX_T", PATHS[path])


# The interpreter is slow, so on a CPU the three-phase path is checked on the lengths that span several chunks.
TRITON_CASES = [(shape, "one pass") for shape in GLA_SHAPES] + [(shape, "three phases") for shape in GLA_SHAPES
                                                                 if shape[1] > 64 or GPU]


@pytest.mark.parametrize("shape,path", TRITON_CASES)
@pytest.mark.parametrize("gates,with_h0", [("mild", True), ("strong", False), ("mixed", True), ("edge", True)])
def test_triton_fp32_matches_naive(shape, path, gates, with_h0, monkeypatch):
    # 1e-4, not 1e-5: on a GPU tl.exp is the hardware exp2 (a few ulp), and G reaches tens in magnitude.
    force_path(monkeypatch, path)
    check_against_naive(chunk_gla, shape, gates, with_h0, torch.float32, 1e-4 if GPU else 1e-5, DEVICE)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gates", ["mild", "mixed"])
def test_triton_elementwise_path_matches_naive(gates, path, monkeypatch):
    # With mild gates the kernels take the factored exp(G_i) exp(-G_j) path; a limit of 0 forces the
    # element-wise [16, 16, K] path everywhere, so both are checked on the same kind of input.
    monkeypatch.setattr(gla_kernel, "FACTOR_LIMIT", 0.0)
    force_path(monkeypatch, path)
    check_against_naive(chunk_gla, (2, 100, 2, 32, 64), gates, True, torch.float32, 1e-4 if GPU else 1e-5, DEVICE)


@pytest.mark.skipif(GPU, reason="CPU-only: fp16 tl.dot under the Triton interpreter")
@pytest.mark.parametrize("path", PATHS)
def test_triton_fp16_interpreter(path, monkeypatch):
    force_path(monkeypatch, path)
    check_against_naive(chunk_gla, (2, 100, 2, 32, 64), "mixed", True, torch.float16, 5e-3, "cpu")


@needs_gpu
@pytest.mark.parametrize("shape", GLA_SHAPES + [(2, 1000, 4, 64, 64), (1, 4100, 2, 128, 128), (3, 257, 2, 32, 64)])
@pytest.mark.parametrize("gates", ["mild", "strong", "mixed", "edge"])
def test_triton_half_precision_on_gpu(shape, gates, monkeypatch):
    # One float64 reference per input, checked against both paths in fp16 and bf16. One pass runs up to
    # ONE_PASS_MAX_T tokens; past ~1000 its dg, a sum over the whole sequence of terms rounded in half
    # precision, drifts past these bounds (three phases sum the later chunks' part from float32 states).
    for path in PATHS if shape[1] <= 1024 else ["three phases"]:
        force_path(monkeypatch, path)
        for dtype, tol in [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)]:
            check_against_naive(chunk_gla, shape, gates, True, dtype, tol, "cuda", seed=cached_seed(shape, gates))


@needs_gpu
@pytest.mark.parametrize("path", PATHS)
def test_triton_long_sequence_fp32_on_gpu(path, monkeypatch):
    force_path(monkeypatch, path)
    check_against_naive(chunk_gla, (1, 2000, 2, 32, 64), "mild", True, torch.float32, 1e-4, "cuda")


def test_triton_noncontiguous_inputs_work():
    (q, k, v, g), _ = make_gla_inputs(2, 40, 2, 16, 32, "mild", False, device=DEVICE)
    q, k, v, g = (x.float() for x in (q, k, v, g))
    # Views with the head and time axes swapped twice: same values, non-contiguous strides.
    qn, kn, vn, gn = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, g))
    assert not qn.is_contiguous()
    o1, _ = chunk_gla(q, k, v, g)
    o2, _ = chunk_gla(qn, kn, vn, gn)
    assert torch.equal(o1, o2)


@pytest.mark.parametrize("path", PATHS)
def test_triton_reads_head_views_of_a_wider_tensor_in_place(path, monkeypatch):
    force_path(monkeypatch, path)
    # q, k, v as DiG makes them: head views of one [B, T, W] projection output, rows W apart. The kernel reads
    # them where they are (no copy), and gradients flow back into the one tensor.
    B, T, H, K, V = 2, 70, 2, 16, 32
    (q, k, v, g), _ = make_gla_inputs(B, T, H, K, V, "mixed", False)
    packed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2), torch.zeros(B, T, 5, dtype=q.dtype)], dim=2)
    packed = packed.float().to(DEVICE).requires_grad_()
    qv, kv, vv, _ = packed.split([H * K, H * K, H * V, 5], dim=2)
    qv, kv, vv = qv.view(B, T, H, K), kv.view(B, T, H, K), vv.view(B, T, H, V)
    assert gla_kernel._rows(qv)[0].data_ptr() == qv.data_ptr() and gla_kernel._rows(qv)[1] == packed.shape[2]
    g = g.float().to(DEVICE)
    do = torch.randn(B, T, H, V, dtype=torch.float32).to(DEVICE)
    o, _ = chunk_gla(qv, kv, vv, g)
    (o * do).sum().backward()
    ref_inputs = [x.detach().contiguous().requires_grad_() for x in (qv, kv, vv)]
    o_ref, _ = chunk_gla(*ref_inputs, g)
    (o_ref * do).sum().backward()
    assert torch.equal(o, o_ref)
    grad_ref = torch.cat([x.grad.flatten(2) for x in ref_inputs] + [torch.zeros(B, T, 5, device=DEVICE)], dim=2)
    assert torch.equal(packed.grad, grad_ref)


@pytest.mark.parametrize("path", PATHS)
def test_gla_operators_pass_torch_opcheck(path, monkeypatch):
    force_path(monkeypatch, path)
    # torch.library.opcheck: the registered fake (shape-only) versions match the real outputs, the autograd
    # formula matches what torch.compile's tracing sees, and the schema is honest (nothing is mutated).
    # The gradient of the final state comes as an expanded (stride-0) tensor from .sum(), a layout the
    # kernels must not misread.
    (q, k, v, g), h0 = make_gla_inputs(2, 40, 2, 16, 32, "mixed", True)
    q, k, v, g, h0 = (x.float().to(DEVICE).requires_grad_() for x in (q, k, v, g, h0))
    torch.library.opcheck(torch.ops.dig.gla_forward, (q, k, v, g, 0.25, h0))
    torch.library.opcheck(torch.ops.dig.gla_forward, (q, k, v, g, 0.25, None))


@pytest.mark.parametrize("path", PATHS)
def test_triton_final_state_only_depends_on_prefix(path, monkeypatch):
    force_path(monkeypatch, path)
    (q, k, v, g), h0 = make_gla_inputs(1, 90, 2, 16, 32, "mixed", True, device=DEVICE)
    q, k, v, g, h0 = (x.float() for x in (q, k, v, g, h0))
    # Running 90 tokens at once equals running 50, then 40 from the 50-token final state.
    o, s = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o1, s1 = chunk_gla(q[:, :50], k[:, :50], v[:, :50], g[:, :50], initial_state=h0, output_final_state=True)
    o2, s2 = chunk_gla(q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], initial_state=s1, output_final_state=True)
    assert_close("o", torch.cat([o1, o2], dim=1), o, 1e-5)
    assert_close("final_state", s2, s, 1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_triton_gradients_when_only_the_output_is_used(path, monkeypatch):
    # DiG's case: no initial state, no final state. The kernels then run with both switched off by runtime
    # flags (and are handed placeholder buffers they must not read), a case the tests above never reach.
    force_path(monkeypatch, path)
    check_against_naive(chunk_gla, (2, 70, 2, 16, 32), "mixed", False, torch.float32, 1e-4 if GPU else 1e-5,
                        DEVICE, final_state_used=False)


def test_gla_bad_inputs_raise_clear_errors():
    (q, k, v, g), _ = make_gla_inputs(1, 8, 2, 16, 16, "mild", False)
    q, k, v, g = (x.float().to(DEVICE) for x in (q, k, v, g))
    with pytest.raises(ValueError, match=r"\[B, T, H, K\]"):
        chunk_gla(q[0], k, v, g)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, V\]"):
        chunk_gla(q, k, v[:, :4], g)
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gla(q, k, v, g, initial_state=torch.zeros(1, 2, 16, 8, device=DEVICE))
    with pytest.raises(ValueError, match="g <= 0"):
        chunk_gla(q, k, v, g.abs() + 0.1)
    with pytest.raises(ValueError, match="g <= 0"):
        chunk_gla_torch(q, k, v, g.abs() + 0.1)
    with pytest.raises(ValueError, match="share one dtype"):
        chunk_gla(q, k, v.double(), g)
    with pytest.raises(ValueError, match="dtypes"):
        chunk_gla(q.double(), k.double(), v.double(), g.double())
    with pytest.raises(ValueError, match="head dims"):
        chunk_gla(q[..., :12], k[..., :12], v, g[..., :12])
    with pytest.raises(ValueError, match="T >= 1"):
        chunk_gla(q[:, :0], k[:, :0], v[:, :0], g[:, :0])


def test_gla_cpu_tensors_rejected_outside_interpreter(monkeypatch):
    monkeypatch.setattr(gla_kernel, "_interpreting", lambda: False)
    (q, k, v, g), _ = make_gla_inputs(1, 8, 2, 16, 16, "mild", False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        chunk_gla(*(x.float() for x in (q, k, v, g)))


def test_dig_imports_and_trains_without_triton():
    # Where Triton does not install (macOS, Windows), dig imports, a model trains on the PyTorch path, and
    # the Triton kernel says what it needs. The child process hides Triton before anything imports it.
    code = """
import sys
sys.modules["triton"] = None                      # from here on, `import triton` raises ImportError
import torch, dig, gla_kernel
assert not gla_kernel.HAS_TRITON
model = dig.DiG(depth=4, hidden_size=64, num_heads=2, patch_size=2, input_size=8, num_classes=10)
before = [p.detach().clone() for p in model.parameters()]
dig.make_train_step(model, batch=2, device=torch.device("cpu"))()
assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
x = torch.randn(1, 4, 2, 16)
try:
    gla_kernel.chunk_gla(x, x, x, -x.abs())
except RuntimeError as e:
    assert "Triton is not installed" in str(e), e
else:
    raise AssertionError("chunk_gla ran without Triton")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# =========================================================================================================
# 2. Model: DiG and its DiT twin (dig.py), on the CPU


def tiny_dig(**kwargs):
    args = dict(depth=4, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=10)
    return dig.DiG(**{**args, **kwargs})


def tiny_dit(**kwargs):
    args = dict(depth=2, hidden_size=64, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=10)
    return dig.DiT(**{**args, **kwargs})


def randomize_(model, std=0.1, seed=0):
    """Give the zero-initialised parts (adaLN, final layer) random values, so outputs are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def model_inputs(model, n=3, seed=0):
    """A batch the model accepts: latents x, timesteps t and class labels y."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, model.num_classes, (n,), generator=gen)
    return x, t, y


@pytest.mark.parametrize("cls", [tiny_dig, tiny_dit])
@pytest.mark.parametrize("input_size,patch,channels,learn_sigma", [
    (8, 2, 4, True), (16, 4, 3, False), (16, 8, 1, True), (12, 2, 4, True)])
def test_output_shapes(cls, input_size, patch, channels, learn_sigma):
    model = cls(input_size=input_size, patch_size=patch, in_channels=channels, learn_sigma=learn_sigma)
    x, t, y = model_inputs(model, n=2)
    out = model(x, t, y)
    assert out.shape == (2, channels * (2 if learn_sigma else 1), input_size, input_size)
    assert model.out_channels == out.shape[1] and model.patch_size == patch and model.input_size == input_size


@pytest.mark.parametrize("cls", [tiny_dig, tiny_dit])
def test_output_is_exactly_zero_at_init(cls):
    model = cls()
    out = model(*model_inputs(model))
    assert torch.equal(out, torch.zeros_like(out))


def test_dig_blocks_are_identity_at_init():
    # Zero gates (adaLN-Zero), identity depthwise convs and a scan order of period 4: the trunk is the identity.
    model = tiny_dig(depth=8, input_size=12)
    x = torch.randn(2, model.grid_size ** 2, 64)
    c = torch.randn(2, 64)
    assert torch.equal(model.run_blocks(x, c), x)


def test_scan_order_visits_four_directions_and_returns_to_raster():
    side = 5
    ids = torch.arange(side * side).view(1, -1, 1)          # token ids in raster order
    grid = torch.arange(side * side).view(side, side)
    expected = [grid.flatten(), grid.flatten().flip(0), grid.t().flatten(), grid.t().flatten().flip(0)]
    x = ids
    for i in range(8):
        assert torch.equal(x.flatten(), expected[i % 4]), f"block {i} sees the wrong order"
        x = dig.reorient(x, i % 2 == 1, side)
    assert torch.equal(x, ids)


def raster_scan_orders(side):
    """The raster ids of the tokens at each scan position, for the four directions the spec names."""
    grid = torch.arange(side * side).view(side, side)
    return [grid.flatten(), grid.flatten().flip(0), grid.t().flatten(), grid.t().flatten().flip(0)]


@pytest.mark.parametrize("depth", [4, 8, 12])
def test_model_blocks_read_the_four_directions_and_final_layer_sees_raster(depth):
    # Follow the tokens through the real model: with the blocks at init (the identity on each token), a
    # token's features carry its raster id, so the input of each block and of the final layer shows the order
    # it reads them in. The 5 x 5 grid is not symmetric under any of the orders.
    model = tiny_dig(depth=depth, input_size=10)
    side = model.grid_size
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0][0, :, 0].round().long()))
             for m in list(model.blocks) + [model.final_layer]]
    ids = torch.arange(side * side, dtype=torch.float32).view(1, -1, 1).expand(2, -1, 64)
    x = model.run_blocks(ids, torch.randn(2, 64))
    model.final_layer(x, torch.randn(2, 64))
    for h in hooks:
        h.remove()
    orders = raster_scan_orders(side)
    for i in range(depth):
        assert torch.equal(seen[i], orders[i % 4]), f"block {i} of {depth} reads {seen[i].tolist()}"
    assert torch.equal(seen[depth], orders[0]), f"the final layer of a depth-{depth} DiG does not see raster order"


def test_each_block_mixes_tokens_along_its_own_scan_direction():
    # Through the real blocks, flips, transposes and GLA: only block i is made non-trivial (its adaLN gates
    # random, the other blocks stay the identity), one token is perturbed, and the trunk's raster-order
    # output must change exactly at the tokens that come at or after it in block i's scan order (GLA is
    # causal). Dropping the flips, the transposes, or putting them after the wrong blocks changes these sets.
    side, depth = 5, 8
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    orders = raster_scan_orders(side)
    for i in range(depth):
        model = tiny_dig(depth=depth, input_size=2 * side, hidden_size=32).double()
        with torch.no_grad():
            w = model.blocks[i].adaLN_modulation[-1]
            w.weight.copy_(torch.randn(w.weight.shape, generator=gen, dtype=torch.float64) * 0.2)
            w.bias.copy_(torch.randn(w.bias.shape, generator=gen, dtype=torch.float64) * 0.2)
        x = torch.randn(2, side * side, 32, generator=gen, dtype=torch.float64)
        c = torch.randn(2, 32, generator=gen, dtype=torch.float64)
        for r in torch.randint(1, side * side - 1, (2,), generator=gen).tolist():
            x2 = x.clone()
            x2[:, r] += torch.randn(32, generator=gen, dtype=torch.float64)   # not a constant: LayerNorm removes it
            changed = (model.run_blocks(x2, c) - model.run_blocks(x, c)).abs().amax(dim=(0, 2)) > 0
            order = orders[i % 4].tolist()
            expected = torch.zeros(side * side, dtype=torch.bool)
            expected[order[order.index(r):]] = True
            assert torch.equal(changed, expected), (f"block {i}, token {r} (seed {seed}): changed "
                                                    f"{changed.nonzero().flatten().tolist()}")


def test_reorient_moves_whole_tokens():
    # Whole feature vectors move together; nothing is mixed across channels.
    x = torch.randn(2, 16, 3)
    y = dig.reorient(x, True, 4)
    assert torch.equal(y.sort(dim=1).values, x.sort(dim=1).values)
    assert torch.equal(y[:, 0], x[:, -1])


def test_dwconv_is_identity_at_init_and_works_on_the_grid():
    conv = dig.DepthwiseConv(dim=3, side=4)
    x = torch.randn(2, 16, 3)
    assert torch.equal(conv(x), x)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[:, :, 0, 1] = 1                     # output (r, c) = input (r - 1, c): the token above
    out = conv(x).view(2, 4, 4, 3)
    grid = x.view(2, 4, 4, 3)
    assert torch.equal(out[:, 1:], grid[:, :-1]) and torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))


def test_gla_mixer_is_causal_in_scan_order():
    torch.manual_seed(0)
    mixer = dig.GatedLinearAttention(dim=32, num_heads=2)
    x = torch.randn(2, 20, 32)
    x2 = x.clone()
    x2[:, 11] += 1.0
    diff = (mixer(x2) - mixer(x)).abs().amax(dim=(0, 2))
    assert torch.all(diff[:11] == 0) and torch.all(diff[11:] > 0)


def test_gla_mixer_matches_a_direct_recurrence():
    # An independent implementation of the GLA layer from its definition (token by token, float64).
    torch.manual_seed(0)
    m = dig.GatedLinearAttention(dim=32, num_heads=2).double()
    with torch.no_grad():
        m.norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    H, K, V = 2, 8, 16
    # in_proj's rows: q (16), k (16), v (32), output gate (32), forget-gate bottleneck (16).
    W_q, W_k, W_v, W_out_gate, W_gate_low = m.in_proj.weight.split([16, 16, 32, 32, 16], dim=0)
    q, k, v = (x @ W_q.T).view(2, 9, H, K), (x @ W_k.T).view(2, 9, H, K), (x @ W_v.T).view(2, 9, H, V)
    g = F.logsigmoid(m.forget_gate(x @ W_gate_low.T)).view(2, 9, H, K) / 16
    S = torch.zeros(2, H, K, V, dtype=torch.float64)
    outs = []
    for t in range(9):
        S = g[:, t, :, :, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o = torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S)
        o = o / o.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * m.norm_weight
        outs.append(o * F.silu((x[:, t] @ W_out_gate.T).view(2, H, V)))
    expected = m.proj(torch.stack(outs, 1).flatten(2))
    torch.testing.assert_close(m(x), expected)


@pytest.mark.skipif(GPU, reason="on a GPU, test_compiled_dig_matches_eager_on_gpu and "
                    "test_gpu_compiled_train_step_matches_eager_step check compile_blocks where it runs")
def test_compiled_blocks_match_eager():
    # compile_blocks fuses each block and makes DiG blocks recompute their element-wise values in the
    # backward (selective checkpointing): outputs and every gradient must stay those of the eager model.
    # On a CPU, for DiG (through chunk_gla_torch) and DiT.
    for model in (randomize_(tiny_dig(input_size=12, class_dropout_prob=0)),
                  randomize_(tiny_dit(class_dropout_prob=0))):   # no random label dropout: same inputs
        compiled = dig.compile_blocks(copy.deepcopy(model))
        x, t, y = model_inputs(model)
        out, out_compiled = model(x, t, y), compiled(x, t, y)
        out.square().sum().backward()
        out_compiled.square().sum().backward()
        torch.testing.assert_close(out_compiled, out, rtol=1e-4, atol=1e-5)
        for (name, p), p_compiled in zip(model.named_parameters(), compiled.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(p_compiled.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


class exact_fp32:
    """No TF32 in matmuls and convolutions (both default to it on some setups): fp32 comparisons mean fp32."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def gpu_dig(input_size, seed):
    # 4 blocks, width 128, 2 heads: head dims K = 32, V = 64 as in every named size. Everything random, the
    # depthwise convs too, so that every parameter gets a gradient that depends on the GLA path.
    torch.manual_seed(seed)
    model = randomize_(tiny_dig(hidden_size=128, input_size=input_size, class_dropout_prob=0), seed=seed)
    with torch.no_grad():
        for block in model.blocks:
            block.dwconv.conv.weight.add_(0.1 * torch.randn_like(block.dwconv.conv.weight))
    return model.cuda()


def forward_backward(model, x, t, y, w, autocast=False):
    """Output and {name: gradient} of sum(w * model(x, t, y))."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
    (out.float() * w).sum().backward()
    return out.float().detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def gpu_model_inputs(model, seed):
    x, t, y = model_inputs(model, n=2, seed=seed)
    w = torch.randn(2, model.out_channels, model.input_size, model.input_size,
                    generator=torch.Generator().manual_seed(seed + 1))
    return x.cuda(), t.cuda(), y.cuda(), w.cuda()


@needs_gpu
# 64 tokens (the one-pass kernel); 529 tokens (three phases: eight 64-token chunks and a partial one)
@pytest.mark.parametrize("input_size", [16, 46])
def test_dig_through_triton_matches_dig_through_torch_path_on_gpu(input_size, monkeypatch):
    # The model's GPU path (the Triton kernel behind a custom operator) against the same weights through
    # chunk_gla_torch, on the same GPU, in fp32: outputs and every parameter's gradient.
    seed = fresh_seed()
    model = gpu_dig(input_size, seed)
    x, t, y, w = gpu_model_inputs(model, seed)
    calls = []
    triton_gla = gla_kernel.chunk_gla
    monkeypatch.setattr(gla_kernel, "chunk_gla", lambda *a, **k: calls.append(1) or triton_gla(*a, **k))
    with exact_fp32():
        out, grads = forward_backward(model, x, t, y, w)
        assert len(calls) == 4                                   # one GLA per block went through the kernel
        monkeypatch.setattr(gla_kernel, "chunk_gla", gla_kernel.chunk_gla_torch)
        out_ref, grads_ref = forward_backward(model, x, t, y, w)
    assert out_ref.abs().max() > 1e-2
    assert_close(f"output (seed {seed})", out, out_ref, 1e-4)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(model.parameters())) - 1   # all but pos_embed
    for name in grads_ref:
        assert_close(f"grad of {name} (seed {seed})", grads[name], grads_ref[name], 1e-4)


@needs_gpu
@pytest.mark.parametrize("input_size", [46])   # each size costs a compilation; 529 tokens take three phases
def test_compiled_dig_matches_eager_on_gpu(input_size, monkeypatch):
    # compile_blocks on a GPU: the GLA custom operator inside compiled blocks, with the selective
    # recomputation policy. fp32 compiled vs fp32 eager to 1e-4. bf16 autocast compiled vs fp32 eager (bf16
    # keeps 8 bits, ~4e-3 per rounding): 2e-2 on the output, 3e-2 on all gradients together, 0.15 on each
    # parameter's (GLA's input and gate gradients are sums of cancelling terms). Measured on an H100, 6 seeds:
    # output up to 8.7e-3, all gradients 7.9e-3, one parameter's up to 6.4e-2.
    seed = fresh_seed()
    model = gpu_dig(input_size, seed)
    compiled = dig.compile_blocks(copy.deepcopy(model))
    x, t, y, w = gpu_model_inputs(model, seed)
    policy_ops = []
    real_policy = dig._keep_matmul_inputs_and_outputs
    monkeypatch.setattr(dig, "_keep_matmul_inputs_and_outputs",
                        lambda ctx, op, *a, **k: policy_ops.append(op) or real_policy(ctx, op, *a, **k))
    torch._dynamo.reset()                                      # trace afresh, so the policy is consulted
    with exact_fp32():
        out_ref, grads_ref = forward_backward(model, x, t, y, w)
        out, grads = forward_backward(compiled, x, t, y, w)
        assert torch.ops.dig.gla_forward.default in policy_ops   # the recomputation ran around the kernel
        out_bf16, grads_bf16 = forward_backward(compiled, x, t, y, w, autocast=True)
    assert out_ref.abs().max() > 1e-2
    assert_close(f"compiled output (seed {seed})", out, out_ref, 1e-4)
    assert_close(f"compiled bf16 output (seed {seed})", out_bf16, out_ref, 2e-2)
    assert grads.keys() == grads_ref.keys() == grads_bf16.keys()
    for name in grads_ref:
        assert_close(f"compiled grad of {name} (seed {seed})", grads[name], grads_ref[name], 1e-4)
        assert_close(f"compiled bf16 grad of {name} (seed {seed})", grads_bf16[name], grads_ref[name], 0.15)
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])
    assert_close(f"compiled bf16 gradients together (seed {seed})", flat(grads_bf16), flat(grads_ref), 3e-2)


def test_swiglu_hidden_sizes():
    for dim, hidden in [(384, 1024), (768, 2048), (1024, 2816), (1152, 3072)]:
        assert dig.SwiGLU(dim).down.in_features == hidden


def test_dit_attention_variants_agree():
    torch.manual_seed(0)
    sdpa = randomize_(tiny_dit(attention="sdpa"))
    mat = tiny_dit(attention="materialized")
    mat.load_state_dict(sdpa.state_dict())
    x, t, y = model_inputs(sdpa)
    out = sdpa(x, t, y)
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(mat(x, t, y), out, atol=1e-5, rtol=1e-4)


# The spec's counts at 256 px (latent 32 x 32 x 4, 1000 classes, learned sigma), as it writes them.
SPEC_PARAMS = {"DiG-S/2": "33.1M", "DiG-B/2": "130.8M", "DiG-L/2": "465M", "DiG-XL/2": "676M",
               "DiT-S/2": "33.0M", "DiT-B/2": "130.5M", "DiT-L/2": "458M", "DiT-XL/2": "675M"}


def expected_params(kind, depth, D, heads, patch, in_channels, out_channels, num_classes, side):
    """The parameter count of DiG or DiT, summed layer by layer from the spec's description (section 2)."""
    trunk = (in_channels * patch * patch * D + D          # patch embedding (conv with bias)
             + side * side * D                             # frozen sin-cos position embedding
             + (256 * D + D) + (D * D + D)                 # timestep MLP
             + (num_classes + 1) * D                       # label table with the null row
             + (D * 2 * D + 2 * D)                         # final adaLN
             + D * patch * patch * out_channels + patch * patch * out_channels)   # final Linear
    adaln = D * 6 * D + 6 * D
    if kind == "DiG":
        hidden = 256 * math.ceil(int(8 * D / 3) / 256)
        gla = (D * D // 2) * 2 + D * D * 2 + D * D       # q, k (D/2); v, output gate (D); output proj
        gla += D * 16 + 16 * D // 2 + D // 2 + D // heads  # forget gate D -> 16 -> D/2 (bias), RMSNorm weight
        block = adaln + gla + 3 * D * hidden + 9 * D + D   # SwiGLU (bias-free), depthwise 3x3 conv with bias
    else:
        block = adaln + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)
    return trunk + depth * block


def count_params(name, **kwargs):
    registry = dig.DiG_models if name.startswith("DiG") else dig.DiT_models
    with torch.device("meta"):
        model = registry[name](**kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", SPEC_PARAMS)
def test_parameter_counts(name):
    count = count_params(name, input_size=32, in_channels=4, num_classes=1000)
    depth, D, heads = dig.SIZES[name.split("-")[1].split("/")[0]]
    assert count == expected_params(name[:3], depth, D, heads, 2, 4, 8, 1000, 16)
    # The spec's figure to within half a unit of its third significant digit (0.05M for S/2, where DiT-S/2
    # and DiG-S/2 differ by 0.12M). Not the fourth: DiG-B/2 comes to 130.75M, which the spec writes 130.8M.
    spec = float(SPEC_PARAMS[name].rstrip("M")) * 1e6
    unit = 10.0 ** (math.floor(math.log10(spec)) - 2)
    assert abs(count - spec) <= unit / 2, f"{name}: {count / 1e6:.3f}M, spec {SPEC_PARAMS[name]}"


@pytest.mark.parametrize("size,patch,in_channels,learn_sigma,num_classes,input_size", [
    ("S", 4, 3, False, 10, 32), ("B", 8, 1, True, 7, 64), ("S", 2, 4, True, 1000, 12)])
def test_parameter_counts_follow_the_layer_formula(size, patch, in_channels, learn_sigma, num_classes, input_size):
    depth, D, heads = dig.SIZES[size]
    out_channels = in_channels * (2 if learn_sigma else 1)
    for kind in ("DiG", "DiT"):
        count = count_params(f"{kind}-{size}/{patch}", input_size=input_size, in_channels=in_channels,
                             learn_sigma=learn_sigma, num_classes=num_classes)
        assert count == expected_params(kind, depth, D, heads, patch, in_channels, out_channels, num_classes,
                                        input_size // patch), kind


def test_dig_and_dit_counts_differ_by_the_gla_block():
    # Same trunk, different blocks: the totals of one size differ by depth times the blocks' difference.
    for size, (depth, D, heads) in dig.SIZES.items():
        dig_count, dit_count = (count_params(f"{k}-{size}/2", input_size=32) for k in ("DiG", "DiT"))
        hidden = 256 * math.ceil(int(8 * D / 3) / 256)
        dig_block = 6 * D * D + 6 * D + 4 * D * D + 16 * D + 8 * D + D // 2 + D // heads + 3 * D * hidden + 10 * D
        dit_block = 18 * D * D + 15 * D
        assert dig_count - dit_count == depth * (dig_block - dit_block) != 0, size


def test_named_configs():
    assert len(dig.DiG_models) == 12 and len(dig.DiT_models) == 12
    with torch.device("meta"):
        m = dig.DiG_models["DiG-B/4"](input_size=64, num_classes=10, learn_sigma=False)
    assert (m.patch_size, m.input_size, m.num_classes, m.out_channels, len(m.blocks)) == (4, 64, 10, 4, 12)


def test_model_bad_inputs_raise_clear_errors():
    model = tiny_dig()
    x, t, y = model_inputs(model)
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(3, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(3, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="labels"):
        model(x, t, torch.tensor([0, 11, 2]))
    with pytest.raises(ValueError, match="labels"):
        model(x, t, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_dig(depth=6)
    with pytest.raises(ValueError, match="divide"):
        tiny_dig(input_size=10, patch_size=4)
    with pytest.raises(ValueError, match="attention"):
        tiny_dit(attention="flash")
    model(x, t, torch.full((3,), 10))        # the null label is a valid input


def test_label_dropout():
    model = tiny_dig(class_dropout_prob=0.5)
    emb = model.y_embedder
    labels = torch.zeros(1000, dtype=torch.long)
    null = emb.embedding_table.weight[10]
    model.eval()
    assert not (emb(labels) == null).all(dim=1).any()
    model.train()
    dropped = (emb(labels) == null).all(dim=1).float().mean()
    assert 0.4 < dropped < 0.6
    forced = emb(torch.tensor([1, 2]), force_drop_ids=torch.tensor([1, 0]))
    assert torch.equal(forced[0], null) and torch.equal(forced[1], emb.embedding_table.weight[2])
    # At 0.1 too: at 0.5 "dropped with probability p" and "with probability 1 - p" look the same.
    rare = tiny_dig(class_dropout_prob=0.1).train().y_embedder
    dropped = (rare(torch.zeros(4000, dtype=torch.long)) == rare.embedding_table.weight[10]).all(1).float().mean()
    assert 0.07 < dropped < 0.13, dropped


def test_forward_with_cfg():
    model = randomize_(tiny_dig()).eval()
    x, t, y = model_inputs(model, n=2)
    null = torch.full_like(y, model.num_classes)
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    cond, uncond = model(x, t, y), model(x, t, null)
    C = model.in_channels
    for scale in (1.0, 0.0, 4.0):
        out = model.forward_with_cfg(xx, tt, yy, scale)
        guided = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])   # all channels of eps are guided
        torch.testing.assert_close(out[:2, :C], guided, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[2:, :C], guided, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[:, C:], torch.cat([cond, uncond])[:, C:], atol=1e-5, rtol=1e-4)


# The values the trunk computes, each against its definition written out here (the tests above check
# shapes, gradients and which tokens a block mixes; these check the numbers).

def test_sincos_pos_embed_known_values():
    side, freqs = 3, [1.0, 0.01]                    # dim 8: two frequencies, 10000^(-i/2), per axis
    pe = dig.sincos_pos_embed(8, side)
    for r in range(side):
        for c in range(side):
            want = [f(c * w) for f in (math.sin, math.cos) for w in freqs] + \
                   [f(r * w) for f in (math.sin, math.cos) for w in freqs]
            torch.testing.assert_close(pe[r * side + c], torch.tensor(want), atol=1e-6, rtol=0)


def test_first_block_sees_patch_embedding_plus_position():
    torch.manual_seed(0)
    model, E, p, D = tiny_dig(), 4, 2, 64
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model(x, t, y)
    W, b = model.x_embedder.weight.reshape(D, -1), model.x_embedder.bias
    pe = dig.sincos_pos_embed(D, E)
    for h in range(E):                              # token h * E + w is the patch at row h, column w
        for w in range(E):
            patch = x[:, :, h * p:(h + 1) * p, w * p:(w + 1) * p].reshape(2, -1)
            torch.testing.assert_close(seen[0][:, h * E + w], patch @ W.T + b + pe[h * E + w], atol=1e-5, rtol=1e-5)


def test_unpatchify_puts_every_value_in_its_pixel():
    model, E, p, C = tiny_dig(in_channels=3), 4, 2, 6          # learned sigma: 2 x 3 output channels
    tokens = torch.randn(2, E * E, p * p * C)
    out = model.unpatchify(tokens)                              # [2, C, E p, E p]
    for h, w, i, j, c in np.ndindex(E, E, p, p, C):
        assert torch.equal(out[:, c, h * p + i, w * p + j], tokens[:, h * E + w, (i * p + j) * C + c])


def test_timestep_features_are_cos_then_sin():
    emb, seen = dig.TimestepEmbedder(32), []
    emb.mlp[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    t = torch.tensor([0, 1, 7, 999])
    emb(t)
    freqs = [math.exp(-math.log(10000) * i / 128) for i in range(128)]
    want = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in t.tolist()]
    torch.testing.assert_close(seen[0], torch.tensor(want), atol=2e-4, rtol=0)


def test_adaln_zero_block_matches_its_definition():
    torch.manual_seed(0)
    block = tiny_dig().blocks[0]
    with torch.no_grad():                           # at init the gates are 0; give them values
        for w in block.adaLN_modulation.parameters():
            w.normal_(0, 0.3)
    x, c = torch.randn(2, 16, 64) * 2 + 0.5, torch.randn(2, 64)
    shift1, scale1, gate1, shift2, scale2, gate2 = (v[:, None] for v in
                                                    block.adaLN_modulation[1](F.silu(c)).split(64, dim=1))
    norm = lambda z: F.layer_norm(z, (64,), eps=1e-6)
    h = x + gate1 * block.mixer(norm(x) * (1 + scale1) + shift1)
    want = h + gate2 * block.mlp(norm(h) * (1 + scale2) + shift2)
    torch.testing.assert_close(dig.AdaLNZeroBlock.forward(block, x, c), want)


# =========================================================================================================
# 3. Diffusion (dig.py): the maths of the schedule, the loss and respacing, then sampling


@pytest.fixture(scope="module")
def diffusion():
    return dig.create_diffusion()


def beta_by_hand(t):
    return 1e-4 + (0.02 - 1e-4) * t / 999            # linear from 1e-4 (t = 0) to 0.02 (t = 999)


def abar_by_hand(t):
    """abar_t = prod_{s <= t} (1 - beta_s), one float multiplication at a time (no numpy)."""
    prod = 1.0
    for step in range(t + 1):
        prod *= 1.0 - beta_by_hand(step)
    return prod


def test_schedule(diffusion):
    assert diffusion.num_timesteps == 1000 and len(diffusion.betas) == 1000
    for t in [0, 1, 2, 10, 250, 500, 998, 999] + [random.randrange(1000) for _ in range(3)]:
        assert diffusion.betas[t] == pytest.approx(beta_by_hand(t), rel=1e-12), t
        assert diffusion.alphas_cumprod[t] == pytest.approx(abar_by_hand(t), rel=1e-10), t
    # A landmark: sum(beta) = 10.05, so abar_999 = exp(-10.05 - sum(beta^2)/2 - ...) is about 4.04e-5.
    assert 4.0e-5 < diffusion.alphas_cumprod[999] < 4.1e-5


def test_q_sample_matches_closed_form(diffusion):
    # Scalar cases worked out by hand: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
    cases = [(0, 0.5, -1.2), (1, -0.9, 0.3), (400, 0.7, 2.0), (999, 1.0, -0.4), (random.randrange(1000), 0.2, 0.9)]
    t = torch.tensor([c[0] for c in cases])
    x0, eps = (torch.tensor([c[i] for c in cases]).view(-1, 1, 1, 1) for i in (1, 2))
    got = diffusion.q_sample(x0, t, eps).flatten().tolist()
    for (step, a, e), value in zip(cases, got):
        abar = abar_by_hand(step)
        assert value == pytest.approx(math.sqrt(abar) * a + math.sqrt(1 - abar) * e, rel=1e-6, abs=1e-7), step
    # Empirically: mean sqrt(abar) x0 and variance 1 - abar.
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = diffusion.q_sample(x0, t)
    abar = abar_by_hand(300)
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.03)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)


def test_posterior_matches_bayes_rule(diffusion):
    # q(x_{t-1} | x_t, x_0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x_0): product of two Gaussians in x_{t-1}.
    torch.manual_seed(0)
    t = torch.tensor([1, 2, 50, 500, 999])
    x0, xt = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    beta = torch.tensor(diffusion.betas[t.numpy()]).view(-1, 1, 1, 1)
    abar_prev = torch.tensor(np.cumprod(1 - diffusion.betas)[t.numpy() - 1]).view(-1, 1, 1, 1)
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    expected_mean = ((1 - beta).sqrt() * xt / beta + abar_prev.sqrt() * x0 / (1 - abar_prev)) / precision
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double().expand_as(mean), (1 / precision).expand_as(mean), rtol=1e-5, atol=0)
    torch.testing.assert_close(log_var.exp().double(), 1 / precision, rtol=1e-5, atol=0)


def test_normal_kl_known_values():
    m1, lv1 = torch.tensor([0.0, 1.0, 0.3]), torch.tensor([0.0, 0.0, math.log(0.5)])
    m2, lv2 = torch.tensor([0.0, 0.0, -0.2]), torch.tensor([0.0, 0.0, math.log(2.0)])
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(dig.normal_kl(m1, lv1, m2, lv2), expected)
    assert dig.normal_kl(m1, lv1, m2, lv2)[1].item() == pytest.approx(0.5)


def test_discretized_likelihood_is_a_distribution_over_the_256_bins():
    bins = torch.linspace(-1, 1, 256)
    for mean, log_scale in [(0.0, math.log(0.3)), (0.9, math.log(0.05)), (-0.4, 0.5)]:
        logp = dig.discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean),
                                                       torch.full_like(bins, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    # A very narrow Gaussian on a bin centre puts all its mass in that bin.
    x = torch.tensor([-1.0, 0.0, 1.0])
    logp = dig.discretized_gaussian_log_likelihood(x, x, torch.full_like(x, -10.0))
    torch.testing.assert_close(logp, torch.zeros(3), atol=1e-6, rtol=0)


def test_perfect_model_has_zero_loss(diffusion):
    # A "model" that outputs the true noise and v = -1 (variance = the true posterior variance) matches the
    # posterior exactly: MSE 0 and KL 0 for every t >= 1.
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([1, 2, 300, 999])
    perfect = lambda x, t, **kwargs: torch.cat([noise, -torch.ones_like(noise)], dim=1)
    losses = diffusion.training_losses(perfect, x0, t, noise=noise)
    assert set(losses) == {"loss", "mse", "vb"} and losses["loss"].shape == (4,)
    torch.testing.assert_close(losses["mse"], torch.zeros(4))
    torch.testing.assert_close(losses["vb"], torch.zeros(4), atol=1e-4, rtol=0)
    # A wrong variance costs KL > 0, and the bound's gradient reaches the variance but not the eps output.
    out = torch.cat([noise, torch.zeros_like(noise)], dim=1).requires_grad_()
    losses = diffusion.training_losses(lambda x, t: out, x0, t, noise=noise)
    assert (losses["vb"] > 0).all()
    losses["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0


def test_vb_at_t0_is_the_decoder_nll(diffusion):
    # At t = 0 the bound is -log2 of the Gaussian mass of x0's bin (x0 +- 1/255; the end bins reach to -inf and
    # +inf), under the mean the model predicts and a variance between the posterior variance at t = 1 and
    # beta_0 placed by v. Worked out here in float64 with math.erf, one scalar pixel per example.
    cases = [  # x0, the noise in x_t, the model's eps, v
        (0.3, 0.8, 0.1, 0.0), (-1.0, -0.5, 0.4, 1.0), (1.0, 0.2, -0.6, -1.0), (-0.2, 1.5, 0.9, 0.5),
        (0.99, 0.1, 0.3, -0.3), (-0.9985, 0.0, -0.7, 0.2)]
    x0, noise, eps, v = (torch.tensor([c[i] for c in cases]).view(-1, 1, 1, 1) for i in range(4))
    t = torch.zeros(len(cases), dtype=torch.long)
    out = torch.cat([eps, v], dim=1)
    vb = diffusion.training_losses(lambda x, t: out, x0, t, noise=noise)["vb"].tolist()
    beta0, beta1 = beta_by_hand(0), beta_by_hand(1)
    abar0, abar1 = 1 - beta0, (1 - beta0) * (1 - beta1)
    posterior_variance_1 = beta1 * (1 - abar0) / (1 - abar1)
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    for (a, n, e, v_), got in zip(cases, vb):
        x_t = math.sqrt(abar0) * a + math.sqrt(1 - abar0) * n
        mean = (x_t - math.sqrt(1 - abar0) * e) / math.sqrt(abar0)     # predicted x0; the posterior at t = 0 is it
        frac = (v_ + 1) / 2
        std = math.exp(0.5 * (frac * math.log(beta0) + (1 - frac) * math.log(posterior_variance_1)))
        upper = Phi((a + 1 / 255 - mean) / std) if a < 0.999 else 1.0
        lower = Phi((a - 1 / 255 - mean) / std) if a > -0.999 else 0.0
        expected_bits = -math.log(upper - lower) / math.log(2)
        assert 0.01 < expected_bits < 30         # no case is trivially certain or hopeless
        assert got == pytest.approx(expected_bits, rel=1e-4), (a, n, e, v_)


def test_respacing_keeps_the_marginals(diffusion):
    for spacing, count in [("250", 250), ("ddim50", 50), ("10,20,5", 35), ([4, 4], 8), ("1000", 1000)]:
        spaced = dig.create_diffusion(spacing)
        kept = spaced.timestep_map
        assert spaced.num_timesteps == count == len(set(kept.tolist()))
        assert np.all(np.diff(kept) > 0)
        np.testing.assert_allclose(spaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-12)
    assert dig.space_timesteps(1000, "250")[0] == 0 and dig.space_timesteps(1000, "250")[-1] == 999
    assert dig.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    np.testing.assert_allclose(dig.create_diffusion("1000").betas, diffusion.betas, rtol=1e-10)
    with pytest.raises(ValueError):
        dig.create_diffusion("2000")


def test_space_timesteps_known_values():
    # IDDPM's rule, worked out by hand: count steps at positions i * (size - 1) / (count - 1), rounded half to
    # even (Python's round): 99/6 = 16.5 per step puts 16.5 -> 16, 49.5 -> 50, 82.5 -> 82.
    assert dig.space_timesteps(1000, "3") == [0, 500, 999]
    assert dig.space_timesteps(1000, "4") == [0, 333, 666, 999]
    assert dig.space_timesteps(100, "7") == [0, 16, 33, 50, 66, 82, 99]
    assert dig.space_timesteps(100, "2,3") == [0, 49, 50, 74, 99]    # two sections of 50: 0..49 and 50..99
    assert dig.space_timesteps(1000, "ddim4") == [0, 250, 500, 750]


def test_respaced_sampler_calls_the_model_with_original_steps():
    spaced = dig.create_diffusion("10")
    seen = []

    def model(x, t):
        seen.append(t[0].item())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    spaced.p_sample_loop(model, (2, 1, 2, 2), noise=torch.randn(2, 1, 2, 2))
    assert seen == sorted(spaced.timestep_map.tolist(), reverse=True) and seen[0] == 999 and seen[-1] == 0


# --- sampling ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_looking_model():
    torch.manual_seed(0)
    return randomize_(tiny_dig(in_channels=3), std=0.05).eval()


ABAR = torch.tensor([abar_by_hand(t) for t in range(1000)], dtype=torch.float64)   # the schedule, by hand


class PerfectModel(torch.nn.Module):
    """A stand-in for DiG that knows the answer: label y means the clean image x0 = table[y] (the last row is
    the null label's), and its eps is exactly the noise that leads from that x0 to the x_t it is given,
    eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), with the schedule worked out by hand. It records the x_t
    and eps of every call. Guidance goes through DiG's own forward_with_cfg."""

    forward_with_cfg = dig.DiffusionTransformer.forward_with_cfg

    def __init__(self, table, v=0.0):
        super().__init__()
        self.table = table.double()
        self.num_classes, self.in_channels, self.input_size = len(table) - 1, table.shape[1], table.shape[-1]
        self.v = v                       # the variance value: -1 is the true posterior variance
        self.unused = torch.nn.Parameter(torch.zeros(1))   # sample() finds the device through the parameters
        self.seen = []

    def forward(self, x, t, y):
        abar = ABAR[t].view(-1, 1, 1, 1)
        eps = (x.double() - abar.sqrt() * self.table[y]) / (1 - abar).sqrt()
        self.seen.append((t[0].item(), x.clone(), eps.float()))
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1).float()


def perfect_model(num_classes=3, channels=2, side=4, **kwargs):
    return PerfectModel(torch.rand(num_classes + 1, channels, side, side) * 2 - 1, **kwargs)


@pytest.mark.parametrize("steps", [2, 10, 250, 1000])
def test_ddim_eta0_follows_the_true_noise_to_x0(steps):
    # DDIM with eta = 0 moves along x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e for one fixed e: started there
    # at t = 999, a perfect model must be handed points of that path at every respaced step and end at x0.
    # A step that uses the wrong abar, or calls the model with the wrong original t, breaks the chain.
    model = perfect_model()
    labels = torch.tensor([0, 2, 1])
    x0 = model.table[labels].float()
    e = torch.randn_like(x0)
    noise = math.sqrt(abar_by_hand(999)) * x0 + math.sqrt(1 - abar_by_hand(999)) * e
    out = dig.sample(model, labels, steps=steps, sampler="ddim", noise=noise)
    assert len(model.seen) == steps and model.seen[0][0] == 999 and model.seen[-1][0] == 0
    for t, x, _ in model.seen:       # float32 rounding, amplified by 1 / sqrt(abar_999) = 157 on a long jump
        on_path = math.sqrt(abar_by_hand(t)) * x0 + math.sqrt(1 - abar_by_hand(t)) * e
        torch.testing.assert_close(x, on_path, atol=1e-4, rtol=0, msg=f"x_t at step {t} of {steps}")
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    model = perfect_model()
    labels, noise = torch.tensor([1, 2]), torch.randn(2, 2, 4, 4)
    a = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise)
    torch.manual_seed(123)                                   # other global RNG state: must not matter
    b = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise)
    assert torch.equal(a, b)
    model.seen.clear()
    c = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise, eta=1.0)
    # eta = 1 adds fresh noise on the way (the implied eps changes from step to step) but still ends at x0.
    assert not torch.allclose(model.seen[5][2], model.seen[4][2], atol=1e-2)
    torch.testing.assert_close(c, model.table[labels].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_mixes_the_two_predictions(sampler):
    # eps_guided = eps_uncond + s (eps_cond - eps_uncond) is linear in x0, so with a perfect model the guided
    # sample is exactly x0_null + s (x0_label - x0_null). The halves of the batch must not be mixed up.
    model = perfect_model(num_classes=5)
    labels = torch.tensor([4, 0, 3])
    cond, null = model.table[labels].float(), model.table[5].float()
    for scale in (0.0, 1.0, 1.7, 4.0):
        out = dig.sample(model, labels, steps=20, sampler=sampler, cfg_scale=scale, noise=torch.randn_like(cond),
                         generator=torch.Generator().manual_seed(fresh_seed()))
        torch.testing.assert_close(out, null + scale * (cond - null), atol=1e-4, rtol=0, msg=f"scale {scale}")


def test_ddpm_keeps_the_marginals_of_a_perfect_model():
    # Ancestral sampling with the true posterior (v = -1) and a perfect model draws x_{t-1} ~ q(x_{t-1} | x_t, x0),
    # which keeps x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t) at every step: check the moments of the
    # x_t the model is given, over 20,000 pixels that share one x0 value, and that the last step returns x0.
    seed = fresh_seed()
    model = PerfectModel(torch.full((2, 1, 100, 100), 0.8), v=-1.0)
    labels = torch.tensor([0, 0])
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(2, 1, 100, 100, generator=gen)
    noise = math.sqrt(abar_by_hand(999)) * 0.8 + math.sqrt(1 - abar_by_hand(999)) * e      # x_999 ~ q(x_999 | x0)
    out = dig.sample(model, labels, steps=25, sampler="ddpm", noise=noise, generator=gen)
    assert len(model.seen) == 25
    for t, x, _ in model.seen:
        abar = abar_by_hand(t)
        assert x.mean().item() == pytest.approx(math.sqrt(abar) * 0.8, abs=0.03), f"mean at step {t} (seed {seed})"
        assert x.var().item() == pytest.approx(1 - abar, rel=0.06), f"variance at step {t} (seed {seed})"
    torch.testing.assert_close(out, torch.full_like(out, 0.8), atol=1e-5, rtol=0)


def test_ddpm_samples_are_finite_and_seeded(trained_looking_model):
    model = trained_looking_model
    labels = torch.tensor([0, 5, 9])
    a = dig.sample(model, labels, steps=20, generator=torch.Generator().manual_seed(7))
    b = dig.sample(model, labels, steps=20, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 3, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    guided = dig.sample(model, labels, steps=20, cfg_scale=4.0, generator=torch.Generator().manual_seed(7))
    assert guided.shape == a.shape and torch.isfinite(guided).all() and not torch.allclose(guided, a)


def test_guidance_scale_one_equals_the_conditional_model(trained_looking_model):
    # The guided path (batch doubled, null labels) at a scale of 1 must reproduce the plain conditional sampler.
    model = trained_looking_model
    labels = torch.tensor([3, 4])
    noise = torch.randn(2, 3, 8, 8)
    plain = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise, cfg_scale=1.0)
    guided_path = dig.sample(model, labels, steps=10, sampler="ddim", noise=noise, cfg_scale=1.0 + 1e-12)
    torch.testing.assert_close(guided_path, plain, atol=1e-4, rtol=1e-4)


def test_fixed_variance_model_trains_and_samples():
    # learn_sigma=False: the model predicts eps only; the variance is fixed and the loss is the MSE alone.
    model = randomize_(tiny_dig(in_channels=3, learn_sigma=False), std=0.05).eval()
    x, t, y = model_inputs(model, n=2)
    losses = dig.create_diffusion().training_losses(model, x, t, {"y": y})
    assert torch.equal(losses["vb"], torch.zeros(2)) and torch.equal(losses["loss"], losses["mse"])
    out = dig.sample(model, y, steps=5, cfg_scale=2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sample_rejects_bad_arguments(trained_looking_model):
    with pytest.raises(ValueError, match="sampler"):
        dig.sample(trained_looking_model, torch.tensor([1]), steps=5, sampler="euler")
    with pytest.raises(ValueError, match="noise"):
        dig.sample(trained_looking_model, torch.tensor([1]), steps=5, noise=torch.randn(1, 3, 4, 4))


def test_fixed_variance_is_the_large_choice(diffusion):
    # Without a learned sigma the model's variance is beta_t (beta~_1 at t = 0), not the posterior's beta~_t.
    t = torch.tensor([0, 1, 500, 999])
    log_var = diffusion._p_from_output(torch.zeros(4, 1, 1, 1), torch.zeros(4, 1, 1, 1), t)["log_variance"].flatten()
    posterior_1 = beta_by_hand(1) * (1 - abar_by_hand(0)) / (1 - abar_by_hand(1))
    want = torch.tensor([math.log(posterior_1)] + [math.log(beta_by_hand(s)) for s in (1, 500, 999)])
    torch.testing.assert_close(log_var, want, rtol=1e-5, atol=0)


def test_vb_after_t0_is_the_kl_in_bits(diffusion):
    # eps off by 0.5 everywhere and v = -1 (the posterior's own variance): per pixel KL = (mu - mu^)^2 / (2 var),
    # mu - mu^ = coef1 (x0 - x0^) = coef1 sqrt(1 / abar - 1) 0.5; reported in bits.
    t = torch.tensor([1, 10, 500, 999])
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    out = torch.cat([noise + 0.5, -torch.ones_like(noise)], 1)
    vb = diffusion.training_losses(lambda x, t: out, x0, t, noise=noise)["vb"]
    for i, s in enumerate(t.tolist()):
        beta, abar, abar_prev = beta_by_hand(s), abar_by_hand(s), abar_by_hand(s - 1)
        var, coef1 = beta * (1 - abar_prev) / (1 - abar), beta * math.sqrt(abar_prev) / (1 - abar)
        kl = (coef1 * math.sqrt(1 / abar - 1) * 0.5) ** 2 / (2 * var)
        assert vb[i].item() == pytest.approx(kl / math.log(2), rel=1e-3), s


def test_loss_is_mse_plus_vb_and_trains_the_variance(diffusion):
    t = torch.tensor([0, 5, 500])
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    out = torch.cat([noise + 0.1, torch.zeros_like(noise)], 1).requires_grad_()
    losses = diffusion.training_losses(lambda x, t: out, x0, t, noise=noise)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    losses["loss"].sum().backward()
    assert out.grad[:, 2:].abs().max() > 0          # the v channels learn through vb alone


def test_ddim_with_noise_takes_the_step_of_the_formula():
    # Two steps with large betas (0.3, 0.5), a model whose eps is the constant e, x_1 = a, eta = 1. The step
    # 1 -> 0 draws x_0' = sqrt(abar_0) x0^ + sqrt(1 - abar_0 - s2) e + sqrt(s2) z, with
    # s2 = (1 - abar_0) / (1 - abar_1) (1 - abar_1 / abar_0); the last step returns (x_0' - sqrt(1 - abar_0) e) / sqrt(abar_0).
    e, a = 0.3, 0.5
    model = lambda x, t: torch.cat([torch.full_like(x, e), torch.zeros_like(x)], 1)
    out = dig.GaussianDiffusion([0.3, 0.5]).ddim_sample_loop(
        model, (1, 1, 300, 300), noise=torch.full((1, 1, 300, 300), a), eta=1.0,
        generator=torch.Generator().manual_seed(fresh_seed())).double()
    abar_0, abar_1 = 0.7, 0.7 * 0.5
    s2 = (1 - abar_0) / (1 - abar_1) * (1 - abar_1 / abar_0)
    x0_hat = (a - math.sqrt(1 - abar_1) * e) / math.sqrt(abar_1)
    mean = x0_hat + (math.sqrt(1 - abar_0 - s2) - math.sqrt(1 - abar_0)) * e / math.sqrt(abar_0)
    assert out.var().item() == pytest.approx(s2 / abar_0, rel=0.03)
    assert out.mean().item() == pytest.approx(mean, abs=5 * math.sqrt(s2 / abar_0 / 90000))


def test_ddim_with_noise_in_two_steps_is_finite():
    # The jump 999 -> 0 leaves 1 - abar_prev - sigma^2 at ~0, which float32 can round below zero.
    model = lambda x, t: torch.cat([torch.randn_like(x), torch.zeros_like(x)], 1)
    out = dig.create_diffusion("2").ddim_sample_loop(model, (2, 1, 8, 8), noise=torch.randn(2, 1, 8, 8), eta=1.0,
                                                     generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_ddpm_clips_the_predicted_x0_when_asked():
    model = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])   # eps = 0: x0^ = x / sqrt(abar)
    out = dig.create_diffusion("2").p_sample_loop(model, (2, 1, 4, 4), noise=torch.full((2, 1, 4, 4), 3.0),
                                                  clip_denoised=True, generator=torch.Generator().manual_seed(0))
    assert out.abs().max() <= 1.0


# =========================================================================================================
# 4. Training: a DiG learns (dig.py), then train_tiny.py: data loading, runs (smoke, time budget, exact
#    resume, NaN stop, bad checkpoints, latents, two processes under torchrun with gloo, more samples from a
#    finished run), the training step against textbook clipping/AdamW/EMA, real signals (SIGTERM, SIGINT,
#    SIGKILL, a kill mid-checkpoint), the kernel check and the ResNet-56 judge (accuracy and Frechet
#    distance). The runs use the CPU (bitwise-exact resume needs deterministic kernels); on a GPU, a run goes
#    end to end with the judge and --sample, and through its NaN stop and resume.


def test_every_parameter_gets_gradient_after_a_step():
    torch.manual_seed(0)
    model = tiny_dig()
    diffusion = dig.create_diffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, _, y = model_inputs(model, n=4)
    t = torch.tensor([0, 10, 500, 999])
    # Zero-initialised layers pass no gradient on: step 1 moves only the final Linear, step 2 the adaLN
    # layers, and from step 3 on every parameter learns.
    for _ in range(3):
        opt.zero_grad()
        diffusion.training_losses(model, x, t, {"y": y})["loss"].mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        if name == "pos_embed":
            assert p.grad is None and not p.requires_grad
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def overfit_mixing_task(steps=150, seed=0):
    """Train a tiny DiG on one batch that only token mixing can fit; returns the MSE at each step.

    The 8 noisy inputs x_t are the same image except for its top-left patch, and each has its own random
    noise eps everywhere. The depthwise convs are frozen at the identity, so GLA is the only way from the
    top-left patch to the other 15 tokens: without it, the best a network can do there is the mean of the 8
    targets, an MSE of at least 7/8 * 15/16 = 0.82 (of the initial 1).
    """
    torch.manual_seed(seed)
    model = tiny_dig(input_size=8, class_dropout_prob=0.0)
    for block in model.blocks:
        block.dwconv.requires_grad_(False)
    diffusion = dig.create_diffusion()
    x_t = torch.randn(1, 4, 8, 8).repeat(8, 1, 1, 1)
    x_t[:, :, :2, :2] = torch.randn(8, 4, 2, 2)            # the only difference between the 8 inputs
    noise = torch.randn(8, 4, 8, 8)
    t, y = torch.full((8,), 500), torch.full((8,), 3)
    abar = diffusion.alphas_cumprod[500]
    x0 = (x_t - math.sqrt(1 - abar) * noise) / math.sqrt(abar)   # so that q_sample(x0, t, noise) is x_t
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0)
    mses = []
    for _ in range(steps):
        losses = diffusion.training_losses(model, x0, t, {"y": y}, noise=noise)
        opt.zero_grad()
        losses["loss"].mean().backward()
        opt.step()
        mses.append(losses["mse"].mean().item())
    return mses


def test_small_dig_overfits_one_batch():
    # Fixed batch, fixed steps and fixed noise: memorising eps must drive the MSE far below its initial 1,
    # on a batch where that needs GLA to carry information between tokens (see overfit_mixing_task).
    mses = overfit_mixing_task()
    assert mses[0] == pytest.approx(1.0, abs=0.3)           # the model outputs 0 at init: MSE = E[noise^2]
    assert mses[-1] < mses[0] / 100, f"MSE {mses[0]:.3f} -> {mses[-1]:.3f}"


def test_train_step_closure_runs_under_bf16_autocast():
    model = tiny_dig()
    before = [p.detach().clone() for p in model.parameters()]
    step = dig.make_train_step(model, batch=2, device=torch.device("cpu"))
    step()
    step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


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


# --- data -------------------------------------------------------------------------------------------------

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


# --- training runs ----------------------------------------------------------------------------------------

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
    result = train_tiny.main(TINY + ["--data-dir", cifar_dir, "--out", out, "--minutes", "1e-6"])
    assert result["step"] == 1  # out of time after the first step; checkpoint and samples still written
    assert os.path.exists(os.path.join(out, "ckpt.pt")) and os.path.exists(os.path.join(out, "samples_0000001.png"))
    # Resuming a run whose time is spent trains nothing more (e.g. to add --classifier afterwards).
    assert train_tiny.main(["--resume", out, "--device", "cpu"])["step"] == 1


def test_new_run_refuses_to_overwrite_an_old_one(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    train_tiny.main(TINY + ["--data-dir", cifar_dir, "--out", out, "--steps", "1"])
    with pytest.raises(SystemExit, match="already holds a run"):
        train_tiny.main(TINY + ["--data-dir", cifar_dir, "--out", out, "--steps", "1"])


@needs_gpu
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


def test_update_ema_moves_toward_the_model_by_one_minus_decay():
    torch.manual_seed(fresh_seed())
    model, ema = randomize_(tiny_dig(), seed=1), randomize_(tiny_dig(), seed=2)
    model_before = copy.deepcopy(model.state_dict())
    ema_before = copy.deepcopy(ema.state_dict())
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    train_tiny.update_ema(ema_params, model_params, 0.9)
    for name, p in ema.state_dict().items():
        expected = ema_before[name] + 0.1 * (model_before[name] - ema_before[name])
        torch.testing.assert_close(p, expected, atol=1e-7, rtol=1e-6, msg=name)
    assert any(not torch.equal(ema_before[n], model_before[n]) for n in ema_before)   # it had somewhere to go
    for name, p in model.state_dict().items():
        assert torch.equal(p, model_before[name]), f"update_ema changed the model's {name}"
    train_tiny.update_ema(ema_params, model_params, 0.0)                 # decay 0: a copy of the model
    for name, p in ema.state_dict().items():
        assert torch.equal(p, model_before[name]), name
    train_tiny.update_ema(ema_params, list(randomize_(tiny_dig(), seed=3).parameters()), 1.0)   # decay 1: frozen
    for name, p in ema.state_dict().items():
        assert torch.equal(p, model_before[name]), name


def test_training_run_with_ema_decay_0_keeps_ema_equal_to_model(cifar_dir, tmp_path):
    # The run's own call of update_ema, end to end: with --ema 0 the EMA is the trained model at every step,
    # and the model did train (its zero-initialised final layer moved).
    out = str(tmp_path / "ema0")
    train_tiny.main(TINY[:TINY.index("--ema")] + ["--ema", "0"] + TINY[TINY.index("--ema") + 2:]
                    + ["--data-dir", cifar_dir, "--out", out, "--steps", "2", "--sample-every", "0"])
    model, ema = weights(os.path.join(out, "ckpt.pt")), weights(os.path.join(out, "ckpt.pt"), "ema")
    assert model.keys() == ema.keys()
    for name in model:
        assert torch.equal(model[name], ema[name]), name
    assert model["final_layer.linear.weight"].abs().max() > 0


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


@pytest.mark.parametrize("labels,latents,message", [
    ([0, -1], [[0.0], [1.0]], "labels >= 0"),
    ([0, 1], [[0.0], [float("nan")]], "finite"),
    ([], [], "at least one example"),
])
def test_bad_latents_rejected(tmp_path, labels, latents, message):
    path = str(tmp_path / "bad.npz")
    x = np.asarray(latents, dtype=np.float32).reshape(-1, 1, 1, 1) * np.ones((1, 4, 8, 8), np.float32)
    np.savez(path, latents=x, labels=np.asarray(labels, dtype=np.int64))
    with pytest.raises(SystemExit, match=message):
        train_tiny.load_latents(path)


def test_bad_settings_rejected(cifar_dir, tmp_path):
    with pytest.raises(SystemExit, match="--log-every must be at least 1"):
        train_tiny.main(TINY + ["--data-dir", cifar_dir, "--out", str(tmp_path / "a"), "--steps", "1",
                                "--log-every", "0"])


def test_torchrun_two_processes_gloo(cifar_dir, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train_tiny.py")] + TINY + ["--data-dir", cifar_dir, "--out", out, "--steps", "2"]
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)["step"] == 2


def test_sample_from_a_finished_run(smoke_run, cifar_dir, tmp_path):
    out = smoke_run[0]
    path = tmp_path / "r56.th"   # random weights: the numbers mean nothing, the pipeline is what is tested
    torch.manual_seed(0)
    torch.save(train_tiny.ResNet56().state_dict(), path)
    result = train_tiny.main(["--resume", out, "--sample", "12", "--device", "cpu", "--classifier", str(path)])
    with np.load(result["npz"]) as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert Image.open(result["npz"][:-4] + ".png").size == (10 * 34 + 2, 2 * 34 + 2)
    assert 0 <= result["accuracy"] <= 1 and result["frechet_distance"] >= 0 and result["samples"] == 12
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4   # nothing trained
    with pytest.raises(SystemExit, match="--resume"):
        train_tiny.main(TINY + ["--data-dir", cifar_dir, "--sample", "5"])


def test_classifier_reports_accuracy_and_frechet_distance(cifar_dir, tmp_path):
    path = tmp_path / "r56.th"
    torch.manual_seed(0)
    torch.save(train_tiny.ResNet56().state_dict(), path)
    out = str(tmp_path / "judged")
    result = train_tiny.main(TINY + ["--data-dir", cifar_dir, "--out", out, "--steps", "1", "--classifier",
                                     str(path), "--eval-per-class", "2"])
    with open(os.path.join(out, "eval.json")) as f:
        scores = json.load(f)
    assert scores["samples"] == 20 and len(scores["per_class"]) == 10
    assert scores["frechet_distance"] == pytest.approx(result["frechet_distance"]) and scores["frechet_distance"] > 0


def test_train_step_is_clip_adamw_and_ema():
    # TrainStep's flat gradient buffer, its clipping and its EMA give what the textbook calls would.
    args, _ = train_tiny.parse_args(TINY[:-2] + ["--device", "cpu", "--steps", "1"])
    train_tiny.fill_defaults(args, 1)
    torch.manual_seed(0)
    model = train_tiny.build_model(args, 32, 3, 10)
    ref = copy.deepcopy(model)
    ema, ref_ema = (copy.deepcopy(model).requires_grad_(False) for _ in range(2))
    diffusion = dig.create_diffusion()
    x_all, y_all = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.arange(16) % 10
    batch = train_tiny.draw_batch(x_all, y_all, 0, args, 0, 1, torch.device("cpu"), False, 1000, 0.5,
                                  torch.Generator())
    step = train_tiny.TrainStep(model, ema, train_tiny.make_optimizer(model, args),
                                diffusion, 0.01, 1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=args.lr, weight_decay=0)
    for _ in range(2):
        loss, grad_norm = step(batch)
        step.update(args.lr, 0.9)
        ref_loss = diffusion.training_losses(ref, batch["x"], batch["t"], noise=batch["noise"], model_kwargs=dict(
            y=batch["y"], force_drop_ids=batch["drop"]))["loss"].mean()
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
        ref_opt.step()
        torch._foreach_lerp_(list(ref_ema.parameters()), list(ref.parameters()), 0.1)
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(grad_norm, ref_norm, rtol=1e-5, atol=0)
    for a, b in zip([*model.parameters(), *ema.parameters()], [*ref.parameters(), *ref_ema.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- stopping and crashing: real signals to a training process ---------------------------------------------

def start_training(argv, code=None):
    """train_tiny.py (or `python -c code`) in a child process on one thread, so its arithmetic is this one's."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable] + (["-c", code] if code else [os.path.join(HERE, "train_tiny.py")]) + argv
    return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc, text):
    """The child's output up to and including the first line that contains `text`."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"the child ended before printing {text!r}:\n" + "".join(lines)[-3000:])


def assert_same_weights(run_a, run_b):
    for key in ("model", "ema"):
        a, b = weights(os.path.join(run_a, "ckpt.pt"), key), weights(os.path.join(run_b, "ckpt.pt"), key)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{key}.{name} differs"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_writes_checkpoint_and_resume_matches(cifar_dir, tmp_path, sig):
    base = TINY + ["--data-dir", cifar_dir, "--sample-every", "0", "--ckpt-every", "0"]
    out = str(tmp_path / "stopped")
    proc = start_training(base + ["--out", out, "--steps", "100000"])
    read_until(proc, "step 3/")
    os.kill(proc.pid, getattr(signal, sig))
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, rest
    assert f"stopped by {sig}" in rest and f"--resume {out}" in rest
    reached = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert reached >= 3 and f"after step {reached};" in rest
    train_tiny.main(["--resume", out, "--steps", str(reached + 2), "--device", "cpu"])
    straight = str(tmp_path / "straight")
    train_tiny.main(base + ["--out", straight, "--steps", str(reached + 2)])
    assert_same_weights(out, straight)
    assert [s for s, _ in train_tiny.read_log(os.path.join(out, "log.csv"))] == list(range(1, reached + 3))


def test_sigkill_at_random_moments_loses_nothing(cifar_dir, tmp_path):
    rng = random.Random(0)
    base = TINY + ["--data-dir", cifar_dir, "--sample-every", "0", "--ckpt-every", "1", "--steps", "14"]
    out = str(tmp_path / "killed")
    for target in (2, 7):           # kill somewhere after step `target` was logged: mid-step or mid-checkpoint
        resume = ["--resume", out] if os.path.exists(os.path.join(out, "ckpt.pt")) else ["--out", out]
        proc = start_training(base + resume)
        read_until(proc, f"step {target}/")
        time.sleep(rng.uniform(0, 0.05))
        proc.kill()
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        train_tiny.load_checkpoint(out)   # always an intact checkpoint
    assert train_tiny.main(base + ["--resume", out])["step"] == 14
    straight = str(tmp_path / "straight")
    train_tiny.main(base + ["--out", straight])
    assert_same_weights(out, straight)
    assert [s for s, _ in train_tiny.read_log(os.path.join(out, "log.csv"))] == list(range(1, 15))


# A child whose second checkpoint write stops half-way (and waits there to be killed). The production code
# has no hook for this: the child replaces torch.save before running train_tiny.main.
HALF_WRITTEN_SAVE = """
import io, sys, time, torch
sys.path.insert(0, {here!r})
import train_tiny
real_save, calls = torch.save, []
def half_save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) < 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    f.flush()
    print("HALF WRITTEN", flush=True)
    time.sleep(120)
torch.save = half_save
train_tiny.main(sys.argv[1:])
"""


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(cifar_dir, tmp_path):
    out = str(tmp_path / "run")
    argv = TINY + ["--data-dir", cifar_dir, "--out", out, "--sample-every", "0", "--ckpt-every", "2",
                   "--steps", "5"]
    proc = start_training(argv, code=HALF_WRITTEN_SAVE.format(here=HERE))
    read_until(proc, "HALF WRITTEN")   # writing the step-4 checkpoint
    proc.kill()
    proc.communicate(timeout=60)
    with pytest.raises(Exception):    # the half-written file is garbage ...
        torch.load(os.path.join(out, "ckpt.pt.tmp"), weights_only=True)
    assert train_tiny.load_checkpoint(out)[1]["step"] == 2   # ... and the step-2 checkpoint is intact
    assert train_tiny.main(["--resume", out, "--device", "cpu"])["step"] == 5


# --- on a GPU ----------------------------------------------------------------------------------------------

@needs_gpu
def test_gpu_run_nan_stop_and_resume(cifar_dir, tmp_path, monkeypatch):
    real = train_tiny.draw_batch

    def poisoned(x_all, y_all, step, *args):   # step index 4 (the 5th step) gets NaN noise
        batch = real(x_all, y_all, step, *args)
        if step == 4:
            batch["noise"] = batch["noise"] * float("nan")
        return batch
    monkeypatch.setattr(train_tiny, "draw_batch", poisoned)
    out = str(tmp_path / "nan")
    argv = TINY[:-1] + ["cuda", "--data-dir", cifar_dir, "--out", out, "--ckpt-every", "2", "--sample-every", "0"]
    with pytest.raises(SystemExit, match=r"(?s)nan.*step 5.*step 4"):
        train_tiny.main(argv + ["--steps", "8"])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    monkeypatch.setattr(train_tiny, "draw_batch", real)
    assert train_tiny.main(["--resume", out, "--steps", "6"])["step"] == 6
    # and a resumed run ends where an uninterrupted one does, up to GPU rounding
    straight = str(tmp_path / "straight")
    train_tiny.main(argv[:argv.index("--out")] + ["--out", straight, "--steps", "6", "--sample-every", "0"])
    a, b = weights(os.path.join(out, "ckpt.pt")), weights(os.path.join(straight, "ckpt.pt"))
    # up to rounding: each AdamW step moves a weight by at most about lr (1e-3 here), so a gradient sign that
    # rounding flips costs at most 2 * lr per step; nearly all weights must agree much more closely.
    diff = torch.cat([(a[name] - b[name]).abs().flatten() for name in a])
    assert diff.max() < 6 * 2e-3 and (diff > 1e-4).float().mean() < 0.01, (diff.max(), diff.mean())


def gpu_train_step_pair(model_name, depth, hidden, heads):
    """Two identical (model, ema, optimizer) sets on the GPU: one for an eager step, one for a compiled one."""
    args, _ = train_tiny.parse_args(["--model", model_name, "--depth", str(depth), "--hidden-size", str(hidden),
                                     "--num-heads", str(heads), "--device", "cuda", "--steps", "1",
                                     "--batch-size", "32"])
    train_tiny.fill_defaults(args, 1)
    torch.manual_seed(0)
    model = randomize_(train_tiny.build_model(args, 32, 3, 10), std=0.02).cuda()
    pairs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        ema = copy.deepcopy(m).requires_grad_(False).eval()
        pairs.append((m, ema, train_tiny.make_optimizer(m, args)))
    return args, pairs


@needs_gpu
@pytest.mark.parametrize("model_name", ["DiG-S/2", "DiT-S/2"])
def test_gpu_compiled_train_step_matches_eager_step(model_name):
    # The default GPU step (compiled blocks, forward and backward replayed from a CUDA graph) against the eager
    # step on the same weights and batches: the same loss, gradient norm and, after the update, weights, up to
    # bf16 rounding. Two steps with different batches: a graph that kept reading its first batch would fail.
    args, [(m0, e0, o0), (m1, e1, o1)] = gpu_train_step_pair(model_name, 4, 128, 2)
    diffusion, device = dig.create_diffusion(), torch.device("cuda")
    x_all = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=device)
    y_all = torch.arange(64, device=device) % 10
    gen = torch.Generator(device=device)
    batch = lambda s: train_tiny.draw_batch(x_all, y_all, s, args, 0, 1, device, False, 1000, 0.1, gen)
    eager = train_tiny.TrainStep(m0, e0, o0, diffusion, 1.0, 1)
    initial = {k: v.clone() for k, v in m1.state_dict().items()}
    fast = train_tiny.CompiledTrainStep(dig.compile_blocks(m1), e1, o1, diffusion, 1.0, 1, batch(0))
    for s in range(2):
        b = batch(s)
        (l0, n0), (l1, n1) = eager(b), fast(b)
        torch.testing.assert_close(l1, l0, rtol=2e-2, atol=0, msg=f"loss at step {s}")
        torch.testing.assert_close(n1, n0, rtol=5e-2, atol=0, msg=f"gradient norm at step {s}")
        g0, g1 = eager.flat_grad.clone(), fast.flat_grad.clone()
        assert (g1 - g0).norm() < 0.05 * g0.norm(), f"gradients differ at step {s}"
        eager.update(1e-3, 0.5)
        fast.update(1e-3, 0.5)
    for name, model_a, model_b in (("model", m0, m1), ("ema", e0, e1)):
        a, b = model_a.state_dict(), model_b.state_dict()
        # AdamW moves a weight by about lr (1e-3) per step whatever the gradient's size, so rounding that
        # flips a gradient's sign costs up to 2e-3 per step; nearly all weights must agree far more closely.
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert diff.max() < 4 * 2e-3 and (diff > 2e-4).float().mean() < 0.02, (name, diff.max(), diff.mean())
    moved = sum((initial[k] - v).abs().max() > 1e-3 for k, v in m1.state_dict().items())
    assert moved > len(initial) // 2, f"only {moved} of {len(initial)} tensors moved: the update did not run"


@needs_gpu
def test_gpu_graphed_sampler_matches_eager_sampler():
    # dig.sample through GraphedDenoiser (compiled EMA blocks, CUDA graphs) against the plain network: with and
    # without guidance, two batch sizes (one graph each), DDIM so that the only difference is rounding.
    torch.manual_seed(0)
    net = randomize_(tiny_dig(depth=4), std=0.05).cuda().eval()
    graphed = train_tiny.GraphedDenoiser(dig.compile_blocks(copy.deepcopy(net)))
    for n, cfg in ((6, 3.0), (5, 1.0), (6, 3.0)):
        labels = torch.arange(n, device="cuda") % net.num_classes
        noise = torch.randn(n, net.in_channels, net.input_size, net.input_size, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = dig.sample(net, labels, steps=10, cfg_scale=cfg, sampler="ddim", noise=noise)
            got = dig.sample(graphed, labels, steps=10, cfg_scale=cfg, sampler="ddim", noise=noise)
        assert torch.isfinite(got).all()
        assert (got - ref).norm() < 0.03 * ref.norm(), (n, cfg, ((got - ref).norm() / ref.norm()).item())
    assert len(graphed.graphs) == 2     # the third call replayed the first graph


@needs_gpu
def test_gpu_run_end_to_end(cifar_dir, tmp_path):
    if os.path.exists(REAL_RESNET):
        judge = REAL_RESNET
    else:
        judge = str(tmp_path / "r56.th")
        torch.save(train_tiny.ResNet56().state_dict(), judge)
    out = str(tmp_path / "gpu")
    argv = TINY[:-1] + ["cuda", "--data-dir", cifar_dir, "--out", out, "--steps", "3", "--sample-every", "2",
                        "--classifier", judge, "--eval-per-class", "3"]
    result = train_tiny.main(argv)
    assert result["step"] == 3 and 0 <= result["accuracy"] <= 1 and result["frechet_distance"] > 0
    for name in ("samples_0000002.png", "samples_0000003.png", "eval.json", "loss.png"):
        assert os.path.exists(os.path.join(out, name)), name
    more = train_tiny.main(["--resume", out, "--sample", "25"])
    with np.load(more["npz"]) as f:
        assert f["images"].shape == (25, 32, 32, 3) and f["labels"].shape == (25,)
    assert "frechet_distance" in more


@needs_gpu
def test_gpu_latents_run_and_more_samples(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "latents.npz")
    np.savez(path, latents=rng.standard_normal((48, 4, 8, 8)).astype(np.float32), labels=rng.integers(0, 5, 48))
    out = str(tmp_path / "lat")
    tiny = TINY[:1] + ["DiG-S/2"] + TINY[2:-1] + ["cuda"]
    assert train_tiny.main(tiny + ["--latents", path, "--out", out, "--steps", "3"])["step"] == 3
    assert os.path.exists(os.path.join(out, "samples_0000003.png"))
    more = train_tiny.main(["--resume", out, "--sample", "7"])
    with np.load(more["npz"]) as f:
        assert f["latents"].shape == (7, 4, 8, 8) and np.isfinite(f["latents"]).all()


# --- the kernel check -------------------------------------------------------------------------------------

def test_gla_kernel_check_passes():  # on a CPU: fp32 in Triton's interpreter (it has no bf16)
    tolerances = {torch.float32: 2e-3, torch.bfloat16: 1e-2} if GPU else {torch.float32: 2e-3}
    assert train_tiny.check_gla_kernel(torch.device("cuda" if GPU else "cpu"), tolerances) < 1e-2


def test_gla_kernel_check_refuses_a_wrong_kernel(monkeypatch):
    def wrong(*args, **kwargs):  # the reference, 5% off
        o, state = train_tiny.gla_kernel.naive_gla(*args, **kwargs)
        return o * 1.05, state
    monkeypatch.setattr(train_tiny.gla_kernel, "chunk_gla", wrong)
    with pytest.raises(SystemExit, match="refusing to train"):
        train_tiny.check_gla_kernel(torch.device("cpu"), {torch.float32: 2e-3})


# --- the ResNet-56 judge ----------------------------------------------------------------------------------

def test_resnet56_frechet_distance_of_gaussians():
    # N(m1, S1) vs N(m2, S2) with S1, S2 diagonal in one rotated basis Q: the distance is
    # |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2 (any common rotation leaves it unchanged).
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert train_tiny.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    assert train_tiny.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-9)
    # Covariances that do not commute: symmetric in its arguments, and the 1-D case is (m1-m2)^2 + (s1-s2)^2.
    c1, c2 = (lambda m: m @ m.T)(rng.standard_normal((6, 8))), (lambda m: m @ m.T)(rng.standard_normal((6, 3)))
    assert train_tiny.frechet_distance(m1, c1, m2, c2) == pytest.approx(
        train_tiny.frechet_distance(m2, c2, m1, c1), rel=1e-9)
    assert train_tiny.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)




def shared_cifar_images(n, seed):
    """n of the 20,000 real CIFAR-10 training images in ../shared/data/cifar10, decoded from the WebP sheets
    as its unpack.py does (a 100 x 100 grid of 32 x 32 images per sheet): uint8 [n, 32, 32, 3], labels [n]."""
    folder = os.path.join(SHARED_DATA, "cifar10")
    sheets = []
    for i in (1, 2):
        img = np.asarray(Image.open(os.path.join(folder, f"data_batch_{i}.webp")).convert("RGB"))
        x = img.reshape(100, 32, 100, 32, 3).transpose(0, 2, 1, 3, 4).reshape(10000, 32, 32, 3)
        sheets.append((x, np.load(os.path.join(folder, f"data_batch_{i}_labels.npy"))))
    x, y = np.concatenate([s[0] for s in sheets]), np.concatenate([s[1] for s in sheets])
    pick = np.random.default_rng(seed).choice(len(x), n, replace=False)
    return x[pick], y[pick]


@needs_shared_data
def test_resnet56_loads_the_pretrained_weights_and_classifies_real_images():
    judge = train_tiny.load_classifier(REAL_RESNET, torch.device("cpu"))
    assert sum(p.numel() for p in judge.parameters()) == 853_018  # He et al.: ResNet-56 has 0.85M parameters
    # The data's README: 99.985% on these training images. 500 of them, drawn afresh, in [0, 1] as the judge
    # reads samples; 97% leaves room for a few hard images, not for wrong weights or a wrong normalisation.
    seed = fresh_seed()
    x, y = shared_cifar_images(500, seed)
    assert len(set(y.tolist())) == 10
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        pred = torch.cat([judge(chunk).argmax(dim=1) for chunk in images.split(100)])
    accuracy = (pred == torch.from_numpy(y).long()).float().mean().item()
    assert accuracy >= 0.97, f"accuracy {accuracy:.3f} on 500 real images (seed {seed})"


@needs_shared_data
def test_resnet56_judge_on_real_images():
    x, y = shared_cifar_images(250, fresh_seed())
    images, labels = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long()
    cpu = torch.device("cpu")
    judge = train_tiny.load_classifier(REAL_RESNET, cpu)
    stats = train_tiny.feature_stats(judge, images, cpu)
    acc, per_class, fd = train_tiny.judge(judge, images, labels, stats, cpu)
    assert acc > 0.9 and fd == pytest.approx(0, abs=1e-6)   # training images: the classifier knows them
    distances = []
    for sigma in (8, 32):   # the same images with Gaussian noise of sigma grey levels: further and further
        noisy = (images.float() + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
        noisy = noisy.round().clamp(0, 255).to(torch.uint8)
        distances.append(train_tiny.frechet_distance(*train_tiny.feature_stats(judge, noisy, cpu), *stats))
    assert 0.01 < distances[0] < distances[1], distances

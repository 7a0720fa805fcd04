import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import torch.nn.functional as F

import gla_kernel
from gla_kernel import chunk_gla, chunk_gla_torch, naive_gla

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
DEVICE = "cuda" if GPU else "cpu"


# ---------------------------------------------------------------------------------------------------------
# GLA kernel


def make_gla_inputs(B, T, H, K, V, gates, with_initial_state, device="cpu", seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
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
    """Run fn in `dtype`, backpropagate the given output and final-state gradients, return all results."""
    xs = [x.to(dtype).detach().requires_grad_() for x in inputs]
    h = h0.to(torch.float32 if dtype != torch.float64 else dtype).detach().requires_grad_() if h0 is not None else None
    o, s = fn(*xs, initial_state=h, output_final_state=True)
    ((o.to(do.dtype) * do).sum() + (s.to(dht.dtype) * dht).sum()).backward()
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


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "d_initial_state"]
SHAPES = [  # B, T, H, K, V: T = 1, lengths off the chunk grid, K != V
    (2, 1, 2, 16, 32),
    (2, 17, 2, 32, 16),
    (1, 64, 3, 16, 32),
    (2, 100, 2, 32, 64),
    (1, 300, 2, 16, 16),
]


def check_against_naive(fn, shape, gates, with_h0, dtype, tol, device):
    inputs, h0 = make_gla_inputs(*shape, gates, with_h0)
    B, T, H, K, V = shape
    do, dht = torch.randn(B, T, H, V, dtype=torch.float64), torch.randn(B, H, K, V, dtype=torch.float64)
    ref = gla_and_grads(naive_gla, inputs, h0, do, dht, torch.float64)
    got = gla_and_grads(fn, [x.to(device) for x in inputs], h0.to(device) if h0 is not None else None,
                        do.to(device), dht.to(device), dtype)
    q, k = inputs[:2]
    dq, dk = ref[2:4]
    dg_terms = (q * dq).norm().item() + (k * dk).norm().item()   # dg sums q*dq - k*dk over later tokens
    for name, a, b in zip(NAMES, got, ref):
        assert_close(name, a, b, tol, magnitude=dg_terms if name == "dg" else 0.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gates,with_h0", [("mild", True), ("strong", False), ("mixed", True)])
def test_torch_chunked_matches_naive(shape, gates, with_h0):
    check_against_naive(chunk_gla_torch, shape, gates, with_h0, torch.float64, 1e-10, "cpu")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gates,with_h0", [("mild", True), ("strong", False), ("mixed", True), ("edge", True)])
def test_triton_fp32_matches_naive(shape, gates, with_h0):
    # 1e-4, not 1e-5: on a GPU tl.exp is the hardware exp2 (a few ulp), and G reaches tens in magnitude.
    check_against_naive(chunk_gla, shape, gates, with_h0, torch.float32, 1e-4 if GPU else 1e-5, DEVICE)


@pytest.mark.skipif(GPU, reason="CPU-only: fp16 tl.dot under the Triton interpreter")
def test_triton_fp16_interpreter():
    check_against_naive(chunk_gla, (2, 100, 2, 32, 64), "mixed", True, torch.float16, 5e-3, "cpu")


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", SHAPES + [(2, 1000, 4, 64, 64), (1, 4100, 2, 128, 128), (3, 257, 2, 32, 128)])
@pytest.mark.parametrize("gates", ["mild", "strong", "mixed", "edge"])
def test_triton_half_precision_on_gpu(shape, gates, dtype, tol):
    check_against_naive(chunk_gla, shape, gates, True, dtype, tol, "cuda")


@needs_gpu
def test_triton_long_sequence_fp32_on_gpu():
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


def test_triton_final_state_only_depends_on_prefix():
    (q, k, v, g), h0 = make_gla_inputs(1, 90, 2, 16, 16, "mixed", True, device=DEVICE)
    q, k, v, g, h0 = (x.float() for x in (q, k, v, g, h0))
    # Running 90 tokens at once equals running 50, then 40 from the 50-token final state.
    o, s = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o1, s1 = chunk_gla(q[:, :50], k[:, :50], v[:, :50], g[:, :50], initial_state=h0, output_final_state=True)
    o2, s2 = chunk_gla(q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], initial_state=s1, output_final_state=True)
    assert_close("o", torch.cat([o1, o2], dim=1), o, 1e-5)
    assert_close("final_state", s2, s, 1e-5)


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

"""
Gated Linear Attention (GLA): a naive reference, a PyTorch chunked path, and a compact Triton kernel.

Layout (as flash-linear-attention's chunk_gla): q, k, g are [B, T, H, K]; v and o are [B, T, H, V].
g is a log-space forget gate, g <= 0 (DiG uses logsigmoid(x) / 16). For each batch and head a state S of
shape [K, V] is carried through time in float32:

    S_t = diag(exp(g_t)) @ S_{t-1} + k_t^T v_t        # decay first, then write this token
    o_t = scale * q_t @ S_t

That loop is exact but sequential in T. The chunked form cuts the sequence into chunks of C tokens. With
G the cumulative sum of g inside a chunk (G_last its last row), a chunk needs only the state it starts from:

    o_chunk = scale * (q * exp(G)) @ S_prev  +  scale * tril((q * exp(G)) (k * exp(-G))^T) @ v
    S_next  = diag(exp(G_last)) @ S_prev  +  (k * exp(G_last - G))^T @ v

The trap is exp(-G): with strongly negative gates (g = -5 over 64 tokens is e^320) it overflows float32.
So the kernels only ever form exp(G) and exp(G_last - G), which are <= 1, and handle the causal part inside
a chunk in sub-chunks of 16 tokens, carrying the state from one to the next. Inside a sub-chunk
exp(G_i - G_j) = exp(G_i) * exp(-G_j) is safe while the sub-chunk's summed gate stays above -60 (with DiG's
gates in practice always: it takes gate logits below -60), which makes its causal weights one small matrix
product; below that the weights are formed element-wise, as a [16, 16, K] tile whose exponents G_i - G_j
(i >= j) are never positive.

The Triton version runs in three launches, forward and backward alike:
  1. every chunk in parallel: what it adds to the state (forward) or to the state's gradient (backward);
  2. a scan over the chunks of 64 tokens, the one sequential step (parallel over batch, head and tiles of
     the state; 16 chunks at a time through a parallel prefix scan), that turns those into the state
     (gradient) at every chunk boundary;
  3. every chunk in parallel again: given its boundary state, its outputs (forward) or dq, dk, dv and dg
     (backward), walking its four sub-chunks.

Gradient of the gate: o depends on g only through q_t exp(G_t) and k_t exp(-G_t) (G the cumulative sum
over the whole sequence), so dL/dG_t = q_t * dq_t - k_t * dk_t and dg_t is its reverse cumulative sum.
Inside a chunk we take that sum directly; the part contributed by all later chunks collapses to
sum_v(S_end * dS_end), the state at the chunk's end times the gradient flowing into it from later chunks.

q, k and v may be head views of one wider tensor (DiG slices them out of one projection output): the
kernels take each tensor's row stride and read them in place.

Sections: 1. reference and PyTorch chunked path  2. Triton kernels  3. PyTorch operator (forward, backward,
autograd, checks)  4. benchmark.
"""

import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


# -----------------------------------------------------------------------------------------------------------
# 1. The reference recurrence and the PyTorch chunked path


def _check_inputs(q, k, v, g, initial_state):
    if q.dim() != 4 or k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"q, k and g must all be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"g {tuple(g.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {B}, {T}, {H} as in q; got {tuple(v.shape)}")
    if T < 1:
        raise ValueError("the sequence must hold at least one token (T >= 1)")
    V = v.shape[-1]
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"initial_state must be [B, H, K, V] = {(B, H, K, V)}; got {tuple(initial_state.shape)}")
    dtypes = {q.dtype, k.dtype, v.dtype, g.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"q, k, v and g must share one dtype; got {sorted(str(d) for d in dtypes)}")


def naive_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """The GLA recurrence, one token at a time: the ground truth for everything else in this file.

    Computes in float32 (float64 when given float64) and returns (o in the input dtype, final state or None).
    """
    _check_inputs(q, k, v, g, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g = (x.to(acc) for x in (q, k, v, g))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    o = []
    for t in range(T):
        S = g[:, t, :, :, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        o.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(o, dim=1)                                                          # [B, T, H, V]
    return o.to(v.dtype), (S if output_final_state else None)


def chunk_gla_torch(q, k, v, g, scale=None, initial_state=None, output_final_state=False, check_gate=True,
                    chunk_size=16):
    """The chunked algorithm in plain PyTorch (autograd does the backward): the model's path on a CPU.

    Same arguments and result as chunk_gla (any device, dtype and head size), but no custom kernels: the
    T-long loop becomes T / chunk_size steps of matrix work. Gates must be <= 0, as for chunk_gla.
    """
    _check_inputs(q, k, v, g, initial_state)
    if check_gate:
        _check_gate(g)
    B, T, H, K = q.shape
    V, C = v.shape[-1], chunk_size
    scale = K ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = math.ceil(T / C)
    # Pad T up to n * C. Padded tokens have q = k = v = 0 and g = 0 (no decay), so they change nothing.
    pad = lambda x: F.pad(x.to(acc), (0, 0, 0, 0, 0, n * C - T))
    # [B, T, H, D] -> [B, H, n, C, D]
    q, k, v, g = (pad(x).view(B, n, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v, g))
    G = g.cumsum(dim=3)                                            # cumulative gate inside each chunk
    G_last = G[:, :, :, -1:, :]                                    # [B, H, n, 1, K]

    # Inside a chunk: A[i, j] = scale * sum_k q_ik k_jk exp(G_ik - G_jk) for i >= j, formed element-wise so
    # that no exponent is positive (masked before exp, so the masked entries are exactly 0).
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[..., None], -math.inf).exp()
    A = scale * torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, decay)  # [B, H, n, C, C]
    o = A @ v                                                       # [B, H, n, C, V]

    # Across chunks: carry the state, one step per chunk.
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    q_decayed = q * G.exp()                                         # exp(G) <= 1
    k_decayed = k * (G_last - G).exp()                              # exp(G_last - G) <= 1
    o_inter = []
    for i in range(n):
        o_inter.append(scale * q_decayed[:, :, i] @ S)              # [B, H, C, V]
        S = G_last[:, :, i, 0, :, None].exp() * S + k_decayed[:, :, i].transpose(-1, -2) @ v[:, :, i]
    o = o + torch.stack(o_inter, dim=2)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]    # back to [B, T, H, V]
    return o.to(v.dtype), (S if output_final_state else None)


# -----------------------------------------------------------------------------------------------------------
# 2. Triton kernels
#
# CHUNK = 64 tokens between stored states; SUB = 16 tokens per step inside a chunk (16 is the smallest tile
# tl.dot accepts, and it keeps the element-wise [16, 16, K] decay tile small enough for registers).
# Token t of batch b, head h, feature d lives at (b * T + t) * row_stride + h * D + d. A contiguous
# [B, T, H, D] tensor has row_stride = H * D; a slice of a wider [B, T, W] projection output has W, so q, k
# and v can be read straight out of one fused input projection without copies.

CHUNK, SUB = 64, 16


@triton.jit
def _load_tile(ptr, row_stride, b, h, t, cols, T, D: tl.constexpr):
    """Rows t (token indices) and columns `cols` of head h, as a [len(t), len(cols)] tile; rows past T are 0."""
    offs = (b * T + t[:, None]).to(tl.int64) * row_stride + h * D + cols[None, :]
    return tl.load(ptr + offs, mask=(t < T)[:, None], other=0.0)


@triton.jit
def _store_tile(ptr, x, row_stride, b, h, t, cols, T, D: tl.constexpr):
    offs = (b * T + t[:, None]).to(tl.int64) * row_stride + h * D + cols[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=(t < T)[:, None])


@triton.jit
def _load_sub_chunk(q, k, g, v, sq, sk, sg, sv, b, h, t, T, K: tl.constexpr, V: tl.constexpr):
    """q, k, g of tokens t as float32 [len(t), K] tiles and v as a [len(t), V] tile in its own dtype."""
    rk, rv = tl.arange(0, K), tl.arange(0, V)
    qs = _load_tile(q, sq, b, h, t, rk, T, K).to(tl.float32)
    ks = _load_tile(k, sk, b, h, t, rk, T, K).to(tl.float32)
    gs = _load_tile(g, sg, b, h, t, rk, T, K).to(tl.float32)
    vs = _load_tile(v, sv, b, h, t, rv, T, V)
    return qs, ks, gs, vs


@triton.jit
def _intra_decay(G, SUB: tl.constexpr):
    """exp(G_i - G_j) for i >= j and 0 above the diagonal: a [SUB, SUB, K] tile with no positive exponent."""
    i = tl.arange(0, SUB)
    causal = (i[:, None] >= i[None, :])[:, :, None]
    return tl.exp(tl.where(causal, G[:, None, :] - G[None, :, :], float("-inf")))


# Inside a sub-chunk, exp(G_i - G_j) = exp(G_i) * exp(-G_j) turns the [SUB, SUB, K] element-wise work into one
# small matrix product, which is far cheaper. That is safe while exp(-G) fits float32 (up to e^88), so the
# kernels take it when the sub-chunk's summed gate stays above -FACTOR_LIMIT (with DiG's gates, in practice
# always) and fall back to the element-wise tile otherwise. Both factors and the product stay in float32.
FACTOR_LIMIT = 60.0


@triton.jit
def _chunk_update_kernel(x, y, g, out, gate_sum, sx, sy, sg, T, NT, scale, H: tl.constexpr, K: tl.constexpr,
                         V: tl.constexpr, CHUNK: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr):
    """What chunk n adds to the scan, for all chunks in parallel. Grid (NT, B * H).

      forward  (x = k, y = v):   U_n = (k * exp(G_last - G))^T @ v      -> out slot n + 1
      backward (x = q, y = do):  U_n = scale * (q * exp(G))^T @ do     -> out slot n
    and gate_sum[n] = G_last, the chunk's total log decay. out has NT + 1 slots, one per chunk boundary.
    """
    n, i_bh = tl.program_id(0), tl.program_id(1)
    b, hh = i_bh // H, i_bh % H
    rk, rv = tl.arange(0, K), tl.arange(0, V)
    t = n * CHUNK + tl.arange(0, CHUNK)
    xc = _load_tile(x, sx, b, hh, t, rk, T, K)                                 # [CHUNK, K]
    gc = _load_tile(g, sg, b, hh, t, rk, T, K).to(tl.float32)
    yc = _load_tile(y, sy, b, hh, t, rv, T, V)                                 # [CHUNK, V]
    G = tl.cumsum(gc, axis=0)
    G_last = tl.sum(gc, axis=0)                                                # [K]
    if REVERSE:
        x_decayed = xc * tl.exp(G) * scale
        slot = n
    else:
        x_decayed = xc * tl.exp(G_last[None, :] - G)
        slot = n + 1
    U = tl.dot(tl.trans(x_decayed.to(yc.dtype)), yc, input_precision=PRECISION)  # [K, V]
    tl.store(out + ((i_bh.to(tl.int64) * (NT + 1) + slot) * K + rk[:, None]) * V + rv[None, :], U)
    tl.store(gate_sum + (i_bh.to(tl.int64) * NT + n) * K + rk, G_last)


@triton.jit
def _decay_then_add(a1, u1, a2, u2):
    """Two scan steps in one: S -> a1 * S + u1 followed by S -> a2 * S + u2 is S -> (a1 a2) S + (a2 u1 + u2)."""
    return a1 * a2, a2 * u1 + u2


@triton.jit
def _scan_kernel(states, gate_sum, initial, NT, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, STEPS: tl.constexpr, HAS_INITIAL: tl.constexpr, REVERSE: tl.constexpr):
    """The one sequential step: S <- exp(G_last of chunk n) * S + U_n, chunk after chunk, on a [BK, BV] tile.

    Grid (K / BK, V / BV, B * H). On entry `states` holds the updates U_n; on exit, the value at every chunk
    boundary: forward, the state before chunk n in slot n (slot NT: the final state); backward, the gradient
    of the state after chunk n in slot n + 1 (slot 0: the initial state's gradient). Each result overwrites
    the update it was made from.

    One chunk at a time, every step would wait for its own load from memory. Instead STEPS chunks are loaded
    at once and combined by a parallel prefix scan (the steps compose associatively, see _decay_then_add),
    which leaves one memory round trip per STEPS chunks on the sequential path.
    """
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rk, rv = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    tile = rk[:, None] * V + rv[None, :]                                      # [BK, BV]
    if HAS_INITIAL:
        S = tl.load(initial + i_bh.to(tl.int64) * K * V + tile).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    base = states + i_bh.to(tl.int64) * (NT + 1) * K * V
    tl.store(base + (NT if REVERSE else 0) * K * V + tile, S)
    p = tl.arange(0, STEPS)
    for start in range(0, NT, STEPS):
        valid = start + p < NT
        n = NT - 1 - (start + p) if REVERSE else start + p                    # [STEPS] chunks, in scan order
        slot = n if REVERSE else n + 1                                        # where U_n is, and S goes
        ptrs = base + slot[:, None, None].to(tl.int64) * K * V + tile[None, :, :]
        U = tl.load(ptrs, mask=valid[:, None, None], other=0.0)              # [STEPS, BK, BV]
        # Past the end: decay exp(0) = 1 and U = 0, a step that changes nothing.
        decay = tl.exp(tl.load(gate_sum + (i_bh.to(tl.int64) * NT + n[:, None]) * K + rk[None, :],
                               mask=valid[:, None], other=0.0))              # [STEPS, BK]
        decay = tl.broadcast_to(decay[:, :, None], (STEPS, BK, BV))
        A, B = tl.associative_scan((decay, U), 0, _decay_then_add)           # steps start .. start + s, composed
        S_all = A * S[None, :, :] + B                                         # [STEPS, BK, BV]: S after each
        tl.store(ptrs, S_all, mask=valid[:, None, None])
        S = tl.sum(tl.where((p == STEPS - 1)[:, None, None], S_all, 0.0), axis=0)   # the last one carries on


@triton.jit
def _fwd_output_kernel(q, k, v, g, h, o, sq, sk, sv, sg, T, NT, scale, H: tl.constexpr, K: tl.constexpr,
                       V: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, FACTOR_LIMIT: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Outputs of one chunk, given the state before it (h[n]). Grid (NT, B * H), all chunks in parallel.

    Walks the chunk in sub-chunks of SUB tokens: the carried state covers everything before the sub-chunk,
    the weights A = scale * tril(q_i k_j exp(G_i - G_j)) the causal interactions inside it.
    """
    n, i_bh = tl.program_id(0), tl.program_id(1)
    b, hh = i_bh // H, i_bh % H
    rk, rv, i = tl.arange(0, K), tl.arange(0, V), tl.arange(0, SUB)
    causal = i[:, None] >= i[None, :]
    S = tl.load(h + ((i_bh.to(tl.int64) * (NT + 1) + n) * K + rk[:, None]) * V + rv[None, :])   # [K, V]
    for s in range(CHUNK // SUB):
        t = n * CHUNK + s * SUB + i
        qs, ks, gs, vs = _load_sub_chunk(q, k, g, v, sq, sk, sg, sv, b, hh, t, T, K, V)   # [SUB, K] x3, [SUB, V]
        G = tl.cumsum(gs, axis=0)
        G_last = tl.sum(gs, axis=0)
        q_decayed = qs * tl.exp(G) * scale
        if tl.min(G_last, axis=0) > -FACTOR_LIMIT:
            A = tl.where(causal, tl.dot(q_decayed, tl.trans(ks * tl.exp(-G)), input_precision=PRECISION), 0.0)
        else:
            A = tl.sum(qs[:, None, :] * ks[None, :, :] * _intra_decay(G, SUB), axis=2) * scale
        os = tl.dot(q_decayed.to(vs.dtype), S.to(vs.dtype), input_precision=PRECISION)   # [SUB, V]
        os += tl.dot(A.to(vs.dtype), vs, input_precision=PRECISION)
        _store_tile(o, os, H * V, b, hh, t, rv, T, V)
        k_decayed = (ks * tl.exp(G_last[None, :] - G)).to(vs.dtype)
        S = S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(k_decayed), vs, input_precision=PRECISION)


@triton.jit
def _bwd_chunk_kernel(q, k, v, g, h, do, dh, dq, dk, dv, dg, dg_partial, sq, sk, sv, sg, sdo, T, NT, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                      FACTOR_LIMIT: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dk, dv, dg of one chunk, given the state before it (h[n]) and the gradient of the state after it
    (dh[n + 1]). Grid (NT, B * H), all chunks in parallel.

    A forward walk over the sub-chunks (carrying the state) gives dq; a backward walk (carrying the state's
    gradient) gives dk and dv. dg_t = sum over tokens t' >= t of (q*dq - k*dk)_t', split as
    [everything after this chunk] + [sum over the chunk of q*dq] - [q*dq before t] - [k*dk from t on].
    The first term is sum_v(S_end * dS_end); the forward walk leaves -[q*dq before t] in dg_partial (float32
    scratch) for the backward walk to finish.
    """
    n, i_bh = tl.program_id(0), tl.program_id(1)
    b, hh = i_bh // H, i_bh % H
    rk, rv, i = tl.arange(0, K), tl.arange(0, V), tl.arange(0, SUB)
    causal = i[:, None] >= i[None, :]
    S = tl.load(h + ((i_bh.to(tl.int64) * (NT + 1) + n) * K + rk[:, None]) * V + rv[None, :])   # [K, V]

    # Forward walk: dq_i = scale * (exp(G_i) * (do_i @ S^T) + sum_{j<=i} (do_i . v_j) k_j exp(G_i - G_j)).
    qdq_before = tl.zeros([K], dtype=tl.float32)
    for s in range(CHUNK // SUB):
        t = n * CHUNK + s * SUB + i
        qs, ks, gs, vs = _load_sub_chunk(q, k, g, v, sq, sk, sg, sv, b, hh, t, T, K, V)
        dos = _load_tile(do, sdo, b, hh, t, rv, T, V)
        G = tl.cumsum(gs, axis=0)
        G_last = tl.sum(gs, axis=0)
        dA = tl.where(causal, tl.dot(dos, tl.trans(vs), input_precision=PRECISION), 0.0)   # do_i . v_j
        if tl.min(G_last, axis=0) > -FACTOR_LIMIT:
            dq_intra = tl.exp(G) * tl.dot(dA, ks * tl.exp(-G), input_precision=PRECISION)
        else:
            dq_intra = tl.sum(dA[:, :, None] * _intra_decay(G, SUB) * ks[None, :, :], axis=1)
        dq_inter = tl.exp(G) * tl.dot(dos, tl.trans(S.to(dos.dtype)), input_precision=PRECISION)
        dqs = scale * (dq_inter + dq_intra)                                    # [SUB, K]
        _store_tile(dq, dqs, H * K, b, hh, t, rk, T, K)
        qdq = qs * dqs
        qdq_before_t = qdq_before[None, :] + tl.cumsum(qdq, axis=0) - qdq
        _store_tile(dg_partial, -qdq_before_t, H * K, b, hh, t, rk, T, K)
        qdq_before += tl.sum(qdq, axis=0)
        k_decayed = (ks * tl.exp(G_last[None, :] - G)).to(vs.dtype)
        S = S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(k_decayed), vs, input_precision=PRECISION)

    # S is now the state after the chunk.
    dS = tl.load(dh + ((i_bh.to(tl.int64) * (NT + 1) + n + 1) * K + rk[:, None]) * V + rv[None, :])   # [K, V]
    dg_carry = tl.sum(S * dS, axis=1) + qdq_before
    tl.debug_barrier()   # the backward walk reads back what other threads of this program wrote there

    # Backward walk: dk_j = exp(G_last - G_j) * (v_j @ dS^T) + scale * sum_{i>=j} (do_i . v_j) q_i exp(G_i - G_j),
    #                dv_j = (k_j * exp(G_last - G_j)) @ dS + sum_{i>=j} A_ij do_i.
    kdk_after = tl.zeros([K], dtype=tl.float32)
    for s_rev in range(CHUNK // SUB):
        s = CHUNK // SUB - 1 - s_rev
        t = n * CHUNK + s * SUB + i
        qs, ks, gs, vs = _load_sub_chunk(q, k, g, v, sq, sk, sg, sv, b, hh, t, T, K, V)
        dos = _load_tile(do, sdo, b, hh, t, rv, T, V)
        G = tl.cumsum(gs, axis=0)
        G_last = tl.sum(gs, axis=0)
        dA = tl.where(causal, tl.dot(dos, tl.trans(vs), input_precision=PRECISION), 0.0)
        q_decayed = qs * tl.exp(G) * scale
        if tl.min(G_last, axis=0) > -FACTOR_LIMIT:
            k_grown = ks * tl.exp(-G)
            A = tl.where(causal, tl.dot(q_decayed, tl.trans(k_grown), input_precision=PRECISION), 0.0)
            dk_intra = tl.exp(-G) * tl.dot(tl.trans(dA), q_decayed, input_precision=PRECISION)
        else:
            decay = _intra_decay(G, SUB)                                      # [SUB, SUB, K]
            A = tl.sum(qs[:, None, :] * ks[None, :, :] * decay, axis=2) * scale
            dk_intra = scale * tl.sum(dA[:, :, None] * decay * qs[:, None, :], axis=0)
        to_end = tl.exp(G_last[None, :] - G)                                  # [SUB, K]
        dks = to_end * tl.dot(vs, tl.trans(dS.to(vs.dtype)), input_precision=PRECISION) + dk_intra
        dvs = tl.dot((ks * to_end).to(vs.dtype), dS.to(vs.dtype), input_precision=PRECISION)
        dvs += tl.dot(tl.trans(A.to(dos.dtype)), dos, input_precision=PRECISION)
        kdk = ks * dks
        kdk_from_t = kdk_after[None, :] + tl.sum(kdk, axis=0)[None, :] - tl.cumsum(kdk, axis=0) + kdk
        dgs = dg_carry[None, :] + _load_tile(dg_partial, H * K, b, hh, t, rk, T, K) - kdk_from_t
        _store_tile(dk, dks, H * K, b, hh, t, rk, T, K)
        _store_tile(dv, dvs, H * V, b, hh, t, rv, T, V)
        _store_tile(dg, dgs, H * K, b, hh, t, rk, T, K)
        kdk_after += tl.sum(kdk, axis=0)
        dS = dS * tl.exp(G_last)[:, None] + tl.dot(tl.trans(q_decayed.to(dos.dtype)), dos,
                                                   input_precision=PRECISION)


# -----------------------------------------------------------------------------------------------------------
# 3. The PyTorch operator: forward, backward, and the wrapper that checks its inputs
#
# The two directions are registered as PyTorch custom operators (torch.library.custom_op) with an autograd
# formula, rather than as an autograd.Function: to torch.compile an operator is one opaque call with known
# output shapes, so a compiled DiG block fuses everything around the kernel and leaves the kernel alone.
#
# The forward returns the state at every chunk boundary as a second output, which the backward needs; the
# final state the caller may ask for is its last slot.

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch_config(K, V):
    """The [BK, BV] state tile of one scan program (small tiles: more programs in parallel, and a [STEPS, BK, BV]
    block of updates that fits in registers), the warps of the per-chunk kernels, the scan's launch options."""
    state_tile = (16, 16)
    chunk_warps = 4 if max(K, V) <= 64 else 8
    # Triton's interpreter runs the prefix scan slowly; blocks of 2 steps keep the CPU tests quick and still
    # take the block loop through several blocks and a ragged last one.
    steps = 2 if _interpreting() else 16
    return state_tile, chunk_warps, dict(STEPS=steps, num_warps=4)


def _precision(dtype):
    # fp32 inputs get true fp32 products (Triton's default for fp32 is tf32, ~3e-4 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows(x):
    """x [B, T, H, D] and its row stride, in the layout the kernels read: each token a row whose heads sit D
    apart with unit-stride features, rows row_stride apart, one sequence after another. Contiguous tensors
    and head views of a wider projection output already are; anything else is copied."""
    B, T, H, D = x.shape
    packed = x.stride(3) == 1 and (H == 1 or x.stride(2) == D) and (B == 1 or x.stride(0) == T * x.stride(1))
    x = x if packed else x.contiguous()
    return x, x.stride(1)


def _boundary_states(x, sx, y, sy, g, sg, initial, scale, reverse):
    """Launches 1 and 2: the state (forward: x, y = k, v) or the state's gradient (backward: x, y = q, do)
    at every chunk boundary, [B, H, NT + 1, K, V] float32. See the two kernels for which slot holds what.
    x, y, g come as _rows gives them, with their row strides sx, sy, sg."""
    initial = initial.float().contiguous() if initial is not None else None     # [B, H, K, V]
    B, T, H, K = x.shape
    V = y.shape[-1]
    NT = triton.cdiv(T, CHUNK)
    (BK, BV), warps, scan = _launch_config(K, V)
    states = torch.empty(B, H, NT + 1, K, V, device=x.device, dtype=torch.float32)
    gate_sum = torch.empty(B, H, NT, K, device=x.device, dtype=torch.float32)
    _chunk_update_kernel[(NT, B * H)](x, y, g, states, gate_sum, sx, sy, sg, T, NT, scale, H, K, V, CHUNK,
                                      REVERSE=reverse, PRECISION=_precision(x.dtype), num_warps=warps)
    _scan_kernel[(K // BK, V // BV, B * H)](states, gate_sum, initial, NT, K, V, BK, BV,
                                            HAS_INITIAL=initial is not None, REVERSE=reverse, **scan)
    return states


@torch.library.custom_op("dig::gla_forward", mutates_args=())
def _gla_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                 initial_state: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """o [B, T, H, V] (dtype of v) and h [B, H, NT + 1, K, V] (float32): h[:, :, n] is the state before
    chunk n, h[:, :, NT] the final state."""
    (q, sq), (k, sk), (v, sv), (g, sg) = _rows(q), _rows(k), _rows(v), _rows(g)
    h = _boundary_states(k, sk, v, sv, g, sg, initial_state, scale, reverse=False)
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = h.shape[2] - 1
    o = v.new_empty(B, T, H, V)
    _fwd_output_kernel[(NT, B * H)](q, k, v, g, h, o, sq, sk, sv, sg, T, NT, scale, H, K, V, CHUNK, SUB,
                                    FACTOR_LIMIT, _precision(q.dtype), num_warps=_launch_config(K, V)[1])
    return o, h


@_gla_forward.register_fake
def _(q, k, v, g, scale, initial_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    return v.new_empty(B, T, H, V), q.new_empty(B, H, triton.cdiv(T, CHUNK) + 1, K, V, dtype=torch.float32)


@torch.library.custom_op("dig::gla_backward", mutates_args=())
def _gla_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                  do: torch.Tensor, d_final_state: Optional[torch.Tensor],
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, dg (dtypes of the inputs) and the gradient of the initial state [B, H, K, V] (float32)."""
    (q, sq), (k, sk), (v, sv), (g, sg), (do, sdo) = _rows(q), _rows(k), _rows(v), _rows(g), _rows(do)
    # dh[:, :, n]: the gradient of the state before chunk n (slot 0 is the initial state's).
    dh = _boundary_states(q, sq, do, sdo, g, sg, d_final_state, scale, reverse=True)
    B, T, H, K = q.shape
    V = v.shape[-1]
    NT = h.shape[2] - 1
    dq, dk, dg = q.new_empty(B, T, H, K), k.new_empty(B, T, H, K), g.new_empty(B, T, H, K)
    dv = v.new_empty(B, T, H, V)
    dg_partial = torch.empty(B, T, H, K, device=g.device, dtype=torch.float32)   # the kernel's scratch
    _bwd_chunk_kernel[(NT, B * H)](q, k, v, g, h, do, dh, dq, dk, dv, dg, dg_partial, sq, sk, sv, sg, sdo, T,
                                   NT, scale, H, K, V, CHUNK, SUB, FACTOR_LIMIT, _precision(q.dtype),
                                   num_warps=_launch_config(K, V)[1])
    return dq, dk, dv, dg, dh[:, :, 0].clone()


@_gla_backward.register_fake
def _(q, k, v, g, h, do, d_final_state, scale):
    B, T, H, K = q.shape
    V = v.shape[-1]
    return (q.new_empty(B, T, H, K), k.new_empty(B, T, H, K), v.new_empty(B, T, H, V), g.new_empty(B, T, H, K),
            q.new_empty(B, H, K, V, dtype=torch.float32))


def _save_for_backward(ctx, inputs, output):
    q, k, v, g, scale, initial_state = inputs
    ctx.save_for_backward(q, k, v, g, output[1])
    ctx.scale, ctx.has_initial_state = scale, initial_state is not None


def _gla_gradients(ctx, do, dh):
    q, k, v, g, h = ctx.saved_tensors
    # Only the last slot of h (the final state) is ever handed to a caller, so only it can carry a gradient.
    d_final_state = dh[:, :, -1] if dh is not None else None
    dq, dk, dv, dg, d_initial = torch.ops.dig.gla_backward(q, k, v, g, h, do, d_final_state, ctx.scale)
    return dq, dk, dv, dg, None, (d_initial if ctx.has_initial_state else None)


_gla_forward.register_autograd(_gla_gradients, setup_context=_save_for_backward)


def _check_gate(g):
    if g.numel() and g.max() > 0:
        raise ValueError(f"gates must be log-space forget gates, g <= 0 (e.g. logsigmoid(x) / 16); "
                         f"got a maximum of {g.max().item():.4g}")


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, check_gate=True):
    """Gated linear attention with the Triton kernels (forward and backward). Returns (o, final_state or None).

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or None; any T >= 1.
    K and V each one of 16, 32, 64, 128; dtype float16, bfloat16 or float32 (all four the same); CUDA tensors
    (CPU tensors only under TRITON_INTERPRET=1). Head views of a wider tensor (q, k, v sliced out of one
    projection output) are read in place; other non-contiguous inputs are copied first.
    Accumulation and the state are float32; o has the dtype of v, the final state is float32.

    g must be <= 0. With check_gate=True (the default) a positive gate raises ValueError; the check reads
    g.max(), which costs a device synchronisation, so callers whose gates are <= 0 by construction (DiG's
    logsigmoid(x) / 16) pass check_gate=False. An unchecked positive gate makes exp(G_i - G_j) grow instead
    of decay: results stay right while the summed gates fit float32 and turn to inf or NaN after that.
    """
    _check_inputs(q, k, v, g, initial_state)
    K, V = q.shape[-1], v.shape[-1]
    if K not in HEAD_DIMS or V not in HEAD_DIMS:
        raise ValueError(f"chunk_gla supports head dims K, V in {HEAD_DIMS}; got K={K}, V={V} "
                         f"(chunk_gla_torch takes any size)")
    if q.dtype not in DTYPES:
        raise ValueError(f"chunk_gla supports dtypes {DTYPES}; got {q.dtype}")
    tensors = [q, k, v, g] + ([initial_state] if initial_state is not None else [])
    if not all(x.is_cuda for x in tensors) and not _interpreting():
        raise ValueError("chunk_gla runs Triton GPU kernels: pass CUDA tensors (all of q, k, v, g and "
                         "initial_state); for CPU tensors use chunk_gla_torch, or set TRITON_INTERPRET=1 "
                         "before importing triton to run the kernels in Triton's (slow) interpreter")
    if len({x.device for x in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted({str(x.device) for x in tensors})}")
    if check_gate:
        _check_gate(g)
    scale = K ** -0.5 if scale is None else float(scale)
    o, h = torch.ops.dig.gla_forward(q, k, v, g, scale, initial_state)
    return o, (h[:, :, -1].clone() if output_final_state else None)


# -----------------------------------------------------------------------------------------------------------
# 4. Benchmark: python gla_kernel.py  (on a GPU)
#
# DiG-S/2 shapes: H = 6 heads, K = 32, V = 64, B * T = 16384 tokens (B images of T tokens, 256 to 2048 px).
# Baselines side by side: the PyTorch chunked path, softmax attention through scaled_dot_product_attention
# (FlashAttention, head dim 64, non-causal as in DiT) and, when installed, flash-linear-attention's chunk_gla.


def _bench_inputs(B, T, H, K, V, dtype, device="cuda"):
    q, k = (torch.randn(B, T, H, K, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    g = (F.logsigmoid(torch.randn(B, T, H, K, device=device)) / 16).to(dtype)
    return [x.requires_grad_() for x in (q, k, v, g)]


def _time_and_memory(fn, inputs, backward):
    """Median ms (triton.testing.do_bench) and peak memory beyond the inputs (MB) of fn, or fn + backward."""
    from triton.testing import do_bench
    do = torch.randn_like(fn(*inputs))

    def step():
        out = fn(*inputs)
        if backward:
            out.backward(do)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e6
    ms = do_bench(step, warmup=25, rep=100, grad_to_none=inputs, return_mode="median")
    return ms, peak


def benchmark(lengths=(256, 1024, 4096, 12544, 16384), tokens=16384, H=6, K=32, V=64, dtype=torch.bfloat16):
    try:
        from fla.ops.gla import chunk_gla as fla_chunk_gla
    except ImportError:
        fla_chunk_gla = None
    methods = {
        "dig chunk_gla": lambda q, k, v, g: chunk_gla(q, k, v, g, check_gate=False)[0],
        "torch chunked": lambda q, k, v, g: chunk_gla_torch(q, k, v, g, check_gate=False)[0],
        "sdpa (d=64)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    }
    if fla_chunk_gla is not None:
        methods["fla chunk_gla"] = lambda q, k, v, g: fla_chunk_gla(q, k, v, g)[0]
    elem = torch.finfo(dtype).bits // 8
    rows = []
    for T in lengths:
        B = max(1, tokens // T)
        # Bytes that must move: forward reads q, k, v, g and writes o; backward reads q, k, v, g, do and
        # writes dq, dk, dv, dg.
        per_token = H * elem * ((3 * K + 2 * V) + (3 * K + 2 * V) + (3 * K + V))
        gla_inputs = _bench_inputs(B, T, H, K, V, dtype)
        sdpa_inputs = [torch.randn(B, H, T, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
        for name, fn in methods.items():
            inputs = sdpa_inputs if name.startswith("sdpa") else gla_inputs
            if name == "torch chunked" and T > 4096:
                continue  # a Python loop over T / 16 chunks: too slow to be worth timing at these lengths
            try:
                fwd_ms, _ = _time_and_memory(fn, inputs, backward=False)
                fb_ms, peak = _time_and_memory(fn, inputs, backward=True)
            except torch.cuda.OutOfMemoryError:
                rows.append((T, B, name, None, None, None, None))
                continue
            gbs = per_token * B * T / (fb_ms * 1e-3) / 1e9 if "gla" in name or "chunked" in name else None
            rows.append((T, B, name, fwd_ms, fb_ms, peak, gbs))
    print(f"\nGLA benchmark on {torch.cuda.get_device_name()}, {dtype}, H={H} K={K} V={V}, B*T={tokens}, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"bytes that must move, forward+backward: {per_token * tokens / 1e6:.1f} MB")
    print(f"{'T':>6} {'B':>3}  {'method':<14} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak MB':>8} {'GB/s (fwd+bwd)':>15}")
    for T, B, name, fwd_ms, fb_ms, peak, gbs in rows:
        if fwd_ms is None:
            print(f"{T:>6} {B:>3}  {name:<14} {'OOM':>8}")
            continue
        print(f"{T:>6} {B:>3}  {name:<14} {fwd_ms:>8.3f} {fb_ms:>11.3f} {peak:>8.0f} "
              f"{'' if gbs is None else f'{gbs:>15.0f}'}")
    return rows


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU; `pytest test_dig.py` checks correctness on a CPU")
    benchmark()

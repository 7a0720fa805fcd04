"""
Gated Linear Attention (GLA): the recurrence, a PyTorch chunked form of it, and a compact Triton kernel.

Layout (as flash-linear-attention's chunk_gla): q, k, g are [B, T, H, K]; v and o are [B, T, H, V].
g is a log-space forget gate, g <= 0 (DiG uses logsigmoid(x) / 16). For each batch and head a state S of
shape [K, V] is carried through time in float32:

    S_t = diag(exp(g_t)) @ S_{t-1} + k_t^T v_t        # decay first, then write this token
    o_t = scale * q_t @ S_t

That loop is exact but sequential in T. The chunked form cuts the sequence into chunks of C tokens. With
G the cumulative sum of g inside a chunk (G_last its last row), token j's write has decayed by exp(G_i - G_j)
when token i reads it (exp(0) = 1 for i = j: decay first, then write); a chunk needs only the state before it:

    o_chunk = scale * (q * exp(G)) @ S_prev  +  scale * tril((q * exp(G)) (k * exp(-G))^T) @ v
    S_next  = diag(exp(G_last)) @ S_prev  +  (k * exp(G_last - G))^T @ v

The first term is what the past (the state) gives a chunk, the second what the chunk's own tokens give each
other: C^2 K work per chunk, in parallel, and T / C sequential steps instead of T. The trap is exp(-G): with
strongly negative gates (g = -10 per token is e^160 over 16 tokens; float32 ends near e^88) it overflows, so
the forms below never compute exp(-G) alone, only exponents that are never positive (exp(G_i - G_j), i >= j).

Sections: 1. the recurrence (naive_gla, the ground truth) and the chunked form in PyTorch (chunk_gla_torch)
2. the Triton kernels  3. the PyTorch operator around them (chunk_gla)  4. a benchmark (python gla_kernel.py).
Sections 2 to 4 are about speed only: chunk_gla computes the same maths as chunk_gla_torch (equal up to rounding).
"""

import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:   # no Triton (it ships for Linux): the reference and the PyTorch chunked path still work

    class _NoTriton:
        """Stands in for triton and triton.language, so that the kernels below can be defined (not run)."""
        constexpr = None

        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    triton = tl = _NoTriton()
    HAS_TRITON = False


# -----------------------------------------------------------------------------------------------------------
# 1. The reference recurrence and the PyTorch chunked path


def naive_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """The GLA recurrence, one token at a time: the ground truth for everything else in this file. Computes in
    float32 (float64 when given float64) and returns (o in the input dtype, final state or None)."""
    _check_inputs(q, k, v, g, initial_state)
    (B, T, H, K), V = q.shape, v.shape[-1]
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
    """The chunked algorithm in plain PyTorch (autograd does the backward): the model's path on a CPU. Any device,
    dtype and head size; returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] or None), as chunk_gla.
    scale defaults to K^-0.5; initial_state is [B, H, K, V] or None; gates must be <= 0 (check_gate checks)."""
    _check_inputs(q, k, v, g, initial_state)
    if check_gate:
        _check_gate(g)
    B, T, H, K = q.shape
    V, C = v.shape[-1], chunk_size     # the element-wise decay below holds T * C * K numbers per head: C stays small
    scale = K ** -0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = math.ceil(T / C)
    # Pad T up to n * C. Padded tokens have q = k = v = 0 and g = 0 (no decay), so they change nothing.
    pad = lambda x: F.pad(x.to(acc), (0, 0, 0, 0, 0, n * C - T))
    # [B, T, H, K or V] -> [B, H, n, C, K or V]
    q, k, v, g = (pad(x).view(B, n, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v, g))
    G = g.cumsum(dim=3)                                            # cumulative gate inside each chunk
    G_last = G[:, :, :, -1:, :]                                    # [B, H, n, 1, K]

    # Inside a chunk: A[i, j] = scale * sum_c q_ic k_jc exp(G_ic - G_jc) for i >= j (c a key channel), formed
    # element-wise so that no exponent is positive (masked before exp, so the masked entries are exactly 0).
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[..., None], -math.inf).exp()  # [B,H,n,C,C,K]
    A = scale * torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, decay)  # [B, H, n, C, C]
    o = A @ v                                                       # [B, H, n, C, V]

    # Across chunks: what every chunk adds to the state (one batched matmul), then the state before each chunk
    # (the one sequential part: a decay and an add per chunk), then what those states give every chunk's outputs.
    updates = (k * (G_last - G).exp()).transpose(-1, -2) @ v       # [B, H, n, K, V]; exp(G_last - G) <= 1
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    states = []
    for i in range(n):
        states.append(S)
        S = G_last[:, :, i, 0, :, None].exp() * S + updates[:, :, i]
    o = o + scale * (q * G.exp()) @ torch.stack(states, dim=2)     # [B, H, n, C, V]; exp(G) <= 1
    o = o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :T]    # back to [B, T, H, V]
    return o.to(v.dtype), (S if output_final_state else None)


# -----------------------------------------------------------------------------------------------------------
# 2. Triton kernels
#
# The kernels walk a sequence in sub-chunks of SUB = 16 tokens (the smallest tile tl.dot takes), carrying the
# state from one to the next. Inside a sub-chunk exp(G_i - G_j) = exp(G_i) * exp(-G_j) is safe while the
# sub-chunk's summed gate stays above -FACTOR_LIMIT = -60 (exp(-G) < e^60, inside float32's e^88; with DiG's
# gates always), which makes its causal weights one small matrix product; below that they are formed element-
# wise, one column j at a time, with exponents G_i - G_j (i >= j) that are never positive.
#
# Two paths use these pieces, forward and backward alike, chosen by the length T (section 3):
#   one pass: one program per batch and head walks the whole sequence, the state in registers.
#   three phases, for long sequences: (1) every chunk of CHUNK = 64 tokens in parallel computes what it adds
#     to the state (forward) or to the state's gradient (backward); (2) a scan over the chunks, the one
#     sequential step, turns these into the state at every chunk boundary; (3) every chunk in parallel walks
#     its four sub-chunks from its boundary state: the one-pass kernel run on a 64-token segment.
#
# The backward's gate gradient: o depends on g only through q_t exp(G_t) and k_t exp(-G_t) (G the cumulative sum
# over the whole sequence), so with dq = dL/dq and dk = dL/dk, dL/dG_t = q_t dq_t - k_t dk_t (plus, when the final
# state is used, its own term) and dg_t is the reverse cumulative sum of that.
#
# Token t of batch b, head `head`, feature d lives at (b * T + t) * row_stride + head * D + d: H * D for a
# contiguous [B, T, H, D] tensor, W for a slice of a [B, T, W] projection output (read without copies). States
# live in float32 buffers of `slots` [K, V] slots per batch-and-head (i_bh = b * H + head); d_ names a gradient.

CHUNK, SUB, FACTOR_LIMIT = 64, 16, 60.0

# Triton compiles a kernel once per combination of its constexpr arguments, and by default also specialises
# on the values of the others (an integer on being 1 or a multiple of 16, a pointer on being None). Lengths,
# head counts, flags and the factoring limit are runtime arguments, so that one compiled variant per dtype and
# head size serves every shape, path and option; row strides stay specialised (multiples of 16 vectorise).
RUNTIME_ARGS = ["T", "seg_len", "slots", "NT", "H", "factor_limit", "has_start", "store_end", "has_d_end",
                "store_d_start", "has_initial"]


@triton.jit
def _load_tile(ptr, row_stride, b, head, t, cols, T, D: tl.constexpr):
    """Rows t (token indices) and columns `cols` of one head, as a [len(t), len(cols)] tile; rows past T are 0."""
    offs = (b * T + t[:, None]).to(tl.int64) * row_stride + head * D + cols[None, :]
    return tl.load(ptr + offs, mask=(t < T)[:, None], other=0.0)


@triton.jit
def _store_tile(ptr, x, row_stride, b, head, t, cols, T, D: tl.constexpr):
    offs = (b * T + t[:, None]).to(tl.int64) * row_stride + head * D + cols[None, :]
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=(t < T)[:, None])


@triton.jit
def _state_slot(ptr, i_bh, slot, slots, K: tl.constexpr, V: tl.constexpr):
    """Addresses of the [K, V] state in slot `slot` of sequence-and-head i_bh."""
    rk, rv = tl.arange(0, K), tl.arange(0, V)
    return ptr + ((i_bh.to(tl.int64) * slots + slot) * K + rk[:, None]) * V + rv[None, :]


@triton.jit
def _load_sub_chunk(q, k, g, v, stride_q, stride_k, stride_g, stride_v, b, head, t, T, K: tl.constexpr,
                    V: tl.constexpr):
    """The inputs of tokens t as they are in memory: q, k, g as [SUB, K] tiles and v as a [SUB, V] tile."""
    rk, rv = tl.arange(0, K), tl.arange(0, V)
    return (_load_tile(q, stride_q, b, head, t, rk, T, K), _load_tile(k, stride_k, b, head, t, rk, T, K),
            _load_tile(g, stride_g, b, head, t, rk, T, K), _load_tile(v, stride_v, b, head, t, rv, T, V))


@triton.jit
def _in_float32(q_tile, k_tile, g_tile):
    """q and k as float32 tiles, and G (the gates' cumulative sum inside the sub-chunk, [SUB, K]) with
    G_last, its last row ([K])."""
    gs = g_tile.to(tl.float32)
    return q_tile.to(tl.float32), k_tile.to(tl.float32), tl.cumsum(gs, axis=0), tl.sum(gs, axis=0)


# Each step of a walk depends on the one before it, and one program per batch and head leaves few programs to
# switch to while a step waits for memory. So a walk asks for the next sub-chunk's inputs before it works on
# the current one (rows past the segment's end are redirected to row T, which reads as zeros).

@triton.jit
def _next_rows(t, seg_end, T, SUB: tl.constexpr):
    return tl.where(t + SUB < seg_end, t + SUB, T)


@triton.jit
def _previous_rows(t, seg_start, T, SUB: tl.constexpr):
    return tl.where(t - SUB >= seg_start, t - SUB, T)


@triton.jit
def _factored(G_last, factor_limit):
    return tl.min(G_last, axis=0) > -factor_limit


@triton.jit
def _row(x, j, SUB: tl.constexpr):
    """Row j of a [SUB, D] tile, as a [D] vector."""
    return tl.sum(tl.where((tl.arange(0, SUB) == j)[:, None], x, 0.0), axis=0)


@triton.jit
def _decay_from(G, j, SUB: tl.constexpr):
    """exp(G_i - G_j) for rows i >= j, 0 before: [SUB, K], no positive exponent. One j at a time, as a [SUB, SUB, K]
    tile would hold registers that the factored path (the one that runs) then lacks."""
    i = tl.arange(0, SUB)
    return tl.exp(tl.where((i >= j)[:, None], G - _row(G, j, SUB)[None, :], float("-inf")))


@triton.jit
def _intra_weights(qs, ks, G, G_last, scale, factor_limit, SUB: tl.constexpr, PRECISION: tl.constexpr):
    """A[i, j] = scale * sum_k q_ik k_jk exp(G_ik - G_jk) for i >= j, 0 above the diagonal: [SUB, SUB]."""
    i = tl.arange(0, SUB)
    if _factored(G_last, factor_limit):
        A = tl.dot(qs * tl.exp(G), tl.trans(ks * tl.exp(-G)), input_precision=PRECISION)
    else:
        A = tl.zeros([SUB, SUB], dtype=tl.float32)
        for j in range(0, SUB):   # column j: sum_k q_ik k_jk exp(G_ik - G_jk)
            column = tl.sum(qs * _row(ks, j, SUB)[None, :] * _decay_from(G, j, SUB), axis=1)
            A = tl.where((i == j)[None, :], column[:, None], A)
    return tl.where(i[:, None] >= i[None, :], A * scale, 0.0)


@triton.jit
def _advance_state(S, ks, vs, G, G_last, PRECISION: tl.constexpr):
    """The state after a sub-chunk from the state before it: decay by exp(G_last), add (k exp(G_last - G))^T v."""
    k_decayed = (ks * tl.exp(G_last[None, :] - G)).to(vs.dtype)
    return S * tl.exp(G_last)[:, None] + tl.dot(tl.trans(k_decayed), vs, input_precision=PRECISION)


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def _fwd_kernel(q, k, v, g, o, z, w, y, start_states, end_states, stride_q, stride_k, stride_v, stride_g, stride_z,
                T, seg_len, slots, H, scale, eps, factor_limit, has_start, store_end, K: tl.constexpr,
                V: tl.constexpr, SUB: tl.constexpr, NORM_GATE: tl.constexpr, PRECISION: tl.constexpr):
    """Outputs of one segment of seg_len tokens, given the state before it. Grid (segments, B * H).
    Walks the segment in sub-chunks of SUB tokens, carrying the state: it covers everything before the
    sub-chunk, the weights A the causal interactions inside it. One pass: the segment is the whole sequence,
    and the final state is stored. Three phases: segments are chunks, start_states holds the state before each.
    With NORM_GATE it also writes DiG's layer output y = rms_norm(o) * w * silu(z) per head (gla_norm_gate)."""
    n, i_bh = tl.program_id(0), tl.program_id(1)
    b, head = i_bh // H, i_bh % H
    rv = tl.arange(0, V)
    if has_start:
        S = tl.load(_state_slot(start_states, i_bh, n, slots, K, V))               # [K, V]
    else:
        S = tl.zeros([K, V], dtype=tl.float32)
    t = n * seg_len + tl.arange(0, SUB)
    q_tile, k_tile, g_tile, vs = _load_sub_chunk(q, k, g, v, stride_q, stride_k, stride_g, stride_v, b, head, t,
                                                 T, K, V)
    if NORM_GATE:   # the norm's weight once; the gate z, like the inputs, one sub-chunk ahead
        w_row, zs = tl.load(w + rv).to(tl.float32)[None, :], _load_tile(z, stride_z, b, head, t, rv, T, V)
    for s in range(0, tl.cdiv(seg_len, SUB)):
        t_next = _next_rows(t, n * seg_len + seg_len, T, SUB)
        q_next, k_next, g_next, v_next = _load_sub_chunk(q, k, g, v, stride_q, stride_k, stride_g, stride_v, b,
                                                         head, t_next, T, K, V)
        if NORM_GATE:
            z_next = _load_tile(z, stride_z, b, head, t_next, rv, T, V)
        qs, ks, G, G_last = _in_float32(q_tile, k_tile, g_tile)
        A = _intra_weights(qs, ks, G, G_last, scale, factor_limit, SUB, PRECISION)  # [SUB, SUB]
        q_decayed = (qs * tl.exp(G) * scale).to(vs.dtype)
        os = tl.dot(q_decayed, S.to(vs.dtype), input_precision=PRECISION)           # [SUB, V]
        os += tl.dot(A.to(vs.dtype), vs, input_precision=PRECISION)
        _store_tile(o, os, H * V, b, head, t, rv, T, V)
        if NORM_GATE:   # normalise o as stored (rounded to its dtype), as an rms_norm after the kernel would
            o_r, zf = os.to(o.dtype.element_ty).to(tl.float32), zs.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(o_r * o_r, axis=1) / V + eps)[:, None]
            _store_tile(y, o_r * rstd * w_row * zf * tl.sigmoid(zf), H * V, b, head, t, rv, T, V)
            zs = z_next
        S = _advance_state(S, ks, vs, G, G_last, PRECISION)
        q_tile, k_tile, g_tile, vs, t = q_next, k_next, g_next, v_next, t_next
    if store_end:
        tl.store(_state_slot(end_states, i_bh, n, slots, K, V), S)


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def _bwd_kernel(q, k, v, g, do, start_states, d_end_states, d_start_states, dq, dk, dv, dg, dg_partial, stride_q,
                stride_k, stride_v, stride_g, stride_do, stride_dq, stride_dk, stride_dv, T, seg_len, slots, H, scale,
                factor_limit, has_start, has_d_end, store_d_start, K: tl.constexpr, V: tl.constexpr, SUB: tl.constexpr,
                PRECISION: tl.constexpr):
    """dq, dk, dv, dg of one segment, given the state before it (start_states) and the gradient of the state
    after it (d_end_states). Grid (segments, B * H). One pass: the segment is the whole sequence, and
    d_start_states receives the initial state's gradient.
    A forward walk over the sub-chunks (carrying the state) gives dq; a backward walk (carrying the state's
    gradient) gives dk and dv. dg_t = sum over tokens t' >= t of (q*dq - k*dk)_t', split as
    [everything after this segment] + [sum over the segment of q*dq] - [q*dq before t] - [k*dk from t on].
    The first term is sum_v(S_end * dS_end); the forward walk leaves -[q*dq before t] in dg_partial (float32
    scratch) for the backward walk to finish."""
    n, i_bh = tl.program_id(0), tl.program_id(1)
    b, head = i_bh // H, i_bh % H
    rk, rv, i = tl.arange(0, K), tl.arange(0, V), tl.arange(0, SUB)
    causal = i[:, None] >= i[None, :]
    steps = tl.cdiv(seg_len, SUB)
    if has_start:
        S = tl.load(_state_slot(start_states, i_bh, n, slots, K, V))               # [K, V]
    else:
        S = tl.zeros([K, V], dtype=tl.float32)

    # Forward walk: dq_i = scale * (exp(G_i) * (do_i @ S^T) + sum_{j<=i} (do_i . v_j) k_j exp(G_i - G_j)).
    qdq_before = tl.zeros([K], dtype=tl.float32)
    t = n * seg_len + i
    q_tile, k_tile, g_tile, vs = _load_sub_chunk(q, k, g, v, stride_q, stride_k, stride_g, stride_v, b, head, t,
                                                 T, K, V)
    dos = _load_tile(do, stride_do, b, head, t, rv, T, V)
    for s in range(0, steps):
        t_next = _next_rows(t, n * seg_len + seg_len, T, SUB)
        q_next, k_next, g_next, v_next = _load_sub_chunk(q, k, g, v, stride_q, stride_k, stride_g, stride_v, b,
                                                         head, t_next, T, K, V)
        do_next = _load_tile(do, stride_do, b, head, t_next, rv, T, V)
        qs, ks, G, G_last = _in_float32(q_tile, k_tile, g_tile)
        dA = tl.where(causal, tl.dot(dos, tl.trans(vs), input_precision=PRECISION), 0.0)   # do_i . v_j
        if _factored(G_last, factor_limit):
            dq_intra = tl.exp(G) * tl.dot(dA, ks * tl.exp(-G), input_precision=PRECISION)
        else:
            dq_intra = tl.zeros_like(qs)
            for j in range(0, SUB):
                dq_intra += _row(tl.trans(dA), j, SUB)[:, None] * _decay_from(G, j, SUB) * _row(ks, j, SUB)[None, :]
        dq_inter = tl.exp(G) * tl.dot(dos, tl.trans(S.to(dos.dtype)), input_precision=PRECISION)
        dqs = scale * (dq_inter + dq_intra)                                    # [SUB, K]
        _store_tile(dq, dqs, stride_dq, b, head, t, rk, T, K)
        qdq = qs * dqs
        qdq_before_t = qdq_before[None, :] + tl.cumsum(qdq, axis=0) - qdq
        _store_tile(dg_partial, -qdq_before_t, H * K, b, head, t, rk, T, K)
        qdq_before += tl.sum(qdq, axis=0)
        S = _advance_state(S, ks, vs, G, G_last, PRECISION)
        q_tile, k_tile, g_tile, vs, dos, t = q_next, k_next, g_next, v_next, do_next, t_next

    # S is now the state after the segment.
    if has_d_end:
        dS = tl.load(_state_slot(d_end_states, i_bh, n, slots, K, V))              # [K, V]
    else:
        dS = tl.zeros([K, V], dtype=tl.float32)
    dg_carry = tl.sum(S * dS, axis=1) + qdq_before
    tl.debug_barrier()   # the backward walk reads back what other threads of this program wrote to dg_partial

    # Backward walk: dk_j = exp(G_last - G_j) * (v_j @ dS^T) + scale * sum_{i>=j} (do_i . v_j) q_i exp(G_i - G_j),
    #                dv_j = (k_j * exp(G_last - G_j)) @ dS + sum_{i>=j} A_ij do_i.
    kdk_after = tl.zeros([K], dtype=tl.float32)
    t = n * seg_len + (steps - 1) * SUB + i
    q_tile, k_tile, g_tile, vs = _load_sub_chunk(q, k, g, v, stride_q, stride_k, stride_g, stride_v, b, head, t,
                                                 T, K, V)
    dos = _load_tile(do, stride_do, b, head, t, rv, T, V)
    dg_part = _load_tile(dg_partial, H * K, b, head, t, rk, T, K)
    for s_rev in range(0, steps):
        t_next = _previous_rows(t, n * seg_len, T, SUB)
        q_next, k_next, g_next, v_next = _load_sub_chunk(q, k, g, v, stride_q, stride_k, stride_g, stride_v, b,
                                                         head, t_next, T, K, V)
        do_next = _load_tile(do, stride_do, b, head, t_next, rv, T, V)
        dg_part_next = _load_tile(dg_partial, H * K, b, head, t_next, rk, T, K)
        qs, ks, G, G_last = _in_float32(q_tile, k_tile, g_tile)
        dA = tl.where(causal, tl.dot(dos, tl.trans(vs), input_precision=PRECISION), 0.0)
        q_decayed = qs * tl.exp(G) * scale
        if _factored(G_last, factor_limit):
            dk_intra = tl.exp(-G) * tl.dot(tl.trans(dA), q_decayed, input_precision=PRECISION)
        else:
            dk_intra = tl.zeros_like(qs)
            for j in range(0, SUB):   # row j: scale * sum_i dA_ij exp(G_i - G_j) q_i
                dk_j = scale * tl.sum(_row(tl.trans(dA), j, SUB)[:, None] * _decay_from(G, j, SUB) * qs, axis=0)
                dk_intra = tl.where((i == j)[:, None], dk_j[None, :], dk_intra)
        A = _intra_weights(qs, ks, G, G_last, scale, factor_limit, SUB, PRECISION)
        to_end = tl.exp(G_last[None, :] - G)                                  # [SUB, K]
        dks = to_end * tl.dot(vs, tl.trans(dS.to(vs.dtype)), input_precision=PRECISION) + dk_intra
        dvs = tl.dot((ks * to_end).to(vs.dtype), dS.to(vs.dtype), input_precision=PRECISION)
        dvs += tl.dot(tl.trans(A.to(dos.dtype)), dos, input_precision=PRECISION)
        kdk = ks * dks
        kdk_from_t = kdk_after[None, :] + tl.sum(kdk, axis=0)[None, :] - tl.cumsum(kdk, axis=0) + kdk
        dgs = dg_carry[None, :] + dg_part - kdk_from_t
        _store_tile(dk, dks, stride_dk, b, head, t, rk, T, K)
        _store_tile(dv, dvs, stride_dv, b, head, t, rv, T, V)
        _store_tile(dg, dgs, H * K, b, head, t, rk, T, K)
        kdk_after += tl.sum(kdk, axis=0)
        dS = dS * tl.exp(G_last)[:, None] + tl.dot(tl.trans(q_decayed.to(dos.dtype)), dos,
                                                   input_precision=PRECISION)
        q_tile, k_tile, g_tile, vs, dos, dg_part, t = q_next, k_next, g_next, v_next, do_next, dg_part_next, t_next
    if store_d_start:
        tl.store(_state_slot(d_start_states, i_bh, n, slots, K, V), dS)


# The three-phase path's first two launches: what every chunk adds to the state (in parallel), then the scan.

@triton.jit(do_not_specialize=RUNTIME_ARGS)
def _chunk_update_kernel(x, y, g, states, gate_sum, stride_x, stride_y, stride_g, T, NT, H, scale, K: tl.constexpr,
                         V: tl.constexpr, CHUNK: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr):
    """What chunk n adds to the scan, for all chunks in parallel. Grid (NT, B * H).

      forward  (x = k, y = v):   U_n = (k * exp(G_last - G))^T @ v      -> states slot n + 1
      backward (x = q, y = do):  U_n = scale * (q * exp(G))^T @ do     -> states slot n
    and gate_sum[n] = G_last, the chunk's total log decay. states has NT + 1 slots, one per chunk boundary."""
    n, i_bh = tl.program_id(0), tl.program_id(1)
    b, head = i_bh // H, i_bh % H
    rk, rv = tl.arange(0, K), tl.arange(0, V)
    t = n * CHUNK + tl.arange(0, CHUNK)
    xc = _load_tile(x, stride_x, b, head, t, rk, T, K)                         # [CHUNK, K]
    gc = _load_tile(g, stride_g, b, head, t, rk, T, K).to(tl.float32)
    yc = _load_tile(y, stride_y, b, head, t, rv, T, V)                         # [CHUNK, V]
    G = tl.cumsum(gc, axis=0)
    G_last = tl.sum(gc, axis=0)                                                # [K]
    if REVERSE:
        x_decayed = xc * tl.exp(G) * scale
        slot = n
    else:
        x_decayed = xc * tl.exp(G_last[None, :] - G)
        slot = n + 1
    U = tl.dot(tl.trans(x_decayed.to(yc.dtype)), yc, input_precision=PRECISION)  # [K, V]
    tl.store(_state_slot(states, i_bh, slot, NT + 1, K, V), U)
    tl.store(gate_sum + (i_bh.to(tl.int64) * NT + n) * K + rk, G_last)


@triton.jit
def _decay_then_add(a1, u1, a2, u2):
    """Two scan steps in one: S -> a1 * S + u1 followed by S -> a2 * S + u2 is S -> (a1 a2) S + (a2 u1 + u2)."""
    return a1 * a2, a2 * u1 + u2


@triton.jit(do_not_specialize=RUNTIME_ARGS)
def _scan_kernel(states, gate_sum, initial, NT, has_initial, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, STEPS: tl.constexpr, REVERSE: tl.constexpr):
    """The one sequential step: S <- exp(G_last of chunk n) * S + U_n, chunk after chunk, on a [BK, BV] tile.

    Grid (K / BK, V / BV, B * H). On entry `states` holds the updates U_n; on exit (each result over the update
    it came from) the value at every chunk boundary: forward, the state before chunk n in slot n (slot NT: the
    final state); backward, the gradient of the state after chunk n in slot n + 1 (slot 0: the initial state's).
    STEPS chunks are loaded at once and combined by a parallel prefix scan (the steps compose associatively, see
    _decay_then_add): one memory round trip per STEPS chunks on the sequential path, not one per chunk."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rk, rv = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    tile = rk[:, None] * V + rv[None, :]                                      # [BK, BV]
    if has_initial:
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


# DiG's layer normalises GLA's output per head and gates it, y = rms_norm(o) * w * silu(z) (the forward kernel
# writes y with NORM_GATE). Its backward, for rows of V features (one token and head each):
@triton.jit(do_not_specialize=["rows", "H"])
def _norm_gate_bwd_kernel(dy, o, z, w, do, dz, dw_partial, stride_z, rows, H, eps, V: tl.constexpr,
                          ROWS: tl.constexpr):
    """With o_hat = o / rms(o), u = dy * w * silu(z): do = (u - o_hat * mean(u * o_hat)) / rms(o), dz = dy * w *
    o_hat * silu'(z), and this block's share of dw = sum of dy * o_hat * silu(z). o, dy, do: dense [rows, V];
    z, dz: a row of stride_z per token, heads V apart."""
    r, rv = tl.program_id(0) * ROWS + tl.arange(0, ROWS), tl.arange(0, V)
    inside = (r < rows)[:, None]
    dense = r[:, None].to(tl.int64) * V + rv[None, :]                             # [ROWS, V]
    gate = (r // H)[:, None].to(tl.int64) * stride_z + (r % H)[:, None] * V + rv[None, :]
    o_t = tl.load(o + dense, mask=inside, other=0.0).to(tl.float32)
    dy_t = tl.load(dy + dense, mask=inside, other=0.0).to(tl.float32)
    z_t = tl.load(z + gate, mask=inside, other=0.0).to(tl.float32)
    w_row = tl.load(w + rv).to(tl.float32)[None, :]
    rstd = tl.rsqrt(tl.sum(o_t * o_t, axis=1) / V + eps)[:, None]
    o_hat, sig = o_t * rstd, tl.sigmoid(z_t)
    u = dy_t * w_row * z_t * sig
    do_t = rstd * (u - o_hat * tl.sum(u * o_hat, axis=1)[:, None] / V)
    tl.store(do + dense, do_t.to(do.dtype.element_ty), mask=inside)
    tl.store(dz + gate, (dy_t * w_row * o_hat * sig * (1 + z_t * (1 - sig))).to(dz.dtype.element_ty), mask=inside)
    tl.store(dw_partial + tl.program_id(0) * V + rv, tl.sum(dy_t * o_hat * z_t * sig, axis=0))


# -----------------------------------------------------------------------------------------------------------
# 3. The PyTorch operator: forward, backward, and the wrapper that checks its inputs
#
# The length alone picks the path. One pass (T <= ONE_PASS_MAX_T) launches once per direction and writes no state,
# but walks sequentially: it wins while B * H programs fill the GPU and the walk is short. Three phases suit any
# batch, for three launches per direction and a round trip of the chunk states.
# The two directions are custom operators (torch.library.custom_op) with an autograd formula: to torch.compile,
# one opaque call with known output shapes that a compiled DiG block fuses around. The forward's second output
# is what the backward needs besides the inputs: the states at every chunk boundary (three phases) or only the
# final state (one pass, whose backward recomputes them); its last slot is the final state. Outside
# torch.compile, chunk_gla calls the same functions through an autograd.Function (_EagerGLA): less host time.

ONE_PASS_MAX_T = 512
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_supports(K, V, dtype):
    """Whether chunk_gla runs heads of K x V in this dtype (Triton installed, K and V in HEAD_DIMS)."""
    return HAS_TRITON and K in HEAD_DIMS and V in HEAD_DIMS and dtype in DTYPES


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _warps(K, V):
    # A walk is a chain of small dependent steps that more threads do not shorten; larger states need registers.
    return 2 if K * V <= 32 * 64 else 4 if max(K, V) <= 64 else 8


def _or(state, placeholder):
    """A state buffer, or a float32 buffer the kernel is told not to touch (None would compile another variant)."""
    return state if state is not None else placeholder


def _precision(dtype):
    # fp32 inputs get true fp32 products (Triton's default for fp32 is tf32, ~3e-4 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows(x):
    """x [B, T, H, D] and its row stride, in the layout the kernels read (a row per token, heads D apart, unit-stride
    features): contiguous tensors and head views of a wider projection output are; others are copied."""
    B, T, H, D = x.shape
    packed = x.stride(3) == 1 and (H == 1 or x.stride(2) == D) and (B == 1 or x.stride(0) == T * x.stride(1))
    x = x if packed else x.contiguous()
    return x, x.stride(1)


def _states_shape(B, T, H, K, V):
    return (B, H, 1 if T <= ONE_PASS_MAX_T else triton.cdiv(T, CHUNK) + 1, K, V)


def _boundary_states(x, stride_x, y, stride_y, g, stride_g, initial, scale, reverse):
    """Three phases, launches 1 and 2: the state (forward: x, y = k, v) or its gradient (backward: x, y = q, do) at
    every chunk boundary, [B, H, NT + 1, K, V] float32 (slots: see the kernels); x, y, g as _rows gives them."""
    (B, T, H, K), V = x.shape, y.shape[-1]
    NT = triton.cdiv(T, CHUNK)
    states = torch.empty(B, H, NT + 1, K, V, device=x.device, dtype=torch.float32)
    gate_sum = torch.empty(B, H, NT, K, device=x.device, dtype=torch.float32)
    _chunk_update_kernel[(NT, B * H)](
        x=x, y=y, g=g, states=states, gate_sum=gate_sum, stride_x=stride_x, stride_y=stride_y, stride_g=stride_g,
        T=T, NT=NT, H=H, scale=scale, K=K, V=V, CHUNK=CHUNK, REVERSE=reverse, PRECISION=_precision(x.dtype),
        num_warps=_warps(K, V))
    # Small [16, 16] state tiles: more programs, and a [STEPS, 16, 16] block of updates fits in registers. The
    # interpreter scans slowly: blocks of 2 steps keep CPU tests quick, through several blocks and a ragged one.
    _scan_kernel[(K // 16, V // 16, B * H)](
        states=states, gate_sum=gate_sum, initial=_or(initial, states), NT=NT, has_initial=initial is not None,
        K=K, V=V, BK=16, BV=16, STEPS=2 if _interpreting() else 16, REVERSE=reverse, num_warps=4)
    return states


def _gla_forward(q, k, v, g, scale, initial_state, norm_gate=None):
    """o [B, T, H, V] (dtype of v) and the states [B, H, slots, K, V] (float32) the backward needs. norm_gate =
    (z, w, y, eps) also writes y = rms_norm(o) * w * silu(z) (see gla_norm_gate)."""
    (q, stride_q), (k, stride_k), (v, stride_v), (g, stride_g) = _rows(q), _rows(k), _rows(v), _rows(g)
    (B, T, H, K), V = q.shape, v.shape[-1]
    initial = initial_state.float().contiguous() if initial_state is not None else None   # [B, H, K, V]
    o = v.new_empty(B, T, H, V)
    z, w, y, eps = norm_gate if norm_gate is not None else (o, o, o, 0.0)    # placeholders, never touched
    launch = dict(q=q, k=k, v=v, g=g, o=o, z=z, w=w, y=y, stride_q=stride_q, stride_k=stride_k, stride_v=stride_v,
                  stride_g=stride_g, stride_z=z.stride(1), T=T, H=H, scale=scale, eps=eps, factor_limit=FACTOR_LIMIT,
                  K=K, V=V, SUB=SUB, NORM_GATE=norm_gate is not None, PRECISION=_precision(q.dtype),
                  num_warps=_warps(K, V))
    if T <= ONE_PASS_MAX_T:
        final = torch.empty(B, H, 1, K, V, device=q.device, dtype=torch.float32)
        _fwd_kernel[(1, B * H)](start_states=_or(initial, final), end_states=final, seg_len=T, slots=1,
                                has_start=initial is not None, store_end=True, **launch)
        return o, final
    states = _boundary_states(k, stride_k, v, stride_v, g, stride_g, initial, scale, reverse=False)
    _fwd_kernel[(states.shape[2] - 1, B * H)](start_states=states, end_states=states, seg_len=CHUNK,
                                              slots=states.shape[2], has_start=True, store_end=False, **launch)
    return o, states


def _gla_backward(q, k, v, g, initial_state, states, do, d_final_state, scale, grads=None):
    """dq, dk, dv, dg (dtypes of the inputs) and the gradient of the initial state [B, H, K, V] (float32).
    grads = (dq, dk, dv): where to write those three (views of one buffer, in gla_norm_gate)."""
    (q, stride_q), (k, stride_k), (v, stride_v), (g, stride_g) = _rows(q), _rows(k), _rows(v), _rows(g)
    do, stride_do = _rows(do)
    (B, T, H, K), V = q.shape, v.shape[-1]
    # A gradient made by broadcasting (e.g. from .sum()) has stride 0; the kernels read dense rows.
    d_final = d_final_state.float().contiguous() if d_final_state is not None else None   # [B, H, K, V]
    dq, dk, dv = grads or (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
    dg = g.new_empty(g.shape)
    dg_partial = torch.empty(B, T, H, K, device=g.device, dtype=torch.float32)   # the kernel's scratch
    launch = dict(q=q, k=k, v=v, g=g, do=do, dq=dq, dk=dk, dv=dv, dg=dg, dg_partial=dg_partial, stride_q=stride_q,
                  stride_k=stride_k, stride_v=stride_v, stride_g=stride_g, stride_do=stride_do, stride_dq=dq.stride(1),
                  stride_dk=dk.stride(1), stride_dv=dv.stride(1), T=T, H=H, scale=scale, factor_limit=FACTOR_LIMIT,
                  K=K, V=V, SUB=SUB, PRECISION=_precision(q.dtype), num_warps=_warps(K, V))
    if T <= ONE_PASS_MAX_T:
        initial = initial_state.float().contiguous() if initial_state is not None else None
        d_initial = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
        _bwd_kernel[(1, B * H)](start_states=_or(initial, d_initial), d_end_states=_or(d_final, d_initial),
                                d_start_states=d_initial, seg_len=T, slots=1, has_start=initial is not None,
                                has_d_end=d_final is not None, store_d_start=True, **launch)
        return dq, dk, dv, dg, d_initial
    # d_states[:, :, n]: the gradient of the state before chunk n (slot 0 is the initial state's).
    d_states = _boundary_states(q, stride_q, do, stride_do, g, stride_g, d_final, scale, reverse=True)
    slots = states.shape[2]
    _bwd_kernel[(slots - 1, B * H)](start_states=states, d_end_states=d_states[:, :, 1:], d_start_states=d_states,
                                    seg_len=CHUNK, slots=slots, has_start=True, has_d_end=True,
                                    store_d_start=False, **launch)
    return dq, dk, dv, dg, d_states[:, :, 0].clone()


# The schemas name what the operators take (the Python functions' last arguments are for gla_norm_gate only).
gla_forward_op = torch.library.custom_op("dig::gla_forward", _gla_forward, mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state) -> (Tensor, Tensor)"))
gla_backward_op = torch.library.custom_op("dig::gla_backward", _gla_backward, mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, Tensor states, Tensor do, "
    "Tensor? d_final_state, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"))


@gla_forward_op.register_fake
def _(q, k, v, g, scale, initial_state):
    (B, T, H, K), V = q.shape, v.shape[-1]
    return v.new_empty(B, T, H, V), q.new_empty(_states_shape(B, T, H, K, V), dtype=torch.float32)


@gla_backward_op.register_fake
def _(q, k, v, g, initial_state, states, do, d_final_state, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), g.new_empty(g.shape),
            q.new_empty(*q.shape[::2], q.shape[3], v.shape[3], dtype=torch.float32))   # [B, H, K, V]


def _save_for_backward(ctx, inputs, output):
    q, k, v, g, scale, initial_state = inputs
    ctx.save_for_backward(q, k, v, g, initial_state, output[1])
    ctx.scale = scale


def _gla_gradients(ctx, do, d_states, backward=torch.ops.dig.gla_backward):
    q, k, v, g, initial_state, states = ctx.saved_tensors
    # Only the last slot of the states (the final state) is ever handed to a caller: only it has a gradient.
    d_final_state = d_states[:, :, -1] if d_states is not None else None
    if do is None:      # only the final state was used
        do = v.new_zeros(*q.shape[:3], v.shape[-1])
    dq, dk, dv, dg, d_initial = backward(q, k, v, g, initial_state, states, do, d_final_state, ctx.scale)
    return dq, dk, dv, dg, None, (d_initial if initial_state is not None else None)


gla_forward_op.register_autograd(_gla_gradients, setup_context=_save_for_backward)


class _EagerGLA(torch.autograd.Function):
    """The same forward and backward outside torch.compile, for less host time per call than an operator's."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state):
        ctx.set_materialize_grads(False)      # an unused output's gradient stays None, not a tensor of zeros
        o, states = _gla_forward(q, k, v, g, scale, initial_state)
        _save_for_backward(ctx, (q, k, v, g, scale, initial_state), (o, states))
        return o, states

    @staticmethod
    def backward(ctx, do, d_states):
        return _gla_gradients(ctx, do, d_states, backward=_gla_backward)


def _check_inputs(q, k, v, g, initial_state):
    # The shapes and dtypes every function of this file takes (section 1's too), with what was wrong.
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


def _check_gate(g):
    if g.numel() and not bool((g <= 0).all()):       # NaN fails g <= 0 too
        found = "NaN" if bool(g.isnan().any()) else f"a maximum of {g.max().item():.4g}"
        raise ValueError(f"gates must be log-space forget gates, g <= 0 (e.g. logsigmoid(x) / 16); got {found}")


def _check_kernel_inputs(q, k, v, g, initial_state):
    """_check_inputs, and what the Triton kernels need besides."""
    if not HAS_TRITON:
        raise RuntimeError("chunk_gla runs Triton kernels, and Triton is not installed (it ships for Linux: "
                           "pip install triton); chunk_gla_torch computes the same on any device without it")
    _check_inputs(q, k, v, g, initial_state)
    K, V = q.shape[-1], v.shape[-1]
    if K not in HEAD_DIMS or V not in HEAD_DIMS:
        raise ValueError(f"chunk_gla supports head dims K, V in {HEAD_DIMS}; got K={K}, V={V} (chunk_gla_torch: any)")
    if q.dtype not in DTYPES:
        raise ValueError(f"chunk_gla supports dtypes {DTYPES}; got {q.dtype}")
    tensors = [q, k, v, g] + ([initial_state] if initial_state is not None else [])
    if not all(x.is_cuda for x in tensors) and not _interpreting():
        raise ValueError("chunk_gla runs Triton GPU kernels: pass CUDA tensors; for CPU tensors use chunk_gla_torch, "
                         "or set TRITON_INTERPRET=1 before importing triton (Triton's slow interpreter)")
    if len({x.device for x in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted({str(x.device) for x in tensors})}")


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, check_gate=True):
    """Gated linear attention with the Triton kernels (forward and backward). Returns (o, final_state or None).

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or None; any T >= 1. K and V each one
    of 16, 32, 64, 128; dtype float16, bfloat16 or float32 (all four the same); CUDA tensors (CPU tensors only
    under TRITON_INTERPRET=1). Head views of one wider projection output are read in place; other
    non-contiguous inputs are copied first. Accumulation and the state are float32; o has the dtype of v.

    g must be <= 0. With check_gate=True (the default) a positive or NaN gate raises ValueError; the check reads
    g on the host (a device synchronisation), so callers whose gates are <= 0 by construction (DiG's
    logsigmoid(x) / 16) pass check_gate=False. An unchecked positive gate makes exp(G_i - G_j) grow: results
    stay right while the summed gates fit float32, then turn to inf or NaN.
    """
    _check_kernel_inputs(q, k, v, g, initial_state)
    if check_gate:
        _check_gate(g)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling():    # an opaque operator that the compiler fuses around
        o, states = torch.ops.dig.gla_forward(q, k, v, g, scale, initial_state)
    else:
        o, states = _EagerGLA.apply(q, k, v, g, scale, initial_state)
    return o, (states[:, :, -1].clone() if output_final_state else None)


# DiG's GLA layer between its two projections as one operator. Unfused, the output norm and gate are separate
# kernels and in_proj's gradient is a concatenation of dq, dk, dv and dz. Here the forward kernel writes y with
# o, one kernel runs the norm's and gate's backward, and dq, dk, dv, dz are written into one buffer.

def _split_proj(proj, H, K):
    """q, k [B, T, H, K] and v, z [B, T, H, V]: head views of proj = [q | k | v | z], [B, T, 2HK + 2HV]."""
    V = (proj.shape[2] - 2 * H * K) // (2 * H)
    return [x.unflatten(2, (H, -1)) for x in proj.split([H * K, H * K, H * V, H * V], dim=2)]


def _norm_gate_forward(proj, g, norm_weight, scale, eps):
    """y [B, T, H * V], and o and the states for the backward."""
    q, k, v, z = _split_proj(proj, *g.shape[2:])
    y = v.new_empty(*v.shape[:2], v.shape[2] * v.shape[3])
    o, states = _gla_forward(q, k, v, g, scale, None, norm_gate=(z, norm_weight, y, eps))
    return y, o, states


def _norm_gate_backward(proj, g, norm_weight, o, states, dy, scale, eps):
    """The gradients of proj (one tensor), g and norm_weight."""
    (B, T, H, V), K = o.shape, g.shape[3]
    d_proj, do, rows, ROWS = torch.empty_like(proj), torch.empty_like(o), B * T * H, 64
    (q, k, v, z), (dq, dk, dv, dz) = _split_proj(proj, H, K), _split_proj(d_proj, H, K)
    dw_partial = torch.empty(triton.cdiv(rows, ROWS), V, device=o.device, dtype=torch.float32)
    _norm_gate_bwd_kernel[(triton.cdiv(rows, ROWS),)](
        dy=dy.contiguous(), o=o, z=z, w=norm_weight, do=do, dz=dz, dw_partial=dw_partial, stride_z=proj.stride(1),
        rows=rows, H=H, eps=eps, V=V, ROWS=ROWS, num_warps=4)
    dg = _gla_backward(q, k, v, g, None, states, do, None, scale, grads=(dq, dk, dv))[3]
    return d_proj, dg, dw_partial.sum(0).to(norm_weight.dtype)


norm_gate_op = torch.library.custom_op("dig::gla_norm_gate", _norm_gate_forward, mutates_args=(), schema=(
    "(Tensor proj, Tensor g, Tensor norm_weight, float scale, float eps) -> (Tensor, Tensor, Tensor)"))
norm_gate_backward_op = torch.library.custom_op("dig::gla_norm_gate_backward", _norm_gate_backward, mutates_args=(),
    schema=("(Tensor proj, Tensor g, Tensor norm_weight, Tensor o, Tensor states, Tensor dy, float scale, "
            "float eps) -> (Tensor, Tensor, Tensor)"))


@norm_gate_op.register_fake
def _(proj, g, norm_weight, scale, eps):
    (B, T, H, K), V = g.shape, norm_weight.shape[0]
    return (proj.new_empty(B, T, H * V), proj.new_empty(B, T, H, V),
            proj.new_empty(_states_shape(B, T, H, K, V), dtype=torch.float32))


@norm_gate_backward_op.register_fake
def _(proj, g, norm_weight, o, states, dy, scale, eps):
    return proj.new_empty(proj.shape), g.new_empty(g.shape), norm_weight.new_empty(norm_weight.shape)


def _norm_gate_save(ctx, inputs, output):
    proj, g, norm_weight, ctx.scale, ctx.eps = inputs
    ctx.save_for_backward(proj, g, norm_weight, *output[1:])


def _norm_gate_gradients(ctx, dy, _do, _d_states):   # o and the states are the backward's, not a caller's
    return (*torch.ops.dig.gla_norm_gate_backward(*ctx.saved_tensors, dy, ctx.scale, ctx.eps), None, None)


norm_gate_op.register_autograd(_norm_gate_gradients, setup_context=_norm_gate_save)


def gla_norm_gate(proj, g, norm_weight, scale=None, eps=1e-6):
    """DiG's GLA layer between its projections: y = rms_norm(o) * norm_weight * silu(z) per head, where
    o = chunk_gla(q, k, v, g)[0] and proj = [q | k | v | z] [B, T, 2HK + 2HV] is the input projection's output
    (q, k, v and the output gate z flattened over heads). g: [B, T, H, K], <= 0 (not checked); norm_weight: [V].
    Returns y [B, T, H * V] in proj's dtype. Sizes, dtypes, devices as chunk_gla; no initial or final state."""
    B, T, H, K = g.shape if g.dim() == 4 else (0, 0, 0, 0)
    V = norm_weight.shape[0] if norm_weight.dim() == 1 else 0
    if not H or not V or proj.shape != (B, T, 2 * H * (K + V)):
        raise ValueError(f"need g [B, T, H, K], norm_weight [V] and proj [B, T, 2HK + 2HV]; got g {tuple(g.shape)}, "
                         f"norm_weight {tuple(norm_weight.shape)}, proj {tuple(proj.shape)}")
    _check_kernel_inputs(*_split_proj(proj, H, K)[:3], g, None)
    if norm_weight.device != proj.device:
        raise ValueError(f"norm_weight must be on proj's device ({proj.device}); got {norm_weight.device}")
    scale = K ** -0.5 if scale is None else float(scale)
    return torch.ops.dig.gla_norm_gate(proj.contiguous(), g, norm_weight, scale, eps)[0]


# -----------------------------------------------------------------------------------------------------------
# 4. Benchmark: python gla_kernel.py [--paths]  (on a GPU)
#
# Forward + backward at DiG shapes (K = 32, V = 64; DiG-S/2 has 6 heads and 16384 tokens per step from 256 to
# 2048 px, DiG-XL/2 18 heads), medians of triton.testing.do_bench: "eager" launches every call from Python,
# "graph" replays it from a CUDA graph (the GPU time alone). The floor moves the bytes that must move (forward:
# q, k, v, g in, o out; backward: q, k, v, g, do in, dq, dk, dv, dg out) at the bandwidth of a large copy
# measured in the same run. Baselines: softmax attention through scaled_dot_product_attention (FlashAttention,
# head dim 64, non-causal as in DiT) and, when installed, flash-linear-attention's chunk_gla.

BENCH_SHAPES = [(64, 256, 6), (16, 1024, 6), (4, 4096, 6), (1, 12544, 6), (1, 16384, 6), (1, 16384, 18)]


def _copy_bandwidth():
    """Bytes per second of a 1 GiB device-to-device copy (read + write), the practical memory ceiling."""
    from triton.testing import do_bench
    x, y = torch.empty(2 ** 28, device="cuda"), torch.empty(2 ** 28, device="cuda")
    return 2 * x.numel() * 4 / (do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3)


def _fwd_bwd_ms(fn, inputs):
    """(eager ms, graph ms) of forward + backward, medians; graph is None if the call cannot be captured."""
    from triton.testing import do_bench, do_bench_cudagraph
    do = torch.randn_like(fn(*inputs))
    step = lambda: torch.autograd.grad(fn(*inputs), inputs, do)
    eager = do_bench(step, warmup=25, rep=200, return_mode="median")
    try:
        graph = do_bench_cudagraph(step, rep=200, return_mode="median")
    except Exception:   # some baselines synchronise inside, which a capture forbids
        graph = None
    return eager, graph


def _one_pass_limit(limit, fn):
    """fn with ONE_PASS_MAX_T set to `limit`, restored afterwards whatever happens."""
    global ONE_PASS_MAX_T
    saved, ONE_PASS_MAX_T = ONE_PASS_MAX_T, limit
    try:
        return fn()
    finally:
        ONE_PASS_MAX_T = saved


def _ms(times):
    return " / ".join(f"{t:6.3f}" if t is not None else f"{'-':>6}" for t in times)


def benchmark(shapes=BENCH_SHAPES, K=32, V=64, dtype=torch.bfloat16, paths=False):
    """Prints the table; with paths=True also times the one-pass and three-phase paths of every shape."""
    try:
        from fla.ops.gla import chunk_gla as fla_chunk_gla
    except ImportError:
        fla_chunk_gla = None
    bandwidth = _copy_bandwidth()
    dig = lambda q, k, v, g: chunk_gla(q, k, v, g, check_gate=False)[0]
    fla = lambda q, k, v, g: fla_chunk_gla(q, k, v, g)[0]
    print(f"GLA forward + backward on {torch.cuda.get_device_name()}, {dtype}, K={K} V={V}, torch "
          f"{torch.__version__}, triton {triton.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("median ms, eager / CUDA graph; floor = bytes that must move / copy bandwidth")
    print(f"{'B':>3} {'T':>6} {'H':>3} {'floor':>6} | {'dig eager / graph':>17} {'x floor':>7} | "
          + ("one-pass (eager / graph)  three-phase | " if paths else "")
          + "  fla eager / graph |  sdpa eager / graph")
    for B, T, H in shapes:
        floor = B * T * H * (torch.finfo(dtype).bits // 8) * (9 * K + 5 * V) / bandwidth * 1e3
        q, k = (torch.randn(B, T, H, K, device="cuda", dtype=dtype) for _ in range(2))
        v = torch.randn(B, T, H, V, device="cuda", dtype=dtype)
        g = (F.logsigmoid(torch.randn(B, T, H, K, device="cuda")) / 16).to(dtype)
        inputs = [x.requires_grad_() for x in (q, k, v, g)]
        eager, graph = _fwd_bwd_ms(dig, inputs)
        line = f"{B:>3} {T:>6} {H:>3} {floor:6.3f} | {_ms((eager, graph)):>17} {graph / floor:6.1f}x | "
        if paths:
            for limit in (10 ** 9, 0):
                line += _ms(_one_pass_limit(limit, lambda: _fwd_bwd_ms(dig, inputs))) + "   "
            line += "| "
        line += f"{_ms(_fwd_bwd_ms(fla, inputs) if fla_chunk_gla else (None, None)):>18} | "
        del inputs, q, k, v, g
        sdpa_inputs = [torch.randn(B, H, T, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
        print(line + f"{_ms(_fwd_bwd_ms(F.scaled_dot_product_attention, sdpa_inputs)):>18}", flush=True)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="benchmark the GLA kernel against its floor and baselines")
    parser.add_argument("--paths", action="store_true", help="also time the one-pass and three-phase paths")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU; `pytest test_dig.py` checks correctness on a CPU")
    benchmark(paths=args.paths)

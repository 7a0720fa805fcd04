"""
DiG: diffusion models with Gated Linear Attention, in one file.

DiG (Zhu et al. 2024) is DiT (Peebles & Xie 2023) with the softmax self-attention replaced by Gated Linear
Attention (GLA, Yang et al. 2023). GLA is a recurrence over the tokens with a fixed-size state, so its cost
grows linearly with the number of image tokens instead of quadratically. A recurrence reads the tokens in one
order, so DiG changes that order from block to block (row-major, reversed, column-major, reversed) and runs a
3x3 depthwise convolution at the end of every block so that neighbouring patches always see each other.

Read top to bottom: 1. embeddings  2. the parts of a DiG block  3. the scan order and the DiG block  4. the model
5. the DiT baseline of the same size  6. named sizes (DiG-S/2 ... DiT-XL/8)  7. Gaussian diffusion as in DiT
(schedule, hybrid loss, respacing)  8. sampling (DDPM, DDIM, guidance); then the machinery: 9. speed (compiled
blocks, CUDA graphs)  10. input checks. The GLA recurrence lives in gla_kernel.py (Triton and PyTorch forms).
"""

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts  # section 9

import gla_kernel


# -----------------------------------------------------------------------------------------------------------
# 1. Conditioning and embeddings (shared with DiT)


def modulate(x, shift, scale):
    # x: [N, T, D]; shift, scale: [N, D], one per image, the same for all of its tokens.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim, side):
    """Fixed 2D sine-cosine position embedding of a side x side token grid in raster order: [side * side, dim].
    The first half of the channels encodes the column, the second half the row; each half is the 1D transformer
    embedding (sin and cos of the position at dim/4 geometrically spaced frequencies)."""
    if dim % 4:
        raise ValueError(f"the 2D sin-cos position embedding needs hidden_size divisible by 4; got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))        # [dim/4]
    rows, cols = torch.meshgrid(*[torch.arange(side, dtype=torch.float64)] * 2, indexing="ij")   # [side, side] each

    def embed_1d(pos):
        angles = pos.reshape(-1, 1) * freqs                                   # [T, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)                 # [T, dim/2]

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()        # [T, dim]


class TimestepEmbedder(nn.Module):
    """Diffusion step t (0..999: how noisy the input is, section 7) -> [D]: 256 sinusoidal features, then an MLP."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]                                # [N, 128]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))          # [N, 256] -> [N, D]


class LabelEmbedder(nn.Module):
    """Class label -> [D], with one extra row for the "null" label num_classes. In training each label is replaced
    by the null label with probability dropout_prob, so the same network also learns the unconditional model that
    classifier-free guidance needs at sampling time."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels, force_drop_ids=None):
        # force_drop_ids: [N], 1 where the label must be dropped (for tests and explicit unconditional passes).
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


def _xavier(*layers, gain=1.0):
    # DiT initialises every Linear as Xavier-uniform with zero bias.
    for layer in layers:
        nn.init.xavier_uniform_(layer.weight, gain=gain)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


# -----------------------------------------------------------------------------------------------------------
# 2. The parts of a DiG block
#
# DiT's adaLN-Zero block with two parts swapped (GLA for softmax attention, SwiGLU for the GELU MLP) and a 3x3
# depthwise convolution over the token grid after it. Section 3 puts them together.


class AdaLNZeroBlock(nn.Module):
    """x + gate * mixer(modulate(norm(x))), then the same for the MLP. Shift, scale and gate come from c ([N, D],
    the step's plus the label's embedding, section 4): an adaptive LayerNorm ("adaLN"), predicted per image.
    The modulation is zero-initialised, so every gate starts at 0 and the block starts as the identity: a deep
    network begins as a shallow one and each block learns how much to contribute ("adaLN-Zero")."""

    def __init__(self, dim, mixer, mlp):
        super().__init__()
        self.norm1, self.norm2 = (nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) for _ in range(2))
        self.mixer, self.mlp = mixer, mlp
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x, c):
        # x: [N, T, D]; c: [N, D] -> six [N, D] modulation vectors
        shift_mix, scale_mix, gate_mix, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_mix.unsqueeze(1) * self.mixer(modulate(self.norm1(x), shift_mix, scale_mix))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class GatedLinearAttention(nn.Module):
    """GLA token mixer: linear attention whose running state decays through a learned, data-dependent gate.
    Per head, with row vectors q_t, k_t in R^K and v_t in R^V, a state S of shape [K, V] and a forget gate
    g_t <= 0 (log-space, one value per key channel; not the adaLN gates, nor the output gate below):

        S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

    Token t sees the tokens up to and including itself in the scan order, which changes from block to block.
    As in the official DiG code (flash-linear-attention's GLA layer): keys half as wide as values (head dims
    K = D / 2 / heads, V = D / heads), a low-rank forget gate whose logsigmoid is divided by 16 (see
    log_forget_gate), and a per-head RMSNorm of the output times a silu gate."""

    def __init__(self, dim, num_heads, forget_rank=16, forget_normalizer=16):
        super().__init__()
        if dim % (2 * num_heads):
            raise ValueError(f"GLA needs hidden_size divisible by 2 * num_heads; got {dim} and {num_heads} heads")
        key_dim, value_dim = dim // 2, dim
        self.num_heads = num_heads
        self.head_k, self.head_v = key_dim // num_heads, value_dim // num_heads
        self.scale = self.head_k ** -0.5
        self.forget_normalizer = forget_normalizer
        # One matmul makes four of the mixer's five inputs from x: queries, keys, values and the output gate (one
        # read of x, and under autocast one bf16 copy of it). The fifth, the forget gate, is low-rank (below).
        self.split_sizes = (key_dim, key_dim, value_dim, value_dim)
        self.in_proj = nn.Linear(dim, sum(self.split_sizes), bias=False)
        self.forget_low_rank = nn.Linear(dim, forget_rank, bias=False)   # forget-gate logits through a rank-16
        self.forget_gate = nn.Linear(forget_rank, key_dim)                # bottleneck: 24D weights, not D^2 / 2
        self.norm_weight = nn.Parameter(torch.ones(self.head_v))   # RMSNorm over each head, one weight for all
        self.proj = nn.Linear(value_dim, dim, bias=False)
        # Each projection is Xavier with gain 2**-2.5 (as in the official code), which keeps the state's
        # un-normalised sums small early on; in_proj part by part, as four layers.
        for part in self.in_proj.weight.split(self.split_sizes, dim=0):
            nn.init.xavier_uniform_(part, gain=2 ** -2.5)
        _xavier(self.forget_low_rank, self.forget_gate, self.proj, gain=2 ** -2.5)

    def forward(self, x):
        N, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k, self.head_v
        q, k, v, out_gate = self.in_proj(x).split(self.split_sizes, dim=-1)   # D/2, D/2, D, D
        # q, k, v stay views into the projection output, consecutive tokens sum(split_sizes) apart: the Triton
        # kernel reads rows spaced that far apart, so nothing is copied.
        q, k, v = q.view(N, T, H, K), k.view(N, T, H, K), v.view(N, T, H, V)
        g = self.log_forget_gate(x).to(q.dtype)                                 # [N, T, H, K]
        # _gla (below) picks the Triton kernel or the PyTorch path; _ is the final state, unused. The gates are
        # <= 0 by construction, so the gate check (a device sync) is switched off.
        o, _ = self._gla(q)(q, k, v, g, scale=self.scale, check_gate=False)    # [N, T, H, V]
        # Normalise each head (the state's sums have no fixed scale), then gate it with silu(out_gate).
        o = F.rms_norm(o, (V,), self.norm_weight.to(o.dtype), eps=1e-6)
        o = o * F.silu(out_gate.view(N, T, H, V))
        return self.proj(o.flatten(2))                                          # [N, T, H*V] -> [N, T, D]

    def log_forget_gate(self, x):
        # In (-inf, 0]. Dividing logsigmoid by 16 pulls the per-token decay exp(g) close to 1 (0.96 at a zero
        # logit), so the state remembers over tens of tokens rather than a few.
        g = F.logsigmoid(self.forget_gate(self.forget_low_rank(x))) / self.forget_normalizer
        return g.view(*x.shape[:2], self.num_heads, self.head_k)

    def _gla(self, q):
        # The Triton kernel on a GPU where it takes these head sizes and dtype; the PyTorch chunked path (the
        # same maths, slower) everywhere else, with a warning on a GPU.
        if q.is_cuda and gla_kernel.kernel_supports(self.head_k, self.head_v, q.dtype):
            return gla_kernel.chunk_gla
        if q.is_cuda:
            warn_slow_gla(self.head_k, self.head_v, q.dtype)
        return gla_kernel.chunk_gla_torch


class SwiGLU(nn.Module):
    """Bias-free SwiGLU MLP: down(silu(x W_gate) * x W_value). Hidden width 8D/3 rounded up to 256s: three
    matrices of D x 8D/3 hold as many weights as DiT's two of D x 4D."""

    def __init__(self, dim):
        super().__init__()
        hidden = 256 * math.ceil(int(8 * dim / 3) / 256)      # S 1024, B 2048, L 2816, XL 3072
        self.up, self.down = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)
        _xavier(self.up, self.down)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)               # 2 x [N, T, hidden], from one matmul
        return self.down(F.silu(gate) * value)                  # [N, T, D]


class DepthwiseConv(nn.Module):
    """3x3 depthwise convolution over the E x E grid of tokens (E per side), with bias. No residual: it is
    identity-initialised (centre tap 1, the rest 0), so it starts as a no-op and learns local mixing between
    neighbouring patches, which a one-directional scan connects poorly (in raster order the patch above is E back)."""

    def __init__(self, dim, side):
        super().__init__()
        self.side = side
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        nn.init.dirac_(self.conv.weight, groups=dim)     # each channel's centre tap 1, the rest 0
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        # The grid is read in the current scan order; in a flipped or transposed order the same conv sees a
        # rotated or transposed image, which a learned 3x3 kernel can absorb (the official code does the same).
        N, T, D = x.shape
        grid = x.unflatten(1, (self.side, self.side)).permute(0, 3, 1, 2)   # [N, D, E, E] view, memory [N, E, E, D]
        out = self.conv(grid).permute(0, 2, 3, 1).reshape(N, T, D)          # [N, E, E, D] -> [N, T, D]
        return out.to(x.dtype)   # under autocast the conv runs in bf16; keep the residual stream's dtype


# -----------------------------------------------------------------------------------------------------------
# 3. The scan order ("spatial reorient") and the DiG block
#
# A GLA block reads its tokens in one direction, so token t knows nothing about tokens after it. DiG changes the
# order between blocks: after every block it reverses the sequence, and after every odd block it also
# transposes the grid. Starting from raster order, block i therefore reads (a 2 x 2 grid: ab/cd)
#     i % 4 == 0: row-major forward (abcd)         i % 4 == 1: row-major reversed (dcba)
#     i % 4 == 2: column-major forward (acbd)      i % 4 == 3: column-major reversed (dbca)
# and after a multiple of 4 blocks the tokens are back in raster order for the final layer.


def reorient(x, transpose, side):
    """Reverse the token order, and with transpose=True also swap rows and columns of the side x side grid.
    x: [N, T, D] with T = side * side. After block i, DiG calls it with transpose = (i is odd)."""
    x = x.flip(1)                                                         # reverse the scan
    if transpose:
        x = x.unflatten(1, (side, side)).transpose(1, 2).flatten(1, 2)   # rows <-> columns
    return x


class DiGBlock(AdaLNZeroBlock):
    """adaLN-Zero(GLA) and adaLN-Zero(SwiGLU), then the depthwise convolution over the token grid; the block
    hands its output over in the next block's scan order (block `index` reads in order index % 4)."""

    def __init__(self, dim, num_heads, side, index):
        super().__init__(dim, GatedLinearAttention(dim, num_heads), SwiGLU(dim))
        self.dwconv, self.side = DepthwiseConv(dim, side), side
        # A bool, not the index: a compiled block is specialised on it, and two variants serve every depth.
        self.transpose_after = index % 2 == 1

    def forward(self, x, c):
        x = self.dwconv(super().forward(x, c))                    # [N, T, D], this block's order
        return reorient(x, self.transpose_after, self.side)       # [N, T, D], the next block's order


# -----------------------------------------------------------------------------------------------------------
# 4. The model


class FinalLayer(nn.Module):
    """adaLN (shift and scale from c), then a zero-initialised Linear to one patch of outputs per token."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)            # 2 x [N, D]
        return self.linear(modulate(self.norm(x), shift, scale))           # [N, T, p*p*out_channels]


class DiffusionTransformer(nn.Module):
    """What DiG and DiT share: patches + position, conditioning c = t_emb + y_emb, blocks, final layer, unpatchify.

    Subclasses build self.blocks, each a module (x [N, T, D], c [N, D]) -> [N, T, D]. Arguments:
      input_size: side of the (square) input in pixels or latent cells; patch_size must divide it.
      in_channels: channels of the input (4 for Stable Diffusion latents, 3 for pixels).
      num_classes: class labels 0..num_classes-1; num_classes itself is the null label.
      learn_sigma: also predict IDDPM's variance weight v per pixel (not GLA's values; section 7): twice the outputs.
      class_dropout_prob: how often a training label is dropped to the null label (for guidance)."""

    def __init__(self, hidden_size, patch_size, input_size=32, in_channels=4, num_classes=1000,
                 learn_sigma=True, class_dropout_prob=0.1):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide input_size {input_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size                          # E: tokens per side, T = E * E
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # Initialised like a Linear on the flattened patch, as in DiT.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(hidden_size, -1))
        nn.init.zeros_(self.x_embedder.bias)
        # Fixed, not learned (a frozen Parameter, as in DiT, so that it is counted and saved like theirs).
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.grid_size)[None], requires_grad=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def forward(self, x, t, y, force_drop_ids=None):
        """x: [N, in_channels, input_size, input_size]; t: [N] diffusion steps; y: [N] labels.
        force_drop_ids: optional [N], 1 (or True) where the label is replaced by the null label; given, it
        replaces the random label dropout of training mode (train_tiny.py draws it with the rest of a step).
        Returns [N, out_channels, input_size, input_size]: the predicted noise (and v, see section 7)."""
        check_model_inputs(self, x, t, y)
        x = self.x_embedder(x).flatten(2).transpose(1, 2)   # [N, D, E, E] -> [N, T, D], tokens in raster order
        x = x.contiguous() + self.pos_embed                  # copy to row-major [N, T, D] (memory was [N, D, T])
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)   # [N, D]
        x = self.run_blocks(x, c)                            # [N, T, D]
        x = self.final_layer(x, c)                           # [N, T, p*p*out_channels]
        return self.unpatchify(x)                            # [N, out_channels, input_size, input_size]

    def run_blocks(self, x, c):
        for block in self.blocks:
            x = block(x, c)
        return x

    def unpatchify(self, x):
        # [N, T, p*p*C] -> [N, C, E*p, E*p]: token (h, w) holds the p x p patch at rows h*p.., columns w*p..
        N, E, p, C = x.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(N, E, E, p, p, C))
        return x.reshape(N, C, E * p, E * p)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance in one batched pass: sample() doubles the batch, y is [labels; null labels], and
        x's second half is ignored (the first is used twice). Both halves get eps = eps_uncond + cfg_scale *
        (eps_cond - eps_uncond), on all in_channels (the official DiT guides only the first 3); v is never guided."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class DiG(DiffusionTransformer):
    """DiT with GLA blocks, a scan order that turns every block, and a depthwise conv at the end of each block.
    Other keyword arguments (input_size, in_channels, num_classes, ...): see DiffusionTransformer."""

    def __init__(self, depth=12, hidden_size=384, num_heads=6, patch_size=2, **kwargs):
        check_dig_depth(depth)    # a multiple of 4, the scan order's period (section 3)
        super().__init__(hidden_size, patch_size, **kwargs)
        self.blocks = nn.ModuleList(DiGBlock(hidden_size, num_heads, self.grid_size, i) for i in range(depth))


# -----------------------------------------------------------------------------------------------------------
# 5. The DiT baseline: the same trunk with softmax attention and a GELU MLP, no scan order, no convolution


class SoftmaxAttention(nn.Module):
    """DiT's multi-head self-attention (qkv and output projections with bias). Two ways to compute the same maths:
    "sdpa": F.scaled_dot_product_attention (FlashAttention on a GPU; never stores the T x T weights);
    "materialized": softmax(Q K^T / sqrt(d)) V written out, storing [N, heads, T, T] (the quadratic memory)."""

    def __init__(self, dim, num_heads, attention="sdpa"):
        super().__init__()
        if attention not in ("sdpa", "materialized"):
            raise ValueError(f'attention must be "sdpa" or "materialized"; got {attention!r}')
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.attention = num_heads, attention
        self.scale = (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        _xavier(self.qkv, self.proj)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)   # 3 x [N, H, T, d]
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)                                  # [N, H, T, d]
        else:
            # Under CUDA autocast the softmax runs in fp32: [N, H, T, T] fp32 weights plus a bf16 copy for the
            # product, the quadratic memory that FlashAttention never stores.
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)           # [N, H, T, T]
            o = weights @ v                                                              # [N, H, T, d]
        return self.proj(o.transpose(1, 2).reshape(N, T, D))                           # [N, T, D]


class GeluMLP(nn.Module):
    """DiT's MLP: Linear(D, 4D), GELU (tanh approximation), Linear(4D, D), with biases."""

    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        _xavier(self.fc1, self.fc2)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiT(DiffusionTransformer):
    """The DiT of the same size, built from the same trunk. attention: "sdpa" or "materialized"."""

    def __init__(self, depth=12, hidden_size=384, num_heads=6, patch_size=2, attention="sdpa", **kwargs):
        super().__init__(hidden_size, patch_size, **kwargs)
        self.blocks = nn.ModuleList(
            AdaLNZeroBlock(hidden_size, SoftmaxAttention(hidden_size, num_heads, attention), GeluMLP(hidden_size))
            for _ in range(depth))


# -----------------------------------------------------------------------------------------------------------
# 6. Named configurations: (depth, hidden size, heads) per size; "/p": patch p = 2, 4 or 8. Heads are 64 wide at all
# sizes (GLA: K 32, V 64), so DiT-XL here has 18 heads where the official one has 16 of 72.
# Each entry is a function (**kwargs) -> model, e.g. DiG_models["DiG-S/2"](input_size=32, num_classes=10).

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 18)}


def _configs(cls):
    return {f"{cls.__name__}-{size}/{patch}": functools.partial(cls, depth=depth, hidden_size=dim,
                                                                  num_heads=heads, patch_size=patch)
            for size, (depth, dim, heads) in SIZES.items() for patch in (2, 4, 8)}


DiG_models = _configs(DiG)
DiT_models = _configs(DiT)


# -----------------------------------------------------------------------------------------------------------
# 7. Gaussian diffusion (DiT's, from IDDPM: "Improved DDPM", Nichol & Dhariwal 2021)
#
# Forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with abar_t = prod_{s<=t} (1 - beta_s)
# (alphas_cumprod below). The network predicts eps and, per pixel, a value v (an interpolation weight, nominally
# in [-1, 1], not clamped) that places the variance of the reverse step between beta_t and the true posterior
# variance ("learned range", in log space). Loss = MSE(eps) + the variational bound, which trains only the
# variance ("hybrid" loss; see training_losses). The schedule arrays are float64 numpy, as in IDDPM; values are
# looked up per step and used in float32.


def linear_betas(num_timesteps=1000):
    scale = 1000 / num_timesteps          # keeps the same total noise if the number of steps changes
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def mean_flat(x):
    return x.mean(dim=tuple(range(1, x.dim())))      # [N, ...] -> [N]


def split_model_output(out, C):
    """[N, 2C, ...] -> (eps, v): a model that learns its variance; [N, C, ...] -> (eps, None): a fixed variance."""
    if out.shape[1] not in (C, 2 * C):
        raise ValueError(f"the model output has {out.shape[1]} channels; expected {C} (eps) or {2 * C} (eps, v)")
    return out[:, :C], (out[:, C:] if out.shape[1] == 2 * C else None)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), element-wise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for data in [-1, 1] quantised to 256 levels (bins of width 2/255), under N(means, std e^log_scales):
    the Gaussian mass of x's bin, with the end bins stretched to -inf and +inf. Used at t = 0 (also for
    continuous latents, as in the official code). IDDPM uses a tanh approximation of the normal CDF; we use erf."""
    cdf = lambda z: 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (x - means + 1.0 / 255))
    cdf_minus = cdf(inv_std * (x - means - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))                       # lowest bin: (-inf, x + 1/255]
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))   # highest bin: [x - 1/255, inf)
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))


class GaussianDiffusion:
    """A diffusion process over num_timesteps = len(betas) steps. timestep_map[i] is the original step (0..999)
    that step i of this process stands for; the model is always called with original steps (the identity for
    the full process, a subset for a respaced one)."""

    def __init__(self, betas, timestep_map=None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map, np.int64)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # The true posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # Its log, with the t = 0 entry (a variance of exactly 0) replaced by the t = 1 value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # A model that does not learn its variance (out_channels == in_channels) gets beta_t ("fixed large").
        self.fixed_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        self._on_device = {}

    # -- looking up per-step values --

    def _extract(self, arr, t, x):
        # arr[t] as float32 on t's device (_lookup, after DDIM), shaped [N, 1, 1, 1] to broadcast over a batch like x.
        return self._lookup(arr, t).float().view(-1, *([1] * (x.dim() - 1)))

    def _model_output(self, model, x, t, model_kwargs):
        # The model is trained on the original steps 0..999, so a respaced process hands it timestep_map[t].
        return model(x, self._lookup(self.timestep_map, t), **(model_kwargs or {})).float()

    # -- the forward process and its posterior --

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t),
                self._extract(self.posterior_log_variance_clipped, t, x_t))

    # -- the reverse process --

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def _p_from_output(self, out, x, t, clip_denoised=False):
        """p(x_{t-1} | x_t) from the model's output [N, 2C, ...] (eps and v) or [N, C, ...] (eps, fixed variance)."""
        eps, v = split_model_output(out, x.shape[1])
        if v is None:
            log_variance = self._extract(self.fixed_log_variance, t, x)
        else:
            min_log = self._extract(self.posterior_log_variance_clipped, t, x)
            max_log = self._extract(self.log_betas, t, x)
            frac = (v + 1) / 2                                  # v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model, x, t, model_kwargs=None, clip_denoised=False):
        """Run the model on x_t: dict with the mean, variance, log_variance of p(x_{t-1} | x_t) and pred_xstart."""
        return self._p_from_output(self._model_output(model, x, t, model_kwargs), x, t, clip_denoised)

    # -- training --

    def _vb_terms_bpd(self, out, x_start, x_t, t):
        # The variational bound term for step t, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        # for t > 0, and the decoder's negative log-likelihood of x_0 at t = 0.
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self._p_from_output(out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"]))
        return torch.where(t == 0, nll / math.log(2.0), kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses at steps t: dict of "loss" = "mse" + "vb", each [N]."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        eps, v = split_model_output(self._model_output(model, x_t, t, model_kwargs), x_start.shape[1])
        mse = mean_flat((noise - eps) ** 2)
        if v is None:
            vb = torch.zeros_like(mse)          # fixed variance: nothing for the bound to train
        else:
            # The bound trains the variance only: the mean enters it through a stop-gradient, so the eps
            # prediction is driven by the MSE alone (IDDPM's hybrid loss).
            vb = self._vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x_start, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # -- sampling loops --

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, model_kwargs=None, device=None, progress=False,
                      clip_denoised=False, generator=None):
        """Ancestral sampling: x_T ~ N(0, I), then x_{t-1} ~ p(x_{t-1} | x_t) down to x_0."""
        x = self._initial_noise(model, shape, noise, device, generator)
        for i in self._steps(progress):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(model, x, t, model_kwargs, clip_denoised)
            x = p["mean"]
            if i > 0:                                   # the last step returns the mean
                x = x + torch.exp(0.5 * p["log_variance"]) * torch.randn(x.shape, generator=generator, device=x.device)
        return x

    # -- optional reading: DDIM, a second sampler; helpers (arrays on the device, initial noise, progress line) --

    @torch.no_grad()
    def ddim_sample_loop(self, model, shape, noise=None, model_kwargs=None, device=None, eta=0.0, progress=False,
                         clip_denoised=False, generator=None):
        """DDIM: step to x_{t-1} through the predicted x_0; eta = 0 is deterministic, eta = 1 is DDPM-like."""
        x = self._initial_noise(model, shape, noise, device, generator)
        for i in self._steps(progress):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            p = self.p_mean_variance(model, x, t, model_kwargs, clip_denoised)
            # The eps that the (possibly clipped) predicted x_0 implies: _predict_xstart_from_eps solved for eps.
            eps = ((self._extract(self.sqrt_recip_alphas_cumprod, t, x) * x - p["pred_xstart"])
                   / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x))
            abar = self._extract(self.alphas_cumprod, t, x)
            abar_prev = self._extract(self.alphas_cumprod_prev, t, x)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            # 1 - abar_prev - sigma^2 is ~0 on a jump to t = 0 and can round below it: clamp, or sqrt gives NaN.
            x = p["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0)) * eps
            if eta > 0 and i > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x

    def _lookup(self, arr, t):
        # arr[t] on t's device. Each schedule array is copied to a device once: a fresh host-to-device copy on
        # every call would synchronise the GPU a dozen times per training step.
        key = (id(arr), t.device)
        if key not in self._on_device:
            self._on_device[key] = torch.from_numpy(arr).to(t.device)
        return self._on_device[key][t]

    def _initial_noise(self, model, shape, noise, device, generator):
        if noise is None and device is None:   # the model's device (of a bound method's model: forward_with_cfg)
            parameters = getattr(getattr(model, "__self__", model), "parameters", None)
            device = next(parameters()).device if callable(parameters) else "cpu"
        return noise if noise is not None else torch.randn(*shape, generator=generator, device=device)

    def _steps(self, progress):
        for i in reversed(range(self.num_timesteps)):
            if progress and (i % 10 == 0 or i == self.num_timesteps - 1):
                print(f"\rsampling: {self.num_timesteps - i}/{self.num_timesteps}", end="" if i else "\n", flush=True)
            yield i


def _ddim_timesteps(num_timesteps, count):
    """Spacing "ddim<count>": steps 0, s, 2s, ... with the constant stride s that takes exactly count of them."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return list(range(0, num_timesteps, stride))
    raise ValueError(f"no constant stride takes exactly {count} of {num_timesteps} steps")


def space_timesteps(num_timesteps, spacing):
    """The original steps a shorter process keeps (sorted), as in IDDPM.
    spacing: "250" (250 steps spread evenly, both ends included); "10,15,20" (the steps cut into 3 equal sections,
    that many evenly spread steps from each); a list of such counts; or "ddim50" (a constant stride from step 0)."""
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        return _ddim_timesteps(num_timesteps, int(spacing[len("ddim"):]))
    counts = spacing.split(",") if isinstance(spacing, str) else [spacing] if isinstance(spacing, int) else spacing
    counts = [int(s) for s in counts]
    section, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = section + (1 if i < extra else 0)
        if not 0 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} (spacing {spacing!r})")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return kept


def create_diffusion(timestep_respacing="", num_timesteps=1000):
    """The DiT diffusion: linear betas over 1000 steps, optionally respaced to fewer steps for sampling. A
    respaced process keeps some steps, with the same abar_t at each: beta'_i = 1 - abar(kept_i) / abar(kept_{i-1})
    gives the same marginals in bigger jumps."""
    betas = linear_betas(num_timesteps)
    if timestep_respacing in ("", None):
        return GaussianDiffusion(betas)
    kept = space_timesteps(num_timesteps, timestep_respacing)
    alphas_cumprod = np.cumprod(1.0 - betas)[kept]
    new_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
    return GaussianDiffusion(new_betas, timestep_map=kept)


# -----------------------------------------------------------------------------------------------------------
# 8. Sampling


@torch.no_grad()
def sample(model, labels, steps=250, cfg_scale=1.0, sampler="ddpm", noise=None, generator=None, eta=0.0,
           clip_denoised=False, progress=False):
    """Generate one sample per label: [N] labels -> x_0 of shape [N, in_channels, input_size, input_size].
    steps: the process is respaced to this many evenly spread steps (DiT samples with 250).
    cfg_scale: classifier-free guidance; 1 runs the plain conditional model, any other value runs the batch
        twice (labels, then null labels) in one pass and mixes the two predictions.
    sampler: "ddpm" (ancestral) or "ddim" (with eta). generator: a torch.Generator on the model's device.
    Call it with the model in eval mode (training mode would drop labels). Pixel models: clamp the result."""
    labels = torch.as_tensor(labels, device=next(model.parameters()).device)
    shape = (len(labels), model.in_channels, model.input_size, model.input_size)
    check_sample_args(sampler, steps, noise, shape)
    noise = torch.randn(shape, generator=generator, device=labels.device) if noise is None else noise
    # DDIM is often respaced with "ddim<N>" (a constant stride from step 0, never visiting step 999); evenly
    # spread steps with both ends work for any count and for both samplers.
    diffusion = create_diffusion(str(steps))
    if cfg_scale == 1.0:
        model_fn, kwargs = model, {"y": labels}
    else:
        noise = torch.cat([noise, noise], dim=0)
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)], dim=0)
        model_fn, kwargs = model.forward_with_cfg, {"y": labels, "cfg_scale": cfg_scale}
    loop = diffusion.p_sample_loop if sampler == "ddpm" else functools.partial(diffusion.ddim_sample_loop, eta=eta)
    x = loop(model_fn, noise.shape, noise=noise, model_kwargs=kwargs, progress=progress, clip_denoised=clip_denoised,
             generator=generator)
    return x[:shape[0]]     # with guidance, the second half only carried the unconditional pass


# -----------------------------------------------------------------------------------------------------------
# 9. Speed: compiled blocks and CUDA graphs (train_tiny.py uses both on a GPU). Nothing above depends on them. At
# small sizes a DiG step is a thousand small kernels, mostly element-wise, that take as long to launch from Python
# as to run: compile_blocks fuses the element-wise work, and a CUDA graph replays a step without Python.


def compile_blocks(model):
    """torch.compile each block ("regional" compilation) and return the model. Each kind of block compiles once
    (DiG has two: with and without a transpose after it). Each GLA layer becomes one opaque operator (below); the
    norms, modulations, gates, activations, residual adds and permutes around it become a few generated kernels."""
    for block in model.blocks:
        if isinstance(block, DiGBlock):
            block.forward = functools.partial(_forward_recomputing, block.forward)
            block.mixer.__class__ = FusedGatedLinearAttention   # same parameters, the fused forward
        block.compile()
    return model


class FusedGatedLinearAttention(GatedLinearAttention):
    """GatedLinearAttention with its GLA, output norm and gate in one Triton operator (gla_kernel.gla_norm_gate)
    where the kernel runs: fewer passes over the activations. compile_blocks gives each GLA layer this class."""

    def forward(self, x):
        if self._gla(x) is not gla_kernel.chunk_gla:
            return super().forward(x)
        proj = self.in_proj(x)
        g = self.log_forget_gate(x).to(proj.dtype)
        return self.proj(gla_kernel.gla_norm_gate(proj, g, self.norm_weight, scale=self.scale))


def _forward_recomputing(forward, x, c):
    # A DiG block has many intermediates for its backward (gates, SwiGLU's product, ...). Compiled, it keeps x, c
    # and what _keep_matmul_inputs_and_outputs names, and recomputes the rest inside kernels its backward runs.
    if not torch.is_grad_enabled():
        return forward(x, c)
    policy = functools.partial(create_selective_checkpoint_contexts, _keep_matmul_inputs_and_outputs)
    return checkpoint(forward, x, c, use_reentrant=False, context_fn=policy)


def _keep_matmul_inputs_and_outputs(ctx, op, *args, **kwargs):
    # Outputs of matmuls and GLA cost matmul work to recompute; autocast's bf16 casts (what matmuls and the conv
    # read) a pass over the float32 stream. Everything else is element-wise on bf16 values and is recomputed.
    keep = op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.dig.gla_forward.default,
                  torch.ops.dig.gla_norm_gate.default, torch.ops.aten._to_copy.default)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def capture_cuda_graph(fn, warmup=3):
    """Run fn() `warmup` times (compiling, optimizer state; on a side stream, as CUDA graphs require), then record
    one call: returns (graph, its output). graph.replay() reruns its kernels on the same memory without Python: fn
    reads tensors refilled in place, each replay overwrites the output; autocast needs cache_enabled=False."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()     # the capture's private pool should not sit beside the warm-up's cached blocks
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


class GraphedDenoiser:
    """Stands in for a network in sample(), e.g. sample(GraphedDenoiser(compile_blocks(model)), labels): net(x, t, y)
    and net.forward_with_cfg(x, t, y, scale) replay a CUDA graph captured per batch shape (and guidance scale)."""

    def __init__(self, net):
        self.net, self.graphs, self.parameters, self.num_classes = net, {}, net.parameters, net.num_classes
        self.in_channels, self.input_size = net.in_channels, net.input_size

    def __call__(self, x, t, y):
        return self.forward_with_cfg(x, t, y, cfg_scale=None)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        key = (x.shape, x.dtype, cfg_scale, torch.is_autocast_enabled("cuda"))
        if key not in self.graphs:
            inputs = [a.clone() for a in (x, t, y)]

            @torch.no_grad()
            def denoise():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=key[-1], cache_enabled=False):
                    return self.net(*inputs) if cfg_scale is None else self.net.forward_with_cfg(*inputs, cfg_scale)
            self.graphs[key] = (inputs, *capture_cuda_graph(denoise, warmup=2))
        inputs, graph, output = self.graphs[key]
        for static, new in zip(inputs, (x, t, y)):
            static.copy_(new)
        graph.replay()
        return output.clone()    # the next replay overwrites `output`; the sampler may still hold this one


# -----------------------------------------------------------------------------------------------------------
# 10. Checks on what callers pass in: an error that says what was wrong and what is accepted, not a shape error
# deep inside a block.


def check_model_inputs(model, x, t, y):
    expected = (model.in_channels, model.input_size, model.input_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"{type(model).__name__} was built for inputs [N, {', '.join(map(str, expected))}] "
                         f"(in_channels, input_size, input_size); got {tuple(x.shape)}")
    if t.shape != x.shape[:1] or y.shape != x.shape[:1]:
        raise ValueError(f"t and y must be [N] = [{x.shape[0]}]; got t {tuple(t.shape)}, y {tuple(y.shape)}")
    # The range check reads the labels on the host, which a CUDA graph capture forbids (its warm-up checks).
    capturing = y.is_cuda and torch.cuda.is_current_stream_capturing()
    if y.is_floating_point() or (not capturing and not ((y >= 0) & (y <= model.num_classes)).all()):
        raise ValueError(f"labels must be integers in [0, {model.num_classes}] ({model.num_classes} is the "
                         f"null label of classifier-free guidance); got {y.tolist()[:16]}")


def check_dig_depth(depth):
    if depth % 4:
        raise ValueError(f"DiG's scan order has period 4 (row fwd, row rev, column fwd, column rev) and the "
                         f"final layer needs raster order back, so depth must be a multiple of 4; got {depth}")


def warn_slow_gla(head_k, head_v, dtype):
    warnings.warn(f"GLA heads of {head_k} x {head_v} in {dtype}: the Triton kernel takes head sizes "
                  f"{gla_kernel.HEAD_DIMS} in fp16/bf16/fp32, so this model runs the slower PyTorch chunked path")


def check_sample_args(sampler, steps, noise, shape):
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f'sampler must be "ddpm" or "ddim"; got {sampler!r}')
    if not 2 <= steps <= 1000:
        raise ValueError(f"steps must be between 2 and 1000 (a respaced process needs two); got {steps}")
    if noise is not None and tuple(noise.shape) != shape:
        raise ValueError(f"noise must be {shape} for this model and {shape[0]} labels; got {tuple(noise.shape)}")

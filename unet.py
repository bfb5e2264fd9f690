"""The denoising network of PCCD: a compact attention U-Net (paper Methods and Fig. S3, "U-Net
... with self-attention layers") that reads a noisy cloud x_t, its step t and the condition, and
predicts the noise eps (the paper's Eq. S4) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 -- which
of the two is recorded in each checkpoint's `sampling` entry (both presets, and the shipped
model, predict v).

The paper's U-Net treats the (3, 128, 3) cloud as a 3-channel 128 x 3 image and has 163.7 M
parameters. Here the cloud is read as what it is, a sequence of 128 points with 9 numbers each
(3 channels x 3 values), and a 1-D U-Net runs along the points:

    (B, 3, 128, 3) -> (B, 9, 128) -> 128 points -> 64 -> 32 -> middle -> 32 -> 64 -> 128 -> (B, 3, 128, 3)

Self-attention lets every point see every other point (atoms must agree on the lattice and
avoid each other); it runs at 64 and 32 points and in the middle, where it is cheap. Every
residual block is modulated (FiLM: scale and shift) by the sum of a sinusoidal time embedding
and a condition embedding made of
  - the 1-3 elements by atomic number, in the slot order of channel 1 (0 = empty slot),
  - the band-gap class (metal, < 1.5 eV, >= 1.5 eV, unknown),
  - the magnetic ordering (NM, FM, FiM, AFM, unknown).
The condition also enters at the input, as a learned per-point pattern (see UNet.__init__).
For classifier-free guidance (Ho & Salimans, 2022) the whole condition embedding is replaced by
a learned null embedding where `drop` is True: in training with probability `cond_drop`, in
sampling for the unconditional pass. (The original code computed the dropped embedding and then
used the undropped one, so its guidance did nothing.)

Porting notes (every framework default this file relies on, written out)
- Wiring. UNet.forward, line by line with the shapes: the time MLP (Linear, SiLU, Linear) plus
  the condition embedding c is `emb`; the stem plus `position` plus the pattern of c; down1 (s1),
  pool, down2 + attn2 (s2), pool, down3 + attn3 (s3); mid1, mid_attn, mid2; up3 on
  torch.cat([h, s3]) (that channel order) + up_attn3, upsample; up2 on cat([h, s2]) + up_attn2,
  upsample; up1 on cat([h, s1]), no attention; the head. ResidualBlock.forward and
  SelfAttention.forward show the order inside a block (a GroupNorm before the attention, the
  residual added after). The golden file's act_X is the output of module X here (act_time:
  after the MLP; act_condition: c).
- Layout. x (B, 3, 128, 3) becomes (B, 9, 128) by x.permute(0, 1, 3, 2).reshape(B, 9, 128):
  feature k = 3 * channel + column, so features 0-2 are x, y, z of channel 0, 3-5 the element
  slots, 6-8 the lattice columns. The head's (B, 9, 128) goes back by the inverse reshape.
- Conv1d weights are (out, in, kernel), kernel 3 with padding 1 (zeros), or kernel 1; Linear
  weights are (out, in), y = x W^T + b. GroupNorm: 8 groups, eps 1e-5, affine.
- nn.MultiheadAttention(C, 4 heads, batch_first=True) on (B, L, C): in_proj_weight (3C, C) stacks
  the q, k, v projections in that order (rows 0..C-1 are q), in_proj_bias (3C,) likewise; each
  of q, k, v is split into 4 heads of C/4 *contiguous* channels; scores are q k^T / sqrt(C/4),
  softmax over the keys; the heads are concatenated back in order and go through out_proj
  (weight (C, C), bias (C,)). No dropout, no mask.
- Downsampling is avg_pool1d(2) (mean of points 2i and 2i+1); upsampling is F.interpolate with
  mode="nearest", scale 2 (point i copies point i // 2).
- sinusoidal_embedding: [sin(t f_0..f_63), cos(t f_0..f_63)] with f_k = 10000^(-k/64), sin first.
- FiLM: film(silu(emb)) is split into scale (first half) and shift (second half); h * (1 + scale)
  + shift after the second GroupNorm. SiLU(x) = x sigmoid(x).
- `position` (1, w1, 128) and the condition pattern, Linear(E, w1 * 128) read as (B, w1, 128)
  (channel-major), are added to the stem's output.
- The condition embedding: per-slot element embeddings (B, 3, E) flattened slot by slot into
  (B, 3E), then a Linear; the slots are in the order of channel 1 (data.canonical_order: by
  rising Pauling electronegativity, ties alphabetically, elements without one last by atomic
  number), atomic number 0 for an empty slot. Where drop is True, the whole embedding is the
  learned `null` vector -- so the condition pattern, made from it, is the null's too.
- The shipped weights are stored in float16; load them into float32 and compute in float32, the
  matmuls too: a framework that uses TF32 or bf16 on a GPU by default misses the golden tensors
  (JAX: precision="highest"; torch's convolutions on a GPU: torch.backends.cudnn.allow_tf32 = False).
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    widths: tuple = (32, 64, 128)    # channels at 128, 64 and 32 points
    attention_heads: int = 4
    embed_dim: int = 128             # time and condition embeddings
    n_atomic_numbers: int = 119      # 0 = empty element slot, 1-118 = H ... Og
    n_band_gap_classes: int = 4
    n_magnetic_orderings: int = 5
    n_element_slots: int = 3

    def to_dict(self):
        return asdict(self)


def sinusoidal_embedding(t, dim):
    """Transformer-style embedding of the timestep: (B,) -> (B, dim)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with FiLM from the embedding in between."""

    def __init__(self, c_in, c_out, embed_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, c_in, eps=1e-5)
        self.conv1 = nn.Conv1d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(embed_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(8, c_out, eps=1e-5)
        self.conv2 = nn.Conv1d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):                                   # x (B, C, L), emb (B, E)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention across the points, with a residual connection."""

    def __init__(self, channels, heads):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels, eps=1e-5)
        self.attention = nn.MultiheadAttention(channels, heads, dropout=0.0, batch_first=True)

    def forward(self, x):                                        # (B, C, L)
        h = self.norm(x).transpose(1, 2)                         # (B, L, C)
        h, _ = self.attention(h, h, h, need_weights=False)
        return x + h.transpose(1, 2)


class ConditionEmbedding(nn.Module):
    """(elements (B, 3) atomic numbers, band_gap (B,), magnetic (B,)) -> (B, E), or the learned
    null embedding where drop (B,) is True."""

    def __init__(self, cfg):
        super().__init__()
        self.element = nn.Embedding(cfg.n_atomic_numbers, cfg.embed_dim)
        self.slots = nn.Linear(cfg.n_element_slots * cfg.embed_dim, cfg.embed_dim)  # keeps order
        self.band_gap = nn.Embedding(cfg.n_band_gap_classes, cfg.embed_dim)
        self.magnetic = nn.Embedding(cfg.n_magnetic_orderings, cfg.embed_dim)
        self.null = nn.Parameter(torch.zeros(cfg.embed_dim))

    def forward(self, elements, band_gap, magnetic, drop=None):
        per_slot = self.element(elements).flatten(1)             # (B, 3, E) -> (B, 3E)
        c = self.slots(per_slot) + self.band_gap(band_gap) + self.magnetic(magnetic)
        if drop is not None:                                     # classifier-free guidance
            c = torch.where(drop[:, None], self.null.expand_as(c), c)
        return c


class UNet(nn.Module):
    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or UNetConfig()
        w1, w2, w3 = cfg.widths
        E = cfg.embed_dim
        self.time = nn.Sequential(nn.Linear(E, E), nn.SiLU(), nn.Linear(E, E))
        self.condition = ConditionEmbedding(cfg)
        self.stem = nn.Conv1d(9, w1, 3, padding=1)
        # The layout is fixed (atoms in blocks, angle rows 0-63, length rows 64-127), but convs
        # and attention cannot tell one point from another: a learned embedding per point can.
        self.position = nn.Parameter(torch.zeros(1, w1, 128))
        # The condition also writes a per-point pattern: what the clean cloud of these elements
        # looks like point by point (which slot owns which points, the lattice rows) is the
        # first thing the network must know, and FiLM alone (one scale per channel) is slow to
        # learn it.
        self.condition_pattern = nn.Linear(E, w1 * 128)
        # encoder
        self.down1 = ResidualBlock(w1, w1, E)                    # 128 points
        self.down2 = ResidualBlock(w1, w2, E)                    # 64 points
        self.attn2 = SelfAttention(w2, cfg.attention_heads)
        self.down3 = ResidualBlock(w2, w3, E)                    # 32 points
        self.attn3 = SelfAttention(w3, cfg.attention_heads)
        # middle
        self.mid1 = ResidualBlock(w3, w3, E)
        self.mid_attn = SelfAttention(w3, cfg.attention_heads)
        self.mid2 = ResidualBlock(w3, w3, E)
        # decoder: each level takes the upsampled path concatenated with the encoder's skip
        self.up3 = ResidualBlock(w3 + w3, w3, E)                 # 32 points
        self.up_attn3 = SelfAttention(w3, cfg.attention_heads)
        self.up2 = ResidualBlock(w3 + w2, w2, E)                 # 64 points
        self.up_attn2 = SelfAttention(w2, cfg.attention_heads)
        self.up1 = ResidualBlock(w2 + w1, w1, E)                 # 128 points
        self.head = nn.Sequential(nn.GroupNorm(8, w1, eps=1e-5), nn.SiLU(), nn.Conv1d(w1, 9, 3, padding=1))

    def forward(self, x, t, elements, band_gap, magnetic, drop=None):
        """x (B, 3, 128, 3) noisy cloud in [-1, 1] units, t (B,) timesteps -> the prediction
        (eps or v, whichever the network was trained on), (B, 3, 128, 3)."""
        B = x.shape[0]
        c = self.condition(elements, band_gap, magnetic, drop)               # (B, E)
        emb = self.time(sinusoidal_embedding(t, self.cfg.embed_dim)) + c     # (B, E)
        pattern = self.condition_pattern(c).view(B, -1, 128)                 # (B, w1, 128)
        h = x.permute(0, 1, 3, 2).reshape(B, 9, 128)                         # (B, 9, 128)
        h = self.stem(h) + self.position + pattern                           # (B, w1, 128)
        s1 = self.down1(h, emb)                                              # (B, w1, 128)
        s2 = self.attn2(self.down2(F.avg_pool1d(s1, 2), emb))                # (B, w2, 64)
        s3 = self.attn3(self.down3(F.avg_pool1d(s2, 2), emb))                # (B, w3, 32)
        h = self.mid2(self.mid_attn(self.mid1(s3, emb)), emb)                # (B, w3, 32)
        h = self.up_attn3(self.up3(torch.cat([h, s3], 1), emb))              # (B, w3, 32)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")               # (B, w3, 64)
        h = self.up_attn2(self.up2(torch.cat([h, s2], 1), emb))              # (B, w2, 64)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")               # (B, w2, 128)
        h = self.up1(torch.cat([h, s1], 1), emb)                             # (B, w1, 128)
        h = self.head(h)                                                     # (B, 9, 128)
        return h.reshape(B, 3, 3, 128).permute(0, 1, 3, 2)                   # (B, 3, 128, 3)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())

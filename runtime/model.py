"""Decoder-only transformer (Llama layout): RMSNorm, RoPE, SwiGLU, grouped-query attention.

The model reads like the math and owns its cost model: :meth:`GPT.num_params`,
:meth:`GPT.flops_per_token` and :meth:`GPT.estimate_mfu`. It is built on the meta device,
sharded with FSDP2, materialised with ``to_empty`` and filled by :meth:`GPT.init_weights`,
which draws every parameter from its own generator (seed, parameter name) so the initial
weights are identical whatever the world size (torchtitan's pattern).

Imports only torch, the standard library and :mod:`llmtrain.api.config`: the GPU benchmark
imports this module on a machine that has nothing else.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmtrain.api.config import ModelConfig

# Dense bf16 tensor-core peak per device, FLOP/s, matched against torch.cuda.get_device_name().
# Order matters: the PCIe H100 must match before the generic H100 entry. Unknown devices and
# CPUs get no entry: MFU is reported as null rather than against a guessed peak.
PEAK_FLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIE", 756e12),
    ("H100 SXM", 989e12),
    ("H100 80GB HBM3", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a device by name, or None when unknown (CPU included)."""
    if not device_name:
        return None
    name = device_name.upper()
    for key, flops in PEAK_FLOPS_BF16:
        if key in name:
            return flops
    return None


def param_count(cfg: ModelConfig) -> int:
    """Closed form of the parameter count (no biases; tied output shares the embedding)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d
    ffn = 3 * d * cfg.ffn_hidden_size
    block = attn + ffn + 2 * d  # + two RMSNorm weights
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return embedding + cfg.n_layers * block + d + head  # + final norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x / sqrt(mean(x²) + eps) · g, computed in fp32 for stability under bf16.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(
    head_dim: int, context_length: int, theta: float, device: torch.device | None = None
) -> Tensor:
    """cos/sin of the rotation angles t·θ^(-2i/d), stacked as [2, T, head_dim] (halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(context_length, device=device, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)  # [T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)  # rotate-half layout (Hugging Face Llama)
    return torch.stack((angles.cos(), angles.sin()))


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of x [B, H, T, hd] by the angles of positions 0..T-1."""
    T = x.shape[-2]
    cos, sin = rope[0, :T].to(x.dtype), rope[1, :T].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values (after RoPE) of the positions a sequence has seen, per layer: decoding
    one new token then costs one position's projections instead of the whole window's.

    Buffers are allocated at the first write, [B, kvHeads, contextLength, headDim] per layer in
    the keys' dtype; ``length`` counts the positions written (the model advances it).
    """

    def __init__(self, n_layers: int, context_length: int) -> None:
        self.context_length = context_length
        self.length = 0
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this call's k/v [B, H, T, hd] at ``length…`` and return all positions so far."""
        ck, cv = self.k[layer], self.v[layer]
        if ck is None or cv is None:
            shape = (k.shape[0], k.shape[1], self.context_length, k.shape[3])
            ck = self.k[layer] = k.new_empty(shape)
            cv = self.v[layer] = v.new_empty(shape)
        end = self.length + k.shape[2]
        ck[:, :, self.length : end] = k
        cv[:, :, self.length : end] = v
        return ck[:, :, :end], cv[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, rope: Tensor, kv: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv is not None:
            # Inference: this layer's keys/values of every earlier position come from the cache.
            k, v = kv.append(layer, k, v)
        # softmax(q·kᵀ/√d + causal mask)·v; enable_gqa shares each kv head across
        # n_heads/n_kv_heads query heads without materialising repeated k/v. Flash kernel on GPU.
        # One new query position (a cached decode step) may see every key: no mask.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1·x) ⊙ w3·x)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope: Tensor, kv: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), rope, kv, layer))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, *, activation_checkpointing: bool = False) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.head_dim % 2:
            raise ValueError(
                f"dModel {cfg.d_model} must split into {cfg.n_heads} heads of even size "
                "(spec.model.architecture.dModel / heads)"
            )
        if cfg.n_heads % cfg.n_kv_heads:
            raise ValueError(
                f"heads {cfg.n_heads} not divisible by kvHeads {cfg.n_kv_heads} "
                "(spec.model.architecture.kvHeads)"
            )
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not persistent: derived from the config, recomputed by init_weights after to_empty.
        self.rope: Tensor
        self.register_buffer(
            "rope", rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta), persistent=False
        )

    # ------------------------------------------------------------------ forward

    def forward(self, tokens: Tensor, kv: KVCache | None = None) -> Tensor:
        """tokens [B, T] int64 → logits [B, T, vocab].

        With ``kv`` (inference), ``tokens`` continue the sequence the cache holds: they sit at
        positions ``kv.length …`` and attend to every cached position before them.
        """
        rope = self.rope
        if kv is not None:
            start, T = kv.length, tokens.shape[1]
            if start and T > 1:
                raise ValueError("a KV cache takes a prompt once, then one token per call")
            if start + T > self.cfg.context_length:
                raise ValueError(f"{start + T} positions exceed contextLength {self.cfg.context_length}")
            rope = rope[:, start : start + T]
        x = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training:
                # Recompute the block in backward: ~1/3 more compute for O(1) activations per block.
                x = checkpoint(layer, x, rope, use_reentrant=False)
            elif kv is None:
                x = layer(x, rope)  # training's call, unchanged (compiled blocks guard on it)
            else:
                x = layer(x, rope, kv, i)
        if kv is not None:
            kv.length += tokens.shape[1]
        return self.output(self.norm(x))

    # --------------------------------------------------------------------- init

    def materialize(self, device: torch.device | str) -> None:
        """Allocate a meta-built (possibly FSDP-sharded) model on ``device`` and initialise it.

        ``to_empty`` swaps tensors in place so a tied output head stays the embedding table
        (the default conversion allocates each module's parameters separately and unties them).
        """
        swap = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            self.to_empty(device=device)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Seeded init, identical at any world size: N(0, std) for matrices, output projections
        of each residual branch (wo, w2) scaled by 1/√(2·layers) (GPT-2), ones for norms.

        Each parameter is drawn in full from a generator seeded by (seed, its name) and this rank
        keeps its shard: so a rank holds at most one full parameter at a time, never the model.
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        cfg = self.cfg
        seed = cfg.init_seed if seed is None else seed
        self.rope = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta, device=self.rope.device)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        for name, param in self.named_parameters():
            device = param.device
            full = torch.empty(param.shape, dtype=torch.float32, device=device)
            if name.endswith("norm.weight"):
                full.fill_(1.0)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
                gen = torch.Generator(device=device)
                gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                full.normal_(0.0, std, generator=gen)
            if isinstance(param, DTensor):
                # src_data_rank=None: every rank drew the same values; keep the local chunk, no scatter.
                param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
            else:
                param.copy_(full)

    # ------------------------------------------------------------- cost model

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters (tied weights once); without the embedding table unless it is tied."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.cfg.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token, 6·N + 12·L·dModel·T (PaLM App. B / nanoGPT / torchtitan).

        N excludes the embedding lookup (no matmul) unless it is tied to the output head; the
        attention term does not halve for causality and activation recompute is not counted.
        """
        cfg = self.cfg
        n = self.num_params(exclude_embedding=True)
        return 6 * n + 12 * cfg.n_layers * cfg.d_model * cfg.context_length

    def estimate_mfu(self, tokens_per_second: float, device_name: str | None) -> float | None:
        """Model FLOPs utilisation of one device processing ``tokens_per_second``; None if unknown."""
        peak = peak_flops(device_name)
        if peak is None:
            return None
        return self.flops_per_token() * tokens_per_second / peak


def token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Σ of token cross-entropies (fp32), so that means are taken over tokens, not batches."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")

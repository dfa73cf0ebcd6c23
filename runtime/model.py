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
    """Rotate pairs (x_i, x_{i+d/2}) of x [B, H, T, hd] by the angles of positions 0..T-1.

    ``rope`` is [2, T', hd], the same positions for every row, or [2, B, 1, T', hd], each row
    its own positions (a serving batch, :class:`BatchKVCache`); the first T are used.
    """
    T = x.shape[-2]
    cos, sin = rope[0, ..., :T, :].to(x.dtype), rope[1, ..., :T, :].to(x.dtype)
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
        self.mask: Tensor | None = None  # one sequence sees all its positions (cf. BatchKVCache)

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

    def positions(self, rope: Tensor, T: int) -> Tensor:
        """The RoPE table's rows for this call's T tokens: positions ``length … length+T-1``."""
        start = self.length
        if start and T > 1:
            raise ValueError("a KV cache takes a prompt once, then one token per call")
        if start + T > self.context_length:
            raise ValueError(f"{start + T} positions exceed contextLength {self.context_length}")
        return rope[:, start : start + T]

    def advance(self, T: int) -> None:
        self.length += T


class BatchKVCache:
    """The running sequences of a serving batch, decoded together one new token per row and call.

    Row i of one ``[capacity, kvHeads, contextLength, headDim]`` buffer per layer holds sequence
    i's keys/values (after RoPE); ``lengths[i]`` of its positions are written. A step writes every
    row's new key/value at the row's own position (one indexed write per layer) and runs **one**
    attention over the first max(length)+1 positions of all rows, with a boolean mask (:attr:`mask`)
    hiding each row's positions beyond its own: a masked key gets weight exactly 0, so a row sees
    exactly its own sequence. Against a lone sequence's call only float rounding differs (the
    batched GEMMs, and the softmax summing a zero-padded row), ≈1e-7; when every row has the same
    length (a lone row, always) there is no mask and the call is ``generate()``'s own.

    Rows stay dense: the row of a sequence that leaves takes the last row's cache (one copy of that
    sequence's positions), so a step over B rows reads buffers ``[:B]`` only. Capacity doubles as
    rows join, so memory is that of the most sequences held at once, as with one KVCache each;
    it is kept for the next burst.
    """

    def __init__(self, n_layers: int, context_length: int) -> None:
        self.n_layers, self.context_length = n_layers, context_length
        self.lengths: list[int] = []
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        # This step's [B, 1, 1, end] key mask (None: no row is shorter), set by positions().
        self.mask: Tensor | None = None
        self._write: tuple[Tensor, Tensor, int] | None = None  # rows, positions, end: this step

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def add(self, kv: KVCache) -> int:
        """Copy a prefilled sequence's cache (batch 1) into a new last row; that row's index."""
        first = kv.k[0]
        if kv.length == 0 or first is None:
            raise ValueError("a row joins the batch after its prompt is encoded (prefill alone first)")
        row, n = self.rows, kv.length
        if not self.k or row == self.k[0].shape[0]:
            self._grow(first)
        for layer in range(self.n_layers):
            ck, cv = kv.k[layer], kv.v[layer]
            assert ck is not None and cv is not None
            self.k[layer][row, :, :n] = ck[0, :, :n]
            self.v[layer][row, :, :n] = cv[0, :, :n]
        self.lengths.append(n)
        return row

    def _grow(self, like: Tensor) -> None:
        """Double the capacity (at least one row), keeping the rows held so far.

        Zeros, not ``new_empty``: masked positions still enter the attention's matmuls, and a
        stray NaN or inf there survives its zero weight (0 · NaN = NaN). Positions a row has not
        written hold zeros or an earlier row's finite keys/values, which the mask zeroes out.
        """
        rows = self.rows
        shape = (max(1, 2 * rows), *like.shape[1:])
        for buffers in (self.k, self.v):
            old: list[Tensor | None] = list(buffers) or [None] * self.n_layers
            buffers[:] = [like.new_zeros(shape) for _ in range(self.n_layers)]
            for new, b in zip(buffers, old, strict=True):
                if b is not None:
                    new[:rows] = b[:rows]

    def remove(self, row: int) -> None:
        """Drop ``row``: the last row moves into its place (callers mirror that move)."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            for buffers in (self.k, self.v):
                for b in buffers:
                    b[row, :, :n] = b[last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()

    def positions(self, rope: Tensor, T: int) -> Tensor:
        """[2, B, 1, 1, hd]: row i's angles at its own length (broadcast over heads); also this
        step's write positions and key mask, shared by every layer."""
        if T != 1:
            raise ValueError("a batch of cached rows takes one token per row and call (prompts go alone)")
        if not self.lengths:
            raise ValueError("the batch has no rows")
        longest = max(self.lengths)
        if longest + 1 > self.context_length:
            raise ValueError(f"{longest + 1} positions exceed contextLength {self.context_length}")
        pos = torch.tensor(self.lengths, device=rope.device)
        end = longest + 1
        rows = torch.arange(len(self.lengths), device=rope.device)
        self._write = (rows, pos, end)
        # Key j is row i's iff j ≤ lengths[i] (its cached positions and the one written now).
        self.mask = None
        if min(self.lengths) != longest:
            self.mask = (torch.arange(end, device=rope.device) <= pos[:, None])[:, None, None, :]
        return rope[:, pos, None, None]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Row i's new k/v [B, H, 1, hd] at position lengths[i]; all rows' first max+1 positions."""
        if self._write is None:
            raise ValueError("positions() first: it sets this step's write positions")
        rows, pos, end = self._write
        B = len(self.lengths)
        ck, cv = self.k[layer], self.v[layer]
        ck[rows, :, pos] = k[:, :, 0]
        cv[rows, :, pos] = v[:, :, 0]
        return ck[:B, :, :end], cv[:B, :, :end]

    def advance(self, T: int) -> None:
        self.lengths = [n + T for n in self.lengths]
        self._write, self.mask = None, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self, x: Tensor, rope: Tensor, kv: KVCache | BatchKVCache | None = None, layer: int = 0
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if kv is not None:
            # Inference: this layer's keys/values of every earlier position come from the cache.
            k, v = kv.append(layer, k, v)
        y = self.attend(q, k, v, None if kv is None else kv.mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        # softmax(q·kᵀ/√d + causal mask)·v; enable_gqa shares each kv head across
        # n_heads/n_kv_heads query heads without materialising repeated k/v. Flash kernel on GPU.
        # One new query position (a cached decode step) may see every key: no causal mask; a
        # serving batch's rows of different lengths hide the keys past their own (``mask``).
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=q.shape[2] > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )


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

    def forward(
        self, x: Tensor, rope: Tensor, kv: KVCache | BatchKVCache | None = None, layer: int = 0
    ) -> Tensor:
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

    def forward(self, tokens: Tensor, kv: KVCache | BatchKVCache | None = None) -> Tensor:
        """tokens [B, T] int64 → logits [B, T, vocab].

        With ``kv`` (inference), ``tokens`` continue the sequence the cache holds: they sit at
        positions ``kv.length …`` and attend to every cached position before them. With
        :class:`BatchKVCache` each row continues its own sequence, one token per call.
        """
        rope = self.rope
        if kv is not None:
            rope = kv.positions(rope, tokens.shape[1])
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
            kv.advance(tokens.shape[1])
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


# A target the loss skips (task data: prompt, system, template markup, padding). PyTorch's
# cross_entropy default, named here so the masking and the loss cannot disagree.
IGNORE_INDEX = -100


def masked_targets(targets: Tensor, mask: Tensor) -> Tensor:
    """``targets`` with every position whose ``mask`` is False set to :data:`IGNORE_INDEX`."""
    return targets.masked_fill(~mask.bool(), IGNORE_INDEX)


def token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Σ of token cross-entropies (fp32), so that means are taken over tokens, not batches.
    Targets equal to :data:`IGNORE_INDEX` (:func:`masked_targets`) add nothing."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
    )

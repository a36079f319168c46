"""A decoder-only Transformer, written as if for one device with unlimited memory.

Nothing here knows about processes, meshes or devices: sharding plans live in
scalelab.parallel and wrap this module from outside.

Choices (each a common modern default):
- RoPE in the rotate-half layout and learnable RMSNorm weights, so the weights
  map one-to-one onto Llama/Qwen3-style checkpoints for export;
- pre-norm residual blocks, no biases (q/k/v biases optional, for imported Qwen2 checkpoints);
- ReLU² or SwiGLU MLP; optional per-head QK RMSNorm (stabilises attention logits);
- grouped-query attention through scaled_dot_product_attention;
- one size dial: ``depth`` sets width (depth × aspect_ratio) and heads (width / head_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalelab.errors import ScalelabError


@dataclass
class GPTConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer
    block_size: int = 256
    depth: int = 4
    aspect_ratio: int = 64  # width = depth * aspect_ratio unless n_embd is set
    head_dim: int = 64
    n_embd: int = 0  # 0: derived from depth
    n_head: int = 0  # 0: n_embd // head_dim
    n_kv_head: int = 0  # 0: n_head (plain multi-head attention); fewer gives GQA
    mlp: str = "relu2"  # relu2 | swiglu | gelu
    mlp_hidden: int = 0  # 0: 4 * n_embd (swiglu: 8/3 * n_embd rounded up to 64)
    qk_norm: bool = True
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # > 0: logits = cap * tanh(logits / cap) (Gemma 2, modded-nanogpt), bounding how sure the model can get;
    # 0 leaves the logits as they are. Every path to the logits goes through GPT.logits.
    logit_softcap: float = 0.0
    # The fields below exist for imported checkpoints (scalelab.infer.import_hf); their defaults
    # leave every model trained here exactly as it was.
    attn_bias: bool = False  # biases on q/k/v (Qwen2), never on o_proj
    attn_dim: int = 0  # n_head * head_dim when it differs from n_embd (e.g. Qwen3, Mistral-Nemo); 0: n_embd
    rope_scaling: str = ""  # "" (none) | "llama3": Llama 3.1's frequency-dependent RoPE stretch
    rope_factor: float = 1.0  # llama3: how much the low frequencies are stretched
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 0  # llama3: the context the model was pretrained at

    def resolved(self) -> "GPTConfig":
        """A copy with every derived size filled in."""
        c = GPTConfig(**self.__dict__)
        if c.n_embd == 0:
            c.n_embd = c.depth * c.aspect_ratio
        if c.n_head == 0:
            c.n_head = max(1, c.n_embd // c.head_dim)
        width = c.attn_dim or c.n_embd
        if width % c.n_head:
            name = "attn_dim" if c.attn_dim else "n_embd"
            raise ScalelabError(f"invalid config: model.{name}={width} is not divisible by model.n_head={c.n_head}")
        c.head_dim = width // c.n_head
        if c.n_kv_head == 0:
            c.n_kv_head = c.n_head
        if c.n_head % c.n_kv_head:
            raise ScalelabError(f"invalid config: model.n_head={c.n_head} is not a multiple of model.n_kv_head={c.n_kv_head}")
        if c.mlp_hidden == 0:
            c.mlp_hidden = 4 * c.n_embd if c.mlp != "swiglu" else 64 * math.ceil(8 * c.n_embd / 3 / 64)
        return c

    def validate(self) -> None:
        if self.depth < 1:
            raise ScalelabError("invalid config: model.depth must be at least 1")
        if self.block_size < 2:
            raise ScalelabError("invalid config: model.block_size must be at least 2")
        if self.mlp not in ("relu2", "swiglu", "gelu"):
            raise ScalelabError("invalid config: model.mlp must be one of relu2, swiglu, gelu")
        if self.logit_softcap < 0:
            raise ScalelabError("invalid config: model.logit_softcap must be 0 (off) or positive")
        if self.head_dim % 2:
            raise ScalelabError("invalid config: model.head_dim must be even (RoPE rotates pairs)")
        if self.rope_scaling not in ("", "llama3"):
            raise ScalelabError(f"invalid config: model.rope_scaling must be \"\" or \"llama3\", got {self.rope_scaling!r}")
        if self.rope_scaling == "llama3" and (self.rope_original_context < 1 or self.rope_factor <= 0
                                              or self.rope_high_freq_factor <= self.rope_low_freq_factor):
            raise ScalelabError("invalid config: model.rope_scaling=\"llama3\" needs rope_original_context >= 1, "
                                "rope_factor > 0 and rope_high_freq_factor > rope_low_freq_factor")
        self.resolved()


def llama3_inv_freq(inv_freq: torch.Tensor, c: GPTConfig) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: wavelengths shorter than original_context / high_freq_factor stay,
    longer than original_context / low_freq_factor are stretched by ``factor``, and the band between
    is interpolated linearly in original_context / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    ratio = c.rope_original_context / wavelen
    smooth = ((ratio - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / c.rope_factor + smooth * inv_freq


def rope_tables(head_dim: int, length: int, theta: float, device=None,
                scaling: GPTConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim); ``scaling``: a config whose rope_scaling is "llama3"."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if scaling is not None and scaling.rope_scaling == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout, as in Llama checkpoints
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D), or (B, 1, T, D) when every row has its own positions
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class KVCache:
    """Keys and values for every layer, preallocated to ``max_len`` positions.

    All rows of a batch share one position counter; variable-length batching is
    the inference engine's job (scalelab.infer), built on top of this.

    A cache is anything with the three methods below, so the engine can bring
    its own layout (one length per row) without the model knowing about it.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        c = cfg.resolved()
        shape = (batch_size, c.n_kv_head, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.depth)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.depth)]
        self.pos = 0
        self.max_len = max_len

    def expand(self, n: int) -> "KVCache":
        """Repeat each row n times: a prompt prefilled once serves n samples."""
        out = KVCache.__new__(KVCache)
        out.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        out.v = [t.repeat_interleave(n, dim=0) for t in self.v]
        out.pos, out.max_len = self.pos, self.max_len
        return out

    def positions(self, T: int) -> tuple[slice | torch.Tensor, int]:
        """Index into the RoPE tables for T new tokens (a slice, or a (B, T) tensor), and one past the last position."""
        return slice(self.pos, self.pos + T), self.pos + T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys and values; return all keys, values, and the mask for the new queries (None: all visible)."""
        start, T = self.pos, k.shape[2]
        self.k[layer][:, :, start : start + T] = k
        self.v[layer][:, :, start : start + T] = v
        k_all = self.k[layer][:, :, : start + T]
        v_all = self.v[layer][:, :, : start + T]
        if T == 1:  # one new token sees everything before it: no mask needed
            return k_all, v_all, None
        # new query i sits at absolute position start+i and may see keys 0..start+i
        return k_all, v_all, torch.ones(T, start + T, dtype=torch.bool, device=k.device).tril(diagonal=start)

    def advance(self, T: int) -> None:
        self.pos += T


class Attention(nn.Module):
    def __init__(self, c: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=c.attn_bias)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.attn_bias)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.attn_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k_all, v_all, mask = cache.update(self.layer, k, v)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.kind = c.mlp
        if c.mlp == "swiglu":
            self.gate_proj = nn.Linear(c.n_embd, c.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(c.mlp_hidden, c.n_embd, bias=False)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, c: GPTConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.attn = Attention(c, layer)
        self.mlp_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ScalelabError("invalid config: model.vocab_size must be set (it comes from the tokenizer)")
        cfg.validate()
        self.config = cfg.resolved()
        c = self.config
        self.embed = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.depth))
        self.final_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(c.head_dim, c.block_size, c.rope_theta, scaling=c)
        # Buffers are not persistent: they are recomputed, so checkpoints hold weights only.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("_proj.bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # Zero-init residual outputs: every block starts as the identity, which
                # lets a high learning rate work from step one.
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=c.init_std)
        if not c.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=c.init_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
    ):
        """Logits (B, T, V), or the cross-entropy loss when targets are given.

        Targets equal to -1 are ignored (masked positions, e.g. prompts in SFT).
        """
        logits = self.logits(self.hidden_states(idx, cache))
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on final-norm hidden states, soft-capped when the config asks for it."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final-norm hidden states (B, T, n_embd) that lm_head reads: the input of reward and value heads,
        and of a decoder that applies the output layer to a few positions only."""
        T = idx.shape[1]
        where, end = cache.positions(T) if cache is not None else (slice(0, T), T)
        if end > self.config.block_size:
            raise ScalelabError(
                f"sequence of {end} tokens is longer than the model's context of {self.config.block_size}"
            )
        cos, sin = self.rope_cos[where], self.rope_sin[where]
        if cos.dim() == 3:  # per-row positions (B, T, D): broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        x = self.final_norm(x)
        if cache is not None:
            cache.advance(T)
        return x

    # -- accounting ---------------------------------------------------------------------------------

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact trainable parameter count; a tied lm_head is counted once."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B convention.

        6 × (every weight used in a matmul, the lm_head included, the embedding
        lookup excluded) + 12 × layers × heads × head_dim × sequence length for the
        attention scores and their weighted sum (counted as full, not causal).
        """
        c = self.config
        t = seq_len or c.block_size
        matmul_params = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and n != "embed.weight")
        if c.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        return 6 * matmul_params + 12 * c.depth * c.n_head * c.head_dim * t

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay the matmul weights only, never norms or embeddings."""
        decay, no_decay = [], []
        seen = set()
        for name, p in self.named_parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            is_embedding = name in ("embed.weight", "lm_head.weight")
            (decay if p.dim() == 2 and not is_embedding else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

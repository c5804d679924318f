"""The decoder: one readable file, top to bottom — norm, rotary, attention, MLP, block, config, model.

It is Llama-shaped by default (RMSNorm, rotary positions, grouped-query attention, SwiGLU) and has just
enough switches to also hold the weights of the GPT-2, Qwen2/3, Mistral, Phi-3 and Gemma 2/3 families exactly,
so that every supported checkpoint is exported through the same graph (see models/hf.py for the weight
mapping): q/k norms, a head width of its own, partial rotary and LongRoPE, Gemma's norms around both sublayers,
scaled embeddings and soft-capping, and attention that is global or within a sliding window per layer, each kind
with its own rotary base.

    forward(input_ids, attention_mask, position_ids, past_key_values) -> (logits, present)

past_key_values / present are lists of (key, value) pairs, each (B, n_kv_head, T, head_dim): the cache holds
the key/value heads *before* they are repeated for grouped-query attention, as onnxruntime's
GroupQueryAttention and onnxruntime-genai expect. Export workarounds live in exporters/, never here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import rope

MASK_VALUE = -65504.0  # float16's most negative finite: masks stay finite (no NaN) after an fp16 conversion


@dataclass
class DecoderConfig:
    vocab_size: int = 4096            # byte-level BPE trained on the corpus; small vocab keeps the demo fast
    hidden_size: int = 256            # width of the residual stream
    num_layers: int = 4               # enough depth to learn Python syntax in a few minutes on 2 cores
    num_heads: int = 8                # query heads, head_dim = 32
    num_kv_heads: int = 2             # grouped-query attention: 4 query heads share each key/value head
    intermediate_size: int = 688      # SwiGLU width, ~8/3 * hidden rounded to a multiple of 16
    max_position_embeddings: int = 1024  # longest sequence rotary tables and the export are built for
    rope_theta: float = 10000.0       # rotary base frequency (Llama 2 value)
    rope_scaling: dict | None = None  # HF rope_scaling ({"rope_type": "llama3" | "linear", ...}) or None
    norm_eps: float = 1e-5            # RMSNorm / LayerNorm epsilon
    norm: str = "rms"                 # "rms" (Llama family) | "layer" (GPT-2)
    positions: str = "rope"           # "rope" | "learned" (GPT-2's absolute position table)
    activation: str = "silu"          # MLP activation: "silu" (SwiGLU) | "gelu_tanh" (GPT-2) | "gelu"
    gated_mlp: bool = True            # SwiGLU gate/up/down vs GPT-2's fc/proj
    qkv_bias: bool = False            # Qwen2 and GPT-2 have biases on q/k/v
    o_bias: bool = False              # GPT-2 has a bias on the attention output projection
    mlp_bias: bool = False            # GPT-2 has biases in its MLP
    norm_bias: bool = False           # LayerNorm bias (GPT-2)
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix: fewer parameters at small sizes
    attention_head_dim: int | None = None  # head width when it is not hidden_size // num_heads (Qwen3, Gemma 3)
    qk_norm: bool = False             # RMSNorm over each query and key head before rotary (Qwen3, Gemma 3)
    sandwich_norm: bool = False       # Gemma: attention and MLP outputs are normed before they join the stream
    embed_scale: float = 1.0          # token embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    attention_scale: float | None = None  # softmax scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
    sliding_window: int | None = None  # a sliding layer's query sees its last `sliding_window` keys, itself included
    layer_types: list | None = None   # per layer "sliding_attention" | "full_attention"; None: all sliding if a
                                      # window is set, else all full
    rope_local_theta: float | None = None  # rotary base of sliding layers (Gemma 3: 10k vs 1M), unscaled
    partial_rotary_factor: float = 1.0  # the share of each head's width that is rotated (Phi-4-mini: 0.75)
    attn_softcap: float | None = None  # Gemma 2: attention scores become c * tanh(score / c) before the mask
    final_softcap: float | None = None  # Gemma 2: logits become c * tanh(logit / c)
    family: str = "llama"             # the HF family this config came from, recorded for export metadata
    extra: dict = field(default_factory=dict)  # source-specific facts kept for provenance only

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        """The attention window of a layer (None: global attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def rope(self, layer: int) -> tuple[float, dict | None]:
        """(base, scaling) of a layer's rotary positions: sliding layers may have their own unscaled base."""
        if self.window(layer) is not None and self.rope_local_theta is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    def __post_init__(self):
        if self.attention_head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError(f"{len(self.layer_types)} layer types for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with HF's rope scaling applied (models/rope.py). They are constants of
    the config, which is what a trace should record, so the tracer's warning about constants is not raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.from_numpy(rope.rope_inv_freq(head_dim, theta, scaling, long))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def make_norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else 1.0 / math.sqrt(self.hd)
        self.softcap = cfg.attn_softcap
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, past):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.nh, self.hd)
        k = self.k_proj(x).view(B, S, self.nkv, self.hd)
        if hasattr(self, "q_norm"):  # per head, before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                         # (B, nh | nkv, S, hd)
        v = self.v_proj(x).view(B, S, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, S, hd)
        if cos is not None:  # on the first cos.shape[-1] channels of each head (all but with partial rotary)
            r = cos.shape[-1]
            q = torch.cat([q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]], dim=-1)
            k = torch.cat([k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]], dim=-1)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)                              # (B, nkv, T, hd)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        rep = self.nh // self.nkv
        if rep > 1:  # share each key/value head among `rep` query heads
            T = k.shape[2]
            k = k[:, :, None].expand(B, self.nkv, rep, T, self.hd).reshape(B, self.nh, T, self.hd)
            v = v[:, :, None].expand(B, self.nkv, rep, T, self.hd).reshape(B, self.nh, T, self.hd)
        att = torch.matmul(q, k.transpose(-2, -1)) * self.scale            # (B, nh, S, T)
        if self.softcap is not None:
            att = torch.tanh(att / self.softcap) * self.softcap
        att = torch.softmax(att + mask, dim=-1)
        y = torch.matmul(att, v)                                            # (B, nh, S, hd)
        y = y.transpose(1, 2).reshape(B, S, self.nh * self.hd)
        return self.o_proj(y), present


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gated = cfg.gated_mlp
        self.act = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}[cfg.activation]
        if self.gated:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.post_attn_norm = make_norm(cfg)  # the MLP's input norm (HF Llama: post_attention_layernorm)
        self.mlp = MLP(cfg)
        if cfg.sandwich_norm:  # Gemma's post_attention_layernorm and post_feedforward_layernorm
            self.attn_out_norm = make_norm(cfg)
            self.mlp_out_norm = make_norm(cfg)

    def forward(self, x, cos, sin, mask, past):
        a, present = self.attn(self.input_norm(x), cos, sin, mask, past)
        x = x + (self.attn_out_norm(a) if hasattr(self, "attn_out_norm") else a)
        m = self.mlp(self.post_attn_norm(x))
        x = x + (self.mlp_out_norm(m) if hasattr(self, "mlp_out_norm") else m)
        return x, present


def attention_inputs(cfg: DecoderConfig, position_ids: torch.Tensor, past_len: int, attention_mask: torch.Tensor,
                     dtype=torch.float32) -> list[tuple]:
    """Per layer (cos, sin, mask): the rotary tables of its positions (None for learned positions) and its additive
    mask, (B, 1, S, T). Query i (absolute index past_len + i) sees key j when j <= past_len + i, attention_mask[j]
    is 1 and, in a sliding layer, j > past_len + i - window. Layers of one kind share their tensors. LongRoPE takes
    its long factors when the sequence (highest position + 1) is longer than the pretraining context, as
    transformers does for each forward call (keys already cached keep their rotation)."""
    S, T = position_ids.shape[1], attention_mask.shape[1]
    q_idx = torch.arange(S, device=position_ids.device)[:, None] + past_len  # (S, 1)
    k_idx = torch.arange(T, device=position_ids.device)[None, :]             # (1, T)
    causal = (k_idx <= q_idx)[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, S, T)
    kinds: dict = {}
    out = []
    for i in range(cfg.num_layers):
        window, rope_params = cfg.window(i), cfg.rope(i)
        key = (window, rope_params[0], repr(rope_params[1]))
        if key not in kinds:
            allowed = causal if window is None else causal & (k_idx > q_idx - window)[None, None]
            mask = torch.where(allowed, 0.0, MASK_VALUE).to(dtype)
            cos = sin = None
            if cfg.positions == "rope":
                switch = rope.long_context(rope_params[1])
                long = switch is not None and int(position_ids.max()) + 1 > switch
                inv_freq = rope_inv_freq(cfg.rotary_dim, *rope_params, long=long).to(position_ids.device)
                freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, S, rd/2)
                emb = torch.cat((freqs, freqs), dim=-1)[:, None]                # (B, 1, S, rd)
                factor = rope.rope_attention_factor(rope_params[1])
                cos, sin = (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)
            kinds[key] = (cos, sin, mask)
        out.append(kinds[key])
    return out


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.positions == "learned":
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        B, S = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        T = past_len + S
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.int64, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(past_len, T, device=input_ids.device).unsqueeze(0).expand(B, S)
        x = self.embed_tokens(input_ids)                                    # (B, S, C)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if self.config.positions == "learned":
            x = x + self.embed_positions(position_ids)
        geometry = attention_inputs(self.config, position_ids, past_len, attention_mask, x.dtype)
        present = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, *geometry[i], past_key_values[i] if past_key_values else None)
            present.append(kv)
        logits = self.lm_head(self.norm(x))                                 # (B, S, vocab)
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits, present

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation through the KV cache; returns the new tokens (B, N)."""
        logits, past = self(input_ids)
        out = [input_ids[:, :0]]  # (B, 0): zero new tokens is an empty result, not an error
        for _ in range(max_new_tokens):
            last = logits[:, -1, :]
            if temperature <= 0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k:
                    kth = torch.topk(last, min(top_k, last.shape[-1])).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=generator)
            out.append(nxt)
            logits, past = self(nxt, past_key_values=past)
        return torch.cat(out, dim=1)

"""Rotary position embedding frequencies in numpy: the decoder (torch) and the fused graph's cos/sin caches
(exporters/optimize.py, which imports no torch) read the same values."""

from __future__ import annotations

import math

import numpy as np


def rope_kind(scaling: dict | None) -> str:
    sc = scaling or {}
    return sc.get("rope_type", sc.get("type", "default"))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, long: bool = False) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) as float32, with HF's "linear", "llama3" and "longrope" scaling applied.
    `head_dim` is the rotated width (less than the head's with partial rotary). LongRoPE has two sets: `long` for
    a sequence longer than the pretraining context (original_max_position_embeddings), else the short one."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = scaling or {}
    kind = rope_kind(sc)
    if kind == "longrope":
        inv_freq = inv_freq / np.asarray(sc["long_factor" if long else "short_factor"], np.float64)
    elif kind == "linear":
        inv_freq = inv_freq / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv_freq = np.where(is_mid, mid, scaled)
    elif kind != "default":
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3, longrope)")
    return inv_freq.astype(np.float32)


def rope_attention_factor(scaling: dict | None) -> float:
    """What cos and sin are multiplied by: LongRoPE's sqrt(1 + ln(factor) / ln(original context)), else 1."""
    sc = scaling or {}
    if rope_kind(sc) != "longrope":
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    factor, original = float(sc["factor"]), sc["original_max_position_embeddings"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def long_context(scaling: dict | None) -> int | None:
    """LongRoPE's switch: sequences longer than this many tokens use the long factors (None: no switch)."""
    return (scaling or {}).get("original_max_position_embeddings") if rope_kind(scaling) == "longrope" else None

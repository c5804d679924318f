"""Rotary position embedding frequencies in numpy: the decoder (torch) and the fused graph's cos/sin caches
(exporters/optimize.py, which imports no torch) read the same values."""

from __future__ import annotations

import math

import numpy as np


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) as float32, with HF's "linear" and "llama3" rope scaling applied."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
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
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
    return inv_freq.astype(np.float32)

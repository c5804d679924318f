"""GPTQ rounding for int8 per-channel weights: round each weight so the *layer output* error is least.

Round-to-nearest treats every weight alone. GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers") rounds the input rows of a (K, N) MatMul weight one at a
time and spreads each row's rounding error over the rows not yet rounded, weighted by the inverse of the input
Hessian H = sum over calibration tokens of x x^T, which minimises ||X W - X W_q||^2 rather than ||W - W_q||^2.

Here the scales are fixed first, exactly as onnxruntime's quantizer sets them (symmetric, one per output column:
max|W[:, n]| / levels), so the result is an ordinary QDQ weight any runtime or NPU reads; only which grid point
each weight takes changes. Rows are visited in descending H diagonal ("act order": the inputs with the most
energy are rounded first, while the most rows remain to absorb their error), in blocks with lazy updates.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def fits(k: int, tokens: int) -> bool:
    """Whether `tokens` calibration tokens can fit GPTQ to a weight with `k` inputs: k of them at least. With fewer, the
    Hessian is singular and GPTQ overfits the calibration text (perplexity rises instead of falling), so the weight
    keeps nearest rounding."""
    return k <= tokens


def per_channel_scales(w: np.ndarray, levels: int) -> np.ndarray:
    """onnxruntime's symmetric per-column scale, max|W[:, n]| / levels (1 where a column is all zero)."""
    scale = (np.abs(w).max(axis=0) / levels).astype(np.float32)
    scale[scale == 0] = 1.0
    return scale


def _error_feedback(w: np.ndarray, hessian: np.ndarray, round_row: Callable[[int, np.ndarray], np.ndarray],
                    damp: float, block: int) -> np.ndarray:
    """GPTQ's loop: rows in descending H diagonal, each rounded by `round_row(row index in w, values)` and its
    error spread over the rows not yet rounded, in blocks with lazy updates. Returns the rounded (K, N) float64.

    `damp` * mean(diag H) is added to the diagonal (H from a few thousand tokens is often singular); inputs that
    never fire (zero diagonal) round to nearest, as nothing downstream can see their error.
    """
    k, n = w.shape
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    h = h[order][:, order]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    # upper Cholesky factor of H^-1: row i holds how row i's error spreads over the rows after it
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    work = w.astype(np.float64)[order]
    out = np.zeros((k, n))
    for start in range(0, k, block):
        end = min(start + block, k)
        err = np.zeros((end - start, n))
        for i in range(start, end):
            r = order[i]
            out[r] = round_row(r, work[i])
            e = (work[i] - out[r]) / u[i, i]
            work[i + 1:end] -= np.outer(u[i, i + 1:end], e)
            err[i - start] = e
        work[end:] -= u[start:end, end:].T @ err
    return out


# output columns rounded at once: with per-column scales the columns are independent, so a wide weight (a
# 128k-token head: 2 GB per float64 copy) is rounded a slice at a time, to the same result
COLUMNS = 16384


def gptq(w: np.ndarray, hessian: np.ndarray, levels: int, damp: float = 0.01,
         block: int = 128, columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """Round `w` (K, N) to int8 in [-levels, levels] with per-column scales; returns (q int8, scales float32)."""
    scales = per_channel_scales(w, levels)
    q = np.empty(w.shape, np.int8)
    for c in range(0, w.shape[1], columns):
        scale = scales[c:c + columns].astype(np.float64)
        rounded = _error_feedback(w[:, c:c + columns], hessian,
                                  lambda _, v: np.clip(np.round(v / scale), -levels, levels) * scale, damp, block)
        q[:, c:c + columns] = np.round(rounded / scale)
    return q, scales


def gptq_blockwise(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, damp: float = 0.01,
                   block: int = 128, grid: tuple[np.ndarray, np.ndarray] | None = None,
                   columns: int = COLUMNS) -> np.ndarray:
    """GPTQ on MatMulNBits' blockwise grid; returns the rounded weights as float32 (K, N).

    Symmetric (no `grid`): each block of `block_size` inputs of a column has MLAS's scale, peak / -2^(bits-1)
    (`peak`: the value of largest magnitude, so it lands exactly on -2^(bits-1)), fixed from `w` before rounding.
    The peak keeps that grid point whatever error reaches it, and no other value can exceed it, so onnxruntime's
    quantizer given the result computes the same scales and stores exactly these values: the rounding survives
    its re-quantization. With zero points, `grid` is each block's (scale, zero point), (blocks, N) each
    (exporters/quantization/nbits.py `asymmetric_grid`), fixed before rounding; the caller packs the result on
    the same grid, which keeps every code. Every column's blocks are its own, so a wide weight is rounded
    `columns` at a time (as `gptq`): a 128k-token head whole would hold three float64 copies of itself, 6 GB.
    """
    out = np.empty(w.shape, np.float32)
    for c in range(0, w.shape[1], columns):
        part = None if grid is None else (grid[0][:, c:c + columns], grid[1][:, c:c + columns])
        out[:, c:c + columns] = _gptq_blockwise(w[:, c:c + columns], hessian, bits, block_size, damp, block, part)
    return out


def _gptq_blockwise(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, damp: float, block: int,
                    grid: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    k, n = w.shape
    if grid is not None:
        scale, zero = grid
        top = 2 ** bits - 1

        def round_row(r: int, values: np.ndarray) -> np.ndarray:
            s, z = scale[r // block_size], zero[r // block_size]
            return (np.clip(np.round(values / s + z), 0, top) - z) * s

        return _error_feedback(w, hessian, round_row, damp, block).astype(np.float32)
    top = 2 ** (bits - 1)
    blocks = -(-k // block_size)
    padded = np.pad(w.astype(np.float64), ((0, blocks * block_size - k), (0, 0))).reshape(blocks, block_size, n)
    peak_at = np.abs(padded).argmax(1)                                   # (blocks, N): row within the block
    peak = np.take_along_axis(padded, peak_at[:, None, :], axis=1)[:, 0]  # (blocks, N), signed
    scale = np.where(peak == 0, 1.0, peak / -top)
    # (blocks, N): row in w; -1 for an all-zero block (an embedding's padding row), which has no peak to pin
    peak_row = np.where(peak == 0, -1, peak_at + block_size * np.arange(blocks)[:, None])

    def round_row(r: int, values: np.ndarray) -> np.ndarray:
        s = scale[r // block_size]
        q = np.clip(np.round(values / s), -top, top - 1)
        q[peak_row[r // block_size] == r] = -top
        return q * s

    return _error_feedback(w, hessian, round_row, damp, block).astype(np.float32)

"""A GGUF tensor's own quantized blocks, read without dequantizing: the codes, and the scales and minimums they
are multiplied by, in the form onnxruntime's MatMulNBits computes plus one exact correction.

Every llama.cpp block type read here stores, per block of `block` weights along a row,

    w = scale * q + minimum          (Q4_1, Q5_1, Q4_K, Q5_K: asymmetric; q counts from 0)
    w = scale * (q - center)         (Q4_0, Q5_0, Q6_K, Q8_0: symmetric)

MatMulNBits (4 or 8 bits) computes w = scale * (u - 2**(bits - 1)) with no minimum. So `Grid` holds the codes
re-centred for it, u = q - shift + 2**(bits - 1) (4-bit types stay 4-bit; 5-, 6- and 8-bit ones take 8 bits,
exactly), and what is left per block, offset = minimum + shift * scale, which the graph adds as one small
product of per-block sums of the input (x . w = sum over blocks of scale * (x . (u - c)) + offset * sum(x)),
as llama.cpp itself computes Q4_1's dot products. Scales and minimums stay in the file's float16 (with the
K-quants' 6- or 8-bit sub-block multipliers beside them), so the ONNX file is about the size of the GGUF's
tensors; onnxruntime multiplies them out once, when the session folds its constants.

`read_grid` returns exactly what gguf's `dequantize` gives for the same bytes (tests/models hold the two
together); other types (Q2_K, Q3_K, IQ*, float ones) are refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import UserError

QK_K = 256
# type -> (weights per block, bytes per block), as ggml lays them out
BLOCK_BYTES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
               "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}
GRID_TYPES = tuple(BLOCK_BYTES)


@dataclass
class Factor:
    """A per-block float (rows, K / block): `coarse` (float16 or float32, one per `repeat` blocks) times `fine`
    (small integers per block) when the type has sub-block multipliers."""
    coarse: np.ndarray
    fine: np.ndarray | None = None

    def value(self) -> np.ndarray:
        c = self.coarse.astype(np.float32)
        if self.fine is None:
            return c
        r = self.fine.shape[1] // c.shape[1]
        return (c[:, :, None] * self.fine.reshape(c.shape[0], c.shape[1], r).astype(np.float32)).reshape(
            self.fine.shape)

    def rows(self, index: np.ndarray) -> "Factor":
        return Factor(self.coarse[index], None if self.fine is None else self.fine[index])


@dataclass
class Grid:
    """W (rows, K) = scale * (codes - 2**(bits - 1)) + offset per block, offset = minimum + shift * scale."""
    type: str                  # the GGUF type, or "mixed" once parts of different types are stacked
    codes: np.ndarray          # uint8 (rows, K), each in [0, 2**bits)
    bits: int                  # 4 or 8: MatMulNBits' width
    block: int                 # weights per scale along K (32, or 16 for Q6_K)
    scale: Factor
    minimum: Factor | None = None
    shift: int = 0

    @property
    def blocks(self) -> int:
        return self.codes.shape[1] // self.block

    def offset(self) -> np.ndarray | None:
        """float32 (rows, K / block), or None for a symmetric type."""
        if self.minimum is None:
            return None
        off = self.minimum.value()
        return off + np.float32(self.shift) * self.scale.value() if self.shift else off

    def dequantize(self) -> np.ndarray:
        """float32 (rows, K), as MatMulNBits plus the offset term compute it."""
        rows, k = self.codes.shape
        centred = self.codes.astype(np.float32).reshape(rows, -1, self.block) - np.float32(2 ** (self.bits - 1))
        w = centred * self.scale.value()[:, :, None]
        off = self.offset()
        if off is not None:
            w = w + off[:, :, None]
        return w.reshape(rows, k)

    def rows(self, index: np.ndarray) -> "Grid":
        """The same grid with its rows reordered (llama.cpp's rotary permutation undone)."""
        return Grid(self.type, self.codes[index], self.bits, self.block, self.scale.rows(index),
                    None if self.minimum is None else self.minimum.rows(index), self.shift)


def _f16(column: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(column).view(np.float16)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes: low nibbles first, then high (ggml's Q4_0/Q4_1/Q5_x layout)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j for weight j."""
    return ((np.ascontiguousarray(qh).view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes per super-block -> 8 six-bit scales and 8 six-bit minimums."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _decode(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, int, int, np.ndarray, np.ndarray | None,
                                                     np.ndarray | None, np.ndarray | None, int]:
    """One row's worth of blocks -> (codes q, code bits, block, d, sub, m, msub, shift) with
    w = d*sub*(q - shift) + m*msub for asymmetric types (shift then re-centres q), d*sub*(q - shift) otherwise."""
    n = blocks.shape[0]
    if kind == "Q8_0":
        d, qs = blocks[:, :2], blocks[:, 2:]
        return (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8), 8, 32, _f16(d), None, None, None, 128
    if kind == "Q4_0":
        return _nibbles(blocks[:, 2:]), 4, 32, _f16(blocks[:, :2]), None, None, None, 8
    if kind == "Q4_1":
        return _nibbles(blocks[:, 4:]), 4, 32, _f16(blocks[:, :2]), None, _f16(blocks[:, 2:4]), None, 8
    if kind == "Q5_0":
        q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
        return q, 5, 32, _f16(blocks[:, :2]), None, None, None, 16
    if kind == "Q5_1":
        q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)
        return q, 5, 32, _f16(blocks[:, :2]), None, _f16(blocks[:, 2:4]), None, 16
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scales(blocks[:, 4:16])
        if kind == "Q4_K":
            qs = blocks[:, 16:].reshape(n, 4, 32)
            q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, QK_K)
            bits = 4
        else:
            qh, qs = blocks[:, 16:48], blocks[:, 48:].reshape(n, 4, 32)
            low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
            high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
            q = (low | (high << 4)).reshape(n, QK_K)
            bits = 5
        # w = d*sc*q - dmin*m: the minimum's coarse factor is -dmin (negating a float16 is exact)
        return q, bits, 32, d, sc, -dmin, mn, 2 ** (bits - 1)
    if kind == "Q6_K":
        ql, qh, scales, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], blocks[:, 208:210]
        low = np.stack([ql.reshape(n, 2, 64) & 0x0F, ql.reshape(n, 2, 64) >> 4], axis=2).reshape(n, 2, 4, 32)
        high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        q = (low | (high << 4)).reshape(n, QK_K)
        return q, 6, 16, _f16(d), scales.view(np.int8), None, None, 32
    raise UserError(f"GGUF type {kind} has no exact MatMulNBits form (read: {', '.join(GRID_TYPES)})")


def read_grid(kind: str, data: np.ndarray, shape: tuple[int, int]) -> Grid:
    """The grid of one GGUF tensor: `data` its raw bytes (gguf's ReaderTensor.data), `shape` (rows, K)."""
    if kind not in GRID_TYPES:
        raise UserError(f"GGUF type {kind} has no exact MatMulNBits form (read: {', '.join(GRID_TYPES)})")
    rows, k = shape
    per_block, size = BLOCK_BYTES[kind]
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if k % per_block or raw.size != rows * (k // per_block) * size:
        raise UserError(f"a GGUF {kind} tensor of shape {shape} cannot hold {raw.size} bytes: the file is damaged")
    blocks = raw.reshape(-1, size)
    q, code_bits, block, d, sub, m, msub, shift = _decode(kind, blocks)
    bits = 4 if code_bits == 4 else 8
    codes = (q.astype(np.int16) - shift + 2 ** (bits - 1)).astype(np.uint8).reshape(rows, k)
    nb = k // block
    coarse = lambda a: np.ascontiguousarray(a.reshape(rows, -1))  # noqa: E731
    scale = Factor(coarse(d), None if sub is None else coarse(sub).reshape(rows, nb))
    minimum = None if m is None else Factor(coarse(m), None if msub is None else coarse(msub).reshape(rows, nb))
    return Grid(kind, codes, bits, block, scale, minimum, shift if minimum is not None else 0)


def stack(parts: list[Grid]) -> Grid:
    """Grids of the parts of one packed MatMul (q, k, v) stacked on rows. Parts stored alike keep their stored
    form (Gemma's Q8_0 attn_v beside Q5_0 q and k: both 8-bit codes with a float16 scale per 32); others take
    the widest bits, the smallest block, and float32 scales and offsets, still exact."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    def form(g: Grid) -> tuple:
        factors = [g.scale] + ([] if g.minimum is None else [g.minimum])
        return g.bits, g.block, g.shift, g.minimum is None, [(f.coarse.dtype, f.coarse.shape[1], f.fine is None,
                                                              None if f.fine is None else f.fine.dtype) for f in factors]
    if all(form(p) == form(first) for p in parts):  # e.g. Q5_0 and Q8_0: both 8-bit codes, float16 per block
        cat = lambda fs: None if fs[0] is None else np.concatenate(fs)  # noqa: E731
        scale = Factor(cat([p.scale.coarse for p in parts]), cat([p.scale.fine for p in parts]))
        minimum = None if first.minimum is None else Factor(cat([p.minimum.coarse for p in parts]),
                                                            cat([p.minimum.fine for p in parts]))
        kind = first.type if all(p.type == first.type for p in parts) else "mixed"
        return Grid(kind, np.concatenate([p.codes for p in parts]), first.bits, first.block, scale, minimum,
                    first.shift)
    bits, block = max(p.bits for p in parts), min(p.block for p in parts)
    codes, scales, offsets = [], [], []
    for p in parts:
        r = p.block // block
        codes.append((p.codes.astype(np.int16) - 2 ** (p.bits - 1) + 2 ** (bits - 1)).astype(np.uint8))
        scales.append(np.repeat(p.scale.value(), r, axis=1))
        off = p.offset()
        offsets.append(np.zeros_like(scales[-1]) if off is None else np.repeat(off, r, axis=1))
    has_offset = any(p.minimum is not None for p in parts)
    return Grid("mixed", np.concatenate(codes), bits, block, Factor(np.concatenate(scales)),
                Factor(np.concatenate(offsets)) if has_offset else None, 0)

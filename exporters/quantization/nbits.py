"""Weight-only MatMulNBits (blockwise int8/int4: symmetric, or 4-bit with a zero point per block; 5- to 7-bit codes
in 8-bit blocks), and GPTQ rounding on its grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.onnx_io import materialized, skeleton, tensor_array
from runtimes.contract import LOGITS


@dataclass(frozen=True)
class NBitsConfig:
    block_size: int                # weights per scale along K (power of 2, >= 16)
    accuracy_level: int            # MatMulNBits compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8
    exclude: tuple[str, ...] = ()  # MatMuls always left float
    zero_points: bool = False      # 4-bit blocks span [min, max] with a zero point each (8-bit stays symmetric)


def nbits(model: onnx.ModelProto, bits: int, config: NBitsConfig,
          include: list[str] | None = None) -> onnx.ModelProto:
    """MatMulNBits (blockwise symmetric) for the float weight MatMuls: `include` only, or all but the excluded;
    a new model (write_nbits)."""
    names = [n.name for n in GraphIndex(model).weight_matmuls() if n.name not in config.exclude
             and (include is None or n.name in include)]
    return write_nbits(model, dict.fromkeys(names, bits), config)


NARROW_BITS = (5, 6, 7)  # widths stored as 8-bit MatMulNBits blocks whose codes span only that many bits


@dataclass(frozen=True)
class Packed:
    """One weight as MatMulNBits stores it: (N, blocks, block_size * bits / 8) packed codes, (N, blocks)
    scales and, for asymmetric blocks, (N, ceil(blocks * bits / 8)) packed zero points, of a (K, N) float
    weight."""
    packed: np.ndarray
    scales: np.ndarray
    k: int
    bits: int
    zero_points: np.ndarray | None = None


def asymmetric_grid(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point), each (blocks, N), of blocks of `block_size` along K of `w` (K, N) spanning
    [min(block, 0), max(block, 0)] in 2^bits - 1 steps, as MLAS sets them; the zero point is the code of 0."""
    k, n = w.shape
    blocks = np.pad(w.astype(np.float64), ((0, -k % block_size), (0, 0))).reshape(-1, block_size, n)
    low, high = np.minimum(blocks.min(1), 0.0), np.maximum(blocks.max(1), 0.0)
    top = 2 ** bits - 1
    scale = (high - low) / top
    scale[scale == 0] = 1.0
    return scale, np.clip(np.round(-low / scale), 0, top)


def asymmetric_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Codes (K padded to whole blocks, N) of `w` on the grid (scale, zero point): (q - zero) * scale."""
    k, n = w.shape
    blocks = np.pad(w.astype(np.float64), ((0, -k % block_size), (0, 0))).reshape(-1, block_size, n)
    q = np.clip(np.round(blocks / scale[:, None] + zero[:, None]), 0, 2 ** bits - 1)
    return q.reshape(-1, n)


def pack_asymmetric(w: np.ndarray, bits: int, block_size: int, grid: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> Packed:
    """`w` (K, N) as MatMulNBits blocks with zero points, on `grid` (default: `asymmetric_grid(w)`); values
    already on the grid (GPTQ's) keep their codes exactly."""
    from exporters.quantization.grid import pack as pack_codes

    scale, zero = grid if grid is not None else asymmetric_grid(w, bits, block_size)
    codes = asymmetric_codes(w, scale, zero, bits, block_size).astype(np.uint8).T  # (N, K padded)
    zeros = zero.astype(np.uint8).T  # (N, blocks)
    if bits == 4:  # two to a byte, low nibble first; an odd block count pads with 8, as onnxruntime's packer does
        zeros = np.pad(zeros, ((0, 0), (0, zeros.shape[1] % 2)), constant_values=8)
        zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    return Packed(pack_codes(codes, bits, block_size), scale.T.astype(np.float32), w.shape[0], bits,
                  np.ascontiguousarray(zeros))


def pack_narrow(w: np.ndarray, bits: int, block_size: int) -> Packed:
    """`w` (K, N) on a symmetric `bits`-bit grid (5 to 7) stored as 8-bit MatMulNBits blocks: each block's scale
    is MLAS's, peak / -2^(bits-1), and its codes 128 + q with q in [-2^(bits-1), 2^(bits-1) - 1], so MatMulNBits
    computes scale * (code - 128) = w rounded to that grid. Values already on the grid (GPTQ's at `bits`) keep
    their codes exactly. The file holds a byte a weight; `pipeline optimize --native-int8` stores the codes at
    their own width (exporters/block_kernels.py `pack_narrow_blocks`)."""
    q, scale = symmetric_blocks(w.astype(np.float32), bits, block_size)
    codes = (q + 128).astype(np.uint8).transpose(2, 0, 1)  # (N, blocks, block_size)
    return Packed(np.ascontiguousarray(codes), np.ascontiguousarray(scale[:, 0].T, dtype=np.float32), w.shape[0], 8)


def pack(w: np.ndarray, bits: int, block_size: int, zero_points: bool = False) -> Packed:
    """`w` (K, N) quantized by onnxruntime's own C++ block quantizer, as MatMulNBitsQuantizer stores it; with
    `zero_points`, 4-bit blocks spanning [min, max] (`pack_asymmetric`); 5 to 7 bits as 8-bit blocks of codes
    that narrow (`pack_narrow`)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if zero_points and bits == 4:
        return pack_asymmetric(w, bits, block_size)
    if bits in NARROW_BITS:
        return pack_narrow(w, bits, block_size)
    w = np.ascontiguousarray(w, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    if k % block_size:
        w = np.pad(w, ((0, blocks * block_size - k), (0, 0)))
    packed = np.zeros((n, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, -(-blocks * bits // 8)), np.uint8)  # unused: symmetric
    {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits](packed, w, scales, zero_points, block_size, n, k,
                                                                True)
    return Packed(packed, scales, k, bits)


def nbits_node(node: onnx.NodeProto, p: Packed, config: NBitsConfig,
               outputs: list[str] | None = None) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The MatMulNBits that replaces the weight MatMul `node` (onnxruntime's names and attributes), and its
    initializers."""
    weight, bits = node.input[1], p.bits
    attrs = {"K": p.k, "N": p.packed.shape[0], "bits": bits, "block_size": config.block_size}
    if config.accuracy_level:
        attrs["accuracy_level"] = config.accuracy_level
    inputs = [node.input[0], f"{weight}_Q{bits}", f"{weight}_scales"]
    if p.zero_points is not None:
        inputs.append(f"{weight}_zero_points")
    new = helper.make_node("MatMulNBits", inputs, list(node.output) if outputs is None else outputs,
                           name=f"{node.name}_Q{bits}", domain="com.microsoft", **attrs)
    arrays = [p.packed, p.scales] + ([] if p.zero_points is None else [p.zero_points])
    return new, [numpy_helper.from_array(a, name) for a, name in zip(arrays, new.input[1:])]


PackedOf = Callable[[str, int], Packed]  # (MatMul name, bits) -> its weight packed


def write_nbits(model: onnx.ModelProto, bits_of: dict[str, int], config: NBitsConfig,
                packed_of: PackedOf | None = None, weights_dir: str | Path = "") -> onnx.ModelProto:
    """A new model: `model` with each MatMul of `bits_of` as MatMulNBits of those bits, exactly as onnxruntime's
    MatMulNBitsQuantizer writes it (its own C++ block quantizer, names, attributes), `model` unchanged.

    The float weights of those MatMuls are read one at a time and never copied, so writing holds the quantized
    model beside the float one instead of two float copies (the quantizer's way: a whole copy to rewrite, plus
    its own). `packed_of(name, bits)`, when given, gives the weight already packed (GPTQ's rounding, or a
    store the search reads too: exporters/quantization/packs.py), and the float weight is not read at all.
    Initializers still in external data (a lazily loaded graph, exporters/onnx_io.py `load_lazily`) are read
    from `weights_dir`.
    """
    g = GraphIndex(model)
    nodes = {n.name: n for n in g.weight_matmuls()}
    unknown = sorted(set(bits_of) - set(nodes))
    if unknown:
        raise ValueError(f"not float weight MatMuls: {unknown}")

    def packed(name: str, bits: int) -> Packed:
        if packed_of is not None:
            return packed_of(name, bits)
        return pack(tensor_array(g.inits[nodes[name].input[1]], weights_dir), bits, config.block_size,
                    bits == 4 and config.zero_points)  # (8-bit blocks are symmetric: w8a8's fallback too)

    out = skeleton(model)
    written = []
    for node in model.graph.node:
        bits = bits_of.get(node.name)
        if bits is None:
            written.append(node)
            continue
        new, inits = nbits_node(node, packed(node.name, bits), config)
        out.graph.initializer.extend(inits)
        written.append(new)
    out.graph.node.extend(written)
    used = {i for n in written for i in n.input} | {o.name for o in model.graph.output}
    out.graph.initializer.extend(materialized(t, weights_dir) for t in model.graph.initializer if t.name in used)
    if bits_of and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def output_projection(model: onnx.ModelProto) -> str | None:
    """The weight MatMul that writes the logits (lm_head), if there is one."""
    weights = GraphIndex(model).weight_names
    return next((n.name for n in model.graph.node if LOGITS in n.output and n.name in weights), None)


def nbits_quantized(model: onnx.ModelProto, bits: int | None = None) -> set[str]:
    """Original names of the MatMuls that became MatMulNBits (of `bits`, or any); ORT appends `_Q{bits}`."""
    found = set()
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            b = next(a.i for a in n.attribute if a.name == "bits")
            if bits is None or b == bits:
                found.add(n.name.removesuffix(f"_Q{b}"))
    return found


def symmetric_blocks(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes q (blocks, block_size, N), in [-2^(bits-1), 2^(bits-1) - 1], and scales (blocks, 1, N) of w (K, N)
    as symmetric `bits`-bit blocks of `block_size` along K (K padded to a whole block), in w's float type."""
    k, n = w.shape
    blocks = np.pad(w, ((0, -k % block_size), (0, 0))).reshape(-1, block_size, n)
    top = 2 ** (bits - 1)
    # MLAS's symmetric blocks: the value of largest magnitude maps exactly to -top (the scale takes its sign)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None, :], axis=1)
    scale = peak / -top
    scale[scale == 0] = 1.0
    return np.clip(np.round(blocks / scale), -top, top - 1), scale


def fake_nbits(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """w (K, N) rounded as symmetric `bits`-bit blocks of `block_size` along K (K padded to a whole block)."""
    q, scale = symmetric_blocks(w, bits, block_size)
    return (q * scale).reshape(-1, w.shape[1])[:w.shape[0]]


def code_bits(codes: np.ndarray) -> np.ndarray:
    """uint8 (N, ...) 8-bit codes (zero point 128) -> per row the fewest bits b, 2 to 8, whose signed range
    [-2^(b-1), 2^(b-1)) holds every code - 128 of the row."""
    v = codes.reshape(len(codes), -1)
    need = np.maximum(128 - v.min(axis=1).astype(np.int64), v.max(axis=1).astype(np.int64) - 127)  # 2^(b-1) >= need
    return np.maximum(2, 1 + np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))

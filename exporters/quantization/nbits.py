"""Weight-only MatMulNBits (blockwise symmetric int8/int4), and GPTQ rounding on its grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from exporters.gptq import fits, gptq_blockwise
from exporters.graph import GraphIndex
from exporters.quantization.quiet import quiet
from runtimes.contract import LOGITS


@dataclass(frozen=True)
class NBitsConfig:
    block_size: int                # weights per scale along K (power of 2, >= 16)
    accuracy_level: int            # MatMulNBits compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8
    exclude: tuple[str, ...] = ()  # MatMuls always left float


def nbits(model: onnx.ModelProto, bits: int, config: NBitsConfig,
          include: list[str] | None = None) -> onnx.ModelProto:
    """MatMulNBits (blockwise symmetric) for the float weight MatMuls: `include` only, or all but the excluded."""
    exclude = set(config.exclude)
    if include is not None:  # the quantizer's own nodes_to_include adds to the op types instead of narrowing
        exclude |= {n.name for n in model.graph.node if n.op_type == "MatMul"} - set(include)
    with quiet():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=config.block_size, is_symmetric=True,
                                         accuracy_level=config.accuracy_level, nodes_to_exclude=sorted(exclude),
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    return quantizer.model.model  # the same ModelProto, metadata (the contract) included


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


class BlockwiseRounding:
    """GPTQ-rounded stand-ins for the weights of `targets` on MatMulNBits' grid (exporters/gptq.py), computed once
    per (MatMul, bits) from the input Hessians over the calibration feeds. Written into a copy of the float model
    before MatMulNBitsQuantizer runs, they come out of it unchanged (same scales, same grid points)."""

    def __init__(self, model: onnx.ModelProto, targets: list[str], hessians: dict[str, np.ndarray], tokens: int,
                 block_size: int):
        g = GraphIndex(model)
        nodes, self.inits, readers = g.nodes, g.inits, g.uses
        self.weight = {t: nodes[t].input[1] for t in targets if readers[nodes[t].input[1]] == 1}
        self.activation = {t: nodes[t].input[0] for t in self.weight}
        self.hessians, self.tokens = hessians, tokens
        self.nearest = sorted(t for t in targets if t not in self.weight
                              or not fits(self.inits[self.weight[t]].dims[0], tokens))
        self.block_size, self._cache = block_size, {}

    def rounded(self, name: str, bits: int) -> np.ndarray | None:
        if name in self.nearest or name not in self.weight:
            return None
        if (name, bits) not in self._cache:
            w = numpy_helper.to_array(self.inits[self.weight[name]])
            self._cache[name, bits] = gptq_blockwise(w, self.hessians[self.activation[name]], bits, self.block_size)
        return self._cache[name, bits]

    def apply(self, model: onnx.ModelProto, bits_of: dict[str, int]) -> None:
        """Replace, in `model` (a copy of the float model), each named MatMul's weight by its rounding."""
        g = GraphIndex(model)
        for name, bits in bits_of.items():
            w = self.rounded(name, bits)
            if w is not None:
                g.replace_initializer(self.weight[name], w)


def fake_nbits(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """w (K, N) rounded as symmetric `bits`-bit blocks of `block_size` along K (K padded to a whole block)."""
    k, n = w.shape
    pad = -k % block_size
    blocks = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block_size, n)
    top = 2 ** (bits - 1)
    # MLAS's symmetric blocks: the value of largest magnitude maps exactly to -top (the scale takes its sign)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None, :], axis=1)
    scale = peak / -top
    scale[scale == 0] = 1.0
    q = np.clip(np.round(blocks / scale), -top, top - 1) * scale
    return q.reshape(-1, n)[:k]

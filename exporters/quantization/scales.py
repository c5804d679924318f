"""Block scales stored as float16, read as float32.

MatMulNBits and GatherBlockQuantized take their scales in the activations' type (float32 here), so a writer
that stores them as they are read spends 4 bytes per block: with blocks of 32, a 4-bit weight costs 5 bits and an
8-bit one 9, where llama.cpp's Q4_0 and Q8_0 spend 2 bytes (4.5 and 8.5 bits). `half_scales` stores each such
scales tensor as float16 and puts a Cast to float32 in front of its readers (times a power of two when the
tensor's smallest scale is under float16's normal range); onnxruntime folds the Cast (and Mul) of initializers
once at session creation, before it prepacks the weights, so the kernels, their speed and their memory are as
before and only the file shrinks. A float16 scale is within 2^-11 of the float32 one, relative; a 4-bit code
moves its weight by at most 8 such steps, under a 256th of a quantization step.

`stored_scales` reads a scales input back as float32 whichever way it was stored, for the passes that rewrite a
quantized model (exporters/cpu_kernels.py, block_kernels.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.onnx_io import tensor_array

# (op type, input index) of the inputs that are per-block scales, in the activations' type
SCALE_INPUTS = {("MatMulNBits", 2), ("GatherBlockQuantized", 2), ("BlockInt8MatMul", 2)}
HALF_SUFFIX = "_f16"
NORMAL_MIN, HALF_MAX = 2.0 ** -14, 65504.0  # float16's smallest normal magnitude, and its largest


def _readers(graph: onnx.GraphProto, found: dict[str, set[tuple[str, int]]]) -> dict[str, set[tuple[str, int]]]:
    """(op type, input index) of every reader of each tensor, subgraphs included (an `If` branch's MatMulNBits
    reads its scales from the outer graph)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            found.setdefault(name, set()).add((node.op_type, i))
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _readers(sub, found)
    return found


def half_form(a: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(float16 values, s) with a == values * 2^-s to float16's rounding (2^-11 relative, every element), or None
    when the tensor's range does not fit float16's normal range at any power-of-two shift."""
    nonzero = np.abs(a[a != 0])
    if not np.all(np.isfinite(a)):
        return None
    shift = 0
    if nonzero.size and nonzero.min() < NORMAL_MIN:
        shift = int(np.ceil(np.log2(NORMAL_MIN / nonzero.min())))
    if nonzero.size and nonzero.max() * 2.0 ** shift >= HALF_MAX:
        return None
    half = (a.astype(np.float64) * 2.0 ** shift).astype(np.float16)
    back = half.astype(np.float64) * 2.0 ** -shift
    if np.any(np.abs(back - a) > np.abs(a.astype(np.float64)) * 2.0 ** -11):
        return None
    return half, shift


def on_half_grid(scales: np.ndarray) -> np.ndarray:
    """`scales` (float32) as `half_scales` will store them, for a quantizer that picks its codes afterwards: the
    codes are then the nearest for the scales the file holds. Unchanged where float16 cannot hold them."""
    form = half_form(scales)
    if form is None:
        return scales
    half, shift = form
    return (half.astype(np.float32) * np.float32(2.0 ** -shift)).astype(np.float32)


def half_scales(model: onnx.ModelProto, weights_dir: str | Path = "") -> dict:
    """Store every float32 initializer that only block-quantized ops read as their scales as float16 behind a
    Cast (and a Mul by 2^-s where shifted), in place. Returns what it did, for the report."""
    readers = _readers(model.graph, {})
    casts, halved, kept, saved = [], 0, [], 0
    for t in model.graph.initializer:
        uses = readers.get(t.name, set())
        # read as scales (a tied table's embedding may gather the head's scales rows as well)
        if t.data_type != TensorProto.FLOAT or not uses & SCALE_INPUTS or not uses <= SCALE_INPUTS | {("Gather", 0)}:
            continue
        a = tensor_array(t, weights_dir)
        form = half_form(a)
        if form is None:
            kept.append(t.name)
            continue
        half, shift = form
        name = t.name
        stored = name + HALF_SUFFIX
        t.CopyFrom(numpy_helper.from_array(half, stored))  # in place: the initializers' order is kept
        if shift:
            casts.append(helper.make_node("Cast", [stored], [stored + "/float"], name=stored + "/cast",
                                          to=TensorProto.FLOAT))
            model.graph.initializer.append(numpy_helper.from_array(np.array(2.0 ** -shift, np.float32),
                                                                   stored + "/shift"))
            casts.append(helper.make_node("Mul", [stored + "/float", stored + "/shift"], [name],
                                          name=stored + "/unshift"))
        else:
            casts.append(helper.make_node("Cast", [stored], [name], name=stored + "/cast", to=TensorProto.FLOAT))
        halved += 1
        saved += a.nbytes - half.nbytes
    for node in reversed(casts):  # first in the graph: they read initializers only
        model.graph.node.insert(0, node)
    return {"float16_scales": halved, "float32_scales": kept, "bytes_saved": saved}


def folded_bytes(model: onnx.ModelProto) -> int:
    """Bytes a session holds beyond the file for the float16 initializers cast to float32 (`half_scales`'s, the
    gguf recipe's factors): onnxruntime folds each into float32, twice its size. The model may be loaded without
    its external data: sizes come from the dims."""
    casts = {n.input[0] for n in model.graph.node if n.op_type == "Cast"
             and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)}
    return sum(2 * int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type == TensorProto.FLOAT16 and t.name in casts)


def stored_scales(index: GraphIndex, name: str, weights_dir: str | Path = "") -> np.ndarray | None:
    """The float32 value of a scales input: a float32 initializer, or a float16 one behind `half_scales`'s Cast
    (and Mul by a constant); None for anything else (computed at run time)."""
    if name in index.inits:
        t = index.inits[name]
        return tensor_array(t, weights_dir) if t.data_type == TensorProto.FLOAT else None
    node = index.producers.get(name)
    if node is None:
        return None
    if node.op_type == "Cast":
        if node.input[0] not in index.inits or \
                not any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute):
            return None
        return tensor_array(index.inits[node.input[0]], weights_dir).astype(np.float32)
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[1] in index.inits:
        base = stored_scales(index, node.input[0], weights_dir)
        factor = tensor_array(index.inits[node.input[1]], weights_dir)
        return None if base is None or factor.size != 1 else (base * factor.astype(np.float32)).astype(np.float32)
    return None

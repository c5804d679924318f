"""ONNX -> ONNX: 8-bit MatMulNBits onto pipeline's native block kernels (runtimes/kernels/int8_matmul.c), for
`pipeline optimize --native-int8` (exporters/cpu_kernels.py `specialize`).

BlockInt8MatMul: an 8-bit MatMulNBits whose stored blocks another node also reads (the tied head whose blocks
the token embedding gathers, exporters/quantization/embedding.py). onnxruntime prepacks a MatMulNBits weight into
a copy of its own and keeps the stored blocks while anything else reads them, so such a table is in memory
twice (Gemma 3's 262,144 x 640 head: 388 MB where 168 MB are the table). The op reads the stored blocks in
place, with the same int8 arithmetic as MatMulNBits at accuracy_level 4; nothing in the file changes but the
node.

An 8-bit MatMulNBits that nothing else reads, whose codes span fewer bits (a GGUF's Q5_0 blocks, which the gguf
recipe writes as 8-bit blocks, MatMulNBits having no 5-bit form), becomes BlockInt8MatMul over those codes
packed at their own width (`pack_narrow_blocks`): the file holds 5 bits a weight, not 8; the kernel unpacks them
once when the session starts and computes as on the stored blocks (its x86-64 builds keep 5-bit codes at 5 bits in
memory and decodes them as it reads them).

A 4-bit MatMulNBits (symmetric blocks of 32, w4's MatMuls the search left at 4 bits) that nothing else reads becomes
BlockInt8MatMul over the same bytes (`pack_four_bit`): MatMulNBits' nibbles are the kernel's 4-bit packed codes as
they are, so the file does not change size; every build keeps them at 4 bits in memory and decodes them as it reads
them, and computes the int8 sums onnxruntime's int8 path forms.

BlockGather: a tied head of such narrow codes (w4's --head-bits 5 to 7), whose blocks the token embedding
gathers, is packed the same way, and the embedding's lookup reads the rows it needs from the packed codes
(`pack_shared_head`): the table is stored once, at its codes' width.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.graph import GraphIndex
from exporters.optimize import remove_dead_nodes
from exporters.quantization.nbits import code_bits
from runtimes.kernels import BLOCK_OP, DOMAIN, GATHER_OP


# ops on initializers that onnxruntime folds into one when the session starts (the gguf recipe's factors)
FOLDED = {"Cast", "Mul", "Add", "Unsqueeze", "Reshape", "Transpose"}


def _float_scales(index: GraphIndex, name: str, depth: int = 0) -> bool:
    """Whether a MatMulNBits' scales are float32 (the kernel's type) from initializers: a float32 initializer, or
    one stored as float16 behind a Cast to float (the writers' block scales), or such a value through the gguf
    recipe's Mul by the K-quants' sub-block integers and its reshapes, which onnxruntime folds once."""
    if name in index.inits:
        return index.inits[name].data_type == onnx.TensorProto.FLOAT
    node = index.producers.get(name)
    if node is None or node.op_type not in FOLDED or depth > 8:
        return False
    if node.op_type == "Cast":
        return (any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in node.attribute)
                and _constant(index, node.input[0], depth + 1))
    return (_float_scales(index, node.input[0], depth + 1)
            and all(_constant(index, i, depth + 1) for i in node.input[1:] if i))


def _constant(index: GraphIndex, name: str, depth: int) -> bool:
    """Whether `name` is an initializer or FOLDED ops on initializers alone."""
    if name in index.inits:
        return True
    node = index.producers.get(name)
    return (node is not None and node.op_type in FOLDED and depth <= 8
            and all(_constant(index, i, depth + 1) for i in node.input if i))


def kernel_matmuls(model: onnx.ModelProto, bits: int,
                   index: GraphIndex | None = None) -> list[tuple[onnx.NodeProto, bool]]:
    """The `bits`-bit MatMulNBits (8 or 4) BlockInt8MatMul computes as they are (blocks of 32, the default zero
    point, int8 activations: accuracy_level 4; float32 scales), each with whether another node also reads its
    stored blocks."""
    index = index or GraphIndex(model)
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        blocks = index.inits.get(node.input[1])
        if (attrs.get("bits") != bits or attrs.get("block_size") != 32 or attrs.get("accuracy_level") != 4
                or any(node.input[3:]) or blocks is None or blocks.data_type != onnx.TensorProto.UINT8
                or list(blocks.dims) != [attrs.get("N"), attrs.get("K", 0) // 32, 4 * bits] or attrs["K"] % 32
                or not _float_scales(index, node.input[2])):
            continue
        found.append((node, index.uses[node.input[1]] > 1))
    return found


def block_matmuls(model: onnx.ModelProto, index: GraphIndex | None = None) -> list[tuple[onnx.NodeProto, bool]]:
    """The 8-bit `kernel_matmuls`."""
    return kernel_matmuls(model, 8, index)


def shared_block_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """`block_matmuls` whose stored blocks another node also reads."""
    return [node for node, shared in block_matmuls(model) if shared]


def _to_block_op(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    node.op_type, node.domain = BLOCK_OP, DOMAIN
    node.name = f"{node.name}/{BLOCK_OP}"
    del node.attribute[:], node.input[3:]
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def rewrite_shared_blocks(model: onnx.ModelProto) -> int:
    """Each MatMulNBits of `shared_block_matmuls` becomes BlockInt8MatMul on the same inputs; returns how many."""
    found = shared_block_matmuls(model)
    for node in found:
        _to_block_op(model, node)
    return len(found)


MAX_SEGMENTS = 64       # the kernel's limit on runs of rows of one width (int8_matmul.c)
PACK_MIN_SAVING = 1     # bits a weight, on average, that packing must save for an unshared MatMul to move


def segments(bits: np.ndarray) -> tuple[list[int], list[int]]:
    """Per-row widths -> (bits, rows) of their runs; one run at the widest where there would be more than the
    kernel takes."""
    starts = [0, *(np.flatnonzero(np.diff(bits)) + 1).tolist()]
    if len(starts) > MAX_SEGMENTS:
        return [int(bits.max())], [len(bits)]
    ends = starts[1:] + [len(bits)]
    return [int(bits[s]) for s in starts], [e - s for s, e in zip(starts, ends)]


def pack_codes(codes: np.ndarray, bits: list[int], rows: list[int], chunk: int = 4096) -> np.ndarray:
    """uint8 (N, K/32, 32) codes -> BlockInt8MatMul's packed codes: per run of rows at b bits, each block's 32
    values code - 128 + 2^(b-1) as a little-endian bit stream of 4b bytes (int8_matmul.c), flat."""
    out, start = [], 0
    for b, count in zip(bits, rows):
        shift, planes = np.uint8(128 - 2 ** (b - 1)), np.arange(b, dtype=np.uint8)
        for first in range(start, start + count, chunk):
            c = codes[first:min(first + chunk, start + count)] - shift
            stream = ((c[..., None] >> planes) & 1).reshape(*c.shape[:-1], c.shape[-1] * b)
            out.append(np.packbits(stream, axis=-1, bitorder="little").reshape(-1))
        start += count
    return np.concatenate(out)


def narrow_widths(codes: np.ndarray) -> tuple[list[int], list[int]] | None:
    """`segments` of 8-bit codes (N, K/32, 32) that fit fewer bits, where packing them saves at least
    PACK_MIN_SAVING bits a weight on average; else None."""
    bits, rows = segments(code_bits(codes))
    saved = sum((8 - b) * r for b, r in zip(bits, rows)) / len(codes)
    return (bits, rows) if saved >= PACK_MIN_SAVING else None


def _packed_attributes(node: onnx.NodeProto, k: int, bits: list[int], rows: list[int]) -> None:
    node.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("bits", bits),
                           helper.make_attribute("rows", rows)])


def _to_packed_op(model: onnx.ModelProto, node: onnx.NodeProto, codes: np.ndarray, bits: list[int],
                  rows: list[int]) -> dict:
    """The `block_matmuls` node as BlockInt8MatMul over its codes packed at (bits, rows), a new initializer named
    after its blocks + "_packed" (the blocks stay for the caller to drop); returns its widths and the bytes
    before and after."""
    packed = pack_codes(codes, bits, rows)
    name = f"{node.input[1]}_packed"
    model.graph.initializer.append(numpy_helper.from_array(packed, name))
    k = next(a.i for a in node.attribute if a.name == "K")
    _to_block_op(model, node)
    node.input[1] = name
    _packed_attributes(node, k, bits, rows)
    widths = Counter()
    for b, r in zip(bits, rows):
        widths[b] += r
    return {"rows_at_bits": {str(b): widths[b] for b in sorted(widths)},
            "bytes": [int(codes.size), int(packed.size)]}


def pack_narrow_blocks(model: onnx.ModelProto) -> dict[str, dict]:
    """Each unshared `block_matmuls` node whose codes fit fewer bits (`narrow_widths`) becomes BlockInt8MatMul
    over the codes packed at their widths (attributes K, bits, rows); returns, per node moved, its widths and
    the bytes before and after."""
    index = GraphIndex(model)
    moved = {}
    for node, shared in block_matmuls(model, index):
        if shared:  # the other reader needs the 8-bit blocks (`pack_shared_head` takes a tied table's)
            continue
        codes = numpy_helper.to_array(index.inits[node.input[1]])
        widths = narrow_widths(codes)
        if widths is None:
            continue
        original = node.name
        moved[original] = _to_packed_op(model, node, codes, *widths)
    if moved:
        index.remove_unused_initializers()  # the 8-bit blocks the packed codes replace
    return moved


def pack_four_bit(model: onnx.ModelProto) -> dict[str, dict]:
    """Each 4-bit `kernel_matmuls` node whose blocks nothing else reads becomes BlockInt8MatMul over its blocks as
    its 4-bit packed codes: a block's 16 bytes hold value 2i in the low nibble of byte i and 2i + 1 in the high
    one, code q for the weight q - 8, which is the kernel's little-endian stream of 4-bit codes (code = weight + 8)
    byte for byte. Returns what `pack_narrow_blocks` does."""
    index = GraphIndex(model)
    moved = {}
    for node in (node for node, shared in kernel_matmuls(model, 4, index) if not shared):
        blocks = index.inits[node.input[1]]
        n, kb, _ = blocks.dims
        flat = onnx.TensorProto()
        flat.CopyFrom(blocks)
        flat.name = f"{node.input[1]}_packed"
        del flat.dims[:]
        flat.dims.append(n * kb * 16)
        model.graph.initializer.append(flat)
        original, k = node.name, kb * 32
        _to_block_op(model, node)
        node.input[1] = flat.name
        _packed_attributes(node, k, [4], [n])
        moved[original] = {"rows_at_bits": {"4": n}, "bytes": [n * kb * 16, n * kb * 16]}
    if moved:
        index.remove_unused_initializers()  # the blocks under their old shape
    return moved


def _offset_term(index: GraphIndex, node: onnx.NodeProto) -> tuple[onnx.NodeProto, str] | None:
    """The Add that adds the gguf recipe's offset term to `node`'s output (exporters/quantization/grid.py
    `Writer.matmul`: Add(y, MatMul(ReduceSum(Reshape(x, (0, 0, K/32, 32)), -1), Transpose(offsets (N, K/32))))),
    and the offsets' name; None when the output goes anywhere else or the term is not over the node's own input
    in blocks of 32."""
    readers = index.consumers.get(node.output[0], [])
    if (len(readers) != 1 or readers[0].op_type != "Add" or node.output[0] not in readers[0].input
            or node.output[0] in {o.name for o in index.model.graph.output}):
        return None
    add = readers[0]
    term = index.producers.get(add.input[1] if add.input[0] == node.output[0] else add.input[0])
    sums = term and term.op_type == "MatMul" and index.producers.get(term.input[0])
    blocks = sums and sums.op_type == "ReduceSum" and index.producers.get(sums.input[0])
    if not blocks or blocks.op_type != "Reshape" or blocks.input[0] != node.input[0] or len(sums.input) < 2:
        return None
    shape, axes = index.constant_source(blocks.input[1]), index.constant_source(sums.input[1])
    keepdims = next((a.i for a in sums.attribute if a.name == "keepdims"), 1)
    k = next((a.i for a in node.attribute if a.name == "K"), None) or index.inits[node.input[1]].dims[1] * 32
    if (shape is None or numpy_helper.to_array(shape).tolist() != [0, 0, k // 32, 32] or axes is None
            or numpy_helper.to_array(axes).tolist() not in ([-1], [3]) or keepdims != 0
            or len(index.consumers.get(term.output[0], [])) != 1):
        return None
    made = index.producers.get(term.input[1])  # the writer's: the (N, K/32) factors, transposed
    if made is None or made.op_type != "Transpose" or \
            [list(a.ints) for a in made.attribute if a.name == "perm"] != [[1, 0]]:
        return None
    return add, made.input[0]


def fold_offsets(model: onnx.ModelProto) -> int:
    """Each BlockInt8MatMul whose output only gains the gguf recipe's offset term (a GGUF's Q4_1 / Q4_K / Q5_1 /
    Q5_K blocks, w = scale * q + minimum) takes the term's (N, K/32) offsets as its input 3 and computes it
    itself, from the float sums of its activations per block, as the ReduceSum and MatMul it replaces did: five
    nodes fewer a MatMul (a decode step of SmolLM2's Q4_1 has 120 such terms). Returns how many."""
    index = GraphIndex(model)
    at_add, gone = {}, set()  # the op with its offsets goes where its Add was: after the nodes that make them
    for node in model.graph.node:
        if node.op_type != BLOCK_OP or node.domain != DOMAIN or len(node.input) != 3:
            continue
        found = _offset_term(index, node)
        if found is None:
            continue
        add, offsets = found
        moved = onnx.NodeProto()
        moved.CopyFrom(node)
        moved.input.append(offsets)
        moved.output[0] = add.output[0]
        at_add[add.name], gone = moved, gone | {node.name}
    if at_add:
        nodes = [at_add.get(n.name, n) for n in model.graph.node if n.name not in gone]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        remove_dead_nodes(model)  # the terms' MatMuls, block sums and reshapes
    return len(at_add)


def shared_table_lookup(index: GraphIndex, matmul: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str] | None:
    """The nodes through which a tied table reads the 8-bit MatMulNBits `matmul`'s blocks (embedding.py
    `share_tied_table`: Gather of the blocks, Cast, Sub 128, times the Gather of the scales, Unsqueezed, Reshape
    to (batch, sequence, K)), and the token ids they gather; None when anything else reads the blocks."""
    blocks, scales = matmul.input[1], matmul.input[2]
    readers = [n for n in index.consumers.get(blocks, []) if n is not matmul]
    if len(readers) != 1 or readers[0].op_type != "Gather" or readers[0].input[0] != blocks \
            or any(a.name == "axis" and a.i != 0 for a in readers[0].attribute):
        return None
    gather, ids = readers[0], readers[0].input[1]

    def only(node: onnx.NodeProto, op: str) -> onnx.NodeProto | None:
        found = index.consumers.get(node.output[0], [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    cast = only(gather, "Cast")
    sub = cast and only(cast, "Sub")
    mul = sub and only(sub, "Mul")
    reshape = mul and only(mul, "Reshape")
    if reshape is None or sub.input[0] != cast.output[0] or mul.input[0] != sub.output[0]:
        return None
    zero, shape = index.constant_source(sub.input[1]), index.constant_source(reshape.input[1])
    unsqueeze = index.producers.get(mul.input[1])
    scale_gather = unsqueeze and index.producers.get(unsqueeze.input[0])
    if (zero is None or numpy_helper.to_array(zero).tolist() != 128.0 or shape is None
            or numpy_helper.to_array(shape).tolist() != [0, 0, -1] or unsqueeze.op_type != "Unsqueeze"
            or scale_gather is None or scale_gather.op_type != "Gather" or list(scale_gather.input) != [scales, ids]
            or any(a.name == "axis" and a.i != 0 for a in scale_gather.attribute)
            or len(index.consumers.get(unsqueeze.output[0], [])) != 1
            or len(index.consumers.get(scale_gather.output[0], [])) != 1):
        return None
    return [gather, cast, sub, scale_gather, unsqueeze, mul, reshape], ids


def pack_shared_head(model: onnx.ModelProto) -> dict[str, dict]:
    """A tied head whose 8-bit blocks the token embedding gathers (`shared_table_lookup`) and whose codes fit
    fewer bits (`narrow_widths`: w4's --head-bits 5 to 7) becomes BlockInt8MatMul over the codes packed at their
    widths, and the embedding's lookup one BlockGather on the same packed codes, which dequantizes the rows it
    is asked for exactly as the nodes it replaces did: the table is stored once, at its codes' width. Returns
    what `pack_narrow_blocks` does."""
    index = GraphIndex(model)
    moved = {}
    for node, shared in block_matmuls(model, index):
        lookup = shared_table_lookup(index, node) if shared else None
        codes = numpy_helper.to_array(index.inits[node.input[1]]) if lookup is not None else None
        widths = narrow_widths(codes) if codes is not None else None
        if widths is None:
            continue
        chain, ids = lookup
        original, scales = node.name, node.input[2]
        moved[original] = _to_packed_op(model, node, codes, *widths)
        rows = chain[-1]
        gather = helper.make_node(GATHER_OP, [node.input[1], ids, scales], list(rows.output),
                                  f"{chain[0].name}/{GATHER_OP}", domain=DOMAIN)
        _packed_attributes(gather, codes.shape[1] * codes.shape[2], *widths)
        at = list(model.graph.node).index(rows)
        model.graph.node.insert(at, gather)
        for n in chain:
            model.graph.node.remove(n)
    if moved:
        remove_dead_nodes(model)  # the 8-bit blocks the packed codes replace, the lookup's constants
    return moved

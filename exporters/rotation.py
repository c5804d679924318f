"""Orthogonal rotations folded into the weights (QuaRot / SpinQuant's R1 and R2): outliers spread over all channels.

An RMSNorm without its weight commutes with any orthogonal Q: rms(x Q) = rms(x), so norm(x Q) = norm(x) Q. Once
every norm weight g is folded into the rows of the MatMuls that read the norm (diag(g) W), the whole residual
stream can be carried in a rotated basis, exactly:

    embedding table E      -> E Q          (the stream starts rotated)
    residual writers W     -> W Q          (o_proj, down_proj: the skip inputs of the norms)
    residual readers W     -> Q^T diag(g) W  (qkv, gate/up, lm_head), and every norm weight becomes ones

The fixed channels where LLMs keep their large residual-stream activations are no longer channels: with Q a
randomized Hadamard matrix each one is spread evenly over all of them, so a per-tensor static int8 scale fits
the norm outputs of every token. R2 does the same inside attention, per head: the value columns of the packed
QKV projection -> V H and the o_proj rows of every head -> H^T W_o (attention mixes values linearly, per head).
The value cache then holds V H; the runtime only feeds the cache back to the same model, and the logits are
unchanged. Nothing is added to the graph; smoothing runs after this, on the rotated activations.

The down_proj input (the SwiGLU product) is out of reach of any folded rotation, and it is where static int8
loses most on SmolLM2. `online_hadamard` rotates it in the graph, in blocks, after smoothing has split off its
few huge channels (docs/ has the measured effect).

Works on the fused graph of RMSNorm models (SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization,
GroupQueryAttention with packed QKV); `rotate` reports why not when the graph has another shape (LayerNorm's
mean subtraction does not commute with Q, an unfused export has its norms as Pow/ReduceMean/Mul).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.graph import GraphIndex, rescale
from exporters.smoothing import NORM_SCALE_INPUTS

RMS_NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
NORMS = {op: NORM_SCALE_INPUTS[op][0] for op in RMS_NORMS}  # op -> input index of its weight


def _paley12() -> np.ndarray:
    """The 12x12 Hadamard matrix from Paley's construction over GF(11)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)])
    core = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    s = np.zeros((12, 12))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, core
    return s + np.eye(12)


def hadamard_order(n: int) -> bool:
    """Whether `hadamard` can build a matrix of order n (2^a * 12^b), decided without building it."""
    if n < 1:
        return False
    while n % 12 == 0:
        n //= 12
    return n & (n - 1) == 0


def hadamard(n: int) -> np.ndarray | None:
    """Orthonormal Hadamard matrix of order n = 2^a * 12^b (576, 768, 1536, 2048, 3072, 4096...), else None."""
    if not hadamard_order(n):
        return None
    m, h = n, np.ones((1, 1))
    while m % 12 == 0:
        h, m = np.kron(h, _paley12()), m // 12
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def random_rotation(n: int, seed: int) -> np.ndarray:
    """diag(random signs) @ H: a randomized Hadamard (QuaRot), or a random orthogonal matrix (QR of a Gaussian)
    when n has no Hadamard matrix of the constructible orders."""
    rng = np.random.default_rng(seed)
    h = hadamard(n)
    if h is None:
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return q * np.sign(np.diag(r))
    return rng.choice([-1.0, 1.0], n)[:, None] * h


@dataclass(frozen=True)
class RotationReport:
    residual: bool            # R1 folded
    value_heads: int          # attention layers whose value / o_proj pair got R2
    not_rotated: str | None   # why R1 was not applied

    def as_dict(self) -> dict:
        return asdict(self)


def _private_weight(g: GraphIndex, node: onnx.NodeProto) -> bool:
    """A weight MatMul whose initializer nothing else reads (rotating it must not touch another node)."""
    return node.name in g.weight_names and g.uses[node.input[1]] == 1


def _position_slice(g: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Slice along axis 1 only (positions, as the built graph's logits_to_keep cuts the stream before the final
    norm): it picks whole hidden vectors, so it commutes with any map of the hidden axis."""
    if node.op_type != "Slice" or len(node.input) < 4 or node.input[3] not in g.inits:
        return False
    return numpy_helper.to_array(g.inits[node.input[3]]).tolist() == [1]


def _head_norm(g: GraphIndex, node: onnx.NodeProto) -> bool:
    """A q/k norm (Qwen3, Gemma 3): it normalizes each head of a projection's output (viewed as heads by a
    Reshape), downstream of the MatMuls that read the stream, so R1 does not touch it."""
    producer = g.producers.get(node.input[0])
    return node.op_type == "SimplifiedLayerNormalization" and producer is not None and producer.op_type == "Reshape"


def _residual_plan(model: onnx.ModelProto, g: GraphIndex) -> tuple[onnx.NodeProto, list, list, list] | str:
    """(embedding Gather, norms, reader MatMuls per norm, writer MatMuls), or why the graph cannot be rotated."""
    norms = [n for n in model.graph.node if n.op_type in NORMS and not _head_norm(g, n)]
    if not norms:
        return "no SimplifiedLayerNormalization: R1 needs the fused graph of an RMSNorm model"
    others = sorted({n.op_type for n in model.graph.node if n.op_type in ("LayerNormalization",
                                                                            "SkipLayerNormalization")})
    if others:
        return f"{others[0]} subtracts the mean, which does not commute with a rotation"
    stream: set[str] = set()
    writers, readers = [], []
    for n in norms:
        stream.add(n.input[0])
        if n.op_type == "SkipSimplifiedLayerNormalization":
            if len(n.input) > 3 and n.input[3]:
                return f"{n.name} has a bias"
            stream.add(n.input[1])
            if len(n.output) > 3 and n.output[3]:
                stream.add(n.output[3])
        if n.input[NORMS[n.op_type]] not in g.inits:
            return f"{n.name}: its weight is not an initializer"
        mms = g.consumers.get(n.output[0], [])
        if not mms or any(not _private_weight(g, m) or m.input[0] != n.output[0] for m in mms):
            return f"{n.name}: its output is read by something other than weight MatMuls"
        readers.append(mms)
    gathers, outputs = [], {o.name for o in model.graph.output}
    pending, seen = list(stream), set()
    while pending:  # a Slice of positions (logits_to_keep) carries the stream on: its input is stream too
        t = pending.pop()
        if t in seen:
            continue
        seen.add(t)
        for r in g.consumers.get(t, []):
            skip = r.op_type == "SkipSimplifiedLayerNormalization" and r.input[1] == t
            if _position_slice(g, r) and r.input[0] == t:
                continue
            if r.op_type not in NORMS or r.input[0] != t and not skip:
                return f"the residual stream {t} is read by {r.op_type} {r.name}"
        if t in outputs:
            return f"the residual stream {t} is a graph output"
        p = g.producers.get(t)
        if p is None:
            return f"the residual stream {t} is a graph input"
        if p.op_type == "Gather" or _position_slice(g, p) and p.input[0] not in g.inits:
            if p.op_type == "Gather":
                gathers.append(p)
            else:
                pending.append(p.input[0])
        elif p.op_type == "MatMul" and _private_weight(g, p) and len(g.consumers[t]) == 1:
            writers.append(p)
        elif p.op_type not in NORMS:
            return f"the residual stream {t} is written by {p.op_type} {p.name}"
    if len(gathers) != 1 or gathers[0].input[0] not in g.inits or g.uses[gathers[0].input[0]] != 1:
        return "the residual stream does not start at one token-embedding Gather"
    return gathers[0], norms, readers, writers


def why_not_rotatable(model: onnx.ModelProto) -> str | None:
    """None when R1 can rotate this graph, else why not; only its structure is read (weights may be lazy)."""
    plan = _residual_plan(model, GraphIndex(model))
    return plan if isinstance(plan, str) else None


def rotate_residual(model: onnx.ModelProto, seed: int = 0) -> str | None:
    """R1 in place; returns None, or (changing nothing) why this graph cannot be rotated."""
    g = GraphIndex.of(model)
    plan = _residual_plan(model, g)
    if isinstance(plan, str):
        return plan
    gather, norms, readers, writers = plan
    q = random_rotation(g.inits[gather.input[0]].dims[1], seed)
    for name in [gather.input[0]] + [w.input[1] for w in writers]:
        rescale(g.inits[name], lambda w: w @ q)
    for norm, mms in zip(norms, readers):
        idx = NORMS[norm.op_type]
        gamma = numpy_helper.to_array(g.inits[norm.input[idx]])
        for m in mms:
            rescale(g.inits[m.input[1]], lambda w: q.T @ (gamma[:, None] * w))
        ones = f"{norm.name}.rotated.ones"  # one per norm: smoothing later divides it by its own factors
        model.graph.initializer.append(numpy_helper.from_array(np.ones(gamma.size, np.float32), ones))
        norm.input[idx] = ones
    g.remove_unused_initializers()  # the folded norm weights are read no more
    return None


def rotate_values(model: onnx.ModelProto, seed: int = 1) -> int:
    """R2 in place on every GroupQueryAttention with packed QKV whose projections are private weight MatMuls;
    returns how many were rotated."""
    g = GraphIndex.of(model)
    done = 0
    for n in model.graph.node:
        if n.op_type != "GroupQueryAttention" or any(n.input[i] for i in (1, 2) if i < len(n.input)):
            continue
        attrs = {a.name: a.i for a in n.attribute}
        heads, kv_heads = attrs["num_heads"], attrs["kv_num_heads"]
        qkv, outs = g.producers.get(n.input[0]), g.consumers.get(n.output[0], [])
        if qkv is None or not _private_weight(g, qkv) or len(outs) != 1 \
                or not _private_weight(g, outs[0]):
            continue
        width, o_rows = g.inits[qkv.input[1]].dims[1], g.inits[outs[0].input[1]].dims[0]
        head = width // (heads + 2 * kv_heads)
        if head * (heads + 2 * kv_heads) != width or o_rows != heads * head:
            continue
        h = random_rotation(head, seed)
        v0 = (heads + kv_heads) * head  # value columns: the last kv_heads * head of the packed projection

        def rotate_v(w: np.ndarray) -> np.ndarray:
            w = w.astype(np.float64)
            w[:, v0:] = w[:, v0:] @ np.kron(np.eye(kv_heads), h)
            return w
        rescale(g.inits[qkv.input[1]], rotate_v)
        rescale(g.inits[outs[0].input[1]], lambda w: np.kron(np.eye(heads), h).T @ w)
        done += 1
    return done


ONLINE_SUFFIX = "/online_hadamard"  # names of the nodes and the matrix `online_hadamard` adds before a MatMul


def _online_order(block: int) -> None:
    if not hadamard_order(block):
        raise ValueError(f"no Hadamard matrix of order {block} (use 2^a * 12^b)")


def online_matrix(block: int, seed: int = 2) -> np.ndarray:
    """The b x b randomized Hadamard matrix diag(d) H_b that `online_hadamard` applies (orthonormal)."""
    _online_order(block)
    return np.random.default_rng(seed).choice([-1.0, 1.0], block)[:, None] * hadamard(block)


def online_hadamard(model: onnx.ModelProto, matmuls: list[str], block: int = 128, seed: int = 2) -> dict:
    """QuaRot's online rotation, in place, before each named weight MatMul (meant for the gated-MLP products, the
    down_proj inputs, which no folded rotation reaches: SwiGLU's nonlinearity sits between up_proj and
    down_proj). Its input X (..., K) is rotated in blocks, X -> reshape(X, (..., K/b, b)) @ diag(d) H_b, flattened
    back, and its weight absorbs the inverse, W -> R^T W with R = I_{K/b} (x) diag(d) H_b: exact in float.

    Per-tensor int8 needs every channel of a token on a similar scale; the rotation mixes each channel with the
    b - 1 others of its block. Channels 1000x the rest must be split off first (smoothing's `outlier_channels`),
    or the rotation smears them over their whole block. One b x b matrix (64 KB at b=128, random signs d) serves
    every MatMul; it is 3-D (1, b, b), so it is not a weight MatMul to quantize. Costs three float ops and
    K*b multiply-adds per token per MatMul (a seventh of a 1536 x 576 down_proj's at b=128).
    Returns {"block", "matmuls": rotated names, "skipped": name -> why}.
    """
    _online_order(block)  # refused up front, though the matrix is built only once some MatMul takes it
    g = GraphIndex.of(model)
    rotation = None  # built once some MatMul takes it: a block wider than every input builds nothing
    matrix = f"{ONLINE_SUFFIX.strip('/')}.{block}"
    nodes = g.nodes
    done, skipped, added, shapes = [], {}, {}, set()
    for name in matmuls:
        node = nodes[name]
        k = int(g.inits[node.input[1]].dims[0]) if _private_weight(g, node) else 0
        if not k or k % block:
            skipped[name] = "shared weight" if not k else f"{k} inputs are not a multiple of {block}"
            continue
        if rotation is None:
            rotation = online_matrix(block, seed)
        rescale(g.inits[node.input[1]],
                lambda w: np.einsum("ba,kbn->kan", rotation, w.astype(np.float64).reshape(k // block, block, -1))
                .reshape(k, -1))
        p = f"{name}{ONLINE_SUFFIX}"
        shapes.add(k // block)
        added[name] = [helper.make_node("Reshape", [node.input[0], f"{matrix}.blocks{k // block}"], [f"{p}/blocks"],
                                        name=f"{p}/reshape"),
                       helper.make_node("MatMul", [f"{p}/blocks", matrix], [f"{p}/rotated"], name=f"{p}/matmul"),
                       helper.make_node("Reshape", [f"{p}/rotated", f"{matrix}.flat"], [f"{p}/x"], name=f"{p}/flat")]
        node.input[0] = f"{p}/x"
        done.append(name)
    if done:
        model.graph.initializer.extend([numpy_helper.from_array(rotation[None].astype(np.float32), matrix),
                                        numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{matrix}.flat")])
        model.graph.initializer.extend(numpy_helper.from_array(np.array([0, 0, count, block], np.int64),
                                                               f"{matrix}.blocks{count}") for count in sorted(shapes))
        g.insert_before(added)
    return {"block": block, "matmuls": done, "skipped": skipped}


def rotate(model: onnx.ModelProto, seed: int = 0) -> RotationReport:
    """R1 then R2, in place (see the module docstring)."""
    reason = rotate_residual(model, seed)
    return RotationReport(reason is None, rotate_values(model, seed + 1), reason)

"""Where a decode step's time goes: the memory floor, the weight MatMuls alone, everything else, the whole step.

    python benchmarks/decode_floor.py runs/smol/variants/w8a8/model.onnx runs/smol/variants/w4/model.onnx

For each model, in one process and in alternating rounds so that all see the same machine:

    memory   one pass over as many bytes as the model's weight MatMuls hold (numpy max over a uint64 view, one
             thread): what reading the weights once costs on this machine
    matmuls  a graph of only the model's weight MatMuls (same initializers, so the same onnxruntime kernels:
             QuantizeLinear + MatMulIntegerToFloat for QDQ int8, MatMulNBits, float MatMul), each fed its own
             input: the kernels' share of a step (pipeline's StaticInt8MatMul and BlockInt8MatMul too, with
             its library; block scales stored as float16 come with the Cast nodes that widen them)
    rest     the model with every weight MatMul replaced by a shape-only op (Pad / Slice / Identity), driven
             by the same decode loop: norms, attention, activations, quantize ops, dispatch, the Python loop
    step     the model's own decode step (the `pipeline bench` figure)

A weight MatMul multiplies by a 2-D constant of at least 65,536 values (int8 through DequantizeLinear,
MatMulNBits' packed blocks, StaticInt8MatMul's packed panels, BlockInt8MatMul's blocks, or float); smaller ones
(the online Hadamard, the outlier split) stay in `rest`.
Timings only: the `rest` graph computes nothing meaningful.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.optimize import remove_dead_nodes  # noqa: E402
from runtimes.bench import greedy_calls, timed_run  # noqa: E402
from runtimes.generate import Generator  # noqa: E402
from runtimes.session import open_session, session_options  # noqa: E402

MIN_WEIGHT_VALUES = 1 << 16


@dataclass
class WeightMatMul:
    node: onnx.NodeProto       # the MatMul / MatMulNBits / StaticInt8MatMul / BlockInt8MatMul
    x: str                     # its float activation input (before any QuantizeLinear)
    k: int
    n: int
    weight_nodes: list         # DequantizeLinear of the weight (QDQ), none otherwise
    quantize: onnx.NodeProto | None  # the activation's QuantizeLinear (QDQ), None otherwise
    nbytes: int


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _constants(name: str, inits: dict, producer: dict) -> list[onnx.NodeProto] | None:
    """The nodes that compute `name` from initializers alone (block scales stored as float16 behind a Cast, a
    K-quant's sub-block product), in order; [] for an initializer, None where a graph input feeds it."""
    if name in inits or not name:
        return []
    node = producer.get(name)
    if node is None:
        return None
    chain = []
    for i in node.input:
        sub = _constants(i, inits, producer)
        if sub is None:
            return None
        chain += [n for n in sub if n not in chain]
    return chain + [node]


def _stored_bytes(node: onnx.NodeProto, inits: dict, producer: dict) -> int:
    """Bytes of the initializers a weight op reads, directly or through constant nodes (its scales)."""
    names = set()
    for i in node.input[1:]:
        names.update(n for c in (_constants(i, inits, producer) or []) for n in c.input if n in inits)
        names.update([i] if i in inits else [])
    return sum(int(np.prod(inits[n].dims)) * helper.tensor_dtype_to_np_dtype(inits[n].data_type).itemsize
               for n in names)


def weight_matmuls(model: onnx.ModelProto) -> list[WeightMatMul]:
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            k, n = _attr(node, "K"), _attr(node, "N")
            found.append(WeightMatMul(node, node.input[0], k, n, [], None, _stored_bytes(node, inits, producer)))
        elif node.op_type == "BlockInt8MatMul":  # pipeline's block kernel: (N, K/32, 32) blocks, or packed codes
            attrs = {a.name: a for a in node.attribute}
            if "K" in attrs:
                k, n = attrs["K"].i, sum(attrs["rows"].ints)
            else:
                rows, groups, width = inits[node.input[1]].dims
                k, n = groups * width, rows
            found.append(WeightMatMul(node, node.input[0], k, n, [], None, _stored_bytes(node, inits, producer)))
        elif node.op_type == "StaticInt8MatMul":  # pipeline's native kernel: w_packed (N/16, K/4, 64)
            panels, groups, _ = inits[node.input[1]].dims
            found.append(WeightMatMul(node, node.input[0], 4 * groups, 16 * panels, [], None, 64 * panels * groups))
        elif node.op_type == "MatMul":
            w = node.input[1]
            dq = producer.get(w)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                weight, weight_nodes = inits[dq.input[0]], [dq]
            elif w in inits:
                weight, weight_nodes = inits[w], []
            else:
                continue
            if len(weight.dims) != 2 or weight.dims[0] * weight.dims[1] < MIN_WEIGHT_VALUES:
                continue
            x, quantize = node.input[0], None
            adq = producer.get(x)
            if adq is not None and adq.op_type == "DequantizeLinear" and adq.input[0] in producer \
                    and producer[adq.input[0]].op_type == "QuantizeLinear":
                quantize = producer[adq.input[0]]
                x = quantize.input[0]
            itemsize = 4 if weight.data_type == TensorProto.FLOAT else 1
            found.append(WeightMatMul(node, x, weight.dims[0], weight.dims[1], weight_nodes, quantize,
                                      weight.dims[0] * weight.dims[1] * itemsize))
    return found


def _save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


def matmuls_only(model: onnx.ModelProto, mms: list[WeightMatMul], path: Path) -> None:
    """Each weight MatMul with its own float input; same initializers, same quantize/dequantize around it."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes, inputs, outputs, used = [], [], [], set()
    for i, mm in enumerate(mms):
        x = f"x{i}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1, mm.k]))
        rename = {mm.x: x}
        chain = [mm.quantize, producer[mm.node.input[0]]] if mm.quantize else []  # the activation's Q, DQ
        for name in mm.node.input[1:]:  # constant nodes before the weight op (float16 scales' Cast)
            chain += [c for c in _constants(name, inits, producer) or [] if c not in chain]
        chain += mm.weight_nodes + [mm.node]
        for n in chain:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            copy.name = f"{n.name}_{i}"
            for j, name in enumerate(copy.input):
                if name in rename:
                    copy.input[j] = rename[name]
                elif name in inits:
                    used.add(name)
            for j, name in enumerate(copy.output):
                rename[name] = copy.output[j] = f"{name}_{i}"
            nodes.append(copy)
        outputs.append(helper.make_tensor_value_info(rename[mm.node.output[0]], TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "weight_matmuls", inputs, outputs, [inits[n] for n in sorted(used)])
    out = helper.make_model(graph, opset_imports=model.opset_import)
    out.ir_version = model.ir_version
    _save(out, path)


def without_matmuls(model: onnx.ModelProto, mms: list[WeightMatMul], path: Path) -> None:
    """The model with each weight MatMul replaced by a shape-only op on its float input; dead nodes dropped."""
    graph = model.graph
    replaced = {mm.node.output[0]: mm for mm in mms}
    nodes = []
    for node in graph.node:
        mm = replaced.get(node.output[0])
        if mm is None:
            nodes.append(node)
            continue
        name, out = node.name + "/shape_only", node.output[0]
        if mm.n > mm.k:
            pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, mm.n - mm.k], np.int64), name + "/pads")
            graph.initializer.append(pads)
            nodes.append(helper.make_node("Pad", [mm.x, pads.name], [out], name=name))
        elif mm.n < mm.k:
            consts = [numpy_helper.from_array(np.array([v], np.int64), f"{name}/{c}")
                      for c, v in (("starts", 0), ("ends", mm.n), ("axes", -1))]
            graph.initializer.extend(consts)
            nodes.append(helper.make_node("Slice", [mm.x] + [c.name for c in consts], [out], name=name))
        else:
            nodes.append(helper.make_node("Identity", [mm.x], [out], name=name))
    del graph.node[:]
    graph.node.extend(nodes)
    remove_dead_nodes(model)  # what only fed the replaced MatMuls (their quantize / dequantize nodes)
    _save(model, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model.onnx files (a run's variants)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=6, help="alternating rounds; medians are over rounds")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import onnxruntime as ort

    tmp = Path(tempfile.mkdtemp(prefix="decode_floor_"))
    cases = {}
    for index, path in enumerate(a.models):
        model = onnx.load(path)
        mms = weight_matmuls(model)
        if not mms:
            sys.exit(f"{path}: no weight MatMuls found")
        nbytes = sum(m.nbytes for m in mms)
        mm_path, rest_path = tmp / f"{index}_matmuls.onnx", tmp / f"{index}_rest.onnx"
        matmuls_only(model, mms, mm_path)
        without_matmuls(model, mms, rest_path)
        options = session_options(a.threads)  # registers the native kernel library where it is built
        kernels = ort.InferenceSession(str(mm_path), options, providers=["CPUExecutionProvider"])
        feed = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(np.float32)
                for i in kernels.get_inputs()}
        cases[path] = dict(count=len(mms), nbytes=nbytes, buffer=np.ones(nbytes // 8, np.uint64),
                           kernels=kernels, feed=feed,
                           rest=Generator(open_session(rest_path, threads=a.threads)),
                           step=Generator(open_session(path, threads=a.threads)))
    vocab = open_session(a.models[0], threads=1).contract.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, (1, a.prompt_len))

    def median_ms(fn, n=20) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1e3

    def decode_ms(g: Generator) -> float:
        return float(np.median(timed_run(*greedy_calls(g, prompt, a.new_tokens), a.new_tokens).steps)) * 1e3

    parts = ("memory", "matmuls", "rest", "step")
    times = {path: {part: [] for part in parts} for path in cases}
    for c in cases.values():  # warm-up
        c["kernels"].run(None, c["feed"])
        decode_ms(c["rest"]), decode_ms(c["step"])
    for _ in range(a.repeats):
        for path, c in cases.items():
            t = times[path]
            t["memory"].append(median_ms(c["buffer"].max))
            t["matmuls"].append(median_ms(lambda: c["kernels"].run(None, c["feed"])))
            t["rest"].append(decode_ms(c["rest"]))
            t["step"].append(decode_ms(c["step"]))
    print(f"{a.prompt_len}-token prompt, {a.new_tokens} decode steps, {a.threads} threads, "
          f"medians over {a.repeats} alternating rounds (ms)")
    print(f"{'model':<44} {'MatMuls':>7} {'MB':>7} {'memory':>7} {'matmuls':>8} {'rest':>6} {'step':>6} "
          f"{'mem/mm':>7} {'(mm+rest)/step':>15}")
    for path, c in cases.items():
        m = {part: float(np.median(v)) for part, v in times[path].items()}
        print(f"{path:<44} {c['count']:>7} {c['nbytes'] / 1e6:>7.1f} {m['memory']:>7.2f} {m['matmuls']:>8.2f} "
              f"{m['rest']:>6.2f} {m['step']:>6.2f} {m['memory'] / m['matmuls']:>7.2f} "
              f"{(m['matmuls'] + m['rest']) / m['step']:>15.2f}")


if __name__ == "__main__":
    main()

"""One session that evaluates any mix of quantized and float MatMuls: what makes the budget search affordable."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import onnx
from onnx import helper

from exporters.calibration import cpu_session, session_contract
from exporters.graph import GraphIndex
from exporters.onnx_io import save_beside, save_model_auto
from exporters.quantization.evaluate import log_probs, perplexity_of, sequences
from exporters.quantization.nbits import NBitsConfig, PackedOf, nbits_node, write_nbits


class QuantSwitch:
    """The float model with each target MatMul's int8 rounding behind its own on/off input.

    Every target becomes `If(gate)` between the float MatMul and the MatMul of its int8 form, `DQ(Q(x))` against
    `DQ(w)` with the exact scales, zero points and int8 weights of the all-int8 graph, so one session evaluates
    any mix of int8 and float MatMuls (what the int8 kernels compute, up to float rounding) without writing or
    loading a model per mix. That makes quantize-one-at-a-time sensitivity affordable at 200+ MatMuls, and the
    budget search cheap. Only the chosen branch runs, when its input is ready, so a dequantized weight lives
    for its own MatMul only. (Gating each input with `Where` instead computes both; and since the weight's
    `DQ` and `Where` wait on no activation, onnxruntime ran them all first, holding two float copies of every
    weight: a Llama-3.2-1B search past 22 GB.) The session does not prepack: the float weights stay in the
    map of their data file.
    """

    def __init__(self, fp32: onnx.ModelProto, int8: onnx.ModelProto, targets: list[str], workdir: Path,
                 weights_dir: Path | None = None):
        g = GraphIndex(int8)
        inits, made_by, int8_nodes = g.inits, g.producers, g.nodes

        def route(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
            a_dq, w_dq = (made_by[i] for i in int8_nodes[node.name].input[:2])
            return self._switch(model, node, a_dq, w_dq, inits)

        self._build(fp32, targets, route, workdir, weights_dir)

    def _build(self, fp32: onnx.ModelProto, targets: list[str],
               route: Callable[[onnx.ModelProto, onnx.NodeProto], list[onnx.NodeProto]], workdir: Path,
               weights_dir: Path | None = None) -> None:
        """Insert `route`'s nodes before every target, add one boolean gate input per target, open a session
        (`fp32`'s weights still in external data are read from `weights_dir`, beside which it is saved)."""
        self.gates = {name: f"quant_switch.{i}" for i, name in enumerate(targets)}
        nodes = []
        for node in fp32.graph.node:
            nodes += route(fp32, node) if node.name in self.gates else [node]
        GraphIndex(fp32).set_nodes(nodes)
        fp32.graph.input.extend(helper.make_tensor_value_info(g, onnx.TensorProto.BOOL, [])
                                for g in self.gates.values())
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in fp32.graph.initializer):
            path = weights_dir / f".switch-{uuid.uuid4().hex}.onnx"
            save_beside(fp32, path)
            try:
                self.session = cpu_session(path, prepack=False)
            finally:
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".data").unlink(missing_ok=True)
        else:
            path = workdir / "switch.onnx"
            save_model_auto(fp32, path)
            self.session = cpu_session(path, prepack=False)
        self.contract = session_contract(self.session)

    def _switch(self, model: onnx.ModelProto, node: onnx.NodeProto, a_dq: onnx.NodeProto, w_dq: onnx.NodeProto,
                inits: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
        """`node` as an `If` on its gate: its int8 form (copies of the int8 graph's Q/DQ parameters) or itself."""
        gate, tag = self.gates[node.name], self.gates[node.name] + "."
        for name in {*a_dq.input[1:], *w_dq.input}:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = tag + name
            model.graph.initializer.append(copy)
        a_params, w_params = [tag + n for n in a_dq.input[1:]], [tag + n for n in w_dq.input]
        x, w, y = node.input[0], node.input[1], node.output[0]
        int8 = [helper.make_node("QuantizeLinear", [x, *a_params], [tag + "xq"]),
                helper.make_node("DequantizeLinear", [tag + "xq", *a_params], [tag + "xdq"]),
                helper.make_node("DequantizeLinear", w_params, [tag + "wdq"], axis=_axis(w_dq)),
                helper.make_node("MatMul", [tag + "xdq", tag + "wdq"], [tag + "int8"])]
        float_ = [helper.make_node("MatMul", [x, w], [tag + "float"])]
        then, other = (helper.make_graph(n, f"{node.name}.{kind}", [], [helper.make_tensor_value_info(
            tag + kind, onnx.TensorProto.FLOAT, None)]) for n, kind in ((int8, "int8"), (float_, "float")))
        return [helper.make_node("If", [gate], [y], name=node.name, then_branch=then, else_branch=other)]

    def close(self) -> None:
        """Let the session's memory go (the search is done with the switch before it writes and measures)."""
        self.session = None

    def log_probs(self, ids: np.ndarray, in_int8: Collection[str]) -> np.ndarray:
        gates = {g: np.array(name in in_int8) for name, g in self.gates.items()}
        return log_probs(self.session, self.contract, ids, gates)

    def perplexity(self, ids_list: list[list[int]], in_int8: Collection[str]) -> float:
        return perplexity_of(lambda ids: self.log_probs(ids, in_int8), sequences(ids_list, self.contract))


def _axis(dq: onnx.NodeProto) -> int:
    return next((a.i for a in dq.attribute if a.name == "axis"), 1)


class NBitsSwitch(QuantSwitch):
    """The weight-only model with each gated MatMul as an `If` between its MatMulNBits at `low` bits (gate on)
    and at `high` (gate off; 5-7 are narrow codes in 8-bit blocks), both read from the packed store: the search
    evaluates any mix exactly as it would be written, holding packed weights only (a float copy and float
    stand-ins were 8 bytes a weight). Only the chosen branch runs, so a forward costs what the written model's
    does. `fixed` MatMuls are written at their bits outright (a 4-bit model's 8-bit head); `finish` then does to
    the graph what the writer does after its MatMuls (the embedding's int8 blocks, or its gathering the head's),
    so every mix is the model written."""

    def __init__(self, model: onnx.ModelProto, gated: list[str], fixed: dict[str, int], packed_of: PackedOf,
                 config: NBitsConfig, workdir: Path, weights_dir: Path, low: int = 4, high: int = 8,
                 finish: Callable[[onnx.ModelProto], None] = lambda m: None):
        self.gates = {name: f"quant_switch.{i}" for i, name in enumerate(gated)}
        # the model written with every gated MatMul at `high` bits (8-bit MatMulNBits: narrower codes are stored
        # in 8-bit blocks); each of those then becomes the `If`'s else branch
        out = write_nbits(model, {**dict.fromkeys(gated, high), **fixed}, config, packed_of, weights_dir)
        floats, written = GraphIndex(model).nodes, {n.name: n for n in out.graph.node}
        for name, gate in self.gates.items():
            upper = written[f"{name}_Q8"]
            y = upper.output[0]
            lower, inits = nbits_node(floats[name], packed_of(name, low), config, outputs=[f"{y}.q{low}"])
            lower.input[2] = inits[1].name = f"{inits[1].name}_Q{low}"  # the 8-bit scales keep the plain name
            out.graph.initializer.extend(inits)
            upper.output[0] = f"{y}.q{high}"
            then, other = (helper.make_graph([n], f"{name}.q{b}", [], [helper.make_tensor_value_info(
                n.output[0], onnx.TensorProto.FLOAT, None)]) for n, b in ((lower, low), (upper, high)))
            upper.CopyFrom(helper.make_node("If", [gate], [y], name=name, then_branch=then, else_branch=other))
        out.graph.input.extend(helper.make_tensor_value_info(gate, onnx.TensorProto.BOOL, [])
                               for gate in self.gates.values())
        finish(out)
        path = workdir / "switch.onnx"
        save_model_auto(out, path, shipped=True)
        del out
        self.session = cpu_session(path)
        self.contract = session_contract(self.session)

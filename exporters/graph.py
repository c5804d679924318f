"""One index over an ONNX graph, as onnxruntime's OnnxModel keeps it: which node writes a tensor, which nodes
read it, initializers and nodes by name, how often a tensor is read. Passes build it once, read it, and use its
helpers to rewrite; a pass that changes the wiring builds a fresh one.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# consumers that read only the shape of a tensor (the plain export takes `x.shape` in attention): scaling is safe
SHAPE_ONLY_OPS = ("Shape", "Size")


# the hidden x hidden map a static int8 model's embedding applies to the head's int8 columns it reads as its table
# (exporters/quantization/embedding.py `share_static_head`): part of the token lookup, not a weight MatMul
TABLE_MAP_SUFFIX = "/shared/Map"


class GraphIndex:
    """Maps over `model.graph` at the time it is built (the protos are shared, so in-place edits show)."""

    def __init__(self, model: onnx.ModelProto, skip_readers: Iterable[str] = ()):
        self.model = model
        skip = set(skip_readers)
        self.inits: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
        self.nodes: dict[str, onnx.NodeProto] = {n.name: n for n in model.graph.node}
        self.producers: dict[str, onnx.NodeProto] = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}  # readers, those of op types in `skip_readers` left out
        for n in model.graph.node:
            if n.op_type not in skip:
                for name in n.input:
                    self.consumers.setdefault(name, []).append(n)
        self.uses = Counter(i for n in model.graph.node for i in n.input)  # every reader, by tensor name
        self.weight_names = {n.name for n in self.weight_matmuls()}

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "GraphIndex":
        """The index smoothing and rotation read: readers of a tensor's shape alone are not its consumers."""
        return cls(model, SHAPE_ONLY_OPS)

    # onnxruntime OnnxModel's names for the two maps
    @property
    def output_name_to_node(self) -> dict[str, onnx.NodeProto]:
        return self.producers

    @property
    def input_name_to_nodes(self) -> dict[str, list[onnx.NodeProto]]:
        return self.consumers

    def initializer(self, name: str) -> TensorProto | None:
        return self.inits.get(name)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def only_reader(self, tensor: str, node: onnx.NodeProto) -> bool:
        return [c.name for c in self.consumers.get(tensor, [])] == [node.name]

    def weight_matmuls(self) -> list[onnx.NodeProto]:
        """MatMuls whose B is a 2-D float initializer: the projections and lm_head. Attention-score and rotary
        MatMuls multiply two activations, so they are never in this list; nor is the map of a tied table read
        from the head (TABLE_MAP_SUFFIX), which is part of the token lookup."""
        return [n for n in self.model.graph.node
                if n.op_type == "MatMul" and n.input[1] in self.inits and len(self.inits[n.input[1]].dims) == 2
                and self.inits[n.input[1]].data_type == TensorProto.FLOAT and not n.name.endswith(TABLE_MAP_SUFFIX)]

    def weight_shapes(self) -> dict[str, tuple[int, int]]:
        """(K, N) of each weight MatMul's weight, by node name."""
        return {n.name: tuple(self.inits[n.input[1]].dims) for n in self.weight_matmuls()}

    def constant_source(self, name: str) -> TensorProto | None:
        """The initializer behind `name`, following Identity nodes: the PyTorch exporter deduplicates equal
        parameters (every norm weight of a fresh model is all ones) into one initializer plus Identity copies."""
        while name not in self.inits and name in self.producers and self.producers[name].op_type == "Identity":
            name = self.producers[name].input[0]
        return self.inits.get(name)

    def replace_initializer(self, name: str, value: np.ndarray) -> None:
        """The initializer `name` now holds `value` (same name, in place)."""
        self.inits[name].CopyFrom(numpy_helper.from_array(value, name))

    def add_initializer(self, tensor: TensorProto) -> TensorProto:
        self.model.graph.initializer.append(tensor)
        self.inits[tensor.name] = self.model.graph.initializer[-1]
        return self.inits[tensor.name]

    def remove_unused_initializers(self) -> None:
        """Drop the initializers no node reads (counted afresh)."""
        used = Counter(i for n in self.model.graph.node for i in n.input)
        keep = [t for t in self.model.graph.initializer if used[t.name]]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(keep)

    def insert_before(self, added: dict[str, list[onnx.NodeProto]]) -> None:
        """Put `added[name]` right before the node `name`, keeping the graph in topological order."""
        order = []
        for n in self.model.graph.node:
            order += added.get(n.name, []) + [n]
        self.set_nodes(order)

    def set_nodes(self, nodes: list[onnx.NodeProto]) -> None:
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)


class Rescaler(Protocol):
    def read(self, tensor: TensorProto) -> np.ndarray: ...
    def rescale(self, tensor: TensorProto, fn: Callable[[np.ndarray], np.ndarray]) -> None: ...


_EXTERNAL = ContextVar("external_rescaler", default=None)


@contextmanager
def rescaling_external(rescaler: Rescaler) -> Iterator[Rescaler]:
    """Within it, `rescale` hands tensors that still live in external data to `rescaler`
    (exporters/onnx_io.py `ExternalRewriter`) instead of reading them into the graph."""
    token = _EXTERNAL.set(rescaler)
    try:
        yield rescaler
    finally:
        _EXTERNAL.reset(token)


def weight_array(tensor: TensorProto) -> np.ndarray:
    """The tensor's values; one in external data read by the `rescaling_external` rescaler (which knows where
    a tensor it has already rewritten now lies)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        rescaler = _EXTERNAL.get()
        if rescaler is None:
            raise ValueError(f"{tensor.name} lives in external data: read it within rescaling_external(...)")
        return rescaler.read(tensor)
    return numpy_helper.to_array(tensor)


def rescale(tensor: TensorProto, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """tensor <- fn(tensor), stored as float32 (one in external data: by the `rescaling_external` rescaler)."""
    if tensor.data_location == TensorProto.EXTERNAL:
        rescaler = _EXTERNAL.get()
        if rescaler is None:
            raise ValueError(f"{tensor.name} lives in external data: rescale it within rescaling_external(...)")
        rescaler.rescale(tensor, fn)
        return
    tensor.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(tensor)).astype(np.float32), tensor.name))


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """`GraphIndex.weight_matmuls` of a model not otherwise indexed."""
    return GraphIndex(model).weight_matmuls()

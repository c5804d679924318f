"""torch -> ONNX with KV cache: one graph for prefill (empty past) and decode, validated against PyTorch.

Layers: `ExportWrapper` flattens the cache into named tensors, `export_onnx` captures it with torch.export (the
ONNX exporter's `dynamo=True` path, not the deprecated TorchScript tracer), names its nodes by module scope and
writes atomically, `validate_export` runs onnx.checker and a prefill + decode parity run that names the output
that differs.
"""

from __future__ import annotations

import ast
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from exporters.onnx_io import EXTERNAL_DATA_THRESHOLD, model_files, move_model, save_model, \
    save_model_auto  # noqa: F401 (re-exported: they lived here)
from models.decoder import Decoder
from models.errors import UserError
from models.files import staging_dir
from exporters.builder import contract_for_config
from models.rope import rope_kind
from runtimes.contract import Contract, write_contract

OPSET = 18  # the lowest torch.export's ONNX exporter writes


def contract_for(model: Decoder) -> Contract:
    """Every field of the contract, from the decoder's config (the unfused graph's: attention not fused)."""
    return contract_for_config(model.config, fused=False)


class ExportWrapper(torch.nn.Module):
    """Flat positional signature for tracing: (input_ids, attention_mask, position_ids, k0, v0, k1, v1, ...)."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pkv = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.model(input_ids, attention_mask, position_ids, pkv)
        return (logits, *[t for kv in present for t in kv])


def example_inputs(contract: Contract, batch: int, seq: int, past: int, vocab: int,
                   seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, contract.num_kv_heads, past, contract.head_dim, generator=g).to(dtype)
          for _ in range(2 * contract.num_layers)]
    return (ids, mask, pos, *kv)


def dynamic_shapes(contract: Contract) -> tuple:
    """torch.export's spec of `ExportWrapper`'s inputs: batch, sequence and past length free (the attention
    mask's length is their sum, which export finds itself)."""
    from torch.export import Dim

    free = Dim.DYNAMIC
    tokens = {0: free, 1: free}
    return tokens, tokens, tokens, tuple({0: free, 2: free} for _ in range(2 * contract.num_layers))


def scope_of(node: onnx.NodeProto) -> list[str]:
    """The module path torch.export recorded for a node, as attribute names: ["model", "layers.0", "attn"]."""
    scopes = next((ast.literal_eval(p.value) for p in node.metadata_props
                   if p.key == "pkg.torch.onnx.name_scopes"), [])
    if not scopes or scopes[0] != "":  # the wrapper's scope is "": nodes outside every module have none
        return []
    modules = scopes[1:-1]  # the last entry names the op
    return [m[len(prev) + 1:] if prev else m for prev, m in zip([""] + modules, modules)
            if not prev or m.startswith(prev + ".")]


def name_by_scope(proto: onnx.ModelProto, contract: Contract) -> None:
    """Node names as module scopes, `/model/layers.0/attn/q_proj/MatMul` (`_1`, `_2` ... when repeated), and the
    contract's axis names on inputs and outputs: the names fusion finds each layer's projections by, and those
    the built graph uses. A node the exporter's optimizer added has no scope: it takes its first input's."""
    seen: dict[str, int] = {}
    produced_in: dict[str, list[str]] = {}
    tables: list[tuple[onnx.NodeProto, list[str]]] = []
    for node in proto.graph.node:
        scope = scope_of(node) or next((produced_in[i] for i in node.input if i in produced_in), [])
        produced_in.update((o, scope) for o in node.output)
        if node.op_type == "Gather" and scope:
            tables.append((node, scope))
        base = "/" + "/".join(scope + [node.op_type])
        count = seen.get(base, 0)
        seen[base] = count + 1
        node.name = base if count == 0 else f"{base}_{count}"
    # a tied table is one parameter with two names, and the exporter keeps the head's: the embedding's Gather
    # reads it under the embedding's name, as the TorchScript export named it
    inits = {t.name: t for t in proto.graph.initializer}
    for node, scope in tables:
        old, new = node.input[0], ".".join(scope + ["weight"])
        if old in inits and new not in inits:
            inits[old].name = new
            for reader in proto.graph.node:
                reader.input[:] = [new if i == old else i for i in reader.input]
    axes = contract.dynamic_axes()
    for value in [*proto.graph.input, *proto.graph.output]:
        for axis, label in axes.get(value.name, {}).items():
            value.type.tensor_type.shape.dim[axis].dim_param = label


def fold_transposed_weights(proto: onnx.ModelProto) -> int:
    """Transposes of initializers become initializers (the exporter leaves one where the tensor has another
    reader, as a tied head's table has in the embedding's Gather), so every weight MatMul reads a constant, as
    fusion and quantization expect; a source nothing else reads goes. Returns how many were folded."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    folded = [n for n in g.node if n.op_type == "Transpose" and n.input[0] in inits]
    for n in folded:
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        g.initializer.append(numpy_helper.from_array(np.transpose(numpy_helper.to_array(inits[n.input[0]]), perm),
                                                     n.output[0]))
        g.node.remove(n)
    read = {i for n in g.node for i in n.input}
    for source in {n.input[0] for n in folded} - read:
        g.initializer.remove(inits[source])
    return len(folded)


def trace(model: Decoder, contract: Contract) -> onnx.ModelProto:
    """`model` captured by torch.export and written as ONNX by onnxscript, constant-folded, nodes named by scope."""
    # past length 3 and sequence 2 while tracing, so no axis is specialised to 0 or 1
    args = example_inputs(contract, batch=2, seq=2, past=3, vocab=contract.vocab_size)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision ops
    with torch.no_grad(), warnings.catch_warnings():
        # torch.export deep-copies its own pytree specs, which trips a deprecation check inside torch
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.onnx.export(ExportWrapper(model).eval(), args, None, dynamo=True, opset_version=OPSET,
                                    input_names=contract.input_names(), output_names=contract.output_names(),
                                    dynamic_shapes=dynamic_shapes(contract), optimize=True, verbose=False)
    proto = program.model_proto
    fold_transposed_weights(proto)
    name_by_scope(proto, contract)
    return proto


def _model_bytes(model: Decoder) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_onnx(model: Decoder, out_path: str | Path, validate: bool = True) -> Contract:
    """Export `model` to `out_path` (plus `out_path.data` when over 2 GB); returns the I/O contract.

    Written into a temporary directory beside the target and renamed into place, so an interrupted export
    never leaves a half-written model behind.
    """
    out_path = Path(out_path)
    model = model.eval().float()
    if rope_kind(model.config.rope_scaling) == "longrope":
        raise UserError("LongRoPE switches its rotary factors with the sequence length, which a traced graph "
                        "cannot follow: export with --graph built (the default)")
    contract = contract_for(model)
    with staging_dir(out_path) as tmp:
        proto = trace(model, contract)
        write_contract(proto, contract)
        staged = tmp / out_path.name
        save_model(proto, staged, external=_model_bytes(model) >= EXTERNAL_DATA_THRESHOLD)
        if validate:
            validate_export(model, staged, contract)
        move_model(staged, out_path)
    return contract


@dataclass(frozen=True)
class ParityResult:
    step: str
    max_abs_diff: dict[str, float]

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.max_abs_diff.items(), key=lambda kv: kv[1])


def parity(model: Decoder, onnx_path: Path, contract: Contract, batch: int = 2, seq: int = 5,
           past: int = 0, seed: int = 1) -> ParityResult:
    """Run PyTorch and onnxruntime on the same inputs; max |difference| for every output, by name."""
    from exporters.calibration import cpu_session  # errors only: a default-valued input is not news

    args = example_inputs(contract, batch=batch, seq=seq, past=past, vocab=contract.vocab_size, seed=seed)
    with torch.no_grad():
        ref = ExportWrapper(model.eval())(*args)
    sess = cpu_session(onnx_path)
    wanted = {i.name for i in sess.get_inputs()}
    feeds = {n: a.numpy() for n, a in zip(contract.input_names(), args) if n in wanted}
    got = sess.run(contract.output_names(), feeds)
    diffs = {n: float(np.max(np.abs(r.numpy() - g))) if r.numel() else 0.0
             for n, r, g in zip(contract.output_names(), ref, got)}
    return ParityResult("prefill" if past == 0 else "decode", diffs)


def validate_export(model: Decoder, onnx_path: Path, contract: Contract, atol: float = 1e-3) -> list[ParityResult]:
    """onnx.checker, then parity on a prefill (empty past) and a decode step (past 7, one token)."""
    try:
        onnx.checker.check_model(str(onnx_path))
    except onnx.checker.ValidationError as e:
        raise UserError(f"exported model failed onnx.checker: {str(e).splitlines()[0]}") from e
    results = [parity(model, onnx_path, contract, seq=6, past=0),
               parity(model, onnx_path, contract, seq=1, past=7)]
    for r in results:
        name, diff = r.worst
        if diff > atol:
            raise UserError(f"export parity failed at {r.step}: output {name!r} differs from PyTorch by {diff:.3g} "
                            f"(tolerance {atol})")
    return results

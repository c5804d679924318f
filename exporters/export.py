"""torch -> ONNX with KV cache: one graph for prefill (empty past) and decode, validated against PyTorch.

Layers: `ExportWrapper` flattens the cache into named tensors, `export_onnx` traces and writes atomically,
`validate_export` runs onnx.checker and a prefill + decode parity run that names the output that differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from exporters.onnx_io import EXTERNAL_DATA_THRESHOLD, model_files, move_model, save_model, \
    save_model_auto  # noqa: F401 (re-exported: they lived here)
from models.decoder import Decoder
from models.errors import UserError
from models.files import staging_dir
from exporters.builder import contract_for_config
from models.rope import rope_kind
from runtimes.contract import Contract, write_contract

OPSET = 17


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
    # past length 3 and sequence 2 while tracing, so no axis is specialised to 0 or 1
    args = example_inputs(contract, batch=2, seq=2, past=3, vocab=contract.vocab_size)
    with staging_dir(out_path) as tmp:
        raw = tmp / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(ExportWrapper(model), args, str(raw), dynamo=False, opset_version=OPSET,
                              input_names=contract.input_names(), output_names=contract.output_names(),
                              dynamic_axes=contract.dynamic_axes(), do_constant_folding=True)
        proto = onnx.load(str(raw))
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

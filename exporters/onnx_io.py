"""Reading and writing ONNX files, without torch: inline weights or external data, staged then moved into place.

Every exporters/ module writes models through here, so ONNX -> ONNX passes import no torch (export.py, the one
module that traces a PyTorch model, re-imports these names).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from models.errors import UserError

EXTERNAL_DATA_THRESHOLD = 1 << 31  # protobuf cannot hold a model over 2 GB: weights go to model.onnx.data


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load a model, turning a missing, truncated or corrupt file into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise UserError(f"cannot read ONNX model {path}: the file is corrupt or truncated ({type(e).__name__})") from e


def save_model(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    """Save with weights inline, or in `<name>.data` beside it when the model is too big for protobuf. A data
    file already there is removed first (onnx appends to it, and an inline model must not ship beside a stale
    one), unless the model's tensors still read from it."""
    data = path.with_name(path.name + ".data")
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        data.unlink(missing_ok=True)
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


# a model that ships keeps its weights in model.onnx.data from this size on (as the built float graph does):
# onnxruntime reads an inline model's whole file into a buffer beside the tensors it makes of it, which external
# data avoids (session after load, measured: SmolLM2 gguf 302 -> 257 MB, a Llama-3.2-1B gguf 3034 -> 2321 MB)
SHIPPED_EXTERNAL_THRESHOLD = 1 << 20


def save_model_auto(proto: onnx.ModelProto, path: Path, shipped: bool = False) -> None:
    """Inline weights, or external data once they would not fit in protobuf's 2 GB (or, for a model that
    ships, once they pass SHIPPED_EXTERNAL_THRESHOLD)."""
    threshold = SHIPPED_EXTERNAL_THRESHOLD if shipped else EXTERNAL_DATA_THRESHOLD
    save_model(proto, path, external=sum(t.ByteSize() for t in proto.graph.initializer) >= threshold)


def model_files(path: Path) -> list[Path]:
    """The model file and its external-data file, if it has one."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def files_size(path: Path) -> int:
    """Bytes on disk of the model and its external data."""
    return sum(p.stat().st_size for p in model_files(path))


def move_model(src: Path, dst: Path) -> None:
    """Rename a staged model (and its external data) into place; the .onnx goes last, so it never points at
    missing data."""
    dst_data = dst.with_name(dst.name + ".data")
    src_data = src.with_name(src.name + ".data")
    if src_data.exists():
        os.replace(src_data, dst_data)
    elif dst_data.exists():
        dst_data.unlink()
    os.replace(src, dst)

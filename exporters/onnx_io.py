"""Reading and writing ONNX files, without torch: inline weights or external data, staged then moved into place.

Every exporters/ module writes models through here, so ONNX -> ONNX passes import no torch (export.py, the one
module that traces a PyTorch model, re-imports these names).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from models.errors import UserError

EXTERNAL_DATA_THRESHOLD = 1 << 31  # protobuf cannot hold a model over 2 GB: weights go to model.onnx.data


def unreadable(path: Path, e: Exception) -> UserError:
    if "hard link" in str(e):  # onnx's own guard: a data file reached through another name is refused
        return UserError(f"cannot read ONNX model {path}: onnx refuses its external data file, which has more "
                         "than one hard link; give this copy a file of its own (cp the .data file to a new name "
                         "and move it back over the link)")
    return UserError(f"cannot read ONNX model {path}: the file is corrupt or truncated ({type(e).__name__})")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load a model, turning a missing, truncated or corrupt file into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise unreadable(path, e) from e


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


def tensor_array(tensor: onnx.TensorProto, weights_dir: str | Path = ""):
    """The tensor's values; from its external data file under `weights_dir` when it still lives there."""
    return numpy_helper.to_array(tensor, str(weights_dir))


def materialized(tensor: onnx.TensorProto, weights_dir: str | Path = "") -> onnx.TensorProto:
    """`tensor` itself when its values are in memory; else a copy with them read from its external data."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return tensor
    from onnx.external_data_helper import load_external_data_for_tensor
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    load_external_data_for_tensor(out, str(weights_dir))
    out.data_location = onnx.TensorProto.DEFAULT
    del out.external_data[:]
    return out


class ExternalRewriter:
    """A lazily loaded model's external tensors rewritten into one new data file, `path`.data: each one a pass
    changes (`rescale`, through exporters/graph.py's `rescaling_external`) is read, transformed and appended
    there, and `finish` copies the rest, so that every tensor then reads from `path`'s directory. The model
    proto only ever holds their small location fields: protobuf keeps a field's replaced bytes until the whole
    message goes, so a 1B model's weights rewritten inside it held 23 GB. A tensor rewritten twice leaves its
    first bytes unread in the file (it is scratch: the caller's work directory)."""

    def __init__(self, source_dir: Path, path: Path):
        self.source_dir, self.dir, self.location = source_dir, path.parent, path.name + ".data"
        self.file = open(self.dir / self.location, "wb")
        self.moved: set[str] = set()

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        return tensor_array(tensor, self.dir if tensor.name in self.moved else self.source_dir)

    def write(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if list(values.shape) != list(tensor.dims):
            raise ValueError(f"{tensor.name}: {values.shape} does not fit its dims {list(tensor.dims)}")
        offset = self.file.tell()
        self.file.write(values.tobytes())
        del tensor.external_data[:]
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(values.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.moved.add(tensor.name)

    def rescale(self, tensor: onnx.TensorProto, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.write(tensor, fn(self.read(tensor)).astype(np.float32))

    def finish(self, model: onnx.ModelProto) -> None:
        """Copy the external tensors no pass changed, and close the file."""
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in self.moved:
                self.write(t, self.read(t))
        self.file.close()


def load_lazily(path: Path, lazy: Callable[[onnx.ModelProto], set[str]]) -> onnx.ModelProto:
    """The model with the initializers named by `lazy(graph)` left in its external data file (read when used,
    through `tensor_array` / `materialized` with the model's directory), every other one in memory. A model
    with its weights inline is loaded whole."""
    if len(model_files(path)) == 1:
        return load_onnx(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
        keep = lazy(model)
        left = []
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in keep:
                t.CopyFrom(materialized(t, path.parent))
            elif t.data_location == onnx.TensorProto.EXTERNAL:
                left.append(t)
        # what is left is read later: its data must be there now (a short file fails here, not mid-stage), and
        # one read passes onnx's own checks on the file (a path outside the model's directory, hard links)
        for t in left:
            where = {e.key: e.value for e in t.external_data}
            end = int(where.get("offset", 0)) + int(where.get("length", 0))
            if end > (path.parent / where["location"]).stat().st_size:
                raise ValueError(f"{t.name} lies past the end of {where['location']}")
        if left:
            tensor_array(min(left, key=lambda t: int(np.prod(t.dims))), path.parent)
    except Exception as e:  # protobuf DecodeError, missing or short external data, ...
        raise unreadable(path, e) from e
    return model


def skeleton(model: onnx.ModelProto, nodes: bool = False) -> onnx.ModelProto:
    """A copy of `model` without its graph's initializers (the large field), and without its nodes unless
    `nodes`."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer",) if nodes else ("node", "initializer"))
    return out


def copy_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy (a pass that rewrites its graph leaves `model` as it was)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`'s graph without its initializers, as a new message: clearing the field in place would keep their
    memory (protobuf's arena) for as long as the message lives."""
    return skeleton(model, nodes=True)


def _copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def save_beside(model: onnx.ModelProto, path: Path) -> None:
    """Save `model` at `path` without changing it (onnx.save_model's external data rewrites the message): the
    initializers still in external data keep their references, so `path` must lie beside the files they name
    (the model they were loaded from); those in memory go to `path.name + ".data"` from 1 MiB on, inline below."""
    out = skeleton(model, nodes=True)
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL or t.ByteSize() < SHIPPED_EXTERNAL_THRESHOLD:
                out.graph.initializer.append(t)
                continue
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            f.seek(-f.tell() % 4096, os.SEEK_CUR)
            ref = out.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                            data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data.name), ("offset", f.tell()), ("length", len(raw))):
                ref.external_data.add(key=key, value=str(value))
            f.write(raw)
            del raw
    onnx.save_model(out, str(path))

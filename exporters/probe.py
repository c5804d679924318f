"""Intermediate activations of an ONNX model on calibration feeds, exposed as extra graph outputs for one run.

Smoothing reads their per-channel extremes, GPTQ their input Hessians; both go through `probe`.
"""

from __future__ import annotations

import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from exporters.calibration import cpu_session
from exporters.onnx_io import EXTERNAL_DATA_THRESHOLD, save_beside, save_model
from models.files import remove_tree


Feeds = Iterable[dict[str, np.ndarray]] | Callable[[ort.InferenceSession], Iterable[dict[str, np.ndarray]]]


def probe(model: onnx.ModelProto, tensors: list[str], feeds: Feeds, workdir: Path | None = None,
          weights_dir: Path | None = None) -> Iterator[dict[str, np.ndarray]]:
    """For each feed, the values of the intermediate `tensors`, exposed as extra graph outputs for the run
    (`probe_session`). `feeds` may be a function of the probe session (whose presents then give the decode
    steps' past: exporters/calibration.py `KVCacheCalibrationReader.through`), so no second session is open."""
    with probe_session(model, tensors, workdir, weights_dir) as session:
        for feed in feeds(session) if callable(feeds) else feeds:
            yield dict(zip(tensors, session.run(tensors, feed)))


@contextmanager
def probe_session(model: onnx.ModelProto, tensors: list[str], workdir: Path | None = None,
                  weights_dir: Path | None = None) -> Iterator[ort.InferenceSession]:
    """A session of `model` that also outputs the intermediate `tensors`. The model is saved to a temporary file
    (external data when large, so models over 2 GB work too); the extra outputs are removed from `model` again on
    leaving. A model whose weights still lie in external data under `weights_dir` (exporters/onnx_io.py
    `load_lazily`) is saved beside them, for as long as the session takes to open."""
    outputs = {o.name for o in model.graph.output}
    added = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in dict.fromkeys(tensors)
             if t not in outputs]
    model.graph.output.extend(added)
    lazy = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    tmp = None if lazy else Path(tempfile.mkdtemp(prefix=".probe-", dir=workdir))
    try:
        path = weights_dir / f".probe-{uuid.uuid4().hex}.onnx" if lazy else tmp / "probe.onnx"
        try:
            if lazy:
                save_beside(model, path)
            else:
                save_model(model, path, external=sum(t.ByteSize() for t in model.graph.initializer)
                           >= EXTERNAL_DATA_THRESHOLD)
            session = cpu_session(path, prepack=False)  # weights left in the data file's map
        finally:
            for f in (path, path.with_name(path.name + ".data")) if lazy else ():
                f.unlink(missing_ok=True)
        yield session
    finally:
        if tmp is not None:
            remove_tree(tmp)
        for _ in added:
            model.graph.output.pop()


def input_hessians(model: onnx.ModelProto, tensors: list[str], feeds: Feeds, workdir: Path | None = None,
                   weights_dir: Path | None = None) -> tuple[dict[str, np.ndarray], int]:
    """X^T X over every token of every feed, for each tensor (float64, (K, K)); and the number of tokens."""
    hessians: dict[str, np.ndarray] = {}
    tokens = 0
    for values in probe(model, tensors, feeds, workdir, weights_dir):
        rows = {name: x.reshape(-1, x.shape[-1]).astype(np.float64) for name, x in values.items()}
        for name, x in rows.items():
            h = hessians.setdefault(name, np.zeros((x.shape[1], x.shape[1])))
            h += x.T @ x
        tokens += next(iter(rows.values())).shape[0]  # every tensor has one row per token
    return hessians, tokens

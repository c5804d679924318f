"""The run directory and its manifest.json: what each stage read, with which options, wrote, and measured.

Every artifact is recorded with its parent, the stage that made it, that stage's config and the sha256 of its
files, so any stage can be rerun alone and a bundle can say exactly where its model came from.

    RUN/
      manifest.json
      checkpoint/            pipeline train (HF format)
      tokenizer.json         pipeline export
      variants/<name>/model.onnx[.data]   fp32 (export), fused, fused-fp16 (optimize), w8a8/static/w8/w4
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from models.errors import UserError

MANIFEST = "manifest.json"
SCHEMA = 1


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(paths: list[Path], root: Path) -> dict[str, str]:
    """{path: sha256} for files and every file under directories; paths inside `root` are relative to it."""
    out = {}
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f.relative_to(root)) if f.is_relative_to(root) else str(f)] = sha256(f)
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class RunDir:
    root: Path

    @classmethod
    def open(cls, root: str | Path, create: bool = False) -> "RunDir":
        root = Path(root)
        if not root.is_dir():
            if not create:
                raise UserError(f"run directory not found: {root} (create one with `pipeline export` or `pipeline run`)")
            root.mkdir(parents=True)
        return cls(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def load(self) -> dict:
        if not self.manifest_path.exists():
            return {"schema": SCHEMA, "created": _now(), "artifacts": {}, "stages": []}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.manifest_path} is corrupt ({e.msg} at line {e.lineno})") from e

    def variant_dir(self, name: str) -> Path:
        return self.root / "variants" / name

    def variant_path(self, name: str) -> Path:
        return self.variant_dir(name) / "model.onnx"

    def variants(self) -> list[str]:
        """Recorded ONNX variants whose model file is still there, in the order they were made."""
        arts = self.load()["artifacts"]
        return [k for k, a in arts.items() if a.get("kind") == "onnx" and self.variant_path(k).exists()]

    def artifact(self, name: str) -> dict:
        arts = self.load()["artifacts"]
        if name not in arts:
            have = ", ".join(arts) or "none"
            raise UserError(f"run {self.root} has no artifact {name!r} (has: {have})")
        return arts[name]

    def record(self, stage: str, config: dict, inputs: dict[str, str], outputs: dict[str, dict],
               results: dict) -> None:
        """Append a stage and its artifacts; `outputs` maps artifact name -> {kind, path, parent, ...}."""
        data = self.load()
        for name, art in outputs.items():
            p = self.root / art["path"]
            files = [p] if p.is_dir() else [f for f in p.parent.glob(p.name + "*") if f.is_file()]
            data["artifacts"][name] = {**art, "stage": stage, "config": config,
                                       "files": hash_files(files, self.root), "created": _now()}
        data["stages"].append({"stage": stage, "config": config, "inputs": inputs,
                               "outputs": sorted(outputs), "results": results, "finished": _now()})
        write_json_atomic(self.manifest_path, data)

    def results(self, stage: str) -> dict:
        """The latest results of a stage, {} if it never ran."""
        for s in reversed(self.load()["stages"]):
            if s["stage"] == stage:
                return s["results"]
        return {}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

"""Fault injection for the reliability tests: an OSError at the n-th write a command makes, and the check that a
run directory and its manifest still agree afterwards."""

from __future__ import annotations

import builtins
import io
import json
import os
import sys
from pathlib import Path

from pipeline.manifest import MANIFEST, STAGING_PREFIX, TRASH_PREFIX, sha256

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
MODEL_SUFFIXES = (".onnx", ".onnx.data", ".data", ".safetensors")


class WriteFaults:
    """Counts every write the process makes through Python (open for writing, os.open with a write flag, mkdir of
    a new directory, rename, replace) and raises OSError(`errno`) at write number `fail_at` (0: count only).

    Writes made inside native code (onnxruntime, torch's C++ serializer, safetensors, tokenizers) do not pass
    through Python and are not counted; the real-disk tests (a full tmpfs) cover those.
    """

    def __init__(self, monkeypatch, fail_at: int = 0, err: int = 28):
        self.fail_at, self.err, self.count, self.paths = fail_at, err, 0, []
        real_open, real_os_open = builtins.open, os.open
        real_mkdir, real_rename, real_replace = os.mkdir, os.rename, os.replace

        def hit(path) -> None:
            if isinstance(path, int) or path is None:
                return
            p = os.fspath(path)
            if isinstance(p, bytes) or "__pycache__" in p or p.startswith((sys.prefix, "/dev/")):
                return
            self.count += 1
            self.paths.append(p)
            if self.count == self.fail_at:
                raise OSError(self.err, os.strerror(self.err), p)

        def fake_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                hit(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS:
                hit(path)
            return real_os_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if not os.path.exists(path):  # an existing one fails with EEXIST, which callers expect
                hit(path)
            return real_mkdir(path, *args, **kwargs)

        def fake_rename(src, dst, *args, **kwargs):
            hit(dst)
            return real_rename(src, dst, *args, **kwargs)

        def fake_replace(src, dst, *args, **kwargs):
            hit(dst)
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(os, "rename", fake_rename)
        monkeypatch.setattr(os, "replace", fake_replace)


def run_state(run: Path) -> dict:
    """Every file under the run (but the lock) with its sha256: what a failed command must leave unchanged."""
    if not run.exists():
        return {}
    return {str(p.relative_to(run)): sha256(p) for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".pipeline.lock"}


def assert_consistent(run: Path) -> None:
    """The manifest and the files agree: every listed file exists with its hash, no model file is unlisted, and
    no staging or trash directory is left behind."""
    if not run.exists():
        return
    leftovers = [p.name for p in run.iterdir() if p.name.startswith((STAGING_PREFIX, TRASH_PREFIX, f".{MANIFEST}."))]
    assert not leftovers, leftovers
    manifest = run / MANIFEST
    if not manifest.exists():
        assert not [p for p in run.rglob("*") if p.is_file() and p.name != ".pipeline.lock"], "files, no manifest"
        return
    data = json.loads(manifest.read_text())
    listed = {}
    for art in data["artifacts"].values():
        for rel, digest in art["files"].items():
            p = run / rel if not Path(rel).is_absolute() else Path(rel)
            assert p.is_file(), f"{rel} is listed but missing"
            assert sha256(p) == digest, f"{rel} differs from its record"
            listed[p.resolve()] = digest
    for p in run.rglob("*"):
        if p.is_file() and (p.name.endswith(MODEL_SUFFIXES) or p.name == "tokenizer.json"):
            assert p.resolve() in listed, f"{p.relative_to(run)} is on disk but not in the manifest"

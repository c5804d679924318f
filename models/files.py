"""Files that appear whole or not at all: the one way this project writes a directory or file into place.

Write into `staging_dir(out)` (a private directory beside `out`, on the same filesystem), then move the result
into place: `publish` for a directory (an old one is moved aside first and deleted only once the new one is
there), exporters.onnx_io.move_model for a model file and its external data. The staging directory is removed
whatever happens, so a failed or interrupted writer leaves nothing behind and an earlier `out` survives.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def publish(staged: Path, out: Path) -> None:
    """Rename the finished directory `staged` to `out`; an old `out` is moved aside first, put back if the rename
    fails, and deleted only once the new one is there."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if old is not None:
        os.rename(out, old)
    try:
        os.rename(staged, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A private directory beside `out` (same filesystem, so renames are atomic), removed whatever happens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; what is published from it should read like any directory
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

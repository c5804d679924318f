"""Files that appear whole or not at all: the one way this project writes a directory or file into place.

Write into `staging_dir(out)` (a private directory beside `out`, on the same filesystem), then move the result
into place: `publish` for a directory (an old one is moved aside first and deleted only once the new one is
there), exporters.onnx_io.move_model for a model file and its external data. The staging directory is removed
whatever happens, so a failed or interrupted writer leaves nothing behind and an earlier `out` survives: its
removal holds Ctrl-C back until it is done (`remove_tree`), since an interrupt inside it would leave half of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C back while the block runs (a few renames that publish, the removal of a staging directory),
    then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def remove_tree(path: Path) -> None:
    """Delete a private directory whole: a Ctrl-C that lands meanwhile is delivered once it is gone."""
    with interrupts_deferred():
        shutil.rmtree(path, ignore_errors=True)


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
        remove_tree(old)


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A private directory beside `out` (same filesystem, so renames are atomic), removed whatever happens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; what is published from it should read like any directory
    try:
        yield tmp
    finally:
        remove_tree(tmp)

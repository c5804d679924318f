"""Keeping a model's weights in memory once while onnxruntime creates its session (Linux).

onnxruntime maps a model's external data file, one mapping per weight, and its CPU kernels prepack most weights
(MatMulNBits, MatMul, the int8 GEMMs) into buffers of their own. The mapped pages a prepack has read stay
resident until their mapping goes, and a mapping that something still reads never goes: a tied head whose blocks
the embedding gathers (Gemma 3's 262,144 x 640 table, 168 MB at 8 bits) is then in memory twice, the stored
blocks beside the packed copy, and the peak holds both.

`released_pages(directory)` hands those pages back while the session is created: every `period` seconds, and
once after, each mapping made meanwhile of a file of the model's directory, if it has resident pages, gets
madvise(MADV_PAGEOUT), which reclaims clean file pages and never discards data (a written private page would
go to swap, or stay). A mapping that was read during the load and is still mapped after it is read sparsely
from then on (an embedding's rows): it gets MADV_RANDOM, so that each row's fault reads its own page, not a
read-around window that later faults would map in whole (1,536 random token ids brought back ~75 MB of Gemma
3's table that way, ~10 MB with it). Weights that a kernel reads in place at run time (pipeline's native ops)
are not read while the session is created, so neither advice reaches them; nor does it reach what was mapped
before (a library loaded from that directory).

The cost: the reclaimed pages leave the page cache, so the next process to load the model reads them from disk
(on slow storage and with memory to spare, PIPELINE_RELEASE_PAGES=0 turns this off).

Elsewhere than Linux 5.4+, or where /proc or madvise is missing, it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MADV_RANDOM = 1
MADV_PAGEOUT = 21  # Linux 5.4
ENV = "PIPELINE_RELEASE_PAGES"  # "0": leave the pages to the kernel
PERIOD_S = 0.01  # a prepack reads ~2 GB/s here: at most ~20 MB of read pages are resident between two passes
_PRESENT = np.uint64(1 << 63)  # /proc/self/pagemap: the page is in memory


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _madvise()


def _mappings(directory: str) -> list[tuple[int, int, str]]:
    """(start, end, file) of this process's mappings of files directly inside `directory`."""
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and os.path.dirname(name := fields[5].rstrip("\n")) == directory:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end, name))
    return found


def _sync(name: str) -> None:
    """Write a file's dirty pages back (at once when there are none): a file just written (a model fresh from
    `pipeline quantize`) has dirty pages, which reclaim skips until they are on disk."""
    try:
        fd = os.open(name, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fdatasync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Pager:
    """Pages out the resident pages of one directory's mapped files; remembers the mappings it found read."""

    def __init__(self, directory: str | Path):
        self.directory = os.path.realpath(directory)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.before = set(_mappings(self.directory))  # not onnxruntime's (a library loaded from there): left alone
        self.read: set[tuple[int, int]] = set()
        self.synced: set[str] = set()

    def _resident(self, pagemap: int, start: int, end: int) -> bool:
        entries = np.frombuffer(os.pread(pagemap, 8 * ((end - start) // self.page), 8 * (start // self.page)),
                                dtype=np.uint64)
        return bool(((entries & _PRESENT) != 0).any())

    def release(self) -> list[tuple[int, int, str]]:
        """One pass; the directory's mappings as found (onnxruntime may unmap one meanwhile: then madvise fails
        with ENOMEM, or pread reads short, and the mapping is skipped)."""
        maps = [m for m in _mappings(self.directory) if m not in self.before]
        if not maps:
            return maps
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            for start, end, name in maps:
                if name not in self.synced:
                    self.synced.add(name)
                    _sync(name)
                try:
                    resident = self._resident(pagemap, start, end)
                except (OSError, ValueError):
                    continue
                if resident and _MADVISE(start, end - start, MADV_PAGEOUT) == 0:
                    self.read.add((start, end))
        finally:
            os.close(pagemap)
        return maps

    def finish(self) -> None:
        """The last pass; mappings read during the load and still mapped are read sparsely from now on."""
        for start, end, _ in self.release():
            if (start, end) in self.read:
                _MADVISE(start, end - start, MADV_RANDOM)


@contextlib.contextmanager
def released_pages(directory: str | Path, period: float = PERIOD_S) -> Iterator[None]:
    """While the block runs (onnxruntime creating a session, which releases the GIL), and once after it, page out
    what the model's mapped files have resident (module docstring)."""
    if _MADVISE is None or os.environ.get(ENV) == "0" or not os.path.exists("/proc/self/pagemap"):
        yield
        return
    try:
        pager = _Pager(directory)
    except Exception:  # as in loop()
        yield
        return
    done = threading.Event()

    def loop() -> None:
        while not done.wait(period):
            try:
                pager.release()
            except Exception:  # an economy, never a failure of the load (nor a thread's traceback on stderr)
                return

    thread = threading.Thread(target=loop, name="released-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    try:
        pager.finish()
    except Exception:  # as in loop()
        pass

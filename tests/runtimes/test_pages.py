"""runtimes/pages.py: the pages of a model's mapped files are handed back after a load, and nothing is lost."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import time

import numpy as np
import pytest

from runtimes import pages, session
from runtimes.generate import Generator

PAGE = mmap.PAGESIZE
PAGES = 64


def _address(buffer) -> int:
    """Where a writable buffer starts (the ctypes view let go at once, so that the buffer can close)."""
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _pageout_works() -> bool:
    if pages._MADVISE is None or not os.path.exists("/proc/self/pagemap"):
        return False
    buf = mmap.mmap(-1, PAGE)
    try:
        return pages._MADVISE(_address(buf), PAGE, pages.MADV_PAGEOUT) == 0
    finally:
        buf.close()


pytestmark = pytest.mark.skipif(not _pageout_works(), reason="needs Linux 5.4+ madvise(MADV_PAGEOUT)")


def _present(address: int, count: int) -> np.ndarray:
    """Which of `count` pages from `address` are in this process's memory (pagemap bit 63)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(8 * (address // PAGE))
        entries = np.frombuffer(f.read(8 * count), dtype=np.uint64)
    return (entries >> np.uint64(63)) == 1


def _vm_flags(address: int) -> list[str]:
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split()[0] and not line.startswith("VmFlags"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError("mapping not found")


def _map(path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # onnxruntime's: private, read-write


def test_read_pages_are_handed_back_written_ones_kept_and_later_reads_are_random(tmp_path):
    content = np.random.default_rng(0).integers(0, 256, PAGES * PAGE, dtype=np.uint8)
    path = tmp_path / "model.onnx.data"
    path.write_bytes(content.tobytes())  # dirty in the page cache: released_pages syncs it
    with pages.released_pages(tmp_path):  # as onnxruntime does while it creates a session:
        mapped = _map(path)  # maps the data file,
        address = _address(mapped)
        np.testing.assert_array_equal(np.frombuffer(mapped[:], dtype=np.uint8), content)  # reads every page
        mapped[3 * PAGE] ^= 0xFF  # (one page written: a private copy, no longer the file's)
    try:
        present = _present(address, PAGES)
        assert present.sum() <= 1, present.nonzero()  # the written page may stay (no swap here); the rest left
        assert "rr" in _vm_flags(address)  # read during the load, still mapped: read sparsely from now on
        expected = content.copy()
        expected[3 * PAGE] ^= 0xFF
        np.testing.assert_array_equal(np.frombuffer(mapped[:], dtype=np.uint8), expected)  # nothing lost
    finally:
        mapped.close()


def test_the_environment_can_turn_it_off(tmp_path, monkeypatch):
    (tmp_path / "model.onnx.data").write_bytes(bytes(range(256)) * (PAGES * PAGE // 256))
    monkeypatch.setenv(pages.ENV, "0")
    with pages.released_pages(tmp_path):
        mapped = _map(tmp_path / "model.onnx.data")
        bytes(mapped[:])
    try:
        assert _present(_address(mapped), PAGES).all()
    finally:
        mapped.close()


def test_a_failing_pass_never_fails_the_load(tmp_path, monkeypatch, capfd):
    def broken(self):
        raise ValueError("an unreadable /proc/self/maps line")

    monkeypatch.setattr(pages._Pager, "release", broken)
    with pages.released_pages(tmp_path, period=0.001):
        time.sleep(0.05)  # the thread's passes fail meanwhile
    assert capfd.readouterr().err == ""


def test_earlier_mappings_other_directories_and_unread_mappings_are_left_alone(tmp_path):
    for name in ("model", "other"):
        (tmp_path / name).mkdir()
        for file in ("early.data", "late.data", "unread.data"):
            (tmp_path / name / file).write_bytes(bytes(range(256)) * (PAGES * PAGE // 256))
    maps = {("model", "early.data"): _map(tmp_path / "model" / "early.data")}  # mapped before the load
    bytes(maps[("model", "early.data")][:])
    with pages.released_pages(tmp_path / "model"):
        for name in ("model", "other"):
            for file in ("late.data", "unread.data"):
                maps[(name, file)] = _map(tmp_path / name / file)
        for key in (("model", "late.data"), ("other", "late.data")):
            bytes(maps[key][:])
    address = {key: _address(m) for key, m in maps.items()}
    try:
        assert _present(address[("model", "early.data")], PAGES).all()
        assert _present(address[("other", "late.data")], PAGES).all()
        assert not _present(address[("model", "late.data")], PAGES).any()
        assert "rr" in _vm_flags(address[("model", "late.data")])
        assert "rr" not in _vm_flags(address[("model", "unread.data")])
        assert "rr" not in _vm_flags(address[("model", "early.data")])
    finally:
        for m in maps.values():
            m.close()


def test_a_session_loads_to_the_same_logits_with_its_pages_handed_back(tiny_model, monkeypatch):
    def logits():
        return Generator(session.open_session(tiny_model, threads=1)).prefill([1, 5, 9, 2])

    released = logits()
    monkeypatch.setattr(session, "released_pages", lambda directory: contextlib.nullcontext())
    np.testing.assert_array_equal(released, logits())

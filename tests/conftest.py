"""Fixtures shared by every test package."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def native_kernels(tmp_path_factory):
    """pipeline's native kernel library, built for this test session and named by PIPELINE_KERNELS.

    Skips where it cannot be built: a CPU that is neither x86-64 with AVX2 and FMA (or AVX512-VNNI) nor AArch64
    with the dot product, or no onnxruntime C API headers (.ci/run fetches Debian's libonnxruntime-dev and sets
    ORT_INCLUDE_DIR).
    """
    from runtimes import kernels
    from runtimes.errors import RuntimeUserError

    if not kernels.cpu_supported():
        pytest.skip(f"the native int8 kernel needs {kernels.requirement()}")
    try:
        kernels.find_headers()
    except RuntimeUserError as e:
        pytest.skip(str(e))
    path = kernels.build(out=tmp_path_factory.mktemp("kernels") / "libpipeline_int8.so")
    old = os.environ.get(kernels.LIBRARY_ENV)
    os.environ[kernels.LIBRARY_ENV] = str(path)
    yield path
    if old is None:
        os.environ.pop(kernels.LIBRARY_ENV, None)
    else:
        os.environ[kernels.LIBRARY_ENV] = old

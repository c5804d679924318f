"""Carry a wheel larger than one device call takes, in parts, and join it there.

The device tool sends at most 64 MiB per call (the working tree included), and onnxruntime-gpu's wheel is about
256 MB. `split` cuts a wheel into parts of at most `--part-mib` MiB, each in a folder of its own (`OUT/p00`,
`OUT/p01`, ...), with a manifest (name, size, sha256 of the whole and of each part) in every folder, so each
call names one folder in `carry` and the parts pile up on the warm machine. `join` there finds the parts under
the folder, checks every digest and writes the wheel; a missing or damaged part is one line and exit 2.

    python benchmarks/gpu/wheels.py split onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl --out .gpu
    python benchmarks/gpu/wheels.py join .gpu --out /tmp/wheels
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtimes.bundle import file_sha256  # noqa: E402

MANIFEST = "manifest.json"


class PartsError(Exception):
    """The parts under a folder do not make the wheel their manifest names."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(wheel: Path, out: Path, part_bytes: int) -> list[Path]:
    """`wheel` in parts of at most `part_bytes`, each in OUT/pNN with the manifest; returns the folders."""
    if part_bytes < 1:
        raise PartsError(f"part size must be at least one byte, got {part_bytes}")
    if not wheel.is_file():
        raise PartsError(f"{wheel}: no such file")
    size = wheel.stat().st_size
    count = max(1, -(-size // part_bytes))
    if count > 100:
        raise PartsError(f"{wheel.name} would take {count} parts of {part_bytes} bytes: give larger parts")
    parts, folders = [], []
    with open(wheel, "rb") as f:
        for k in range(count):
            data = f.read(part_bytes)
            folder = out / f"p{k:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{wheel.name}.part{k:02d}"
            (folder / name).write_bytes(data)
            parts.append({"name": name, "size": len(data), "sha256": sha256_bytes(data)})
            folders.append(folder)
    manifest = {"wheel": wheel.name, "size": size, "sha256": file_sha256(wheel), "parts": parts}
    for folder in folders:
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folders


def join(root: Path, out: Path) -> Path:
    """The wheel from the parts under `root` (any depth), every digest checked; returns its path."""
    manifests = sorted(root.rglob(MANIFEST))
    if not manifests:
        raise PartsError(f"no {MANIFEST} under {root}: carry the folders `split` wrote")
    manifest = json.loads(manifests[0].read_text())
    found = {p.name: p for p in root.rglob(f"{manifest['wheel']}.part*")}
    missing = [p["name"] for p in manifest["parts"] if p["name"] not in found]
    if missing:
        raise PartsError(f"{manifest['wheel']}: {len(missing)} of {len(manifest['parts'])} parts missing "
                         f"({', '.join(missing)}): carry each folder once more")
    out.mkdir(parents=True, exist_ok=True)
    target = out / manifest["wheel"]
    tmp = target.with_name(target.name + ".tmp")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for part in manifest["parts"]:
            data = found[part["name"]].read_bytes()
            if len(data) != part["size"] or sha256_bytes(data) != part["sha256"]:
                tmp.unlink()
                raise PartsError(f"{part['name']} is damaged ({len(data)} bytes, sha256 mismatch or short): "
                                 f"split the wheel again")
            f.write(data)
            h.update(data)
    if h.hexdigest() != manifest["sha256"]:
        tmp.unlink()
        raise PartsError(f"{manifest['wheel']}: the joined parts do not give the wheel's sha256")
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="cut a wheel into parts, one folder each")
    s.add_argument("wheel", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--part-mib", type=float, default=56.0,
                   help="largest part in MiB (a call carries 64 MiB with the working tree)")
    j = sub.add_parser("join", help="check and join the parts under a folder")
    j.add_argument("root", type=Path)
    j.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    try:
        if a.command == "split":
            for folder in split(a.wheel, a.out, int(a.part_mib * (1 << 20))):
                print(folder)
        else:
            print(join(a.root, a.out))
    except PartsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

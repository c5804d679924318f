"""Bundles on the device: verification before loading, every kind of damage refused in one line, archives."""

from __future__ import annotations

import io
import json
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from runtimes.__main__ import main
from runtimes.bundle import BUNDLE_FORMAT, MANIFEST_FILE, describe_files, verify_bundle
from runtimes.errors import RuntimeUserError

from tests.runtimes.conftest import REPO

PROMPT = "w5 w17 w99"


def make_bundle(src: Path, out: Path) -> Path:
    """A verified bundle: the session's model + tokenizer and a manifest listing them."""
    shutil.copytree(src, out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    manifest = {"format": BUNDLE_FORMAT, "schema": 1, "variant": "tiny", "files": describe_files(out)}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


@pytest.fixture
def verified(tmp_path, bundle) -> Path:
    return make_bundle(bundle, tmp_path / "bundle")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def generate(capsys, model: Path) -> str:
    code, out, err = run_cli(capsys, "generate", model, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert code == 0, err
    return out


def tamper(root: Path) -> None:
    data = bytearray((root / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "model.onnx").write_bytes(bytes(data))


def truncate(root: Path) -> None:
    data = (root / "model.onnx").read_bytes()
    (root / "model.onnx").write_bytes(data[: len(data) // 2])


def remove(root: Path) -> None:
    (root / "tokenizer.json").unlink()


def add_model(root: Path) -> None:
    shutil.copy(root / "model.onnx", root / "other.onnx")


def add_nested(root: Path) -> None:
    (root / "extra").mkdir()
    (root / "extra" / "model.onnx.data").write_bytes(b"\0" * 16)


DAMAGE = {"tampered": (tamper, "does not match its sha256"), "truncated": (truncate, "bytes, manifest.json says"),
          "missing": (remove, "tokenizer.json is missing"), "extra": (add_model, "other.onnx is not listed"),
          "extra-nested": (add_nested, "extra/model.onnx.data is not listed")}


def test_an_intact_bundle_verifies_and_generates_like_its_bare_model(capsys, verified, bundle):
    manifest = verify_bundle(verified)
    assert manifest["variant"] == "tiny" and set(manifest["files"]) == {
        "model.onnx", "tokenizer.json", "generation_config.json"}
    assert generate(capsys, verified) == generate(capsys, bundle / "model.onnx")


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_bundle_is_refused_in_one_line_before_anything_loads(capsys, monkeypatch, verified, damage):
    break_it, message = DAMAGE[damage]
    break_it(verified)
    with pytest.raises(RuntimeUserError, match=message):
        verify_bundle(verified)

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the bundle was verified")

    monkeypatch.setattr("runtimes.generate.text_generate", loaded)
    code, out, err = run_cli(capsys, "generate", verified, "--prompt", PROMPT)
    assert_one_line_error(code, err, message)
    assert out == ""
    assert_one_line_error(*run_cli(capsys, "verify", verified)[::2], message)


def test_bundle_checks_import_nothing_outside_the_device_allowlist():
    code = ("import sys, runtimes.bundle, runtimes.__main__\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'transformers', 'onnx', 'click', 'models', 'exporters', 'pipeline'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_damaged_bundle_exits_non_zero_without_traceback_from_the_shell(verified):
    truncate(verified)
    p = subprocess.run([sys.executable, "-m", "runtimes", "generate", str(verified), "--prompt", PROMPT],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "model.onnx is")
    assert p.stdout == ""


@pytest.mark.parametrize("manifest, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"format": BUNDLE_FORMAT}), "no file list"),
    (json.dumps({"format": BUNDLE_FORMAT, "files": {"../model.onnx": {"sha256": "0" * 64, "size": 1}}}),
     "unsafe path"),
    (json.dumps({"format": BUNDLE_FORMAT, "files": {"model.onnx": {"size": 1}}}), "no sha256 and size"),
])
def test_a_broken_manifest_is_refused(capsys, verified, manifest, message):
    (verified / MANIFEST_FILE).write_text(manifest)
    assert_one_line_error(*run_cli(capsys, "verify", verified)[::2], message)


def test_a_linked_file_is_refused(verified, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(verified / "model.onnx", outside)
    (verified / "model.onnx").symlink_to(outside)
    with pytest.raises(RuntimeUserError, match="link or special file"):
        verify_bundle(verified)


def test_verify_reports_the_bundle(capsys, verified):
    code, out, _ = run_cli(capsys, "verify", verified, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["ok"] and summary["variant"] == "tiny" and summary["files"] == 3
    code, out, _ = run_cli(capsys, "verify", verified)
    assert code == 0 and out.startswith("ok: ")


def test_verify_needs_a_bundle(capsys, bundle, tmp_path):
    assert_one_line_error(*run_cli(capsys, "verify", bundle)[::2], "has no manifest.json")
    assert_one_line_error(*run_cli(capsys, "verify", tmp_path / "nothing")[::2], "neither a bundle directory")


# ---- archives ----------------------------------------------------------------------------------------------

def tar_gz(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def zip_file(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def bundle_members(root: Path, top: str = "bundle") -> dict[str, bytes]:
    return {f"{top}/{p.name}": p.read_bytes() for p in sorted(root.iterdir())}


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_an_archive_is_unpacked_verified_and_run(capsys, verified, tmp_path, kind):
    members = bundle_members(verified)
    archive = (tar_gz if kind == "tar.gz" else zip_file)(tmp_path / f"b.{kind}", members)
    assert generate(capsys, archive) == generate(capsys, verified)
    code, out, _ = run_cli(capsys, "verify", archive)
    assert code == 0 and "every sha256 matches" in out


def test_a_flat_archive_is_accepted(capsys, verified, tmp_path):
    archive = zip_file(tmp_path / "flat.zip", {p.name: p.read_bytes() for p in verified.iterdir()})
    assert run_cli(capsys, "verify", archive)[0] == 0


def test_a_tampered_file_inside_an_archive_is_refused(capsys, verified, tmp_path):
    tamper(verified)  # the manifest still lists the original bytes
    archive = tar_gz(tmp_path / "b.tar.gz", bundle_members(verified))
    assert_one_line_error(*run_cli(capsys, "generate", archive, "--prompt", PROMPT)[::2], "sha256")


def test_a_truncated_archive_is_refused(capsys, verified, tmp_path):
    whole = tar_gz(tmp_path / "whole.tar.gz", bundle_members(verified)).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    assert_one_line_error(*run_cli(capsys, "generate", cut, "--prompt", PROMPT)[::2], "cannot unpack archive")
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip file")
    assert_one_line_error(*run_cli(capsys, "verify", garbage)[::2], "cannot unpack archive")


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
@pytest.mark.parametrize("name", ["../evil.txt", "bundle/../../evil.txt", "/tmp/evil.txt"])
def test_path_traversal_in_an_archive_is_refused(capsys, verified, tmp_path, kind, name):
    members = {**bundle_members(verified), name: b"owned"}
    (tmp_path / "in").mkdir()
    archive = (tar_gz if kind == "tar.gz" else zip_file)(tmp_path / "in" / f"b.{kind}", members)
    assert_one_line_error(*run_cli(capsys, "generate", archive, "--prompt", PROMPT)[::2], "unsafe path")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "in" / "evil.txt").exists()


def test_links_in_an_archive_are_refused(capsys, verified, tmp_path):
    archive = tar_gz(tmp_path / "b.tar.gz", bundle_members(verified), links={"bundle/extra.onnx": "/etc/passwd"})
    assert_one_line_error(*run_cli(capsys, "verify", archive)[::2], "link or special file")
    link = zipfile.ZipInfo("bundle/extra.onnx")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = zip_file(tmp_path / "b.zip", bundle_members(verified))
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    assert_one_line_error(*run_cli(capsys, "verify", archive)[::2], "link or special file")


def test_an_archive_without_a_bundle_is_refused(capsys, tmp_path):
    archive = tar_gz(tmp_path / "b.tar.gz", {"a/x.txt": b"x", "b/y.txt": b"y"})
    assert_one_line_error(*run_cli(capsys, "verify", archive)[::2], "does not hold one bundle")


def test_duplicate_archive_members_are_refused(capsys, verified, tmp_path):
    path = tar_gz(tmp_path / "b.tar.gz", bundle_members(verified))
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w:gz") as tar:
        for m, data in members + members[:1]:
            tar.addfile(m, io.BytesIO(data))
    assert_one_line_error(*run_cli(capsys, "verify", path)[::2], "twice")

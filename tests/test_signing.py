"""Tamper evidence: `kip keygen` / `kip sign` / `kip verify`, verification before use, and the md5
that dvc.lock records. The attacker here edits a set and re-seals its checksums, which `kip inspect`
alone accepts (the checksums are unkeyed): the trusted key is what refuses it."""
from __future__ import annotations

import base64
import hashlib
import json
import stat

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from test_artifacts import distilled, lineage, rewrite  # noqa: F401  (the `distilled` fixture)

from pipeline.artifacts import npz as artifacts, signing
from pipeline.run import cli


def kip(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def signed(distilled, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.delenv(signing.PUBLIC_KEY_ENV, raising=False)
    path = tmp_path / "set.npz"
    artifacts.save_npz(path, distilled)
    code, out, err = kip(capsys, "keygen", str(tmp_path / "team.key"), str(tmp_path / "team.pub"))
    assert code == 0, err
    code, out, err = kip(capsys, "sign", str(path), "--key", str(tmp_path / "team.key"))
    assert code == 0 and "set.npz.sig" in out, err
    return path, tmp_path / "team.key", tmp_path / "team.pub"


def test_a_signed_set_verifies_and_the_signature_is_plain_ed25519(signed, capsys):
    path, private, public = signed
    code, out, err = kip(capsys, "verify", str(path), "--public-key", str(public))
    assert code == 0 and out.startswith(f"kip verify: {path}: signed by key "), err
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # An independent check with cryptography alone: the documented message, the file's sha256.
    record = json.loads(signing.signature_path(path).read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["sha256"] == digest
    key = serialization.load_pem_public_key(public.read_bytes())
    key.verify(base64.b64decode(record["signature"]), b"kip-pipeline distilled set, sha256 " + digest.encode())


def test_a_resealed_edit_passes_the_checksums_but_not_the_signature(signed, capsys, monkeypatch):
    path, _, public = signed
    with np.load(path) as data:
        labels = data["labels"]
    rewrite(path, labels=np.roll(labels, 1, axis=1))  # every label moved one class, checksums re-sealed
    code, out, err = kip(capsys, "inspect", str(path))
    assert code == 0 and json.loads(out)["valid"] is True  # what the checksums alone say
    monkeypatch.setenv(signing.PUBLIC_KEY_ENV, str(public))
    for command in ("inspect", "evaluate", "train"):
        code, out, err = kip(capsys, command, str(path))
        one_line_error(code, err, f"kip {command}: error: {path}: the file changed after it was signed")
        assert out == ""  # nothing scored, nothing reported


def test_a_set_resigned_by_another_key_is_refused(signed, tmp_path, capsys, monkeypatch):
    path, _, public = signed
    kip(capsys, "keygen", str(tmp_path / "mallory.key"), str(tmp_path / "mallory.pub"))
    kip(capsys, "sign", str(path), "--key", str(tmp_path / "mallory.key"))
    monkeypatch.setenv(signing.PUBLIC_KEY_ENV, str(public))
    code, out, err = kip(capsys, "verify", str(path))
    one_line_error(code, err, "signed by key", "not by the trusted key", "team.pub")


def test_a_forged_signature_record_is_refused(signed, capsys):
    path, _, public = signed
    sig = signing.signature_path(path)
    record = json.loads(sig.read_text())
    raw = bytearray(base64.b64decode(record["signature"]))
    raw[0] ^= 1
    sig.write_text(json.dumps({**record, "signature": base64.b64encode(bytes(raw)).decode()}))
    code, _, err = kip(capsys, "verify", str(path), "--public-key", str(public))
    one_line_error(code, err, "the signature is not valid for this file")


def test_an_unsigned_set_is_refused_when_a_key_is_configured_and_read_when_not(signed, capsys, monkeypatch):
    path, _, public = signed
    signing.signature_path(path).unlink()
    code, out, _ = kip(capsys, "inspect", str(path))
    assert code == 0 and json.loads(out)["signature"].startswith("not checked")
    monkeypatch.setenv(signing.PUBLIC_KEY_ENV, str(public))
    code, out, err = kip(capsys, "inspect", str(path))
    one_line_error(code, err, "set.npz.sig is missing: the set is not signed")
    assert out == ""


def test_a_renamed_set_verifies_with_its_signature_named(signed, capsys):
    path, _, public = signed
    moved = path.with_name("got.npz")
    path.rename(moved)
    code, out, err = kip(capsys, "verify", str(moved), "--public-key", str(public), "--signature", f"{path}.sig")
    assert code == 0, err


def test_keygen_never_replaces_a_key(signed, capsys):
    _, private, public = signed
    before = private.read_bytes()
    code, _, err = kip(capsys, "keygen", str(private), str(public.with_name("new.pub")))
    one_line_error(code, err, "exists; kip keygen never replaces a key file")
    assert private.read_bytes() == before and not public.with_name("new.pub").exists()


def test_the_md5_dvc_lock_records_is_checked(signed, tmp_path, capsys):
    path, _, _ = signed
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"distill": {"cmd": "x", "outs": [
        {"path": "set.npz", "hash": "md5", "md5": md5, "size": path.stat().st_size}]}}}))
    code, out, err = kip(capsys, "verify", str(path), "--lock", str(lock))
    assert code == 0 and f"md5 {md5} as {lock} records for set.npz" in out, err
    code, out, err = kip(capsys, "verify", str(path), "--md5", md5.upper())
    assert code == 0, err
    moved = tmp_path / "elsewhere" / "got.npz"
    moved.parent.mkdir()
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    moved.write_bytes(bytes(damaged))
    code, _, err = kip(capsys, "verify", str(moved), "--lock", str(lock), "--as", "set.npz")
    one_line_error(code, err, f"but the record says {md5}: this is not the file the pipeline wrote")
    code, _, err = kip(capsys, "verify", str(path), "--lock", str(lock), "--as", "artifacts/other.npz")
    one_line_error(code, err, "records no output 'artifacts/other.npz'; expected one of: set.npz")
    code, _, err = kip(capsys, "verify", str(path), "--md5", "not-an-md5")
    one_line_error(code, err, "is not an md5; expected 32 hex digits")


@pytest.mark.parametrize("content, fragment", [
    (b"", "is not a kip signature file"),
    (b"x" * 5000, "is not a kip signature file"),
    (b'{"format": "other"}', "has format 'other'; expected kip-signature/1"),
    (b'{"format": "kip-signature/1"}', "lacks sha256, key_id or signature"),
])
def test_a_broken_signature_file_is_one_line(signed, capsys, content, fragment):
    path, _, public = signed
    signing.signature_path(path).write_bytes(content)
    code, _, err = kip(capsys, "verify", str(path), "--public-key", str(public))
    one_line_error(code, err, fragment)


def test_a_key_that_is_not_a_key_is_one_line(signed, tmp_path, capsys):
    path, private, _ = signed
    bogus = tmp_path / "bogus.pub"
    bogus.write_text("hello")
    code, _, err = kip(capsys, "verify", str(path), "--public-key", str(bogus))
    one_line_error(code, err, "is not a PEM public key")
    code, _, err = kip(capsys, "verify", str(path), "--public-key", str(private))
    one_line_error(code, err, "is not a PEM public key")

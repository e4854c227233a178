"""Tamper evidence for a shared distilled set: ed25519 signatures, and the md5 DVC and MLflow record.

The per-part sha256 values inside an artifact are unkeyed and travel with it, so they catch damage,
not an edit whose author recomputes them. Whoever must trust a set they did not make needs a key:

* `kip keygen` makes an ed25519 key pair (through `cryptography`, which wraps OpenSSL). The team
  keeps the private key out of git and commits the public one (e.g. `keys/team.pub`).
* `kip sign SET` writes a detached signature beside the set (`SET.sig`, JSON). The signature covers
  the file's sha256 under a fixed domain prefix, not its name: a set fetched with
  `dvc artifacts get -o other.parquet` still verifies. Detached, because signing must not change the
  set's bytes (DVC's md5, byte-identical reruns).
* `kip verify SET` checks it; with `KIP_PUBLIC_KEY` set, `kip evaluate`, `kip train` and
  `kip inspect` verify every set before they read it and refuse an unsigned or mis-signed one.
* `kip verify SET --md5 HEX` / `--lock dvc.lock` compares the file with the md5 that `dvc.lock`
  (the `outs` entry) or MLflow (the stage run's `kip.out.<path>` tag) recorded for it. That proves
  it is the file the pipeline wrote, as far as that record is trusted (a git commit, a server).

What this does not give: secrecy (sets are not encrypted), or protection if the private key leaks.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import yaml

from pipeline.artifacts import atomic, safe_read
from pipeline.errors import UserError

SIGNATURE_FORMAT = "kip-signature/1"
SIGNATURE_SUFFIX = ".sig"
PUBLIC_KEY_ENV = "KIP_PUBLIC_KEY"
_DOMAIN = b"kip-pipeline distilled set, sha256 "
_MAX_SIGNATURE_BYTES = 4096  # a signature file is ~300 bytes; anything far larger is not one
_MAX_KEY_BYTES = 16384
_MAX_LOCK_BYTES = 16 << 20


def signature_path(artifact: Path) -> Path:
    return Path(f"{artifact}{SIGNATURE_SUFFIX}")


def key_id(public_key) -> str:
    """A short name of a public key: the first 16 hex digits of the sha256 of its raw 32 bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new ed25519 key pair (private key mode 0600); never overwrites a file. Returns the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise UserError(f"{path} exists; kip keygen never replaces a key file: choose another path")
        atomic.check_writable(path)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    public = private.public_key()
    atomic.write_text(public_path, public.public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode())
    return key_id(public)


def sign(artifact: Path, private_key_path: Path) -> tuple[Path, str]:
    """Sign `artifact` with the private key; writes `artifact.sig` atomically. Returns (its path, key id)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = _load_key(private_key_path, "private")
    if not isinstance(private, Ed25519PrivateKey):
        raise UserError(f"{private_key_path} is not an ed25519 private key; expected one made by `kip keygen`")
    digest = _sha256(artifact)
    record = {
        "format": SIGNATURE_FORMAT,
        "sha256": digest,
        "key_id": key_id(private.public_key()),
        "signature": base64.b64encode(private.sign(_DOMAIN + digest.encode())).decode(),
    }
    target = signature_path(artifact)
    atomic.write_json(target, record)
    return target, record["key_id"]


def verify(artifact: Path, public_key_path: Path, signature: Path | None = None) -> str:
    """Raise UserError unless `artifact` carries a valid signature by the key at `public_key_path`.
    Returns the key id."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = _load_key(public_key_path, "public")
    if not isinstance(public, Ed25519PublicKey):
        raise UserError(f"{public_key_path} is not an ed25519 public key; expected one made by `kip keygen`")
    expected_id = key_id(public)
    signature = signature or signature_path(artifact)
    record = _read_signature(signature)
    if record["key_id"] != expected_id:
        raise UserError(f"{artifact}: signed by key {record['key_id']}, not by the trusted key {expected_id} "
                        f"({public_key_path}); do not use it")
    digest = _sha256(artifact)
    if digest != record["sha256"]:
        raise UserError(f"{artifact}: the file changed after it was signed (sha256 {digest[:16]}…, signed "
                        f"{record['sha256'][:16]}…); do not use it")
    try:
        public.verify(base64.b64decode(record["signature"], validate=True), _DOMAIN + digest.encode())
    except (InvalidSignature, ValueError):
        raise UserError(f"{signature}: the signature is not valid for this file and key {expected_id}; do not use "
                        f"{artifact}") from None
    return expected_id


def verify_if_configured(artifact: Path) -> str | None:
    """With KIP_PUBLIC_KEY set, verify `artifact` before anyone reads it; otherwise do nothing."""
    configured = os.environ.get(PUBLIC_KEY_ENV)
    if not configured:
        return None
    return verify(Path(artifact), Path(configured))


def check_md5(artifact: Path, expected: str) -> str:
    """Raise UserError unless the file's md5 (DVC's and MLflow's `kip.out.*` record) is `expected`."""
    expected = expected.strip().lower()
    if len(expected) != 32 or any(c not in "0123456789abcdef" for c in expected):
        raise UserError(f"--md5 {safe_read.one_line(expected, 40)!r} is not an md5; expected 32 hex digits")
    safe_read.check_regular(artifact, "the artifact")
    actual = atomic.file_digest(artifact, "md5")
    if actual != expected:
        raise UserError(f"{artifact}: md5 {actual}, but the record says {expected}: this is not the file the "
                        "pipeline wrote; do not use it")
    return actual


def recorded_md5(lock: Path, out_path: str) -> str:
    """The md5 `dvc.lock` records for the output `out_path` (as written in dvc.yaml)."""
    with safe_read.open_regular(lock, "the DVC lock file") as stream:
        text = stream.read(_MAX_LOCK_BYTES + 1)
    if len(text) > _MAX_LOCK_BYTES:
        raise UserError(f"{lock} is over {_MAX_LOCK_BYTES >> 20} MiB; expected a dvc.lock")
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{lock} is not valid YAML ({safe_read.one_line(err, 120)}); expected a dvc.lock") from None
    stages = document.get("stages") if isinstance(document, dict) else None
    if not isinstance(stages, dict):
        raise UserError(f"{lock} has no stages; expected a dvc.lock")
    wanted = Path(out_path).as_posix()
    found = []
    for stage in stages.values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and out.get("path") == wanted and isinstance(out.get("md5"), str):
                found.append(out["md5"])
    if not found:
        known = sorted(out.get("path") for stage in stages.values() for out in (stage or {}).get("outs") or []
                       if isinstance(out, dict) and isinstance(out.get("path"), str))
        raise UserError(f"{lock} records no output {wanted!r}; expected one of: {'|'.join(known) or '(none)'}")
    return found[0]


def _sha256(path: Path) -> str:
    safe_read.check_regular(path, "the artifact")
    return atomic.file_digest(path, "sha256")


def _load_key(path: Path, kind: str):
    from cryptography.hazmat.primitives import serialization

    with safe_read.open_regular(path, f"the {kind} key") as stream:
        data = stream.read(_MAX_KEY_BYTES + 1)
    if len(data) > _MAX_KEY_BYTES:
        raise UserError(f"{path} is over {_MAX_KEY_BYTES} bytes; expected a PEM {kind} key made by `kip keygen`")
    try:
        if kind == "private":
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise UserError(f"{path} is not a PEM {kind} key; expected one made by `kip keygen`") from None


def _read_signature(path: Path) -> dict[str, str]:
    if not os.path.lexists(path):
        raise UserError(f"{path} is missing: the set is not signed, and a trusted key is configured "
                        f"(--public-key or ${PUBLIC_KEY_ENV}); ask its author for `kip sign`")
    with safe_read.open_regular(path, "the signature") as stream:
        data = stream.read(_MAX_SIGNATURE_BYTES + 1)
    problem = None
    try:
        record = json.loads(data) if len(data) <= _MAX_SIGNATURE_BYTES else None
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        problem = "is not a kip signature file"
    elif record.get("format") != SIGNATURE_FORMAT:
        problem = f"has format {safe_read.one_line(repr(record.get('format')), 40)}; expected {SIGNATURE_FORMAT}"
    elif not all(isinstance(record.get(k), str) for k in ("sha256", "key_id", "signature")):
        problem = "lacks sha256, key_id or signature"
    if problem:
        raise UserError(f"{path} {problem}; expected the JSON `kip sign` writes")
    return record

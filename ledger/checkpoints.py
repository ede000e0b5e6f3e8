"""Signed checkpoints: a short statement "the chain had this head at this position", signed with
an Ed25519 key kept outside the database.

An auditor who holds an earlier checkpoint and the public key can prove that nothing up to that
position was rewritten since — even by a superuser who recomputed every later hash (the
transparency-log idea: Trillian, C2SP checkpoints). The format is a signed note:

    <origin>
    <position>
    <head hash, base64>
    <time, RFC 3339 UTC>

    — <origin> <base64(key id (4 bytes) ‖ Ed25519 signature of the four lines above)>

(each of the four lines ends in "\\n" and the signature covers exactly those bytes).
The key id is the first 4 bytes of SHA-256 of the raw public key; the public key file holds
`<origin> <base64(raw 32-byte Ed25519 public key)>`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.errors import CheckpointError

PRIVATE_NAME = "checkpoint-signing.key"
PUBLIC_NAME = "checkpoint-signing.pub"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    position: int
    head_hash: bytes
    time: datetime

    def body(self) -> bytes:
        return (
            f"{self.origin}\n{self.position}\n{base64.b64encode(self.head_hash).decode()}\n"
            f"{self.time.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
        ).encode()


def _key_id(public: Ed25519PublicKey) -> bytes:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:4]


def generate_keys(directory: Path, origin: str) -> tuple[Path, Path]:
    """Write a new key pair; the private key is created 0600 and never overwritten."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if private_path.exists():
        raise CheckpointError(f"{private_path} exists; move it away to make a new key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    raw = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    public_path.write_text(f"{origin} {base64.b64encode(raw).decode()}\n")
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> tuple[str, Ed25519PublicKey]:
    try:
        origin, encoded = path.read_text().split()
        return origin, Ed25519PublicKey.from_public_bytes(base64.b64decode(encoded))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a ledger public key file: {exc}") from exc


def sign(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> str:
    signature = _key_id(key.public_key()) + key.sign(checkpoint.body())
    return (
        checkpoint.body().decode()
        + f"\n\u2014 {checkpoint.origin} {base64.b64encode(signature).decode()}\n"
    )


def verify(text: str, public: Ed25519PublicKey, origin: str) -> Checkpoint:
    """Parse a signed checkpoint and check its signature; raise `CheckpointError` if it fails."""
    body, sep, signature_line = text.partition("\n\n")
    if not sep:
        raise CheckpointError("not a signed checkpoint: no signature block")
    lines = body.split("\n")
    try:
        name, position, head, moment = lines
        dash, signer, encoded = signature_line.strip().split(" ")
        blob = base64.b64decode(encoded)
        checkpoint = Checkpoint(
            origin=name,
            position=int(position),
            head_hash=base64.b64decode(head),
            time=datetime.strptime(moment, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC),
        )
    except ValueError as exc:
        raise CheckpointError(f"malformed checkpoint: {exc}") from exc
    if dash != "\u2014" or signer != origin or name != origin:
        raise CheckpointError(f"checkpoint is not signed by origin {origin!r}")
    if blob[:4] != _key_id(public):
        raise CheckpointError("checkpoint was signed with another key")
    try:
        public.verify(blob[4:], checkpoint.body())
    except InvalidSignature as exc:
        raise CheckpointError("checkpoint signature is invalid: the statement was altered") from exc
    return checkpoint

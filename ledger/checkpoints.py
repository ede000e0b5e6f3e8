"""Signed checkpoints: "the log had this tree, and the chain this head, at this size", signed
with an Ed25519 key kept outside the database (docs/spec/proofs.md, "Checkpoints").

A checkpoint is a C2SP signed note (c2sp.org/signed-note) whose body is a C2SP tlog-checkpoint
(c2sp.org/tlog-checkpoint) with two extension lines:

    <origin>
    <tree size>
    <RFC 6962 root hash, base64>
    chain-head <hash of the chain entry at position <tree size>, base64>
    signed-at <time, RFC 3339 UTC>

    — <origin> <base64(key id (4 bytes) ‖ Ed25519 signature of the body above)>

The key id is the signed-note one, SHA-256(<origin> ‖ 0x0A ‖ 0x01 ‖ raw public key)[:4], so
standard note verifiers and witnesses (c2sp.org/tlog-cosignature) accept it; witnesses append
their own `— <name> …` cosignature lines.

Checkpoints made before the tree existed (chain only) keep verifying: their body is
`<origin>\\n<position>\\n<head hash, base64>\\n<time>\\n` and their key id is SHA-256(raw public
key)[:4]; which of the two a note is follows from the key id its signature line carries.
The public key file holds `<origin> <base64(raw 32-byte Ed25519 public key)>` (or a note
verifier key, `<name>+<hex key id>+<base64(0x01 ‖ key)>`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.errors import CheckpointError

PRIVATE_NAME = "checkpoint-signing.key"
PUBLIC_NAME = "checkpoint-signing.pub"
ED25519 = b"\x01"  # signed-note signature type
COSIGNATURE = b"\x04"  # tlog-cosignature/v1 (timestamped Ed25519)
MAX_SIGNATURES = 32  # signed-note: accept at least 16


def _time_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    origin: str
    position: int  # the tree size, which is also the chain position of `head_hash`
    head_hash: bytes
    time: datetime
    root_hash: bytes | None = None  # None only for a legacy, chain-only statement

    def body(self) -> bytes:
        if self.root_hash is None:
            return (
                f"{self.origin}\n{self.position}\n{base64.b64encode(self.head_hash).decode()}\n"
                f"{_time_text(self.time)}\n"
            ).encode()
        return (
            f"{self.origin}\n{self.position}\n{base64.b64encode(self.root_hash).decode()}\n"
            f"chain-head {base64.b64encode(self.head_hash).decode()}\n"
            f"signed-at {_time_text(self.time)}\n"
        ).encode()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _legacy_key_id(public: Ed25519PublicKey) -> bytes:
    return hashlib.sha256(_raw(public)).digest()[:4]


def key_id(name: str, public: Ed25519PublicKey, kind: bytes = ED25519) -> bytes:
    """signed-note key id: SHA-256(name ‖ 0x0A ‖ signature type ‖ public key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + kind + _raw(public)).digest()[:4]


def verifier_key(name: str, public: Ed25519PublicKey, kind: bytes = ED25519) -> str:
    """The note verifier key (vkey) other note software is configured with."""
    return (f"{name}+{key_id(name, public, kind).hex()}+"
            f"{base64.b64encode(kind + _raw(public)).decode()}")


def generate_keys(
    directory: Path, origin: str, *, stem: str = "checkpoint-signing"
) -> tuple[Path, Path]:
    """Write a new key pair; the private key is created 0600 and never overwritten."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{stem}.key", directory / f"{stem}.pub"
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
    public_path.write_text(f"{origin} {base64.b64encode(_raw(key.public_key())).decode()}\n")
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
    """`<name> <base64 key>` (what `ledger keys generate` writes) or a note verifier key."""
    try:
        text = path.read_text().strip()
        if " " not in text and text.count("+") >= 2:
            name, kid, encoded = text.split("+", 2)  # a key name holds no "+"
            raw = base64.b64decode(encoded, validate=True)
            if raw[:1] not in (ED25519, COSIGNATURE):
                raise ValueError("not an Ed25519 verifier key")
            public = Ed25519PublicKey.from_public_bytes(raw[1:])
            if key_id(name, public, raw[:1]).hex() != kid:
                raise ValueError("its key id does not match its name and key")
            return name, public
        name, encoded = text.split()
        return name, Ed25519PublicKey.from_public_bytes(base64.b64decode(encoded, validate=True))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a ledger public key file: {exc}") from exc


def sign(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> str:
    public = key.public_key()
    kid = (_legacy_key_id(public) if checkpoint.root_hash is None
           else key_id(checkpoint.origin, public))
    signature = kid + key.sign(checkpoint.body())
    return (
        checkpoint.body().decode()
        + f"\n\u2014 {checkpoint.origin} {base64.b64encode(signature).decode()}\n"
    )


@dataclass(frozen=True, slots=True)
class Note:
    body: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (key name, key id ‖ signature)

    @property
    def text(self) -> str:
        lines = "".join(
            f"\u2014 {name} {base64.b64encode(blob).decode()}\n" for name, blob in self.signatures
        )
        return self.body.decode() + "\n" + lines


def parse_note(text: str) -> Note:
    """Split a signed note into its body and signature lines (nothing verified yet)."""
    body, sep, block = text.partition("\n\n")
    if not sep or not body:
        raise CheckpointError("not a signed checkpoint: no signature block")
    signatures: list[tuple[str, bytes]] = []
    for line in block.rstrip("\n").split("\n"):
        try:
            dash, name, encoded = line.split(" ")
            blob = base64.b64decode(encoded, validate=True)
        except ValueError as exc:
            raise CheckpointError(f"malformed signature line {line[:60]!r}") from exc
        if dash != "\u2014" or len(blob) < 5:
            raise CheckpointError(f"malformed signature line {line[:60]!r}")
        signatures.append((name, blob))
    if len(signatures) > MAX_SIGNATURES:
        raise CheckpointError(f"more than {MAX_SIGNATURES} signatures on one note")
    return Note((body + "\n").encode(), tuple(signatures))


_TREE_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")  # [0-9]: ASCII digits only


def tree_size(text: str) -> int:
    """A checkpoint's tree size as c2sp.org/tlog-checkpoint writes it: ASCII decimal, no sign,
    no leading zeros (but "0"), at most 2^64 - 1 — not whatever Python's `int()` takes (`+5`,
    Arabic-Indic digits, `1_0`, ` 5`), so one note has one reading."""
    if not _TREE_SIZE.fullmatch(text) or int(text) >= 2**64:
        raise ValueError(f"tree size {text[:30]!r} is not ASCII decimal without sign or "
                         "leading zeros")
    return int(text)


def _parse_body(body: bytes, legacy: bool) -> Checkpoint:
    try:
        lines = body.decode().split("\n")[:-1]
        if legacy:
            name, position, head, moment = lines
            return Checkpoint(name, tree_size(position), base64.b64decode(head, validate=True),
                              _parse_time(moment))
        name, size, root, *extensions = lines
        fields = dict(line.split(" ", 1) for line in extensions)
        return Checkpoint(
            origin=name, position=tree_size(size), root_hash=base64.b64decode(root, validate=True),
            head_hash=base64.b64decode(fields["chain-head"], validate=True),
            time=_parse_time(fields["signed-at"]),
        )
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"malformed checkpoint: {exc!r}") from exc


def verify(text: str, public: Ed25519PublicKey, origin: str) -> Checkpoint:
    """Parse a signed checkpoint and check the operator's signature on it; raise
    `CheckpointError` if it fails. Other signature lines (witnesses) are ignored here."""
    note = parse_note(text)
    ids = {key_id(origin, public): False, _legacy_key_id(public): True}
    mine = [(blob, ids[blob[:4]]) for name, blob in note.signatures
            if name == origin and blob[:4] in ids]
    if not mine:
        if any(name == origin for name, _ in note.signatures):
            raise CheckpointError("checkpoint was signed with another key")
        raise CheckpointError(f"checkpoint is not signed by origin {origin!r}")
    for blob, _ in mine:
        try:
            public.verify(blob[4:], note.body)
        except InvalidSignature as exc:
            raise CheckpointError(
                "checkpoint signature is invalid: the statement was altered"
            ) from exc
    checkpoint = _parse_body(note.body, legacy=mine[0][1])
    if checkpoint.origin != origin:
        raise CheckpointError(f"checkpoint is not signed by origin {origin!r}")
    return checkpoint


def _cosigned_message(body: bytes, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + body


def cosign(text: str, key: Ed25519PrivateKey, name: str, timestamp: int) -> str:
    """The note with a c2sp.org/tlog-cosignature/v1 line from witness `name` appended."""
    note = parse_note(text)
    public = key.public_key()
    kid = key_id(name, public, COSIGNATURE)
    signature = key.sign(_cosigned_message(note.body, timestamp))
    others = tuple(s for s in note.signatures if not (s[0] == name and s[1][:4] == kid))
    blob = kid + timestamp.to_bytes(8, "big") + signature
    return Note(note.body, (*others, (name, blob))).text


def cosigned_by(text: str, witnesses: list[tuple[str, Ed25519PublicKey]]) -> list[str]:
    """The witnesses (of those given) whose cosignature on the note verifies."""
    note = parse_note(text)
    valid: list[str] = []
    for name, public in witnesses:
        kid = key_id(name, public, COSIGNATURE)
        for signer, blob in note.signatures:
            if signer != name or blob[:4] != kid or len(blob) != 4 + 8 + 64:
                continue
            timestamp = int.from_bytes(blob[4:12], "big")
            try:
                public.verify(blob[12:], _cosigned_message(note.body, timestamp))
            except InvalidSignature:
                continue
            valid.append(name)
            break
    return valid

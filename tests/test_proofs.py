"""Proofs an outsider can check: the tree follows the chain, `ledger prove` bundles verify
offline (in an empty environment, with pymerkle too), and tampering, forks and rewritten
histories are caught."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg
import orjson
import pytest
from click.testing import CliRunner
from pymerkle import verify_inclusion as pymerkle_verify_inclusion
from pymerkle.core import _inclusion_path_layout
from pymerkle.proof import InclusionProof

from ledger import checkpoints, drafts, integrity, merkle, proofs, proving
from ledger.cli import main
from ledger.errors import CheckpointError, ProofInvalid
from ledger.merkle import MemoryTree
from ledger.settings import TrustPolicy
from ledger.storage.store import EventStore, create_pool
from ledger.storage.tree_store import TreeStore
from ledger.trust import TrustChange
from ledger.verification import ProblemKind
from tests.conftest import FIXTURES, Cluster, Database, _create_database, _drop_database

Connection: TypeAlias = "asyncpg.Connection[Any]"
ORIGIN = "test-ledger"


async def fill(store: EventStore, count: int, *, tag: str = "portal") -> None:
    now = datetime.now(UTC)
    for start in range(0, count, 500):
        await store.append([
            drafts.operator_action(TrustChange.ALLOWED, member_id=f"{tag}-{i}", domain=None,
                                   token=None, actor="test", received_at=now)
            for i in range(start, min(count, start + 500))
        ])


@pytest.fixture
async def store(database: Database) -> Any:
    pool = await create_pool(database.service_dsn, size=2)
    yield EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    await pool.close()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return checkpoints.generate_keys(tmp_path / "keys", ORIGIN)


async def chain_hashes(store: EventStore) -> list[bytes]:
    async with store.pool.acquire() as connection:
        rows = await connection.fetch("SELECT hash FROM ledger.events ORDER BY position")
    return [bytes(r["hash"]) for r in rows]


async def sign(store: EventStore, private: Path) -> str:
    return await proving.make_checkpoint(
        TreeStore(store.pool), checkpoints.load_private_key(private), ORIGIN
    )


async def test_the_tree_is_the_rfc_tree_over_the_chain_entry_hashes(store: EventStore) -> None:
    await fill(store, 300)
    trees = TreeStore(store.pool)
    assert await trees.extend(limit=128) == (128, 128)  # a batch per transaction
    assert await trees.catch_up(limit=100) == 300
    expected = MemoryTree()
    for leaf in await chain_hashes(store):
        expected.append(leaf)
    head = await trees.head()
    assert (head.size, head.root) == (300, expected.root())
    assert head.leaf == (await store.head())[1]
    report = await integrity.verify_tree(store)
    assert report.problem is None
    assert report.size == 300


async def test_a_proof_bundle_verifies_offline_and_with_pymerkle(
    store: EventStore, keys: tuple[Path, Path]
) -> None:
    await fill(store, 1000)
    note = await sign(store, keys[0])
    origin, public = checkpoints.load_public_key(keys[1])
    trees = TreeStore(store.pool)
    for position in (1, 2, 513, 999, 1000):
        bundle = orjson.loads(orjson.dumps(await proving.inclusion_bundle(trees, position, None)))
        result = proofs.verify_inclusion(bundle, public, origin)
        assert (result.position, result.checkpoint.position) == (position, 1000)
        # the same audit path, checked by a third-party RFC 6962 implementation
        root = checkpoints.verify(note, public, origin).root_hash
        leaf = merkle.leaf_hash(bytes.fromhex(bundle["leaf"]))
        rule, _ = _inclusion_path_layout(position, 1000)
        proof = InclusionProof("sha256", True, 1000, position, rule,
                               [leaf, *map(bytes.fromhex, bundle["audit_path"])])
        pymerkle_verify_inclusion(leaf, root, proof, index=position, size=1000)


@pytest.mark.parametrize(("field", "change"), [
    ("payload", lambda v: v[:2] + chr(ord(v[2]) ^ 1) + v[3:]),  # a bit of the first key
    ("metadata", lambda v: "[" + v[1:]),  # "{}" (operator actions carry none) → not JSON
    ("received_at", lambda v: v.replace(v[-3], str((int(v[-3]) + 1) % 10), 1)),
    ("member_id", lambda v: v + "x"),
    ("hash", lambda v: ("0" if v[0] != "0" else "1") + v[1:]),
])
async def test_changing_one_byte_of_the_event_fails(
    store: EventStore, keys: tuple[Path, Path], field: str, change: Any
) -> None:
    await fill(store, 20)
    await sign(store, keys[0])
    origin, public = checkpoints.load_public_key(keys[1])
    bundle = await proving.inclusion_bundle(TreeStore(store.pool), 7, None)
    bundle["event"][field] = change(bundle["event"][field])
    with pytest.raises(ProofInvalid):
        proofs.verify_inclusion(bundle, public, origin)


@pytest.fixture
async def fork(cluster: Cluster, template: str) -> Any:
    """A second database: the same operator key, another history."""
    db = await _create_database(cluster, template)
    pool = await create_pool(db.service_dsn, size=2)
    yield EventStore(pool, policy=TrustPolicy.ALLOWLIST)
    await pool.close()
    await _drop_database(cluster, db.name)


async def test_a_checkpoint_from_a_forked_history_fails_the_proof(
    store: EventStore, fork: EventStore, keys: tuple[Path, Path]
) -> None:
    await fill(store, 50)
    await fill(fork, 50, tag="forged")
    await sign(store, keys[0])
    forked_note = await sign(fork, keys[0])
    origin, public = checkpoints.load_public_key(keys[1])
    bundle = await proving.inclusion_bundle(TreeStore(store.pool), 10, None)
    proofs.verify_inclusion(bundle, public, origin)
    bundle["checkpoint"] = forked_note  # validly signed, same size, another tree
    with pytest.raises(ProofInvalid, match="inclusion proof fails"):
        proofs.verify_inclusion(bundle, public, origin)
    # and the operator's database refuses to prove against a root it does not have
    with pytest.raises(ProofInvalid, match="does not have the checkpoint's root"):
        await proving.inclusion_bundle(TreeStore(store.pool), 10, forked_note)


def rfc_consistency_roots(
    old_size: int, new_size: int, proof: list[bytes], old_root: bytes
) -> tuple[bytes, bytes]:
    """A verifier written from docs/spec/merkle.md (the RFC 6962 SUBPROOF definition read
    backwards), not from ledger.merkle: the (old, new) roots the proof implies."""
    import hashlib

    items = list(proof)

    def node(left: bytes, right: bytes) -> bytes:
        return hashlib.sha256(b"\x01" + left + right).digest()

    def sub(m: int, n: int, complete: bool) -> tuple[bytes, bytes]:
        if m == n:
            if complete:
                return old_root, old_root
            last = items.pop()
            return last, last
        k = 1
        while k * 2 < n:
            k *= 2
        last = items.pop()
        if m <= k:
            old, new = sub(m, k, complete)
            return old, node(new, last)
        old, new = sub(m - k, n - k, False)
        return node(last, old), node(last, new)

    old, new = sub(old_size, new_size, True)
    assert not items, "proof longer than the RFC allows"
    return old, new


async def test_consistency_between_checkpoints_1000_events_apart_verifies(
    store: EventStore, fork: EventStore, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    await fill(store, 37)
    old = await sign(store, keys[0])
    await fill(store, 1000, tag="later")
    new = await sign(store, keys[0])
    origin, public = checkpoints.load_public_key(keys[1])
    bundle = await proving.consistency_bundle(TreeStore(store.pool), old, new)
    result = proofs.verify_consistency(bundle, public, origin)
    assert (result.old.position, result.new.position) == (37, 1037)
    path = [bytes.fromhex(h) for h in bundle["proof"]]
    assert result.old.root_hash is not None
    assert rfc_consistency_roots(37, 1037, path, result.old.root_hash) == (
        result.old.root_hash, result.new.root_hash)

    # a rewritten history: the same first 37 slots, other events, signed with the same key
    await fill(fork, 1037, tag="rewritten")
    rewritten = await sign(fork, keys[0])
    forged = await proving.consistency_bundle(TreeStore(fork.pool), old, rewritten)
    with pytest.raises(ProofInvalid, match="history was rewritten"):
        proofs.verify_consistency(forged, public, origin)


def test_cli_prove_and_verify_proof_in_an_empty_environment(
    store: EventStore, database: Database, tmp_path: Path
) -> None:
    asyncio.run(_fill_outside_loop(database, 40))
    env = {"LEDGER_DATABASE_URL": database.service_dsn, "LEDGER_LOG_LEVEL": "WARNING",
           "LEDGER_DATA_DIR": str(tmp_path)}
    runner = CliRunner()
    assert runner.invoke(main, ["keys", "generate"], env=env).exit_code == 0
    bundle = tmp_path / "proof.json"
    made = runner.invoke(main, ["prove", "17", "--output", str(bundle)], env=env)
    assert made.exit_code == 0, made.output
    public = tmp_path / "keys" / checkpoints.PUBLIC_NAME
    isolated = tmp_path / "elsewhere"
    isolated.mkdir()
    checked = subprocess.run(
        [sys.executable, "-m", "ledger", "verify-proof", str(bundle), "--public-key",
         str(public)],
        env={}, cwd=isolated, capture_output=True, text=True, timeout=60, check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert "at position 17 is in bitrix24-ledger at tree size 40" in checked.stdout
    assert not (isolated / ".ledger").exists()  # nothing started, nothing written

    document = orjson.loads(bundle.read_bytes())
    document["event"]["payload"] = document["event"]["payload"].replace("a", "b", 1)
    bundle.write_bytes(orjson.dumps(document))
    failed = runner.invoke(main, ["verify-proof", str(bundle), "--public-key", str(public)])
    assert failed.exit_code == 1
    assert "payload does not hash" in failed.output


async def _fill_outside_loop(database: Database, count: int) -> None:
    pool = await create_pool(database.service_dsn, size=2)
    try:
        await fill(EventStore(pool, policy=TrustPolicy.ALLOWLIST), count)
    finally:
        await pool.close()


def test_cli_consistency_and_a_witness_that_refuses_a_fork(
    store: EventStore, database: Database, tmp_path: Path
) -> None:
    env = {"LEDGER_DATABASE_URL": database.service_dsn, "LEDGER_LOG_LEVEL": "WARNING",
           "LEDGER_DATA_DIR": str(tmp_path)}
    runner = CliRunner()

    def ok(*args: str) -> str:
        result = runner.invoke(main, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.output

    ok("keys", "generate")
    public = str(tmp_path / "keys" / checkpoints.PUBLIC_NAME)
    ok("witness", "keygen", "auditor.example/w1", "--dir", str(tmp_path / "w1"))
    witness = ["--key", str(tmp_path / "w1" / "witness.key"), "--name", "auditor.example/w1",
               "--log-key", public, "--state", str(tmp_path / "w1" / "state.json")]
    asyncio.run(_fill_outside_loop(database, 10))
    ok("checkpoint", "--output", str(tmp_path / "c1.txt"))
    ok("witness", "cosign", str(tmp_path / "c1.txt"), *witness, "--output",
       str(tmp_path / "c1w.txt"))
    asyncio.run(_fill_outside_loop(database, 1000))
    ok("checkpoint", "--output", str(tmp_path / "c2.txt"))
    ok("prove-consistency", str(tmp_path / "c1.txt"), str(tmp_path / "c2.txt"), "--output",
       str(tmp_path / "c12.json"))
    assert "extends tree size 10" in ok("verify-consistency", str(tmp_path / "c12.json"),
                                        "--public-key", public)
    refused = runner.invoke(main, ["witness", "cosign", str(tmp_path / "c2.txt"), *witness])
    assert refused.exit_code == 1
    assert "give --proof" in refused.output
    ok("witness", "cosign", str(tmp_path / "c2.txt"), *witness, "--proof",
       str(tmp_path / "c12.json"), "--output", str(tmp_path / "c2w.txt"))

    # a proof against the witnessed checkpoint: verify-proof can demand the cosignature
    ok("prove", "500", "--checkpoint", str(tmp_path / "c2w.txt"), "--output",
       str(tmp_path / "p.json"))
    wkey = str(tmp_path / "w1" / "witness.pub")
    out = ok("verify-proof", str(tmp_path / "p.json"), "--public-key", public,
             "--witness-key", wkey, "--min-witnesses", "1")
    assert "cosigned by auditor.example/w1" in out
    two = runner.invoke(main, ["verify-proof", str(tmp_path / "p.json"), "--public-key", public,
                               "--witness-key", wkey, "--min-witnesses", "2"])
    assert two.exit_code == 1
    assert "1 valid witness cosignature(s)" in two.output

    # the operator shows the witness a forked tree of a larger size: refused
    key = checkpoints.load_private_key(tmp_path / "keys" / checkpoints.PRIVATE_NAME)
    fork_tree = MemoryTree()
    for i in range(2000):
        fork_tree.append(i.to_bytes(32, "big"))
    forked = checkpoints.sign(checkpoints.Checkpoint(
        "bitrix24-ledger", 2000, bytes(32), datetime.now(UTC), fork_tree.root()), key)
    (tmp_path / "fork.txt").write_text(forked)
    (tmp_path / "fork.json").write_bytes(orjson.dumps(
        {"proof": [h.hex() for h in fork_tree.consistency(1010)]}))
    refused = runner.invoke(main, ["witness", "cosign", str(tmp_path / "fork.txt"), *witness,
                                   "--proof", str(tmp_path / "fork.json")])
    assert refused.exit_code == 1
    assert "REFUSED" in refused.output
    state = orjson.loads((tmp_path / "w1" / "state.json").read_bytes())
    assert state["size"] == 1010  # the refusal changed nothing


async def test_verify_names_the_first_bad_tree_node(
    store: EventStore, admin: Connection
) -> None:
    await fill(store, 64)
    await TreeStore(store.pool).catch_up()
    await admin.execute("SET session_replication_role = replica")
    await admin.execute("UPDATE ledger.tree_nodes SET hash = sha256(hash) "
                        "WHERE level = 2 AND index IN (5, 9)")
    problem = (await integrity.verify_tree(store)).problem
    assert problem is not None
    assert (problem.kind, problem.position) == (ProblemKind.TREE_NODE_CHANGED, 24)
    assert "node level 2 index 5 (positions 21..24)" in problem.detail
    await admin.execute("DELETE FROM ledger.tree_nodes WHERE level = 1 AND index = 1")
    problem = (await integrity.verify_tree(store)).problem
    assert problem is not None
    assert (problem.kind, problem.position) == (ProblemKind.TREE_NODE_MISSING, 4)


def test_a_checkpoint_made_before_the_tree_still_verifies() -> None:
    """Signed by the code before this change (tests/fixtures/checkpoints)."""
    origin, public = checkpoints.load_public_key(FIXTURES / "checkpoints" / "legacy.pub")
    text = (FIXTURES / "checkpoints" / "legacy-412.txt").read_text()
    legacy = checkpoints.verify(text, public, origin)
    assert (legacy.position, legacy.head_hash, legacy.root_hash) == (412, bytes(range(32)), None)
    with pytest.raises(CheckpointError):
        checkpoints.verify(text.replace("\n412\n", "\n413\n"), public, origin)


def test_new_checkpoints_carry_the_standard_note_key_id(keys: tuple[Path, Path]) -> None:
    key = checkpoints.load_private_key(keys[0])
    note = checkpoints.sign(checkpoints.Checkpoint(
        ORIGIN, 5, b"\2" * 32, datetime(2026, 1, 1, tzinfo=UTC), b"\3" * 32), key)
    body, _, signature = note.partition("\n\n")
    assert body.split("\n")[:3] == [ORIGIN, "5", "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM="]
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    blob = base64.b64decode(signature.split(" ")[2])
    assert blob[:4] == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + raw).digest()[:4]
    vkey = keys[1].with_name("log.vkey")
    vkey.write_text(checkpoints.verifier_key(ORIGIN, key.public_key()))
    name, public = checkpoints.load_public_key(vkey)
    assert name == ORIGIN
    assert checkpoints.verify(note, public, ORIGIN).root_hash == b"\3" * 32


async def test_serve_keeps_the_tree_up_and_the_api_serves_checkable_proofs(
    make_client: Any, settings_factory: Any, tmp_path: Path
) -> None:
    from ledger.web import CHECKPOINTER, TREE_FOLLOWER
    from tests.helpers import install_sample_portal
    from tests.test_api import bearer

    private, public_path = checkpoints.generate_keys(tmp_path / "keys", "bitrix24-ledger")
    client = await make_client(settings_factory(
        checkpoint_dir=tmp_path / "checkpoints", checkpoint_key=private,
        checkpoint_every_events=3, run_tree_follower=True, tree_poll_seconds=30.0,
    ))
    headers = await bearer(client)
    assert (await client.get("/api/v1/events/1/proof", headers=headers)).status == 409
    await install_sample_portal(client)  # 3 events: allow, install, trust established
    async with asyncio.timeout(10):
        await client.app[TREE_FOLLOWER].wait_for(3)  # woken by NOTIFY, not by its 30 s poll
        await client.app[CHECKPOINTER].wait_for(3)
    response = await client.get("/api/v1/events/2/proof", headers=headers)
    assert response.status == 200, await response.text()
    origin, public = checkpoints.load_public_key(public_path)
    result = proofs.verify_inclusion(await response.json(), public, origin)
    assert (result.position, result.event_type) == (2, "ONAPPINSTALL")
    missing = await client.get("/api/v1/events/99/proof", headers=headers)
    assert missing.status == 409
    assert (await missing.json())["error"] == "tree_not_ready"
    for hostile in ("0", "-5", "9" * 30, "x"):
        answer = await client.get(f"/api/v1/events/{hostile}/proof", headers=headers)
        assert answer.status in (400, 404), (hostile, await answer.text())
    ready = await (await client.get("/readyz")).json()
    assert ready["checks"]["tree"] == "ok"


@pytest.mark.parametrize("size", ["+5", "\u0665", "1_0", " 5", "5 ", "05", "00", "-0",
                                  "18446744073709551616"])
def test_a_tree_size_int_would_take_but_tlog_checkpoint_does_not_is_refused(
    keys: tuple[Path, Path], size: str
) -> None:
    """c2sp.org/tlog-checkpoint: the size is ASCII decimal, no sign, no leading zeros; a
    correctly signed note saying `+5` or an Arabic-Indic five is malformed, not tree size 5."""
    import base64

    key = checkpoints.load_private_key(keys[0])
    good = checkpoints.Checkpoint(ORIGIN, 5, b"\2" * 32, datetime(2026, 1, 1, tzinfo=UTC),
                                  b"\3" * 32)
    lines = good.body().decode().split("\n")
    for stated, refused in ((lines[1], False), ("0", False), (size, True)):
        body = "\n".join([lines[0], stated, *lines[2:]]).encode()
        blob = checkpoints.key_id(ORIGIN, key.public_key()) + key.sign(body)
        note = body.decode() + f"\n\u2014 {ORIGIN} {base64.b64encode(blob).decode()}\n"
        if not refused:
            assert checkpoints.verify(note, key.public_key(), ORIGIN).position == int(stated)
            continue
        with pytest.raises(CheckpointError, match="tree size"):
            checkpoints.verify(note, key.public_key(), ORIGIN)
        with pytest.raises(ProofInvalid):
            proving._signed_tree(note)

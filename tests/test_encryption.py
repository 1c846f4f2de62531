"""Encrypted repositories without QEMU: format test vectors, an independent decryptor, keys, refusals."""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import cli
import pytest
import zstandard
from argon2.low_level import Type, hash_secret_raw
from blake3 import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from nbdbackup.errors import EncryptionMismatch, RepositoryDamaged
from nbdbackup.repository import Repository, crypto, keys

GOLDENS = [Path(__file__).parent / "golden" / name for name in ("v2-encrypted", "v3-encrypted")]
GOLDEN = GOLDENS[0]
MASTER = bytes(range(32))
PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def env(tmp_path, monkeypatch):
    cli.use_passphrase(monkeypatch, tmp_path, PASSPHRASE, cheap_keys=True)  # these tests are about keys
    return tmp_path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- test vectors of docs/FORMAT.md, "Encryption" ---------------------------------

def test_vectors():
    assert crypto.derive(MASTER, crypto.OBJECT_CONTEXT).hex() == "4254ffb8070706697062111e0088c1baa740b109c9550ded14ac94411d42e155"
    assert crypto.derive(MASTER, crypto.LOCAL_CONTEXT).hex() == "db26f51d0af64877715ed9250bb58cdb3244f349cd38aa42e5d58d614bf91814"
    c = crypto.Cipher(MASTER)
    sealed = c.seal("vms/vm1/checkpoints.json", b"nbdbackup", nonce=bytes(range(12)))
    assert sealed.hex() == "4e42444501010000000102030405060708090a0be7007ac2b3fa45776363e1990250ca589b154dcfd4eddc4c24"
    assert c.open("vms/vm1/checkpoints.json", sealed) == b"nbdbackup"
    assert c.encrypt_name("vm", "", "vm1") == ("qx3ype4qaeq6ufdkq4j3kejnopthoykrc3m36eaisg3ccw5i2zsu5nyklaxsasv37zquwiyq2ic6ehltlvqokbk3qr2"
                                              "mmlmciejuw3bmnp65g6ty4u74mp7kaxh6sehu")
    assert c.decrypt_name("vm", "", c.encrypt_name("vm", "", "vm1")) == "vm1"
    assert c.decrypt_name("checkpoint", "vm1", c.encrypt_name("vm", "", "vm1")) is None  # a name moved elsewhere
    assert c.local_name("vm1") == "k32217fcf00e352662abee983"
    kdf = {"algorithm": "argon2id", "iterations": 1, "lanes": 1, "memory_cost": 47104, "salt": "AAAAAAAAAAAAAAAAAAAAAA=="}
    assert keys._start_kek(b"nbdbackup", kdf)().hex() == "266561d9f6854f4508f4947f49ce4aae7b8bfb3961cdda7c8b902a09bb1ae1d6"


def test_object_bound_to_its_name_and_content():
    c = crypto.Cipher(MASTER)
    sealed = c.seal("vms/a/checkpoints.json", b"x" * 100)
    with pytest.raises(RepositoryDamaged, match="authentication"):
        c.open("vms/b/checkpoints.json", sealed)  # moved to another name
    for i in (0, 10, len(sealed) - 1):
        flipped = bytearray(sealed)
        flipped[i] ^= 1
        with pytest.raises(RepositoryDamaged):
            c.open("vms/a/checkpoints.json", bytes(flipped))
    with pytest.raises(RepositoryDamaged, match="truncated"):
        c.open("vms/a/checkpoints.json", sealed[:20])
    assert c.seal("k", b"same") != c.seal("k", b"same")  # a fresh nonce each time


# -- another program can decrypt a repository from docs/FORMAT.md alone -------------

def independent_read(repo: Path, passphrase: bytes) -> dict[str, dict[str, bytes]]:
    """Decrypt the golden repository with cryptography, argon2-cffi, blake3 and zstandard only, as FORMAT.md says."""
    config = json.loads((repo / "config.json").read_text())
    master = None
    for path in (repo / "keys").iterdir():
        k = json.loads(path.read_text())
        kek = hash_secret_raw(passphrase, base64.b64decode(k["kdf"]["salt"]), time_cost=k["kdf"]["iterations"],
                              memory_cost=k["kdf"]["memory_cost"], parallelism=k["kdf"]["lanes"], hash_len=32, type=Type.ID)
        aad = b"nbdbackup key v1\0" + config["id"].encode() + b"\0" + k["id"].encode()
        master = AESGCM(kek).decrypt(base64.b64decode(k["nonce"]), base64.b64decode(k["wrapped"]), aad)

    def dk(context, n=32):
        return blake3(master, derive_key_context=context).digest(length=n)

    aead, siv = AESGCM(dk("nbdbackup 2026-11 object key v2")), AESSIV(dk("nbdbackup 2026-11 name key v2", 64))
    chunk_key = dk("nbdbackup 2026-11 chunk id key v2")
    piece_key, root_key = dk("nbdbackup 2026-11 chunk piece key v3"), dk("nbdbackup 2026-11 chunk root key v3")

    def chunk_content(chunk: bytes, cid: bytes) -> bytes:
        """A chunk file's content, checked against its id (FORMAT.md, "Chunk files")."""
        version, encoding, clen = chunk[4], chunk[5], struct.unpack_from("<I", chunk, 8)[0]
        if version == 1:
            assert config["version"] == 2 and config["chunk_id"] == {"algorithm": "blake3-keyed"}
            data = zstandard.ZstdDecompressor().decompress(chunk[12:], max_output_size=clen) if encoding == 1 else chunk[12:]
            assert blake3(data, key=chunk_key).digest() == cid
            return data
        assert version == 2 and config["version"] == 3 and config["chunk_id"]["algorithm"] == "blake3-tree-keyed"
        piece = config["chunk_id"]["piece"]
        assert 1 << chunk[6] == piece
        k = -(-clen // piece)
        table = chunk[12:12 + 32 * k]
        assert blake3(struct.pack("<IQ", piece, clen) + table, key=root_key).digest() == cid
        at = 12 + 32 * k + (4 * k if encoding == 1 else 0)
        parts = []
        for i in range(k):
            if encoding == 1:
                n = struct.unpack_from("<I", chunk, 12 + 32 * k + 4 * i)[0]
                part = zstandard.ZstdDecompressor().decompress(chunk[at:at + n], max_output_size=piece)
            else:
                n = min(piece, clen - i * piece)
                part = chunk[at:at + n]
            assert blake3(part, key=piece_key).digest() == table[32 * i:32 * i + 32]
            parts.append(part)
            at += n
        assert at == len(chunk)
        return b"".join(parts)

    def name(text, role, parent):
        raw = siv.decrypt(base64.b32decode(text.upper() + "=" * (-len(text) % 8)), [role.encode(), parent.encode()])
        return raw.rstrip(b"\0").decode()

    def obj(path: Path, key: str) -> bytes:
        blob = path.read_bytes()
        assert blob[:8] == b"NBDE\x01\x01\x00\x00"
        return aead.decrypt(blob[8:20], blob[20:], blob[:8] + key.encode())

    disks: dict[str, dict[str, bytes]] = {}
    for vmdir in (repo / "vms").iterdir():
        vm = name(vmdir.name, "vm", "")
        for bdir in (vmdir / "backups").iterdir():
            cp = name(bdir.name, "checkpoint", vm)
            manifest = json.loads(obj(bdir / "manifest.json", f"vms/{vm}/backups/{cp}/manifest.json"))
            assert manifest["vm"] == vm and manifest["checkpoint"] == cp
            for d in manifest["disks"]:
                [disk_file] = [p for p in bdir.iterdir() if p.name.endswith(".index") and name(p.name[:-6], "disk", f"{vm}/{cp}") == d["id"]]
                idx = obj(disk_file, f"vms/{vm}/backups/{cp}/{d['id']}.index")
                _magic, _ver, _esz, size, count = struct.unpack_from("<8sIIQQ", idx)
                image = bytearray(size)
                for i in range(count):
                    off, length, coff, cid = struct.unpack_from("<QII32s", idx, 32 + 48 * i)
                    h = cid.hex()
                    data = chunk_content(obj(repo / "chunks" / h[:2] / h, f"chunks/{h[:2]}/{h}"), cid)
                    image[off:off + length] = data[coff:coff + length]
                disks.setdefault(cp, {})[d["id"]] = bytes(image)
    return disks


@pytest.mark.parametrize("golden", GOLDENS, ids=lambda p: p.name)
def test_golden_encrypted_repository_decrypts_without_nbdbackup(golden):
    import hashlib

    expected = json.loads((golden / "expected.json").read_text())
    disks = independent_read(golden / "repo", (golden / "passphrase").read_text().strip().encode())
    assert {cp: {d: hashlib.sha256(b).hexdigest() for d, b in v.items()} for cp, v in disks.items()} == expected


# -- the repository API -----------------------------------------------------------

def test_round_trip_dedup_and_no_names(env):
    repo = Repository.open(env / "r", create=True, encryption="repokey")
    data = os.urandom(1000) * 100
    cid = repo.chunk_id(data)
    assert repo.put_chunk(cid, data, 3) > 0 and repo.put_chunk(cid, data, 3) == 0  # same key, same content, one chunk
    assert cid != blake3(data).digest()  # keyed: the store cannot test a guess
    repo.save_checkpoints("secretvm", [])
    assert repo.vms() == ["secretvm"]
    assert not any("secretvm" in p for p in tree(env / "r"))
    again = Repository.open(env / "r", create=False)
    assert again.get_chunk(cid, "t") == data and again.vms() == ["secretvm"]
    other = Repository.open(env / "r2", create=True, encryption="repokey")
    assert other.chunk_id(data) != cid  # another repository, another key: chunks cannot be linked across them


def test_config_tampering_is_detected(env):
    Repository.open(env / "r", create=True, encryption="repokey")
    conf = env / "r" / "config.json"
    doc = json.loads(conf.read_text())
    doc["chunk_id"]["algorithm"] = "blake3"  # a store trying to get unkeyed, guessable ids
    conf.write_text(json.dumps(doc))
    with pytest.raises(RepositoryDamaged, match="authentication"):
        Repository.open(env / "r", create=False)


def test_encryption_asked_for_but_repository_is_plain(env):
    Repository.open(env / "r", create=True)
    with pytest.raises(EncryptionMismatch):
        Repository.open(env / "r", encryption="repokey")


# -- the command line: init, key management, refusals ----------------------------

def test_key_errors_one_line_distinct_codes_nothing_changed(env, monkeypatch):
    repo = env / "repo"
    cli.run(repo, "init", "--encryption", "repokey")
    before = tree(repo)
    monkeypatch.delenv("NBDBACKUP_PASSWORD_FILE")
    assert "no passphrase" in cli.run(repo, "list", expect=18).stderr
    wrong = env / "wrong"
    wrong.write_text("nope\n")
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(wrong))
    assert "wrong passphrase" in cli.run(repo, "list", expect=19).stderr
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(env / "pw"))
    monkeypatch.setenv("NBDBACKUP_PASSWORD_COMMAND", "exit 3")
    monkeypatch.setenv("NBDBACKUP_KEY_FILE", str(env / "missing.json"))
    assert "missing" in cli.run(repo, "verify", "vm1", expect=18).stderr
    monkeypatch.delenv("NBDBACKUP_KEY_FILE")
    other = env / "other"
    cli.run(other, "init", "--encryption", "keyfile")
    [other_key] = (env / "xdg" / "nbdbackup" / "keys").iterdir()
    monkeypatch.setenv("NBDBACKUP_KEY_FILE", str(other_key))
    assert "another repository" in cli.run(repo, "list", expect=20).stderr
    bad = env / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv("NBDBACKUP_KEY_FILE", str(bad))
    assert "damaged" in cli.run(repo, "list", expect=21).stderr
    monkeypatch.delenv("NBDBACKUP_KEY_FILE")
    monkeypatch.delenv("NBDBACKUP_PASSWORD_FILE")
    assert "exited with status 3" in cli.run(repo, "list", expect=18).stderr
    assert tree(repo) == before
    # A damaged stored key (repokey): exit 21 as well.
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(env / "pw"))
    [stored] = (repo / "keys").iterdir()
    stored.write_text(stored.read_text().replace('"wrapped": "', '"wrapped": "!'))
    cli.run(repo, "list", expect=21)


def test_init_twice_and_plain_repository_refusals(env):
    repo = env / "repo"
    cli.run(repo, "init")
    assert "encryption" not in json.loads((repo / "config.json").read_text())
    cli.run(repo, "init", "--encryption", "repokey", expect=7)
    cli.run(repo, "key", "list", expect=22)
    conf = env / "c.toml"
    conf.write_text('encryption = "keyfile"\n')
    assert "not encrypted" in cli.run(repo, "--config", str(conf), "list", expect=22).stderr


def test_key_add_passwd_remove_export(env, monkeypatch):
    repo = env / "repo"
    cli.run(repo, "init", "--encryption", "repokey")
    data_before = {k: v for k, v in tree(repo).items() if not k.startswith("keys/")}
    second = env / "second"
    second.write_text("second passphrase\n")
    monkeypatch.setenv("NBDBACKUP_NEW_PASSWORD_FILE", str(second))
    added = cli.run(repo, "key", "add").stdout.split()[-1]
    rows = json.loads(cli.run(repo, "key", "list", "--json").stdout)
    assert len(rows) == 2 and [r["id"] for r in rows if not r["current"]] == [added]
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(second))
    assert json.loads(cli.run(repo, "key", "list", "--json").stdout)[[r["id"] for r in rows].index(added)]["current"]

    # passwd: the key of the current passphrase is replaced; the old passphrase stops working.
    third = env / "third"
    third.write_text("third passphrase\n")
    monkeypatch.setenv("NBDBACKUP_NEW_PASSWORD_FILE", str(third))
    cli.run(repo, "key", "passwd")
    cli.run(repo, "list", expect=19)
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(third))
    cli.run(repo, "list")

    # export, then remove every stored key but one; the exported file still opens the repository.
    exported = env / "export.json"
    cli.run(repo, "key", "export", str(exported))
    ids = [r["id"] for r in json.loads(cli.run(repo, "key", "list", "--json").stdout)]
    first = next(i for i in ids if not json.loads(cli.run(repo, "key", "list", "--json").stdout)[ids.index(i)]["current"])
    cli.run(repo, "key", "remove", first)
    [last] = [r["id"] for r in json.loads(cli.run(repo, "key", "list", "--json").stdout)]
    assert "last key" in cli.run(repo, "key", "remove", last, expect=22).stderr
    cli.run(repo, "key", "remove", "0000000000000000", expect=2)
    # data never re-encrypted: only keys/ changed
    assert {k: v for k, v in tree(repo).items() if not k.startswith("keys/")} == data_before
    for p in (repo / "keys").iterdir():
        p.unlink()
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(env / "pw"))  # the first passphrase is in the export
    monkeypatch.setenv("NBDBACKUP_KEY_FILE", str(exported))
    cli.run(repo, "list")


def test_keyfile_mode_keeps_the_key_out_of_the_repository(env, monkeypatch):
    repo = env / "repo"
    out = cli.run(repo, "init", "--encryption", "keyfile").stdout
    assert "back it up" in out
    assert not (repo / "keys").exists()
    [key_file] = (env / "xdg" / "nbdbackup" / "keys").iterdir()
    assert key_file.stat().st_mode & 0o077 == 0
    cli.run(repo, "list")
    key_file.rename(env / "elsewhere.json")
    cli.run(repo, "list", expect=18)
    monkeypatch.setenv("NBDBACKUP_KEY_FILE", str(env / "elsewhere.json"))
    cli.run(repo, "list")


# -- copy between repositories with different keys: re-encrypted for the target -------

@pytest.mark.parametrize("kinds", [("none", "repokey"), ("repokey", "repokey"), ("repokey", "none")])
def test_copy_reencrypts_for_the_target(kinds, env):
    from test_repository import manifest

    from nbdbackup.capture import CancelToken
    from nbdbackup.copy import CopyRequest, copy_backups
    from nbdbackup.records import IndexEntry
    from nbdbackup.repository.memory import MemoryBackend

    source = Repository.open(MemoryBackend("s"), create=True, encryption=kinds[0], passphrase=b"source passphrase")
    target = Repository.open(MemoryBackend("t"), create=True, encryption=kinds[1], passphrase=b"target passphrase")
    data = [bytes([i + 1]) * 4096 for i in range(3)]
    for d in data:
        source.put_chunk(source.chunk_id(d), d, 3)
    m = manifest(source, cp="cp1", entries=[IndexEntry(i * 4096, 4096, source.chunk_id(d)) for i, d in enumerate(data)])
    source.commit(m)
    report = copy_backups(source, target, CopyRequest("vm1", every=True), cancel=CancelToken())
    assert [(b.copied, b.chunks_sent) for b in report.backups] == [(True, 3)]
    [copied] = target.manifests("vm1")
    size, entries = target.read_index(copied, "vda")
    assert [target.get_chunk(e.chunk, "t") for e in entries] == data
    assert {e.chunk for e in entries} == {target.chunk_id(d) for d in data} != {source.chunk_id(d) for d in data}
    if target.encrypted:  # nothing in the target's store is readable with the source's keys, nor in plain
        raw = target.backend.inner
        for key in raw.list("chunks"):
            with pytest.raises(RepositoryDamaged):
                (source.cipher or crypto.Cipher(bytes(32))).open(key, raw.read(key))
    again = copy_backups(source, target, CopyRequest("vm1", every=True), cancel=CancelToken())
    assert [b.copied for b in again.backups] == [False]


def test_swapped_chunk_fails_authentication(env):
    """A chunk file put in another chunk's place is caught on read: its name is authenticated."""
    repo = Repository.open(env / "r", create=True, encryption="repokey")
    a, b = os.urandom(5000), os.urandom(7000)
    ca, cb = repo.chunk_id(a), repo.chunk_id(b)
    repo.put_chunk(ca, a, 3)
    repo.put_chunk(cb, b, 3)
    pa, pb = (env / "r" / repo._chunk_key(c) for c in (ca, cb))
    pa.write_bytes(pb.read_bytes())
    with pytest.raises(RepositoryDamaged, match="authentication"):
        repo.get_chunk(ca, "backup x, disk vda, offset 0")
    assert repo.get_chunk(cb, "t") == b


def derived_in_child(passphrase: bytes, params: tuple[bytes, int, int, int]) -> bytes | None:
    """Argon2id as the forked child computes it; None when the child gave no answer."""
    child = keys._fork_argon2id(passphrase, params)
    assert child is not None
    return keys._collect_argon2id(*child)


def test_key_derivation_in_a_child_process_and_kept_for_the_run(env, monkeypatch):
    """Argon2id runs in a forked child (its memory never counts in the backup's), with the
    same result; a run that opens the repository again reuses the master key, and a wrong
    passphrase is still refused after a right one."""
    params = (bytes(16), 1, 1, 8192)
    assert derived_in_child(b"nbdbackup", params) == keys._argon2id(b"nbdbackup", params)
    with monkeypatch.context() as m:  # a child that does not answer in time is killed; derived here instead
        m.setattr(keys, "CHILD_TIMEOUT", 0.0)
        assert derived_in_child(b"nbdbackup", (bytes(16), 4, 1, 65536)) is None
        kdf = {"algorithm": "argon2id", "iterations": 1, "lanes": 1, "memory_cost": 8192, "salt": "AAAAAAAAAAAAAAAAAAAAAA=="}
        assert keys._start_kek(b"nbdbackup", kdf)() == keys._argon2id(b"nbdbackup", params)
    Repository.open(env / "r", create=True, encryption="repokey")
    derivations = []
    real = keys._start_kek
    monkeypatch.setattr(keys, "_start_kek", lambda *args: derivations.append(1) or real(*args))
    first = Repository.open(env / "r", create=False)
    second = Repository.open(env / "r", create=False)
    assert len(derivations) == 1 and first.cipher.master_key == second.cipher.master_key
    wrong = env / "wrong"
    wrong.write_text("not it\n")
    monkeypatch.setenv("NBDBACKUP_PASSWORD_FILE", str(wrong))
    with pytest.raises(keys.WrongPassphrase):
        Repository.open(env / "r", create=False)


def test_rollback_marker_of_an_encrypted_repository_names_nothing(env):
    """The marker of a rollback under way lives in the repository's directory: keyed name, encrypted content."""
    from types import SimpleNamespace

    from nbdbackup.rollback import Marker

    repo = Repository.open(env / "r", create=True, encryption="repokey")
    marker = Marker(repo, "secretvm")
    marker.write(SimpleNamespace(checkpoint="secretcp", disks=[SimpleNamespace(disk="secretdisk")]))
    assert "secretvm" not in str(marker.path) and marker.path.read_bytes()[:4] == b"NBDE"
    assert not any(s in marker.path.read_bytes() for s in (b"secretcp", b"secretdisk"))
    assert Marker(Repository.open(env / "r", create=False), "secretvm").read()["checkpoint"] == "secretcp"
    assert Marker(repo, "othervm").read() is None
    plain = Repository.open(env / "p", create=True)
    Marker(plain, "vm1").write(SimpleNamespace(checkpoint="cp", disks=[]))
    assert json.loads((env / "p" / "rollbacks" / "vm1.json").read_text())["checkpoint"] == "cp"  # unchanged format


def test_chunk_decrypted_where_it_was_read_in_one_call(monkeypatch):
    """A restore's chunk is decrypted in the buffer it was read into (no second buffer, no copy):
    the plaintext is a view of that buffer, equal to what was sealed, and the decryption is one
    call into the library (the GIL released throughout), whatever the chunk's size.  A flipped
    byte still fails authentication, and so does an object cut short."""
    c = crypto.Cipher(MASTER)
    for size in (0, 1, 4096, 3 * 65536 + 7, 4 << 20):
        data = os.urandom(size)
        sealed = bytearray(c.seal("chunks/ab/abcd", data))
        plain = c.open_in_place("chunks/ab/abcd", memoryview(sealed))
        assert plain.obj is sealed and bytes(plain) == data
        assert bytes(sealed[len(sealed) - crypto.TAG_SIZE:]) == c.seal("chunks/ab/abcd", data, nonce=bytes(sealed[8:20]))[-crypto.TAG_SIZE:]
    calls = []

    class Counting:  # the library's decryptor, its calls counted
        def __init__(self, inner):
            self.inner = inner

        def update_into(self, data, buf):
            calls.append(len(data))
            return self.inner.update_into(data, buf)

        def finalize(self):
            return self.inner.finalize()

    real = crypto.Cipher._decryptor
    monkeypatch.setattr(crypto.Cipher, "_decryptor", lambda self, *args: Counting(real(self, *args)))
    sealed = bytearray(c.seal("chunks/ab/abcd", bytes(4 << 20)))
    assert bytes(c.open_in_place("chunks/ab/abcd", memoryview(sealed))) == bytes(4 << 20)
    assert calls == [4 << 20]
    for damage in (lambda b: b.__setitem__(100, b[100] ^ 1), lambda b: b.__delitem__(slice(-1, None))):
        sealed = bytearray(c.seal("chunks/ab/abcd", os.urandom(1000)))
        damage(sealed)
        with pytest.raises(RepositoryDamaged, match="authentication"):
            c.open_in_place("chunks/ab/abcd", memoryview(sealed))


def test_chunk_encrypted_while_written_through_a_small_buffer(tmp_path):
    """A chunk is encrypted into the directory in slices of SEAL_SLICE bytes (a small buffer per
    thread, not one the size of a chunk) and reads back as the whole object seal() makes."""
    from nbdbackup.repository.backend import LocalBackend

    assert crypto.SEAL_SLICE <= 256 * 1024
    c = crypto.Cipher(MASTER)
    data = os.urandom(4 << 20)
    parts = list(c.seal_stream("chunks/ab/abcd", [data[:1000], data[1000:]]))
    assert max(len(p) for p in parts) <= crypto.SEAL_SLICE
    backend = crypto.EncryptedBackend(LocalBackend(tmp_path), c)
    backend.write("chunks/ab/abcd", [data[:1000], data[1000:]])
    assert backend.read("chunks/ab/abcd") == data
    assert len((tmp_path / "chunks/ab/abcd").read_bytes()) == len(data) + crypto.OVERHEAD


def test_key_derivation_overlaps_loading_the_library(tmp_path):
    """Opening a key forks the Argon2id child before the cryptography package is imported, so the
    two overlap instead of adding up at every start; the child is reaped even when the import
    fails.  In a fresh interpreter: this one has the library loaded already."""
    import subprocess
    import sys

    doc = keys.wrap(MASTER, b"pw", "repo", {"algorithm": "argon2id", "iterations": 1, "lanes": 1, "memory_cost": 8})
    script = '''
import json, os, sys
from nbdbackup.repository import keys
doc = json.loads(sys.argv[1])
assert not [m for m in sys.modules if m.startswith("cryptography")]
seen = []
real = keys._fork_argon2id
keys._fork_argon2id = lambda *a: seen.append("cryptography.hazmat.primitives.ciphers.aead" in sys.modules) or real(*a)
assert keys.unwrap(doc, b"pw", "repo") == bytes(range(32))
assert seen == [False], seen  # the first key opened: the library was not loaded when the child started
assert keys.unwrap(doc, b"not it", "repo") is None
sys.modules["cryptography.hazmat.primitives.ciphers.aead"] = None  # the import fails
try:
    keys.unwrap(doc, b"pw", "repo")
except ImportError:
    pass
else:
    raise AssertionError("the import did not fail")
try:
    os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    print("reaped")
'''
    done = subprocess.run([sys.executable, "-c", script, json.dumps(doc)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reaped"

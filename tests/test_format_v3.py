"""Repository format version 3: tree chunk ids over 256 KiB pieces and chunk file version 2
(docs/FORMAT.md, "Chunk ids" and "Chunk file version 2"), beside versions 1 and 2."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import zstandard
from blake3 import blake3

from nbdbackup.errors import RepositoryDamaged
from nbdbackup.repository import FORMAT_VERSION, Repository, chunks
from nbdbackup.repository.chunkid import ChunkIds

GOLDEN = Path(__file__).parent / "golden"
KiB = 1024
PIECE = 256 * KiB


def test_tree_id_test_vectors():
    """The values docs/FORMAT.md lists: they are the format."""
    unkeyed = ChunkIds.tree()
    assert unkeyed.algorithm == "blake3-tree" and unkeyed.config() == {"algorithm": "blake3-tree", "piece": PIECE}
    assert blake3(b"nbdbackup unkeyed", derive_key_context="nbdbackup 2026-11 chunk piece key v3").hexdigest() == \
        "327b0604edbe78be3a248f96e265e2b2f25b8f86637c09517cb557992a1fcb58"
    assert blake3(b"nbdbackup unkeyed", derive_key_context="nbdbackup 2026-11 chunk root key v3").hexdigest() == \
        "17667dcd39b73da0d3934910920f30770255632372c1bcf1257cd1eb0cc5c63f"
    assert unkeyed(b"nbdbackup").hex() == "4214420f015e5c58218570d57a58b33495fa4e36f24419326f0290fdf15e9cbe"
    two_pieces = bytes(range(256)) * 1200
    assert unkeyed(two_pieces).hex() == "e7d6079f0baf870e72ea2154f005c8c87ef5011363d52fd22b56fa262d179d81"
    assert unkeyed(b"").hex() == "4a8b5c8c168f34162253e2c9b2b8968839f6dc2aa537788c8573e468c8144091"
    keyed = ChunkIds.tree(bytes(range(32)))
    assert keyed.algorithm == "blake3-tree-keyed"
    assert keyed(b"nbdbackup").hex() == "3bfe218dfe1311690d700e914fcff2dff5ca1983839c856b1404c373c5fe9d9d"
    # the definition, spelled out: the root over the piece size, the length and the pieces' hashes
    piece_key = blake3(b"nbdbackup unkeyed", derive_key_context="nbdbackup 2026-11 chunk piece key v3").digest()
    root_key = blake3(b"nbdbackup unkeyed", derive_key_context="nbdbackup 2026-11 chunk root key v3").digest()
    hashes = [blake3(two_pieces[at:at + PIECE], key=piece_key).digest() for at in (0, PIECE)]
    assert unkeyed(two_pieces) == blake3(struct.pack("<IQ", PIECE, len(two_pieces)) + b"".join(hashes), key=root_key).digest()
    assert unkeyed.with_pieces(two_pieces) == (unkeyed(two_pieces), tuple(hashes))
    with pytest.raises(ValueError):
        ChunkIds.tree(b"short")


@pytest.mark.parametrize("content, encoding", [
    (b"".join(b"line %d\n" % i for i in range(120_000))[:3 * PIECE + 777], chunks.ZSTD),  # 4 pieces, the last short
    (bytes(range(256)) * 4096, chunks.ZSTD),  # exactly 4 pieces
    (__import__("random").Random(7).randbytes(PIECE + 1), chunks.STORED),  # incompressible: 2 pieces as they are
    (b"x" * 100, chunks.ZSTD),  # one short piece
])
def test_new_repositories_write_version_3_chunk_files(tmp_path, content, encoding):
    """A new repository is version 3; its chunk files hold the pieces' hashes and, compressed, one
    zstd frame per piece that decompresses alone, as FORMAT.md lays them out."""
    assert FORMAT_VERSION == 3
    repo = Repository.open(tmp_path / "r", create=True)
    config = json.loads((tmp_path / "r/config.json").read_text())
    assert config["version"] == 3 and config["chunk_id"] == {"algorithm": "blake3-tree", "piece": PIECE}
    cid = repo.chunk_id(content)
    assert repo.put_chunk(cid, content, 1) > 0
    blob = (tmp_path / "r/chunks" / cid.hex()[:2] / cid.hex()).read_bytes()
    magic, version, enc, shift, reserved, length = struct.unpack_from("<4sBBBBI", blob)
    assert (magic, version, enc, shift, reserved, length) == (b"NBDC", 2, encoding, 18, 0, len(content))
    k = -(-len(content) // PIECE)
    table = blob[12:12 + 32 * k]
    assert table == b"".join(repo.chunk_id.piece_hashes(content))
    at = 12 + 32 * k
    if encoding == chunks.ZSTD:
        lengths = struct.unpack_from(f"<{k}I", blob, at)
        at += 4 * k
        assert sum(lengths) == len(blob) - at
        for i, n in enumerate(lengths):  # each frame alone gives its piece
            frame = blob[at:at + n]
            assert zstandard.ZstdDecompressor().decompress(frame, max_output_size=PIECE) == content[i * PIECE:(i + 1) * PIECE]
            at += n
    else:
        assert blob[at:] == content
    assert Repository.open(tmp_path / "r", create=False).get_chunk(cid, "t") == content


def test_backup_data_of_a_version_1_chunk_file_in_a_version_3_repository_is_damage(tmp_path):
    repo = Repository.open(tmp_path / "r", create=True)
    data = b"abc" * 100_000
    cid = repo.chunk_id(data)
    path = tmp_path / "r/chunks" / cid.hex()[:2] / cid.hex()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(bytes(p) for p in chunks.encode(data, 1)))  # version 1: no pieces' hashes
    with pytest.raises(RepositoryDamaged, match="bad header"):
        repo.get_chunk(cid, "t")


@pytest.mark.parametrize("version, chunk_id, message", [
    (3, {"algorithm": "blake3"}, "in a version 3 repository"),
    (2, {"algorithm": "blake3-tree", "piece": PIECE}, "in a version 2 repository"),
    (3, {"algorithm": "blake3-tree"}, "bad chunk piece size None"),
    (3, {"algorithm": "blake3-tree", "piece": 3000}, "bad chunk piece size"),
    (3, {"algorithm": "blake3-tree", "piece": 300 * KiB}, "bad chunk piece size"),
    (3, {"algorithm": "blake3-tree", "piece": True}, "bad chunk piece size"),
    (3, {"algorithm": "blake3-tree-keyed", "piece": PIECE}, "without an .encryption. member"),
])
def test_version_3_config_chunk_id_is_checked(tmp_path, version, chunk_id, message):
    Repository.open(tmp_path / "r", create=True)
    conf = tmp_path / "r/config.json"
    doc = json.loads(conf.read_text())
    doc["version"], doc["chunk_id"] = version, chunk_id
    conf.write_text(json.dumps(doc))
    with pytest.raises(RepositoryDamaged, match=message):
        Repository.open(tmp_path / "r", create=False)


def test_encrypted_repository_with_unkeyed_ids_is_damage():
    with pytest.raises(RepositoryDamaged, match="unkeyed chunk ids"):
        ChunkIds.for_config(3, {"chunk_id": {"algorithm": "blake3-tree", "piece": PIECE}}, "x", master_key=bytes(32))


def test_a_chunk_whose_table_does_not_match_its_id_is_refused(tmp_path):
    """The pieces' hashes are trusted only once they hash to the chunk's name: a chunk file
    with another chunk's table (and its pieces) under this name is refused."""
    repo = Repository.open(tmp_path / "r", create=True)
    a, b = b"a" * (PIECE + 5), b"b" * (PIECE + 5)
    ca, cb = repo.chunk_id(a), repo.chunk_id(b)
    repo.put_chunk(cb, b, 1)
    other = tmp_path / "r/chunks" / cb.hex()[:2] / cb.hex()
    mine = tmp_path / "r/chunks" / ca.hex()[:2] / ca.hex()
    mine.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(other, mine)
    with pytest.raises(RepositoryDamaged, match="fails its checksum"):
        repo.get_chunk(ca, "t")
    out = memoryview(bytearray(10))
    with pytest.raises(RepositoryDamaged, match="fails its checksum"):
        repo.read_chunk_ranges(ca, "t", [(0, 10)], out, memoryview(bytearray(chunks.STEP)))


def test_copy_from_version_2_into_version_3_re_encodes_the_chunks(tmp_path):
    """A version 2 repository's chunk files (one frame, no pieces' hashes) are re-encoded for a
    version 3 target; the copy restores the same bytes and verifies."""
    from nbdbackup.capture import CancelToken
    from nbdbackup.copy import CopyRequest, copy_backups

    shutil.copytree(GOLDEN / "v2" / "repo", tmp_path / "v2")
    source = Repository.open(tmp_path / "v2", create=False)
    target = Repository.open(tmp_path / "v3", create=True)
    report = copy_backups(source, target, CopyRequest("golden", every=True), cancel=CancelToken())
    assert [b.copied for b in report.backups] == [True, True]
    for m in target.manifests("golden"):
        for d in m.disks:
            _, src_entries = source.read_index(source.manifest("golden", m.checkpoint), d.id)
            _, entries = target.read_index(m, d.id)
            assert [(e.offset, e.length, e.chunk_offset) for e in entries] == [(e.offset, e.length, e.chunk_offset) for e in src_entries]
            for e, s in zip(entries, src_entries, strict=True):
                assert target.get_chunk(e.chunk, "t") == source.get_chunk(s.chunk, "t")
                blob = (tmp_path / "v3/chunks" / e.chunk.hex()[:2] / e.chunk.hex()).read_bytes()
                assert blob[4] == 2

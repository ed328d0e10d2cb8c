"""The release's tar members and shards: json with `balance`, atomic and deterministic shard
writes byte-identical to tarfile's, member offsets read back from webdataset, GNU and PAX tars.
"""
import hashlib
import io
import json

import numpy as np
import pytest
import webdataset

from pipeline import release, tars


def test_release_members_keep_bytes_and_add_balance_to_json():
    sample = {
        "key": "k1",
        "members": {"jpg": b"\xff\xd8jpeg", "txt": b"a man", "json": b'{"a": 1, "key": "k1"}'},
        "meta": {"a": 1, "key": "k1"}, "caption": "a man"
    }
    members = dict(release.release_members(sample, {"q": 0.5, "weight": 1.0}))
    assert members["jpg"] == b"\xff\xd8jpeg" and members["txt"] == b"a man"
    assert json.loads(
        members["json"]) == {"a": 1, "key": "k1", "balance": {"q": 0.5, "weight": 1.0}}
    table_row = {"key": "7", "members": {}, "meta": {"image_id": 3}, "caption": "a woman"}
    members = dict(release.release_members(table_row, {"q": 1.0, "weight": 1.0}))
    assert members["txt"] == b"a woman"
    assert json.loads(members["json"])["key"] == "7"


def test_write_shard_is_atomic_deterministic_and_readable(tmp_path):
    samples = [(f"{i:04d}", [("txt", f"caption {i}".encode()), ("json", b"{}")]) for i in range(5)]
    info = tars.write_shard(str(tmp_path / "x-00000.tar"), samples)
    data = (tmp_path / "x-00000.tar").read_bytes()
    assert info == {"name": "x-00000.tar", "samples": 5, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
    assert data == tars.tar_bytes(samples)
    assert [p.name for p in tmp_path.iterdir()] == ["x-00000.tar"]
    read = list(webdataset.WebDataset(str(tmp_path / "x-00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == [key for key, _ in samples]
    assert read[3]["txt"] == b"caption 3"


def _tarfile_shard(samples) -> bytes:
    """The shard tarfile itself writes (PAX format, fixed headers): what tars.tar_bytes must equal.
    """
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for key, members in samples:
            for extension, data in members:
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), 0, 0o444, 0, 0, "", "")
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_shard_bytes_are_the_ones_tarfile_writes_for_plain_long_and_non_ascii_names():
    rng = np.random.default_rng(5)
    names = ["a", "x" * 96, "y" * 97, "z" * 150, "ключ", "dir/sub/k", "sp ace"]
    for trial in range(40):
        def payload():
            size = int(rng.choice([0, 1, 511, 512, 513, rng.integers(3000)]))
            return rng.integers(0, 256, size, dtype=np.uint8).tobytes()

        samples = [(f"{names[rng.integers(len(names))]}{i}",
                    [(extension, payload())
                     for extension in ("jpg", "txt", "json")[:rng.integers(1, 4)]])
                   for i in range(int(rng.integers(0, 12)))]
        assert tars.tar_bytes(samples) == _tarfile_shard(samples), trial


def test_member_offsets_agree_with_tarfile_and_leave_out_what_they_cannot_be_sure_of(tmp_path):
    import tarfile

    samples = [(f"k{i}", [("jpg", bytes([i]) * (700 * i)), ("txt", b"caption")]) for i in range(6)]
    samples.append(("p" * 120, [("jpg", b"long name, written with a pax record" * 200)]))
    path = tmp_path / "x.tar"
    path.write_bytes(tars.tar_bytes(samples))
    with open(path, "rb") as raw:
        offsets = tars.tar_member_offsets(raw)
    with tarfile.open(path) as archive:
        truth = {m.name: (m.offset_data, m.size) for m in archive.getmembers()}
    # the long name, written with a pax record, is found by that record
    assert set(offsets) == {f"k{i}.{e}"
                            for i in range(6)
                            for e in ("jpg", "txt")} | {"p" * 120 + ".jpg"}
    assert all(offsets[name] == [truth[name]] for name in offsets)
    with open(path, "rb") as raw:
        data = raw.read()
    for key, members in samples[:6]:
        located = tars.locate_members(key, dict(members), offsets)
        kinds = {extension: type(value) for extension, value in located}
        assert kinds == {
            "jpg": tuple if len(dict(members)["jpg"]) > tars.INLINE_MEMBER_BYTES else bytes,
            "txt": bytes
        }
        back = tars.read_members(located, lambda offset, size: data[offset:offset + size])
        assert back == dict(members)
    # A name seen twice, or a size that differs from what the reader saw, is not trusted: inline.
    big = b"j" * (tars.INLINE_MEMBER_BYTES + 1)
    assert tars.locate_members("k", {"jpg": big}, {"k.jpg": [(512, len(big)),
                                                             (9000, len(big))]}) == [("jpg", big)]
    assert tars.locate_members("k", {"jpg": big},
                               {"k.jpg": [(512, len(big) + 1)]}) == [("jpg", big)]


def test_member_offsets_of_webdataset_and_gnu_tars(tmp_path):
    """webdataset's TarWriter (and so img2dataset) puts a pax header before every member: all of
    them are indexed, as tarfile sees them; a GNU long name ('L' record) is still left out."""
    import tarfile

    import webdataset

    path = tmp_path / "wds.tar"
    with webdataset.TarWriter(str(path)) as writer:
        for i in range(5):
            writer.write({
                "__key__": f"s{i}", "jpg": bytes([i]) * (5000 + i), "txt": f"caption {i}".encode()
            })
    with tarfile.open(path) as archive:
        truth = {m.name: (m.offset_data, m.size) for m in archive.getmembers()}
        assert archive.pax_headers == {} and any(m.pax_headers for m in archive.getmembers())
    with open(path, "rb") as raw:
        assert tars.tar_member_offsets(raw) == {name: [where] for name, where in truth.items()}
    gnu = tmp_path / "gnu.tar"
    with tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as archive:
        for name in ("short.jpg", "l" * 130 + ".jpg"):
            info = tarfile.TarInfo(name)
            info.size = 600
            archive.addfile(info, io.BytesIO(b"x" * 600))
    with open(gnu, "rb") as raw:
        assert set(tars.tar_member_offsets(raw)) == {"short.jpg"}


def test_a_member_that_changed_after_it_was_read_stops_the_write():
    big = b"j" * (tars.INLINE_MEMBER_BYTES + 1)
    located = tars.locate_members("k", {"jpg": big}, {"k.jpg": [(0, len(big))]})
    assert isinstance(located[0][1], tuple)
    changed = b"J" + big[1:]
    with pytest.raises(IOError, match="changed since it was read"):
        tars.read_members(located, lambda offset, size: changed[offset:offset + size])


# --- the Beam job on real shards ----------------------------------------------------------------

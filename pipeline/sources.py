"""Reading image-text samples for the Beam jobs: the input formats, the sample shape, and the
WebDataset tar reader (caption tables and COCO JSON: pipeline/table_sources.py).

Plain iterators, one per format, that yield samples and TaggedOutput quarantine entries for what
cannot be read; pipeline/inputs.py picks a file's reader (and a table's columns), and
pipeline/splits.py cuts files into ranges and runs them in Beam.
"""
import json
import pathlib
import re
import tarfile


from pipeline import quarantine

FORMAT_AUTO = "auto"
FORMAT_WEBDATASET = "webdataset"
FORMAT_PARQUET = "parquet"
FORMAT_JSONL = "jsonl"
FORMAT_CSV = "csv"
FORMAT_COCO = "coco"
FORMATS = (FORMAT_AUTO, FORMAT_WEBDATASET, FORMAT_PARQUET, FORMAT_JSONL, FORMAT_CSV, FORMAT_COCO)

# img2dataset names a sample's members KEY.EXT; webdataset splits them with this pattern
# (webdataset/tariterators.py, base_plus_ext): the key is everything up to the basename's first dot.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
TEXT_EXTENSION = "txt"
JSON_EXTENSION = "json"
TAR_BLOCK = 512
# A well-formed tar ends with two zero blocks (POSIX.1-1988 end-of-archive marker).
END_OF_ARCHIVE_BYTES = 2 * TAR_BLOCK
# Members larger than this are not read into memory (a web image is a few hundred kB; this leaves
# room for large PNGs and precomputed embeddings while stopping a forged 10 GB header).
MAX_MEMBER_BYTES = 256 * 1024 * 1024


def make_sample(key, shard, position, caption=None, members=None, meta=None, image_id=None):
    """The sample every reader yields: key, where it was read, caption, members, metadata."""
    return {"key": key, "shard": shard, "position": position, "caption": caption,
            "members": members or {}, "meta": meta or {}, "image_id": image_id}


class _TailTrackingReader:
    """File wrapper that remembers the bytes read and the last few, to check the end-of-archive."""

    def __init__(self, raw):
        self.raw, self.bytes_read, self.tail = raw, 0, b""

    def read(self, size=-1):
        data = self.raw.read(size)
        self.bytes_read += len(data)
        self.tail = (self.tail + data)[-END_OF_ARCHIVE_BYTES:]
        return data

    def drain(self):
        while self.read(1 << 20):
            pass

    def ends_with_marker(self):
        return len(self.tail) == END_OF_ARCHIVE_BYTES and not self.tail.strip(b"\0")


def _is_unsafe_member_name(name):
    parts = pathlib.PurePosixPath(name).parts
    return name.startswith(("/", "\\")) or ".." in parts or "\\" in name or "\0" in name


def iter_tar_samples(raw_file, shard, caption_field="caption"):
    """Yields samples or quarantine entries (TaggedOutput) from one tar, streaming member by member.

    Members are never written to disk, so their names cannot escape anywhere; names that try
    (absolute, "..") are quarantined all the same. A sample's members are kept byte-exact.
    """
    reader = _TailTrackingReader(raw_file)
    pending, position, expected_offset, members_seen = None, 0, 0, 0
    try:
        # ignore_zeros lets tarfile resynchronise after a damaged header; the offset check below
        # turns every skipped stretch into a quarantine entry instead of losing it silently.
        with tarfile.open(fileobj=reader, mode="r|", ignore_zeros=True) as archive:
            for member in archive:
                if member.offset != expected_offset:
                    yield quarantine.quarantined(
                        quarantine.STAGE_READ, quarantine.CORRUPT_TAR, None, shard, None,
                        f"{member.offset - expected_offset} bytes of damaged tar "
                        f"headers skipped before member {member.name!r}")
                expected_offset = member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK
                members_seen += 1
                if member.isdir():
                    continue
                name = member.name
                if _is_unsafe_member_name(name):
                    yield quarantine.quarantined(quarantine.STAGE_READ,
                                                 quarantine.UNSAFE_MEMBER_NAME, None, shard, None,
                                                 name)
                    continue
                if not member.isfile():
                    yield quarantine.quarantined(quarantine.STAGE_READ,
                                                 quarantine.NON_REGULAR_MEMBER, None, shard, None,
                                                 name)
                    continue
                match = _KEY_AND_EXTENSION.match(name)
                if match is None:
                    yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.BAD_ROW, None,
                                                 shard, None,
                                                 f"member {name!r} has no KEY.EXT name")
                    continue
                key, extension = match.groups()
                if member.size > MAX_MEMBER_BYTES:
                    yield quarantine.quarantined(
                        quarantine.STAGE_READ, quarantine.BAD_ROW, key, shard, None,
                        f"member {name!r} has {member.size} bytes (limit {MAX_MEMBER_BYTES})")
                    continue
                # Same rule as webdataset's group_by_keys: a new key, or an extension seen again,
                # starts a new sample; the finished one goes out before this member is read.
                if pending is None or pending[0] != key or extension in pending[1]:
                    if pending is not None:
                        yield from _finish_tar_sample(pending, shard, caption_field)
                        position += 1
                    pending = (key, {}, position)
                pending[1][extension] = archive.extractfile(member).read()
        reader.drain()
    except (tarfile.TarError, EOFError, OSError) as error:
        key = pending[0] if pending else None
        reason = quarantine.TRUNCATED_TAR if members_seen else quarantine.UNREADABLE_FILE
        if reader.bytes_read == 0:
            reason = quarantine.EMPTY_SHARD
        yield quarantine.quarantined(quarantine.STAGE_READ, reason, key, shard,
                                     pending[2] if pending else None,
                                     f"tar stopped after {reader.bytes_read} bytes: {error}")
        return
    if not reader.ends_with_marker():
        reason = quarantine.TRUNCATED_TAR if members_seen else quarantine.UNREADABLE_FILE
        if reader.bytes_read == 0:
            reason = quarantine.EMPTY_SHARD
        yield quarantine.quarantined(quarantine.STAGE_READ, reason, pending[0] if pending else None,
                                     shard, pending[2] if pending else None,
                                     f"no end-of-archive marker after {reader.bytes_read} bytes")
        return
    if pending is not None:
        yield from _finish_tar_sample(pending, shard, caption_field)
    elif not members_seen:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.EMPTY_SHARD, None, shard,
                                     None, "tar has no members")


def _member(members, extension):
    for name, data in members.items():
        if name.lower() == extension:
            return data
    return None


def _finish_tar_sample(pending, shard, caption_field):
    key, members, position = pending
    meta = {}
    json_bytes = _member(members, JSON_EXTENSION)
    caption = None
    try:
        if json_bytes is not None:
            meta = json.loads(json_bytes.decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"json member is a {type(meta).__name__}, not an object")
        text_bytes = _member(members, TEXT_EXTENSION)
        if text_bytes is not None:
            caption = text_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.NON_UTF8_TEXT, key, shard,
                                     position, error)
        return
    except ValueError as error:
        yield quarantine.quarantined(quarantine.STAGE_READ, quarantine.BAD_JSON, key, shard,
                                     position, error)
        return
    if caption is None and isinstance(meta.get(caption_field), str):
        caption = meta[caption_field]
    dotted = sorted(name for name in members if "." in name)
    if caption is None and dotted:
        yield quarantine.quarantined(
            quarantine.STAGE_READ, quarantine.INVALID_KEY, key, shard, position,
            f"members {', '.join(f'{key}.{name}' for name in dotted)}: WebDataset reads {key!r} as "
            f"the key and {dotted[0]!r} as the extension; a key must not contain '.'")
        return
    image_id = meta.get("image_id")
    yield make_sample(key, shard, position, caption, members, meta,
                  None if image_id is None else str(image_id))

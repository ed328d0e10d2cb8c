"""What resample decides and writes, as pure functions: keep probability, copies, samples, tar shards.

No Beam here: the resample job calls these per record, and tests call them directly.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zlib

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline import hashing
from pipeline.errors import DataError, UsageError
from pipeline.files import atomic_create
from pipeline.signatures import encode, parse_signature, row_signature
from solvers.solution import BalanceSolution

MODES = ("exact", "bernoulli", "weights", "repeat")
# exact: k_s whole rows of every constrained signature (balance's integer program), so the release
# meets the gaps in its own counts; bernoulli draws each row on its own (a concept of 50 rows then
# moves by about 0.1 in share).
DEFAULT_MODE = "exact"
DEFAULT_SEED = 0
DEFAULT_PREFIX = "balanced"
# img2dataset writes 10,000 samples per shard; 1,000 keeps a shard of web images (~100 kB each)
# near 100 MB, which one worker holds in memory while writing it.
DEFAULT_SAMPLES_PER_SHARD = 1000
# Repeat mode does systematic sampling in integers: q is scaled to this many units, so running
# sums are exact and the output size is exactly the one asked for.
REPEAT_MASS_UNITS = 1 << 32
SHARD_DIGITS = 5
# Distinct label sets a KeepRule remembers before it starts again (bounds a worker's memory when
# utilities make rows distinct; without utility tilt a release has a few hundred label sets).
_ROW_MEMO_LIMIT = 100_000
# Members up to this size (captions, json) travel inline through the plan; larger ones (images)
# travel as their place in the input tar and are read back once, by the worker writing the shard,
# so record bytes never cross a shuffle. 4 KiB: one page, about what one extra seek costs.
INLINE_MEMBER_BYTES = 4096
# Deterministic tar headers: the same samples give the same bytes on every run and worker.
_TAR_MTIME = 0
_TAR_MODE = 0o444
_TAR_BLOCK = 512  # POSIX.1 tar header and data block
_ZERO_BLOCK = bytes(_TAR_BLOCK)


class KeepRule:
    """Keep probability and copies of a record from its features, the solution and the seed.

    A pure function of (features, solution, seed), memoised by signature: rows with the same
    signature have the same q, so a worker computes q once per signature it meets. Its own default
    mode is bernoulli, which any solution supports; resample's default, exact, needs the exact
    counts balance adds to solution.json.
    """

    def __init__(self, solution: BalanceSolution, seed: int = DEFAULT_SEED, mode: str = "bernoulli"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "exact" and solution.exact_counts is None:
            raise DataError("this solution has no exact counts (an older balance, or its integer program "
                            "failed: see solution.json statistics.exact_counts); re-run balance, or resample "
                            "with --mode bernoulli")
        self.solution = solution
        self.seed = int(seed)
        self.mode = mode
        self.attribute_names = list(solution.spec.attribute_names)
        self.concept_names = list(solution.spec.concept_names)
        self._known_attributes = set(self.attribute_names)
        self._known_concepts = set(self.concept_names)
        self._memo: dict[str, float] = {}
        self._row_memo: dict[tuple, str] = {}

    def signature(self, attributes, concepts, utility=None) -> str:
        """Signature over the solution's own columns (unknown labels do not change q)."""
        attributes = [a for a in attributes or () if a in self._known_attributes]
        concepts = [c for c in concepts or () if c in self._known_concepts]
        return row_signature(attributes, concepts, utility, conditional=self.solution.spec.conditional,
                             use_utility=bool(self.solution.utility_tilt))

    def keep_probability(self, attributes, concepts, utility=None) -> float:
        """q of a row: a function of its signature alone (utility as its bucket, as balance counted it),
        so every row of a signature has the same q whichever row a worker meets first."""
        return self.signatures_and_probabilities([(attributes, concepts, utility)])[0][1]

    def signatures_and_probabilities(self, rows) -> list[tuple[str, float]]:
        """(signature, q) of many (attributes, concepts, utility) rows.

        The q of every signature not met before comes from one vectorised `q_for` over all of them:
        building the constraint rows costs milliseconds per call, and a table has thousands of
        signatures. Signatures are memoised on the labels as given (rows repeat a few label sets).
        """
        use_utility = bool(self.solution.utility_tilt)
        texts = []
        for attributes, concepts, utility in rows:
            memo_key = (tuple(attributes or ()), tuple(concepts or ()), utility if use_utility else None)
            text = self._row_memo.get(memo_key)
            if text is None:
                if len(self._row_memo) >= _ROW_MEMO_LIMIT:  # utilities can make every row distinct
                    self._row_memo.clear()
                text = self._row_memo[memo_key] = self.signature(attributes, concepts, utility)
            texts.append(text)
        unseen = sorted({text for text in texts if text not in self._memo})
        if unseen:
            parsed = [parse_signature(text) for text in unseen]
            utilities = None
            if use_utility:  # the bucket balance counted; None: no usable score, the mean's target rate
                utilities = np.array([self.solution.utility_mean if bucket is None else bucket
                                      for _, _, bucket in parsed])
            q = self.solution.q_for(encode([a for a, _, _ in parsed], self.attribute_names),
                                    encode([c for _, c, _ in parsed], self.concept_names), utilities)
            self._memo.update(zip(unseen, q.tolist()))
        return [(text, self._memo[text]) for text in texts]

    def exact_signature(self, signature: str):
        """(n_s, k_s) when exact mode keeps exactly k_s of the n_s rows of this signature by rank, else None.

        Signatures no constraint sees (rows without an annotated attribute), and those kept whole or
        not at all, need no ranking: they are drawn by probability, or kept or dropped outright.
        """
        entry = (self.solution.exact_counts or {}).get(signature) if self.mode == "exact" else None
        if entry is None or not entry[2] or not 0 < entry[1] < entry[0]:
            return None
        return entry[0], entry[1]

    def copies(self, key: str, keep_probability: float, signature: str | None = None, threshold=None) -> int:
        """1 or 0 for one record (repeat mode needs the global order: see repeat_copies).

        exact: for a ranked signature, 1 iff (h(seed, key), key) is at most the signature's threshold
        (the k_s-th smallest); all rows of a signature with k_s = n_s, none with k_s = 0; otherwise
        as bernoulli. bernoulli: 1 iff h(seed, key) < q. weights: 1 iff q > 0.
        """
        if self.mode == "weights":
            return int(keep_probability > 0)
        if self.mode == "repeat":
            raise ValueError("repeat mode decides copies along the global order (see repeat_copies)")
        draw = hashing.keyed_uniform(self.seed, key)
        if self.mode == "exact" and signature is not None:
            entry = (self.solution.exact_counts or {}).get(signature)
            if entry is not None and entry[2]:
                if entry[1] >= entry[0]:
                    return 1
                if entry[1] <= 0:
                    return 0
                if threshold is not None:
                    return int((draw, key) <= tuple(threshold))
        return int(hashing.keep_bernoulli(keep_probability, draw))

    def weight(self, keep_probability: float) -> float:
        """Training weight of a kept record: q / eta in weights mode (unbiased for the plan), else 1."""
        if self.mode == "weights":
            return keep_probability / self.solution.keep_rate
        return 1.0


def repeat_mass(keep_probability: float) -> int:
    return int(round(keep_probability * REPEAT_MASS_UNITS))


def repeat_copies(start: int, end: int, total: int, output_size: int, offset_uniform: float) -> int:
    """Systematic sampling in integers: copies of the record owning [start, end) of `total` mass.

    With u = floor(U * total) < total the copies add up to exactly `output_size`:
    sum_i floor((u + T end_i) / S) - floor((u + T start_i) / S) = floor((u + T S) / S) = T.
    """
    if total <= 0:
        return 0
    shift = int(offset_uniform * total)
    return (shift + output_size * end) // total - (shift + output_size * start) // total


def copy_key(key: str, copy: int) -> str:
    """Key of the copy-th copy of a record: the record's own key first, then key_copyN."""
    return key if copy == 0 else f"{key}_copy{copy}"


def order_uniform(seed: int, key: str, copy: int = 0) -> float:
    """Where a (record, copy) goes in the release: a keyed hash independent of the keep draw."""
    return hashing.keyed_uniform(seed, key if copy == 0 else f"{key}\x00{copy}", hashing.ORDER)


def release_members(sample: dict, balance: dict) -> list[tuple[str, bytes]]:
    """(extension, bytes) of a released sample: members as they were, json gaining `balance`.

    Caption-table rows have no members: they become text-only samples (txt + json).
    """
    members = dict(sample.get("members") or {})
    if not members:
        caption = sample.get("caption")
        if caption is not None:
            members["txt"] = caption.encode("utf-8")
    json_name = next((name for name in members if name.lower() == "json"), None)
    meta = dict(sample.get("meta") or {})
    if json_name is None:
        json_name = "json"
        meta.setdefault("key", sample.get("key"))
    meta["balance"] = balance
    members[json_name] = json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")
    return list(members.items())


def tar_member_offsets(raw_file) -> dict[str, list[tuple[int, int]]]:
    """Member name -> [(data offset, size)] of a seekable tar's regular members, from headers only.

    Reads one 512-byte header per member and seeks over the data (tarfile's own parser costs about
    ten times more per header). ustar/GNU headers of regular files are indexed, and so are members
    after a pax extended header (POSIX.1-2001: `path` and `size` records override the header's;
    webdataset's TarWriter, and so img2dataset, writes one before every member); a member named by
    a GNU long-name record is left out, and anything unexpected ends the scan. Left-out members
    travel inline, so the index only has to be right where it speaks, and locate_members checks it
    against the size the reader saw.
    """
    offsets: dict[str, list[tuple[int, int]]] = {}
    offset, trust_next_name, pax = 0, True, {}
    while True:
        raw_file.seek(offset)
        header = raw_file.read(_TAR_BLOCK)
        if len(header) < _TAR_BLOCK:
            break
        if header == _ZERO_BLOCK:  # the reader skips zero blocks too (ignore_zeros)
            offset += _TAR_BLOCK
            continue
        try:
            size = tarfile.nti(header[124:136])
            checksum = tarfile.nti(header[148:156])
        except tarfile.InvalidHeaderError:
            break
        # Unsigned sum with the checksum field as spaces (what every writer uses); the signed variant
        # (tarfile.calc_chksums) only for headers that fail it, because it costs 4 times more.
        unsigned = sum(header) - sum(header[148:156]) + 8 * 32
        if size < 0 or (checksum != unsigned and checksum not in tarfile.calc_chksums(header)):
            break
        member_type = header[156:157]
        if member_type == b"g":  # a global pax header may rename every member after it
            break
        if member_type == b"x":  # a pax header: its records describe the next member
            pax = _pax_records(raw_file.read(size)) if size <= _MAX_PAX_BYTES else None
            if pax is None:
                break
            offset += _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK
            continue
        if "size" in pax:
            size = pax["size"]
        if member_type in (b"0", b"\0") and trust_next_name:
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:265] == tarfile.POSIX_MAGIC else b""
            if prefix:
                name = prefix + b"/" + name
            name = pax.get("path", name.decode("utf-8", "surrogateescape"))
            if not name.endswith("/"):
                offsets.setdefault(name, []).append((offset + _TAR_BLOCK, size))
        trust_next_name = member_type not in (b"L", b"K")  # these rename or extend the next member
        pax = {}
        offset += _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK
    return offsets


_MAX_PAX_BYTES = 1 << 20


def _pax_records(data: bytes):
    """{"path": str, "size": int} from a pax extended header's "LENGTH key=value\\n" records (other
    keys ignored), or None when the records do not parse (the scan then stops: nothing is guessed)."""
    records, position = {}, 0
    while position < len(data):
        if data[position:].strip(b"\0") == b"":
            break
        space = data.find(b" ", position)
        if space < 0 or not data[position:space].isdigit():
            return None
        length = int(data[position:space])
        record = data[space + 1:position + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            return None
        key, value = record[:-1].split(b"=", 1)
        if key == b"path":
            records["path"] = value.decode("utf-8", "surrogateescape")
        elif key == b"size":
            if not value.isdigit():
                return None
            records["size"] = int(value)
        position += length
    return records


def locate_members(key: str, members: dict, offsets) -> list[tuple[str, object]]:
    """[(extension, bytes or (offset, size, crc32))]: large members by their place in the tar where certain.

    A place is a plain tuple, not a named one: Beam's fast coder pickles named tuples.
    """
    located = []
    for extension, data in members.items():
        where = offsets.get(f"{key}.{extension}") if offsets and len(data) > INLINE_MEMBER_BYTES else None
        if where is not None and len(where) == 1 and where[0][1] == len(data):
            located.append((extension, (where[0][0], len(data), zlib.crc32(data))))
        else:
            located.append((extension, data))
    return located


def read_members(located, read_at, where: str = "") -> dict[str, bytes]:
    """Members as bytes again: read_at(offset, size) for located ones, checked against their crc32."""
    members = {}
    for extension, data in located:
        if isinstance(data, tuple):
            (offset, size, crc32), data = data, read_at(data[0], data[1])
            if len(data) != size or zlib.crc32(data) != crc32:
                raise IOError(f"{where}: member {extension!r} at byte {offset} changed since it was read "
                              "(size or crc32 differ); the input must not change during the job")
        members[extension] = data
    return members


_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_prefix(prefix: str) -> str:
    """A shard prefix becomes part of every shard's file name: letters, digits, '-' and '_' only."""
    if not isinstance(prefix, str) or not _PREFIX_PATTERN.match(prefix):
        raise UsageError(f"--prefix must be 1-64 letters, digits, '-' or '_' (starting with a letter or "
                         f"digit), got {prefix!r}")
    return prefix


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:0{SHARD_DIGITS}d}.tar"


class _HashingWriter:
    """File wrapper that counts and hashes what tarfile writes through it."""

    def __init__(self, raw):
        self.raw, self.size, self.digest = raw, 0, hashlib.sha256()

    def write(self, data):
        self.raw.write(data)
        self.size += len(data)
        self.digest.update(data)
        return len(data)


def tar_bytes(samples) -> bytes:
    """A whole shard in memory (for tests and small shards)."""
    buffer = io.BytesIO()
    _write_tar(buffer, samples)
    return buffer.getvalue()


def _header_template() -> bytes:
    """tarfile's PAX-format header of our fixed fields, with an empty name, size 0, checksum blank."""
    info = tarfile.TarInfo("")
    info.size, info.mtime, info.mode = 0, _TAR_MTIME, _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = bytearray(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    header[148:156] = b" " * 8
    return bytes(header)


_HEADER_TEMPLATE = _header_template()
_TEMPLATE_SUM = sum(_HEADER_TEMPLATE) - sum(_HEADER_TEMPLATE[124:136])  # without its (zero) size field
_USTAR_NAME_BYTES = 100
_USTAR_SIZE_LIMIT = 8 ** 11  # 11 octal digits: larger members need a pax size record


def member_header(name: str, size: int) -> bytes:
    """The header tarfile writes (PAX format) for a member of ours, built without tarfile when plain.

    A plain member (ASCII name up to 100 bytes, size below 8 GiB) needs no pax record, so its header
    is the fixed template with name, size and checksum filled in; tarfile's tobuf costs several
    times more. Anything else goes through tarfile. Tests check both give the same bytes.
    """
    if name.isascii() and len(name) <= _USTAR_NAME_BYTES and 0 <= size < _USTAR_SIZE_LIMIT:
        raw_name, size_field = name.encode("ascii"), b"%011o\0" % size
        # The checksum is the byte sum of the header with the checksum field blank: the template's,
        # with the name (zeros there) and the size field replaced.
        checksum = _TEMPLATE_SUM + sum(raw_name) + sum(size_field)
        return b"".join((raw_name, _HEADER_TEMPLATE[len(raw_name):124], size_field, _HEADER_TEMPLATE[136:148],
                         b"%06o\0" % checksum, _HEADER_TEMPLATE[155:]))
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _TAR_MTIME, _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# Small members are gathered and written in pieces of about this size: a caption sample is three
# writes of a few hundred bytes each, and per-write costs (hashing, the file object) dominate them.
_WRITE_BYTES = 1 << 20


def _write_tar(raw, samples) -> None:
    """The bytes tarfile.open(mode="w|", format=PAX_FORMAT) writes for these members, faster."""
    written, pending, pending_bytes = 0, [], 0
    for key, members in samples:
        for extension, data in members:
            header = member_header(f"{key}.{extension}", len(data))
            padding = -len(data) % _TAR_BLOCK
            pending += (header, data, _ZERO_BLOCK[:padding]) if padding else (header, data)
            pending_bytes += len(header) + len(data) + padding
            if pending_bytes >= _WRITE_BYTES:
                raw.write(b"".join(pending))
                written += pending_bytes
                pending, pending_bytes = [], 0
    end = 2 * _TAR_BLOCK  # end-of-archive marker, then zeros up to a whole record, as tarfile does
    end += -(written + pending_bytes + end) % tarfile.RECORDSIZE
    pending.append(bytes(end))
    raw.write(b"".join(pending))


def write_shard(path: str, samples) -> dict:
    """Write [(key, [(ext, bytes)])] (any iterable, streamed) as one tar: a temporary name, then renamed.

    A crash leaves at worst a *.tmp-* file, never a half shard under the final name; an error while
    writing removes the temporary file. Returns {"name", "samples", "bytes", "sha256"} as written.
    """
    counted = [0]

    def counting(items):
        for item in items:
            counted[0] += 1
            yield item

    with atomic_create(path) as raw:
        writer = _HashingWriter(raw)
        _write_tar(writer, counting(samples))
    return {"name": path.rsplit("/", 1)[-1], "samples": counted[0], "bytes": writer.size,
            "sha256": writer.digest.hexdigest()}


def solution_digest(solution: BalanceSolution) -> str:
    """sha256 of what decides q (spec, rate, duals, tilt), not of timings: equal digests, equal releases."""
    payload = json.loads(solution.to_json())
    decisive = {name: payload[name] for name in ("spec", "keep_rate", "constraint_duals", "rate_dual",
                                                  "utility_tilt", "utility_mean")}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode("utf-8")).hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with FileSystems.open(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

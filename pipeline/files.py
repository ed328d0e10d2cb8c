"""Small file helpers every job shares, on any filesystem Beam's FileSystems knows (local, gs://,
s3://).

Writes are atomic (temporary name, then rename) so a reader never sees half a file.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


def read_text(path: str) -> str:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read().decode("utf-8")


def write_text_atomically(path: str, text: str) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path, payload, *, indent: int | None = None,
                          sort_keys: bool = False) -> None:
    """`payload` as JSON, written atomically (`path`: a str or a local path); indented JSON ends
    with a newline."""
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys)
    write_text_atomically(os.fspath(path), text + "\n" if indent is not None else text)


def write_bytes_atomically(path: str, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    with atomic_create(path) as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_create(path: str):
    """A handle to write `path` through (any FileSystems path), streamed: the bytes go to a
    temporary name (`PATH.tmp-*`) renamed into place when the block ends without error, so a reader
    never sees half a file and a crash leaves at worst a *.tmp-* file. On an error the temporary
    file is removed and `path` keeps what it had."""
    temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with FileSystems.create(temporary) as handle:
            yield handle
    except BaseException:
        if FileSystems.exists(temporary):
            FileSystems.delete([temporary])
        raise
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def delete_matching(pattern: str, keep=()) -> list[str]:
    """Delete the files matching `pattern` whose base name is not in `keep`; return their paths."""
    paths = [m.path for m in FileSystems.match([pattern])[0].metadata_list
             if posixpath.basename(m.path) not in keep]
    if paths:
        FileSystems.delete(paths)
    return paths


def count_lines(pattern: str) -> int:
    """Lines in the files matching `pattern` (what a job really wrote, to reconcile with its
    counts)."""
    lines = 0
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(metadata.path,
                              compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                lines += block.count(b"\n")
    return lines


def ensure_writable_directory(path: str, flag: str = "--output") -> None:
    """Create `path` as a directory, or raise ValueError in one line if it cannot be one."""
    if FileSystems.get_scheme(path) is None:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a file, not a directory")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{flag} {path} cannot be created: {error.strerror}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path} is not writable")
        return
    try:
        FileSystems.mkdirs(path)
    except Exception:  # object stores: directories are implicit, or it exists already
        pass

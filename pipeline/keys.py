"""Keys as safe file names: a table's key becomes the name of tar members, so it is encoded first.

WebDataset splits a member name at the first dot of its basename, tar readers skip `.` and `..`,
NUL ends a C string and `/` makes directories (`../../x` escapes the folder on extraction), and a
file name has at most 255 bytes. A key with none of these problems is used as it is; any other is
percent-encoded (`a.b` -> `a%2Eb`, reversible with urllib.parse.unquote), and a key too long even
then keeps its first characters and gains a digest of the whole. The original key always stays in
the sample's json (its key column), so nothing about a record is lost.
"""
from __future__ import annotations

import hashlib
import re

# Characters encoded wherever they appear: the dot (WebDataset's key/extension split), path
# separators, '%' itself (so the encoding is reversible), '~' (which marks a shortened key) and
# every control character.
_ENCODED = frozenset("%./\\~")
# A member name is KEY[_copyN].EXT and must fit a 255-byte file name; 200 bytes leave room for
# the longest copy suffix and extension.
MAX_KEY_BYTES = 200
_DIGEST_CHARS = 16
# Keys made of these characters only are safe as they are (ASCII letters, digits and punctuation
# other than the encoded ones, and spaces); anything else goes through _encode_char.
_SAFE_CHARACTERS = r"A-Za-z0-9 !\"#$&'()*+,:;<=>?@\[\]^_`{|}-"
_SAFE = re.compile(f"[{_SAFE_CHARACTERS}]*\\Z")
# The same test for Arrow (RE2: `$` is the end of the text).
_SAFE_RE2 = f"^[{_SAFE_CHARACTERS}]*$"


def _encode_char(char: str) -> str:
    if char in _ENCODED or not char.isprintable():
        return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))
    return char


def safe_key(key: str) -> str:
    """The key as a safe, unique member-name stem (itself when it already is one)."""
    # the common case, without a loop over characters
    if _SAFE.match(key) and len(key) <= MAX_KEY_BYTES:
        return key
    encoded = "".join(_encode_char(char) for char in key)
    if len(encoded.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES:
        return encoded
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]
    kept, size = [], 0
    budget = MAX_KEY_BYTES - _DIGEST_CHARS - 1
    for char in key:
        piece = _encode_char(char)
        size += len(piece.encode("utf-8", "surrogatepass"))
        if size > budget:
            break
        kept.append(piece)
    return "".join(kept) + "~" + digest


def safe_keys(keys):
    """safe_key of every string in an Arrow array (no nulls): the safe ones tested in Arrow, only
    the others through safe_key."""
    import pyarrow as pa
    import pyarrow.compute as pc

    safe = pc.and_(pc.match_substring_regex(keys, _SAFE_RE2),
                   pc.less_equal(pc.binary_length(keys), MAX_KEY_BYTES))
    if pc.all(safe).as_py() is not False:
        return keys
    values = keys.to_pylist()
    for i in pc.indices_nonzero(pc.invert(safe)).to_pylist():
        values[i] = safe_key(values[i])
    return pa.array(values, pa.string())

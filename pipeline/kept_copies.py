"""Kept copies as they travel from the range that read them to their ranking bucket: Arrow tables
(KEPT_SCHEMA), gathered as columns by KeptCopies and read back in table order by kept_rows.

They go through files in resample's work folder (pipeline/file_shuffle.py), not through the
runner's shuffle: building, sorting and reading back a table costs about a third of what Beam's
coder spends on the same copies as Python tuples (encoded by a worker, decoded and encoded again
by the local runner's driver, decoded by the next worker).
"""
from __future__ import annotations

import pyarrow as pa

# A kept copy as it travels to its bucket: its members as released, each inline (`data`) or as its
# place in the input tar (`offset`, `size`, `crc32`), in the order they are written.
MEMBER_TYPE = pa.struct([("name", pa.string()), ("data", pa.binary()), ("offset", pa.int64()),
                         ("size", pa.int64()), ("crc32", pa.int64())])
KEPT_SCHEMA = pa.schema([("order", pa.float64()), ("copy_key", pa.string()),
                         ("source", pa.string()), ("members", pa.list_(MEMBER_TYPE))])


class KeptCopies:
    """Kept copies bound for one order bucket, gathered as columns until they leave as one table
    (KEPT_SCHEMA)."""

    def __init__(self):
        self.orders, self.keys, self.sources, self.ends = [], [], [], [0]
        self.names, self.data, self.offsets, self.sizes, self.crcs = [], [], [], [], []
        self.inline_bytes = 0

    def __len__(self) -> int:
        return len(self.orders)

    def add(self, order: float, copy_key: str, source, members) -> None:
        """One copy: `members` as tars.locate_members gives them, [(name, bytes or place)]."""
        self.orders.append(order)
        self.keys.append(copy_key)
        self.sources.append(source)
        for name, data in members:
            self.names.append(name)
            if isinstance(data, tuple):
                offset, size, crc32 = data
                self.data.append(None)
            else:
                offset = size = crc32 = None
                self.data.append(data)
                self.inline_bytes += len(data)
            self.offsets.append(offset)
            self.sizes.append(size)
            self.crcs.append(crc32)
        self.ends.append(len(self.names))

    def table(self) -> pa.Table:
        members = pa.StructArray.from_arrays(
            [pa.array(self.names, pa.string()), pa.array(self.data, pa.binary()),
             pa.array(self.offsets, pa.int64()), pa.array(self.sizes, pa.int64()),
             pa.array(self.crcs, pa.int64())], fields=list(MEMBER_TYPE))
        return pa.Table.from_arrays(
            [pa.array(self.orders, pa.float64()), pa.array(self.keys, pa.string()),
             pa.array(self.sources, pa.string()),
             pa.ListArray.from_arrays(pa.array(self.ends, pa.int32()), members)],
            schema=KEPT_SCHEMA)


def inline_table(orders, copy_keys, names, data, ends) -> pa.Table:
    """A KEPT_SCHEMA table of copies whose members all travel inline and come from no tar (caption
    rows): copy i's members are (names[j], data[j]) for j in [ends[i], ends[i + 1])."""
    none = pa.nulls(len(names), pa.int64())
    members = pa.StructArray.from_arrays(
        [pa.array(names, pa.string()), pa.array(data, pa.binary()), none, none, none],
        fields=list(MEMBER_TYPE))
    return pa.Table.from_arrays(
        [pa.array(orders, pa.float64()), pa.array(copy_keys, pa.string()),
         pa.nulls(len(orders), pa.string()),
         pa.ListArray.from_arrays(pa.array(ends, pa.int32()), members)], schema=KEPT_SCHEMA)


def kept_rows(table: pa.Table):
    """(order, copy key, source tar, members) per row of a KEPT_SCHEMA table, in table order; the
    members as tars.read_members takes them."""
    members = table.column("members").combine_chunks()
    ends = members.offsets.to_numpy()
    ends = (ends - ends[0]).tolist()
    flat = members.flatten()
    names, data, offsets, sizes, crcs = (flat.field(name).to_pylist()
                                         for name in ("name", "data", "offset", "size", "crc32"))
    located = [(name, item if item is not None else (offset, size, crc32))
               for name, item, offset, size, crc32 in zip(names, data, offsets, sizes, crcs)]
    for i, (order, copy_key, source) in enumerate(
            zip(*(table.column(name).to_pylist() for name in ("order", "copy_key", "source")))):
        yield order, copy_key, source, located[ends[i]:ends[i + 1]]

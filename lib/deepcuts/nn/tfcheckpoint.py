"""Read a TensorFlow 1.x checkpoint without TensorFlow: what converts a pretrained network that
ships inside a Python wheel into the project's own torch module at install time
(:mod:`deepcuts.nn.pretrained`).

A checkpoint is a tensor bundle: ``<prefix>.index`` is a LevelDB table (uncompressed blocks of
prefix-compressed keys) mapping each variable name to a ``BundleEntryProto`` (dtype, shape,
offset and size in the ``.data`` shard), read here with a minimal varint / protobuf parser.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}
_TABLE_MAGIC = 0xdb4775248b80fb57


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _block_entries(block: bytes):
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end, pos, key = len(block) - 4 - 4 * restarts, 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + size]
        pos += size


def _block(table: bytes, handle: bytes, pos: int = 0) -> bytes:
    offset, pos = _varint(handle, pos)
    size, _ = _varint(handle, pos)
    if table[offset + size] != 0:
        raise ValueError("compressed checkpoint index block: not supported")
    return table[offset:offset + size]


def _fields(message: bytes):
    pos = 0
    while pos < len(message):
        tag, pos = _varint(message, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire == 2:
            n, pos = _varint(message, pos)
            value, pos = message[pos:pos + n], pos + n
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = message[pos:pos + width], pos + width
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield number, value


def read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """Every variable of a TF 1.x checkpoint ``prefix`` (``<prefix>.index`` + one data shard)."""
    index = Path(prefix + ".index").read_bytes()
    data = Path(prefix + ".data-00000-of-00001").read_bytes()
    footer = index[-48:]
    if struct.unpack_from("<Q", footer, 40)[0] != _TABLE_MAGIC:
        raise ValueError(f"{prefix}.index is not a tensor bundle index")
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)                         # the metaindex handle: unused
    out = {}
    for _, handle in _block_entries(_block(index, footer, pos)):
        for key, value in _block_entries(_block(index, handle)):
            if not key:
                continue                                  # the bundle header
            entry = {"dtype": 1, "shape": [], "offset": 0, "size": 0}
            for number, v in _fields(value):
                if number == 1:
                    entry["dtype"] = v
                elif number == 2:
                    entry["shape"] = [dict(_fields(dim)).get(1, 0) for n, dim in _fields(v) if n == 2]
                elif number == 4:
                    entry["offset"] = v
                elif number == 5:
                    entry["size"] = v
            raw = data[entry["offset"]:entry["offset"] + entry["size"]]
            out[key.decode()] = np.frombuffer(raw, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return out

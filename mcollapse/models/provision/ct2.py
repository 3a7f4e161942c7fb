"""Reader for CTranslate2 `model.bin` files, so CTranslate2 checkpoints can feed PyTorch models.

Only the variable store is read (names, shapes, dtypes, raw bytes, aliases); nothing of the
CTranslate2 runtime is needed. Layout (little-endian), for binary versions 4 to 6:

    u32 binary_version
    str spec_name, u32 spec_revision            (strings: u16 length incl. NUL, bytes, NUL)
    u32 n_variables, then per variable:
        str name, u8 rank, u32 dims[rank], u8 dtype_id, u32 n_bytes, bytes[n_bytes]
    u32 n_aliases, then per alias: str alias_name, str target_name

Quantized weights (int8 per-row, int16 per-tensor) come with a `<name>_scale` variable holding
the multiplier used at quantization time; they are returned dequantized to float32.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

# Order of CTranslate2's DataType enum; bfloat16 has no numpy dtype and is widened by hand.
_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_SUPPORTED_BINARY_VERSIONS = range(4, 7)


class CT2FormatError(ValueError):
    """The bytes are not a CTranslate2 model file this reader understands."""


@dataclass
class CT2Model:
    """Variables of a CTranslate2 model, aliases resolved and quantized weights dequantized."""

    spec_name: str
    spec_revision: int
    binary_version: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    source_dtypes: dict[str, str] = field(default_factory=dict)


class _Cursor:
    def __init__(self, data: memoryview):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CT2FormatError(
                f"CTranslate2 model file is truncated: wanted {n} bytes at offset {self.pos}, "
                f"file has {len(self.data)}"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        length = self.unpack("H")
        raw = bytes(self.take(length))
        return raw.rstrip(b"\0").decode("utf-8")


def _decode_array(raw: memoryview, dtype_name: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype_name == "bfloat16":
        # bfloat16 is the upper half of a float32: shift the 16 bits into place.
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype_name).newbyteorder("<")).reshape(shape)


def parse_ct2_model(data: bytes | bytearray | memoryview) -> CT2Model:
    """Parse the bytes of a CTranslate2 `model.bin` into float32/int arrays keyed by name."""
    cursor = _Cursor(memoryview(data))
    binary_version = cursor.unpack("I")
    if binary_version not in _SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(
            f"unsupported CTranslate2 binary version {binary_version} "
            f"(this reader handles {_SUPPORTED_BINARY_VERSIONS.start}-"
            f"{_SUPPORTED_BINARY_VERSIONS.stop - 1})"
        )
    model = CT2Model(
        spec_name=cursor.string(), spec_revision=cursor.unpack("I"), binary_version=binary_version
    )
    raw_variables: dict[str, np.ndarray] = {}
    for _ in range(cursor.unpack("I")):
        name = cursor.string()
        rank = cursor.unpack("B")
        shape = tuple(cursor.unpack("I") for _ in range(rank))
        dtype_id = cursor.unpack("B")
        if dtype_id not in _DTYPES:
            raise CT2FormatError(f"variable {name!r} has unknown CTranslate2 dtype id {dtype_id}")
        dtype_name = _DTYPES[dtype_id]
        n_bytes = cursor.unpack("I")
        raw_variables[name] = _decode_array(cursor.take(n_bytes), dtype_name, shape)
        model.source_dtypes[name] = dtype_name

    aliases = {}
    for _ in range(cursor.unpack("I")):
        alias = cursor.string()
        aliases[alias] = cursor.string()
    if cursor.pos != len(cursor.data):
        raise CT2FormatError(
            f"{len(cursor.data) - cursor.pos} trailing bytes after the CTranslate2 variable table"
        )

    model.variables = _dequantize(raw_variables)
    for alias, target in aliases.items():
        if target not in model.variables:
            raise CT2FormatError(f"alias {alias!r} points to missing variable {target!r}")
        model.variables[alias] = model.variables[target]
        model.source_dtypes[alias] = model.source_dtypes[target]
    return model


def _dequantize(raw_variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn every float array into float32 and every quantized weight back into float32.

    CTranslate2 stores `q = round(w * scale)` with `scale` per output row (int8) or per tensor
    (int16), so `w = q / scale`.
    """
    scale_names = {name for name in raw_variables if name.endswith("_scale")}
    result: dict[str, np.ndarray] = {}
    for name, value in raw_variables.items():
        if name in scale_names and name[: -len("_scale")] in raw_variables:
            continue
        scale = raw_variables.get(name + "_scale")
        if value.dtype in (np.int8, np.int16) and scale is not None and value.ndim >= 1:
            scale = np.asarray(scale, dtype=np.float32)
            if scale.ndim == 1:
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            result[name] = value.astype(np.float32) / scale
        elif value.dtype.kind == "f":
            result[name] = value.astype(np.float32)
        else:
            # Scalars and integer settings (flags, head counts) stay as stored.
            result[name] = value.copy()
    return result

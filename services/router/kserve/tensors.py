"""KServe v2 tensor data as plain Python values, in both of the protocol's encodings.

A request may carry an input's elements typed (`contents`) or as raw little-endian bytes
(`raw_input_contents`, what tritonclient sends). Everything here raises TensorError with a message
naming the tensor, so the gRPC layer can answer INVALID_ARGUMENT that a person can act on.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from inference import grpc_service_pb2 as kserve_pb2

#: Datatypes we read and write: (struct format of one element, field of InferTensorContents).
_LAYOUT: dict[str, tuple[str, str]] = {
    "BOOL": ("?", "bool_contents"),
    "INT32": ("i", "int_contents"),
    "INT64": ("q", "int64_contents"),
    "UINT32": ("I", "uint_contents"),
    "UINT64": ("Q", "uint64_contents"),
    "FP32": ("f", "fp32_contents"),
    "FP64": ("d", "fp64_contents"),
    "BYTES": ("", "bytes_contents"),
}
Value = bool | int | float | bytes

#: Upper bound on elements per tensor; far above anything a text request needs.
MAX_ELEMENTS = 1 << 20


class TensorError(ValueError):
    """A tensor whose shape, datatype or data cannot be read."""


def element_count(name: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise TensorError(f"input {name!r} has a negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise TensorError(f"input {name!r} has {count} elements; the limit is {MAX_ELEMENTS}")
    return count


def decode_bytes_elements(name: str, raw: bytes) -> list[bytes]:
    """Split a raw BYTES tensor: each element is a 4-byte little-endian length, then the bytes."""
    out: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise TensorError(f"raw BYTES data of input {name!r} ends inside a length prefix "
                              f"(at byte {pos} of {len(raw)}); each element needs a 4-byte "
                              "little-endian length before its bytes")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise TensorError(f"raw BYTES data of input {name!r} is truncated: an element claims "
                              f"{size} bytes but only {len(raw) - pos} remain")
        out.append(raw[pos:pos + size])
        pos += size
    return out


def encode_bytes_elements(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def encode_raw(datatype: str, values: Sequence[Value]) -> bytes:
    """Raw little-endian bytes of `values`, as Triton puts them in raw_output_contents."""
    if datatype == "BYTES":
        return encode_bytes_elements(values)  # type: ignore[arg-type]  # BYTES elements are bytes
    fmt, _ = _LAYOUT[datatype]
    return struct.pack(f"<{len(values)}{fmt}", *values)


def read_values(tensor: kserve_pb2.ModelInferRequest.InferInputTensor,
                raw: bytes | None) -> list[Value]:
    """The elements of one input tensor, from `raw` when given, else from its typed contents."""
    name, datatype = tensor.name, tensor.datatype
    if datatype not in _LAYOUT:
        raise TensorError(f"input {name!r} has datatype {datatype!r}, which this endpoint does "
                          f"not read (known: {', '.join(_LAYOUT)})")
    count = element_count(name, tensor.shape)
    fmt, field = _LAYOUT[datatype]
    if raw is not None:
        if datatype == "BYTES":
            values: list[Value] = list(decode_bytes_elements(name, raw))
        else:
            size = struct.calcsize(f"<{fmt}")
            if len(raw) != count * size:
                raise TensorError(
                    f"raw data of input {name!r} has {len(raw)} bytes; {datatype} with shape "
                    f"{list(tensor.shape)} needs {count * size} ({count} x {size})")
            values = list(struct.unpack(f"<{count}{fmt}", raw))
    else:
        values = list(getattr(tensor.contents, field))
    if len(values) != count:
        where = "" if raw is not None else f" ({datatype} elements go in contents.{field})"
        raise TensorError(f"input {name!r} has {len(values)} element(s) but its shape "
                          f"{list(tensor.shape)} says {count}{where}")
    return values

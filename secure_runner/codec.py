"""Values on the wire: the one place that turns Python values into bytes and back.

Every input is untrusted: bytes come from the network, values come from model code.
The rules, for an auditor:

- Each VariantType has one explicit, byte-order independent encoding (see the
  per-type functions below and proto/secure_runner/v1/values.proto). Decoding is
  strict: non-canonical INT bytes, invalid UTF-8, JSON with NaN/Infinity or
  duplicate keys, and .npy payloads with trailing or missing bytes are refused.
- Nothing is ever unpickled or evaluated: JSON is parsed by `json` (or by orjson
  where it must agree with `json`, see `_orjson_reads_as_json`), arrays by numpy's .npy reader
  with `allow_pickle=False`; object dtypes are refused.
- Limits (`CodecLimits`) bound the size of every encoded value, the nesting depth
  of JSON and the length of integers. On decode the size is checked before any
  parsing; numpy array headers are checked against the payload length before
  numpy allocates anything; JSON trees are walked without recursion, and shared
  sub-objects count every time they would be written.
- Only `CodecError` leaves this module. Each per-type function runs under one guard
  (`_guarded`) that turns any other exception (a library error, or one raised by a
  strange value's own methods) into a CodecError with a stable code.
- numpy is optional and imported only to encode or decode NDARRAY values.
"""

from __future__ import annotations

import io
import json
import keyword
import math
import re
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from secure_runner.errors import CodecError, ErrorCode
from secure_runner.v1.values_pb2 import Argument, KwArgument, Variant, VariantType


@dataclass(frozen=True)
class CodecLimits:
    max_value_bytes: int = 16 * 1024 * 1024  # encoded size of one value
    max_depth: int = 64  # JSON containers nested in one another ([[1]] is depth 2)
    max_int_bytes: int = 4096  # encoded size of one INT


DEFAULT_LIMITS = CodecLimits()

_NPY_MAGIC = b"\x93NUMPY"


def _invalid(message: str) -> CodecError:
    return CodecError(ErrorCode.INVALID_VALUE, message)


def _wrong_type(expected: str, value: Any) -> CodecError:
    return _invalid(f"expected {expected}, got {type(value).__name__}")


def _check_size(size: int, limit: int, what: str = "size in bytes") -> None:
    if size > limit:
        raise CodecError(ErrorCode.VALUE_TOO_LARGE, f"{what} {size} exceeds the limit of {limit}")


def _is_numpy(value: Any, name: str) -> bool:
    """isinstance(value, numpy.<name>), without importing numpy if nobody else has."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, getattr(numpy, name))


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise CodecError(
            ErrorCode.UNSUPPORTED_TYPE,
            "NDARRAY values need numpy: install the `numpy` extra (secure-runner[numpy])",
        ) from None
    return numpy


# --- NONE, BOOL, INT, DOUBLE, STRING, BYTES ---------------------------------------


def _encode_none(value: Any, limits: CodecLimits) -> bytes:
    if value is not None:
        raise _wrong_type("None", value)
    return b""


def _decode_none(data: bytes, limits: CodecLimits) -> None:
    if data:
        raise _invalid(f"NONE must be empty, got {len(data)} bytes")


def _encode_bool(value: Any, limits: CodecLimits) -> bytes:
    if not (isinstance(value, bool) or _is_numpy(value, "bool_")):
        raise _wrong_type("bool", value)
    return b"\x01" if value else b"\x00"


def _decode_bool(data: bytes, limits: CodecLimits) -> bool:
    if data not in (b"\x00", b"\x01"):
        raise _invalid("BOOL must be exactly one byte, 0x00 or 0x01")
    return data == b"\x01"


def _int_length(value: int) -> int:
    """Minimal two's complement length: the magnitude bits plus one sign bit, in bytes."""
    return ((value if value >= 0 else ~value).bit_length() + 8) // 8


def _encode_int(value: Any, limits: CodecLimits) -> bytes:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong_type("int", value)
    length = _int_length(value)
    _check_size(length, limits.max_int_bytes)
    return value.to_bytes(length, "little", signed=True)


def _decode_int(data: bytes, limits: CodecLimits) -> int:
    if not data:
        raise _invalid("INT must not be empty")
    _check_size(len(data), limits.max_int_bytes)
    value = int.from_bytes(data, "little", signed=True)
    if _int_length(value) != len(data):
        raise _invalid("INT is not in minimal (canonical) form")
    return value


def _encode_double(value: Any, limits: CodecLimits) -> bytes:
    if not isinstance(value, (float, int)) or isinstance(value, bool):
        raise _wrong_type("float or int", value)
    return struct.pack("<d", float(value))


def _decode_double(data: bytes, limits: CodecLimits) -> float:
    if len(data) != 8:
        raise _invalid(f"DOUBLE must be exactly 8 bytes, got {len(data)}")
    return struct.unpack("<d", data)[0]


def _encode_string(value: Any, limits: CodecLimits) -> bytes:
    if not isinstance(value, str):
        raise _wrong_type("str", value)
    _check_size(len(value), limits.max_value_bytes)  # each character is at least one byte
    return value.encode("utf-8")


def _decode_string(data: bytes, limits: CodecLimits) -> str:
    return data.decode("utf-8")


def _encode_bytes(value: Any, limits: CodecLimits) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _wrong_type("bytes, bytearray or memoryview", value)
    _check_size(memoryview(value).nbytes, limits.max_value_bytes)
    return bytes(value)


def _decode_bytes(data: bytes, limits: CodecLimits) -> bytes:
    return data


# --- JSON ---------------------------------------------------------------------------


_CONTAINERS = (dict, list, tuple)
_SCALARS = frozenset({type(None), bool, int, float, str})
# Exact types orjson encodes exactly as `json` would (it would also take datetimes, dataclasses, ...).
_PLAIN = _SCALARS | {dict, list, tuple}
_STR = frozenset({str})


def _check_json_tree(value: Any, limits: CodecLimits, *, finite: bool = False) -> bool:
    """Check nesting depth, str-only keys and a size bound, level by level (no recursion).

    With `finite`, also refuse infinities (a decoded 1e999 is inf, which JSON cannot
    carry back); `inf in items` scans each container at C speed.

    Each container counts for at least len(container) + 1 encoded bytes, so shared
    sub-objects (a = [b, b], b = [c, c], ...) cannot make encoding take exponential
    time. Scalars are checked by the encoder, at C speed.

    Returns whether the tree is plain: only the exact types in `_PLAIN` (no
    subclasses), str keys included, so orjson may encode it.
    """
    budget = limits.max_value_bytes
    level, depth = [value], 0
    plain = type(value) in _PLAIN
    while level:
        containers = [node for node in level if isinstance(node, _CONTAINERS)]
        if containers and depth == limits.max_depth:
            raise CodecError(ErrorCode.VALUE_TOO_DEEP, f"nesting deeper than {limits.max_depth}")
        level = []
        for node in containers:
            budget -= len(node) + 1
            if budget < 0:
                raise CodecError(
                    ErrorCode.VALUE_TOO_LARGE, f"JSON exceeds {limits.max_value_bytes} bytes"
                )
            if isinstance(node, dict):
                key_types = set(map(type, node))
                if not _STR.issuperset(key_types):
                    if not all(isinstance(key, str) for key in node):
                        raise _invalid("JSON object keys must be str")
                    plain = False  # str subclasses
                node = node.values()
            if finite and (_INFINITY in node or -_INFINITY in node):
                raise _invalid("JSON number overflows a double")
            item_types = set(map(type, node))
            plain = plain and _PLAIN.issuperset(item_types)
            if not _SCALARS.issuperset(item_types):  # some item may be a container
                level.extend(node)
        depth += 1
    return plain


def _dump_json(value: Any) -> bytes:
    """Strict JSON: refuses NaN/Infinity, non-JSON types and lone surrogates (not UTF-8)."""
    text = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise _invalid(f"JSON constant {name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _invalid("JSON object has duplicate keys")
    return obj


def _encode_json(value: Any, limits: CodecLimits) -> bytes:
    """orjson for plain trees (about 20x faster); `json` decides everything else.

    orjson writes NaN and infinities as null: output with a null goes through `json`
    too, which refuses them. It raises on ints beyond 64 bits and lone surrogates,
    which `json` then encodes or refuses with its own message.
    """
    if _check_json_tree(value, limits):
        try:
            data = orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass
        else:
            if b"null" not in data:
                return data
    return _dump_json(value)


# Lone surrogates can only come from \u escapes: only text with one needs the full check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


_INFINITY = float("inf")


# Any digit becomes 9: a run of 19 nines then marks a number orjson may not read exactly.
_DIGITS_AS_NINES = bytes.maketrans(b"012345678", b"999999999")
_LONG_DIGIT_RUN = b"9" * 19


def _orjson_reads_as_json(data: bytes) -> bool:
    """Whether orjson must read `data` exactly as the strict `json` parse would.

    orjson (about 10x faster) differs where it matters in two ways: it keeps the last
    of duplicate object keys, and reads an integer beyond 64 bits as a float. So it
    only gets text without objects and without a run of 19 digits (every integer of
    19 digits or less fits in 64 bits). tests/test_codec.py checks the two parses
    agree on random text.
    """
    return b"{" not in data and _LONG_DIGIT_RUN not in data.translate(_DIGITS_AS_NINES)


def _decode_json(data: bytes, limits: CodecLimits) -> Any:
    if _orjson_reads_as_json(data):
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # NaN, 1e999, "\ud800", invalid UTF-8, ...: the strict parse below says why
        else:
            _check_json_tree(value, limits)  # orjson itself refuses infinities and lone surrogates
            return value
    value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    if value in (_INFINITY, -_INFINITY):  # a top-level 1e999
        raise _invalid("JSON number overflows a double")
    _check_json_tree(value, limits, finite=True)
    if _SURROGATE_ESCAPE.search(data):
        _dump_json(value)  # refuse what we could not send back: "\ud800"
    return value


# --- NDARRAY ------------------------------------------------------------------------


def _check_npy(data: bytes, limits: CodecLimits, numpy: Any) -> None:
    """Validate an .npy header against the payload before numpy allocates the array."""
    if not data.startswith(_NPY_MAGIC):
        raise _invalid("not in .npy format")
    stream = io.BytesIO(data)
    npy = numpy.lib.format
    read_header = {
        (1, 0): npy.read_array_header_1_0,
        (2, 0): npy.read_array_header_2_0,
    }.get(npy.read_magic(stream))
    if read_header is None:
        raise _invalid("only .npy format versions 1.0 and 2.0 are accepted")
    shape, _fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise _invalid("arrays of Python objects are refused (they need pickle)")
    if any(side < 0 for side in shape):
        raise _invalid(f"negative dimension in shape {shape}")
    count = math.prod(shape)
    if stream.tell() + count * dtype.itemsize != len(data):
        raise _invalid("data length does not match the header (truncated or trailing)")
    _check_size(count, limits.max_value_bytes, "element count")  # items of zero bytes too


def _encode_ndarray(value: Any, limits: CodecLimits) -> bytes:
    numpy = _numpy()
    if not isinstance(value, numpy.ndarray):
        raise _wrong_type("numpy.ndarray", value)
    if value.dtype.hasobject:
        raise _invalid("arrays of Python objects are refused (they need pickle)")
    _check_size(value.nbytes, limits.max_value_bytes)
    stream = io.BytesIO()
    numpy.save(stream, value, allow_pickle=False)
    data = stream.getvalue()
    _check_npy(data, limits, numpy)  # what we send, we would accept
    return data


def _decode_ndarray(data: bytes, limits: CodecLimits) -> Any:
    numpy = _numpy()
    _check_npy(data, limits, numpy)
    return numpy.load(io.BytesIO(data), allow_pickle=False)


# --- Dispatch -----------------------------------------------------------------------

_Encoder = Callable[[Any, CodecLimits], bytes]
_Decoder = Callable[[bytes, CodecLimits], Any]

_CODECS: dict[int, tuple[_Encoder, _Decoder] | None] = {
    VariantType.NONE: (_encode_none, _decode_none),
    VariantType.BOOL: (_encode_bool, _decode_bool),
    VariantType.INT: (_encode_int, _decode_int),
    VariantType.DOUBLE: (_encode_double, _decode_double),
    VariantType.STRING: (_encode_string, _decode_string),
    VariantType.BYTES: (_encode_bytes, _decode_bytes),
    VariantType.JSON: (_encode_json, _decode_json),
    VariantType.NDARRAY: (_encode_ndarray, _decode_ndarray),
    VariantType.PARQUET: None,  # reserved
    VariantType.ARROW: None,  # reserved
}
_NAMES = {variant_type: VariantType.Name(variant_type) for variant_type in _CODECS}


def _codec(variant_type: Any) -> tuple[str, tuple[_Encoder, _Decoder]]:
    if (
        not isinstance(variant_type, int)
        or isinstance(variant_type, bool)
        or variant_type not in _CODECS
    ):
        raise CodecError(ErrorCode.UNSUPPORTED_TYPE, f"unknown variant type {variant_type!r}")
    name = _NAMES[variant_type]
    codec = _CODECS[variant_type]
    if codec is None:
        raise CodecError(ErrorCode.UNSUPPORTED_TYPE, f"{name} values are not supported yet")
    return name, codec


def _guarded(doing: str, function: Callable[..., Any], arg: Any, limits: CodecLimits) -> Any:
    """Run one per-type function; let nothing but CodecError out, with stable codes."""
    try:
        return function(arg, limits)
    except CodecError as exc:
        raise CodecError(exc.code, f"{doing}: {exc.message}") from None
    except RecursionError:
        raise CodecError(ErrorCode.VALUE_TOO_DEEP, f"{doing}: nested too deeply") from None
    except MemoryError:
        raise CodecError(ErrorCode.VALUE_TOO_LARGE, f"{doing}: out of memory") from None
    except Exception as exc:
        raise _invalid(f"{doing}: {_describe(exc)}") from exc


def _describe(exc: Exception) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"[:500]
    except Exception:  # str() of an exception raised by a strange value's own method
        return type(exc).__name__


def encode_data(type: int, value: Any, *, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Encode `value` as VariantType `type`; raise CodecError if it does not fit."""
    name, (encode, _) = _codec(type)
    data = _guarded(f"cannot encode {name}", encode, value, limits)
    _check_size(len(data), limits.max_value_bytes, f"encoded {name} size in bytes")
    return data


def decode_data(type: int, data: bytes, *, limits: CodecLimits = DEFAULT_LIMITS) -> Any:
    """Decode wire bytes of VariantType `type`; raise CodecError if they break a rule."""
    name, (_, decode) = _codec(type)
    if not isinstance(data, (bytes, bytearray)):
        raise _wrong_type("bytes", data)
    _check_size(len(data), limits.max_value_bytes, f"encoded {name} size in bytes")
    return _guarded(f"cannot decode {name}", decode, bytes(data), limits)


# Inference order matters: bool is a subclass of int.
_INFERRED: tuple[tuple[type | tuple[type, ...], int], ...] = (
    (type(None), VariantType.NONE),
    (bool, VariantType.BOOL),
    (int, VariantType.INT),
    (float, VariantType.DOUBLE),
    (str, VariantType.STRING),
    ((bytes, bytearray, memoryview), VariantType.BYTES),
    ((dict, list, tuple), VariantType.JSON),
)


def _infer(value: Any, limits: CodecLimits) -> tuple[int, Any]:
    if _is_numpy(value, "generic"):
        value = value.item()
    if _is_numpy(value, "ndarray"):
        return VariantType.NDARRAY, value
    for python_type, variant_type in _INFERRED:
        if isinstance(value, python_type):
            return variant_type, value
    raise _invalid(
        f"unsupported type {type(value).__name__} (expected None, bool, int, float, str, "
        "bytes, dict, list, tuple, or a numpy array or scalar)"
    )


def to_variant(value: Any, *, limits: CodecLimits = DEFAULT_LIMITS) -> Variant:
    """Encode a value (typically a model's return value), inferring its VariantType."""
    variant_type, value = _guarded("cannot infer a variant type", _infer, value, limits)
    return Variant(type=variant_type, value=encode_data(variant_type, value, limits=limits))


def from_variant(variant: Variant, *, limits: CodecLimits = DEFAULT_LIMITS) -> Any:
    return decode_data(variant.type, variant.value, limits=limits)


def _bad_arguments(message: str) -> CodecError:
    return CodecError(ErrorCode.INVALID_ARGUMENTS, message)


def _check_keyword(name: Any) -> None:
    if not (
        isinstance(name, str)
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and not name.startswith("_")
    ):
        raise _bad_arguments(
            f"keyword {name!r} must be a Python identifier that does not start with '_'"
        )


def _decode_argument(where: str, variant: Variant, limits: CodecLimits) -> Any:
    try:
        return from_variant(variant, limits=limits)
    except CodecError as exc:
        raise CodecError(exc.code, f"{where}: {exc.message}") from None


def decode_arguments(
    arguments: Sequence[Argument],
    kwargs: Sequence[KwArgument],
    *,
    limits: CodecLimits = DEFAULT_LIMITS,
    max_arguments: int = 256,
) -> tuple[list[Any], dict[str, Any]]:
    """Decode a call's arguments: positions exactly 1..n, unique identifier keywords."""
    if len(arguments) + len(kwargs) > max_arguments:
        raise _bad_arguments(
            f"{len(arguments) + len(kwargs)} arguments exceed the limit of {max_arguments}"
        )
    ordered = sorted(arguments, key=lambda argument: argument.position)
    positions = [argument.position for argument in ordered]
    if positions != list(range(1, len(ordered) + 1)):
        raise _bad_arguments(f"positions must be 1..n without gaps or repeats, got {positions}")
    args = [_decode_argument(f"argument {a.position}", a.data, limits) for a in ordered]
    values: dict[str, Any] = {}
    for kwarg in kwargs:
        _check_keyword(kwarg.keyword)
        if kwarg.keyword in values:
            raise _bad_arguments(f"keyword {kwarg.keyword!r} is repeated")
        values[kwarg.keyword] = _decode_argument(f"keyword {kwarg.keyword}", kwarg.data, limits)
    return args, values


def encode_arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any], *, limits: CodecLimits = DEFAULT_LIMITS
) -> tuple[list[Argument], list[KwArgument]]:
    """Encode a call's arguments with inferred types (positions 1..n)."""
    arguments = [
        Argument(position=position, data=to_variant(value, limits=limits))
        for position, value in enumerate(args, start=1)
    ]
    keywords = []
    for name, value in kwargs.items():
        _check_keyword(name)
        keywords.append(KwArgument(keyword=name, data=to_variant(value, limits=limits)))
    return arguments, keywords

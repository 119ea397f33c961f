"""Values on the wire: the one place that turns Python values into bytes and back.

Every input is untrusted: bytes come from the network, values come from model code
(a coordinator decodes the outputs of untrusted models with this module too).
The rules, for an auditor:

- Each VariantType has one explicit, byte-order independent encoding (see the
  per-type functions below and proto/secure_runner/v1/values.proto). Decoding is
  strict: non-canonical INT bytes, invalid UTF-8, JSON with NaN/Infinity or
  duplicate keys, and .npy payloads with trailing or missing bytes are refused.
- Nothing is ever unpickled or evaluated: JSON is parsed by orjson where its result is
  checked to be exactly the strict `json` parse (`_orjson_may_read`, `_orjson_lost_keys`)
  and by `json` otherwise, arrays by numpy's .npy reader with `allow_pickle=False`
  (object dtypes are refused), data frames by pyarrow after the checks below.
- PARQUET (a Parquet file) and ARROW (an Arrow IPC stream) decode to a pandas
  DataFrame, as the reference client decodes PARQUET; a DataFrame or pyarrow Table
  encodes (and is inferred as PARQUET). Before pyarrow reads a schema, bytes naming an
  Arrow extension type are refused (their deserializers run code: CVE-2023-47248);
  compressed Arrow IPC bodies are refused; only types whose decoded size follows their
  encoded size are accepted (no views, run-end encoding, unions or nested dictionaries);
  pandas metadata must be what pyarrow writes for plain dtypes (no name that reaches a
  registered pandas ExtensionDtype, no MultiIndex columns, timezone names only).
- Limits (`CodecLimits`) bound the size of every encoded value (by default, all of a
  gRPC message but room for the rest of the request), the nesting depth of JSON and
  Arrow types, the length of integers, and a data frame's rows, columns and decoded
  size (Parquet's declared sizes before reading, each row group's as it is read). On
  decode the size is checked before any parsing; numpy array headers are checked
  against the payload length before numpy allocates anything; JSON trees are walked
  without recursion, and shared sub-objects count every time they would be written.
- Only `CodecError` leaves this module. Each per-type function runs under one guard
  (`_guarded`) that turns any other exception (a library error, or one raised by a
  strange value's own methods) into a CodecError with a stable code.
- numpy, pyarrow and pandas are optional and imported only for the types that need them.
- `check_arguments` is the coordinator's pre-send check: it skips values this process
  encoded itself (valid by construction) and decodes any other; workers always decode.
- A worker decodes a big argument from a read-only-shared, copy-on-write mapping
  (runner/shared_payload.py) as a memoryview: NDARRAY, PARQUET and ARROW read it in place
  (a numpy array over the mapping; pyarrow buffers over it), every other type copies it
  to bytes first (JSON: orjson and the checks around it read bytes; one memcpy).
"""

from __future__ import annotations

import base64
import io
import json
import keyword
import math
import re
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from secure_runner.errors import CodecError, ErrorCode
from secure_runner.v1.values_pb2 import Argument, KwArgument, Variant, VariantType


# gRPC's message cap (transport/tls.py MAX_MESSAGE_BYTES; tests/test_codec.py checks they agree): one
# value may fill a request but for room for the rest of it (method, model id, framing, small arguments).
MESSAGE_CAP_BYTES = 64 * 1024 * 1024
REQUEST_ROOM_BYTES = 64 * 1024


@dataclass(frozen=True)
class CodecLimits:
    max_value_bytes: int = MESSAGE_CAP_BYTES - REQUEST_ROOM_BYTES  # encoded size of one value
    max_depth: int = 64  # JSON containers (or Arrow nested types) in one another ([[1]] is depth 2)
    max_int_bytes: int = 4096  # encoded size of one INT
    max_rows: int = 16 * 1024 * 1024  # rows of one PARQUET or ARROW data frame
    max_columns: int = 16 * 1024  # its columns, nested fields included
    max_decoded_bytes: int = 256 * 1024 * 1024  # its Arrow data once decoded (Parquet decompresses)


DEFAULT_LIMITS = CodecLimits()

_NPY_MAGIC = b"\x93NUMPY"
# numpy's readers refuse an .npy header over 10,000 bytes: this much of a value holds any header they read.
_NPY_HEADER_BYTES = 16 * 1024


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


def _is_frame(value: Any) -> bool:
    """A pandas DataFrame or pyarrow Table, without importing either if nobody else has."""
    pandas, pyarrow = sys.modules.get("pandas"), sys.modules.get("pyarrow")
    return (pandas is not None and isinstance(value, pandas.DataFrame)) or (
        pyarrow is not None and isinstance(value, pyarrow.Table)
    )


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


def _check_json_tree(value: Any, limits: CodecLimits, *, finite: bool = False) -> tuple[bool, int]:
    """Check nesting depth, str-only keys and a size bound, level by level (no recursion).

    With `finite`, also refuse infinities (a decoded 1e999 is inf, which JSON cannot
    carry back); `inf in items` scans each container at C speed.

    Each container counts for at least len(container) + 1 encoded bytes, so shared
    sub-objects (a = [b, b], b = [c, c], ...) cannot make encoding take exponential
    time. Scalars are checked by the encoder, at C speed.

    Returns whether the tree is plain: only the exact types in `_PLAIN` (no
    subclasses), str keys included, so orjson may encode it; and how many members
    its objects hold (see `_orjson_lost_keys`).
    """
    budget = limits.max_value_bytes
    level, depth, members = [value], 0, 0
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
                members += len(node)
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
    return plain, members


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
    if _check_json_tree(value, limits)[0]:
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


# Any digit becomes 9: a run of 19 nines then marks a number orjson may read differently.
_DIGITS_AS_NINES = bytes.maketrans(b"012345678", b"999999999")
_LONG_RUN = b"9" * 19
_NOT_NINE = re.compile(rb"[^9]")
_DOT, _MANTISSA_ENDS = ord("."), frozenset(b".eE")
# A colon written as an escape: decoded strings would hold more colons than the text shows.
_ESCAPED_COLON = re.compile(rb"\\u003[aA]")


def _may_hold_long_integer(data: bytes) -> bool:
    """Whether `data` has a run of 19 digits or more that is not part of a float's mantissa.

    Every integer of 18 digits or less fits in 64 bits; orjson reads a larger one as a
    float. A run right after a "." is a fraction, and one right before a ".", "e" or "E"
    is the integer part of a float: orjson reads those exactly as `json` does (proved by
    the differential fuzz tests in tests/test_codec.py). Any other run, exponents and
    runs inside strings included, sends the text to `json`: the rule is only ever too
    careful. Runs are found at C speed; ordinary floats have few of 19 digits.
    """
    nines = data.translate(_DIGITS_AS_NINES)
    start = nines.find(_LONG_RUN)
    while start >= 0:
        after = _NOT_NINE.search(nines, start + len(_LONG_RUN))
        end = len(nines) if after is None else after.start()
        fraction = start > 0 and nines[start - 1] == _DOT
        if not fraction and (end == len(nines) or nines[end] not in _MANTISSA_ENDS):
            return True
        start = nines.find(_LONG_RUN, end)
    return False


def _orjson_may_read(data: bytes) -> bool:
    """Whether orjson's parse of `data` can be checked to be exactly the strict `json` parse.

    orjson (about 4x faster) differs where it matters in two ways: it reads an integer
    beyond 64 bits as a float (so such text goes to `json`), and it keeps the last of
    duplicate object keys, which `_orjson_lost_keys` detects afterwards.
    """
    return not _may_hold_long_integer(data) and not (b"{" in data and _ESCAPED_COLON.search(data))


def _orjson_lost_keys(data: bytes, value: Any, members: int) -> bool:
    """Whether orjson merged duplicate keys while reading `data` into `value`.

    Outside strings, each ":" of JSON text separates one object member; inside strings,
    each ":" is written as itself (escaped colons never get here), and so it is when
    orjson writes `value` back. A dropped member takes at least its own ":" with it, so
    the two texts hold as many colons exactly when no key was lost. `members` (what
    orjson kept) settles the common case of strings without colons for free.
    """
    colons = data.count(b":")
    return colons != members and colons != orjson.dumps(value).count(b":")


def _decode_json(data: bytes, limits: CodecLimits) -> Any:
    if _orjson_may_read(data):
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # NaN, 1e999, "\ud800", invalid UTF-8, ...: the strict parse below says why
        else:
            # orjson itself refuses infinities and lone surrogates.
            _plain, members = _check_json_tree(value, limits)
            if not (b"{" in data and _orjson_lost_keys(data, value, members)):
                return value
    value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    if value in (_INFINITY, -_INFINITY):  # a top-level 1e999
        raise _invalid("JSON number overflows a double")
    _check_json_tree(value, limits, finite=True)
    if _SURROGATE_ESCAPE.search(data):
        _dump_json(value)  # refuse what we could not send back: "\ud800"
    return value


# --- NDARRAY ------------------------------------------------------------------------


def _check_npy(data: bytes | memoryview, limits: CodecLimits, numpy: Any) -> tuple[Any, tuple[int, ...], bool, int]:
    """Validate an .npy header against the payload before numpy allocates the array.

    Returns the array's dtype, shape, Fortran order and the offset of its data.
    """
    if data[: len(_NPY_MAGIC)] != _NPY_MAGIC:
        raise _invalid("not in .npy format")
    stream = io.BytesIO(data[:_NPY_HEADER_BYTES])  # numpy refuses a longer header anyway
    npy = numpy.lib.format
    read_header = {
        (1, 0): npy.read_array_header_1_0,
        (2, 0): npy.read_array_header_2_0,
    }.get(npy.read_magic(stream))
    if read_header is None:
        raise _invalid("only .npy format versions 1.0 and 2.0 are accepted")
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise _invalid("arrays of Python objects are refused (they need pickle)")
    if any(side < 0 for side in shape):
        raise _invalid(f"negative dimension in shape {shape}")
    count = math.prod(shape)
    if stream.tell() + count * dtype.itemsize != len(data):
        raise _invalid("data length does not match the header (truncated or trailing)")
    _check_size(count, limits.max_value_bytes, "element count")  # items of zero bytes too
    return dtype, shape, fortran_order, stream.tell()


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


def _decode_ndarray(data: bytes | memoryview, limits: CodecLimits) -> Any:
    """A writable (private, copy-on-write) mapping is read in place; bytes are copied into a new array."""
    numpy = _numpy()
    dtype, shape, fortran_order, offset = _check_npy(data, limits, numpy)
    if isinstance(data, memoryview) and not data.readonly:
        flat = numpy.frombuffer(data, dtype, count=math.prod(shape), offset=offset)
        return flat.reshape(shape, order="F" if fortran_order else "C")
    return numpy.load(io.BytesIO(data), allow_pickle=False)


# --- PARQUET and ARROW (data frames) ------------------------------------------------

# The field metadata key that names an Arrow extension type. Reading a schema, pyarrow rebuilds
# any registered extension type from it by running that type's own deserializer (CVE-2023-47248:
# PyExtensionType's unpickled). The bytes pyarrow reads a schema from are refused if they hold the
# key, before pyarrow reads them: a Parquet file's footer (its only metadata pyarrow reads the Arrow
# schema from), where the key is base64-encoded at one of three alignments ("ARROW:schema"; pyarrow
# decodes one contiguous run of the standard alphabet, so an encoded key shows one of these forms),
# and the metadata of every Arrow IPC message, where it is literal (IPC metadata is never
# compressed). Column data and message bodies, the bulk of a value, are never read as a schema:
# they are not searched (16 MiB took ~20 ms per decode).
_EXTENSION_KEY = b"ARROW:extension:name"
_EXTENSION_KEY_FORMS = (
    _EXTENSION_KEY,
    *(base64.b64encode(_EXTENSION_KEY[skip:][: (len(_EXTENSION_KEY) - skip) // 3 * 3]) for skip in range(3)),
)
_PARQUET_MAGIC = b"PAR1"  # at both ends; an encrypted footer ends with "PARE" instead
# Arrow IPC Message.fbs: MessageHeader union values, and the field slots read here.
_IPC_DICTIONARY_BATCH, _IPC_RECORD_BATCH = 2, 3
_INT32, _UINT32, _UINT16 = struct.Struct("<i"), struct.Struct("<I"), struct.Struct("<H")

# pandas metadata (a JSON object in the schema) tells pyarrow's to_pandas how to rebuild the index,
# column names and dtypes; a dtype string reaches pandas.api.types.pandas_dtype, which consults every
# registered ExtensionDtype. Only what pyarrow writes for frames of plain dtypes is accepted.
_PANDAS_KEYS = frozenset({"index_columns", "column_indexes", "columns", "attributes", "creator", "pandas_version"})
_PANDAS_COLUMN_KEYS = frozenset({"name", "field_name", "pandas_type", "numpy_type", "metadata"})
_PANDAS_COLUMN_METADATA_KEYS = frozenset({"encoding", "timezone", "num_categories", "ordered", "precision", "scale"})
_RANGE_INDEX_KEYS = frozenset({"kind", "name", "start", "stop", "step"})
_TIMEZONE = r"(UTC|[A-Z][A-Za-z_]*(/[A-Za-z0-9_+\-]+){0,2}|[+-][0-9]{2}:[0-9]{2})"  # never a path
_PANDAS_TIMEZONE = re.compile(_TIMEZONE)
_PANDAS_TYPE = re.compile(
    r"(list\[)*(empty|bool|boolean|u?int(8|16|32|64)|float(16|32|64)|integer|floating|datetime|datetimetz"
    r"|timedelta|date|time|unicode|string|bytes|decimal|categorical|object|mixed(-integer(-float)?)?)\]*"
)
_NUMPY_TYPE = re.compile(
    r"bool|boolean|object|str|string|bytes|u?int(8|16|32|64)|U?Int(8|16|32|64)|float(16|32|64)|Float(32|64)"
    rf"|(datetime|timedelta)64\[(s|ms|us|ns)\]|datetime64\[(s|ms|us|ns), {_TIMEZONE}\]"
)
_JSON_SCALARS = (str, int, float, bool, type(None))


def _frames() -> Any:
    """pyarrow, with its parquet and ipc modules and pandas loaded (to_pandas needs it)."""
    try:
        import pandas  # noqa: F401
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise CodecError(
            ErrorCode.UNSUPPORTED_TYPE,
            "PARQUET and ARROW values need pyarrow and pandas: install the `frames` extra (secure-runner[frames])",
        ) from None
    return pyarrow


def _refuse_extension_key(metadata: bytes) -> None:
    if any(form in metadata for form in _EXTENSION_KEY_FORMS):
        raise _invalid("Arrow extension types are refused (their deserializers run code)")


def _parquet_footer(data: bytes | memoryview) -> bytes:
    """A copy of the footer of a Parquet file with a plaintext footer (all the metadata pyarrow reads)."""
    if len(data) < 12 or not (data[:4] == _PARQUET_MAGIC and data[-4:] == _PARQUET_MAGIC):
        raise _invalid("not a Parquet file with a plaintext footer")
    (length,) = _UINT32.unpack_from(data, len(data) - 8)
    if length > len(data) - 12:
        raise _invalid("the Parquet footer is longer than the file")
    return bytes(data[len(data) - 8 - length : len(data) - 8])


def _check_ipc_messages(pa: Any, buffer: Any) -> None:
    """An Arrow IPC stream's messages, before pyarrow reads its schema: one schema first, plain metadata, no compression."""
    for number, message in enumerate(pa.ipc.MessageReader.open_stream(buffer)):
        if (message.type == "schema") != (number == 0):
            raise _invalid("an Arrow IPC stream has one schema message, first")
        metadata = message.metadata.to_pybytes()
        _refuse_extension_key(metadata)
        if _ipc_body_compressed(metadata):
            raise _invalid("compressed Arrow IPC bodies are refused")


def _check_count(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise CodecError(ErrorCode.VALUE_TOO_LARGE, f"{count} {what} exceed the limit of {limit}")


def _is_plain_arrow_type(pa: Any, data_type: Any) -> bool:
    """Types whose decoded size follows their encoded size: no views, run-end encoding or unions,
    whose few bytes can stand for many values."""
    types = pa.types
    return any(
        check(data_type)
        for check in (types.is_null, types.is_boolean, types.is_integer, types.is_floating, types.is_decimal,
                      types.is_temporal, types.is_string, types.is_large_string, types.is_binary,
                      types.is_large_binary, types.is_fixed_size_binary)
    )  # fmt: skip


def _check_arrow_schema(pa: Any, schema: Any, limits: CodecLimits) -> None:
    """Columns, nesting and types of a schema, before any of its data is read."""
    types = pa.types
    fields = 0
    level, depth = [(field, True) for field in schema], 0
    while level:
        if depth == limits.max_depth:
            raise CodecError(ErrorCode.VALUE_TOO_DEEP, f"Arrow types nested deeper than {limits.max_depth}")
        fields += len(level)
        _check_count(fields, limits.max_columns, "columns and nested fields")
        children = []
        for field, top_level in level:
            data_type = field.type
            if isinstance(data_type, pa.BaseExtensionType) or any(
                key.startswith(b"ARROW:extension") for key in field.metadata or ()
            ):
                raise _invalid(f"field {field.name!r}: Arrow extension types are refused")
            if types.is_dictionary(data_type) and top_level and _is_plain_arrow_type(pa, data_type.value_type):
                continue  # a top-level dictionary becomes a pandas Categorical: no values are repeated
            if types.is_list(data_type) or types.is_large_list(data_type) or types.is_fixed_size_list(data_type):
                children.append((data_type.value_field, False))
            elif types.is_struct(data_type):
                children.extend((data_type.field(index), False) for index in range(data_type.num_fields))
            elif types.is_map(data_type):
                children.extend([(data_type.key_field, False), (data_type.item_field, False)])
            elif not _is_plain_arrow_type(pa, data_type):
                raise _invalid(f"field {field.name!r}: Arrow type {data_type} is not accepted")
        level, depth = children, depth + 1
    _check_pandas_metadata((schema.metadata or {}).get(b"pandas"), limits)


def _check_pandas_metadata(raw: bytes | None, limits: CodecLimits) -> None:
    """Accept the pandas metadata pyarrow writes for plain dtypes, and nothing else."""
    if raw is None:
        return
    metadata = _decode_json(raw, limits)
    if not isinstance(metadata, dict) or not _PANDAS_KEYS.issuperset(metadata):
        raise _invalid("pandas metadata has unknown keys")
    index_columns, columns = metadata.get("index_columns", []), metadata.get("columns", [])
    column_indexes = metadata.get("column_indexes", [])
    if not (isinstance(index_columns, list) and isinstance(columns, list) and isinstance(column_indexes, list)):
        raise _invalid("pandas metadata: index_columns, columns and column_indexes must be lists")
    if len(column_indexes) > 1:
        raise _invalid("pandas metadata: column MultiIndexes are refused")
    for index in index_columns:
        if not (isinstance(index, str) or _is_range_index(index)):
            raise _invalid("pandas metadata: an index column is neither a column name nor a range")
    for column in columns + column_indexes:
        _check_pandas_column(column)
    if not isinstance(metadata.get("attributes", {}), dict):
        raise _invalid("pandas metadata: attributes must be an object")


def _is_range_index(index: Any) -> bool:
    return (
        isinstance(index, dict)
        and index.keys() == _RANGE_INDEX_KEYS
        and index["kind"] == "range"
        and isinstance(index["name"], _JSON_SCALARS)
        and all(type(index[key]) is int for key in ("start", "stop", "step"))
        and index["step"] != 0
    )


def _check_pandas_column(column: Any) -> None:
    if not (isinstance(column, dict) and _PANDAS_COLUMN_KEYS.issuperset(column)):
        raise _invalid("pandas metadata: a column description has unknown keys")
    name = column.get("name")
    if not isinstance(name, _JSON_SCALARS) or not isinstance(column.get("field_name"), (str, type(None))):
        raise _invalid("pandas metadata: column names must be plain scalars")
    for key, pattern in (("pandas_type", _PANDAS_TYPE), ("numpy_type", _NUMPY_TYPE)):
        value = column.get(key)
        if not (isinstance(value, str) and pattern.fullmatch(value)):
            raise _invalid(f"pandas metadata: {key} {value!r} is not a plain dtype")
    extra = column.get("metadata") or {}
    if not (isinstance(extra, dict) and _PANDAS_COLUMN_METADATA_KEYS.issuperset(extra)):
        raise _invalid("pandas metadata: a column's metadata has unknown keys")
    if not all(isinstance(value, _JSON_SCALARS) for value in extra.values()):
        raise _invalid("pandas metadata: column metadata values must be scalars")
    timezone = extra.get("timezone")
    if timezone is not None and not (isinstance(timezone, str) and _PANDAS_TIMEZONE.fullmatch(timezone)):
        raise _invalid(f"pandas metadata: timezone {timezone!r} is not a zone name or offset")


def _ipc_body_compressed(metadata: bytes) -> bool:
    """Whether an Arrow IPC message declares a compressed record batch body (Message.fbs).

    A compressed buffer states its own decompressed length, so a few megabytes could ask for
    gigabytes; uncompressed bodies are read in place. pyarrow has verified the flatbuffer already:
    this follows three of its fields (Message.header, DictionaryBatch.data, RecordBatch.compression).
    """

    def field(table: int, slot: int) -> int | None:
        vtable = table - _INT32.unpack_from(metadata, table)[0]
        entry = 4 + 2 * slot
        offset = _UINT16.unpack_from(metadata, vtable + entry)[0] if entry < _UINT16.unpack_from(metadata, vtable)[0] else 0
        return table + offset if offset else None

    def table_at(position: int) -> int:
        return position + _UINT32.unpack_from(metadata, position)[0]

    message = table_at(0)
    header_type, header = field(message, 1), field(message, 2)
    if header_type is None or header is None or metadata[header_type] not in (_IPC_DICTIONARY_BATCH, _IPC_RECORD_BATCH):
        return False
    batch = table_at(header)
    if metadata[header_type] == _IPC_DICTIONARY_BATCH:
        data = field(batch, 1)
        if data is None:
            return False
        batch = table_at(data)
    return field(batch, 3) is not None


def _frame_table(pa: Any, value: Any, limits: CodecLimits) -> Any:
    """The pyarrow Table to send for a pandas DataFrame or pyarrow Table, checked as a decoder will."""
    pandas = sys.modules.get("pandas")
    if isinstance(value, pa.Table):
        table = value
    elif pandas is not None and isinstance(value, pandas.DataFrame):
        table = pa.Table.from_pandas(value, nthreads=1)
    else:
        raise _wrong_type("pandas.DataFrame or pyarrow.Table", value)
    _check_arrow_schema(pa, table.schema, limits)
    _check_count(table.num_rows, limits.max_rows, "rows")
    _check_size(table.nbytes, limits.max_decoded_bytes, "decoded size in bytes")
    return table


def _to_frame(pa: Any, schema: Any, parts: Iterable[Any], limits: CodecLimits) -> Any:
    """Collect decoded batches or row groups under the limits, then build the DataFrame."""
    tables, rows, size = [], 0, 0
    for part in parts:
        rows += part.num_rows
        size += part.nbytes
        _check_count(rows, limits.max_rows, "rows")
        _check_size(size, limits.max_decoded_bytes, "decoded size in bytes")
        tables.append(pa.Table.from_batches([part]) if isinstance(part, pa.RecordBatch) else part)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if not table.schema.equals(schema, check_metadata=True):
        raise _invalid("the data does not match the schema")
    table.validate(full=True)  # offsets and indices in bounds before pandas reads them
    return table.to_pandas(use_threads=False)


def _encode_parquet(value: Any, limits: CodecLimits) -> bytes:
    pa = _frames()
    table = _frame_table(pa, value, limits)
    sink = pa.BufferOutputStream()
    pa.parquet.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    _refuse_extension_key(_parquet_footer(data))  # what we send, we would accept
    return data


def _decode_parquet(data: bytes | memoryview, limits: CodecLimits) -> Any:
    pa = _frames()
    _refuse_extension_key(_parquet_footer(data))
    parquet = pa.parquet.ParquetFile(pa.BufferReader(data), pre_buffer=False)
    footer = parquet.metadata
    _check_count(footer.num_rows, limits.max_rows, "rows")
    declared = sum(footer.row_group(index).total_byte_size for index in range(footer.num_row_groups))
    _check_size(declared, limits.max_decoded_bytes, "declared decoded size in bytes")
    schema = parquet.schema_arrow
    _check_arrow_schema(pa, schema, limits)
    row_groups = (parquet.read_row_group(index, use_threads=False) for index in range(footer.num_row_groups))
    return _to_frame(pa, schema, row_groups, limits)


def _encode_arrow(value: Any, limits: CodecLimits) -> bytes:
    pa = _frames()
    table = _frame_table(pa, value, limits)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data = sink.getvalue().to_pybytes()
    _check_ipc_messages(pa, pa.py_buffer(data))  # what we send, we would accept
    return data


def _decode_arrow(data: bytes | memoryview, limits: CodecLimits) -> Any:
    pa = _frames()
    buffer = pa.py_buffer(data)
    _check_ipc_messages(pa, buffer)
    reader = pa.ipc.open_stream(buffer)
    _check_arrow_schema(pa, reader.schema, limits)
    return _to_frame(pa, reader.schema, reader, limits)


# --- Dispatch -----------------------------------------------------------------------

_Encoder = Callable[[Any, CodecLimits], bytes]
_Decoder = Callable[[bytes, CodecLimits], Any]

_CODECS: dict[int, tuple[_Encoder, _Decoder]] = {
    VariantType.NONE: (_encode_none, _decode_none),
    VariantType.BOOL: (_encode_bool, _decode_bool),
    VariantType.INT: (_encode_int, _decode_int),
    VariantType.DOUBLE: (_encode_double, _decode_double),
    VariantType.STRING: (_encode_string, _decode_string),
    VariantType.BYTES: (_encode_bytes, _decode_bytes),
    VariantType.JSON: (_encode_json, _decode_json),
    VariantType.NDARRAY: (_encode_ndarray, _decode_ndarray),
    VariantType.PARQUET: (_encode_parquet, _decode_parquet),
    VariantType.ARROW: (_encode_arrow, _decode_arrow),
}
_NAMES = {variant_type: VariantType.Name(variant_type) for variant_type in _CODECS}
# Decoders that read a memoryview in place; the others are given bytes.
_READ_IN_PLACE = frozenset({VariantType.NDARRAY, VariantType.PARQUET, VariantType.ARROW})


def _codec(variant_type: Any) -> tuple[str, tuple[_Encoder, _Decoder]]:
    if (
        not isinstance(variant_type, int)
        or isinstance(variant_type, bool)
        or variant_type not in _CODECS
    ):
        raise CodecError(ErrorCode.UNSUPPORTED_TYPE, f"unknown variant type {variant_type!r}")
    return _NAMES[variant_type], _CODECS[variant_type]


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


def _encode(variant_type: int, value: Any, limits: CodecLimits) -> bytes:
    name, (encode, _) = _codec(variant_type)
    data = _guarded(f"cannot encode {name}", encode, value, limits)
    _check_size(len(data), limits.max_value_bytes, f"encoded {name} size in bytes")
    return data


# What this process encoded for sending, so `check_arguments` knows it valid without decoding it again:
# (type, length, hash, limits) of the last few values. Python's bytes hash is SipHash under a per-process
# random key, and a miss only costs a decode. A coordinator's shortcut: runners and workers always decode.
_SENT: OrderedDict[tuple[int, int, int, CodecLimits], None] = OrderedDict()
_SENT_CAPACITY = 256
_SENT_LOCK = threading.Lock()


def _sent_key(variant_type: int, data: bytes, limits: CodecLimits) -> tuple[int, int, int, CodecLimits]:
    return variant_type, len(data), hash(data), limits


def _remember_sent(variant_type: int, data: bytes, limits: CodecLimits) -> None:
    key = _sent_key(variant_type, data, limits)
    with _SENT_LOCK:
        _SENT[key] = None
        _SENT.move_to_end(key)
        while len(_SENT) > _SENT_CAPACITY:
            _SENT.popitem(last=False)


def encode_data(type: int, value: Any, *, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Encode `value` as VariantType `type`; raise CodecError if it does not fit."""
    data = _encode(type, value, limits)
    _remember_sent(type, data, limits)
    return data


def decode_data(type: int, data: bytes | memoryview, *, limits: CodecLimits = DEFAULT_LIMITS) -> Any:
    """Decode wire bytes of VariantType `type`; raise CodecError if they break a rule.

    A memoryview (of bytes) is read in place by the decoders that can (`_READ_IN_PLACE`).
    """
    name, (_, decode) = _codec(type)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _wrong_type("bytes", data)
    if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
        raise _wrong_type("a memoryview of bytes", data)
    _check_size(len(data), limits.max_value_bytes, f"encoded {name} size in bytes")
    if not (isinstance(data, memoryview) and type in _READ_IN_PLACE):
        data = bytes(data)
    return _guarded(f"cannot decode {name}", decode, data, limits)


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
    if _is_frame(value):
        return VariantType.PARQUET, value  # as the reference client does
    for python_type, variant_type in _INFERRED:
        if isinstance(value, python_type):
            return variant_type, value
    raise _invalid(
        f"unsupported type {type(value).__name__} (expected None, bool, int, float, str, "
        "bytes, dict, list, tuple, a numpy array or scalar, a pandas DataFrame or a pyarrow Table)"
    )


def to_variant(value: Any, *, limits: CodecLimits = DEFAULT_LIMITS) -> Variant:
    """Encode a value (typically a model's return value), inferring its VariantType."""
    variant_type, value = _guarded("cannot infer a variant type", _infer, value, limits)
    return Variant(type=variant_type, value=_encode(variant_type, value, limits))


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


def _decode_argument(where: str, variant: Variant, limits: CodecLimits, data: bytes | memoryview | None = None) -> Any:
    """Decode one argument's value: its variant's own bytes, or `data` if given."""
    try:
        return decode_data(variant.type, variant.value if data is None else data, limits=limits)
    except CodecError as exc:
        raise CodecError(exc.code, f"{where}: {exc.message}") from None


def _call_values(
    arguments: Sequence[Argument], kwargs: Sequence[KwArgument], max_arguments: int
) -> list[tuple[str, int | str, Variant]]:
    """A call's values in order, each named for messages and keyed by its position or keyword.

    Positions must be exactly 1..n, keywords unique identifiers.
    """
    if len(arguments) + len(kwargs) > max_arguments:
        raise _bad_arguments(
            f"{len(arguments) + len(kwargs)} arguments exceed the limit of {max_arguments}"
        )
    ordered = sorted(arguments, key=lambda argument: argument.position)
    positions = [argument.position for argument in ordered]
    if positions != list(range(1, len(ordered) + 1)):
        raise _bad_arguments(f"positions must be 1..n without gaps or repeats, got {positions}")
    keywords: set[str] = set()
    for kwarg in kwargs:
        _check_keyword(kwarg.keyword)
        if kwarg.keyword in keywords:
            raise _bad_arguments(f"keyword {kwarg.keyword!r} is repeated")
        keywords.add(kwarg.keyword)
    return [(f"argument {a.position}", a.position, a.data) for a in ordered] + [
        (f"keyword {k.keyword}", k.keyword, k.data) for k in kwargs
    ]


def decode_arguments(
    arguments: Sequence[Argument],
    kwargs: Sequence[KwArgument],
    *,
    limits: CodecLimits = DEFAULT_LIMITS,
    max_arguments: int = 256,
    shared: Mapping[int | str, memoryview] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Decode a call's arguments: positions exactly 1..n, unique identifier keywords.

    `shared`: the bytes of values moved out of the request (a worker's shared payload), by
    position or keyword; such a value's own bytes must be empty, and each must name one.
    """
    unused = dict(shared or {})
    values = []
    for where, key, variant in _call_values(arguments, kwargs, max_arguments):
        data = unused.pop(key, None)
        if data is not None and variant.value:
            raise _bad_arguments(f"{where}: has bytes both in the request and in the shared payload")
        values.append(_decode_argument(where, variant, limits, data))
    if unused:
        raise _bad_arguments(f"the shared payload names values the call does not have: {sorted(map(str, unused))}")
    return values[: len(arguments)], {kwarg.keyword: value for kwarg, value in zip(kwargs, values[len(arguments) :])}


def check_arguments(
    arguments: Sequence[Argument],
    kwargs: Sequence[KwArgument],
    *,
    limits: CodecLimits = DEFAULT_LIMITS,
    max_arguments: int = 256,
) -> None:
    """Refuse what `decode_arguments` would refuse, without decoding again what this process encoded.

    For the coordinator, which checks a call before sending it so that its own mistakes
    raise and blame no model: a value made here by `encode_data` or `encode_arguments`
    under the same limits is valid by construction; any other value is decoded once.
    """
    for where, _key, variant in _call_values(arguments, kwargs, max_arguments):
        if _sent_key(variant.type, variant.value, limits) not in _SENT:
            _decode_argument(where, variant, limits)


def encode_arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any], *, limits: CodecLimits = DEFAULT_LIMITS
) -> tuple[list[Argument], list[KwArgument]]:
    """Encode a call's arguments with inferred types (positions 1..n)."""
    arguments = [
        Argument(position=position, data=_sent_variant(value, limits))
        for position, value in enumerate(args, start=1)
    ]
    keywords = []
    for name, value in kwargs.items():
        _check_keyword(name)
        keywords.append(KwArgument(keyword=name, data=_sent_variant(value, limits)))
    return arguments, keywords


def _sent_variant(value: Any, limits: CodecLimits) -> Variant:
    variant = to_variant(value, limits=limits)
    _remember_sent(variant.type, variant.value, limits)
    return variant

"""The codec: every VariantType round-trips, and every rule refuses with its exact code."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import enum
import io
import json
import math
import pickle
import struct
import subprocess
import sys
import uuid
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.extra import pandas as hpd

from secure_runner.codec import (
    DEFAULT_LIMITS,
    CodecLimits,
    check_arguments,
    decode_arguments,
    decode_data,
    encode_arguments,
    encode_data,
    from_variant,
    to_variant,
)
from conftest import RawCoordinator, write_submission
from secure_runner import codec
from secure_runner.client.concurrent_runner import encode_call
from secure_runner.errors import CodecError, ErrorCode, RequestError
from secure_runner.transport import tls
from secure_runner.v1 import runner_pb2
from secure_runner.v1.values_pb2 import Argument, KwArgument, Variant, VariantType

V = VariantType
INT_BITS = 8 * DEFAULT_LIMITS.max_int_bytes
SMALL = CodecLimits(max_value_bytes=10)
BINARY_TYPES = [V.NONE, V.BOOL, V.INT, V.DOUBLE, V.STRING, V.BYTES]


def roundtrip(variant_type: int, value: Any) -> Any:
    return decode_data(variant_type, encode_data(variant_type, value))


def refused(code: ErrorCode, function: Any, *args: Any, **kwargs: Any) -> CodecError:
    with pytest.raises(CodecError) as info:
        function(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def npy(array: np.ndarray, **save_kwargs: Any) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, **save_kwargs)
    return stream.getvalue()


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    stream = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(stream, header)
    return stream.getvalue()


# --- NONE and BOOL --------------------------------------------------------------------


def test_none_is_empty() -> None:
    assert encode_data(V.NONE, None) == b""
    assert decode_data(V.NONE, b"") is None
    refused(ErrorCode.INVALID_VALUE, decode_data, V.NONE, b"\x00")


@pytest.mark.parametrize("value, data", [(False, b"\x00"), (True, b"\x01")])
def test_bool_is_one_byte(value: bool, data: bytes) -> None:
    assert encode_data(V.BOOL, value) == data
    assert encode_data(V.BOOL, np.bool_(value)) == data
    assert decode_data(V.BOOL, data) is value


@pytest.mark.parametrize("data", [b"", b"\x02", b"\xff", b"\x01\x00", b"\x00\x00"])
def test_bool_decode_refuses_other_bytes(data: bytes) -> None:
    refused(ErrorCode.INVALID_VALUE, decode_data, V.BOOL, data)


# --- INT --------------------------------------------------------------------------------

near_limit_ints = st.integers(min_value=-(2 ** (INT_BITS - 1)), max_value=2 ** (INT_BITS - 1) - 1)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), near_limit_ints, st.integers(-(2**70), 2**70)))
def test_int_roundtrip_is_minimal(value: int) -> None:
    data = encode_data(V.INT, value)
    assert decode_data(V.INT, data) == value
    assert 1 <= len(data) <= DEFAULT_LIMITS.max_int_bytes
    # One more sign byte is the same number, but not canonical.
    padded = data + (b"\x00" if value >= 0 else b"\xff")
    if len(padded) <= DEFAULT_LIMITS.max_int_bytes:
        assert int.from_bytes(padded, "little", signed=True) == value
        refused(ErrorCode.INVALID_VALUE, decode_data, V.INT, padded)


@pytest.mark.parametrize(
    "value, hex_bytes",
    [(0, "00"), (1, "01"), (127, "7f"), (128, "8000"), (255, "ff00"), (256, "0001"),
     (-1, "ff"), (-128, "80"), (-129, "7fff"), (-32768, "0080"), (2**64, "000000000000000001")],
)  # fmt: skip
def test_int_canonical_bytes(value: int, hex_bytes: str) -> None:
    assert encode_data(V.INT, value).hex() == hex_bytes
    assert decode_data(V.INT, bytes.fromhex(hex_bytes)) == value


def test_int_size_limit() -> None:
    for value in (2 ** (INT_BITS - 1) - 1, -(2 ** (INT_BITS - 1))):
        assert len(encode_data(V.INT, value)) == DEFAULT_LIMITS.max_int_bytes
    for value in (2 ** (INT_BITS - 1), -(2 ** (INT_BITS - 1)) - 1):
        refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.INT, value)
    refused(ErrorCode.VALUE_TOO_LARGE, decode_data, V.INT, b"\x01" * 4097)
    limits = CodecLimits(max_int_bytes=2)
    assert encode_data(V.INT, 32767, limits=limits) == b"\xff\x7f"
    refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.INT, 32768, limits=limits)


@pytest.mark.parametrize("hex_bytes", ["", "0000", "ffff", "7f00", "80ff", "000000"])
def test_int_decode_refuses_empty_and_non_canonical(hex_bytes: str) -> None:
    refused(ErrorCode.INVALID_VALUE, decode_data, V.INT, bytes.fromhex(hex_bytes))


# --- DOUBLE -----------------------------------------------------------------------------


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_double_roundtrip_is_bit_exact(value: float) -> None:
    data = encode_data(V.DOUBLE, value)
    assert data == struct.pack("<d", value)
    assert struct.pack("<d", decode_data(V.DOUBLE, data)) == data


@pytest.mark.parametrize(
    "hex_bytes", ["000000000000f87f", "010000000000f07f", "ffffffffffffffff", "0000000000000080"]
)
def test_double_keeps_nan_payloads_and_negative_zero(hex_bytes: str) -> None:
    data = bytes.fromhex(hex_bytes)
    assert encode_data(V.DOUBLE, decode_data(V.DOUBLE, data)) == data


def test_double_known_bytes() -> None:
    assert encode_data(V.DOUBLE, 1.0).hex() == "000000000000f03f"
    assert encode_data(V.DOUBLE, 3) == encode_data(V.DOUBLE, 3.0)
    assert math.copysign(1.0, decode_data(V.DOUBLE, encode_data(V.DOUBLE, -0.0))) == -1.0
    assert decode_data(V.DOUBLE, bytes.fromhex("000000000000f0ff")) == -math.inf


@pytest.mark.parametrize("length", [0, 7, 9])
def test_double_decode_needs_eight_bytes(length: int) -> None:
    refused(ErrorCode.INVALID_VALUE, decode_data, V.DOUBLE, b"\x00" * length)


def test_double_refuses_int_too_large_for_a_float() -> None:
    refused(ErrorCode.INVALID_VALUE, encode_data, V.DOUBLE, 10**400)


# --- STRING and BYTES -------------------------------------------------------------------


@given(st.text())
def test_string_roundtrip(value: str) -> None:
    assert encode_data(V.STRING, value) == value.encode("utf-8")
    assert roundtrip(V.STRING, value) == value


@pytest.mark.parametrize("data", [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"ab\xe2\x82"])
def test_string_decode_refuses_invalid_utf8(data: bytes) -> None:
    refused(ErrorCode.INVALID_VALUE, decode_data, V.STRING, data)


def test_string_encode_refuses_surrogates() -> None:
    refused(ErrorCode.INVALID_VALUE, encode_data, V.STRING, "a\ud800")


@given(st.binary())
def test_bytes_roundtrip(value: bytes) -> None:
    assert encode_data(V.BYTES, value) == value
    assert encode_data(V.BYTES, bytearray(value)) == value
    assert encode_data(V.BYTES, memoryview(value)) == value
    assert roundtrip(V.BYTES, value) == value


# --- JSON -------------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=40,
)


@given(json_values)
def test_json_roundtrip(value: Any) -> None:
    assert roundtrip(V.JSON, value) == value


def test_json_is_compact_utf8_and_tuples_are_lists() -> None:
    value = {"a": (1, 2.5, None, True, "é")}
    assert encode_data(V.JSON, value) == '{"a":[1,2.5,null,true,"é"]}'.encode()
    assert roundtrip(V.JSON, value) == {"a": [1, 2.5, None, True, "é"]}
    assert decode_data(V.JSON, b'"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair is fine


@pytest.mark.parametrize(
    "value",
    [{1, 2}, b"x", object(), {1: "a"}, {None: 1}, {(1,): 1}, math.nan, [math.inf], {"a": -math.inf},
     "a\ud800", {"\udc00": 1}, [1j], pytest.param(10**5000, id="int-of-5001-digits")],
)  # fmt: skip
def test_json_encode_refuses_non_json(value: Any) -> None:
    refused(ErrorCode.INVALID_VALUE, encode_data, V.JSON, value)


@pytest.mark.parametrize(
    "data",
    [b"NaN", b"[Infinity]", b'{"a":-Infinity}', b'{"a":1,"a":2}', b'[{"b":{"a":1,"a":1}}]',
     b'"\xff"', b'"\xed\xa0\x80"', b"\xef\xbb\xbf{}", b"1e999", b"[-1e400]", b'"\\ud800"',
     b'{"\\udc00":1}', b'["\\udc00"]', b'["a\\ud800b"]', b'["\\ud800\\u0041"]', b"[1e999]", b"", b"{", b"[1,]",
     b"'a'", b"1" * 5000],
)  # fmt: skip
def test_json_decode_refuses(data: bytes) -> None:
    refused(ErrorCode.INVALID_VALUE, decode_data, V.JSON, data)


@dataclasses.dataclass
class _Point:
    x: int


class _Colour(enum.Enum):
    RED = 1


@pytest.mark.parametrize(
    "value",
    [[datetime.datetime(2026, 1, 1)], [datetime.date(2026, 1, 1)], [uuid.UUID(int=1)], [_Point(1)], [_Colour.RED],
     {"a": [math.nan]}, [1, [2, [math.inf]]]],
)  # fmt: skip
def test_json_encode_refuses_what_only_orjson_would_take(value: Any) -> None:
    """orjson encodes these (or writes NaN as null): the codec must still refuse them."""
    refused(ErrorCode.INVALID_VALUE, encode_data, V.JSON, value)


class _Name(str):
    pass


@pytest.mark.parametrize(
    "value",
    [[np.float64(1.5), np.float64(-0.0)], {_Name("k"): _Name("v")}, [enum.IntEnum("N", "ONE").ONE], [2**64, -(2**63) - 1],
     [None, 1.0], {"a": None}],
)  # fmt: skip
def test_json_encode_falls_back_to_json_for_what_orjson_reads_differently(value: Any) -> None:
    """Subclasses, big ints and nulls take the `json` path: same bytes as `json` itself writes."""
    assert encode_data(V.JSON, value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _strict_loads(data: bytes) -> Any:
    def constant(name: str) -> Any:
        raise ValueError(name)

    def unique(pairs: list) -> dict:
        if len(dict(pairs)) != len(pairs):
            raise ValueError("duplicate keys")
        return dict(pairs)

    return json.loads(data.decode("utf-8"), parse_constant=constant, object_pairs_hook=unique)


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


def _assert_decodes_like_json(data: bytes) -> None:
    try:
        expected = _strict_loads(data)
    except (ValueError, RecursionError):
        refused_code = (ErrorCode.INVALID_VALUE, ErrorCode.VALUE_TOO_DEEP, ErrorCode.VALUE_TOO_LARGE)
        with pytest.raises(CodecError) as info:  # json refused it: so must we, with a typed error
            decode_data(V.JSON, data)
        assert info.value.code in refused_code, (data, info.value)
        return
    try:
        got = decode_data(V.JSON, data)
    except CodecError:
        return  # refused by a later rule (infinity, lone surrogate, depth), on either parse
    assert _same(got, expected), (data, got, expected)


number_text = st.from_regex(r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?", fullmatch=True)


@settings(max_examples=3000, deadline=None)
@given(st.lists(number_text | st.sampled_from(["true", "false", "null", '"a"', '"\\u00e9"', "[]"]), max_size=8))
def test_fuzz_json_numbers_decode_exactly_as_json_does(items: list[str]) -> None:
    """orjson reads arrays of numbers: every value, type and sign must be what `json` reads."""
    _assert_decodes_like_json(("[" + ",".join(items) + "]").encode())


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet='[]",:0123456789.eE+-tfnulNaIiydc\\ \t\n\x0b\x00é\ud800', max_size=60))
def test_fuzz_json_text_decodes_exactly_as_json_does(text: str) -> None:
    _assert_decodes_like_json(text.encode("utf-8", "surrogatepass"))


json_keys = st.sampled_from(['"a"', '"b"', '"a:"', '":"', '"::"', '"\\u003a"', '"a\\u003A"', '"\\\\u003a"', '""'])
json_members = number_text | st.sampled_from(['"x:y"', '":"', '"\\u003a"', "null", "true", '"a"', "[]", "{}"])
json_documents = st.recursive(
    json_members,
    lambda inner: st.lists(st.tuples(json_keys, inner), max_size=4).map(
        lambda members: "{" + ",".join(f"{key}:{value}" for key, value in members) + "}"
    )
    | st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
    max_leaves=14,
)


@settings(max_examples=1000, deadline=None)
@given(json_documents)
def test_fuzz_json_objects_decode_exactly_as_json_does(text: str) -> None:
    """Objects take orjson too: duplicate keys (orjson keeps the last) must still be refused, colons in
    keys and strings (written or escaped) must not hide or fake one."""
    _assert_decodes_like_json(text.encode())


# Text that other encoders write for ordinary floats: long fractions, long mantissas, exponents.
ORDINARY_FLOAT_TEXT = [
    "0.00012345678901234567", "123456.78901234567", "1.2345678901234567e-05", "-0.0", "5e-324", "1E+300",
    "0.1000000000000000055511151231257827021181583404541015625", "12345678901234567890.5", "9007199254740993.0",
    "2.2250738585072011e-308", "1.7976931348623157e308", "4.9406564584124654e-324", "123456789012345678901234e-5",
]  # fmt: skip


def test_json_reads_ordinary_floats_and_objects_without_the_slow_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Floats with 19 or more digits, and objects, no longer send a whole value to `json` (4x slower)."""
    documents = [
        ("[" + ",".join(ORDINARY_FLOAT_TEXT) + "]").encode(),
        json.dumps({"prices": [0.00012345678901234567] * 3, "at": "12:00:01", "url": "http://x"}).encode(),
        json.dumps([{"t": f"12:{minute}", "p": minute / 7} for minute in range(60)]).encode(),
    ]
    expected = [_strict_loads(data) for data in documents]

    def slow_parser(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the slow parser was used")

    monkeypatch.setattr(codec.json, "loads", slow_parser)
    for data, value in zip(documents, expected):
        assert _same(decode_data(V.JSON, data), value), data


@pytest.mark.parametrize(
    "text", ["[18446744073709551616]", "-9223372036854775809", '{"n":123456789012345678901234567890}', "[1e1234567890123456789]"]
)
def test_json_big_integers_stay_exact(text: str) -> None:
    _assert_decodes_like_json(text.encode())
    if "e" not in text:
        assert json.dumps(decode_data(V.JSON, text.encode()), separators=(",", ":")) == text


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def test_json_depth_limit() -> None:
    assert roundtrip(V.JSON, nested(64)) == nested(64)
    refused(ErrorCode.VALUE_TOO_DEEP, encode_data, V.JSON, nested(65))
    three = CodecLimits(max_depth=3)
    assert encode_data(V.JSON, [(1, [2])], limits=three) == b"[[1,[2]]]"
    refused(ErrorCode.VALUE_TOO_DEEP, encode_data, V.JSON, [(1, [[2]])], limits=three)
    assert decode_data(V.JSON, b"[" * 64 + b"]" * 64) is not None
    refused(ErrorCode.VALUE_TOO_DEEP, decode_data, V.JSON, b"[" * 65 + b"]" * 65)
    refused(ErrorCode.VALUE_TOO_DEEP, decode_data, V.JSON, b'{"a":' * 65 + b"1" + b"}" * 65)
    # Deep enough for json's own recursion to fail first.
    refused(ErrorCode.VALUE_TOO_DEEP, decode_data, V.JSON, b"[" * 200_000 + b"]" * 200_000)
    assert decode_data(V.JSON, b"5", limits=CodecLimits(max_depth=0)) == 5
    refused(ErrorCode.VALUE_TOO_DEEP, decode_data, V.JSON, b"[]", limits=CodecLimits(max_depth=0))


def test_json_cycles_are_too_deep() -> None:
    loop: list[Any] = []
    loop.append(loop)
    refused(ErrorCode.VALUE_TOO_DEEP, encode_data, V.JSON, loop)
    table: dict[str, Any] = {}
    table["self"] = [table]
    refused(ErrorCode.VALUE_TOO_DEEP, encode_data, V.JSON, table)


def test_json_shared_subtrees_cannot_explode() -> None:
    value: Any = "x"
    for _ in range(60):  # 2**60 leaves once written out
        value = [value, value]
    limits = CodecLimits(max_value_bytes=100_000)
    refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.JSON, value, limits=limits)


def test_json_size_limit() -> None:
    assert encode_data(V.JSON, [1, 2, 3, 4], limits=SMALL) == b"[1,2,3,4]"
    refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.JSON, [1, 2, 3, 4, 5], limits=SMALL)
    refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.JSON, list(range(20)), limits=SMALL)


# --- NDARRAY ----------------------------------------------------------------------------

array_dtypes = st.sampled_from(
    ["?", "i1", "u2", ">i4", "<i8", "f2", "<f4", ">f8", "c16", "U3", "S4", "M8[ns]", "m8[s]"]
)
arrays = array_dtypes.flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0))
)


def assert_same_array(decoded: Any, array: np.ndarray) -> None:
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()  # bit exact, NaN included


@settings(max_examples=150)
@given(arrays)
def test_ndarray_roundtrip(array: np.ndarray) -> None:
    decoded = roundtrip(V.NDARRAY, array)
    assert_same_array(decoded, array)
    assert decoded.flags.writeable


@pytest.mark.parametrize(
    "array",
    [np.array(3.5), np.zeros((0, 3)), np.asfortranarray(np.arange(6).reshape(2, 3)),
     np.arange(10)[::3], np.zeros(2, dtype=[("x", "<f4"), ("y", "S2")])],
)  # fmt: skip
def test_ndarray_roundtrip_special_layouts(array: np.ndarray) -> None:
    assert_same_array(roundtrip(V.NDARRAY, array), array)


@pytest.mark.parametrize(
    "array",
    [np.array([1, "a"], dtype=object), np.zeros(2, dtype=[("x", "O")]),
     np.array(["a"], dtype=np.dtypes.StringDType())],
)  # fmt: skip
def test_ndarray_encode_refuses_objects(array: np.ndarray) -> None:
    refused(ErrorCode.INVALID_VALUE, encode_data, V.NDARRAY, array)


UNPICKLED: list[str] = []


def _record_unpickle(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Payload:
    def __reduce__(self) -> Any:
        return (_record_unpickle, ("unpickled",))


def test_ndarray_decode_never_unpickles() -> None:
    data = npy(np.array([_Payload()], dtype=object), allow_pickle=True)
    np.load(io.BytesIO(data), allow_pickle=True)  # the payload does run when unpickled...
    assert UNPICKLED == ["unpickled"]
    UNPICKLED.clear()
    error = refused(ErrorCode.INVALID_VALUE, decode_data, V.NDARRAY, data)  # ...but not here
    assert "object" in error.message
    assert UNPICKLED == []
    refused(ErrorCode.INVALID_VALUE, decode_data, V.NDARRAY, pickle.dumps(np.arange(3)))
    assert UNPICKLED == []


def test_ndarray_decode_refuses_malformed_payloads() -> None:
    data = npy(np.arange(4, dtype="<i4"))
    assert_same_array(decode_data(V.NDARRAY, data), np.arange(4, dtype="<i4"))
    zipped = io.BytesIO()
    np.savez(zipped, a=np.arange(4))
    with pytest.warns(UserWarning, match="format 3.0"):
        version_3 = npy(np.zeros(1, dtype=[("\u4e00", "f8")]))  # non-Latin-1 field name
    for bad in [data + b"\x00", data[:-1], data[:20], b"", b"\x93NUMPY", zipped.getvalue(),
                npy_header("<f8", (10**12,)) + b"\x00" * 8,  # header claims 8 TB
                npy_header("<f8", (-2, -3)) + b"\x00" * 48, version_3]:  # fmt: skip
        refused(ErrorCode.INVALID_VALUE, decode_data, V.NDARRAY, bad)


def test_ndarray_size_limits() -> None:
    limits = CodecLimits(max_value_bytes=1000)
    refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.NDARRAY, np.zeros(126), limits=limits)
    refused(ErrorCode.VALUE_TOO_LARGE, decode_data, V.NDARRAY, npy(np.zeros(126)), limits=limits)
    # Items of zero bytes: the header alone would describe 10**12 of them.
    refused(ErrorCode.VALUE_TOO_LARGE, decode_data, V.NDARRAY, npy_header("|V0", (10**12,)))


def test_ndarray_without_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    data = npy(np.arange(3))
    array = np.arange(3)
    monkeypatch.setitem(sys.modules, "numpy", None)  # makes `import numpy` fail
    for function, arg in [(encode_data, array), (decode_data, data)]:
        error = refused(ErrorCode.UNSUPPORTED_TYPE, function, V.NDARRAY, arg)
        assert "numpy" in error.message


def test_codec_does_not_import_numpy_pyarrow_or_pandas() -> None:
    script = (
        "import sys\n"
        "from secure_runner.codec import to_variant, from_variant\n"
        "for value in (None, 1, 2.5, 'x', b'y', {'a': [1, (2,)]}):\n"
        "    from_variant(to_variant(value))\n"
        "assert not {'numpy', 'pyarrow', 'pandas'} & set(sys.modules), sys.modules.keys()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


# --- Types, sizes, reserved types -------------------------------------------------------


@pytest.mark.parametrize(
    "variant_type, value, expected",
    [(V.NONE, 0, "None"), (V.BOOL, 1, "bool"), (V.BOOL, None, "bool"), (V.INT, True, "int"),
     (V.INT, 1.0, "int"), (V.INT, "1", "int"), (V.INT, np.int64(1), "int"),
     (V.DOUBLE, False, "float"), (V.DOUBLE, "1.0", "float"), (V.STRING, b"x", "str"),
     (V.BYTES, "x", "bytes"), (V.BYTES, [1], "bytes"), (V.NDARRAY, [1, 2], "numpy.ndarray")],
)  # fmt: skip
def test_encode_refuses_wrong_python_type(variant_type: int, value: Any, expected: str) -> None:
    error = refused(ErrorCode.INVALID_VALUE, encode_data, variant_type, value)
    assert f"expected {expected}" in error.message
    assert type(value).__name__ in error.message


@pytest.mark.parametrize("variant_type", [10, -1, 2**40, True, 6.0, "JSON", None, [6]])
def test_unknown_types_are_unsupported(variant_type: Any) -> None:
    refused(ErrorCode.UNSUPPORTED_TYPE, encode_data, variant_type, None)
    refused(ErrorCode.UNSUPPORTED_TYPE, decode_data, variant_type, b"")


@pytest.mark.parametrize("variant_type", [*BINARY_TYPES, V.JSON, V.NDARRAY, V.PARQUET, V.ARROW])
def test_decode_checks_size_before_content(variant_type: int) -> None:
    refused(ErrorCode.VALUE_TOO_LARGE, decode_data, variant_type, b"\xff" * 11, limits=SMALL)


def test_value_cap_follows_the_message_cap() -> None:
    assert codec.MESSAGE_CAP_BYTES == tls.MAX_MESSAGE_BYTES
    assert DEFAULT_LIMITS.max_value_bytes == tls.MAX_MESSAGE_BYTES - codec.REQUEST_ROOM_BYTES
    big = b"\x00" * (24 * 1024 * 1024)  # over the old 16 MiB cap; the reference carries 24 MiB values
    assert roundtrip(V.BYTES, big) == big
    too_big = memoryview(bytearray(DEFAULT_LIMITS.max_value_bytes + 1))
    error = refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.BYTES, too_big)
    assert str(DEFAULT_LIMITS.max_value_bytes) in error.message
    refused(ErrorCode.VALUE_TOO_LARGE, decode_data, V.BYTES, bytes(too_big))


def test_encode_size_limit() -> None:
    assert encode_data(V.BYTES, b"x" * 10, limits=SMALL) == b"x" * 10
    refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.BYTES, b"x" * 11, limits=SMALL)
    refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.STRING, "x" * 11, limits=SMALL)
    refused(ErrorCode.VALUE_TOO_LARGE, encode_data, V.STRING, "é" * 6, limits=SMALL)  # 12 bytes


def test_decode_needs_bytes() -> None:
    refused(ErrorCode.INVALID_VALUE, decode_data, V.STRING, "text")
    assert decode_data(V.BYTES, bytearray(b"ab")) == b"ab"


class _Exploding(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise RuntimeError("boom")


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("cannot even describe myself")


class _StrangeScalar(np.float64):
    def item(self) -> Any:
        raise RuntimeError("no item")


@pytest.mark.parametrize(
    "exception, code",
    [(RuntimeError, ErrorCode.INVALID_VALUE), (_Unprintable, ErrorCode.INVALID_VALUE),
     (RecursionError, ErrorCode.VALUE_TOO_DEEP), (MemoryError, ErrorCode.VALUE_TOO_LARGE)],
)  # fmt: skip
def test_only_codec_errors_escape_strange_values(exception: type, code: ErrorCode) -> None:
    class Strange(int):
        def bit_length(self) -> int:
            raise exception("from the value itself")

    refused(code, encode_data, V.INT, Strange(5))
    refused(code, to_variant, Strange(5))
    refused(ErrorCode.INVALID_VALUE, encode_data, V.JSON, _Exploding(a=1))
    refused(ErrorCode.INVALID_VALUE, to_variant, _StrangeScalar(1.0))


# --- Inference --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, variant_type, decoded",
    [(None, V.NONE, None), (True, V.BOOL, True), (0, V.INT, 0), (2.5, V.DOUBLE, 2.5),
     ("s", V.STRING, "s"), (b"b", V.BYTES, b"b"), (bytearray(b"b"), V.BYTES, b"b"),
     ({"a": [1]}, V.JSON, {"a": [1]}), ([1, 2], V.JSON, [1, 2]), ((1, 2), V.JSON, [1, 2]),
     (np.int64(7), V.INT, 7), (np.float32(1.5), V.DOUBLE, 1.5), (np.bool_(False), V.BOOL, False),
     (np.str_("x"), V.STRING, "x")],
)  # fmt: skip
def test_to_variant_infers_type(value: Any, variant_type: int, decoded: Any) -> None:
    variant = to_variant(value)
    assert variant.type == variant_type
    result = from_variant(variant)
    assert result == decoded and type(result) is type(decoded)


def test_to_variant_ndarray() -> None:
    variant = to_variant(np.arange(3))
    assert variant.type == V.NDARRAY
    assert_same_array(from_variant(variant), np.arange(3))


@pytest.mark.parametrize(
    "value", [{1}, frozenset(), object(), 1j, np.datetime64("2020-01-01"), print, range(3)]
)
def test_to_variant_refuses_unknown_types(value: Any) -> None:
    refused(ErrorCode.INVALID_VALUE, to_variant, value)


def test_to_variant_applies_limits() -> None:
    refused(ErrorCode.VALUE_TOO_LARGE, to_variant, "x" * 11, limits=SMALL)


# --- Arguments --------------------------------------------------------------------------


def none_argument(position: int) -> Argument:
    return Argument(position=position, data=Variant(type=V.NONE))


def none_kwarg(keyword: str) -> KwArgument:
    return KwArgument(keyword=keyword, data=Variant(type=V.NONE))


def test_arguments_roundtrip() -> None:
    args, kwargs = [1, "a", {"k": [1.5]}, None], {"x": 2.5, "y": b"z"}
    arguments, keywords = encode_arguments(args, kwargs)
    assert [argument.position for argument in arguments] == [1, 2, 3, 4]
    assert [keyword.keyword for keyword in keywords] == ["x", "y"]
    assert decode_arguments(arguments, keywords) == (args, kwargs)
    assert decode_arguments(arguments[::-1], keywords) == (args, kwargs)  # order by position
    assert decode_arguments([], []) == ([], {})


# The coordinator checks a call with check_arguments, the worker decodes it: both refuse the same.
ARGUMENT_READERS = [decode_arguments, check_arguments]


@pytest.mark.parametrize("read", ARGUMENT_READERS)
@pytest.mark.parametrize("positions", [[0], [2], [1, 3], [1, 1], [2, 1, 2], [1, 2, 4]])
def test_arguments_refuse_bad_positions(read: Any, positions: list[int]) -> None:
    arguments = [none_argument(position) for position in positions]
    refused(ErrorCode.INVALID_ARGUMENTS, read, arguments, [])


@pytest.mark.parametrize("read", ARGUMENT_READERS)
@pytest.mark.parametrize("keyword", ["", "1a", "a-b", "a b", "_x", "__class__", "class", "None"])
def test_arguments_refuse_bad_keywords(read: Any, keyword: str) -> None:
    refused(ErrorCode.INVALID_ARGUMENTS, read, [], [none_kwarg(keyword)])
    refused(ErrorCode.INVALID_ARGUMENTS, encode_arguments, [], {keyword: None})


@pytest.mark.parametrize("read", ARGUMENT_READERS)
def test_arguments_refuse_repeated_keywords_and_non_str_keys(read: Any) -> None:
    refused(ErrorCode.INVALID_ARGUMENTS, read, [], [none_kwarg("x"), none_kwarg("x")])
    refused(ErrorCode.INVALID_ARGUMENTS, encode_arguments, [], {1: None})


@pytest.mark.parametrize("read", ARGUMENT_READERS)
def test_arguments_limit_the_count(read: Any) -> None:
    arguments = [none_argument(position) for position in range(1, 200)]
    keywords = [none_kwarg(f"k{index}") for index in range(57)]
    read(arguments, keywords)  # 256 in all
    assert len(decode_arguments(arguments, keywords)[1]) == 57
    refused(ErrorCode.INVALID_ARGUMENTS, read, arguments, [*keywords, none_kwarg("z")])
    refused(ErrorCode.INVALID_ARGUMENTS, read, arguments[:3], [], max_arguments=2)


@pytest.mark.parametrize("read", ARGUMENT_READERS)
def test_arguments_keep_value_error_codes(read: Any) -> None:
    bad_int = Variant(type=V.INT, value=b"")
    arguments = [none_argument(1), Argument(position=2, data=bad_int)]
    error = refused(ErrorCode.INVALID_VALUE, read, arguments, [])
    assert "argument 2" in error.message
    keywords = [KwArgument(keyword="x", data=bad_int)]
    error = refused(ErrorCode.INVALID_VALUE, read, [], keywords)
    assert "keyword x" in error.message
    unknown = Argument(position=1, data=Variant(type=10))
    refused(ErrorCode.UNSUPPORTED_TYPE, read, [unknown], [])
    duplicate_keys = Argument(position=1, data=Variant(type=V.JSON, value=b'{"a":1,"a":2}'))
    refused(ErrorCode.INVALID_VALUE, read, [duplicate_keys], [])
    refused(ErrorCode.INVALID_VALUE, encode_arguments, [{1, 2}], {})


def test_check_arguments_decodes_only_what_this_process_did_not_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator's check skips values encode_data and encode_arguments made, and decodes any other once."""
    decoded: list[bytes] = []
    encode_json, decode_json = codec._CODECS[V.JSON]

    def counting_decode(data: bytes, limits: CodecLimits) -> Any:
        decoded.append(data)
        return decode_json(data, limits)

    monkeypatch.setitem(codec._CODECS, V.JSON, (encode_json, counting_decode))
    prices = [101.25, 99.5, {"at": "12:00"}]
    made_here = Argument(position=1, data=Variant(type=V.JSON, value=encode_data(V.JSON, prices)))
    (from_encode_arguments,), _ = encode_arguments([prices * 2], {})
    check_arguments([made_here], [KwArgument(keyword="k", data=from_encode_arguments.data)])
    assert decoded == []
    elsewhere = json.dumps(prices).encode()  # the same value, written by another encoder
    check_arguments([Argument(position=1, data=Variant(type=V.JSON, value=elsewhere))], [])
    assert decoded == [elsewhere]
    looser = encode_data(V.JSON, [1, 2, 3], limits=CodecLimits(max_depth=3))  # other limits: decoded again
    check_arguments([Argument(position=1, data=Variant(type=V.JSON, value=looser))], [])
    assert decoded == [elsewhere, looser]


@pytest.mark.parametrize(
    "bad", [Variant(type=V.JSON, value=b'{"a":1,"a":2}'), Variant(type=V.PARQUET, value=b"PAR1"), Variant(type=V.INT)]
)
def test_the_coordinator_refuses_its_own_bad_values_before_sending(bad: Variant) -> None:
    good = Argument(position=1, data=Variant(type=V.JSON, value=encode_data(V.JSON, [1.5])))
    assert encode_call("echo", [good], None)
    with pytest.raises(RequestError) as info:
        encode_call("echo", [good, Argument(position=2, data=bad)], None)
    assert info.value.code == ErrorCode.INVALID_VALUE


# --- Fuzz: decoding random bytes returns or raises CodecError, nothing else ---------------

ALL_TYPES = [*VariantType.values(), 10]
PREFIXES = [b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", npy(np.arange(3))[:20], b"[", b'{"']


def decode_or_codec_error(variant_type: int, data: bytes) -> None:
    try:
        value = decode_data(variant_type, data)
    except CodecError as error:
        assert error.code in ErrorCode
        return
    # Whatever decodes must encode again; binary encodings are canonical.
    encoded = encode_data(variant_type, value)
    if variant_type in BINARY_TYPES:
        assert encoded == data


@settings(max_examples=2500, deadline=None)
@given(st.sampled_from(ALL_TYPES), st.sampled_from(PREFIXES), st.binary(max_size=120))
def test_fuzz_decode_random_bytes(variant_type: int, prefix: bytes, data: bytes) -> None:
    decode_or_codec_error(variant_type, prefix + data)


@settings(max_examples=500, deadline=None)
@given(arrays, st.data())
def test_fuzz_decode_mutated_npy(array: np.ndarray, data: st.DataObject) -> None:
    payload = bytearray(npy(array))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(payload) - 1))
        payload[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload) + 4))
    decode_or_codec_error(V.NDARRAY, bytes(payload[:cut]) + b"\x00" * (cut - len(payload)))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='[]{}",:0123456789.eE+-tfnulNaIiy\\ \x00é\ud800', max_size=60))
def test_fuzz_decode_json_like_text(text: str) -> None:
    decode_or_codec_error(V.JSON, text.encode("utf-8", "surrogatepass"))


# --- PARQUET and ARROW ------------------------------------------------------------------

FRAME_TYPES = [V.PARQUET, V.ARROW]
EXTENSION_CALLS: list[bytes] = []


class _RecordingExtension(pa.ExtensionType):
    """A registered extension type whose deserializer records every call (as a malicious one would run)."""

    def __init__(self) -> None:
        super().__init__(pa.int64(), "sr_test.recording")

    def __arrow_ext_serialize__(self) -> bytes:
        return b"payload"

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: Any, serialized: bytes) -> Any:
        EXTENSION_CALLS.append(serialized)
        return cls()


pa.register_extension_type(_RecordingExtension())


def reference_parquet(table: Any) -> bytes:
    """What the reference client sends for a data frame: pyarrow's Parquet writer with its defaults."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def arrow_stream(table: Any, **options: Any) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(**options)) as writer:
        writer.write_table(table)
    return sink.getvalue()


def reference_decode(variant_type: int, data: bytes) -> pd.DataFrame:
    """pyarrow's own reading, as the reference client does it for PARQUET (and for ARROW by analogy)."""
    if variant_type == V.PARQUET:
        return pq.read_table(io.BytesIO(data)).to_pandas()
    return pa.ipc.open_stream(data).read_all().to_pandas()


def frame_bytes(variant_type: int, table: Any) -> bytes:
    return reference_parquet(table) if variant_type == V.PARQUET else arrow_stream(table)


plain_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
frames = hpd.data_frames(
    [hpd.column("i", dtype=np.int64), hpd.column("f", dtype=np.float64), hpd.column("b", dtype=bool),
     hpd.column("s", elements=plain_text, dtype=object), hpd.column("u", dtype=np.uint8),
     hpd.column("t", elements=st.datetimes(min_value=datetime.datetime(1970, 1, 1)), dtype="datetime64[ns]")],
    index=hpd.range_indexes(max_size=12),
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(frames, st.sampled_from(FRAME_TYPES))
def test_frames_roundtrip_like_pyarrow(frame: pd.DataFrame, variant_type: int) -> None:
    assert_roundtrips_like_pyarrow(variant_type, frame)


def assert_roundtrips_like_pyarrow(variant_type: int, frame: pd.DataFrame) -> None:
    """Differential: our bytes decode to the frame, and to what pyarrow's own reader makes of them."""
    data = encode_data(variant_type, frame)
    decoded = decode_data(variant_type, data)
    pd.testing.assert_frame_equal(decoded, reference_decode(variant_type, data))
    pd.testing.assert_frame_equal(decoded, pa.Table.from_pandas(frame).to_pandas())


@pytest.mark.parametrize("variant_type", FRAME_TYPES)
@pytest.mark.parametrize(
    "frame",
    [pd.DataFrame({"x": [1.5, None, -0.0]}, index=pd.Index(["a", "b", "c"], name="key")),
     pd.DataFrame({"n": pd.array([1, None], dtype="Int64"), "c": pd.Categorical(["lo", "hi"]),
                   "z": pd.date_range("2026-01-01", periods=2, tz="Europe/Paris")}),
     pd.DataFrame({"x": range(5)}, index=pd.RangeIndex(10, 20, 2)), pd.DataFrame(),
     pd.DataFrame({"d": [datetime.date(2026, 1, 2)], "m": [decimal.Decimal("1.25")], "b": [b"\x00"]}),
     pd.DataFrame({"v": [[1.0, 2.0], []], "r": [{"k": 1}, {"k": 2}]})],
    ids=["named-index", "nullable-categorical-tz", "range-index", "empty", "objects", "nested"],
)  # fmt: skip
def test_frames_roundtrip_special_frames(frame: pd.DataFrame, variant_type: int) -> None:
    assert_roundtrips_like_pyarrow(variant_type, frame)


@pytest.mark.parametrize("variant_type", FRAME_TYPES)
def test_frames_decode_what_the_reference_and_pandas_write(variant_type: int) -> None:
    frame = pd.DataFrame({"price": [101.2, 101.9], "asset": ["BTC", "ETH"]})
    table = pa.Table.from_pandas(frame)
    pd.testing.assert_frame_equal(decode_data(variant_type, frame_bytes(variant_type, table)), frame)
    if variant_type == V.PARQUET:
        pd.testing.assert_frame_equal(decode_data(V.PARQUET, frame.to_parquet()), frame)
    table = pa.table({"a": [[1, 2], None], "s": [{"x": 1.5}, {"x": None}]})  # a pyarrow Table: no pandas metadata
    pd.testing.assert_frame_equal(decode_data(variant_type, encode_data(variant_type, table)), table.to_pandas())


def test_to_variant_infers_parquet_for_frames() -> None:
    frame = pd.DataFrame({"x": [1, 2]})
    for value in (frame, pa.Table.from_pandas(frame)):
        variant = to_variant(value)
        assert variant.type == V.PARQUET
        pd.testing.assert_frame_equal(from_variant(variant), frame)


@pytest.mark.parametrize("variant_type", FRAME_TYPES)
def test_frames_refuse_extension_types_before_pyarrow_reads_them(variant_type: int) -> None:
    table = pa.table({"a": pa.ExtensionArray.from_storage(_RecordingExtension(), pa.array([1, 2]))})
    data = frame_bytes(variant_type, table)
    EXTENSION_CALLS.clear()
    reference_decode(variant_type, data)  # pyarrow's own reader runs the registered deserializer...
    assert EXTENSION_CALLS
    EXTENSION_CALLS.clear()
    assert "extension" in refused(ErrorCode.INVALID_VALUE, decode_data, variant_type, data).message
    assert EXTENSION_CALLS == []  # ...ours refuses the bytes before pyarrow reads the schema
    refused(ErrorCode.INVALID_VALUE, encode_data, variant_type, table)
    period = pd.DataFrame({"p": pd.period_range("2026-01", periods=2, freq="M")})  # pandas' own extension type
    refused(ErrorCode.INVALID_VALUE, encode_data, variant_type, period)


@pytest.mark.parametrize("name_length", range(6))
def test_parquet_extension_key_is_found_at_every_base64_alignment(name_length: int) -> None:
    """Parquet keeps the Arrow schema base64-encoded: the field name shifts where the key lands."""
    storage = pa.array([1], pa.int64())
    table = pa.table({"n" * (name_length + 1): pa.ExtensionArray.from_storage(_RecordingExtension(), storage)})
    data = reference_parquet(table)
    assert b"ARROW:extension:name" not in data
    EXTENSION_CALLS.clear()
    refused(ErrorCode.INVALID_VALUE, decode_data, V.PARQUET, data)
    assert EXTENSION_CALLS == []


DTYPE_LOOKUPS: list[str] = []


@pd.api.extensions.register_extension_dtype
class _RecordingDtype(pd.api.extensions.ExtensionDtype):
    """A registered pandas dtype: pandas_dtype("sr_recording") builds it, running its code."""

    name = "sr_recording"
    type = object

    @classmethod
    def construct_from_string(cls, string: str) -> Any:
        if string != cls.name:
            raise TypeError(string)
        DTYPE_LOOKUPS.append(string)
        return cls()

    @classmethod
    def construct_array_type(cls) -> Any:
        return pd.arrays.NumpyExtensionArray


def with_pandas_metadata(variant_type: int, change: Any) -> bytes:
    """Bytes of a small frame whose pandas metadata went through `change` (a dict -> dict function)."""
    table = pa.Table.from_pandas(pd.DataFrame({"x": [1.0, 2.0]}, index=pd.Index([3, 4], name="k")))
    metadata = change(json.loads(table.schema.metadata[b"pandas"]))
    raw = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
    return frame_bytes(variant_type, table.replace_schema_metadata({b"pandas": raw}))


def _set_column(key: str, value: Any) -> Any:
    def change(metadata: dict) -> dict:
        metadata["columns"][0][key] = value
        return metadata

    return change


@pytest.mark.parametrize("variant_type", FRAME_TYPES)
def test_frames_refuse_pandas_metadata_that_reaches_registered_dtypes(variant_type: int) -> None:
    data = with_pandas_metadata(variant_type, _set_column("numpy_type", "sr_recording"))
    DTYPE_LOOKUPS.clear()
    with contextlib.suppress(Exception):
        reference_decode(variant_type, data)  # pyarrow's to_pandas asks pandas for the dtype by name...
    assert DTYPE_LOOKUPS == ["sr_recording"]
    DTYPE_LOOKUPS.clear()
    assert "pandas metadata" in refused(ErrorCode.INVALID_VALUE, decode_data, variant_type, data).message
    assert DTYPE_LOOKUPS == []  # ...ours never does


@pytest.mark.parametrize(
    "change",
    [_set_column("pandas_type", "sr_recording"), _set_column("metadata", {"timezone": "dateutil//etc/passwd"}),
     _set_column("metadata", {"pickle": "gASV"}), _set_column("name", ["a", "b"]),
     lambda m: {**m, "column_indexes": m["column_indexes"] * 2}, lambda m: {**m, "extra": 1},
     lambda m: {**m, "index_columns": [{"kind": "range", "name": None, "start": 0, "stop": 2, "step": 0}]},
     lambda m: {**m, "index_columns": [{"kind": "eval", "name": None}]}, lambda m: [m],
     lambda m: b'{"columns": [], "columns": []}', lambda m: b"\x80\x04pickle"],
    ids=["pandas-type", "timezone-path", "metadata-key", "container-name", "column-multiindex", "unknown-key",
         "zero-step", "index-kind", "not-an-object", "duplicate-keys", "not-json"],
)  # fmt: skip
def test_frames_refuse_unexpected_pandas_metadata(change: Any) -> None:
    for variant_type in FRAME_TYPES:
        refused(ErrorCode.INVALID_VALUE, decode_data, variant_type, with_pandas_metadata(variant_type, change))


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_arrow_refuses_compressed_bodies(compression: str) -> None:
    table = pa.table({"x": [0] * 1000, "d": pa.array(["a", "b"] * 500).dictionary_encode()})
    assert_frame = decode_data(V.ARROW, arrow_stream(table))
    pd.testing.assert_frame_equal(assert_frame, table.to_pandas())
    error = refused(ErrorCode.INVALID_VALUE, decode_data, V.ARROW, arrow_stream(table, compression=compression))
    assert "compressed" in error.message


@pytest.mark.parametrize("variant_type", FRAME_TYPES)
def test_frames_limits(variant_type: int) -> None:
    table = pa.table({"a": range(100), "b": [0.5] * 100})
    data = frame_bytes(variant_type, table)
    assert len(decode_data(variant_type, data, limits=CodecLimits(max_rows=100, max_columns=2))) == 100
    for limits in (CodecLimits(max_rows=99), CodecLimits(max_columns=1), CodecLimits(max_decoded_bytes=1000)):
        refused(ErrorCode.VALUE_TOO_LARGE, decode_data, variant_type, data, limits=limits)
        refused(ErrorCode.VALUE_TOO_LARGE, encode_data, variant_type, table, limits=limits)
    refused(ErrorCode.VALUE_TOO_LARGE, decode_data, variant_type, data, limits=CodecLimits(max_value_bytes=len(data) - 1))
    nested = pa.table({"n": pa.array([[[[1]]]])})  # list<list<list<int>>>: depth 4
    nested_data = frame_bytes(variant_type, nested)
    assert len(decode_data(variant_type, nested_data, limits=CodecLimits(max_depth=4))) == 1
    refused(ErrorCode.VALUE_TOO_DEEP, decode_data, variant_type, nested_data, limits=CodecLimits(max_depth=3))
    refused(ErrorCode.VALUE_TOO_DEEP, encode_data, variant_type, nested, limits=CodecLimits(max_depth=3))


def test_parquet_decompression_is_bounded() -> None:
    """A few kilobytes of Parquet that would decompress to 80 MB."""
    table = pa.table({"zeros": np.zeros(10_000_000)})
    data = reference_parquet(table)
    assert len(data) < 200_000
    refused(ErrorCode.VALUE_TOO_LARGE, decode_data, V.PARQUET, data, limits=CodecLimits(max_decoded_bytes=10_000_000))


@pytest.mark.parametrize(
    "column",
    [pa.ListArray.from_arrays([0, 1, 2], pa.array(["a", "b"]).dictionary_encode()),
     pa.array(["a", "b"], pa.string_view()), pa.array([[1], [2]], pa.list_view(pa.int64())),
     pa.RunEndEncodedArray.from_arrays([2], [7]),
     pa.UnionArray.from_sparse(pa.array([0, 0], pa.int8()), [pa.array([1, 2])])],
    ids=["nested-dictionary", "string-view", "list-view", "run-end-encoded", "union"],
)  # fmt: skip
def test_arrow_refuses_types_whose_values_can_repeat(column: Any) -> None:
    table = pa.table({"c": column})
    refused(ErrorCode.INVALID_VALUE, decode_data, V.ARROW, arrow_stream(table))
    refused(ErrorCode.INVALID_VALUE, encode_data, V.ARROW, table)


@pytest.mark.parametrize(
    "data", [b"", b"PAR1", b"PAR1" + b"\x00" * 8 + b"PAR1", b"PAR1\x00\x00\x00\x00\x08\x00\x00\x00PARE", b"not parquet"]
)
def test_parquet_refuses_what_is_not_plain_parquet(data: bytes) -> None:
    refused(ErrorCode.INVALID_VALUE, decode_data, V.PARQUET, data)


@pytest.mark.parametrize("variant_type", FRAME_TYPES)
@pytest.mark.parametrize("value", [[1, 2], {"a": [1]}, np.zeros(3), pd.Series([1.0])])
def test_frames_encode_refuses_non_frames(variant_type: int, value: Any) -> None:
    assert "pandas.DataFrame or pyarrow.Table" in refused(ErrorCode.INVALID_VALUE, encode_data, variant_type, value).message


def test_frames_without_pyarrow(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = pd.DataFrame({"x": [1]})
    data = encode_data(V.PARQUET, frame)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    for variant_type in FRAME_TYPES:
        for function, arg in [(encode_data, frame), (decode_data, data)]:
            assert "frames" in refused(ErrorCode.UNSUPPORTED_TYPE, function, variant_type, arg).message


def _mutated(data: bytes, draw: st.DataObject) -> bytes:
    payload = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 6))):
        index = draw.draw(st.integers(0, len(payload) - 1))
        payload[index] = draw.draw(st.integers(0, 255))
    cut = draw.draw(st.integers(0, len(payload)))
    return bytes(payload[:cut]) if draw.draw(st.booleans()) else bytes(payload)


FUZZ_TABLE = pa.Table.from_pandas(
    pd.DataFrame({"i": [1, 2, 3], "s": ["a", None, "c"], "c": pd.Categorical(["x", "y", "x"]),
                  "l": [[1.5], [], None]}, index=pd.Index([7, 8, 9], name="k"))
)  # fmt: skip
FUZZ_SEEDS = {V.PARQUET: reference_parquet(FUZZ_TABLE), V.ARROW: arrow_stream(FUZZ_TABLE)}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FRAME_TYPES), st.data())
def test_fuzz_decode_mutated_frames(variant_type: int, data: st.DataObject) -> None:
    """Mutated Parquet and Arrow bytes decode to a frame or raise CodecError: never crash, never anything else."""
    decode_or_codec_error(variant_type, _mutated(FUZZ_SEEDS[variant_type], data))


async def test_a_sandboxed_model_reads_and_returns_data_frames(layout, fresh_runner, tmp_path) -> None:
    """End to end: a real runner's sandboxed worker decodes a PARQUET argument and its frame output comes back."""
    summary = "def echo(self, frame):\n        return frame.groupby('asset').price.agg(['mean', 'count'])"
    runner = fresh_runner("counter", write_submission(tmp_path, "frames", {"echo": summary}))
    client = RawCoordinator(layout, runner.address, "counter")
    try:
        assert (await client.setup()).status == runner_pb2.CALL_STATUS_SUCCESS
        frame = pd.DataFrame({"asset": ["BTC", "ETH", "BTC"], "price": [100.0, 10.0, 102.0]})
        response = await client.call("echo", frame, timeout=30)
        assert response.status == runner_pb2.CALL_STATUS_SUCCESS, response
        assert response.output.type == V.PARQUET
        expected = frame.groupby("asset").price.agg(["mean", "count"])
        pd.testing.assert_frame_equal(from_variant(response.output), expected)
    finally:
        await client.close()


# -- values read in place from a worker's shared payload (runner/shared_payload.py) ----------------------


def private_mapping(data: bytes) -> memoryview:
    """`data` as a worker sees a shared payload: a view of a private (copy-on-write) mapping of a memfd."""
    import mmap
    import os

    fd = os.memfd_create("codec-test")
    try:
        os.write(fd, data)
        return memoryview(mmap.mmap(fd, len(data), access=mmap.ACCESS_COPY))
    finally:
        os.close(fd)


def test_an_array_is_read_in_place_from_a_private_mapping_and_stays_writable() -> None:
    array = np.arange(24, dtype=np.float64).reshape(2, 3, 4, order="F")
    view = private_mapping(encode_data(V.NDARRAY, array))
    decoded = decode_data(V.NDARRAY, view)
    np.testing.assert_array_equal(decoded, array)
    assert decoded.flags.f_contiguous and np.shares_memory(decoded, np.frombuffer(view, np.uint8))
    decoded[0, 0, 0] = -1.0  # the model's own copy-on-write page
    readonly = decode_data(V.NDARRAY, memoryview(encode_data(V.NDARRAY, array)))
    assert readonly.flags.writeable  # a read-only buffer is copied, as bytes are
    refused(ErrorCode.INVALID_VALUE, decode_data, V.NDARRAY, private_mapping(encode_data(V.NDARRAY, array) + b"\0"))


@pytest.mark.parametrize("variant_type", [*FRAME_TYPES, V.JSON, V.STRING])
def test_every_type_decodes_a_mapping_as_it_decodes_bytes(variant_type: int) -> None:
    value = {V.JSON: [0.1, 2, {"k": None}], V.STRING: "naïve"}.get(variant_type, pd.DataFrame({"x": [1.5, 2.5]}))
    data = encode_data(variant_type, value)
    decoded = decode_data(variant_type, private_mapping(data))
    if isinstance(value, pd.DataFrame):
        pd.testing.assert_frame_equal(decoded, decode_data(variant_type, data))
    else:
        assert decoded == value


def test_frame_column_data_is_not_read_as_a_schema() -> None:
    """Only the bytes pyarrow reads a schema from are searched for the extension key: a value may hold it.

    (Not as a column's minimum or maximum: Parquet keeps those in its footer, which is searched.)
    """
    frame = pd.DataFrame({"s": ["A", "ARROW:extension:name", "QVJST1c6ZXh0ZW5zaW9uOm5hbWU=", "Z"]})
    for variant_type in FRAME_TYPES:
        pd.testing.assert_frame_equal(decode_data(variant_type, frame_bytes(variant_type, pa.Table.from_pandas(frame))), frame)
    data = reference_parquet(pa.Table.from_pandas(frame))
    bogus = data[:-8] + struct.pack("<I", len(data)) + b"PAR1"  # a footer longer than the file
    refused(ErrorCode.INVALID_VALUE, decode_data, V.PARQUET, bogus)


def test_shared_values_replace_the_empty_values_they_name() -> None:
    arguments, kwargs = encode_arguments([1], {"frame": "x"})
    big = np.arange(4.0)
    arguments.append(Argument(position=2, data=Variant(type=V.NDARRAY)))
    kwargs.append(KwArgument(keyword="table", data=Variant(type=V.NDARRAY)))
    shared = {2: private_mapping(encode_data(V.NDARRAY, big)), "table": private_mapping(encode_data(V.NDARRAY, big))}
    args, named = decode_arguments(arguments, kwargs, shared=shared)
    assert args[0] == 1 and named["frame"] == "x"
    np.testing.assert_array_equal(args[1], big)
    np.testing.assert_array_equal(named["table"], big)
    refused(ErrorCode.INVALID_ARGUMENTS, decode_arguments, arguments, kwargs, shared={**shared, 3: shared[2]})
    refused(ErrorCode.INVALID_ARGUMENTS, decode_arguments, arguments, kwargs, shared={**shared, 1: shared[2]})

from secure_runner.v1 import runner_pb2 as _runner_pb2
from secure_runner.v1 import values_pb2 as _values_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRequest(_message.Message):
    __slots__ = ("setup", "call", "base_class", "shared", "shared_size")
    SETUP_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    BASE_CLASS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    SHARED_SIZE_FIELD_NUMBER: _ClassVar[int]
    setup: _runner_pb2.SetupRequest
    call: _runner_pb2.CallRequest
    base_class: _runner_pb2.SetupRequest
    shared: _containers.RepeatedCompositeFieldContainer[SharedValue]
    shared_size: int
    def __init__(self, setup: _Optional[_Union[_runner_pb2.SetupRequest, _Mapping]] = ..., call: _Optional[_Union[_runner_pb2.CallRequest, _Mapping]] = ..., base_class: _Optional[_Union[_runner_pb2.SetupRequest, _Mapping]] = ..., shared: _Optional[_Iterable[_Union[SharedValue, _Mapping]]] = ..., shared_size: _Optional[int] = ...) -> None: ...

class SharedValue(_message.Message):
    __slots__ = ("position", "keyword", "offset", "length")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    position: int
    keyword: str
    offset: int
    length: int
    def __init__(self, position: _Optional[int] = ..., keyword: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class WorkerResponse(_message.Message):
    __slots__ = ("setup", "call", "base_class")
    SETUP_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    BASE_CLASS_FIELD_NUMBER: _ClassVar[int]
    setup: _runner_pb2.SetupResponse
    call: _runner_pb2.CallResponse
    base_class: BaseClassReport
    def __init__(self, setup: _Optional[_Union[_runner_pb2.SetupResponse, _Mapping]] = ..., call: _Optional[_Union[_runner_pb2.CallResponse, _Mapping]] = ..., base_class: _Optional[_Union[BaseClassReport, _Mapping]] = ...) -> None: ...

class BaseClassReport(_message.Message):
    __slots__ = ("status", "error", "methods")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    status: _runner_pb2.CallStatus
    error: _values_pb2.ErrorDetail
    methods: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, status: _Optional[_Union[_runner_pb2.CallStatus, str]] = ..., error: _Optional[_Union[_values_pb2.ErrorDetail, _Mapping]] = ..., methods: _Optional[_Iterable[str]] = ...) -> None: ...

from secure_runner.v1 import values_pb2 as _values_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CallStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CALL_STATUS_UNSPECIFIED: _ClassVar[CallStatus]
    CALL_STATUS_SUCCESS: _ClassVar[CallStatus]
    CALL_STATUS_FAILURE: _ClassVar[CallStatus]
    CALL_STATUS_TIMEOUT: _ClassVar[CallStatus]
CALL_STATUS_UNSPECIFIED: CallStatus
CALL_STATUS_SUCCESS: CallStatus
CALL_STATUS_FAILURE: CallStatus
CALL_STATUS_TIMEOUT: CallStatus

class SetupRequest(_message.Message):
    __slots__ = ("model_id", "base_classname", "arguments", "kwargs")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_CLASSNAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    base_classname: str
    arguments: _containers.RepeatedCompositeFieldContainer[_values_pb2.Argument]
    kwargs: _containers.RepeatedCompositeFieldContainer[_values_pb2.KwArgument]
    def __init__(self, model_id: _Optional[str] = ..., base_classname: _Optional[str] = ..., arguments: _Optional[_Iterable[_Union[_values_pb2.Argument, _Mapping]]] = ..., kwargs: _Optional[_Iterable[_Union[_values_pb2.KwArgument, _Mapping]]] = ...) -> None: ...

class SetupResponse(_message.Message):
    __slots__ = ("status", "error", "methods", "class_name")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    status: CallStatus
    error: _values_pb2.ErrorDetail
    methods: _containers.RepeatedScalarFieldContainer[str]
    class_name: str
    def __init__(self, status: _Optional[_Union[CallStatus, str]] = ..., error: _Optional[_Union[_values_pb2.ErrorDetail, _Mapping]] = ..., methods: _Optional[_Iterable[str]] = ..., class_name: _Optional[str] = ...) -> None: ...

class CallRequest(_message.Message):
    __slots__ = ("model_id", "method", "arguments", "kwargs")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    method: str
    arguments: _containers.RepeatedCompositeFieldContainer[_values_pb2.Argument]
    kwargs: _containers.RepeatedCompositeFieldContainer[_values_pb2.KwArgument]
    def __init__(self, model_id: _Optional[str] = ..., method: _Optional[str] = ..., arguments: _Optional[_Iterable[_Union[_values_pb2.Argument, _Mapping]]] = ..., kwargs: _Optional[_Iterable[_Union[_values_pb2.KwArgument, _Mapping]]] = ...) -> None: ...

class CallResponse(_message.Message):
    __slots__ = ("status", "error", "output", "model_latency_us")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    status: CallStatus
    error: _values_pb2.ErrorDetail
    output: _values_pb2.Variant
    model_latency_us: int
    def __init__(self, status: _Optional[_Union[CallStatus, str]] = ..., error: _Optional[_Union[_values_pb2.ErrorDetail, _Mapping]] = ..., output: _Optional[_Union[_values_pb2.Variant, _Mapping]] = ..., model_latency_us: _Optional[int] = ...) -> None: ...

class FanOutRequest(_message.Message):
    __slots__ = ("node_id", "model_ids", "method", "arguments", "kwargs", "per_model")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    PER_MODEL_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    method: str
    arguments: _containers.RepeatedCompositeFieldContainer[_values_pb2.Argument]
    kwargs: _containers.RepeatedCompositeFieldContainer[_values_pb2.KwArgument]
    per_model: _containers.RepeatedCompositeFieldContainer[ModelArguments]
    def __init__(self, node_id: _Optional[str] = ..., model_ids: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., arguments: _Optional[_Iterable[_Union[_values_pb2.Argument, _Mapping]]] = ..., kwargs: _Optional[_Iterable[_Union[_values_pb2.KwArgument, _Mapping]]] = ..., per_model: _Optional[_Iterable[_Union[ModelArguments, _Mapping]]] = ...) -> None: ...

class ModelArguments(_message.Message):
    __slots__ = ("model_id", "arguments", "kwargs")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    arguments: _containers.RepeatedCompositeFieldContainer[_values_pb2.Argument]
    kwargs: _containers.RepeatedCompositeFieldContainer[_values_pb2.KwArgument]
    def __init__(self, model_id: _Optional[str] = ..., arguments: _Optional[_Iterable[_Union[_values_pb2.Argument, _Mapping]]] = ..., kwargs: _Optional[_Iterable[_Union[_values_pb2.KwArgument, _Mapping]]] = ...) -> None: ...

class FanOutResult(_message.Message):
    __slots__ = ("model_id", "response")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    response: CallResponse
    def __init__(self, model_id: _Optional[str] = ..., response: _Optional[_Union[CallResponse, _Mapping]] = ...) -> None: ...

class FanOutResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[FanOutResult]
    def __init__(self, results: _Optional[_Iterable[_Union[FanOutResult, _Mapping]]] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ResetResponse(_message.Message):
    __slots__ = ("status", "error")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    status: CallStatus
    error: _values_pb2.ErrorDetail
    def __init__(self, status: _Optional[_Union[CallStatus, str]] = ..., error: _Optional[_Union[_values_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

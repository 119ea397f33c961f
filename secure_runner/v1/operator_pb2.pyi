from secure_runner.v1 import orchestrator_pb2 as _orchestrator_pb2
from secure_runner.v1 import runner_pb2 as _runner_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OperatorListRequest(_message.Message):
    __slots__ = ("crunch_id",)
    CRUNCH_ID_FIELD_NUMBER: _ClassVar[int]
    crunch_id: str
    def __init__(self, crunch_id: _Optional[str] = ...) -> None: ...

class OperatorModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class OperatorNodeRequest(_message.Message):
    __slots__ = ("node_id", "model_ids")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., model_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class OperatorLogsRequest(_message.Message):
    __slots__ = ("model_id", "lines")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    lines: int
    def __init__(self, model_id: _Optional[str] = ..., lines: _Optional[int] = ...) -> None: ...

class OperatorModel(_message.Message):
    __slots__ = ("info", "restarts", "last_failure_code", "last_failure_message", "last_failure_ms", "calls")
    INFO_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_CODE_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_MS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    info: _orchestrator_pb2.ModelInfo
    restarts: int
    last_failure_code: str
    last_failure_message: str
    last_failure_ms: int
    calls: ModelCallCounters
    def __init__(self, info: _Optional[_Union[_orchestrator_pb2.ModelInfo, _Mapping]] = ..., restarts: _Optional[int] = ..., last_failure_code: _Optional[str] = ..., last_failure_message: _Optional[str] = ..., last_failure_ms: _Optional[int] = ..., calls: _Optional[_Union[ModelCallCounters, _Mapping]] = ...) -> None: ...

class ModelCallCounters(_message.Message):
    __slots__ = ("calls", "failures", "last_status", "last_latency_us", "last_call_ms", "last_failure_code", "last_failure_message")
    CALLS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    LAST_CALL_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_CODE_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    calls: int
    failures: int
    last_status: _runner_pb2.CallStatus
    last_latency_us: int
    last_call_ms: int
    last_failure_code: str
    last_failure_message: str
    def __init__(self, calls: _Optional[int] = ..., failures: _Optional[int] = ..., last_status: _Optional[_Union[_runner_pb2.CallStatus, str]] = ..., last_latency_us: _Optional[int] = ..., last_call_ms: _Optional[int] = ..., last_failure_code: _Optional[str] = ..., last_failure_message: _Optional[str] = ...) -> None: ...

class OperatorModelList(_message.Message):
    __slots__ = ("crunch_id", "models")
    CRUNCH_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    crunch_id: str
    models: _containers.RepeatedCompositeFieldContainer[OperatorModel]
    def __init__(self, crunch_id: _Optional[str] = ..., models: _Optional[_Iterable[_Union[OperatorModel, _Mapping]]] = ...) -> None: ...

class OperatorAck(_message.Message):
    __slots__ = ("done", "detail")
    DONE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    done: bool
    detail: str
    def __init__(self, done: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class OperatorLogs(_message.Message):
    __slots__ = ("model_id", "lines")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., lines: _Optional[_Iterable[str]] = ...) -> None: ...

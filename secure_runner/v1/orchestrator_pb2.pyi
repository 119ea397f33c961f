from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_STARTING: _ClassVar[ModelState]
    MODEL_STATE_RUNNING: _ClassVar[ModelState]
    MODEL_STATE_RECOVERING: _ClassVar[ModelState]
    MODEL_STATE_STOPPED: _ClassVar[ModelState]
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_STARTING: ModelState
MODEL_STATE_RUNNING: ModelState
MODEL_STATE_RECOVERING: ModelState
MODEL_STATE_STOPPED: ModelState

class WatchModelsRequest(_message.Message):
    __slots__ = ("crunch_id",)
    CRUNCH_ID_FIELD_NUMBER: _ClassVar[int]
    crunch_id: str
    def __init__(self, crunch_id: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "model_name", "cruncher_id", "cruncher_name", "deployment_id", "address", "state", "runner_delegation", "node_id", "state_reason", "state_since_ms")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CRUNCHER_ID_FIELD_NUMBER: _ClassVar[int]
    CRUNCHER_NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RUNNER_DELEGATION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_name: str
    cruncher_id: str
    cruncher_name: str
    deployment_id: str
    address: str
    state: ModelState
    runner_delegation: bytes
    node_id: str
    state_reason: str
    state_since_ms: int
    def __init__(self, model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., cruncher_id: _Optional[str] = ..., cruncher_name: _Optional[str] = ..., deployment_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., runner_delegation: _Optional[bytes] = ..., node_id: _Optional[str] = ..., state_reason: _Optional[str] = ..., state_since_ms: _Optional[int] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("model_id", "deployment_id", "reason", "message", "consecutive_failures", "consecutive_timeouts")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    deployment_id: str
    reason: str
    message: str
    consecutive_failures: int
    consecutive_timeouts: int
    def __init__(self, model_id: _Optional[str] = ..., deployment_id: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., consecutive_failures: _Optional[int] = ..., consecutive_timeouts: _Optional[int] = ...) -> None: ...

class FailureReportAck(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: bool
    def __init__(self, stopped: _Optional[bool] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("crunch_id", "revision", "models")
    CRUNCH_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    crunch_id: str
    revision: int
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, crunch_id: _Optional[str] = ..., revision: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

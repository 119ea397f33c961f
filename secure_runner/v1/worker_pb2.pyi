from secure_runner.v1 import runner_pb2 as _runner_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRequest(_message.Message):
    __slots__ = ("setup", "call")
    SETUP_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    setup: _runner_pb2.SetupRequest
    call: _runner_pb2.CallRequest
    def __init__(self, setup: _Optional[_Union[_runner_pb2.SetupRequest, _Mapping]] = ..., call: _Optional[_Union[_runner_pb2.CallRequest, _Mapping]] = ...) -> None: ...

class WorkerResponse(_message.Message):
    __slots__ = ("setup", "call")
    SETUP_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    setup: _runner_pb2.SetupResponse
    call: _runner_pb2.CallResponse
    def __init__(self, setup: _Optional[_Union[_runner_pb2.SetupResponse, _Mapping]] = ..., call: _Optional[_Union[_runner_pb2.CallResponse, _Mapping]] = ...) -> None: ...

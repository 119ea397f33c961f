"""Framing for the runner <-> worker pipes.

A frame is a 4-byte little-endian length followed by that many bytes of a
serialized protobuf message. Both sides refuse a frame over the cap before
reading it, so a hostile worker cannot make the runner allocate without bound.
Imported by the worker: keep it free of grpc, smp and anything with a key.
"""

from __future__ import annotations

import os
import struct

HEADER = struct.Struct("<I")
MAX_FRAME_BYTES = 64 * 1024 * 1024


class FrameError(Exception):
    """The peer closed the pipe or sent a frame that breaks the framing rules."""


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes is over the {MAX_FRAME_BYTES}-byte cap")
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes is over the {MAX_FRAME_BYTES}-byte cap")
    return length


def read_exact(fd: int, size: int) -> bytes:
    """Blocking read of exactly `size` bytes from a file descriptor (worker side)."""
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise FrameError("pipe closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> bytes:
    return read_exact(fd, frame_length(read_exact(fd, HEADER.size)))


def write_frame(fd: int, payload: bytes) -> None:
    view = memoryview(encode_frame(payload))
    while view:
        view = view[os.write(fd, view):]

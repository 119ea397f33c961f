"""Framing for the runner <-> worker pipes.

A frame is a 4-byte little-endian length followed by that many bytes of a
serialized protobuf message. Both sides refuse a frame over the cap before
reading it, so a hostile worker cannot make the runner allocate without bound.
The worker reads and writes frames with blocking calls (`read_frame`,
`write_frame`); the runner's end is a `FrameChannel` on its event loop.
Imported by the worker: keep it free of grpc, smp and anything with a key.
"""

from __future__ import annotations

import asyncio
import os
import struct

HEADER = struct.Struct("<I")
# gRPC's message cap (64 MiB, transport/tls.py) plus room for the framing the runner adds, so any
# request a runner accepts fits in one frame to its worker.
MAX_FRAME_BYTES = 64 * 1024 * 1024 + 64 * 1024
# Bytes the runner asks for per read: a pipe's default capacity, all a pipe holds.
READ_CHUNK = 64 * 1024


class FrameError(Exception):
    """The peer sent bytes that break the framing rules."""


class PipeClosed(FrameError):
    """The peer closed its end of the pipe (or died)."""


class FrameTooLarge(FrameError):
    """The peer announced a frame over the cap of the answer expected (refused before its payload is read)."""


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes is over the {MAX_FRAME_BYTES}-byte cap")
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes | bytearray, cap: int = MAX_FRAME_BYTES) -> int:
    """The payload length a frame's header announces, refused if it is over `cap`."""
    (length,) = HEADER.unpack_from(header)
    if length > cap:
        raise FrameTooLarge(f"frame of {length} bytes is over the {cap}-byte cap")
    return length


def read_exact(fd: int, size: int) -> bytes:
    """Blocking read of exactly `size` bytes from a file descriptor (worker side)."""
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise PipeClosed("pipe closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> bytes:
    return read_exact(fd, frame_length(read_exact(fd, HEADER.size)))


def write_frame(fd: int, payload: bytes) -> None:
    view = memoryview(encode_frame(payload))
    while view:
        view = view[os.write(fd, view):]


class FrameChannel:
    """The runner's end of a worker's protocol pipes, on the event loop.

    Cheaper per request than asyncio streams with a task per deadline: the read
    end is watched with add_reader, a request goes straight to the pipe with
    os.write (what the pipe does not take follows as it drains), and the answer
    is a future. One answer is due at a time.

    The worker's bytes are never trusted: a header announcing more than the
    answer's cap is refused before its payload is buffered, and bytes written
    when no answer is due (before the request was fully written, after a
    deadline, or past the answer's end) break the protocol. The first failure
    sticks: the pipes are no longer watched and every later exchange fails the
    same way.
    """

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._read_fd, self._write_fd = read_fd, write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._buffer = bytearray()
        self._cap = 0
        self._answer: asyncio.Future[bytes] | None = None
        self._due = 0.0  # loop time by which the answer is due
        self._timer: asyncio.Handle | None = None
        self._armed_for = 0.0  # when the timer fires: never after _due while an answer is due
        self._unsent: memoryview | None = None
        self._failure: FrameError | None = None
        self._loop.add_reader(read_fd, self._readable)

    def exchange(self, frame: bytes, cap: int, timeout: float) -> asyncio.Future[bytes]:
        """Write `frame` (b"": nothing, the worker speaks first) and return the answer's payload to come.

        The future fails with TimeoutError after `timeout` seconds (at once, with
        nothing written, if no time is left), PipeClosed if the worker closed its
        pipe, or FrameError if it broke the framing.
        """
        if self._answer is not None:  # timed out or given up on: the stream is out of step
            self._fail(FrameError("the worker still owes an earlier answer"))
        answer = self._loop.create_future()
        if self._failure is not None:
            answer.set_exception(self._failure)
        elif timeout <= 0:
            answer.set_exception(TimeoutError())
        else:
            self._answer, self._cap = answer, cap
            self._due = self._loop.time() + timeout
            if self._timer is None or self._armed_for > self._due:
                self._arm()
            if frame:
                self._write(frame)
        return answer

    def _arm(self) -> None:
        """Set the timer for the answer due now.

        An answer that comes in leaves the timer running: the next deadline is
        later, so the timer is moved only when it fires early or a deadline is
        earlier. One timer serves a run of answers instead of one per request.
        """
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = self._due
        self._timer = self._loop.call_at(self._due, self._check_due)

    def _check_due(self) -> None:
        self._timer = None
        if self._answer is None or self._answer.done():
            return
        if self._due > self._armed_for:  # a later answer is due now: wait for its own deadline
            self._arm()
        else:
            self._answer.set_exception(TimeoutError())

    def close(self) -> None:
        """Stop watching the pipes (the caller closes them); an answer still due fails with PipeClosed."""
        self._fail(PipeClosed("pipes closed by the runner"))

    def _readable(self) -> None:
        try:
            chunk = os.read(self._read_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._fail(PipeClosed("worker closed its pipe"))
            return
        answer = self._answer
        if answer is None or answer.done() or self._unsent is not None:
            self._fail(FrameError("worker wrote when no answer was due"))
            return
        buffer = self._buffer
        buffer += chunk
        if len(buffer) < HEADER.size:
            return
        try:
            end = HEADER.size + frame_length(buffer, self._cap)
        except FrameError as exc:
            self._fail(exc)
            return
        if len(buffer) > end:
            self._fail(FrameError("worker wrote past the end of its answer"))
        elif len(buffer) == end:
            with memoryview(buffer) as view:
                payload = view[HEADER.size:].tobytes()
            buffer.clear()
            self._answer = None
            answer.set_result(payload)

    def _write(self, data: bytes | memoryview) -> None:
        """Write what the pipe takes now; if that is not all, the rest follows when it has room."""
        try:
            sent = os.write(self._write_fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:  # EPIPE: the worker closed its end
            self._fail(PipeClosed("worker closed its pipe"))
            return
        if sent < len(data):
            self._unsent = memoryview(data)[sent:]
            self._loop.add_writer(self._write_fd, self._write_rest)

    def _write_rest(self) -> None:
        self._loop.remove_writer(self._write_fd)
        rest, self._unsent = self._unsent, None
        self._write(rest)

    def _fail(self, failure: FrameError) -> None:
        if self._failure is None:
            self._failure = failure
            self._loop.remove_reader(self._read_fd)
            self._loop.remove_writer(self._write_fd)
            self._unsent = None
            if self._timer is not None:
                self._timer.cancel()
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(self._failure)

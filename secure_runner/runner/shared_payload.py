"""Big call arguments handed to workers through one sealed memfd per request, not a pipe write per worker.

A fan-out of one 16 MiB argument to N models used to write N copies through N pipes,
each read into its worker's memory. Now the runner writes a value above
`SHARED_THRESHOLD` once into a memfd, seals it (no write, no shrink, no grow, no
more seal changes) and sends that one descriptor to each worker it calls, over the
worker's own payload socket (a socketpair made for it alone, SCM_RIGHTS) just
before the call's frame. The frame names where each moved value lies in it
(`WorkerRequest.shared`).

Why it is safe to share: a worker runs untrusted code, and the seals are what
keep it from changing what its node-mates read. With F_SEAL_WRITE no one, not
even the runner, can write(), map it shared and writable or mprotect such a
mapping to writable; F_SEAL_SHRINK/GROW stop ftruncate; F_SEAL_SEAL stops any
change of the seals. A worker checks what it received before it reads a byte:
exactly one descriptor, a regular file carrying all four seals (only a memfd
can), of the size the frame announces. It maps it copy-on-write (MAP_PRIVATE:
a model may change its own array in place, its writes land in its own pages) and
closes the descriptor at once, so model code never holds it. The runner closes
its own descriptor once every worker of the request has answered; a mapping a
model keeps holds only its own reference to the pages.

Imported by the worker: no grpc, no smp, nothing with a key.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import stat

from secure_runner.errors import ErrorCode, SecureRunnerError

# Values whose encoded bytes are larger than this go through the shared payload; smaller ones stay in the frame.
SHARED_THRESHOLD = 256 * 1024
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# What the runner sends with each descriptor: one byte (SCM_RIGHTS needs some data to ride on).
MARKER = b"p"


class SharedPayloadRefused(SecureRunnerError):
    """The worker refused the descriptor it was given for a call's shared payload."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.SHARED_PAYLOAD_REFUSED, message)


# -- the runner's side ------------------------------------------------------------------------------


class SealedPayload:
    """The runner's descriptor of one request's memfd: values are appended, then it is sealed for good."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("secure-runner-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.size = 0

    def append(self, data: bytes) -> int:
        """Write `data` at the end; its offset."""
        offset = self.size
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            self.size += written
            view = view[written:]
        return offset

    def seal(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)

    def send(self, sock: socket.socket) -> None:
        """Queue the descriptor on a worker's payload socket (OSError if it is closed or full)."""
        if self.fd < 0:
            raise OSError("the shared payload is closed")
        socket.send_fds(sock, [MARKER], [self.fd])

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


# -- the worker's side ------------------------------------------------------------------------------


def receive(payload_socket: socket.socket, size: int) -> mmap.mmap:
    """Take the descriptor the runner queued before this frame, check it, map it copy-on-write, close it.

    Never waits: the runner queues the descriptor before it writes the frame.
    """
    fds = array.array("i")
    try:
        data, ancillary, flags, _ = payload_socket.recvmsg(
            1, socket.CMSG_SPACE(fds.itemsize), socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
        )
    except BlockingIOError:
        raise SharedPayloadRefused("no descriptor came with the call") from None
    except OSError as exc:  # model code closed or broke the socket
        raise SharedPayloadRefused(f"cannot read the payload socket: {exc}") from None
    for level, kind, body in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(body[: len(body) - len(body) % fds.itemsize])
    try:
        if data != MARKER or flags & socket.MSG_CTRUNC or len(fds) != 1:
            raise SharedPayloadRefused(f"expected one descriptor with the call, got {len(fds)}")
        return _map_checked(fds[0], size)
    finally:
        for fd in fds:
            os.close(fd)


def receive_values(payload_socket: socket.socket, shared, size: int) -> dict[int | str, memoryview]:
    """The call's values that came in its shared payload, by position or keyword (see codec.decode_arguments).

    `shared` lists the request's SharedValue entries, `size` the payload size its frame announced.
    Each is a view of the worker's private copy-on-write mapping, which lives as long as a view of it does.
    """
    view = memoryview(receive(payload_socket, size))
    values: dict[int | str, memoryview] = {}
    for value in shared:
        key = value.position or value.keyword
        if value.offset + value.length > size or key in values:
            raise SharedPayloadRefused(f"the frame names a value outside the shared payload, or one twice ({key!r})")
        values[key] = view[value.offset : value.offset + value.length]
    return values


def _map_checked(fd: int, size: int) -> mmap.mmap:
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        raise SharedPayloadRefused("the descriptor is not a memfd")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise SharedPayloadRefused("the descriptor is not a memfd (it has no seals)") from None
    if seals & SEALS != SEALS:
        raise SharedPayloadRefused(f"the memfd is not sealed against writes and resizing (seals {seals:#x})")
    if status.st_size != size or size == 0:
        raise SharedPayloadRefused(f"the memfd holds {status.st_size} bytes, the frame announced {size}")
    return mmap.mmap(fd, size, access=mmap.ACCESS_COPY)

"""A malicious submission: it tries to change the big argument its node-mates read.

At import it wraps the worker's check of a shared payload's descriptor so that it keeps a
copy of every descriptor its worker receives (model code owns its worker process: this is
the most it can get). `echo(array)` then, on every descriptor it kept, tries to write,
shrink, grow, map shared and writable, map read-only and mprotect to writable, and add or
change seals; it fills its own array with its pid in place (a model may change its own
copy), waits, and reports whether its array still holds only its pid (a node-mate's
writes would show through a shared page) with every descriptor it was ever given.
"""

import ctypes
import errno
import fcntl
import mmap
import os
import time

from sr_testgame.base import GameBase

from secure_runner.runner import shared_payload

KEPT = []  # (descriptor copy, size) of every payload descriptor this worker was given
_check = shared_payload._map_checked


def _keeping(fd, size):
    KEPT.append((os.dup(fd), os.fstat(fd).st_size))
    return _check(fd, size)


shared_payload._map_checked = _keeping

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value
F_SEAL_FUTURE_WRITE = 0x10  # linux/fcntl.h (not in the fcntl module)


def _outcome(attempt):
    try:
        attempt()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ALLOWED"


def _mprotect_to_writable(fd, size):
    address = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address == MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap")
    if LIBC.mprotect(address, size, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")


def attack(fd, size):
    return {
        "write": _outcome(lambda: os.pwrite(fd, b"\0" * 8, 0)),
        "shrink": _outcome(lambda: os.ftruncate(fd, 0)),
        "grow": _outcome(lambda: os.ftruncate(fd, size * 2)),
        "map_shared_writable": _outcome(lambda: mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)),
        "mprotect_to_writable": _outcome(lambda: _mprotect_to_writable(fd, size)),
        "add_seal": _outcome(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)),
    }


class Tamper(GameBase):
    def __init__(self):
        self.calls = 0

    def echo(self, value):
        self.calls += 1
        attacks = [attack(fd, size) for fd, size in KEPT]
        value[:] = os.getpid()  # its own copy-on-write pages
        time.sleep(0.5)  # the node-mate fills its copy meanwhile
        return {"attacks": attacks, "sizes": [size for _, size in KEPT], "only_mine": bool((value == os.getpid()).all())}

    def count(self):
        return self.calls

    def hang(self, seconds):
        time.sleep(seconds)

    def fail(self, message):
        raise RuntimeError(message)

"""Cross-process primitives: OFD byte-range locks and shared futexes.

* Open-file-description locks (``F_OFD_SETLK``) belong to one ``open()`` of the
  segment, not to a process, and the kernel drops them when the holder's file
  description closes -- including when the process is SIGKILLed.  The ring
  uses one for its transition lock and one per slot as the *ownership* lock
  that proves a WRITING/READING owner is alive (no pid-reuse hazard).
* Shared futexes on words in the segment let a waiter in any process sleep
  until a slot becomes READY or FREE, without polling.  Where ``futex(2)`` is
  unavailable the wait degrades to short sleeps.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
import time

# struct flock on Linux/x86_64 and aarch64: short l_type, short l_whence,
# off_t l_start, off_t l_len, pid_t l_pid (+ padding)
_FLOCK = struct.Struct("hhqqi4x")


def flock_bytes(ltype: int, start: int, length: int = 1) -> bytes:
    return _FLOCK.pack(ltype, os.SEEK_SET, start, length, 0)



def lock_acquire(fd: int, start: int, *, blocking: bool = True, length: int = 1) -> bool:
    """Write-lock bytes ``[start, start + length)`` of ``fd``'s open file description."""
    cmd = fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK
    while True:
        try:
            fcntl.fcntl(fd, cmd, flock_bytes(fcntl.F_WRLCK, start, length))
            return True
        except InterruptedError:
            continue
        except OSError as exc:
            if not blocking and exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise


def lock_release(fd: int, start: int, length: int = 1) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock_bytes(fcntl.F_UNLCK, start, length))


def runs(sorted_ints) -> list[tuple[int, int]]:
    """[(start, length)] of the runs of consecutive values in an ascending sequence."""
    out: list[tuple[int, int]] = []
    for v in sorted_ints:
        if out and out[-1][0] + out[-1][1] == v:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def lock_held_elsewhere(fd: int, start: int) -> bool:
    """True if another open file description holds a lock on byte ``start``."""
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, flock_bytes(fcntl.F_WRLCK, start))
    return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK


# ------------------------------------------------------------------ futex ---
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = None
if _SYS_FUTEX is not None:
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    except OSError:  # pragma: no cover
        _libc = None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, expected: int, timeout: float | None) -> None:
    """Sleep while the u32 at ``addr`` equals ``expected``, at most ``timeout`` s.

    Returns on wake-up, value change, timeout or signal; callers re-check
    their condition. The ctypes call releases the GIL.
    """
    if timeout is not None and timeout <= 0:
        return
    if _libc is None:  # pragma: no cover - non-Linux fallback
        time.sleep(min(timeout if timeout is not None else 0.001, 0.001))
        return
    ts = None
    if timeout is not None:
        sec = int(timeout)
        ts = ctypes.byref(_Timespec(sec, int((timeout - sec) * 1e9)))
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_uint32(expected), ts, None, 0)


def futex_wake(addr: int, n: int = 2**31 - 1) -> None:
    if _libc is not None:
        _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, n, None, None, 0)

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
import mmap
import os
import platform
import struct
import time

import numpy as np

# struct flock on Linux/x86_64 and aarch64: short l_type, short l_whence,
# off_t l_start, off_t l_len, pid_t l_pid (+ padding)
_FLOCK = struct.Struct("hhqqi4x")


#: this process's id, kept current across os.fork() by the hook below: a plain read on hot paths
#: (a handle opened by another pid was inherited through fork and must not change the ring)
pid = os.getpid()


def _after_fork_in_child() -> None:
    global pid
    pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
    """[(start, length)] of the runs of consecutive values (each one more than the one
    before) in a sequence, in its order (with few array operations: a batch's sorted
    slots are usually one run, or a few)."""
    a = np.asarray(sorted_ints, np.int64)
    n = len(a)
    if not n:
        return []
    step = a[1:] - a[:-1]
    if (step == 1).all():  # consecutive values: one run
        return [(int(a[0]), n)]
    cut = (np.flatnonzero(step != 1) + 1).tolist()
    firsts = [0, *cut]
    return [(int(a[i]), j - i) for i, j in zip(firsts, [*cut, n])]


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


_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2  # <sys/mman.h> on Linux


def _mman():
    libc = _libc if _libc is not None else ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _remap_through(addr: int, length: int, fd: int) -> None:
    """Replace the shared mapping at ``addr`` by the same file's pages mapped through ``fd``,
    atomically (map elsewhere, then ``mremap`` onto ``addr``): on failure the old mapping stays."""
    libc = _mman()
    tmp = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if tmp is None or tmp == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap of the segment in the forked child failed")
    got = libc.mremap(tmp, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, addr)
    if got != addr:
        err = ctypes.get_errno()
        libc.munmap(tmp, length)
        raise OSError(err, "mremap of the segment onto its old address in the forked child failed")


def disown_description(ident: tuple[int, int], mappings: list, handle_fds: list) -> None:
    """In a forked child: stop sharing the parent's open file description(s) of a segment.

    OFD locks belong to the open file description, which the kernel frees (dropping
    its locks) only when no descriptor *and no mapping* refers to it. A forked child
    inherits both, so it could take a lock its parent holds, and a parent killed while
    holding slots would look alive for as long as the child lives. So: every mapping
    of the segment ``ident`` (st_dev, st_ino) in ``mappings`` [(address, length)] is
    remapped, same address and pages, through one fresh description that never takes a
    lock, and so is every descriptor of the segment; then each ring handle's descriptor
    in ``handle_fds`` gets a fresh description of its own (two handles' locks must still
    exclude each other, as they did in the parent)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:  # the listing's own descriptor, gone already
            continue
        if (st.st_dev, st.st_ino) == ident:
            fds.append(int(name))
    if not fds:
        return
    shared = os.open(f"/proc/self/fd/{fds[0]}", os.O_RDWR)  # a new description of the same file
    try:
        for addr, length in mappings:
            _remap_through(addr, length, shared)
        for fd in fds:
            os.dup2(shared, fd, inheritable=False)
        for fd in handle_fds:
            own = os.open(f"/proc/self/fd/{shared}", os.O_RDWR)
            try:
                os.dup2(own, fd, inheritable=False)
            finally:
                os.close(own)
    finally:
        os.close(shared)

"""Another process's file descriptor, duplicated into sevmon (``pidfd_open`` + ``pidfd_getfd``, Linux >= 5.6).

How sevmon reaches QEMU's RAM backend (a memfd) and QEMU's KVM VM fd (for a mirror VM). It needs ptrace rights over
QEMU (same user, or CAP_SYS_PTRACE, and Yama's ptrace_scope); a refusal is an OSError with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import os

SYS_PIDFD_GETFD = 438  # x86-64
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate of process ``pid``'s fd ``fd`` in this process; OSError (EPERM, EBADF, ESRCH...) otherwise."""
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return new
    finally:
        os.close(pidfd)

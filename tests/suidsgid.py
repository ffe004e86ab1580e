"""Run a function in a child process under systemd's ``RestrictSUIDSGID=``.

deploy/batchd.service sets ``RestrictSUIDSGID=yes``: a seccomp filter that
fails with EPERM every chmod, fchmod, fchmodat, mkdir and mkdirat whose mode
names the setuid or setgid bit. This installs the same rule (x86-64 only) in a
forked child, so a test sees what the daemon sees under systemd without one.
"""

from __future__ import annotations

import ctypes
import os
import platform
import stat
import struct
import traceback
from collections.abc import Callable

_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_LD_ABS_W, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | 1
#: x86-64 system call number -> the index of its mode argument.
_MODE_ARG = {
    90: 1,
    91: 1,
    83: 1,
    268: 2,
    258: 2,
    452: 2,
}  # chmod fchmod mkdir fchmodat mkdirat fchmodat2

SUPPORTED = platform.machine() == "x86_64"


def _program() -> list[tuple[int, int, int, int]]:
    """The classic BPF filter, as (code, jt, jf, k); jumps are relative."""
    calls = list(_MODE_ARG.items())
    # Layout: arch check, load nr, one JEQ per call, allow, then per call a
    # load of its mode argument and a JSET, then deny, allow.
    checks = 3 + len(calls) + 1
    deny = checks + 2 * len(calls)
    allow = deny + 1
    prog = [
        (_LD_ABS_W, 0, 0, 4),  # seccomp_data.arch
        (_JEQ_K, 0, allow - 2, _AUDIT_ARCH_X86_64),
        (_LD_ABS_W, 0, 0, 0),  # seccomp_data.nr
    ]
    for i, (nr, _arg) in enumerate(calls):
        here = 3 + i
        prog.append((_JEQ_K, checks + 2 * i - here - 1, 0, nr))
    prog.append((_RET_K, 0, 0, _RET_ALLOW))
    for i, (_nr, arg) in enumerate(calls):
        here = checks + 2 * i + 1
        prog.append((_LD_ABS_W, 0, 0, 16 + 8 * arg))  # low word of args[arg]
        prog.append((_JSET_K, deny - here - 1, allow - here - 1, stat.S_ISUID | stat.S_ISGID))
    prog += [(_RET_K, 0, 0, _RET_EPERM), (_RET_K, 0, 0, _RET_ALLOW)]
    return prog


def _restrict() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    code = b"".join(struct.pack("<HBBI", *ins) for ins in _program())
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("<HxxxxxxQ", len(code) // 8, ctypes.addressof(buf))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def run_restricted(body: Callable[[], None], umask: int = 0o007) -> None:
    """Run ``body`` in a forked child under the filter, with ``umask`` (the
    unit's UMask=); re-raise its failure here as an AssertionError with its traceback."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        status = 0
        try:
            os.umask(umask)
            _restrict()
            body()
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            status = 1
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        report = pipe.read().decode()
    _, code = os.waitpid(pid, 0)
    if code != 0:
        raise AssertionError(f"under RestrictSUIDSGID=:\n{report}")

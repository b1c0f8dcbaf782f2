"""Keep the libraries' start-up noise off a CLI's stderr unless ``--verbose``.

TensorFlow's C++ core logs through absl *before* absl is initialised, straight to file
descriptor 2: the oneDNN and CPU-instruction banners, "Could not find cuda drivers" and, on a
machine without a GPU, an error-level ``E0000 ... failed call to cuInit`` line.
``TF_CPP_MIN_LOG_LEVEL`` hides only some of it, and Python's ``sys.stderr`` never sees any of
it, so fd 2 itself is routed through a pipe whose reader drops those lines and passes
everything else (our logs, progress bars, tracebacks) through unchanged.  What runs where is
said instead by one plain log line per library (``features.extract``, XGBoost's device
choice).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

#: Lines TensorFlow / absl / CUDA write at start-up (absl prefix ``I0000 00:00:...``, banners).
NOISE = re.compile(
    rb"^(?:[IWE]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] .*"
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.)\r?$"
)
_PREFIXES = (b"I0000", b"W0000", b"E0000", b"WARNING: All log", b"To enable the following")
# Written by restore_stderr after our last output: the reader stops there instead of waiting
# for end-of-file, which never comes while a worker process still holds the pipe.
_END = b"\x00end-of-stderr-filter\x00"

_state: dict = {}


def is_noise(line: bytes) -> bool:
    """Whether one line (without its newline) is library start-up noise."""
    return bool(NOISE.match(line))


def _may_become_noise(fragment: bytes) -> bool:
    return any(fragment.startswith(p[: len(fragment)]) for p in _PREFIXES)


def _pump(read_fd: int, write_fd: int) -> None:
    """Copy ``read_fd`` to ``write_fd`` line by line, dropping noise; a fragment that cannot be
    noise (a progress bar's ``\\r`` update) is passed on at once."""
    pending = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        done = _END in pending
        if done:
            pending = pending[: pending.index(_END)]
        out = []
        while True:
            cut = min((i for i in (pending.find(b"\n"), pending.find(b"\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            line, end = pending[:cut], pending[cut:cut + 1]
            pending = pending[cut + 1:]
            if end == b"\r" and pending.startswith(b"\n"):  # CRLF
                end, pending = b"\r\n", pending[1:]
            if not (end != b"\r" and is_noise(line)):
                out.append(line + end)
        if pending and not _may_become_noise(pending):
            out.append(pending)
            pending = b""
        if out:
            os.write(write_fd, b"".join(out))
        if done:
            break
    if pending and not is_noise(pending):
        os.write(write_fd, pending)


def silence_library_startup() -> None:
    """Route fd 2 through the noise filter for the rest of the process (idempotent).

    Also asks TensorFlow for warnings and errors only (``TF_CPP_MIN_LOG_LEVEL=2`` unless the
    user set it), which removes most of the noise at its source.
    """
    if _state:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        sys.stderr.flush()
        original = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
    except OSError:  # no usable fd 2 (embedded interpreter): leave it alone
        return
    thread = threading.Thread(target=_pump, args=(read_fd, original), name="stderr-filter", daemon=True)
    thread.start()
    _state.update(original=original, thread=thread)
    atexit.register(restore_stderr)


def restore_stderr() -> None:
    """Put the original fd 2 back and let the filter pass on what is still in the pipe."""
    if not _state:
        return
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    original, thread = _state.pop("original"), _state.pop("thread")
    try:
        os.write(2, _END)  # after everything this process wrote: the reader passes it all on, then stops
    except OSError:
        pass
    os.dup2(original, 2)
    thread.join(timeout=5)
    os.close(original)

"""Wake-ups between processes: one FIFO per slot, watched by asyncio.

A receiver that finds its channel empty marks itself waiting in the
segment (under the lock) and then waits for its FIFO to become readable
(``loop.add_reader``).  A sender that links a message into a channel with
waiters writes 4 bytes to each waiter's FIFO after it drops the lock: the
index of the channel, or ``ALL`` after a group send.  So a waiting process
costs nothing until something arrives, and a busy receiver (not marked
waiting) costs its senders no system call.

Each FIFO is opened read-write by its owner, so it never reports end of
file while the owner lives, and write-only by senders, whose write fails
once its owner has died: that is how a sender notices a dead process.
"""

import array
import errno
import fcntl
import logging
import os
import sys
import threading

from ._ring_cffi import lib

logger = logging.getLogger(__name__)

#: The reason a group send writes: look at every channel you wait on.
ALL = lib.DMB_NONE


class Doorbell:
    """This slot's FIFO, from the receiving side."""

    def __init__(self, path, mode=0o600):
        self.path = path
        #: Event loops watching this FIFO -> receives waiting in each; kept
        #: by the layer, which closes a retired FIFO when the last one stops.
        self.loops = {}
        os.mkfifo(path, mode)
        try:
            os.chmod(path, mode)  # the umask must not narrow it
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            os.unlink(path)
            raise
        try:
            self._capacity = fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ)
        except (AttributeError, OSError):
            self._capacity = 65536

    def fileno(self):
        return self.fd

    def take_reasons(self):
        """Read everything written so far.

        Returns the set of channel indices rung, which holds ``ALL`` if
        a group send rang or the FIFO filled up (some reasons may then have
        been refused, so every waiting channel must look).
        """
        chunks = []
        while True:
            try:
                chunk = os.read(self.fd, self._capacity)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
            if len(chunk) < self._capacity:
                break  # a FIFO read stops short only when it is empty
        data = b"".join(chunks)
        reasons = array.array("I")
        reasons.frombytes(data[: len(data) - len(data) % 4])
        found = set(reasons)
        if len(data) + 4 > self._capacity:
            found.add(ALL)
        return found

    def close(self, unlink=True):
        """Close the FIFO; ``unlink=False`` leaves the path (after fork)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class Ringer:
    """Writes to other slots' FIFOs, one cached descriptor per slot token.

    ``path_of(token)`` names the FIFO of the slot holding ``token``.
    """

    def __init__(self, path_of):
        self._path_of = path_of
        self._fds = {}
        self._lock = threading.Lock()

    def ring(self, token, reason):
        """Tell the slot owning ``token`` why to look.

        Returns False if the slot's process is gone (nobody reads its FIFO,
        or the FIFO no longer exists).
        """
        fd = self._fds.get(token)
        if fd is None:
            fd = self._open(self._path_of(token), token)
            if fd is None:
                return False
        try:
            os.write(fd, reason.to_bytes(4, sys.byteorder))
        except BlockingIOError:
            pass  # full: the reader is already due to wake and look at all
        except BrokenPipeError:
            self.forget(token)
            return False
        return True

    def _open(self, path, token):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT):
                return None
            raise
        with self._lock:
            old = self._fds.setdefault(token, fd)
        if old != fd:
            os.close(fd)  # another thread opened it first
        return old

    def forget(self, token):
        with self._lock:
            fd = self._fds.pop(token, None)
        if fd is not None:
            os.close(fd)

    def close(self):
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


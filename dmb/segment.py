"""Create, open, check and remove dmb's named shared-memory segment.

A segment is one POSIX shared-memory object, ``/dev/shm/dmb-<uid>-<prefix>``
on Linux.  Its byte layout is described at the top of ``_ring.c``; from
Python it is a mapping plus a ``struct dmb_handle`` that the C core fills
when the segment is attached.

The first process to open a name creates and formats the object; the rest
attach.  Creation is serialised with an ``flock`` on the object itself, so
a process that finds the object half-made waits for its maker, and an
object left all zero by a maker that died is formatted again by the next
opener.  The segment outlives its processes: it goes only when
``unlink_segment`` (``python -m dmb.inspect --unlink``) removes it.
"""

import errno
import fcntl
import glob
import hashlib
import logging
import mmap
import os
import stat
import time

import posix_ipc

from ._ring_cffi import ffi, lib
from .errors import SegmentCorrupt, SegmentError, SegmentFull

logger = logging.getLogger(__name__)

#: The layout this Python code was written for; the compiled core must match.
LAYOUT_VERSION = 1
if lib.DMB_LAYOUT_VERSION != LAYOUT_VERSION:
    raise ImportError(
        f"dmb's compiled core has layout version {lib.DMB_LAYOUT_VERSION}, "
        f"its Python code expects {LAYOUT_VERSION}: reinstall dmb"
    )

#: Some systems cap shared-memory names at 31 bytes, the leading / included.
NAME_LIMIT = 31
SHM_DIR = "/dev/shm"
MIN_SIZE = lib.dmb_min_size()


def segment_name(prefix, uid=None, shared=False):
    """Return the shared-memory name the layer uses for ``prefix``.

    A private segment (mode 0o600) carries the user id, which keeps two
    users' segments apart; a ``shared`` one (a mode that lets a group or
    others in) does not, so processes of several users meet in it.  A name
    too long for the 31-byte limit is shortened and made unique by a hash,
    after a ``~``: no prefix may hold one, so no short prefix can name the
    segment of a long one.
    """
    owner = "s" if shared else os.getuid() if uid is None else uid
    head = f"/dmb-{owner}-"
    name = head + prefix
    if len(name) <= NAME_LIMIT:
        return name
    digest = hashlib.sha1(prefix.encode()).hexdigest()[:8]
    keep = NAME_LIMIT - len(head) - len(digest) - 1
    return f"{head}{prefix[:keep]}~{digest}"


def segment_path(name):
    """Where the segment appears in the file system (Linux)."""
    return os.path.join(SHM_DIR, name.lstrip("/"))


def wake_path(name, token):
    """The path of the wake-up FIFO of the slot with this token."""
    return f"{segment_path(name)}.{token:016x}.wake"


def unlink_segment(name):
    """Remove a segment by name.  Returns False if there was none.

    Processes still attached keep their mapping and go on using it among
    themselves; new processes make a new segment.  Use ``python -m
    dmb.inspect --unlink``, which refuses while live processes are attached.
    """
    for fifo in glob.glob(glob.escape(segment_path(name)) + ".*.wake"):
        try:
            os.unlink(fifo)
        except FileNotFoundError:
            pass
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


def process_start_time(pid):
    """Field 22 of /proc/<pid>/stat: when the process started, in ticks.

    With the pid it names a process for good: a reused pid has a later
    start time.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        line = f.read()
    return int(line[line.rindex(b")") + 2 :].split()[19])


def process_alive(pid, start_time):
    """Is the process (pid, start_time) still running?  Zombies are not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    fields = line[line.rindex(b")") + 2 :].split()
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == start_time


_FILE_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def acquire_slot(handle, name, token, client, reclaim_dead):
    """Take a process slot for this process: (slot, its generation).

    When every slot is taken, ``reclaim_dead()`` frees those of dead
    processes and the slot is asked for once more.  Raises SegmentFull if
    none is free even then; any other refusal comes back as the C error
    code in place of the slot, for the caller to explain.
    """
    pid = os.getpid()
    start_time = process_start_time(pid)

    def acquire():
        now = time.monotonic_ns()
        return lib.dmb_slot_acquire(
            handle, pid, start_time, token, client, len(client), now
        )

    slot = acquire()
    if slot == lib.DMB_ERR_SLOTS:
        reclaim_dead()
        slot = acquire()
    if slot == lib.DMB_ERR_SLOTS:
        raise SegmentFull(
            f"segment {name!r} has no free process slot: {lib.DMB_MAX_SLOTS} "
            f"processes are attached; see them with `python -m dmb.inspect "
            f"--name {name}`"
        )
    if slot < 0:
        return slot, None
    info = ffi.new("struct dmb_slot_info *")
    lib.dmb_slot_info(handle, slot, info)
    return slot, info.gen


class Segment:
    """One segment, attached: its name, size, mapping and C handle.

    ``close()`` drops this process's mapping and leaves the segment to the
    others; ``unlink()`` removes its name.  Both are safe to call after a
    failed construction and more than once.

    With ``create=False`` (``python -m dmb.inspect``) nothing is made or
    formatted: an absent segment raises ``FileNotFoundError``, one never
    formatted raises ``SegmentError``, and ``size`` is not needed.
    """

    def __init__(self, name, size=None, mode=0o600, create=True):
        self.name = name
        self.requested_size = size
        self.mode = mode
        self.create = create
        self.size = 0
        self.created = False
        self.handle = ffi.new("struct dmb_handle *")
        self._map = None
        self._base = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self):
        try:
            shm = self._shm_open()
        except ValueError:
            # posix_ipc's "Invalid parameter(s)": the name is a directory.
            raise self._not_a_segment_error() from None
        if not stat.S_ISREG(os.fstat(shm.fd).st_mode):
            shm.close_fd()
            raise self._not_a_segment_error()
        try:
            fcntl.flock(shm.fd, fcntl.LOCK_EX)
            size = os.fstat(shm.fd).st_size
            if not self.create and size == 0:
                raise self._unformatted_error()
            if self.created and size != 0:
                # Another opener took the lock between our create and ours,
                # and formatted the object: it may be in use already, so
                # attach to it instead of formatting it again.
                self.created = False
            if size == 0:
                self._format(shm.fd)
            else:
                self._attach(shm.fd, size)
        finally:
            # Unlock explicitly: the mapping holds a dup of the descriptor,
            # which would keep the flock alive after close.
            fcntl.flock(shm.fd, fcntl.LOCK_UN)
            shm.close_fd()

    def _shm_open(self):
        """Open the object, making it if it does not exist."""
        if not self.create:
            return self._shm_open_existing()
        try:
            shm = posix_ipc.SharedMemory(
                self.name, posix_ipc.O_CREX, mode=self.mode, size=0
            )
            self.created = True
            os.fchmod(shm.fd, self.mode)  # the umask must not narrow it
            return shm
        except posix_ipc.ExistentialError:
            pass
        except posix_ipc.PermissionsError as exc:
            raise self._permission_error(exc) from None
        try:
            return posix_ipc.SharedMemory(self.name, 0)
        except posix_ipc.PermissionsError as exc:
            raise self._permission_error(exc) from None
        except posix_ipc.ExistentialError:
            # Removed between our two calls: start again.
            return self._shm_open()

    def _shm_open_existing(self):
        try:
            return posix_ipc.SharedMemory(self.name, 0)
        except posix_ipc.PermissionsError as exc:
            raise self._permission_error(exc) from None
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(
                errno.ENOENT, f"no such segment {self.name!r}", segment_path(self.name)
            ) from None

    def _not_a_segment_error(self):
        path = segment_path(self.name)
        try:
            kind = _FILE_KINDS.get(stat.S_IFMT(os.lstat(path).st_mode), "not a file")
        except OSError:
            kind = "not a file"
        return SegmentError(
            f"{path} is a {kind}, not a shared-memory segment, so segment "
            f"{self.name!r} cannot be made there; remove it, or give the "
            f"layer another CONFIG 'prefix'"
        )

    def _unformatted_error(self):
        return SegmentError(
            f"segment {self.name!r} was never initialised (its maker died, or "
            f"it was made by hand); the next process that opens it as a layer "
            f"formats it"
        )

    def _permission_error(self, exc):
        return SegmentError(
            f"cannot open segment {self.name!r}: {exc}; it belongs to another "
            f"user or its mode ({segment_path(self.name)}) does not let this "
            f"user in; see the 'mode' option"
        )

    def _format(self, fd):
        """Size, reserve and initialise the object (we hold its flock)."""
        size = self.requested_size
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if self.created:
                unlink_segment(self.name)
            raise SegmentError(
                f"cannot reserve {size} bytes for segment {self.name!r} in "
                f"{SHM_DIR}: {exc.strerror}; lower CONFIG 'size' or give "
                f"{SHM_DIR} more room (for Docker: --shm-size)"
            ) from None
        self._map_segment(fd, size)
        rc = lib.dmb_init(self.handle, self._base, size, time.time_ns())
        if rc != 0:
            raise SegmentError(f"cannot initialise segment {self.name!r} ({rc})")
        self.size = size
        logger.debug("created segment %s of %d bytes", self.name, size)

    def _attach(self, fd, mapped):
        self._map_segment(fd, mapped)
        rc = lib.dmb_attach(self.handle, self._base, mapped)
        if rc == lib.DMB_ERR_UNINIT and not self.create:
            raise self._unformatted_error()
        if rc == lib.DMB_ERR_UNINIT:
            # All zero: its maker died before formatting it, or it was made
            # by hand.  Nobody can be using it, so format it afresh.
            self._unmap()
            logger.warning("segment %s was never initialised; formatting it",
                           self.name)
            self._format(fd)
            return
        if rc != 0:
            raise self._attach_error(rc, mapped)
        self.size = lib.dmb_header_size(self._base, mapped)
        if self.create and self.size != self.requested_size:
            logger.warning(
                "segment %s already exists with %d bytes; CONFIG size %d is "
                "ignored until the segment is removed",
                self.name,
                self.size,
                self.requested_size,
            )

    def _attach_error(self, rc, mapped):
        remove = (
            f"remove it with `python -m dmb.inspect --unlink --force "
            f"--name {self.name}` or `rm {segment_path(self.name)}` once no "
            f"process uses it"
        )
        if rc == lib.DMB_ERR_VERSION:
            found = lib.dmb_header_version(self._base, mapped)
            if found == LAYOUT_VERSION:  # the version matches, the block size not
                return SegmentError(
                    f"segment {self.name!r} has layout version {found} but "
                    f"another block size than this dmb's "
                    f"({lib.DMB_BLOCK_SIZE} bytes): made by another build of "
                    f"dmb, or damaged; {remove}"
                )
            return SegmentError(
                f"segment {self.name!r} has layout version {found}, this dmb "
                f"uses {LAYOUT_VERSION} (made by another dmb version); {remove}"
            )
        if rc == lib.DMB_ERR_MAGIC:
            return SegmentError(
                f"{self.name!r} exists but is not a dmb segment; {remove}"
            )
        if rc == lib.DMB_ERR_SIZE:
            return SegmentCorrupt(
                f"segment {self.name!r} is truncated: its header says "
                f"{lib.dmb_header_size(self._base, mapped)} bytes but only "
                f"{mapped} exist; {remove}"
            )
        return SegmentCorrupt(f"segment {self.name!r} is damaged ({rc}); {remove}")

    def _map_segment(self, fd, size):
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        self._base = ffi.from_buffer(self._map)

    def _unmap(self):
        if self._base is not None:
            ffi.release(self._base)
            self._base = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self):
        """Drop this process's mapping.  The segment stays for the others."""
        self._unmap()

    def unlink(self):
        """Remove the segment's name (see ``unlink_segment``)."""
        return unlink_segment(self.name)

    @property
    def closed(self):
        return self._map is None

    def __repr__(self):
        return f"<Segment {self.name} {self.size} bytes>"

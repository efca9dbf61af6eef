"""POSIX shared-memory segments in /dev/shm, mapped zero-copy as torch tensors.

Not `multiprocessing.shared_memory`: its resource tracker (Python 3.11) unlinks a segment when the
*attaching* process exits and warns about "leaked" segments it never created, so a worker that
exits would delete the arena's weights under everyone else. Here only the owner unlinks, explicitly.

A segment's life:
  create    the owner makes /dev/shm/<name> (O_EXCL, mode 0600), sizes it and allocates every page
            up front (posix_fallocate), so a full /dev/shm fails here with ENOSPC, never later as
            a SIGBUS in a worker that touches a page
  attach    a process of the same user opens it by name (the file's owner uid is checked) and maps
            it MAP_SHARED, writable or read-only
  tensor    a flat torch.uint8 tensor over the mapping (torch.frombuffer: zero copy); a write
            through one process's tensor is seen by every process that maps the segment
  close     drops this handle; the mapping itself lives until the last tensor over it is freed
            (the tensors keep the mmap object alive, so they can never point at unmapped memory)
  rename    another name for the same memory (a restarted arena takes over its predecessor's:
            services.arena.segments); mappings are unaffected
  unlink    the name disappears; processes that still map it keep their memory until they unmap

Owner pids live in the names. A stack's segments are named `<prefix><owner pid>-<kind>` (see
`owned_name`, e.g. `duoserve-s1-4242-weights`), so `reclaim_segments(prefix)` can unlink the segments
of owners that died without cleaning up (SIGKILL, OOM) without any sidecar file. A dead pid reused
by an unrelated process makes reclaim keep that segment (a leak, never the deletion of a live one);
/dev/shm is emptied at reboot anyway.
"""
from __future__ import annotations

import errno
import mmap
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")
_OWNED_SUFFIX = re.compile(r"(\d+)-([a-z][a-z0-9_]*)")        # "<pid>-<kind>" after the prefix


def _path(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid shared-memory segment name {name!r}: letters, digits, '_', '.', '-' only")
    return str(SHM_DIR / name)


@dataclass(eq=False)
class Segment:
    """One mapped segment. `tensor()` views it; `close()` releases this handle (not the name)."""

    name: str
    size: int                                   # bytes
    writable: bool
    _mmap: mmap.mmap | None = field(repr=False, default=None)

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def tensor(self) -> torch.Tensor:
        """A flat uint8 tensor [size] over the mapping: zero copy, shared with every other mapper."""
        if self._mmap is None:
            raise ValueError(f"segment {self.name} is closed")
        if self.writable:
            return torch.frombuffer(self._mmap, dtype=torch.uint8)
        # A read-only mapping is exactly what we want for the weights (a stray write faults instead of
        # corrupting every worker's model); torch warns that it cannot mark the tensor read-only.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            return torch.frombuffer(self._mmap, dtype=torch.uint8)

    def close(self) -> None:
        """Release this handle. Never munmap explicitly: `mmap.close()` succeeds even while tensors made
        by `tensor()` still point into the mapping (torch does not hold a buffer export), and they would
        then read unmapped memory. Dropping our reference leaves the unmap to the last tensor's free."""
        self._mmap = None

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_segment(name: str, size: int) -> Segment:
    """A new segment of `size` zeroed bytes, owned by this user only; fails if `name` exists."""
    if size < 1:
        raise ValueError(f"segment size must be at least 1 byte, got {size}")
    path = _path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                free = os.statvfs(SHM_DIR)
                raise OSError(errno.ENOSPC, f"{SHM_DIR} has {free.f_bavail * free.f_frsize} bytes free, segment "
                                            f"{name} needs {size}: grow /dev/shm or shrink the KV budget") from e
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        # MAP_POPULATE: the owner maps every page now, so its RSS/PSS shows what the segment holds.
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)                            # the mapping keeps its own reference to the file
    return Segment(name, size, True, mapping)


def attach_segment(name: str, writable: bool = True) -> Segment:
    """Map an existing segment created by this same user (its owner uid is checked)."""
    path = _path(name)
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(f"{path} is not a regular file")
        if st.st_uid != os.getuid():
            raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()}): refusing it")
        if st.st_size < 1:
            raise ValueError(f"{path} is empty")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mapping = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=prot)
    finally:
        os.close(fd)
    return Segment(name, st.st_size, writable, mapping)


def unlink_segment(name: str) -> bool:
    """Remove the name; False when it was already gone. Mappings elsewhere stay valid until unmapped."""
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        return False
    return True


def rename_segment(old: str, new: str) -> None:
    """Give a segment another name: the same memory, so every process mapping it keeps it. Refuses
    to replace an existing segment."""
    new_path = _path(new)
    if os.path.lexists(new_path):
        raise FileExistsError(f"{new_path} exists: not replacing it with {old}")
    os.rename(_path(old), new_path)


def list_segments(prefix: str) -> list[str]:
    """Names of the segments in /dev/shm that start with `prefix`, sorted."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix) and _NAME.fullmatch(n))


# ---------------------------------------------------------------------------------------------- owners

def owned_name(prefix: str, kind: str, pid: int | None = None) -> str:
    """`<prefix><pid>-<kind>`: the name of a segment owned by `pid` (default: this process)."""
    name = f"{prefix}{os.getpid() if pid is None else pid}-{kind}"
    if not _OWNED_SUFFIX.fullmatch(name[len(prefix):]):
        raise ValueError(f"segment kind {kind!r} must be lower-case letters, digits and '_'")
    _path(name)
    return name


def segment_owner(name: str, prefix: str) -> int | None:
    """The owner pid encoded in a name made by `owned_name(prefix, ...)`; None for any other name."""
    if not name.startswith(prefix):
        return None
    match = _OWNED_SUFFIX.fullmatch(name[len(prefix):])
    return int(match.group(1)) if match else None


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie counts as dead: it will never clean up)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                             # someone else's process: alive
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def reclaim_segments(prefix: str) -> list[str]:
    """Unlink the segments under `prefix` whose owner pid is dead; return their names.

    Segments of live owners, and names that do not follow `owned_name`, are left alone.
    """
    reclaimed = []
    for name in list_segments(prefix):
        pid = segment_owner(name, prefix)
        if pid is not None and not pid_alive(pid) and unlink_segment(name):
            reclaimed.append(name)
    return reclaimed

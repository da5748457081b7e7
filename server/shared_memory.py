"""Triton's system shared-memory extension: the region registry and the one place a tensor is placed in one.

A local client puts a tensor into a POSIX shared-memory object (/dev/shm/<key>), registers the object
(or a window of it) under a name, and then names that region, an offset and a byte size in an input's
or requested output's parameters instead of sending the bytes. The tensor then crosses no socket,
protobuf or gRPC buffer: an input is read from the object with pread (one copy, a memcpy from the page
cache), and an output is written into it with pwrite (its response entry stays empty, as Triton's).

Safety, since the other end of a region is another process that may truncate, grow or rewrite the
object at any moment:
- the server never maps a region. A mapped page past the end of a truncated object raises SIGBUS in
  whatever thread touches it, and no check before the access can close that window (the owner may
  truncate between the check and the access), so a hostile local client could kill the server. pread
  and pwrite on the object's descriptor cannot fault: a read past the end returns fewer bytes, which is
  INVALID_ARGUMENT naming the region;
- keys are shm_open names ("/name": one component, no "..") resolved under /dev/shm only, opened with
  O_NOFOLLOW and required to be regular files, so a key cannot reach any other file;
- a region's window (offset, byte_size) must lie inside the object when registered, and every use
  (offset, byte size within the region) is checked against the window; an output is not written into
  an object that has shrunk below it (fstat first; a truncation racing that check only makes the write
  grow the object back, which the owner's own truncation invited);
- unregistering (or shutdown) closes the descriptor once no request is reading or writing through it,
  so a descriptor number is never reused under a request.
The data itself is the client's: a client that rewrites its object while a request reads it gets the
answer to whatever bytes were read.

`tensor_source` and `output_target` read the protocol parameters as Python values, so the gRPC
binding and the REST binding resolve them the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from server.errors import InferError, echo, invalid, not_found

SHM_ROOT = Path("/dev/shm")
REGISTRY_DIR_ENV = "CNNSERVE_SHM_REGISTRY"  # set by the --workers supervisor for its workers
REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


class Region:
    """A registered window of a shared-memory object, read and written through its descriptor."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self._fd = fd
        self._users = 0  # requests reading or writing through _fd now
        self._cond = threading.Condition()
        self.closed = False

    def check(self, offset: int, byte_size: int, what: str) -> int:
        """The object offset of [offset, offset + byte_size) of this region; INVALID_ARGUMENT outside it."""
        if offset < 0 or byte_size < 0 or offset + byte_size > self.byte_size:
            raise invalid(
                f"{what}: {OFFSET} {offset} + {BYTE_SIZE} {byte_size} exceeds shared memory region "
                f"{echo(self.name)} of {self.byte_size} bytes"
            )
        return self.offset + offset

    @contextmanager
    def _descriptor(self, what: str) -> Iterator[int]:
        with self._cond:
            if self.closed:  # unregistered while this request was on its way
                raise invalid(f"{what}: shared memory region {echo(self.name)} was unregistered")
            self._users += 1
        try:
            yield self._fd
        finally:
            with self._cond:
                self._users -= 1
                if self.closed and not self._users:
                    os.close(self._fd)

    def _shrank(self, what: str, size: int, start: int, end: int) -> InferError:
        return invalid(
            f"{what}: shared memory object {echo(self.key)} shrank to {size} bytes after region "
            f"{echo(self.name)} was registered; it no longer holds bytes [{start}, {end})"
        )

    def read(self, offset: int, byte_size: int, what: str) -> memoryview:
        """A copy of the bytes [offset, offset + byte_size) of this region (see the module docstring)."""
        start = self.check(offset, byte_size, what)
        with self._descriptor(what) as fd:
            # os.pread into a fresh bytes: no zero-filled buffer first (a bytearray's memset doubles the
            # cost of a 600 KB read). A single read stops at 2 GiB; an empty one is the object's end.
            parts = [os.pread(fd, byte_size, start)]
            done = len(parts[0])
            while done < byte_size:
                part = os.pread(fd, byte_size - done, start + done)
                if not part:
                    raise self._shrank(what, os.fstat(fd).st_size, start, start + byte_size)
                parts.append(part)
                done += len(part)
        return memoryview(parts[0] if len(parts) == 1 else b"".join(parts))

    def write(self, offset: int, data: memoryview, what: str) -> None:
        """`data` into the region at `offset` (checked against the region and the object's size now)."""
        start = self.check(offset, len(data), what)
        end = start + len(data)
        done = 0
        with self._descriptor(what) as fd:
            size = os.fstat(fd).st_size
            if end > size:
                raise self._shrank(what, size, start, end)
            while done < len(data):
                done += os.pwrite(fd, data[done:], start + done)

    def close(self) -> None:
        with self._cond:
            if self.closed:
                return
            self.closed = True
            if not self._users:  # otherwise the last request using it closes it
                os.close(self._fd)


def _open(name: str, key: str, offset: int, byte_size: int, path: Path) -> Region:
    """Open a key's object after checking it (the window must lie inside it)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise invalid(f"shared memory key {echo(key)}: cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise invalid(f"shared memory key {echo(key)}: {path} is not a shared-memory object")
        if offset + byte_size > st.st_size:
            raise invalid(
                f"shared memory region {echo(name)}: offset {offset} + byte_size {byte_size} "
                f"exceeds {echo(key)} of {st.st_size} bytes"
            )
    except BaseException:
        os.close(fd)
        raise
    return Region(name, key, offset, byte_size, fd)


class SharedMemoryRegistry:
    """The server's registered regions by name (one registry per process, shared by every binding).

    With `shared_dir` (the --workers supervisor's, see `process_registry`) registrations are shared by
    all worker processes: a client's connections may reach different workers (perf_analyzer opens
    several), so a region registered through one must be usable through all. Each registration is a
    small file there (written once, atomically); a worker opens a region the first time a request names
    it, and on every use checks that the registration file is still the one it opened (one stat), so an
    unregister or re-register through another worker takes effect everywhere.
    """

    def __init__(self, shared_dir: Path | None = None) -> None:
        self._regions: dict[str, Region] = {}
        self._tokens: dict[str, int] = {}  # name -> inode of the registration file opened (shared mode)
        self._lock = threading.Lock()  # register/unregister may come from worker threads of a binding
        self.shared_dir = shared_dir
        if shared_dir is not None:
            shared_dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def path_of(key: str) -> Path:
        """The /dev/shm file a shm_open key names; INVALID_ARGUMENT for anything that would leave it."""
        name = key[1:] if key.startswith("/") else key
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise invalid(
                f"shared memory key {echo(key)} is not a POSIX shared-memory name: expected "
                f"'/name' (one component under {SHM_ROOT}, no '/' inside)"
            )
        return SHM_ROOT / name

    @staticmethod
    def _record(shared_dir: Path, name: str) -> Path:
        # Any region name maps to a fixed-length file name.
        return shared_dir / (hashlib.sha256(name.encode()).hexdigest() + ".json")

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise invalid("shared memory region name must not be empty")
        if byte_size <= 0:
            raise invalid(f"shared memory region {echo(name)}: byte_size must be positive, got {byte_size}")
        path = self.path_of(key)
        exists = InferError(grpc.StatusCode.ALREADY_EXISTS, f"shared memory region {echo(name)} is already registered")
        with self._lock:
            if name in self._regions and self.shared_dir is None:
                raise exists
            region = _open(name, key, offset, byte_size, path)
            if self.shared_dir is not None:
                record = self._record(self.shared_dir, name)
                tmp = record.with_suffix(f".{os.getpid()}.tmp")
                try:
                    tmp.write_text(json.dumps({"name": name, "key": key, "offset": offset, "byte_size": byte_size}))
                    os.link(tmp, record)  # atomic and exclusive: the first registration of a name wins
                    token = record.stat().st_ino
                except FileExistsError:
                    region.close()
                    raise exists from None
                except BaseException:  # e.g. the directory's disk is full: the descriptor must not leak
                    region.close()
                    raise
                finally:
                    tmp.unlink(missing_ok=True)
                self._forget(name)
                self._tokens[name] = token
            self._regions[name] = region

    def _forget(self, name: str) -> None:
        region = self._regions.pop(name, None)
        self._tokens.pop(name, None)
        if region is not None:
            region.close()

    def unregister(self, name: str = "") -> None:
        """Release one region, or every region when `name` is empty (Triton: unknown names are a no-op)."""
        with self._lock:
            if self.shared_dir is not None:
                records = [self._record(self.shared_dir, name)] if name else list(self.shared_dir.glob("*.json"))
                for r in records:
                    r.unlink(missing_ok=True)
            for n in [name] if name else list(self._regions):
                self._forget(n)

    @staticmethod
    def _shared_records(shared_dir: Path) -> list[dict]:
        out = []
        for r in shared_dir.glob("*.json"):
            try:
                out.append(json.loads(r.read_text()))
            except FileNotFoundError:  # unregistered meanwhile
                continue
        return out

    def status(self, name: str = "") -> list[RegionStatus]:
        if self.shared_dir is not None:
            found = [RegionStatus(**r) for r in self._shared_records(self.shared_dir) if not name or r["name"] == name]
        else:
            with self._lock:
                found = [
                    RegionStatus(r.name, r.key, r.offset, r.byte_size)
                    for r in self._regions.values()
                    if not name or r.name == name
                ]
        if name and not found:
            raise not_found(f"shared memory region {echo(name)} is not registered")
        return found

    def get(self, name: str, what: str) -> Region:
        missing = invalid(f"{what}: shared memory region {echo(name)} is not registered")
        if self.shared_dir is None:
            region = self._regions.get(name)
            if region is None:
                raise missing
            return region
        record = self._record(self.shared_dir, name)
        with self._lock:
            try:
                token = record.stat().st_ino
            except FileNotFoundError:
                self._forget(name)  # unregistered through another worker
                raise missing from None
            if self._tokens.get(name) == token:
                return self._regions[name]
            self._forget(name)  # first use here, or re-registered since it was opened
            try:
                r = json.loads(record.read_text())
            except FileNotFoundError:
                raise missing from None
            region = _open(name, r["key"], r["offset"], r["byte_size"], self.path_of(r["key"]))
            self._regions[name], self._tokens[name] = region, token
            return region

    def close(self) -> None:
        """Close this process's regions (registrations in a shared directory stay for the other workers)."""
        with self._lock:
            for n in list(self._regions):
                self._forget(n)

    def __len__(self) -> int:
        return len(self._regions)


def process_registry() -> SharedMemoryRegistry:
    """This process's registry: shared with the other workers when a --workers supervisor set the directory."""
    shared = os.environ.get(REGISTRY_DIR_ENV)
    return SharedMemoryRegistry(Path(shared) if shared else None)


def _placement(registry: SharedMemoryRegistry, params: Mapping[str, Any], what: str) -> tuple[Region, int, int] | None:
    """(region, offset, byte_size) a tensor's parameters name, or None when they name no region."""
    if REGION not in params:
        for p in (OFFSET, BYTE_SIZE):
            if p in params:
                raise invalid(f"{what}: parameter '{p}' given without '{REGION}'")
        return None
    region = params[REGION]
    if not isinstance(region, str) or not region:
        raise invalid(f"{what}: parameter '{REGION}' must be a non-empty string")
    if BYTE_SIZE not in params:
        raise invalid(f"{what}: parameter '{BYTE_SIZE}' is required with '{REGION}'")
    values = []
    for p in (OFFSET, BYTE_SIZE):
        v = params.get(p, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise invalid(f"{what}: parameter '{p}' must be a non-negative integer, got {v!r}")
        values.append(v)
    return registry.get(region, what), values[0], values[1]


def tensor_source(registry: SharedMemoryRegistry, name: str, params: Mapping[str, Any]) -> memoryview | None:
    """An input's bytes read from shared memory (a read-only view of the copy), or None when it names no
    region.

    The view's length is the request's `shared_memory_byte_size`; the request path then checks it
    against the size the input's datatype and shape need, like any raw contents."""
    what = f"input '{name}'"
    placed = _placement(registry, params, what)
    if placed is None:
        return None
    region, offset, byte_size = placed
    return region.read(offset, byte_size, what)


@dataclass(frozen=True)
class OutputTarget:
    """Where a requested output goes: a checked region window, re-checked when written."""

    name: str
    region: Region
    offset: int
    byte_size: int

    def write(self, data: bytes | memoryview) -> int:
        """Copy an output's raw bytes (the protocol's form: server.dataplane.tensors.raw_view) into the
        region; returns bytes written."""
        what = f"output '{self.name}'"
        if len(data) > self.byte_size:
            raise invalid(
                f"{what}: result of {len(data)} bytes does not fit {BYTE_SIZE} {self.byte_size} "
                f"of shared memory region {echo(self.region.name)}"
            )
        self.region.write(self.offset, memoryview(data), what)
        return len(data)


def output_target(registry: SharedMemoryRegistry, name: str, params: Mapping[str, Any]) -> OutputTarget | None:
    """A requested output's region (bounds checked now and again when written), or None."""
    what = f"requested output '{name}'"
    placed = _placement(registry, params, what)
    if placed is None:
        return None
    region, offset, byte_size = placed
    region.check(offset, byte_size, what)  # refuse a bad window before the model runs
    return OutputTarget(name, region, offset, byte_size)

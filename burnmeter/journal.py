"""A local write-ahead journal of settlements: what the proxy owes the store.

The response hook appends each ``Settlement`` here before the response ends; one writer
thread applies them to the store and then advances the checkpoint. Records past the
checkpoint are replayed after a crash or a store outage, and ``Store.settle`` is
idempotent by request id, so a record applied twice is charged once. Whenever the journal
is unsure what was applied (a lost or damaged checkpoint), it replays rather than skips.

Durability: each record is one ``os.write`` on an ``O_APPEND`` descriptor, so it is in the
page cache once ``append`` returns and survives the process being killed (SIGKILL, OOM).
Power loss or a kernel crash is covered only with ``fsync=True``: ``append`` then returns
a future that is done once an fsync covered the record. One syncer thread runs the fsyncs
(group commit): every record appended while one fsync runs shares the next, so a burst of
settlements costs about two fsyncs, not one each, and the event loop never waits on the disk.

A write that fails (a full disk, an I/O error) raises ``JournalError`` and marks the journal
``failing`` until a write succeeds again; ``probe`` tries one (a block written past the
end and cut off again), so that a caller can refuse work instead of taking it unjournaled.
A failed fsync marks it failing too, and the records it covered get a ``JournalError``.

A torn last line can only come from dying inside that write, i.e. before ``append``
returned: the response hook had not finished, so the end of the response never reached
the client. Opening the journal cuts such a line off. Its hold stays in the store until
the writer's sweep releases it.

The file layout is JSON lines, each carrying its format version (``FORMAT_VERSION``;
``docs/formats.md`` describes every version); ``path + ".checkpoint"`` holds the byte
offset up to which records are applied (or fewer: ``advance(persist=False)`` lets it lag,
which only replays applied records), and ``fcntl.flock`` on the journal makes it one
process's.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import threading
from concurrent.futures import Future
from datetime import datetime
from decimal import Decimal
from typing import Any
from typing import NoReturn

import orjson

from burnmeter.documents import key_ref
from burnmeter.exceptions import JournalError
from burnmeter.exceptions import JournalFull
from burnmeter.exceptions import JournalLocked
from burnmeter.store.base import Settlement
from burnmeter.text import encodable_tree

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
FORMAT_VERSION = 2
"""The record format this version writes (key ``v``). Version 1 had no ``v`` key and the
same fields; a newer process reads every older version."""
PROBE_BYTES = 4096
"""What ``probe`` writes (and cuts off again): room for about one record."""
MEMORY_RECORDS = 10_000
"""Records past the checkpoint also kept in memory, so the writer does not decode them."""
_READ_CHUNK = 64 * 1024


# -- one place for the record format ------------------------------------------------------


def to_json(settlement: Settlement) -> str:
    """One line (without the newline): Decimal as a string, datetimes as ISO 8601."""
    return encode_record(settlement).decode("utf-8")


def encode_record(settlement: Settlement) -> bytes:
    """``to_json`` as UTF-8 bytes, the journal's own line.

    orjson writes it (a tenth of the stdlib's time, the same bytes); what orjson refuses
    goes through the stdlib: a lone surrogate (every string is then made encodable: a
    record the journal cannot encode would be a request nobody is charged for), an integer
    past 64 bits, a key that is not a string. orjson would write a NaN as null: the log
    documents hold none (``request_log``: integers, strings, Decimal, datetime)."""
    record = {
        "request_id": settlement.request_id,
        "user_id": settlement.user_id,
        "pool": settlement.pool,
        "cost": str(settlement.cost),
        "billing_tokens": settlement.billing_tokens,
        "input_tokens": settlement.input_tokens,
        "output_tokens": settlement.output_tokens,
        # never a raw key on disk: legacy user_keys ids are raw keys (the store maps back)
        "key_doc_id": key_ref(settlement.key_doc_id) if settlement.key_doc_id else None,
        "log": settlement.log,
        "v": FORMAT_VERSION,  # last: a record's line starts with its request_id
    }
    try:
        return orjson.dumps(record, default=_tag, option=orjson.OPT_PASSTHROUGH_DATETIME)
    except orjson.JSONEncodeError:
        pass
    return json.dumps(
        encodable_tree(record),
        default=_tag,
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")


def from_json(text: str | bytes) -> Settlement:
    """A record of any format version up to ``FORMAT_VERSION``; a newer one is a
    ``ValueError`` (set aside, never guessed at)."""
    raw = json.loads(text, object_hook=_untag)
    version = raw.get("v", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"journal record format {version!r}: this burnmeter reads 1 to {FORMAT_VERSION}"
        )
    return Settlement(
        request_id=raw["request_id"],
        user_id=raw["user_id"],
        pool=raw["pool"],
        cost=Decimal(raw["cost"]),
        billing_tokens=raw["billing_tokens"],
        input_tokens=raw["input_tokens"],
        output_tokens=raw["output_tokens"],
        key_doc_id=raw["key_doc_id"],
        log=raw["log"],
    )


def _tag(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime):
        return {"$date": value.isoformat()}
    raise TypeError(f"cannot journal a {type(value).__name__}")


def _untag(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        if "$decimal" in obj:
            return Decimal(obj["$decimal"])
        if "$date" in obj:
            return datetime.fromisoformat(obj["$date"])
    return obj


# -- the file -------------------------------------------------------------------------------
DURABLE: Future[None] = Future()
"""What ``append`` returns when the journal does not fsync: nothing to wait for."""
DURABLE.set_result(None)


class Journal:
    """Append from any thread (the event loop); ``pending``/``advance`` from one consumer."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES, *, fsync: bool = False):
        self.path = path
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._checkpoint_path = path + ".checkpoint"
        self._lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()  # the writer's advance vs close
        self.set_aside_count = 0
        """Records this object moved to ``path + ".rejected"``."""

        self.failing: str | None = None
        """Why the last write failed; None once a write succeeded."""
        self.fsyncs = 0
        """fsyncs the syncer ran (each covers every record appended before it started)."""
        self._unsynced: list[Future[None]] = []
        self._sync_wanted = threading.Condition(self._lock)
        self._syncer: threading.Thread | None = None
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalLocked(f"{path}: journal is in use by another burnmeter process") from None
        try:
            self._size = self._cut_torn_tail(os.fstat(self._fd).st_size)
            self._checkpoint = self._read_checkpoint()
            # The records past the checkpoint: end offset and, for those appended by this
            # process, the settlement itself (the writer need not read back and decode it).
            self._ends: collections.deque[tuple[int, Settlement | None]] = collections.deque(
                (end, None) for end in self._line_ends()
            )
        except BaseException:
            os.close(self._fd)
            raise
        if fsync:
            self._syncer = threading.Thread(
                target=self._sync_loop, name="burnmeter-journal-fsync", daemon=True
            )
            self._syncer.start()

    # -- producer side (event loop) ------------------------------------------------------
    def append(self, settlement: Settlement) -> Future[None]:
        """Write one record; the future is done once it is durable (at once without fsync),
        or holds a ``JournalError`` if the fsync that covered it failed."""
        line = encode_record(settlement) + b"\n"
        with self._lock:
            if self._fd < 0:
                raise JournalError(f"{self.path}: journal is closed")
            if self._size + len(line) > self.max_bytes:
                raise JournalFull(f"{self.path}: journal is full ({self._size} bytes)")
            written = self._write(line)
            self._size += written
            # past MEMORY_RECORDS (a long outage), the writer reads them back from the file
            kept = settlement if len(self._ends) < MEMORY_RECORDS else None
            self._ends.append((self._size, kept))
            if not self.fsync:
                return DURABLE
            synced: Future[None] = Future()
            self._unsynced.append(synced)
            self._sync_wanted.notify()
            return synced

    def probe(self) -> bool:
        """True if the journal can be written: at once while no write has failed, else
        after writing ``PROBE_BYTES`` past the end (then cut off again) succeeded."""
        if self.failing is None:
            return True
        with self._lock:
            if self._fd < 0:
                return False
            try:
                self._write(b" " * PROBE_BYTES)  # blanks: a torn tail if we die now
                if self.fsync:
                    os.fsync(self._fd)
            except JournalError:
                return False
            except OSError as e:
                self.failing = f"cannot fsync: {e}"
                self._undo_partial_write()
                return False
            self._undo_partial_write()
        logger.info("%s: writable again", self.path)
        return True

    # -- consumer side (the writer thread) -----------------------------------------------
    @property
    def backlog(self) -> int:
        """Records appended but not yet applied."""
        return len(self._ends)

    @property
    def size(self) -> int:
        return self._size

    def pending(self, limit: int) -> list[tuple[int, Settlement]]:
        """Up to ``limit`` records past the checkpoint, each with its end offset."""
        with self._lock:
            start, end = self._checkpoint, self._size
            fresh: list[tuple[int, Settlement]] = []
            for offset, settlement in self._ends:
                if settlement is None or len(fresh) == limit:
                    break
                fresh.append((offset, settlement))
        if fresh:
            return fresh
        out: list[tuple[int, Settlement]] = []
        offset = start
        buf = b""
        while len(out) < limit and offset + len(buf) < end:
            buf += os.pread(self._fd, min(_READ_CHUNK, end - offset - len(buf)), offset + len(buf))
            while len(out) < limit and (nl := buf.find(b"\n")) >= 0:
                line, buf = buf[:nl], buf[nl + 1 :]
                offset += nl + 1
                try:
                    out.append((offset, from_json(line)))
                except (ValueError, KeyError, TypeError, ArithmeticError, RecursionError) as e:
                    if out:  # apply what precedes it first; it is set aside on the next call
                        return out
                    self._reject(line, offset, e)
        return out

    def advance(self, offset: int, *, persist: bool = True) -> None:
        """Records up to ``offset`` are applied: persist that, and empty a caught-up journal.

        With ``persist=False`` the checkpoint file may lag behind (until a later advance or
        ``close``): a crash then replays records already applied, which is harmless. The
        file is written outside the lock, so that an ``append`` on the event loop never
        waits for it; a caught-up journal whose checkpoint already reads 0 is truncated
        without writing it."""
        with self._lock:
            if self._fd < 0:
                raise JournalError(f"{self.path}: journal is closed")
            caught_up = offset == self._size
        if caught_up:
            # Checkpoint 0 first: dying before the truncation replays applied records
            # (harmless) instead of skipping unapplied ones; 0 is never wrong to persist.
            self._persist_checkpoint(0)
        with self._lock:
            if self._fd < 0:
                raise JournalError(f"{self.path}: journal is closed")
            while self._ends and self._ends[0][0] <= offset:
                self._ends.popleft()
            if offset == self._size:
                os.ftruncate(self._fd, 0)
                self._size = self._checkpoint = 0
                return
            self._checkpoint = offset  # records were appended meanwhile: keep them
        if persist:
            self._persist_checkpoint(offset)

    def set_aside(self, end: int, settlement: Settlement, error: Exception) -> None:
        """A record the store cannot apply: moved to ``path + ".rejected"`` so that the rest
        go on; every record before it must be applied already (this advances past it)."""
        line = encode_record(settlement)
        self._reject(line, end, error, "record the store cannot apply")

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._sync_wanted.notify()
        if self._syncer is not None:
            self._syncer.join()  # it syncs what is left first: the fd must outlive it
        if self._fd >= 0 and self._checkpoint != (self._persisted_checkpoint or 0):
            self._persist_checkpoint(self._checkpoint)  # what ``persist=False`` left behind
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)  # also releases the flock
                self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    _closing = False
    _persisted_checkpoint: int | None = None
    """What the checkpoint file reads as (None: missing, unreadable, not trusted)."""

    def _sync_loop(self) -> None:
        """The syncer: one fsync for every record appended since the last one started."""
        while True:
            with self._lock:
                while not self._unsynced and not self._closing:
                    self._sync_wanted.wait()
                if not self._unsynced:
                    return
                covered, self._unsynced = self._unsynced, []
            try:
                os.fsync(self._fd)
            except OSError as e:
                error = self._fsync_failed(f"cannot fsync: {e}")
                for synced in covered:
                    synced.set_exception(error)
                continue
            self.fsyncs += 1
            for synced in covered:
                synced.set_result(None)

    def _fsync_failed(self, why: str) -> JournalError:
        """The records are written but maybe not durable: refuse work until a probe succeeds."""
        with self._lock:
            if self.failing is None:
                logger.error(
                    "%s: %s: refusing new requests until it can be written", self.path, why
                )
            self.failing = why
        return JournalError(f"{self.path}: {why}")

    def _write(self, data: bytes) -> int:
        """Append ``data`` whole or not at all (under the lock); records why it failed."""
        try:
            written = os.write(self._fd, data)
        except OSError as e:
            self._failed(f"cannot append: {e}")
        if written != len(data):  # e.g. the disk is full
            self._failed(f"short write ({written}/{len(data)} bytes)")
        self.failing = None
        return written

    def _failed(self, why: str) -> NoReturn:
        if self.failing is None:
            logger.error("%s: %s: refusing new requests until it can be written", self.path, why)
        self.failing = why
        try:
            self._undo_partial_write()
        except OSError:
            pass  # the next write starts past the torn bytes; opening cuts them off
        raise JournalError(f"{self.path}: {why}")

    def _undo_partial_write(self) -> None:
        os.ftruncate(self._fd, self._size)

    def _cut_torn_tail(self, size: int) -> int:
        end = size
        while end > 0:
            start = max(0, end - _READ_CHUNK)
            nl = os.pread(self._fd, end - start, start).rfind(b"\n")
            if nl >= 0:
                end = start + nl + 1
                break
            end = start
        if end != size:
            logger.warning("%s: dropped a torn last record (%d bytes)", self.path, size - end)
            os.ftruncate(self._fd, end)
        return end

    def _read_checkpoint(self) -> int:
        try:
            with open(self._checkpoint_path, encoding="ascii") as f:
                offset = int(f.read())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            logger.warning("%s: unreadable checkpoint (%s): replaying the journal", self.path, e)
            return 0
        at_line_start = offset == 0 or (
            0 < offset <= self._size and os.pread(self._fd, 1, offset - 1) == b"\n"
        )
        if not at_line_start:
            logger.warning("%s: checkpoint %d does not match: replaying", self.path, offset)
            return 0
        self._persisted_checkpoint = offset
        return offset

    def _line_ends(self) -> list[int]:
        ends: list[int] = []
        offset = self._checkpoint
        while offset < self._size:
            chunk = os.pread(self._fd, min(_READ_CHUNK, self._size - offset), offset)
            nl = chunk.find(b"\n")
            while nl >= 0:
                ends.append(offset + nl + 1)
                nl = chunk.find(b"\n", nl + 1)
            offset += len(chunk)
        return ends

    def _persist_checkpoint(self, offset: int) -> None:
        """Replace the checkpoint file (atomically: a temporary file renamed), unless it
        already holds ``offset``. Not under the append lock: under its own, so that
        ``close`` and a writer still running never interleave their writes of ``.tmp``."""
        with self._checkpoint_lock:
            if offset == self._persisted_checkpoint:
                return
            tmp = self._checkpoint_path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, str(offset).encode("ascii"))
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._checkpoint_path)
            self._persisted_checkpoint = offset

    def _reject(
        self, line: bytes, end: int, error: Exception, what: str = "undecodable record"
    ) -> None:
        """Set a record aside (``path + ".rejected"``) so it cannot block the rest."""
        logger.error(
            "%s: %s ending at byte %d (%r): moved to %s.rejected",
            self.path,
            what,
            end,
            error,
            self.path,
        )
        with open(self.path + ".rejected", "ab") as f:
            f.write(line + b"\n")
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())  # before the checkpoint passes it
        self.set_aside_count += 1
        self.advance(end)

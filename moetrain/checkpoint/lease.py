"""The lease on a run name in a checkpoint store: one writer per ``<root>/<run>`` at a time.

Owns: ``<root>/<run>/lease.json`` (``{"holder", "host", "pid", "acquired", "heartbeat",
"ttl_s"}``), taking it (:meth:`Lease.acquire`), renewing it (a heartbeat thread),
checking it before a commit (:meth:`Lease.verify`, called by ``manifest.commit``) and giving it
back (:meth:`Lease.release`).

How it is taken:

- local directories: exclusive create (the lease is written to a private file, then
  hard-linked to ``lease.json``, which fails when the name exists): of two writers starting
  together exactly one creates it, and nobody reads a half-written lease. A lease whose
  heartbeat is older than its ``ttl_s`` (its holder died without releasing it: SIGKILL, power
  loss) is taken over by renaming it aside and creating a new one; a writer that finds it moved
  a fresh lease puts it back and is refused. (Should three writers interleave exactly there, the
  check before every commit still lets only the one whose lease is in place commit.)
- S3 / GCS: a conditional write (``If-None-Match: *``) would make it exclusive there too, and
  the S3 server of the tests (moto 5.2) honours it, but ``pyarrow.fs`` cannot send it (extra
  headers passed as metadata are dropped; measured: the object is overwritten). So the lease is
  an object written when none is live, re-read after :data:`SETTLE_S`: a writer that finds
  another holder there lost the race and is refused. Two writers whose writes are further apart
  than the settle time can both believe they hold it for a moment; the heartbeat and the check
  before every commit (``verify`` re-reads the object) then refuse the one that was overwritten,
  so it never commits. Expiry is judged with this machine's clock against the holder's
  (machines of one cluster are assumed to agree within seconds).

A holder renews its lease every ``ttl_s / 4`` seconds (:data:`HEARTBEATS_PER_TTL`). A lease that
is not ours and not expired refuses the writer with one line saying who holds it, when it
expires and how to remove it (``moetrain ckpt unlock <root>/<run>``) if that run is known dead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from moetrain.checkpoint.errors import CheckpointError, CorruptObjectError, ObjectNotFoundError
from moetrain.checkpoint.layout import check_run
from moetrain.storage.store import Store

log = logging.getLogger(__name__)

LEASE = "lease.json"
DEFAULT_TTL_S = 60.0
SETTLE_S = 1.0  # object stores: wait this long before re-reading the lease just written
HEARTBEATS_PER_TTL = 4


class LeaseHeldError(CheckpointError):
    """Another live writer holds the run name's lease."""


class LeaseLostError(CheckpointError):
    """This writer's lease was taken over or removed: it may no longer commit."""


def lease_key(run: str) -> str:
    return f"{check_run(run)}/{LEASE}"


@dataclass(frozen=True)
class LeaseRecord:
    holder: str  # a fresh id per Lease object (not the run id: a resumed run shares that)
    host: str
    pid: int
    acquired: float  # seconds since the epoch
    heartbeat: float
    ttl_s: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "LeaseRecord":
        try:
            d = json.loads(data)
            return cls(
                holder=str(d["holder"]),
                host=str(d["host"]),
                pid=int(d["pid"]),
                acquired=float(d["acquired"]),
                heartbeat=float(d["heartbeat"]),
                ttl_s=float(d["ttl_s"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptObjectError(
                f"lease {where} is unreadable ({exc}): remove it with `moetrain ckpt unlock`"
            ) from None

    def expires_in(self, now: float) -> float:
        """Seconds until it expires (<= 0: expired)."""
        return self.heartbeat + self.ttl_s - now


class Lease:
    """This process's lease on ``run`` in ``store`` (see the module doc)."""

    def __init__(self, store: Store, run: str, *, ttl_s: float = DEFAULT_TTL_S, settle_s: float = SETTLE_S) -> None:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s ({ttl_s}) must be > 0")
        self.store, self.run, self.ttl_s, self.settle_s = store, check_run(run), ttl_s, settle_s
        self.key = lease_key(run)
        self.holder = uuid.uuid4().hex
        self.held = False
        self.lost = ""  # why the heartbeat found the lease gone ("" while held)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Lease({self.store.uri_of(self.key)!r}, holder={self.holder[:8]}, held={self.held})"

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()

    # ---- records -------------------------------------------------------------------------
    def _record(self, acquired: float | None = None) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(self.holder, socket.gethostname(), os.getpid(), acquired or now, now, self.ttl_s)

    def read(self) -> LeaseRecord | None:
        """The lease in the store now, or None."""
        try:
            data = self.store.read_bytes(self.key)
        except ObjectNotFoundError:
            return None
        return LeaseRecord.from_bytes(data, self.store.uri_of(self.key))

    def _refusal(self, rec: LeaseRecord) -> LeaseHeldError:
        now = time.time()
        return LeaseHeldError(
            f"run {self.run!r} under {self.store.uri} is being written by another run (host {rec.host}, pid {rec.pid}, "
            f"last heartbeat {max(0.0, now - rec.heartbeat):.0f} s ago): two writers of one run name would mix "
            f"their checkpoints. Choose another cluster.run_name, or wait: its lease expires "
            f"{max(0.0, rec.expires_in(now)):.0f} s from now ({rec.ttl_s:g} s after its last heartbeat) if that run is "
            f"dead; to take it at once, `moetrain ckpt unlock {self.store.uri_of(self.run)}`"
        )

    # ---- taking --------------------------------------------------------------------------
    def acquire(self) -> "Lease":
        """Take the lease (and start the heartbeat); :class:`LeaseHeldError` when it is live elsewhere."""
        current = self.read()
        if current is not None and current.holder != self.holder and current.expires_in(time.time()) > 0:
            raise self._refusal(current)
        if current is not None:
            log.warning(
                "taking over the expired lease of run %s (host %s, pid %d, last heartbeat %.0f s ago)",
                self.run,
                current.host,
                current.pid,
                time.time() - current.heartbeat,
            )
        if self.store.kind == "local":
            self._acquire_local(current)
        else:
            self._acquire_remote()
        self.held, self.lost = True, ""
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run}", daemon=True)
        self._thread.start()
        return self

    def _acquire_local(self, stale: LeaseRecord | None) -> None:
        path = self.store.path(self.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if stale is not None:
            aside = f"{path}.stale-{self.holder[:12]}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                pass  # another writer moved it first; the exclusive create below decides
            else:
                with open(aside, "rb") as f:
                    moved = LeaseRecord.from_bytes(f.read(), aside)
                if moved != stale:  # we moved a fresh lease someone just created: put it back
                    try:
                        os.link(aside, path)
                    except FileExistsError:  # a third writer took the name meanwhile: its lease stands
                        pass
                    finally:
                        os.unlink(aside)
                    raise self._refusal(moved)
                os.unlink(aside)
        tmp = f"{path}.new-{self.holder[:12]}"
        with open(tmp, "wb") as f:  # whole before it appears: readers never see a partial lease
            f.write(self._record().to_bytes())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # exclusive: fails when the name exists
        except FileExistsError:
            raise self._refusal(self.read() or self._record()) from None
        finally:
            os.unlink(tmp)

    def _acquire_remote(self) -> None:
        self.store.write_bytes(self.key, self._record().to_bytes())
        time.sleep(self.settle_s)
        now = self.read()
        if now is None or now.holder != self.holder:
            raise (
                self._refusal(now)
                if now is not None
                else LeaseHeldError(
                    f"the lease of run {self.run!r} under {self.store.uri} vanished while it was taken: another writer "
                    "is starting; try again"
                )
            )

    # ---- holding -------------------------------------------------------------------------
    def verify(self) -> None:
        """Raise :class:`LeaseLostError` unless the store still holds this writer's lease."""
        if not self.held:
            raise LeaseLostError(f"run {self.run!r} under {self.store.uri}: this writer holds no lease")
        if self.lost:
            raise LeaseLostError(self.lost)
        rec = self.read()
        if rec is None or rec.holder != self.holder:
            who = "removed" if rec is None else f"taken by host {rec.host} pid {rec.pid}"
            self.lost = (
                f"the lease of run {self.run!r} under {self.store.uri} was {who}: this run may no "
                "longer commit checkpoints there"
            )
            raise LeaseLostError(self.lost)

    def heartbeat(self) -> None:
        """Renew the lease (after checking it is still ours)."""
        with self._lock:
            self.verify()
            acquired = self.read()
            record = self._record(acquired.acquired if acquired else None).to_bytes()
            if self.store.kind == "local":
                path = self.store.path(self.key)
                tmp = f"{path}.tmp-{self.holder[:12]}"
                with open(tmp, "wb") as f:
                    f.write(record)
                os.replace(tmp, path)
            else:
                self.store.write_bytes(self.key, record)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / HEARTBEATS_PER_TTL):
            try:
                self.heartbeat()
            except LeaseLostError as exc:
                log.error("%s", exc)
                return
            except CheckpointError as exc:  # the store is down for a moment: try again next beat
                log.warning("lease heartbeat of run %s failed: %s", self.run, str(exc).splitlines()[0])

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (best-effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.held:
            return
        self.held = False
        try:
            with self._lock:
                rec = self.read()
                if rec is not None and rec.holder == self.holder:
                    self.store.delete(self.key)
        except CheckpointError as exc:
            log.warning(
                "could not release the lease of run %s (it expires by itself in %g s): %s",
                self.run,
                self.ttl_s,
                str(exc).splitlines()[0],
            )


def unlock(store: Store, run: str) -> LeaseRecord | None:
    """Remove the lease of ``run`` whoever holds it (``moetrain ckpt unlock``); the removed record."""
    rec = Lease(store, run).read()
    store.delete(lease_key(run))
    return rec

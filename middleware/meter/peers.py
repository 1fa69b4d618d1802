"""Several worker processes on one GPU: each meter tells the others what it serves.

``uvicorn --workers 4`` runs four processes on one GPU. Each samples the same
GPU and would otherwise apportion *all* of its energy to its own requests,
counting it four times. So each meter broadcasts its request starts, ends and
batch steps to its peers over Unix datagram sockets in one directory (one
socket per process, ``<dir>/<pid>.sock``). Every meter then apportions energy
among all requests on the device - its own and its peers' - and emits records
for its own only. No leader, no shared state to corrupt: a dead peer's socket
is removed and its requests forgotten.

Who is a peer: a meter joins the group of what it meters - the physical
device's identity (the GPU's UUID, the sensor's source; a simulated GPU is
each process's own) plus an optional group name (``WATTSPAN_PEER_GROUP``) - in
``<peer dir>/<hash of those>/``. Two unrelated apps metering different devices
(or their own simulated ones) never share; two apps on one real GPU do, unless
they set different group names.

The directories must belong to this user: one pre-created by another user (or
a link) is refused with a log line naming it (the meter then runs without
peers); one of ours that is open to others is closed to mode 0700 (logged).
Sockets in it that another user owns are ignored.

Messages are JSON ``{"q": sequence number, "e": [event tuples]}`` chunked under
32 KiB; a full socket buffer drops the message and counts it (``dropped``),
never blocks the meter. The receiver sees the gap in the sender's sequence
numbers (``lost``), so the meter can forget what it can no longer trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..logs import get_logger

__all__ = ["Peers", "default_peer_dir", "group_key", "private_dir"]

log = get_logger(__name__)

_MAX_DATAGRAM = 32 * 1024
#: what one receive takes: more than the 32 KiB chunks, since one event may not fit one (a batch step naming
#: thousands of requests is sent whole, ~100 kB); a Unix datagram socket sends at most its buffer (~208 KiB)
_MAX_RECV = 256 * 1024


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def default_peer_dir() -> Path:
    from ..settings import get_settings

    base = get_settings().peer_dir
    if base:
        return Path(base)
    return Path(tempfile.gettempdir()) / f"wattspan-{_uid()}" / "peers"


def private_dir(path: Path, *, create_from: Path | None = None) -> Path:
    """Make ``path`` (each missing level mode 0700) and check every level from
    ``create_from`` (default: ``path`` itself) down belongs to this user and is
    closed to others. ``PermissionError`` naming the directory and the fix."""
    path = Path(path)
    top = Path(create_from) if create_from is not None else path
    levels = [path, *[p for p in path.parents if p == top or top in p.parents]]
    top.parent.mkdir(parents=True, exist_ok=True)
    for level in reversed(levels):
        try:
            level.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = os.lstat(level)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise PermissionError(f"{level} is not a directory (a link or a file is there); remove it")
        if hasattr(os, "getuid") and st.st_uid != _uid():
            raise PermissionError(f"{level} belongs to another user (uid {st.st_uid}, this is uid {_uid()}); "
                                  f"remove it or set WATTSPAN_PEER_DIR to a directory of your own")
        if st.st_mode & 0o077:  # ours, but open to others (an older wattspan made it 0755): close it
            try:
                os.chmod(level, 0o700)
            except OSError as exc:
                raise PermissionError(f"{level} is open to other users (mode {stat.S_IMODE(st.st_mode):o}) and cannot "
                                      f"be closed ({exc}); chmod 700 it, or remove it") from None
            log.warning("wattspan: %s was open to other users (mode %o); closed it to mode 700", level, stat.S_IMODE(st.st_mode))
    return path


def group_key(identities: Iterable[object], group: str | None = None) -> str:
    """The peer group of the devices named by ``identities`` (+ ``group``): a short hash."""
    h = hashlib.sha256()
    for ident in sorted(set(map(str, identities))):
        h.update(ident.encode("utf-8", "backslashreplace") + b"\0")
    h.update(b"group:" + (group or "").encode())
    return h.hexdigest()[:16]


class Peers:
    """This process's mailbox in ``directory`` (its group's subdirectory ``key``
    when given), and the addresses of the others. ``PermissionError`` when the
    directory is not this user's alone."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, key: str | None = None, name: str | None = None) -> None:
        from ..settings import get_settings

        base = Path(directory) if directory is not None else default_peer_dir()
        default = directory is None and not get_settings().peer_dir
        top = base.parent if default else base  # $TMPDIR/wattspan-<uid> is ours too
        self.dir = private_dir(base / key if key else base, create_from=top)
        self.pid = int(name) if name is not None else os.getpid()
        self.path = self.dir / f"{self.pid}.sock"
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.sock.setblocking(False)
        self._peers: list[Path] = []
        self._listed = 0.0
        self._seq = 0
        self._last_seq: dict[int, int] = {}
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self.lost = 0  # datagrams of peers that never arrived (gaps in their sequence numbers)
        self.refused = 0  # sockets of another user found in the directory, ignored
        self.gone: set[int] = set()  # pids of peers found dead since the last call to take_gone()

    def peers(self) -> list[Path]:
        now = time.monotonic()
        if now - self._listed > 1.0:
            self._listed = now
            found = []
            for p in self.dir.glob("*.sock"):
                if p == self.path:
                    continue
                try:
                    if os.lstat(p).st_uid != _uid():
                        self.refused += 1
                        if self.refused == 1:
                            log.warning("wattspan: ignoring %s in the peer directory: it belongs to another user", p)
                        continue
                except OSError:
                    continue
                found.append(p)
            self._peers = found
        return self._peers

    def broadcast(self, events: list[Any]) -> None:
        """Send ``events`` (JSON-able tuples) to every live peer (each message
        ends with the sender's watermark, so peers know what has arrived)."""
        peers = self.peers()
        if not events or not peers:
            return
        for chunk in _chunks(events, self):
            for p in list(peers):
                try:
                    self.sock.sendto(chunk, str(p))
                    self.sent += 1
                except (ConnectionRefusedError, FileNotFoundError):
                    self._forget(p)
                except (BlockingIOError, OSError) as exc:
                    self.dropped += 1
                    if self.dropped in (1, 10, 100, 1000) or self.dropped % 10000 == 0:
                        log.warning("peer %s is not keeping up (%s); %d messages dropped so far", p.name, exc, self.dropped)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def receive(self, limit: int = 10000) -> list[tuple[int, list[Any], int]]:
        """``(sender pid, events, lost)`` for every message waiting, in order; ``lost``:
        how many of that sender's messages went missing just before this one."""
        out: list[tuple[int, list[Any], int]] = []
        for _ in range(limit):
            try:
                data, addr = self.sock.recvfrom(_MAX_RECV)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                pid = int(Path(addr).stem) if addr else 0
                msg = json.loads(data)
                seq, events = int(msg["q"]), msg["e"]
                if not isinstance(events, list):
                    raise TypeError
            except (ValueError, TypeError, KeyError, RecursionError):
                continue
            last = self._last_seq.get(pid)
            lost = seq - last - 1 if last is not None and seq > last + 1 else 0
            self.lost += lost
            self._last_seq[pid] = seq  # a Unix socket keeps datagrams in order; a restarted pid starts again
            self.received += 1
            out.append((pid, events, lost))
        return out

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "received": self.received, "dropped": self.dropped, "lost": self.lost, "refused": self.refused}

    def take_gone(self) -> set[int]:
        gone, self.gone = self.gone, set()
        for pid in gone:
            self._last_seq.pop(pid, None)
        return gone

    def _forget(self, p: Path) -> None:
        try:
            if os.lstat(p).st_uid == _uid():
                p.unlink()
        except OSError:
            pass
        try:
            self.gone.add(int(p.stem))
        except ValueError:
            pass
        self._listed = 0.0

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass


def _chunks(events: list[Any], peers: Peers) -> Iterator[bytes]:
    """JSON-encode ``events`` in numbered pieces that fit one datagram."""
    # as many events as fit one datagram: a receiver's socket queues 10 datagrams (Linux's net.unix.max_dgram_qlen)
    # from all its peers between two passes; 200 events a datagram overflowed it at a few hundred requests a second
    start = 0
    n = len(events)
    step = n
    limit = _MAX_DATAGRAM - 32
    while start < n:
        body = json.dumps(events[start : start + step], separators=(",", ":"))
        if len(body) > limit and step > 1:
            step = max(1, min(step // 2, int(step * limit / len(body) * 0.95)))  # the events' size, scaled down
            continue
        yield f'{{"q":{peers.next_seq()},"e":{body}}}'.encode()
        start += step

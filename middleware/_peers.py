"""Several worker processes on one GPU: each meter tells the others what it serves.

``uvicorn --workers 4`` runs four processes on one GPU. Each samples the same
GPU and would otherwise apportion *all* of its energy to its own requests,
counting it four times. So each meter broadcasts its request starts, ends and
batch steps to its peers over Unix datagram sockets in one directory (one
socket per process, ``<dir>/<pid>.sock``; the directory is private to the
user). Every meter then apportions energy among all requests on the device -
its own and its peers' - and emits records for its own only. No leader, no
shared state to corrupt: a dead peer's socket is removed and its requests
forgotten.

Messages are JSON lists of event tuples, chunked under 32 KiB; a full socket
buffer drops the message and counts it (``dropped``), never blocks the meter.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["Peers", "default_peer_dir"]

log = logging.getLogger("wattspan")

_MAX_DATAGRAM = 32 * 1024


def default_peer_dir() -> Path:
    from .settings import get_settings

    base = get_settings().peer_dir
    if base:
        return Path(base)
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"wattspan-{uid}" / "peers"


class Peers:
    """This process's mailbox in ``directory``, and the addresses of the others."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.dir = Path(directory) if directory is not None else default_peer_dir()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.pid = os.getpid()
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
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self.gone: set[int] = set()  # pids of peers found dead since the last call to take_gone()

    def peers(self) -> list[Path]:
        now = time.monotonic()
        if now - self._listed > 1.0:
            self._listed = now
            self._peers = [p for p in self.dir.glob("*.sock") if p != self.path]
        return self._peers

    def broadcast(self, events: list) -> None:
        """Send ``events`` (JSON-able tuples) to every live peer (each message
        ends with the sender's watermark, so peers know what has arrived)."""
        peers = self.peers()
        if not events or not peers:
            return
        for chunk in _chunks(events):
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

    def receive(self, limit: int = 10000) -> list[tuple[int, list]]:
        """``(sender pid, events)`` for every message waiting."""
        out = []
        for _ in range(limit):
            try:
                data, addr = self.sock.recvfrom(_MAX_DATAGRAM * 2)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                pid = int(Path(addr).stem) if addr else 0
                events = json.loads(data)
            except (ValueError, TypeError):
                continue
            self.received += 1
            out.append((pid, events))
        return out

    def take_gone(self) -> set[int]:
        gone, self.gone = self.gone, set()
        return gone

    def _forget(self, p: Path) -> None:
        try:
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


def _chunks(events: list):
    """JSON-encode ``events`` in pieces that fit one datagram."""
    start = 0
    n = len(events)
    step = max(1, min(n, 200))
    while start < n:
        piece = json.dumps(events[start : start + step], separators=(",", ":")).encode()
        if len(piece) > _MAX_DATAGRAM and step > 1:
            step //= 2
            continue
        yield piece
        start += step

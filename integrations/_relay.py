"""Batch steps across processes: the engine process sends, the metering process receives.

``vllm serve`` runs its engine loop in a child process, while the requests are
metered where the HTTP traffic is (the metering proxy). :class:`StepSender`
takes ``record_step`` calls in the engine process (it has a Meter's
``record_step(start_ns, end_ns, device, tokens)`` method, so any hook can use it
as its meter) and ships them over a local socket; :class:`StepReceiver` in the
metering process hands them to its :class:`~wattspan.Meter`.

Wire format: newline-delimited JSON, one step a line,
``{"s": start_ns, "e": end_ns, "d": "gpu0", "t": {"<request id>": tokens}}``.
It carries timings and request ids only, never prompts or outputs.

Both ends must run on one host: the timestamps are ``time.monotonic_ns()``,
which on Linux is ``CLOCK_MONOTONIC``, one clock for every process (and every
container without a time namespace) on the machine.

Addresses: ``"127.0.0.1:8791"``, ``"[::1]:8791"`` or ``"unix:/run/wattspan/steps.sock"``.

Only this user's processes may send steps. A Unix socket is made owner-only
(mode 0600) and each connection's peer user is checked (``SO_PEERCRED``). Over
TCP every connection must first send ``{"auth": "<token>"}``: the token is
``WATTSPAN_STEPS_TOKEN`` when set on both sides, else the receiver makes one
and writes it to an owner-only file (``$TMPDIR/wattspan-<uid>/steps-<port>.token``)
that the sender reads. A connection that fails is closed and counted
(``auth_failures``). Sizes are bounded: a line of at most 1 MiB, at most
``MAX_STEP_IDS`` requests per step; the meter bounds steps per second.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
import socket
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from wattspan.logs import LogOnce, get_logger

__all__ = ["StepReceiver", "StepSender", "parse_address"]

log = get_logger(__name__)

_MAX_LINE = 1 << 20  # one step's JSON; MAX_STEP_IDS requests of 64-character ids fit
_MAX_DEVICE = 64
MAX_STEP_IDS = 4096  # requests per batch step (the Meter's default max_step_ids)
_MAX_ID = 128


def _token_file(port: int) -> Path:
    from wattspan.meter.peers import private_dir

    uid = os.getuid() if hasattr(os, "getuid") else 0
    return private_dir(Path(tempfile.gettempdir()) / f"wattspan-{uid}") / f"steps-{port}.token"


def _configured_token() -> str | None:
    from wattspan.settings import get_settings

    return get_settings().steps_token


def _auth_line(token: str) -> bytes:
    return json.dumps({"auth": token}).encode() + b"\n"


def parse_address(address: str, *, allow_port_zero: bool = False) -> tuple[int, str | tuple[str, int]]:
    """``"host:port"`` / ``"[v6]:port"`` / ``"unix:/path"`` -> ``(family, sockaddr)``; ``ValueError`` naming the problem."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"step relay address must be 'host:port' or 'unix:/path', got {address!r}")
    a = address.strip()
    if a.startswith("unix:"):
        path = a[5:]
        if not path:
            raise ValueError(f"step relay address {address!r}: 'unix:' needs a socket path, e.g. unix:/tmp/wattspan-steps.sock")
        if not hasattr(socket, "AF_UNIX"):
            raise ValueError(f"step relay address {address!r}: unix sockets are not available on this platform; use host:port")
        return socket.AF_UNIX, path
    host, sep, port_s = a.rpartition(":")
    if not sep or not host:
        raise ValueError(f"step relay address {address!r} has no port: write it as host:port, e.g. 127.0.0.1:8791")
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], socket.AF_INET6
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"step relay address {address!r}: port {port_s!r} is not a number") from None
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"step relay address {address!r}: port must be 1..65535")
    return family, (host, port)


def _encode(start_ns: int, end_ns: int, device: str, tokens: Mapping[str, float]) -> bytes:
    return json.dumps({"s": int(start_ns), "e": int(end_ns), "d": device, "t": dict(tokens)}, separators=(",", ":")).encode() + b"\n"


class StepSender:
    """Ships batch steps to a :class:`StepReceiver`; never blocks or raises in the caller.

    ``record_step`` appends to a bounded queue (beyond ``max_queue`` steps are
    dropped and counted); a daemon thread, started on first use (and again in a
    forked child), connects, writes, and reconnects every ``retry_s`` when the
    receiver is away. Steps that cannot be delivered are dropped and counted in
    :attr:`counters`: a step is only useful to the meter within seconds.
    """

    def __init__(self, address: str, *, max_queue: int = 65536, retry_s: float = 1.0, token: str | None = None) -> None:
        self.family, self.sockaddr = parse_address(address)
        self.address = address
        self.token = token
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue = int(max_queue)
        self.retry_s = float(retry_s)
        self.counters = {"sent": 0, "dropped": 0, "connects": 0, "send_errors": 0}
        self._q: deque = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._sock: socket.socket | None = None
        self._busy = False

    # a Meter's signature, so a hook can take this object as its meter
    def record_step(self, start_ns: int, end_ns: int, device: str, tokens: Mapping[str, float]) -> None:
        if end_ns <= start_ns or not tokens:
            return
        q = self._q
        if len(q) >= self.max_queue:
            self.counters["dropped"] += 1
            return
        q.append((start_ns, end_ns, device, tokens))
        if self._pid != os.getpid():
            self._start()
        self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._sock = None  # a forked child must not share the parent's connection
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="wattspan-step-sender", daemon=True)
            self._thread.start()

    def _connect(self) -> socket.socket:
        s = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            s.settimeout(2.0)
            s.connect(self.sockaddr)
            if self.family != getattr(socket, "AF_UNIX", None):  # TCP: prove we are the receiver's user
                token = self.token or _configured_token()
                if token is None:
                    try:
                        assert isinstance(self.sockaddr, tuple)  # (host, port): not a unix socket here
                        token = _token_file(self.sockaddr[1]).read_text().strip()
                    except OSError as exc:
                        raise OSError(f"no relay token: set WATTSPAN_STEPS_TOKEN on both sides ({exc})") from None
                s.sendall(_auth_line(token))
        except BaseException:
            s.close()
            raise
        self.counters["connects"] += 1
        return s

    def _run(self) -> None:
        q = self._q
        next_try = 0.0
        unreachable = LogOnce(log)  # one warning per outage
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while q:
                if self._sock is None:
                    if time.monotonic() < next_try:
                        break
                    try:
                        self._sock = self._connect()
                        unreachable.forget()
                    except OSError as exc:
                        next_try = time.monotonic() + self.retry_s
                        n = len(q)
                        q.clear()
                        self.counters["dropped"] += n
                        unreachable.warning("down", "wattspan: cannot reach the step receiver at %s (%s); dropping steps "
                                            "until it answers", self.address, exc)
                        break
                self._busy = True
                lines = []
                for _ in range(min(len(q), 1024)):
                    try:
                        lines.append(_encode(*q.popleft()))
                    except (TypeError, ValueError):  # a step that does not serialise
                        self.counters["dropped"] += 1
                try:
                    if lines:
                        self._sock.sendall(b"".join(lines))
                        self.counters["sent"] += len(lines)
                except OSError:
                    self.counters["send_errors"] += 1
                    self.counters["dropped"] += len(lines)
                    self._close_sock()
                    next_try = 0.0
                finally:
                    self._busy = False
        self._flush_and_close()

    def _close_sock(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            try:
                s.close()
            except OSError:
                pass

    def _flush_and_close(self) -> None:
        q = self._q
        if q and self._sock is not None:
            lines = []
            while q:
                try:
                    lines.append(_encode(*q.popleft()))
                except (TypeError, ValueError):
                    self.counters["dropped"] += 1
            try:
                self._sock.sendall(b"".join(lines))
                self.counters["sent"] += len(lines)
            except OSError:
                self.counters["dropped"] += len(lines)
        self._close_sock()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty (sent or dropped), at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (self._q or self._busy) and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.005)
        return not (self._q or self._busy)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the thread."""
        self._stop.set()
        self._wake.set()
        th = self._thread
        if th is not None and self._pid == os.getpid():
            th.join(timeout)
        self._thread = None
        self._pid = 0


class StepReceiver:
    """Listens for :class:`StepSender` connections and feeds each step to a meter.

    ``meter``: a :class:`~wattspan.Meter`, or a callable returning one (so the
    default meter can be created lazily). ``address``: where to listen;
    ``host:0`` picks a free port (see :attr:`address`). Malformed lines are
    counted in :attr:`counters` and skipped; a connection that sends a line
    longer than 1 MiB is closed. At most :attr:`max_connections` connections are
    served at once, and one must send its token within :attr:`auth_timeout_s`
    (both refusals counted in ``auth_failures``).
    """

    #: connections served at once (each has a thread); more are closed and counted
    max_connections = 64
    #: seconds a TCP connection has to send its token
    auth_timeout_s = 10.0

    def __init__(self, meter, address: str = "127.0.0.1:8791", *, token: str | None = None) -> None:
        family, sockaddr = parse_address(address, allow_port_zero=True)
        self._meter = meter
        self.counters = {"steps": 0, "bad_lines": 0, "connections": 0, "meter_errors": 0, "auth_failures": 0}
        self._unix_path = sockaddr if isinstance(sockaddr, str) else None  # a unix socket's path
        srv = socket.socket(family, socket.SOCK_STREAM)
        try:
            if self._unix_path is not None:
                try:
                    if os.path.exists(self._unix_path):
                        os.unlink(self._unix_path)  # a stale socket from a previous run
                except OSError:
                    pass
            else:
                srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(sockaddr)
            if self._unix_path is not None:
                os.chmod(self._unix_path, 0o600)  # owner-only; each connection's user is checked too
            srv.listen(16)
            srv.settimeout(0.5)  # so the accept loop notices close() everywhere
        except OSError as exc:
            srv.close()
            raise OSError(exc.errno, f"cannot listen for batch steps on {address}: {exc.strerror or exc}") from None
        self._srv = srv
        self._token_path: Path | None = None
        if self._unix_path is not None:
            self.address = "unix:" + self._unix_path
            self.token = token
        else:
            host, port = srv.getsockname()[:2]
            self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            self.token = token or _configured_token()
            if self.token is None:  # a fresh secret in an owner-only file the sender reads
                self.token = secrets.token_hex(16)
                try:
                    path = _token_file(port)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with os.fdopen(fd, "w") as fh:
                        fh.write(self.token)
                    os.chmod(path, 0o600)
                    self._token_path = path
                except OSError as exc:
                    srv.close()
                    raise OSError(f"cannot write the step relay's token file ({exc}); set WATTSPAN_STEPS_TOKEN "
                                  f"on both sides, or listen on unix:/path") from None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._once = LogOnce(log)
        self._thread = threading.Thread(target=self._accept, name="wattspan-step-receiver", daemon=True)
        self._thread.start()

    @property
    def meter(self):
        m = self._meter
        return m() if callable(m) and not hasattr(m, "record_step") else m

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            # an unauthenticated connection has auth_timeout_s to send its token: a local
            # user who opens connections and says nothing must not hold threads for ever
            conn.settimeout(self.auth_timeout_s if self.token is not None else None)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                conn.close()
                self._refuse(f"more than {self.max_connections} connections at once")
                continue
            self.counters["connections"] += 1
            threading.Thread(target=self._serve, args=(conn,), name="wattspan-step-conn", daemon=True).start()

    def _peer_ok(self, conn: socket.socket) -> bool:
        """A Unix socket's peer must be this user (or root)."""
        if self._unix_path is None or not hasattr(socket, "SO_PEERCRED"):
            return True
        try:
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except OSError:
            return False
        return uid in (os.getuid(), 0)

    def _refuse(self, why: str) -> None:
        self.counters["auth_failures"] += 1
        if self.counters["auth_failures"] in (1, 100, 10_000):
            log.warning("wattspan: refused a batch-step relay connection (%s); %d refused so far", why, self.counters["auth_failures"])

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        authed = self.token is None
        try:
            if not self._peer_ok(conn):
                self._refuse("it comes from another user")
                return
            while True:
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    self._refuse(f"no token within {self.auth_timeout_s:g} s")
                    return
                except OSError:
                    return
                if not data:
                    return
                buf += data
                if b"\n" not in data:
                    if len(buf) > _MAX_LINE:
                        self._bad("a line longer than 1 MiB; closing the connection")
                        return
                    continue
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not authed:
                        if not self._auth(line):
                            self._refuse("no valid token: set the same WATTSPAN_STEPS_TOKEN on both sides")
                            return
                        authed = True
                        conn.settimeout(None)  # a sender may stay idle between steps
                    elif line.strip():
                        self._line(line)
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _auth(self, line: bytes) -> bool:
        try:
            got = json.loads(line)["auth"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return False
        want = self.token
        return isinstance(got, str) and want is not None and hmac.compare_digest(got.encode(), want.encode())

    def _bad(self, why: str) -> None:
        self.counters["bad_lines"] += 1
        self._once.warning("bad-line", "wattspan: ignoring a malformed batch step from the relay (%s); further ones are only counted", why)

    def _line(self, line: bytes) -> None:
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            self._bad("not JSON")
            return
        try:
            s, e, d, t = obj["s"], obj["e"], obj["d"], obj["t"]
        except (KeyError, TypeError):
            self._bad("needs keys s, e, d, t")
            return
        if type(s) is not int or type(e) is not int or e <= s:
            self._bad("s and e must be integer nanoseconds with e > s")
            return
        if not isinstance(d, str) or not d or len(d) > _MAX_DEVICE:
            self._bad("d must be a device name of 1..64 characters")
            return
        if not isinstance(t, dict) or not t:
            self._bad("t must be a non-empty object of request id -> tokens")
            return
        if len(t) > MAX_STEP_IDS:
            self._bad(f"a step names {len(t)} requests (at most {MAX_STEP_IDS})")
            return
        for k, v in t.items():
            if len(k) > _MAX_ID:
                self._bad(f"request ids are at most {_MAX_ID} characters")
                return
            if type(v) not in (int, float) or not (v >= 0 and math.isfinite(v)):
                self._bad(f"tokens must be finite numbers >= 0 (request {k[:32]!r})")
                return
        try:
            self.meter.record_step(s, e, d, t)
            self.counters["steps"] += 1
        except Exception:
            self.counters["meter_errors"] += 1
            log.exception("wattspan: the meter rejected a relayed batch step")

    def close(self) -> None:
        """Stop listening and drop the connections."""
        if self._closed:
            return
        self._closed = True
        try:
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        except OSError:
            pass
        try:
            self._srv.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(1.0)
        for path in (self._unix_path, self._token_path):
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _is_meter_like(obj) -> bool:
    return hasattr(obj, "record_step")


def resolve_step_sink(meter) -> object:
    """``None`` -> the default meter; a relay address string -> a :class:`StepSender`; else the object itself."""
    if meter is None:
        from wattspan.defaults import get_default_meter

        return get_default_meter()
    if isinstance(meter, str):
        return StepSender(meter)
    if not _is_meter_like(meter):
        raise TypeError(f"meter must be a wattspan Meter, a StepSender, or a relay address string, got {type(meter).__name__}")
    return meter


"""Rank 0's HTTP transport: uvicorn's HTTP/1.1 protocol behind our own socket and accept loop.

uvicorn alone holds any number of connections for ever (no deadline until a request's headers
arrive), and asyncio's accept loop logs a traceback per failed accept when descriptors run out:
thousands a second. So we bind the socket ourselves (a Unix socket private from its first moment,
never someone else's live one), accept connections ourselves (bounded by --max-connections; when
full, the connection idle longest makes room; out of descriptors, accepting pauses and one line is
logged now and then), and give every connection deadlines: the request's headers within
--header-timeout, its body within --body-timeout, and an answer must keep moving: no progress in
sending it for --send-timeout closes the connection (nginx's send_timeout). A client that pipelines
requests and never reads its answers holds at most one answer in our buffer (the next request waits
until the last answer has gone to the kernel), and when the connections are full, one stalled like
that is closed to make room as an idle one is. uvicorn's `H11Protocol` parses HTTP; the subclass
below adds only those deadlines and that flow control. No torch here.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from wan_spmd.server.errors import error_body
from wan_spmd.server.options import HttpOptions

log = logging.getLogger("wan_spmd")

_OUTQ = getattr(termios, "TIOCOUTQ", None)
"""ioctl for a socket's unacknowledged send queue (Linux's SIOCOUTQ has TIOCOUTQ's number)."""

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BATCH = 64  # accepts per wake-up, so a flood of connects cannot starve answering
ACCEPT_PAUSE_S = 0.1  # wait after running out of descriptors before accepting again
EVICT_WHEN_STARVED = 8  # idle connections closed per pause, so waiting clients get in within seconds
STARVED_LOG_EVERY_S = 30.0
LINGER_S = 2.0  # after an answer sent before the body was read: drain (and drop) this long, then close
KEEP_ALIVE_S = 5  # uvicorn's idle keep-alive, kept explicit
DESCRIPTOR_RESERVE = 128  # descriptors rank 0 needs beside connections (libraries, gloo, files)
UNREAD_AHEAD_BYTES = 64 * 1024  # answers a client may leave unread before its next pipelined request waits
SEND_POLL_S = 0.1  # how often a connection with unread answers is looked at (progress, room for the next)
STALLED_EVICT_S = 1.0  # an answer stalled this long (or --send-timeout, if shorter) may be closed to make room


class ConnectionGuard:
    """The connections the transport holds, and which one to close when it must hold fewer."""

    def __init__(self, options: HttpOptions, on_change: Callable[[int], None], on_close: Callable[[str], None]):
        self.options = options
        self.open: set[GuardedH11Protocol] = set()
        self._on_change = on_change
        self.on_close = on_close
        """Counts a connection the server closed on its own, by reason."""

    def add(self, connection: GuardedH11Protocol) -> None:
        self.open.add(connection)
        self._on_change(len(self.open))

    def discard(self, connection: GuardedH11Protocol) -> None:
        if connection in self.open:
            self.open.discard(connection)
            self._on_change(len(self.open))

    def make_room(self) -> bool:
        """Whether one more connection may be held, closing the one idle longest, or else the one
        whose answer has stalled longest, if need be."""
        return len(self.open) < self.options.max_connections or self.evict_idle() or self.evict_stalled()

    def evict_idle(self) -> bool:
        """Close the connection that has waited longest for a request's headers (never one whose
        request is being read or answered); False when there is none."""
        idle = [c for c in self.open if c.waiting_since is not None]
        if not idle:
            return False
        min(idle, key=lambda c: c.waiting_since).drop("evicted")
        return True

    def evict_stalled(self) -> bool:
        """Close the connection whose answer has made no progress for longest, if that is at least
        STALLED_EVICT_S (or --send-timeout): its client is not reading, and a client that is keeps
        its place. False when there is none."""
        now = time.monotonic()
        stalled = [(c.stalled_since(now), c) for c in self.open]
        stalled = [(since, c) for since, c in stalled if since is not None]
        if not stalled:
            return False
        since, connection = min(stalled, key=lambda pair: pair[0])
        if now - since < min(STALLED_EVICT_S, self.options.send_timeout_s):
            return False
        connection.drop("evicted")
        return True


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection plus read deadlines and a send deadline.

    Phases follow h11's view of the client: IDLE (waiting for a request's headers: --header-timeout,
    and the connection may be evicted), SEND_BODY (--body-timeout), then nothing while the app works
    on the answer, which may take minutes. An answer sent before the body was read (413, 429, 401)
    is followed by a short linger that drops the rest, so the client reads the answer rather than a
    reset; the connection then closes.

    Sending is watched apart from the phases: the transport pauses us as soon as any byte waits in
    its buffer (the kernel's socket buffers are the only ones), and while paused, --send-timeout
    without a byte leaving closes the connection, even one already closing (which asyncio would
    otherwise keep until its buffer drains, for ever if nobody reads). A pipelined next request is
    taken up only once the client has read all but UNREAD_AHEAD_BYTES of the answers before it
    (counting the kernel's unacknowledged send queue), so a client that sends many and reads none
    holds about one answer, not thirty.
    """

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any], guard: ConnectionGuard):
        super().__init__(config, server_state, app_state)
        self.guard = guard
        self.waiting_since: float | None = time.monotonic()
        """Since when it waits for a request's headers (None while a request is read or answered)."""
        self.dropped = False
        self._phase: str | None = "headers"
        self._phase_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent = 0
        """Unread bytes (see `unread_bytes`) when sending last made progress."""
        self._sent_at: float | None = None
        """When sending last made progress (None while nothing waits on the client)."""
        self._next_request_waits = False
        """An answer is complete but its client has not read it: the next pipelined request waits."""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.dropped:  # evicted before it was attached to its transport
            transport.abort()
            return
        transport.set_write_buffer_limits(high=0, low=0)  # paused whenever a byte waits: see the class doc
        self._arm("headers", self.guard.options.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._cancel_send_timer()
        self.guard.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.dropped:
            return
        self._phase_bytes += len(data)
        try:
            super().data_received(data)
        except h11.LocalProtocolError:  # bad framing after our answer went out: uvicorn cannot say 400
            self.transport.close()
            return
        self._follow_client()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, in the API's JSON error shape."""
        self.transport.write(raw_error(400, "what was received is not a valid HTTP/1.1 request"))
        self.transport.close()

    def on_response_complete(self) -> None:
        if self.conn.their_state is h11.SEND_BODY:  # answered before the whole body came
            self.server_state.total_requests += 1
            self.flow.resume_reading()  # read on and drop it (h11 skips body data once we are done)
            self._arm("linger", LINGER_S)
            return
        if self.flow.write_paused or self.unread_bytes() > UNREAD_AHEAD_BYTES:
            self._next_request_waits = True  # the client is not reading its answers: take no next request yet
            self._watch_sending()
            return
        super().on_response_complete()
        self._follow_client()

    # sending
    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_sending()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send_check()

    def unread_bytes(self) -> int:
        """Bytes of our answers the client has not taken: in the transport's buffer, and in the
        kernel's send queue not yet acknowledged (a client that reads nothing fills its window)."""
        unread = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if _OUTQ is not None and sock is not None and not self.transport.is_closing():
            try:
                unread += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
            except (OSError, ValueError):
                pass
        return unread

    def stalled_since(self, now: float) -> float | None:
        """Since when sending has made no progress, or None if nothing waits to be sent."""
        if self._sent_at is None or self.transport is None:
            return None
        unread = self.unread_bytes()
        if unread < self._unsent:  # the client took bytes since we last looked: progress
            self._unsent, self._sent_at = unread, now
        return self._sent_at

    def _watch_sending(self) -> None:
        """Start (or go on) checking that what waits to be sent keeps moving."""
        if self._sent_at is None:
            self._unsent, self._sent_at = self.unread_bytes(), time.monotonic()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(SEND_POLL_S, self._send_check)

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_check(self) -> None:
        """Take up the next pipelined request once the client has read the answers before it; close
        the connection when nothing it was sent has moved for --send-timeout."""
        self._cancel_send_timer()
        if self.transport is None:
            return
        closing = self.dropped or self.transport.is_closing()
        if self._next_request_waits and closing:
            self._next_request_waits = False  # no next request on a connection that is closing
        if self._next_request_waits and not self.flow.write_paused and self.unread_bytes() <= UNREAD_AHEAD_BYTES:
            self._next_request_waits = False
            self._sent_at = None
            super().on_response_complete()
            self._follow_client()
        if not self.flow.write_paused and not self._next_request_waits:
            self._sent_at = None  # nothing waits on the client
            return
        now = time.monotonic()
        since = self.stalled_since(now)
        if since is not None and now - since >= self.guard.options.send_timeout_s:
            if not self.dropped:  # a connection we were closing anyway was counted then
                self.guard.on_close("send_timeout")
            self.drop_now()
            return
        self._watch_sending()

    def drop_now(self) -> None:
        """Close at once, throwing away whatever waits to be sent (nobody is reading it)."""
        self.dropped = True
        self.waiting_since = None
        self.guard.discard(self)
        self._cancel_timer()
        self._cancel_send_timer()
        if self.transport is not None:
            self.transport.abort()

    # deadlines
    def _follow_client(self) -> None:
        """Move to the phase h11's view of the client says, arming that phase's deadline."""
        state = self.conn.their_state
        if self._phase == "linger" and state is not h11.IDLE:
            return  # still draining the body of an answered request
        if state is h11.IDLE:
            phase, timeout = "headers", self.guard.options.header_timeout_s
        elif state is h11.SEND_BODY:
            phase, timeout = "body", self.guard.options.body_timeout_s
        else:
            phase, timeout = None, 0.0
        if phase != self._phase:
            self._arm(phase, timeout)

    def _arm(self, phase: str | None, timeout: float) -> None:
        self._cancel_timer()
        self._phase, self._phase_bytes = phase, 0
        self.waiting_since = time.monotonic() if phase == "headers" else None
        if phase is not None and self.transport is not None and not self.transport.is_closing():
            self._timer = self.loop.call_later(timeout, self._expire, phase)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, phase: str) -> None:
        self._timer = None
        if phase == "linger":
            self.transport.close()
        elif phase == "headers" and not self._phase_bytes:
            self.drop("header_timeout")  # nothing came at all: close without a word
        elif phase == "headers":
            seconds = self.guard.options.header_timeout_s
            self.drop("header_timeout", f"the request headers did not arrive within {seconds:g} s (--header-timeout)")
        else:
            seconds = self.guard.options.body_timeout_s
            self.drop("body_timeout", f"the request body did not arrive within {seconds:g} s (--body-timeout)")

    def drop(self, reason: str, message: str | None = None) -> None:
        """Close this connection on the server's initiative, with a 408 when there is something to
        say. A request being read then sees the client as gone."""
        self.dropped = True
        self.waiting_since = None
        self.guard.discard(self)
        self.guard.on_close(reason)
        self._cancel_timer()
        if self.transport is None:
            return  # connection_made closes it
        if self.flow.write_paused:  # its client is not reading what it was sent: a 408 would wait too
            self.drop_now()
            return
        if message is not None and not self.transport.is_closing():
            self.transport.write(raw_error(408, message))
        self.transport.close()


def raw_error(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 error answer in the API's JSON shape, for the transport's own answers
    (no request was parsed, so there is no app to answer)."""
    body = json.dumps(error_body(status, message)).encode()
    reason = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class Listener:
    """Our accept loop on the bound socket, in place of asyncio's `create_server` (whose loop retries
    a failing accept up to the backlog's size per wake-up, logging a traceback each time)."""

    def __init__(self, sock: socket.socket, factory: Callable[[], GuardedH11Protocol], guard: ConnectionGuard):
        self.sock = sock
        self.factory = factory
        self.guard = guard
        self.loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._starved = 0
        self._starved_evicted = 0
        self._starved_logged_at: float | None = None
        self._closed = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause(exc)
                return
            conn.setblocking(False)
            if not self.guard.make_room():
                self.guard.on_close("refused")
                _refuse(conn, self.guard.options.max_connections)
                continue
            protocol = self.factory()
            self.guard.add(protocol)
            task = self.loop.create_task(self._attach(conn, protocol))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _attach(self, conn: socket.socket, protocol: GuardedH11Protocol) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            self.guard.discard(protocol)
            conn.close()

    def _pause(self, exc: OSError) -> None:
        """Accepting failed (out of descriptors, usually): close a few of the longest-idle connections
        to free descriptors, stop accepting for a moment, and say so in one line at most every 30 s."""
        if exc.errno in OUT_OF_DESCRIPTORS:
            self._starved += 1
            for _ in range(EVICT_WHEN_STARVED):
                if not (self.guard.evict_idle() or self.guard.evict_stalled()):
                    break
                self._starved_evicted += 1
        now = time.monotonic()
        if self._starved_logged_at is None or now - self._starved_logged_at >= STARVED_LOG_EVERY_S:
            self._starved_logged_at = now
            if exc.errno in OUT_OF_DESCRIPTORS:
                soft = _descriptor_limit()
                log.warning(
                    "HTTP: accepting failed %d time(s) (%s; ulimit -n is %s): paused %.1f s each time, closed %d "
                    "idle connection(s) to make room; raise ulimit -n or lower --max-connections",
                    self._starved,
                    os.strerror(exc.errno),
                    soft,
                    ACCEPT_PAUSE_S,
                    self._starved_evicted,
                )
                self._starved = self._starved_evicted = 0
            else:
                log.warning("HTTP: accepting failed (%s); retrying in %.1f s", exc, ACCEPT_PAUSE_S)
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(ACCEPT_PAUSE_S, self._resume)

    def _resume(self) -> None:
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    # the part of asyncio.Server that uvicorn's shutdown uses
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    async def wait_closed(self) -> None:
        return None


def _refuse(conn: socket.socket, limit: int) -> None:
    """Over the limit with nothing idle to close: a 503 if the socket takes it at once, then close."""
    try:
        conn.send(raw_error(503, f"the server holds {limit} connections (--max-connections); retry shortly"))
    except OSError:
        pass
    conn.close()


def _descriptor_limit() -> str:
    try:
        import resource

        return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        return "unknown"


class _Server(uvicorn.Server):
    """uvicorn's server with our socket, accept loop and protocol; uvicorn's main loop and graceful
    shutdown (close the listener, finish answers in flight) stay as they are."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, options: HttpOptions, metrics: Any | None) -> None:
        super().__init__(config)
        self.sock = sock
        self.options = options
        self.metrics = metrics

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        metrics = self.metrics

        def on_change(count: int) -> None:
            if metrics is not None:
                metrics.connections_open = count

        def on_close(reason: str) -> None:
            if metrics is not None:
                metrics.connection_closed(reason)

        guard = ConnectionGuard(self.options, on_change, on_close)
        state = self.lifespan.state

        def factory() -> GuardedH11Protocol:
            return GuardedH11Protocol(self.config, self.server_state, state, guard)

        self.servers = [Listener(self.sock, factory, guard)]  # type: ignore[list-item]
        self.started = True


def bind_tcp(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket, or ValueError saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise ValueError(f"the HTTP server could not listen on {host}:{port}: {exc.strerror or exc}") from None


def bind_unix(path: str, mode: int, backlog: int) -> tuple[socket.socket, int]:
    """A listening Unix socket at `path` with `mode`, and its inode; ValueError if `path` is anything
    but a stale socket. The mode holds from the first moment: Linux gives the file the socket's own
    mode at bind, so it is set before binding (under the umask) and exactly after."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ValueError(f"--uds {path} exists and is not a socket; refusing to replace it")
        live = socket_in_use(path)
        if live:
            raise ValueError(f"--uds {path}: {live}; refusing to take it over")
        os.unlink(path)  # a stale socket from an earlier run would make bind fail
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
        return sock, os.lstat(path).st_ino
    except OSError as exc:
        sock.close()
        raise ValueError(f"the HTTP server could not listen on --uds {path}: {exc.strerror or exc}") from None


def socket_in_use(path: str) -> str | None:
    """Why the Unix socket at `path` must be left alone (a server answers on it, or we cannot tell),
    or None for a stale one that nobody listens on."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError as exc:  # EACCES (another user's socket), EAGAIN (its backlog is full), timeouts
        return f"cannot tell whether another server uses it ({exc.strerror or exc}); remove it if none does"
    finally:
        probe.close()
    return "another server is listening on it"


class HttpThread:
    """The app served in a daemon thread of rank 0 (uvicorn leaves signals to the main thread there)."""

    def __init__(self, app: Any, host: str, port: int, uds: str | None, options: HttpOptions = HttpOptions()):
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            uds=uds,
            http="h11",
            ws="none",  # no upgrades: a connection stays this protocol's, so the guard's count holds
            lifespan="off",
            log_level="error",  # not a warning line per malformed request: any client could fill the log
            access_log=False,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=5,
        )
        self.config = config
        self.options = options
        self.uds = uds
        self.metrics = getattr(getattr(app.state, "ctx", None), "metrics", None)
        """The app's ServerMetrics (create_app's app carries its context), for connection counts."""
        self.server: _Server | None = None
        self._inode: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:
            self.error = exc

    def start(self, timeout: float = 30.0) -> str:
        """Bind and start serving; the address it listens on, or ValueError saying why it could not."""
        if self.uds:
            sock, self._inode = bind_unix(self.uds, self.options.uds_mode, self.options.backlog)
        else:
            sock = bind_tcp(self.config.host, self.config.port, self.options.backlog)
        limit = _descriptor_limit()
        if limit.isdigit() and self.options.max_connections + DESCRIPTOR_RESERVE > int(limit):
            log.warning(
                "ulimit -n is %s: --max-connections %d may run out of descriptors first (then accepting pauses "
                "and idle connections are closed); raise ulimit -n to at least %d",
                limit,
                self.options.max_connections,
                self.options.max_connections + DESCRIPTOR_RESERVE,
            )
        self.server = _Server(self.config, sock, self.options, self.metrics)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                self.remove_socket()
                raise ValueError(f"the HTTP server did not start ({self.error or 'timed out'})")
            time.sleep(0.02)
        if self.uds:
            return f"unix:{self.uds}"
        host, port = sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.remove_socket()

    def remove_socket(self) -> None:
        """Remove the socket file we bound, and only that one (not a file put there since)."""
        if self.uds and self._inode is not None:
            try:
                if os.lstat(self.uds).st_ino == self._inode:
                    os.unlink(self.uds)
            except FileNotFoundError:
                pass
            self._inode = None

"""The HTTP side of the local app, made safe to leave running: which Host values it answers, how
long a client may take, how many threads it may cost, the headers every response carries.

Nothing here knows about stores; app.py builds the handler on top of it.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer

DEFAULT_TIMEOUT = 30.0   # seconds a client has to send its whole request head, and to read a response
DEFAULT_MAX_THREADS = 32  # requests handled at once; further connections wait in the listen queue
LISTEN_QUEUE = 128        # connections the kernel holds while every worker is busy

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
# On every response (page, JSON, static files, errors): no framing, no MIME sniffing, nothing cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def url_host(host: str) -> str:
    """`host` as written in a URL or a Host header (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values the app answers: the loopback names and the bound address, with its
    port. A page on another name that resolves here (DNS rebinding) sends its own name and is refused."""
    names = {n.lower() for n in (*LOOPBACK_NAMES, url_host(host))}
    values = {f"{n}:{port}" for n in names}
    if port == 80:  # a browser leaves the default port out
        values |= names
    return frozenset(values)


def host_problem(values: list[str] | None, allowed: frozenset[str]) -> tuple[int, str] | None:
    """(status, message) when a request's Host headers are not exactly one allowed value, else None."""
    if not values:
        return 400, "the request has no Host header; open the address `stratascope view` printed"
    if len(values) > 1:
        return 400, "the request has more than one Host header"
    value = values[0].strip().lower()
    if value not in allowed:
        shown = ", ".join(sorted(allowed))
        return 421, f"this app answers only requests addressed to {shown}, not {value[:80]!r}"
    return None


class HeadReader:
    """A handler's rfile with one deadline for the whole request head. A socket timeout bounds each
    read only, so a client sending one byte every few seconds would otherwise hold its worker forever."""

    def __init__(self, raw, sock: socket.socket, seconds: float):
        self._raw, self._sock, self._seconds = raw, sock, seconds
        self._deadline = time.monotonic() + seconds

    def restart(self) -> None:
        self._deadline = time.monotonic() + self._seconds

    def readline(self, limit: int = -1) -> bytes:
        line = bytearray()
        while limit < 0 or len(line) < limit:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request head did not arrive in time")
            self._sock.settimeout(left)
            chunk = self._raw.peek(1)  # at most one read from the socket, and only when the buffer is empty
            if not chunk:
                break  # the client closed
            n = chunk.find(b"\n") + 1 or len(chunk)
            if limit >= 0:
                n = min(n, limit - len(line))
            line += self._raw.read(n)
            if line.endswith(b"\n"):
                break
        return bytes(line)

    def __getattr__(self, name):  # read, close, closed...: the wrapped reader's
        return getattr(self._raw, name)


class BoundedServer(ThreadingHTTPServer):
    """A thread per request, but at most `max_threads` at once: while all are busy the accept loop
    waits and new connections queue in the kernel, so 300 idle sockets cost no more threads than 3.
    A client that disconnects is one log line at most, never a traceback."""

    daemon_threads = True
    request_queue_size = LISTEN_QUEUE

    def __init__(self, address, handler, max_threads: int = DEFAULT_MAX_THREADS, quiet: bool = True):
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self.quiet = quiet
        self._slots = threading.BoundedSemaphore(max_threads)
        self._stopping = threading.Event()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        while not self._slots.acquire(timeout=0.25):
            if self._stopping.is_set():  # shutdown() must not wait for a slot
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self):
        self._stopping.set()
        super().shutdown()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):  # BrokenPipe, ConnectionReset/Aborted
            if not self.quiet:
                print(f"stratascope view: client {client_address[0]} went away ({type(error).__name__})",
                      file=sys.stderr)
            return
        super().handle_error(request, client_address)  # a bug: its traceback belongs in the terminal


class BoundedServer6(BoundedServer):
    address_family = socket.AF_INET6


def server_class(host: str) -> type[BoundedServer]:
    return BoundedServer6 if ":" in host.strip("[]") else BoundedServer

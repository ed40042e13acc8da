"""The local app as a service left running: the real server on 127.0.0.1 (port 0, in a thread) spoken
to with raw sockets: which Host values it answers, slow and idle clients, the thread bound, bad
requests as 4xx JSON without paths, the headers of every response, clients that drop."""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import threading
import time

import pytest

import stratascope as ss
from stratascope.viewer.app import MAX_FIELDS, serve_in_thread
from viewer_fixtures import viewer_store  # noqa: F401 - the fixture

TIMEOUT = 0.5  # the servers' timeout here: short, so the slow-client tests take about a second


@pytest.fixture
def serve(viewer_store):  # noqa: F811
    """start(**make_server options) -> a running server on 127.0.0.1:0; all stopped after the test."""
    servers = []

    def start(**options):
        options = {"timeout": TIMEOUT, "max_threads": 4, **options}
        server, _ = serve_in_thread(ss.open_run(viewer_store.path), options.pop("host", "127.0.0.1"), **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def port(viewer_store):  # noqa: F811
    """One server for the plain request/response checks (a generous timeout: nothing here is slow)."""
    server, _ = serve_in_thread(ss.open_run(viewer_store.path), timeout=5.0)
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def exchange(port: int, request: bytes, address: str = "127.0.0.1", method: str = "GET"):
    """Send raw bytes, read one response: (status, headers, body)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(10)
        s.connect((address, port))
        s.sendall(request)
        r = http.client.HTTPResponse(s, method=method)
        r.begin()
        return r.status, r.headers, r.read()


def request(port: int, path: str, host: str | None = None, method: str = "GET", address: str = "127.0.0.1"):
    host = f"127.0.0.1:{port}" if host is None else host
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    return exchange(port, head.encode("latin-1"), address, method)


def error_of(status: int, headers, body: bytes) -> str:
    """The JSON error message of a 4xx answer (asserting it is one)."""
    assert 400 <= status < 500, (status, body[:200])
    assert headers["Content-Type"] == "application/json"
    payload = json.loads(body)
    assert payload["status"] == status and payload["error"]
    return payload["error"]


def closed_after(sock: socket.socket, limit: float, send_every: float | None = None) -> float | None:
    """Seconds until the server closed `sock` (None if still open after `limit`); with `send_every`,
    one more byte of a request line is sent at that interval meanwhile (a trickling client)."""
    t0 = time.monotonic()
    sock.settimeout(send_every or limit)
    while time.monotonic() - t0 < limit:
        try:
            if sock.recv(1024) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0
        except ConnectionResetError:
            return time.monotonic() - t0
    return None


# ---- Host: only the address it listens on (DNS rebinding sends the attacker's name) ----

@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1.nip.io:{port}",
                                  "127.0.0.1:1", "localhost", "127.0.0.1", "", "127.0.0.1:{port}@evil.example",
                                  "[::2]:{port}", "0.0.0.0:{port}"])
def test_wrong_host_is_refused_without_data(port, host):
    status, headers, body = request(port, "/api/tokens?prompt=2", host=host.format(port=port))
    assert status in (400, 421)
    error_of(status, headers, body)
    assert b"tokens" not in body and b"script" not in body  # nothing of the store
    assert request(port, "/", host=host.format(port=port))[0] in (400, 421)


def test_missing_or_repeated_host_is_refused(port):
    status, headers, body = exchange(port, b"GET /api/meta HTTP/1.0\r\n\r\n")
    assert "Host" in error_of(status, headers, body)
    twice = f"GET /api/meta HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n\r\n".encode()
    assert exchange(port, twice)[0] == 400


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LocalHost:{port}", "[::1]:{port}"])
def test_right_host_is_served(port, host, viewer_store):  # noqa: F811
    status, _, body = request(port, "/api/tokens?prompt=2", host=host.format(port=port))
    assert status == 200
    assert json.loads(body)["tokens"] == [str(t) for t in viewer_store.token_str[viewer_store.rows(2)]]


def test_the_bound_host_is_served(serve):
    for address in ("127.0.0.2", "::1"):  # another loopback address, and IPv6 where this machine has it
        try:
            server = serve(host=address)
        except OSError as e:
            pytest.skip(f"cannot listen on {address}: {e}")
        p = server.server_address[1]
        name = f"[{address}]" if ":" in address else address
        assert server.url == f"http://{name}:{p}/"
        assert request(p, "/api/meta", host=f"{name}:{p}", address=address)[0] == 200
        assert request(p, "/api/meta", host=f"{name}:{p + 1}", address=address)[0] == 421


# ---- slow and idle clients; the thread bound ----

def test_slow_client_is_closed_within_the_timeout(serve):
    p = serve().server_address[1]
    with socket.create_connection(("127.0.0.1", p)) as s:
        s.sendall(b"GET /api/meta HT")  # half a request line, then nothing
        waited = closed_after(s, limit=10 * TIMEOUT)
    assert waited is not None and 0.8 * TIMEOUT <= waited <= TIMEOUT + 1.0, waited


def test_trickling_client_is_closed_within_the_timeout(serve):
    """A byte every fifth of the timeout: each read is quick, the request head never completes."""
    p = serve().server_address[1]
    with socket.create_connection(("127.0.0.1", p)) as s:
        s.sendall(b"GET /")
        waited = closed_after(s, limit=10 * TIMEOUT, send_every=TIMEOUT / 5)
    assert waited is not None and waited <= TIMEOUT + 1.0, waited


def test_idle_connection_is_closed_and_the_server_still_answers(serve):
    p = serve().server_address[1]
    with socket.create_connection(("127.0.0.1", p)) as s:
        waited = closed_after(s, limit=10 * TIMEOUT)
    assert waited is not None and waited <= TIMEOUT + 1.0, waited
    assert request(p, "/api/meta")[0] == 200


def test_many_idle_connections_do_not_make_many_threads(serve):
    server = serve(max_threads=4, timeout=5.0)  # idle long enough to count them
    p = server.server_address[1]
    before = threading.active_count()
    socks = []
    try:
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)  # beyond the listen queue a connect waits for the kernel: do not block on it
            s.connect_ex(("127.0.0.1", p))
            socks.append(s)
        time.sleep(1.0)
        assert threading.active_count() - before <= 4
    finally:
        for s in socks:
            s.close()
    t0 = time.monotonic()
    assert request(p, "/api/meta")[0] == 200  # the workers come back once those clients leave
    assert time.monotonic() - t0 < 5


# ---- bad requests: 4xx JSON, one index rule, ASCII digits, no paths ----

def test_too_many_query_fields_is_400_json(port):
    fields = "&".join(["prompt=0"] + [f"f{i}=1" for i in range(MAX_FIELDS)])  # 21 fields
    assert "at most 20 query fields" in error_of(*request(port, "/api/tokens?" + fields))
    assert request(port, "/api/tokens?prompt=0" + "&" * MAX_FIELDS)[0] == 400  # empty fields count too
    assert request(port, "/api/attention?" + "&".join(["prompt=0", "layer=0"] + ["x=1"] * 18))[0] == 400


@pytest.mark.parametrize("value", ["%EF%BC%91", "%EF%BC%90", "%D9%A3", "%E0%A5%A7", "\xef\xbc\x91", "%C2%B2",
                                   "%201", "1%0A", "+1", "1.0", "0x1", "1_0", "", "%00"])
def test_index_is_ascii_digits_only(port, value):
    """Fullwidth (１), Arabic-Indic (٣), Devanagari (१), superscript (²) digits pass str.isdigit: not here."""
    message = error_of(*request(port, f"/api/tokens?prompt={value}"))
    assert "ASCII digits" in message


@pytest.mark.parametrize("path", ["/api/tokens?prompt=-1", "/api/tokens?prompt=-0", "/api/lens?prompt=-1",
                                  "/api/attention?prompt=0&layer=-1", "/api/attention?prompt=-1&layer=0",
                                  "/api/qk?prompt=0&layer=0&head=-1", "/api/qk?prompt=-5&layer=0&head=0"])
def test_no_parameter_takes_a_negative_index(port, path):
    """The one rule: indexes count from 0; -1 is not 'the last' for any parameter."""
    status, headers, body = request(port, path)
    assert status == 404
    assert "never negative" in error_of(status, headers, body)


def test_indexes_in_range_are_served(port, viewer_store):  # noqa: F811
    last = len(viewer_store.lengths) - 1
    status, _, body = request(port, f"/api/tokens?prompt={last}")
    assert status == 200 and json.loads(body)["n"] == viewer_store.n(last)
    assert request(port, "/api/qk?prompt=0&layer=2&head=3")[0] == 200
    assert request(port, f"/api/tokens?prompt={last + 1}")[0] == 404


@pytest.mark.parametrize("path", [
    "/api/tokens?prompt=0&prompt=1", "/api/tokens?prompt=0&promp=1", "/api/tokens", "/api/tokens?prompt=0;x=1",
    "//[x", "/api/%ff%fe", "/\xff\xfe", "/api/bias?pair=%ff", "/api/probe?label=" + "a" * 500,
    "/api/tokens?prompt=" + "9" * 12, "/api/tokens?" + "prompt=0&" + "x" * 9000])
def test_bad_requests_are_4xx_json(port, path):
    error_of(*request(port, path))


def test_too_long_request_line_is_414_json(port):
    status, headers, body = request(port, "/api/tokens?prompt=0&x=" + "a" * 70_000)
    assert status == 414
    error_of(status, headers, body)


def test_errors_name_the_store_not_its_path(port, viewer_store):  # noqa: F811
    here = os.path.realpath(viewer_store.path)
    for path in ("/api/probe?label=x", "/api/bias?pair=x", "/api/dla?prompt=0"):  # stored results it lacks
        status, headers, body = request(port, path)
        message = error_of(status, headers, body)
        assert "run.zarr" in message, message
        assert os.path.dirname(here) not in message and os.path.dirname(viewer_store.path) not in message, message


# ---- headers on every kind of response ----

def _responses(port):
    yield "page", request(port, "/")
    yield "json", request(port, "/api/meta")
    yield "data", request(port, "/api/tokens?prompt=0")
    yield "script", request(port, "/static/core.js")
    yield "css", request(port, "/static/viewer.css")
    yield "static 404", request(port, "/static/nope.js")
    yield "bad parameter", request(port, "/api/tokens?prompt=x")
    yield "unknown route", request(port, "/nope")
    yield "wrong host", request(port, "/", host="evil.example")
    yield "POST", request(port, "/", method="POST")
    yield "HEAD", request(port, "/", method="HEAD")
    yield "PUT", request(port, "/", method="PUT")
    yield "long URL", request(port, "/" + "a" * 70_000)
    yield "bad request line", exchange(port, b"NONSENSE\r\n\r\n")
    yield "bad version", exchange(port, b"GET / HTTP/x.y\r\n\r\n")
    yield "HTTP/2", exchange(port, b"GET / HTTP/2.0\r\n\r\n")
    yield "made-up method", request(port, "/", method="BREW")
    yield "too many headers", exchange(port, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
                                       + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n")


def test_security_headers_on_every_response(port):
    kinds = set()
    for kind, (status, headers, body) in _responses(port):
        kinds.add(kind)
        csp = headers.get("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, (kind, csp)
        assert headers.get("X-Content-Type-Options") == "nosniff", kind
        assert headers.get("X-Frame-Options") == "DENY", kind
        assert status < 500, (kind, status)
        if status >= 400 and kind != "HEAD":
            error_of(status, headers, body)
    assert len(kinds) == 18


# ---- clients that drop ----

def _reset(s: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): what a killed browser tab does to the server."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_client_drop_is_one_line_never_a_traceback(serve, capfd):
    server = serve(quiet=False, timeout=5.0)
    p = server.server_address[1]
    s = socket.create_connection(("127.0.0.1", p))
    s.sendall(b"GET /api/meta HTTP/1.1\r\nHo")  # reset in the middle of the request head
    time.sleep(0.2)
    _reset(s)
    err = ""
    for _ in range(50):
        time.sleep(0.1)
        err += capfd.readouterr().err
        if "went away" in err:
            break
    assert "Traceback" not in err and "ConnectionResetError" in err, err
    assert len([line for line in err.splitlines() if "went away" in line]) == 1, err
    # A reset while the 3 MB plotly.js is being written (the client reads 4 KiB of it first).
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", p))
    s.sendall(f"GET /static/plotly.min.js HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n".encode())
    s.recv(4096)
    _reset(s)
    err = ""
    for _ in range(50):
        time.sleep(0.1)
        err += capfd.readouterr().err
        if "went away" in err:
            break
    assert "Traceback" not in err and len([line for line in err.splitlines() if "went away" in line]) == 1, err
    assert request(p, "/api/meta")[0] == 200

"""A local web app over one store: an HTML shell plus one JSON endpoint per data slice.

Bound to 127.0.0.1 by default. No part of a request path reaches the filesystem: static
files come from a fixed table read once from the package, data only through data.ENDPOINTS
with typed parameters. Bad requests get a 4xx JSON error naming the store, never a path of the
machine; nothing answers with a traceback. server.py holds the HTTP hardening (Host check,
timeouts, bounded threads, headers).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

from ..errors import MissingArrayError, OutOfRangeError, StratascopeError
from . import data, registry, render
from .registry import VIEWS
from .report import prompt_list, scripts
from .server import (
    DEFAULT_MAX_THREADS,
    DEFAULT_TIMEOUT,
    SECURITY_HEADERS,
    BoundedServer,
    HeadReader,
    allowed_hosts,
    host_problem,
    server_class,
    url_host,
)

PROMPT_LIST_MAX = 500  # above this many prompts the page offers a number box instead of a list
MAX_FIELDS = 20        # query fields per request
MAX_URL = 8192         # characters of a request target
# The one index rule of every integer parameter (prompt, layer, head): ASCII digits, counted from 0.
# A sign makes it out of range (no -1 for the last); \d and str.isdigit would also take '１' or '٣'.
INDEX = re.compile(r"(-?)([0-9]{1,11})")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_params(endpoint: str, query: str) -> dict:
    """The endpoint's parameters from a query string: each required, typed, and nothing else."""
    _, spec = data.ENDPOINTS[endpoint]
    try:
        raw = parse_qs(query, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:  # more than MAX_FIELDS fields
        raise BadRequest(400, f"a request takes at most {MAX_FIELDS} query fields; {endpoint} takes "
                              f"{', '.join(spec) or 'none'}") from None
    extra = sorted(set(raw) - set(spec))
    if extra:
        raise BadRequest(400, f"unknown parameter {extra[0][:40]!r}; {endpoint} takes {', '.join(spec) or 'none'}")
    params = {}
    for name, kind in spec.items():
        values = raw.get(name)
        if not values or len(values) != 1:
            raise BadRequest(400, f"{endpoint} needs exactly one {name} parameter")
        value = values[0]
        if kind is int:
            m = INDEX.fullmatch(value)
            if not m:
                raise BadRequest(400, f"{name} must be a whole number in ASCII digits 0-9, got {value[:40]!r}")
            if m[1]:
                raise BadRequest(404, f"{name} {value} is out of range; indexes count from 0 and are never negative")
            params[name] = int(m[2])
        else:
            params[name] = value[:200]
    return params


class ViewerApp:
    """Serves one Run: the page, its static files and the data endpoints."""

    def __init__(self, run):
        self.run = run
        views = list(VIEWS.values())
        self.static = {name: render.static_text(name).encode() for name in
                       ["core.js", "viewer.css"] + [f"view_{v.name}.js" for v in views]}
        self.static["plotly.min.js"] = render.plotly_js().encode()
        meta = registry.meta(run)
        meta["mode"] = "app"
        if run.n_prompts <= PROMPT_LIST_MAX:
            meta["prompt_list"] = prompt_list(run, list(range(run.n_prompts)))
        self.meta = meta
        # Error messages name the store as the page does, never where it lies on this machine.
        path = str(run.path)
        forms = {path, path.rstrip("/"), os.path.abspath(path), os.path.realpath(path)} - {"", "/"}
        self._paths = sorted(forms, key=len, reverse=True)
        head = '<link rel="stylesheet" href="/static/viewer.css">'
        self.index = render.page(f"stratascope · {meta['store']}", meta, head, scripts(views, inline=False)).encode()

    def public(self, message: str) -> str:
        """`message` with every form of the store's path replaced by its name."""
        for p in self._paths:
            message = message.replace(p, self.meta["store"])
        return message

    def respond(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path` (with its query string)."""
        route, _, query = path.partition("#")[0].partition("?")  # no urlsplit: '//[x' would raise
        if route in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self.index
        if route.startswith("/static/"):
            name = route[len("/static/"):]
            if name not in self.static:  # a fixed table: '..', '%2e%2e' and friends are simply not in it
                return _error(404, f"no static file {name[:80]!r}")
            kind = "text/css" if name.endswith(".css") else "text/javascript"
            return 200, kind + "; charset=utf-8", self.static[name]
        if route == "/api/meta":
            return _json(200, self.meta)
        if route.startswith("/api/"):
            endpoint = route[len("/api/"):]
            if endpoint not in data.ENDPOINTS:
                return _error(404, f"no endpoint {endpoint[:80]!r}; endpoints: {', '.join(data.ENDPOINTS)}")
            try:
                return _json(200, data.call(self.run, endpoint, parse_params(endpoint, query)))
            except BadRequest as e:
                return _error(e.status, self.public(str(e)))
            except (OutOfRangeError, MissingArrayError) as e:
                return _error(404, self.public(str(e)))
            except StratascopeError as e:
                return _error(400, self.public(str(e)))
        return _error(404, f"nothing at {route[:80]!r}")


def _json(status: int, obj: object) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    return _json(status, {"error": message, "status": status})


def make_handler(app: ViewerApp, quiet: bool = True,
                 timeout: float = DEFAULT_TIMEOUT) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "stratascope"
        sys_version = ""

        def setup(self):
            self.timeout = timeout  # StreamRequestHandler sets it on the socket: each read and write
            super().setup()
            self.rfile = HeadReader(self.rfile, self.connection, timeout)  # and the whole head

        def handle_one_request(self):
            self.rfile.restart()
            super().handle_one_request()

        def parse_request(self):  # http.server calls it for every method, before do_*
            if not super().parse_request():
                return False
            self.connection.settimeout(timeout)  # the response gets the whole timeout, not what the head left
            if len(self.path) > MAX_URL:
                self.send_error(414, f"the URL is longer than {MAX_URL} characters")
                return False
            problem = host_problem(self.headers.get_all("Host"), self.server.allowed_hosts)
            if problem:
                self.send_error(*problem)
                return False
            if self.command != "GET":  # HEAD, POST, PUT, made-up methods: 405, not http.server's 501
                self.send_error(405, "the viewer only answers GET")
                return False
            return True

        def do_GET(self):  # http.server's name
            try:
                status, kind, body = app.respond(self.path)
            except Exception as e:  # a bug must not leak a traceback to the browser
                print(f"stratascope view: error on {self.path[:200]}: {type(e).__name__}: {e}", file=sys.stderr)
                status, kind, body = _error(500, "internal error; see the server's terminal")
            self.reply(status, kind, body)

        def reply(self, status: int, kind: str, body: bytes, close: bool = False):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            if status == 405:
                self.send_header("Allow", "GET")
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def end_headers(self):  # every response, whichever path wrote it
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            super().end_headers()

        def send_error(self, code, message=None, explain=None):
            # Malformed requests (bad request line, too long) also answer JSON, never an HTML page;
            # a version it does not speak is the client's error too (4xx, not http.server's 505).
            if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
                code = 400
            if getattr(self, "request_version", "") == "HTTP/0.9":  # set for a garbled request line: an answer without
                self.request_version = "HTTP/1.0"   # a status line would lack the headers too
            body = _error(code, app.public(message or HTTPStatus(code).phrase))[2]
            try:
                self.reply(code, "application/json", body, close=True)
            except OSError:
                pass

        def log_message(self, format, *args):  # http.server's signature
            if not quiet:
                super().log_message(format, *args)

    return Handler


def make_server(run, host: str = "127.0.0.1", port: int = 8765, quiet: bool = True, timeout: float = DEFAULT_TIMEOUT,
                max_threads: int = DEFAULT_MAX_THREADS) -> BoundedServer:
    """The app over `run`, bound to host:port (0: any free port). A client has `timeout` seconds to send
    a request head and to read the answer; at most `max_threads` requests are handled at once."""
    bind = host.strip("[]")
    server = server_class(bind)((bind, port), make_handler(ViewerApp(run), quiet=quiet, timeout=timeout),
                                max_threads=max_threads, quiet=quiet)
    port = server.server_address[1]
    server.allowed_hosts = allowed_hosts(bind, port)
    server.url = f"http://{url_host(bind)}:{port}/"
    return server


def serve_in_thread(run, host: str = "127.0.0.1", port: int = 0, **options) -> tuple[BoundedServer, str]:
    """Start the app in a background thread (tests, notebooks); returns the server and its URL.
    `options` are make_server's (quiet, timeout, max_threads)."""
    server = make_server(run, host, port, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.url

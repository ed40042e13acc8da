"""A local web app over one store: an HTML shell plus one JSON endpoint per data slice.

Bound to 127.0.0.1 by default. No part of a request path reaches the filesystem: static
files come from a fixed table read once from the package, data only through data.ENDPOINTS
with typed parameters. Bad requests get a 4xx JSON error; nothing answers with a traceback.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from ..errors import MissingArrayError, OutOfRangeError, StratascopeError
from . import data, registry, render
from .registry import VIEWS
from .report import prompt_list, scripts

PROMPT_LIST_MAX = 500  # above this many prompts the page offers a number box instead of a list
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self' data:")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_params(endpoint: str, query: str) -> dict:
    """The endpoint's parameters from a query string: each required, typed, and nothing else."""
    _, spec = data.ENDPOINTS[endpoint]
    raw = parse_qs(query, keep_blank_values=True, max_num_fields=20)
    extra = sorted(set(raw) - set(spec))
    if extra:
        raise BadRequest(400, f"unknown parameter {extra[0]!r}; {endpoint} takes {', '.join(spec)}")
    params = {}
    for name, kind in spec.items():
        values = raw.get(name)
        if not values or len(values) != 1:
            raise BadRequest(400, f"{endpoint} needs exactly one {name} parameter")
        value = values[0]
        if kind is int:
            if not re.fullmatch(r"-?\d{1,11}", value):
                raise BadRequest(400, f"{name} must be an integer, got {value[:40]!r}")
            params[name] = int(value)
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
        head = '<link rel="stylesheet" href="/static/viewer.css">'
        self.index = render.page(f"stratascope · {meta['store']}", meta, head, scripts(views, inline=False)).encode()

    def respond(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path` (with its query string)."""
        parts = urlsplit(path)
        route = parts.path
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
                return _json(200, data.call(self.run, endpoint, parse_params(endpoint, parts.query)))
            except BadRequest as e:
                return _error(e.status, str(e))
            except (OutOfRangeError, MissingArrayError) as e:
                return _error(404, str(e))
            except StratascopeError as e:
                return _error(400, str(e))
        return _error(404, f"nothing at {route[:80]!r}")


def _json(status: int, obj: object) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    return _json(status, {"error": message, "status": status})


def make_handler(app: ViewerApp, quiet: bool = True) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "stratascope"
        sys_version = ""

        def do_GET(self):  # http.server's name
            try:
                status, kind, body = app.respond(self.path)
            except Exception as e:  # a bug must not leak a traceback to the browser
                print(f"stratascope view: error on {self.path[:200]}: {type(e).__name__}: {e}", file=sys.stderr)
                status, kind, body = _error(500, "internal error; see the server's terminal")
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            if kind.startswith("text/html"):
                self.send_header("Content-Security-Policy", CSP)
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self):
            self.send_error(405)

        def do_POST(self):
            body = _error(405, "the viewer only answers GET")[2]
            self.send_response(405)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_error(self, code, message=None, explain=None):
            # Malformed requests (bad request line, too long) also answer JSON, never an HTML page.
            body = _error(code, message or HTTPStatus(code).phrase)[2]
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass

        def log_message(self, format, *args):  # http.server's signature
            if not quiet:
                super().log_message(format, *args)

    return Handler


def make_server(run, host: str = "127.0.0.1", port: int = 8765, quiet: bool = True) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(ViewerApp(run), quiet=quiet))
    server.daemon_threads = True
    return server


def serve_in_thread(run, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start the app in a background thread (tests, notebooks); returns the server and its URL."""
    server = make_server(run, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}/"

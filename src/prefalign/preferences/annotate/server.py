"""The web page of `annotate --serve`: a standard-library HTTP server, one access token.

Every request needs the token, as `?token=` (the link printed at start), the
X-Prefalign-Token header (the page's API calls) or the cookie the page load sets; anything
else gets 403. The page (page.html) is one file whose inline style and script are allowed
by their hashes in the Content-Security-Policy and nothing else runs or loads: model text
is put in with textContent, and the policy also forbids requests to any other origin.

JSON API (POST, JSON body with "annotator"):
    /api/next   the item to show and the progress          -> {"item": {...} | null,
    /api/label  {"key", "ranking": ["C", "A=B"], "strength"?}   "progress": {...}}
    /api/skip   {"key"}
    /api/undo   {}                                          (the undone item again)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prefalign.errors import ConfigError, PrefalignError
from prefalign.preferences.annotate.ranking import read_items, select_items
from prefalign.preferences.annotate.team import Team
from prefalign.text import printable

PAGE = Path(__file__).with_name("page.html")
TOKEN_HEADER = "X-Prefalign-Token"
COOKIE = "prefalign_token"
MAX_BODY = 1 << 20  # a ranking of 26 labels is well under a kilobyte
MAX_GUIDELINES = 100_000  # characters: a page of guidance, not a manual


def page_and_policy(guidelines: str = "") -> tuple[bytes, str]:
    """The page with the guidelines in its data block, and the Content-Security-Policy that
    allows its one inline style and one inline script by their SHA-256 and nothing else."""
    html = PAGE.read_text(encoding="utf-8")
    # JSON in a <script type="application/json"> block: "<" escaped, so the text can never
    # close the block; the page reads it as text and shows it with textContent.
    data = json.dumps({"guidelines": guidelines}).replace("<", "\\u003c")
    html = html.replace("/*GUIDELINES*/{}", data)

    def digest(tag: str) -> str:
        found = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        hashed = base64.b64encode(hashlib.sha256(found.group(1).encode()).digest()).decode()
        return f"'sha256-{hashed}'"

    policy = (f"default-src 'self'; script-src {digest('script')}; style-src {digest('style')}; "
              "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return html.encode("utf-8"), policy


class AnnotateServer(ThreadingHTTPServer):
    """The server with what its handlers share: the team, the token, the page, and a log of
    every request as (method, path, status), which the tests read."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], team: Team, token: str, guidelines: str = ""):
        self.team, self.token = team, token
        self.page, self.policy = page_and_policy(guidelines)
        self.requests: list[tuple[str, str, int]] = []
        self.log_lock = threading.Lock()
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{port}/?token={self.token}"


class Handler(BaseHTTPRequestHandler):
    server: AnnotateServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # the log is server.requests
        pass

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        with self.server.log_lock:
            self.server.requests.append((self.command, urlsplit(self.path).path, int(code)))

    def _send(self, status: int, body: bytes, kind: str, extra: dict | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": kind, "Content-Length": str(len(body)),
                   "Content-Security-Policy": self.server.policy,
                   "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                   "Cache-Control": "no-store", "X-Frame-Options": "DENY", **(extra or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _allowed(self) -> bool:
        """The token came as ?token=, the header or the cookie (constant-time compare)."""
        given = [*parse_qs(urlsplit(self.path).query).get("token", []),
                 self.headers.get(TOKEN_HEADER, "")]
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except Exception:  # a malformed cookie header counts as no token
            cookie = SimpleCookie()
        if COOKIE in cookie:
            given.append(cookie[COOKIE].value)
        token = self.server.token.encode()
        return any(hmac.compare_digest(value.encode(), token) for value in given if value)

    def do_GET(self) -> None:
        if not self._allowed():
            return self._json(403, {"error": "open the link with the token that annotate "
                                    "printed"})
        if urlsplit(self.path).path != "/":
            return self._json(404, {"error": "not found"})
        cookie = f"{COOKIE}={self.server.token}; Path=/; HttpOnly; SameSite=Strict"
        self._send(200, self.server.page, "text/html; charset=utf-8", {"Set-Cookie": cookie})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            return self._json(413, {"error": "request too large"})
        body = self.rfile.read(length)
        if not self._allowed():
            return self._json(403, {"error": "the access token is missing or wrong: open the "
                                    "link that annotate printed"})
        # Only JSON bodies: another site's plain form post cannot send one without the
        # browser asking this server first, and it has neither the token nor the cookie.
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            return self._json(415, {"error": "send JSON"})
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            self._json(200, self._answer(urlsplit(self.path).path, request))
        except LookupError:
            self._json(404, {"error": "not found"})
        except ValueError as e:  # a refused ranking, an unknown name, bad JSON
            self._json(400, {"error": str(e)})
        except PrefalignError as e:  # a save that failed (disk full) or a damaged record
            self._json(500, {"error": printable(str(e))})

    def _answer(self, path: str, request: dict) -> dict:
        team, name = self.server.team, request.get("annotator")
        if path == "/api/next":
            return team.next(name)
        if path == "/api/label":
            return team.decide(name, request.get("key"), request.get("ranking"),
                               request.get("strength"))
        if path == "/api/skip":
            return team.decide(name, request.get("key"), skip=True)
        if path == "/api/undo":
            return team.undo(name)
        raise LookupError(path)


def start_server(config: Any) -> AnnotateServer:
    """Read the items and the annotators' records, bind the port; serve_forever() serves."""
    items = select_items(read_items(config.input), config.select, config.limit,
                         config.judgments, config.seed)
    guidelines = ""
    if config.guidelines:
        try:
            guidelines = Path(config.guidelines).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--guidelines {config.guidelines}: cannot read it ({e})") from None
        if len(guidelines) > MAX_GUIDELINES:
            raise ConfigError(f"--guidelines {config.guidelines}: {len(guidelines)} characters; "
                              f"the page shows at most {MAX_GUIDELINES}: shorten it")
    team = Team(items, Path(config.output), str(config.input), config.overlap, config.seed)
    try:
        return AnnotateServer((config.host, config.port), team, secrets.token_urlsafe(24),
                              guidelines)
    except OSError as e:
        raise ConfigError(f"cannot serve on {config.host}:{config.port} ({e.strerror or e}); "
                          "choose another --port (0 takes a free one) or --host") from None


def serve(config: Any) -> None:
    """Serve until Ctrl-C, printing the link to open."""
    server = start_server(config)
    where = ("" if config.host in ("127.0.0.1", "localhost", "::1") else
             " (open to the network: share the link only with your annotators)")
    print(f"annotate: {len(server.team.items)} items; open {server.url}{where}\n"
          "Ctrl-C stops the server; every label is saved as it is made.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        output = Path(config.output)
        print(f"\nstopped; each annotator's labels are in {output.stem}.NAME{output.suffix} "
              "beside --output, and the same command continues", file=sys.stderr)
    finally:
        server.server_close()

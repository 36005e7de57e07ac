"""The OpenAI-compatible chat endpoint as a judge: one request per ask, standard library
HTTP only, bounded in time and size, with the API key kept out of everything written.

`--timeout` bounds a whole request (connect, send, every read), not each socket read, so a
server that trickles a byte at a time cannot hold a run; replies over
`--max-response-bytes` are refused without being read whole. A network error, a reply cut
short or too slow, 429 or 5xx is retried with exponential backoff (`_Retry`); a reply that
is not a chat-completions response is a `ReplyFault`, and its item is left unjudged. The key
is sent only as the Authorization header, redirects are refused so it never reaches another
host, and every occurrence of it in server text is replaced by [redacted] before that text
is stored or printed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prefalign.errors import ConfigError, PrefalignError
from prefalign.text import printable


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would resend the Authorization header to wherever a redirect points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class ReplyFault(PrefalignError):
    """One item's request got no usable reply (cut short, too slow, too large, not JSON):
    the item is recorded as unjudged with this reason, and the run goes on."""


class NoAnswer(str):
    """Stands in for the answer of an item whose request failed; the text is the reason."""


class _Deadline:
    """One time limit for a whole request: connect, send and every read together.

    A socket timeout bounds each read alone, so a server sending a byte a second would hold a
    request forever. A timer shuts the request's sockets down at the deadline instead, which
    ends whatever read or write is waiting on them.
    """

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:  # the plain socket's shutdown: an SSL socket's own would race its reader
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def handlers(self) -> list[urllib.request.BaseHandler]:
        """urllib handlers whose connections (to the endpoint or a proxy) obey the deadline."""
        deadline = self

        def bounded(base: type) -> type:
            class Connection(base):  # type: ignore[misc, valid-type]
                def __init__(self, *args, **kwargs):
                    super().__init__(*args, **kwargs)
                    create = self._create_connection
                    self._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))

                def connect(self):
                    super().connect()
                    deadline.watch(self.sock)  # the TLS socket, once wrapped

            return Connection

        class Http(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(bounded(http.client.HTTPConnection), req)

        class Https(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(bounded(http.client.HTTPSConnection), req,
                                    context=self._context)

        return [Http(), Https()]


# Env var names by convention are upper case; a lower-case or punctuated value of
# --api-key-env that names no set variable is most likely the key itself.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
MAX_RESPONSE_BYTES = 1 << 20
# Raw answers are kept for inspection; a ranking needs a few hundred characters.
MAX_STORED_ANSWER = 4000


def stored_answer(answer: str, limit: int = MAX_STORED_ANSWER) -> str:
    """`answer` as judgments.jsonl keeps it: cut to `limit` characters with a marker."""
    if len(answer) <= limit:
        return answer
    return answer[:limit] + f"...[cut: {len(answer)} characters in all]"


class HttpJudge:
    """An OpenAI-compatible chat-completions endpoint; the key stays in this object only.

    Each request is bounded by `timeout` seconds in all and `max_response_bytes` of reply.
    Network errors, a reply cut short, the time limit, 429 and 5xx are retried with backoff.
    A refused connection after the retries, or another HTTP error, stops the run
    (PrefalignError); any other failure of one request is a ReplyFault, and the item becomes
    a NoAnswer, unless every item of a call fails before any reply was usable: then the
    endpoint, not the items, is at fault and the run stops.
    """

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, network_retries: int = 5, backoff: float = 1.0,
                 max_new_tokens: int = 256, temperature: float = 0.0,
                 retry_temperature: float = 0.7, workers: int = 4,
                 max_response_bytes: int = MAX_RESPONSE_BYTES):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"judge URL {printable(repr(url))}: give http(s)://host:port/v1")
        if not timeout > 0 or network_retries < 0 or max_response_bytes < 1:
            raise ConfigError(f"need --timeout > 0, --network-retries >= 0 and "
                              f"--max-response-bytes >= 1, got {timeout}, {network_retries}, "
                              f"{max_response_bytes}")
        if api_key_env not in os.environ and not _ENV_NAME.fullmatch(api_key_env):
            raise ConfigError("--api-key-env takes the NAME of an environment variable, not "
                              "the key: no variable of the name given is set, and it does not "
                              "look like one (A-Z, 0-9, _); the value is not shown. Export the "
                              "key, e.g. MY_KEY=..., and pass --api-key-env MY_KEY")
        # Credentials written into the URL are left out of anything recorded.
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.endpoint = f"{parts.scheme}://{host}{parts.path.rstrip('/')}/chat/completions"
        self.name = model
        self._key = os.environ.get(api_key_env) or None
        self.api_key_env = api_key_env
        self.settings = {"judge": model, "backend": "http", "url": self.endpoint,
                         "max_new_tokens": max_new_tokens, "temperature": temperature,
                         "retry_temperature": retry_temperature}
        self.timeout, self.network_retries, self.backoff = timeout, network_retries, backoff
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.retry_temperature, self.workers = retry_temperature, workers
        self.max_response_bytes = max_response_bytes
        self.replies = 0  # usable replies so far

    def __repr__(self) -> str:
        return f"HttpJudge({self.endpoint!r}, {self.name!r})"

    def __call__(self, texts: list[str], attempt: int) -> list[str]:
        temperature = self.temperature if attempt == 0 else self.retry_temperature

        def ask(text: str) -> str:
            try:
                answer = self.complete(text, temperature)
            except ReplyFault as e:
                return NoAnswer(str(e))
            self.replies += 1
            return answer

        with ThreadPoolExecutor(max(1, min(self.workers, len(texts)))) as pool:
            answers = list(pool.map(ask, texts))
        if answers and not self.replies and all(isinstance(a, NoAnswer) for a in answers):
            raise PrefalignError(f"{answers[0]}; every request so far failed, so the endpoint "
                                 "is at fault, not the items: nothing was recorded for them. "
                                 "Check the server and --judge-url, then run the same "
                                 "command again")
        return answers

    def complete(self, text: str, temperature: float) -> str:
        """The answer to one prompt; ReplyFault or PrefalignError (see the class doc)."""
        body = json.dumps({"model": self.name, "temperature": temperature,
                           "max_tokens": self.max_new_tokens,
                           "messages": [{"role": "user", "content": text}]}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last, retry_after, refused = "", None, False
        for attempt in range(self.network_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers,
                                             method="POST")
            try:
                return self._content(self._post(request))
            except _Retry as e:
                last, retry_after, refused = e.reason, e.retry_after, e.refused
        tries = self.network_retries + 1
        message = (f"judge {self.endpoint}: no answer after {tries} "
                   f"{'try' if tries == 1 else 'tries'} (last: {self._shown(last)})")
        if refused:  # nothing listens there: no other item would fare better
            raise PrefalignError(message)
        raise ReplyFault(message)

    def _post(self, request: urllib.request.Request) -> bytes:
        """One request within the time limit: the reply's body; _Retry for what a retry may
        mend, PrefalignError for an HTTP refusal, ReplyFault for a reply over the cap."""
        deadline = _Deadline(self.timeout)
        opener = urllib.request.build_opener(_NoRedirect, *deadline.handlers())
        try:
            with deadline:
                try:
                    with opener.open(request, timeout=self.timeout) as response:
                        raw = self._read(response)
                except urllib.error.HTTPError as e:
                    if e.code != 429 and e.code < 500:
                        raise PrefalignError(self._refusal(e)) from None
                    raise _Retry(f"HTTP {e.code}",
                                 e.headers.get("Retry-After") if e.headers else None) from None
        except (_Cut, urllib.error.URLError, OSError, http.client.HTTPException) as e:
            if deadline.expired:  # the shut-down socket reads as a closed connection
                raise _Retry(f"no complete reply within --timeout {self.timeout:g} s") from None
            if isinstance(e, _Cut):
                raise _Retry(f"the reply was cut short ({e})") from None
            reason = getattr(e, "reason", e)
            raise _Retry(f"{type(reason).__name__}: {reason}", refused=isinstance(
                reason, (ConnectionRefusedError, socket.gaierror))) from None
        if deadline.expired:  # a body without Content-Length ends where the socket was shut
            raise _Retry(f"no complete reply within --timeout {self.timeout:g} s")
        return raw

    def _read(self, response: Any) -> bytes:
        """The body, at most max_response_bytes; ReplyFault above, _Cut when it ends early."""
        cap = self.max_response_bytes
        declared = response.headers.get("Content-Length", "")
        declared = int(declared) if declared.strip().isdigit() else None
        if declared is not None and declared > cap:
            raise self._too_large(f"{declared} bytes announced")
        chunks, size = [], 0
        while True:
            chunk = response.read(min(1 << 16, cap + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                raise self._too_large("more was sent")
        if declared is not None and size < declared:
            raise _Cut(f"{size} of {declared} bytes announced")
        return b"".join(chunks)

    def _too_large(self, detail: str) -> ReplyFault:
        return ReplyFault(f"judge {self.endpoint}: reply over --max-response-bytes "
                          f"{self.max_response_bytes} ({detail}); raise it if the server's "
                          "answers are that long")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff; a numeric Retry-After of a 429/503 wins, capped at 60 s."""
        try:
            return min(max(float(retry_after), 0.0), 60.0)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return self.backoff * 2 ** (attempt - 1)

    def _refusal(self, error: urllib.error.HTTPError) -> str:
        try:
            raw = error.read(4096).decode("utf-8", "replace")
            detail = raw.strip().splitlines()[0][:200]
        except (OSError, IndexError, http.client.HTTPException):
            detail = ""
        hint = ""
        if error.code in (401, 403):
            hint = (f" (check the key in ${self.api_key_env})" if self._key else
                    f" (${self.api_key_env} is not set; set it to the API key)")
        return (f"judge {self.endpoint}: HTTP {error.code} {self._shown(str(error.reason))}"
                f"{hint}" + (f": {self._shown(detail)}" if detail else ""))

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except RecursionError:
            raise ReplyFault(f"judge {self.endpoint}: reply nested too deeply to read "
                             f"({len(raw)} bytes)") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise ReplyFault(f"judge {self.endpoint}: not a chat-completions response: "
                             f"{self._shown(raw[:200].decode('utf-8', 'replace'))}") from None
        return self.redact(content) if isinstance(content, str) else ""

    def redact(self, text: str) -> str:
        """`text` with every occurrence of the API key replaced by [redacted]."""
        return text.replace(self._key, "[redacted]") if self._key else text

    def _shown(self, text: str) -> str:
        """Server text for a console line: the key redacted, control characters escaped."""
        return printable(self.redact(text), keep="")


class _Cut(Exception):
    """The connection closed before the body announced by Content-Length was complete."""


class _Retry(Exception):
    """A failed request that a retry may mend: a network error, a reply cut short or too
    slow, a 429 or 5xx. `refused`: nothing accepted the connection."""

    def __init__(self, reason: str, retry_after: str | None = None, refused: bool = False):
        super().__init__(reason)
        self.reason, self.retry_after, self.refused = reason, retry_after, refused

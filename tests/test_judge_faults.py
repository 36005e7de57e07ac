"""The judge against a faulty endpoint on 127.0.0.1: replies cut short, trickled, nested
200k deep, over the size cap, carrying terminal escapes or the API key. Every request here
ends within a few seconds, and the servers stop with the test."""

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import write_jsonl
from prefalign.cli import main
from prefalign.preferences.annotate import annotate
from prefalign.preferences.http_judge import MAX_STORED_ANSWER, HttpJudge, ReplyFault
from prefalign.text import printable

KEY = "sk-test-5b2e8d41-DO-NOT-LEAK"


def completion(content: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant",
                                                "content": content}}]}).encode()


class FaultServer:
    """/v1/chat/completions on 127.0.0.1; the first word of `replies` found in a request's
    prompt picks its reply: a function (handler, request body) -> None that writes the raw
    response. Requests are counted per word."""

    def __init__(self, replies):
        self.replies, self.counts, self.stop = replies, {}, threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][0]["content"]
                word = next(w for w in server.replies if w in text)
                server.counts[word] = server.counts.get(word, 0) + 1
                try:
                    server.replies[word](self, body)
                except OSError:  # the client gave up: that is the point of some cases
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, data: bytes, status=200, reason=None, length=None):
    handler.send_response(status, reason)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data) if length is None else length))
    handler.end_headers()
    handler.wfile.write(data)
    handler.wfile.flush()


def answer(content):
    return lambda h, body: send(h, completion(content))


def echo_key(h, body):
    send(h, completion(f"1,0 (you sent {h.headers['Authorization']})"))


def deep(h, body):
    send(h, b"[" * 200_000 + b"]" * 200_000)


def cut(h, body):
    send(h, completion("1,0")[:20], length=1000)  # announces 1000 bytes, sends 20, closes
    h.close_connection = True


def trickle(server, headers_too=False):
    """A valid reply sent a byte every 0.2 s (about 20 s in all), status line too if asked."""
    def reply(h, body):
        data = completion("1,0")
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        if not headers_too:
            h.wfile.write(head)
            h.wfile.flush()
            head = b""
        for byte in head + data:
            if server.stop.wait(0.2):
                return
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
        h.close_connection = True
    return reply


def huge(h, body):
    send(h, completion("1,0" + " padding" * 300_000))  # about 2.4 MB


def escapes(h, body):
    send(h, b"\x1b]0;owned\x07\x1b[2J not json")


def rows_for(words):
    return [{"prompt": f"Question about {w}", "candidates": [f"{w} first", f"{w} second"]}
            for w in words]


def errors(err):
    """The error lines of stderr (a progress bar may share it); there must be no traceback."""
    assert "Traceback" not in err
    return [line for line in err.split("\n") if line.startswith("prefalign:")]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def judge_cli(data, out, url, *extra):
    return main(["judge", "--input", data, "--output", str(out), "--judge-url", url,
                 "--judge-model", "m", "--api-key-env", "JUDGE_KEY", "--workers", "8",
                 *extra])


def test_faulty_replies_leave_their_items_unjudged_and_the_run_goes_on(
        tmp_path, monkeypatch, capsys, no_proxy):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    server = FaultServer({"good": answer("1,0"), "long": answer("1,0" + " so" * 5000),
                          "echo": echo_key, "deep": deep, "cut": cut, "huge": huge,
                          "escapes": escapes})
    server.replies["slow"] = trickle(server)
    words = ["good", "deep", "cut", "slow", "huge", "escapes", "echo", "long"]
    data = write_jsonl(tmp_path / "c.jsonl", rows_for(words))
    out = tmp_path / "pairs.jsonl"
    start = time.monotonic()
    try:
        code = judge_cli(data, out, server.url, "--timeout", "2", "--network-retries", "1",
                         "--batch-size", "8")
    finally:
        server.close()
    elapsed = time.monotonic() - start
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # Two tries of at most 2 s each for the slow item, 1 s of backoff between them.
    assert elapsed < 10
    records = {r["origin"].rsplit(":", 1)[1]: r for r in lines(tmp_path / "pairs.judgments.jsonl")}
    by_word = {w: records[str(i + 1)] for i, w in enumerate(words)}
    assert {w: r["status"] for w, r in by_word.items()} == {
        "good": "judged", "deep": "unjudged", "cut": "unjudged", "slow": "unjudged",
        "huge": "unjudged", "escapes": "unjudged", "echo": "judged", "long": "judged"}
    reasons = {w: r["reason"] for w, r in by_word.items()}
    assert "nested too deeply" in reasons["deep"]
    assert "cut short (20 of 1000 bytes" in reasons["cut"] and server.counts["cut"] == 2
    assert "no complete reply within --timeout 2 s" in reasons["slow"]
    assert "over --max-response-bytes 1048576" in reasons["huge"]
    assert "not a chat-completions response" in reasons["escapes"]
    assert "\\x1b]0;owned\\x07" in reasons["escapes"]
    # Faulty items are not asked again at the ranking level: asking again would fail again.
    assert server.counts["deep"] == 1 and server.counts["huge"] == 1
    # The key the server echoed is redacted in what is stored; long answers are cut.
    assert by_word["echo"]["answers"] == ["1,0 (you sent Bearer [redacted])"]
    stored = by_word["long"]["answers"][0]
    assert len(stored) < MAX_STORED_ANSWER + 50 and stored.endswith("15003 characters in all]")
    assert {p["prompt"].split()[-1] for p in lines(out)} == {"good", "echo", "long"}
    # One warning line per unjudged item, no traceback, no raw control character, no key.
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 5
    assert "Traceback" not in printed.err
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    for text in (printed.out, printed.err, written):
        assert "\x1b" not in text and "\x07" not in text and KEY not in text


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "status-line"])
def test_the_timeout_bounds_the_whole_request(no_proxy, headers_too):
    """A byte every 0.2 s never trips a per-read timeout; the deadline ends it at 1 s."""
    server = FaultServer({})
    server.replies["slow"] = trickle(server, headers_too)
    judge = HttpJudge(server.url, "m", api_key_env="UNSET_FOR_THIS_TEST", timeout=1,
                      network_retries=0)
    start = time.monotonic()
    try:
        with pytest.raises(ReplyFault, match=r"within --timeout 1 s"):
            judge.complete("slow", 0.0)
    finally:
        server.close()
    assert time.monotonic() - start < 3


def test_replies_over_the_cap_are_refused_without_reading_them_whole(no_proxy, tmp_path,
                                                                     capsys):
    server = FaultServer({"big": answer("1,0" + " x" * 10_000), "ok": answer("1,0")})
    data = write_jsonl(tmp_path / "c.jsonl", rows_for(["ok", "big"]))
    out = tmp_path / "pairs.jsonl"
    try:
        assert judge_cli(data, out, server.url, "--max-response-bytes", "4096") == 0
    finally:
        server.close()
    records = lines(tmp_path / "pairs.judgments.jsonl")
    assert [r["status"] for r in records] == ["judged", "unjudged"]
    assert "over --max-response-bytes 4096 (20" in records[1]["reason"]
    assert records[1]["answers"] == []
    assert main(["judge", "--input", data, "--output", str(tmp_path / "o.jsonl"),
                 "--judge-url", server.url, "--judge-model", "m",
                 "--max-response-bytes", "0"]) == 2
    assert "--max-response-bytes >= 1" in capsys.readouterr().err


def test_every_item_failing_before_any_reply_stops_cleanly_and_the_rerun_completes(
        tmp_path, capsys, no_proxy):
    server = FaultServer({"q": deep})
    data = write_jsonl(tmp_path / "c.jsonl", rows_for(["q0", "q1", "q2"]))
    out = tmp_path / "pairs.jsonl"
    try:
        assert judge_cli(data, out, server.url, "--batch-size", "2") == 2
        [err] = errors(capsys.readouterr().err)
        assert err.startswith("prefalign: error: judge ")
        assert "nested too deeply" in err and "run the same command again" in err
        assert not out.exists() or out.read_text() == ""
        judgments = tmp_path / "pairs.judgments.jsonl"
        assert not judgments.exists() or judgments.read_text() == ""
        server.replies["q"] = answer("1,0")  # the server is fixed
        assert judge_cli(data, out, server.url, "--batch-size", "2") == 0
    finally:
        server.close()
    assert [r["status"] for r in lines(tmp_path / "pairs.judgments.jsonl")] == ["judged"] * 3
    assert len(lines(out)) == 3


def test_server_text_in_an_error_is_escaped_and_the_key_redacted(tmp_path, monkeypatch,
                                                                 capsys, no_proxy):
    monkeypatch.setenv("JUDGE_KEY", KEY)

    def refuse(h, body):
        send(h, f"\x1b[2J\x07bad key {h.headers['Authorization']}\n".encode(), status=401,
             reason="Unauthorized\x1b[31m")

    server = FaultServer({"q": refuse})
    data = write_jsonl(tmp_path / "c.jsonl", rows_for(["q"]))
    try:
        assert judge_cli(data, tmp_path / "pairs.jsonl", server.url) == 2
    finally:
        server.close()
    printed = capsys.readouterr().err
    [err] = errors(printed)
    assert "HTTP 401 Unauthorized\\x1b[31m" in err
    assert "\\x1b[2J\\x07bad key Bearer [redacted]" in err
    assert "\x1b" not in printed and "\x07" not in printed and KEY not in printed


def test_a_key_given_to_api_key_env_is_never_echoed(tmp_path, capsys, no_proxy):
    def refuse(h, body):
        send(h, b"unauthorized", status=401)

    server = FaultServer({"q": refuse})
    data = write_jsonl(tmp_path / "c.jsonl", rows_for(["q"]))
    secret = "sk-abc123def456ghi789"
    try:
        assert main(["judge", "--input", data, "--output", str(tmp_path / "p.jsonl"),
                     "--judge-url", server.url, "--judge-model", "m",
                     "--api-key-env", secret]) == 2
        assert server.counts == {}  # refused before anything was sent
        # A conventional name that is unset still says so by name, as before.
        assert main(["judge", "--input", data, "--output", str(tmp_path / "p.jsonl"),
                     "--judge-url", server.url, "--judge-model", "m",
                     "--api-key-env", "UNSET_JUDGE_KEY"]) == 2
    finally:
        server.close()
    first, second = errors(capsys.readouterr().err)
    assert "--api-key-env takes the NAME of an environment variable, not the key" in first
    assert secret not in first and "abc123" not in first
    assert "$UNSET_JUDGE_KEY is not set" in second


def test_a_file_name_with_escapes_is_escaped_in_errors_and_on_the_annotate_screen(tmp_path,
                                                                                  capsys):
    missing = tmp_path / "t\x1b[2Jemplate.txt"
    assert main(["judge", "--input", "x.jsonl", "--output", str(tmp_path / "o.jsonl"),
                 "--judge-model", "m", "--judge-url", "http://127.0.0.1:9/v1",
                 "--template", str(missing)]) == 2
    printed = capsys.readouterr().err
    [err] = errors(printed)
    assert "t\\x1b[2Jemplate.txt" in err and "\x1b" not in printed

    data = write_jsonl(tmp_path / "in\x1b]0;x\x07.jsonl",
                       [{"prompt": "p\x1b[31m", "candidates": ["a\x9b2J", "b"]}])
    screen = io.StringIO()
    annotate(data, tmp_path / "out\x1b[5m.jsonl", stdin=io.StringIO("B A\n"), stdout=screen,
             width=80)
    text = screen.getvalue()
    assert "in\\x1b]0;x\\x07.jsonl:1" in text and "out\\x1b[5m.jsonl" in text
    assert "p?[31m" in text and "a?2J" in text
    assert not any(c in text for c in "\x1b\x07\x9b")


def test_printable_escapes_controls_and_always_esc():
    assert printable("a\x1b[2Jb\x07c\x9bd") == "a\\x1b[2Jb\\x07c\\x9bd"
    assert printable("line\n\ttab\r") == "line\n\ttab\\x0d"
    assert printable("a\nb", keep="") == "a\\x0ab"
    assert printable("\x1b", keep="\x1b") == "\\x1b"
    assert printable("x\x00y\x1b", replace="?") == "x?y?"
    assert printable("plain ünïcode → ok") == "plain ünïcode → ok"

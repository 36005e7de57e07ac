"""prefalign annotate --serve: the team state, the HTTP server and the real page in headless
Chromium (driven over the DevTools protocol on a pipe: tests/cdp.py).

The browser tests press real keys in the page, read what it shows, reload it, open two
isolated browser sessions (own cookies and localStorage) for two annotators, and check that
model text with <script> and <img onerror> stays text: nothing runs, and neither the
browser's own record of requests nor the server's log holds any request but the page and
its API calls. They also write the README's screenshot, docs/images/annotate-serve.png.
"""

import io
import json
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from cdp import CHROMIUM, Browser
from helpers import write_jsonl
from prefalign.cli import main
from prefalign.config import build_config
from prefalign.errors import ConfigError, DataError
from prefalign.preferences.annotate import AnnotateConfig, annotate, read_items
from prefalign.preferences.annotate.server import start_server
from prefalign.preferences.annotate.team import Team, overlap_copies

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "annotate-serve.png"
API = {"/api/next", "/api/label", "/api/skip", "/api/undo"}
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless Chromium not installed: /usr/bin/chromium is "
    "absent (apt-get install -y chromium)")


def candidate_rows(n, k=3):
    return [{"prompt": f"Question {i}?", "candidates": [f"answer {c}{i}" for c in "abcd"[:k]]}
            for i in range(n)]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@contextmanager
def serving(tmp_path, rows, monkeypatch, **options):
    """A server on a free port over `rows`, its output in tmp_path/work, run from an empty
    working directory; afterwards nothing but the annotators' files may have been added."""
    work, cwd = tmp_path / "work", tmp_path / "cwd"
    work.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    path = write_jsonl(work / "in.jsonl", rows)
    config = build_config(AnnotateConfig, {"input": path, "output": str(work / "labels.jsonl"),
                                           "serve": True, "port": 0, **options})
    server = start_server(config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
    assert files(cwd) == []
    names = {p.name for p in server.team.annotators.values() for p in
             (p.output, p.output.with_name(p.output.name + ".progress.json"))}
    assert set(files(work)) <= {"in.jsonl", *names}, files(work)


def post(server, path, body, token=True, headers=None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.server_address[1]}{path}", json.dumps(body).encode(),
        {"Content-Type": "application/json",
         **({"X-Prefalign-Token": server.token} if token else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def pairs(path):
    return [(r["chosen"], r["rejected"]) for r in map(json.loads, Path(path).open())]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium")
    chrome = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield chrome
    chrome.close()


def open_page(browser, server, name, width=1280, height=900):
    page = browser.new_page(width, height)
    page.goto(server.url)
    if name:
        assert page.evaluate("document.body.dataset.state") == "name"
        page.evaluate("document.getElementById('name-input').focus()")
        page.type(name)
        page.press("Enter")
        page.wait("document.body.dataset.state === 'item'")
    return page


def shown(page) -> dict:
    return page.evaluate("({key: document.body.dataset.key, prompt: "
                         "document.getElementById('prompt').textContent, progress: "
                         "document.getElementById('progress-text').textContent, typed: "
                         "document.getElementById('typed').value, message: "
                         "document.getElementById('message').textContent})")


def submit_keys(page, keys):
    before = shown(page)["key"]
    for key in keys:
        page.press(key)
    page.press("Enter")
    page.wait(f"document.body.dataset.key !== '{before}'")


# ---- the page in Chromium ------------------------------------------------------------------


# Real-looking items: the first test's screenshot is the README's picture of the page.
ITEMS = [
    {"prompt": "Is 91 a prime number? Answer briefly.",
     "candidates": ["Yes, 91 is prime.", "No: 91 = 7 × 13.", "No, because it is odd."]},
    {"prompt": "Explain in one sentence what a reward model does in RLHF.",
     "candidates": ["It rewards the model.",
                    "A reward model scores a response to a prompt, trained on human "
                    "preference pairs so that preferred answers score higher; the policy is "
                    "then optimised to raise that score.",
                    "A reward model turns human comparisons into a scalar score for any "
                    "prompt and response.",
                    "RLHF uses rewards."]},
    {"prompt": "Give a short title for a post about the KL penalty in RLHF.",
     "candidates": ["KL", "Why the KL penalty keeps RLHF honest",
                    "Stay close: the KL term in RLHF"]},
]


@needs_chromium
def test_rank_by_keys_undo_and_reload_keep_the_progress(browser, tmp_path, monkeypatch):
    first, second, _ = ([r["prompt"], *r["candidates"]] for r in ITEMS)
    guidelines = tmp_path / "guide.txt"
    guidelines.write_text("Prefer the correct answer; then the clearer, shorter one.")
    with serving(tmp_path, ITEMS, monkeypatch, guidelines=str(guidelines)) as server:
        page = open_page(browser, server, "alice")
        assert shown(page)["prompt"] == first[0]
        assert page.evaluate("document.getElementById('guidelines').textContent") == \
            "Prefer the correct answer; then the clearer, shorter one."
        for key in "bc":
            page.press(key)
        assert shown(page)["typed"] == "B C"
        page.press("Enter")  # A is missing: refused on the page, nothing sent
        assert "A missing" in shown(page)["message"]
        submit_keys(page, "a")
        labels = server.team.output.with_name("labels.alice.jsonl")
        a, b, c = first[1:]
        assert pairs(labels) == [(b, c), (b, a), (c, a)]
        assert shown(page)["prompt"] == second[0]
        # Typed in the box, with a tie: B=C A D writes B>A, B>D, C>A, C>D, A>D; not B-C.
        page.evaluate("document.getElementById('typed').focus()")
        page.type("b=c a d")
        page.press("Enter")
        page.wait(f"document.getElementById('prompt').textContent === {json.dumps(ITEMS[2]['prompt'])}")
        a, b, c, d = second[1:]
        assert pairs(labels)[3:] == [(b, a), (b, d), (c, a), (c, d), (a, d)]
        assert "2 ranked" in shown(page)["progress"]
        page.press("z", ctrl=True)  # undo: item 2 is back and its pairs are gone
        page.wait(f"document.getElementById('prompt').textContent === {json.dumps(second[0])}")
        assert len(pairs(labels)) == 3 and "1 ranked" in shown(page)["progress"]
        for key in "bca":  # half ranked, then the page is reloaded
            page.press(key)
        page.press("Backspace")
        page.reload()
        assert page.evaluate("document.body.dataset.state") == "item"  # the name is kept
        assert shown(page)["prompt"] == second[0] and "1 ranked" in shown(page)["progress"]
        assert "team: 1 of 3 labels" in shown(page)["progress"]
        assert [m for m, path, _ in server.requests if path not in API] == ["GET", "GET"]
        record = json.loads(labels.with_name("labels.alice.jsonl.progress.json").read_text())
        assert record["annotator"] == "alice" and len(record["decisions"]) == 1

        for key in "bc":  # the README's picture: an item half ranked
            page.press(key)
        page.send("Emulation.setDeviceMetricsOverride", {"width": 1100, "height": 660,
                                                         "deviceScaleFactor": 1,
                                                         "mobile": False})
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(SCREENSHOT)
        assert SCREENSHOT.stat().st_size < 200_000


@needs_chromium
def test_two_annotators_in_two_browser_sessions(browser, tmp_path, monkeypatch):
    rows = candidate_rows(10, k=2)
    with serving(tmp_path, rows, monkeypatch, overlap=0.2, seed=3) as server:
        twice = {i for i, c in enumerate(overlap_copies(10, 0.2, 3)) if c == 2}
        assert len(twice) == 2
        pages = {"alice": open_page(browser, server, "alice"),
                 "bob": open_page(browser, server, "bob")}
        seen = {name: [] for name in pages}
        while any(page.evaluate("document.body.dataset.state") == "item"
                  for page in pages.values()):
            for name, page in pages.items():
                if page.evaluate("document.body.dataset.state") != "item":
                    continue
                seen[name].append(int(shown(page)["prompt"].split()[1].rstrip("?")))
                page.press("2")  # clearly better
                submit_keys(page, "ba")
        assert set(seen["alice"]) & set(seen["bob"]) == twice  # overlapped items, twice
        assert sorted(seen["alice"] + seen["bob"]) == sorted([*range(10), *twice])
        for name in pages:
            rows_written = [json.loads(r) for r in
                            server.team.output.with_name(f"labels.{name}.jsonl").open()]
            assert [r["prompt"] for r in rows_written] == [f"Question {i}?"
                                                           for i in sorted(seen[name])]
            assert {(r["annotator"], r["strength"]) for r in rows_written} == {(name, "clearly")}
        assert "team: 12 of 12 labels" in shown(pages["bob"])["progress"]


@needs_chromium
def test_model_text_is_shown_as_text_and_runs_or_loads_nothing(browser, tmp_path, monkeypatch):
    script = "<script>document.title = 'pwned'; fetch('/from-script')</script>"
    image = "<img src=x onerror=\"document.title = 'pwned'; fetch('/from-onerror')\">"
    rows = [{"prompt": f"Say {image}", "candidates": [script, image, "<b>plain</b>"]}]
    with serving(tmp_path, rows, monkeypatch) as server:
        page = open_page(browser, server, "carol")
        page.wait("document.querySelectorAll('#cards .text').length === 3")

        def drag(source, target):
            page.evaluate(f"""(() => {{ const data = new DataTransfer();
              const fire = (selector, type) => document.querySelector(selector).dispatchEvent(
                new DragEvent(type, {{dataTransfer: data, bubbles: true, cancelable: true}}));
              fire({json.dumps(source)}, "dragstart"); fire({json.dumps(target)}, "drop"); }})()""")

        cards = "[...document.querySelectorAll('#cards .card')].map(e => e.{})"
        assert len(set(page.evaluate(cards.format("offsetTop")))) == 1  # side by side
        page.send("Emulation.setDeviceMetricsOverride", {"width": 480, "height": 900,
                                                         "deviceScaleFactor": 1,
                                                         "mobile": False})
        page.wait(f"new Set({cards.format('offsetLeft')}).size === 1")  # stacked
        assert len(set(page.evaluate(cards.format("offsetTop")))) == 3
        texts = page.evaluate("[...document.querySelectorAll('#cards .text')]"
                              ".map(e => e.textContent)")
        assert texts == [script, image, "<b>plain</b>"]
        assert shown(page)["prompt"] == f"Say {image}"
        assert page.evaluate("document.querySelectorAll('main img, main script, main b')"
                             ".length") == 0
        page.press("c")
        page.press("a")  # the chips with the texts are drawn too
        # Dragging: card B dropped on chip A goes before it; chip C dropped on the pool is out.
        drag("#cards .card:nth-child(2)", "#order .chip:last-of-type")
        assert shown(page)["typed"] == "C B A"
        drag("#order .chip", "#pool")
        assert shown(page)["typed"] == "B A"
        page.evaluate("new Promise(r => setTimeout(r, 300))")
        assert page.evaluate("document.title") == "prefalign annotate"
        origin = f"http://127.0.0.1:{server.server_address[1]}/"
        made = page.requests()
        assert made[0].startswith(origin + "?token=")
        assert made[1:] == [origin + "api/next"], made
        assert [(m, p) for m, p, _ in server.requests] == [("GET", "/"), ("POST", "/api/next")]


# ---- the server without a browser ----------------------------------------------------------


def test_requests_without_the_token_are_refused(tmp_path, monkeypatch):
    with serving(tmp_path, candidate_rows(2), monkeypatch) as server:
        base = f"http://127.0.0.1:{server.server_address[1]}"

        def get(url, headers=None):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                            timeout=10) as response:
                    return response.status, dict(response.headers)
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers)

        assert get(f"{base}/")[0] == 403
        assert get(f"{base}/?token=wrong")[0] == 403
        assert get(f"{base}/", {"Cookie": "prefalign_token=wrong"})[0] == 403
        assert post(server, "/api/next", {"annotator": "x"}, token=False)[0] == 403
        assert post(server, "/api/next", {"annotator": "x"}, token=False,
                    headers={"X-Prefalign-Token": "wrong"})[0] == 403
        assert not server.team.annotators  # nothing was created for a refused request
        status, headers = get(f"{base}/?token={server.token}")
        assert status == 200
        assert headers["Content-Security-Policy"].startswith("default-src 'self'; script-src "
                                                             "'sha256-")
        cookie = headers["Set-Cookie"].split(";")[0]
        assert get(f"{base}/", {"Cookie": cookie})[0] == 200  # a reload carries the cookie
        assert post(server, "/api/next", {"annotator": "x"}, token=False,
                    headers={"Cookie": cookie})[0] == 200


def test_bad_requests_get_one_line_and_change_nothing(tmp_path, monkeypatch):
    with serving(tmp_path, candidate_rows(2), monkeypatch) as server:
        assert post(server, "/api/next", {"annotator": "../etc"}) == (
            400, {"error": "a name is 1 to 40 letters, digits, - or _, starting with a letter "
                           "or digit"})
        key = post(server, "/api/next", {"annotator": "dan"})[1]["item"]["key"]
        for body, message in [({"ranking": ["A"]}, "missing B"), ({"ranking": ["A", "A"]},
                              "A appears twice"), ({"ranking": "AB"}, "list of labels"),
                              ({"ranking": ["A=B"]}, "missing C"),
                              ({"ranking": ["A", "B", "C"], "strength": "clearly"}, "strength")]:
            status, answer = post(server, "/api/label", {"annotator": "dan", "key": key, **body})
            assert status == 400 and message in answer["error"], answer
        assert post(server, "/api/label", {"annotator": "dan", "key": "old",
                                           "ranking": ["A", "B", "C"]})[0] == 400
        assert post(server, "/api/undo", {"annotator": "dan"}) == (400, {"error":
                                                                         "nothing to undo"})
        assert not server.team.output.with_name("labels.dan.jsonl").exists()


# ---- assignment, records and resuming ------------------------------------------------------


def test_overlap_items_go_to_two_annotators_and_a_restart_resumes(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", candidate_rows(5, k=2))
    items = read_items(path)
    assert overlap_copies(5, 0.4, 0) == overlap_copies(5, 0.4, 0)  # seeded
    assert sum(overlap_copies(5, 0.4, 0)) == 7 and sum(overlap_copies(5, 0.0, 0)) == 5
    team = Team(items, tmp_path / "out.jsonl", path, overlap=1.0)
    first = team.next("ann")["item"]
    assert team.next("ann")["item"]["key"] == first["key"]  # the same until decided
    assert team.next("ben")["item"]["key"] == first["key"]  # overlap 1: twice
    assert team.next("cy")["item"]["key"] != first["key"]  # a third person gets another
    team.decide("ann", first["key"], ["A=B"])  # a tie: decided, no pair
    team.decide("ann", team.next("ann")["item"]["key"], None, skip=True)
    assert (tmp_path / "out.ann.jsonl").read_text() == ""
    # A restart reads the records: ann's two decisions, her undo reaches the earlier session.
    again = Team(items, tmp_path / "out.jsonl", path, overlap=1.0)
    # ben's page, opened before the restart, still shows the first item: his label counts.
    again.decide("ben", first["key"], ["B", "A"])
    assert pairs(tmp_path / "out.ben.jsonl") == [("answer b0", "answer a0")]
    view = again.next("ann")
    assert view["progress"]["ranked"] == 1 and view["progress"]["skipped"] == 1
    assert again.undo("ann")["item"]["origin"] == items[1].origin
    with pytest.raises(DataError, match="not an item of this input"):
        Team(items[2:], tmp_path / "out.jsonl", path)


def test_the_terminal_refuses_a_served_record_and_serve_options_need_serve(tmp_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", candidate_rows(2))
    team = Team(read_items(path), tmp_path / "out.jsonl", path)
    team.decide("eve", team.next("eve")["item"]["key"], skip=True)
    with pytest.raises(DataError, match="written by `annotate --serve` for annotator 'eve'"):
        annotate(path, tmp_path / "out.eve.jsonl", stdin=io.StringIO(""), stdout=io.StringIO())
    with pytest.raises(ConfigError, match="'overlap' is an option of the web page: add --serve"):
        build_config(AnnotateConfig, {"input": path, "output": "o.jsonl", "overlap": 0.2})
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {path}\noutput: o.jsonl\nserve: true\noverlp: 0.2\n")
    assert main(["annotate", "--config", str(config)]) == 2
    assert "unknown key 'overlp' (did you mean 'overlap'?)" in capsys.readouterr().err


def test_the_command_prints_the_link_and_stops_on_ctrl_c(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", candidate_rows(2))
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from prefalign.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "annotate", "--input", path, "--output",
         str(tmp_path / "out.jsonl"), "--serve", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = process.stdout.readline()
        assert line.startswith("annotate: 2 items; open http://127.0.0.1:"), line
        url = line.split("open ", 1)[1].strip()
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"prefalign annotate" in response.read()
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "stopped; each annotator's labels are in out.NAME.jsonl" in err


def test_a_failed_save_is_one_line_and_the_label_can_be_given_again(tmp_path, monkeypatch):
    """A full disk at a save: the page gets the one-line error, memory and files stay as
    they were (the label is not counted), and the same label given again is written once."""
    from prefalign.errors import output_error
    from prefalign.preferences.annotate import record

    with serving(tmp_path, candidate_rows(2), monkeypatch) as server:
        key = post(server, "/api/next", {"annotator": "fay"})[1]["item"]["key"]
        write = record._write_atomic

        def full(path, text):
            raise output_error(path, OSError(28, "No space left on device"), record.KEPT,
                               "--output")

        monkeypatch.setattr(record, "_write_atomic", full)
        status, answer = post(server, "/api/label", {"annotator": "fay", "key": key,
                                                     "ranking": ["B", "A", "C"]})
        assert status == 500 and answer["error"].startswith("cannot write ") and \
            "No space left on device; free disk space" in answer["error"]
        assert server.team.annotators["fay"].decisions == []
        monkeypatch.setattr(record, "_write_atomic", write)
        status, answer = post(server, "/api/label", {"annotator": "fay", "key": key,
                                                     "ranking": ["B", "A", "C"]})
        assert status == 200 and answer["progress"]["ranked"] == 1
        labels = server.team.output.with_name("labels.fay.jsonl")
        assert pairs(labels) == [("answer b0", "answer a0"), ("answer b0", "answer c0"),
                                 ("answer a0", "answer c0")]

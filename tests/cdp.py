"""A small Chrome DevTools Protocol client over --remote-debugging-pipe (standard library
only): headless Chromium reads JSON commands from its fd 3 and writes answers and events to
fd 4, each message ended by a NUL byte. Enough to open isolated browser sessions (each
with its own cookies and localStorage), load pages, press keys, evaluate JavaScript, record
every request a page makes and take screenshots."""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# key -> (code, windowsVirtualKeyCode, text) for the non-letter keys the tests press
KEYS = {"Enter": ("Enter", 13, "\r"), "Backspace": ("Backspace", 8, ""),
        "Escape": ("Escape", 27, ""), "=": ("Equal", 187, "="), "/": ("Slash", 191, "/")}


class Browser:
    def __init__(self, profile: Path) -> None:
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()

        # After the fork the two pipe ends become Chromium's fd 3 and fd 4 (copied first, in
        # case either is 3 or 4 already); 3 and 4 are kept open when the rest are closed.
        def fds() -> None:
            a, b = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
             "--remote-debugging-pipe", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--disable-features=Translate,OptimizationHints,MediaRouter",
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4, to_chrome, from_chrome), preexec_fn=fds,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._ids = itertools.count(1)
        self._answers: dict[int, queue.Queue] = {}
        self.events: list[dict] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    self._answers[message["id"]].put(message)
                else:
                    with self._lock:
                        self.events.append(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        number = next(self._ids)
        answers = self._answers[number] = queue.Queue()
        message = {"id": number, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        answer = answers.get(timeout=timeout)
        del self._answers[number]
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        """A tab in a new browser context: its own cookies, localStorage and sessionStorage."""
        context = self.send("Target.createBrowserContext")["browserContextId"]
        target = self.send("Target.createTarget", {"url": "about:blank",
                                                    "browserContextId": context})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target,
                                                      "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Network"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                         "deviceScaleFactor": 1,
                                                         "mobile": False})
        return page

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)
        os.close(self._write)
        os.close(self._read)


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 20) -> None:
        """Until `expression` is true in the page (after a load, an API answer, ...)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.evaluate(expression):
                    return
            except RuntimeError:
                pass  # the page is still loading
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete' && document.body.dataset.state "
                  "!== 'loading'")

    def reload(self) -> None:
        self.send("Page.reload")
        time.sleep(0.2)
        self.wait("document.readyState === 'complete' && document.body.dataset.state "
                  "!== 'loading'")

    def press(self, key: str, ctrl: bool = False) -> None:
        """A real key press, as from a keyboard (keyDown with its text, then keyUp)."""
        code, number, text = KEYS[key] if key in KEYS else (f"Key{key.upper()}",
                                                           ord(key.upper()), key)
        event = {"key": key, "code": code, "windowsVirtualKeyCode": number,
                 "modifiers": 2 if ctrl else 0}
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", **event,
                                             **({"text": text} if text and not ctrl else {})})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **event})

    def type(self, text: str) -> None:
        """Text typed into the focused field."""
        self.send("Input.insertText", {"text": text})

    def requests(self) -> list[str]:
        """The URL of every request this page's browser made so far."""
        return [e["params"]["request"]["url"] for e in list(self.browser.events)
                if e.get("method") == "Network.requestWillBeSent"
                and e.get("sessionId") == self.session]

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

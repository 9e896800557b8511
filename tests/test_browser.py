"""The offline pages in a real browser: Debian's headless chromium, driven over the DevTools
protocol (--remote-debugging-pipe, so no websocket library is needed), loading pages from an
http.server on 127.0.0.1. Each page must load without console errors or exceptions, request
nothing but the local server, show the owner names, draw something (a screenshot with more than
one colour) and answer clicks: zoom and search in flame graphs, the hover read-out of the chart.

Skipped when `chromium` is not installed (Debian: apt-get install -y chromium).
"""
from __future__ import annotations

import base64
import fcntl
import functools
import http.server
import json
import os
import queue
import shutil
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import snapshots
from conftest import REAL_SNAPSHOTS
from vramtrace.cli import cli
from vramtrace.snapshot.save import write_snapshot

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's `chromium` is not installed "
                                                         "(apt-get install -y chromium)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--remote-debugging-pipe",
         # belt and braces: any host but the local server fails to resolve
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
TIMEOUT_S = 60
SMALL_A = REAL_SNAPSHOTS / "silmont2000__assignment2-systems" / "mem_snapshot.pickle"
SMALL_B = REAL_SNAPSHOTS / "silmont2000__assignment2-systems" / "memory_forward_fp32_128.pickle"


class Browser:
    """A headless chromium and a minimal DevTools-protocol client over its pipe (fds 3 and 4)."""

    def __init__(self, profile: Path):
        to_child, self._cmd = os.pipe()
        self._out, from_child = os.pipe()
        # above 4, so "3<&a 4>&b" never overwrites one end with the other (bash: dash takes fds <= 9 only)
        to_child, from_child = _above_four(to_child), _above_four(from_child)
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$@" 3<&{to_child} 4>&{from_child}', "bash", CHROMIUM, *FLAGS,
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_child, from_child), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._inbox: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._out, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for m in messages:
                    self._inbox.put(json.loads(m))
        self._inbox.put(None)

    def _pump(self, until: float) -> None:
        message = self._inbox.get(timeout=max(until - time.monotonic(), 0.01))
        if message is None:
            raise RuntimeError("chromium closed its DevTools pipe")
        if "id" in message:
            self._replies[message["id"]] = message
        else:
            self.events.append(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._cmd, json.dumps(message).encode() + b"\0")
        until = time.monotonic() + TIMEOUT_S
        while ident not in self._replies:
            self._pump(until)
        reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for(self, method: str, session: str) -> None:
        until = time.monotonic() + TIMEOUT_S
        while not any(e["method"] == method and e.get("sessionId") == session for e in self.events):
            self._pump(until)

    def open(self, url: str) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False}, session)
        start = len(self.events)
        self.send("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        return Page(self, session, start)

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        except (RuntimeError, OSError, queue.Empty, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd)


def _above_four(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Page:
    def __init__(self, browser: Browser, session: str, first_event: int):
        self.browser, self.session, self.first_event = browser, session, first_event

    def evaluate(self, expression: str):
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, self.session)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def _events(self, method: str) -> list[dict]:
        return [e["params"] for e in self.browser.events[self.first_event:]
                if e["method"] == method and e.get("sessionId") == self.session]

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries since the page opened."""
        out = [f"exception: {e['exceptionDetails']}" for e in self._events("Runtime.exceptionThrown")]
        out += [f"console.{e['type']}: {e['args']}" for e in self._events("Runtime.consoleAPICalled")
                if e["type"] in ("error", "assert", "warning")]
        out += [f"log {e['entry']['level']}: {e['entry']['text']}" for e in self._events("Log.entryAdded")
                if e["entry"]["level"] == "error"]
        return out

    def requests(self) -> list[str]:
        return [e["request"]["url"] for e in self._events("Network.requestWillBeSent")]

    def screenshot_colours(self) -> int:
        """Distinct colours in a quarter-scale screenshot of the top of the page."""
        shot = self.browser.send("Page.captureScreenshot", {
            "format": "png", "clip": {"x": 0, "y": 0, "width": 1280, "height": 1000, "scale": 0.25}}, self.session)
        return len(set(png_pixels(base64.b64decode(shot["data"]))))


def png_pixels(data: bytes) -> list[bytes]:
    """Pixels of an 8-bit RGB/RGBA, non-interlaced PNG (what chromium writes), as byte strings."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and not interlace, header
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, pixels = bytearray(stride), []
    for y in range(height):
        kind, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                row[i] = (row[i] + a) & 255
            elif kind == 2:
                row[i] = (row[i] + b) & 255
            elif kind == 3:
                row[i] = (row[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels += [bytes(row[i:i + bpp]) for i in range(0, stride, bpp)]
        prev = row
    return pixels


class _LoggingHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:   # noqa: A002 - the base class's name
        self.server.paths.append(self.path)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The pages under test, written by the CLI into one directory."""
    root = tmp_path_factory.mktemp("pages")
    tagged = write_snapshot(snapshots.tagged(), root / "tagged.pkl")
    runs = [["flame", str(tagged), "-o", str(root / "flame.html")],
            ["flame", str(tagged), "-o", str(root / "flame.svg")],
            ["html", str(tagged), "-o", str(root / "report.html")]]
    if SMALL_A.is_file() and SMALL_B.is_file():
        runs.append(["html", str(SMALL_A), str(SMALL_B), "-o", str(root / "diff.html")])
    for args in runs:
        result = CliRunner().invoke(cli, [*args, "-q"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def served(pages):
    """(browser, base URL, paths the server was asked for)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_LoggingHandler, directory=str(pages)))
    server.paths = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser = Browser(pages / "profile")
    try:
        yield browser, f"http://127.0.0.1:{server.server_port}/", server.paths
    finally:
        browser.close()
        server.shutdown()


def _check_page(served, name: str, words: tuple[str, ...]) -> Page:
    browser, base, paths = served
    page = browser.open(base + name)
    assert page.problems() == []
    assert page.requests() and all(u.startswith(base) for u in page.requests()), page.requests()
    assert f"/{name}" in paths
    text = page.evaluate("document.documentElement.textContent")
    for word in words:
        assert word in text, word
    assert page.screenshot_colours() > 1
    return page


FLAME_CHECK = """(() => {
  const svg = document.querySelector('svg.flamegraph');
  const frames = svg.querySelectorAll('g.f');
  const matched = svg.flame.search('weight');
  frames[1].dispatchEvent(new MouseEvent('click'));
  const zoomed = +frames[1].querySelector('rect').getAttribute('width');
  svg.flame.reset();
  return {matched: matched, zoomed: zoomed, full: +svg.dataset.width - 2 * +svg.dataset.pad};
})()"""


@pytest.mark.parametrize("name", ["flame.html", "flame.svg"])
def test_flame_page_zooms_and_searches(served, name):
    page = _check_page(served, name, ("weight", "activation"))
    result = page.evaluate(FLAME_CHECK)
    assert 0 < result["matched"] < 1
    assert result["zoomed"] == pytest.approx(result["full"], abs=0.01)


def test_flame_page_search_box(served):
    page = _check_page(served, "flame.html", ("weight",))
    out = page.evaluate("""(() => {
      const box = document.querySelector('.flame input');
      box.value = 'activation';
      box.dispatchEvent(new Event('input'));
      return document.querySelector('.flame .matched').textContent;
    })()""")
    assert out.startswith("matched ") and "%" in out


def test_report_page(served):
    page = _check_page(served, "report.html", ("weight", "activation", "Memory over time", "This page:"))
    readout = page.evaluate("""(() => {
      const svg = document.querySelector('.chart svg'), r = svg.getBoundingClientRect();
      svg.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + r.width / 2, clientY: r.top + 20}));
      return document.querySelector('.chart .readout').textContent;
    })()""")
    assert "allocated" in readout and "reserved" in readout


def test_two_file_report_page(served, pages):
    if not (pages / "diff.html").is_file():
        pytest.skip("../shared/fixtures/real-snapshots is absent")
    page = _check_page(served, "diff.html", ("forward", "backward", "Diff: A", "Differential flame graph"))
    assert page.evaluate("document.querySelectorAll('svg.flamegraph').length") == 2

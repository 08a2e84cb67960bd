"""The report in a real browser: headless Debian Chromium driven over the DevTools protocol (pipe transport).

Checks: no console errors or exceptions (a CSP violation would log one), every figure present (inline SVG
with a non-empty box, or a decoded <img>), hostile run and module names shown as text and not executed,
the run toggle hides a run's lines. Keeps screenshots under test-artifacts/.

Skipped only when chromium is missing and CI is not set; under CI a missing browser fails the test
(.ci/install-chromium.sh installs it).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from _synthetic import XSS, make_run

from dynascope.reports import html as html_mod
from dynascope.reports.html import report

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--window-size=1200,900"]
DOM_XSS = '<img src=x onerror="document.body.dataset.pwned=1">'


def _need_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed but CI is set: run .ci/install-chromium.sh")
        pytest.skip("chromium not installed (apt-get install chromium, or .ci/install-chromium.sh)")
    return CHROMIUM


def _to_fds_3_4(read_end: int, write_end: int) -> None:
    import fcntl

    a = fcntl.fcntl(read_end, fcntl.F_DUPFD, 10)  # move out of the way first: either end may be fd 3 or 4
    b = fcntl.fcntl(write_end, fcntl.F_DUPFD, 10)
    os.dup2(a, 3)
    os.dup2(b, 4)


class Browser:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, exe: str, profile: Path) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),  # kept open in the child after preexec_fn put the pipe ends there
            preexec_fn=lambda: _to_fds_3_4(to_chrome_r, from_chrome_w),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _read_message(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(max(deadline - time.monotonic(), 0))
            if reply is None:
                raise TimeoutError(f"no reply to {method} within {timeout} s")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        for ev in self.events:
            if ev.get("method") == method:
                self.events.remove(ev)
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read_message(max(deadline - time.monotonic(), 0))
            if ev is None:
                raise TimeoutError(f"no {method} event within {timeout} s")
            if ev.get("method") == method:
                return ev
            self.events.append(ev)
            if ev.get("method") == "Page.javascriptDialogOpening":  # e.g. an executed alert(1): record, dismiss
                self.send("Page.handleJavaScriptDialog", {"accept": True})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired", timeout=60)

    def evaluate(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluate failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, path: Path) -> None:
        import base64

        height = int(self.evaluate("document.documentElement.scrollHeight"))
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1200, "height": min(height, 16000), "deviceScaleFactor": 1, "mobile": False})
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        while self._read_message(0.3) is not None:
            pass
        out = []
        for ev in self.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')}")
            elif m == "Page.javascriptDialogOpening":
                out.append(f"dialog opened: {p.get('message')}")
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing a browser that is already gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def browser_report(tmp_path_factory):
    exe = _need_chromium()
    d = tmp_path_factory.mktemp("browser")
    a = make_run(d / "a", name=f"baseline {XSS}", n_blocks=8, steps=300, nan_at=280, var_growth=True,
                 massive=True, hessian="above", loss_spike_at=150)
    b = make_run(d / "b", name=f"adamw {DOM_XSS}", optimizer="AdamW", lr=1e-3, weight_decay=0.1, seed=1,
                 n_blocks=8, steps=300, mark_blocks=False)
    out = report([a, b], d / "report.html", title=f"browser test {XSS}")
    return exe, d, out


def _check_page(exe: str, profile: Path, out: Path, shot: str) -> dict:
    br = Browser(exe, profile)
    try:
        br.open(out.resolve().as_uri())
        info = br.evaluate("""(() => {
            const figs = Array.from(document.querySelectorAll('figure.fig'));
            return {
              figures: figs.length,
              ok: figs.filter(f => {
                const svg = f.querySelector('.plot svg'); const img = f.querySelector('.plot img');
                if (svg) { const r = svg.getBoundingClientRect(); return r.width > 100 && r.height > 50; }
                if (img) { return img.complete && img.naturalWidth > 0; }
                return false; }).length,
              errors: document.querySelectorAll('.fig-error').length,
              pwned: document.body.dataset.pwned || null,
              scripts: document.querySelectorAll('script').length,
              title: document.title,
              h1: document.querySelector('h1').textContent,
              toggles: document.querySelectorAll('input.runtoggle').length,
              run0: document.querySelectorAll('.dsrun0').length,
            };
        })()""")
        if info["toggles"]:  # unticking run 0 hides its lines; ticking it again shows them
            toggle = "document.querySelector('input.runtoggle[data-run=\"0\"]').click()"
            hidden = "Array.from(document.querySelectorAll('.dsrun0')).filter(e => e.style.display === 'none').length"
            br.evaluate(toggle)
            info["hidden_after_toggle"] = br.evaluate(hidden)
            br.evaluate(toggle)
            info["hidden_after_second_toggle"] = br.evaluate(hidden)
        ARTIFACTS.mkdir(exist_ok=True)
        br.screenshot(ARTIFACTS / shot)
        info["problems"] = br.problems()
        return info
    finally:
        br.close()


def test_report_in_browser(browser_report, tmp_path):
    exe, d, out = browser_report
    info = _check_page(exe, tmp_path / "profile", out, "report-browser.png")
    assert info["problems"] == []
    assert info["figures"] >= 8 and info["ok"] == info["figures"], info
    assert info["errors"] == 0
    assert info["pwned"] is None
    assert info["scripts"] == 1  # only the report's own toggle script
    assert XSS in info["title"] and XSS in info["h1"]  # shown as text
    assert info["toggles"] == 2 and info["run0"] > 0
    assert info["hidden_after_toggle"] == info["run0"]
    assert info["hidden_after_second_toggle"] == 0
    assert (ARTIFACTS / "report-browser.png").stat().st_size > 10_000


def test_png_embedding_loads_in_browser(browser_report, tmp_path, monkeypatch):
    exe, d, _ = browser_report
    monkeypatch.setattr(html_mod, "SVG_LIMIT", 0)  # force every figure to a base64 PNG
    out = report([d / "a"], tmp_path / "png.html")
    assert "data:image/png;base64," in out.read_text()
    info = _check_page(exe, tmp_path / "profile", out, "report-browser-png.png")
    assert info["problems"] == []
    assert info["figures"] >= 8 and info["ok"] == info["figures"], info

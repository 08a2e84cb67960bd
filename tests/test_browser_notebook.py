"""The notebook display and the live report in a real browser (headless Chromium, see test_browser.py).

- A page built like a notebook output area (``RunData._repr_html_`` then the ``report()`` result's
  ``_repr_html_``): the report runs inside its sandboxed srcdoc iframe (its toggle script works there), none of
  it reaches the host page, hostile names stay text, and a finding's link scrolls inside the frame instead of
  loading the host page into it.
- A ``refresh=`` report reloads itself and comes back at the same scroll position, with no CSP violation.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from _synthetic import XSS, make_run
from test_browser import ARTIFACTS, Browser, _need_chromium

import dynascope


def _raw(br: Browser, method: str, params: dict, session: str) -> dict:
    """A DevTools command to a given session (Browser.send sends Target.* to the browser itself)."""
    br._id += 1
    os.write(br._w, json.dumps({"id": br._id, "method": method, "params": params, "sessionId": session}).encode()
             + b"\0")
    deadline = time.monotonic() + 30
    while True:
        m = br._read_message(max(deadline - time.monotonic(), 0))
        if m is None:
            raise TimeoutError(method)
        if m.get("id") == br._id:
            if "error" in m:
                raise RuntimeError(f"{method}: {m['error']}")
            return m.get("result", {})
        br.events.append(m)


def test_notebook_output_in_browser(tmp_path):
    exe = _need_chromium()
    run = make_run(tmp_path / "a", name=f"run {XSS}", steps=60, hessian="above")
    other = make_run(tmp_path / "b", name="other", steps=60, seed=1)
    rep = dynascope.report([run, other], tmp_path / "report.html", figures=["loss", "curvature_sharpness"])
    host = tmp_path / "notebook.html"
    host.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>notebook</title></head><body>"
                    "<h1>notebook</h1>" + dynascope.load_run(run)._repr_html_() + rep._repr_html_()
                    + "</body></html>", encoding="utf-8")
    br = Browser(exe, tmp_path / "profile")
    try:
        br.open(host.as_uri())
        host_info = br.evaluate("""({figures: document.querySelectorAll('figure.fig').length,
            iframes: document.querySelectorAll('iframe').length, scripts: document.querySelectorAll('script').length,
            title: document.title, text: document.body.innerText})""")
        _raw(br, "Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": False, "flatten": True},
             br.session)
        deadline = time.monotonic() + 30
        frames: list[dict] = []
        while time.monotonic() < deadline:
            frames = [e for e in br.events if e.get("method") == "Target.attachedToTarget"
                      and e["params"]["targetInfo"]["type"] == "iframe"]
            if frames:
                break
            msg = br._read_message(0.5)
            if msg:
                br.events.append(msg)
        assert frames, "the report's iframe did not load"
        session = frames[0]["params"]["sessionId"]

        def in_frame(expr: str):
            return _raw(br, "Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)["result"].get(
                "value")

        ARTIFACTS.mkdir(exist_ok=True)
        time.sleep(1.0)  # let the out-of-process frame paint
        br.screenshot(ARTIFACTS / "notebook-inline.png")
        inner = in_frame("""({href: location.href, figures: document.querySelectorAll('figure.fig').length,
            toggles: document.querySelectorAll('input.runtoggle').length,
            h1: document.querySelector('h1').textContent})""")
        in_frame("document.querySelector('input.runtoggle[data-run=\"0\"]').click(); 1")  # the toggle script runs
        hidden = in_frame("Array.from(document.querySelectorAll('.dsrun0')).filter(e => e.style.display === 'none')"
                          ".length")
        in_frame("document.querySelector('ul.findings a').click(); 1")
        time.sleep(1.0)
        after = in_frame("({href: location.href, y: window.scrollY})")
        problems = br.problems()
    finally:
        br.close()
    assert host_info["figures"] == 0 and host_info["iframes"] == 1 and host_info["scripts"] == 0
    assert host_info["title"] == "notebook"  # the report's <title> and styles stay in the frame
    assert XSS in host_info["text"] and "dynascope.figure(\"curvature_sharpness\", run)" in host_info["text"]
    assert inner["href"] == "about:srcdoc" and inner["figures"] == 2 and inner["toggles"] == 2
    assert XSS in inner["h1"]
    assert hidden > 0
    assert after["href"] == "about:srcdoc#fig-curvature_sharpness" and after["y"] > 200, after
    assert problems == []


def test_refresh_reload_keeps_scroll_position(tmp_path):
    exe = _need_chromium()
    run = make_run(tmp_path / "a", steps=60)
    out = dynascope.report(run, tmp_path / "live.html", refresh=1.5, live="Live report (test)")
    br = Browser(exe, tmp_path / "profile")
    try:
        br.open(out.resolve().as_uri())
        height = br.evaluate("document.documentElement.scrollHeight")
        assert height > 3000
        br.evaluate("window.scrollTo(0, 1800); window.__marker = 1; 1")
        br.wait_event("Page.loadEventFired", timeout=30)  # reloaded by its own script
        time.sleep(0.3)
        state = br.evaluate("({y: window.scrollY, marker: window.__marker || null,"
                            " live: document.querySelector('.live').textContent})")
        problems = br.problems()
    finally:
        br.close()
    assert state["marker"] is None  # a fresh document: it did reload
    assert state["y"] == pytest.approx(1800, abs=2)
    assert state["live"] == "Live report (test)"
    assert problems == []  # in particular no CSP violation for the reload script

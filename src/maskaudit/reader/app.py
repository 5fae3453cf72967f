"""The reader-study web app: one blinded case per page, answers committed as they are submitted.

Routes (every one but the two logins needs a session cookie; anything else gets 401):

- ``GET /r/<token>``: a reader's link; opens a session (HttpOnly, SameSite=Strict cookie) and goes on to
  the first case not yet fully answered. ``GET /`` does the same for a reader who comes back.
- ``GET /case/<id>``, ``POST /case/<id>``: a case, by the random id it has for this reader only; the POST
  saves the answers (CSRF token and Origin checked, every field validated) and commits before answering.
- ``GET /image/<id>``: the case's image, re-encoded without metadata; only for the reader it belongs to.
- ``GET /done``: the end, with links back to every case.
- ``GET /admin/login/<admin token>``, ``GET /admin``, ``GET /admin/export.csv``: progress and every answer,
  behind the admin's own session (a reader's session does not open them).

A reader never sees the label, the model's probability, the strategy, the image id or the file name.
"""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from maskaudit.reader import db
from maskaudit.reader.study import OPAQUE, image_path, study_paths

READER_COOKIE = "maskaudit_reader"
ADMIN_COOKIE = "maskaudit_admin"
TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")
SESSION = re.compile(r"^[A-Za-z0-9_-]{43}$")
GO = ("prev", "stay", "next")
ADMIN_SESSION = timedelta(hours=12)

CSP = ("default-src 'none'; img-src 'self'; script-src 'self'; style-src 'self'; form-action 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: the link's token never leaves the site, and the browser still sends
    # the Origin header of our own forms (with no-referrer it sends "Origin: null", indistinguishable from an attack)
    "Referrer-Policy": "same-origin", "Cache-Control": "no-store", "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}


#: Pillow modes of 16-bit gray images (PadChest's PNGs, most X-rays exported from DICOM).
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


def viewer_png(path: str | Path) -> bytes:
    """The image as the viewer receives it: a PNG with only the pixels (no text chunks, no file name).

    A 16-bit gray image travels as an RGB PNG whose red byte is the value's high byte and green its
    low byte, since browsers decode PNGs to 8 bits per channel: the viewer (``static/app.js``) puts the
    16 bits back together, so window/level works on the image's full depth.
    """
    with Image.open(path) as image:
        image.load()
        if image.mode in SIXTEEN_BIT:
            values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
            packed = np.stack([values >> 8, values & 0xFF, np.zeros_like(values)], axis=-1).astype(np.uint8)
            image = Image.fromarray(packed, "RGB")
        elif image.mode not in ("L", "RGB", "RGBA", "LA"):
            image = image.convert("RGB" if image.mode in ("P", "CMYK", "YCbCr") else "L")
        out = io.BytesIO()
        image.save(out, format="PNG")
    return out.getvalue()


class Refused(Exception):
    """Stop a request with a status and a short message (rendered as a page)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Session:
    reader_id: int | None  # None: the admin
    name: str
    csrf: str


def create_app(run_dir: Path, session_days: float = 7.0) -> FastAPI:
    """The app for the study in ``run_dir`` (``RUN/reader/study.sqlite``, made by ``maskaudit reader create``).

    A reader's session lasts ``session_days`` (the admin's :data:`ADMIN_SESSION`); after it, or after
    logging out, the reader opens their link again and goes on where they stopped.
    """
    reader_session = timedelta(days=session_days)
    paths = study_paths(run_dir)
    if not paths.db.is_file():
        from maskaudit.errors import MaskauditError

        raise MaskauditError(f"{paths.db} does not exist; run `maskaudit reader create {run_dir} --readers ...` first")
    db_path = paths.db
    with db.opened(db_path) as conn:
        db.init(conn)
        classes: list[str] = json.loads(conn.execute("SELECT value FROM study WHERE key='classes'").fetchone()[0])
        admin_hash = conn.execute("SELECT value FROM study WHERE key='admin_token_hash'").fetchone()[0]
    env = Environment(loader=PackageLoader("maskaudit", "reader/templates"), autoescape=select_autoescape(["html"]))
    static = {name: (resources.files("maskaudit.reader") / "static" / name).read_bytes() for name in STATIC}
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**context), status_code=status)

    def message(status: int, title: str, text: str, refresh: str | None = None) -> HTMLResponse:
        return page("message.html", status, title=title, text=text, refresh=refresh)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable) -> Response:
        try:
            response = await call_next(request)
        except Refused as exc:  # pragma: no cover - raised inside handlers, caught by the handler below
            response = message(exc.status, "Not allowed", exc.message)
        for key, value in HEADERS.items():
            response.headers[key] = value
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        return message(exc.status, "Not allowed" if exc.status in (401, 403) else "Not accepted", exc.message)

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> Response:
        return message(404, "Not found", "There is nothing here.")

    @app.exception_handler(405)
    async def not_allowed(request: Request, exc: Exception) -> Response:
        return message(405, "Not allowed", "This method is not allowed here.")

    # ------------------------------------------------------------------ sessions

    def session(request: Request, admin: bool = False) -> Session:
        value = request.cookies.get(ADMIN_COOKIE if admin else READER_COOKIE, "")
        if not SESSION.match(value):
            raise Refused(401, "Open the personal link you were given." if not admin else "Admin login needed.")
        with db.opened(db_path) as conn:
            row = conn.execute("SELECT s.reader_id, s.csrf, s.created_at, r.name FROM sessions s LEFT JOIN readers r "
                               "ON r.id = s.reader_id WHERE s.id_hash = ?", (db.digest(value),)).fetchone()
            if row is None or (row["reader_id"] is None) != admin:
                raise Refused(401, "This session is not valid; open your personal link again.")
            age = datetime.now(UTC) - datetime.fromisoformat(row["created_at"])
            if age > (ADMIN_SESSION if admin else reader_session):
                with db.transaction(conn):
                    conn.execute("DELETE FROM sessions WHERE id_hash = ?", (db.digest(value),))
                raise Refused(401, "Your session has expired; open your personal link again (answers are kept).")
        return Session(row["reader_id"], row["name"] or "admin", row["csrf"])

    def open_session(reader_id: int | None) -> str:
        value = secrets.token_urlsafe(32)
        with db.opened(db_path) as conn, db.transaction(conn):
            conn.execute("INSERT INTO sessions (id_hash, reader_id, csrf, created_at) VALUES (?, ?, ?, ?)",
                         (db.digest(value), reader_id, secrets.token_urlsafe(32), db.now()))
        return value

    def set_cookie(response: Response, request: Request, name: str, value: str, path: str = "/") -> None:
        response.set_cookie(name, value, httponly=True, samesite="strict", path=path,
                            secure=request.url.scheme == "https",
                            max_age=int((ADMIN_SESSION if name == ADMIN_COOKIE else reader_session).total_seconds()))

    def check_post(request: Request, form: dict[str, str], sess: Session) -> None:
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin not in (f"http://{host}", f"https://{host}"):  # "null" is refused too
            raise Refused(403, "This form was sent from another site.")
        sent = form.get("csrf", "")
        if not sent or not secrets.compare_digest(sent.encode(), sess.csrf.encode()):
            raise Refused(403, "The form's security token is missing or wrong; reload the page and answer again.")

    # ------------------------------------------------------------------ the reader's cases

    def order(conn: sqlite3.Connection, reader_id: int) -> list[sqlite3.Row]:
        """The reader's cases in their order, each with how many classes are answered."""
        return conn.execute(
            "SELECT a.position, a.case_id, a.opaque, (SELECT COUNT(*) FROM answers x WHERE x.reader_id = a.reader_id "
            "AND x.case_id = a.case_id) AS n_answered FROM assignments a WHERE a.reader_id = ? ORDER BY a.position",
            (reader_id,)).fetchall()

    def first_open(rows: list[sqlite3.Row]) -> str:
        for row in rows:
            if row["n_answered"] < len(classes):
                return f"/case/{row['opaque']}"
        return "/done"

    def assigned(conn: sqlite3.Connection, reader_id: int, opaque: str) -> sqlite3.Row:
        """The reader's own case with this id; 404 for anything else (another reader's id included)."""
        row = None
        if OPAQUE.match(opaque):
            row = conn.execute("SELECT a.position, a.case_id, c.kind, c.path FROM assignments a JOIN cases c "
                               "ON c.id = a.case_id WHERE a.reader_id = ? AND a.opaque = ?",
                               (reader_id, opaque)).fetchone()
        if row is None:
            raise Refused(404, "There is no such case among yours.")
        return row

    @app.get("/r/{token}")
    def reader_login(token: str, request: Request) -> Response:
        row = None
        if TOKEN.match(token):
            with db.opened(db_path) as conn:
                row = conn.execute("SELECT id, name FROM readers WHERE token_hash = ?", (db.digest(token),)).fetchone()
        if row is None:
            raise Refused(403, "This link is not valid. Ask the study's organiser for yours.")
        response = message(200, f"Welcome, {row['name']}", "Opening your first case…", refresh="/")
        set_cookie(response, request, READER_COOKIE, open_session(row["id"]))
        return response

    @app.get("/")
    def home(request: Request) -> Response:
        sess = session(request)
        with db.opened(db_path) as conn:
            return RedirectResponse(first_open(order(conn, sess.reader_id)), status_code=303)

    @app.get("/case/{opaque}")
    def show_case(opaque: str, request: Request) -> Response:
        sess = session(request)
        with db.opened(db_path) as conn:
            case = assigned(conn, sess.reader_id, opaque)
            rows = order(conn, sess.reader_id)
            answers = {r["class"]: r for r in conn.execute(
                "SELECT class, answer, confidence FROM answers WHERE reader_id = ? AND case_id = ?",
                (sess.reader_id, case["case_id"]))}
            comment = conn.execute("SELECT comment FROM comments WHERE reader_id = ? AND case_id = ?",
                                   (sess.reader_id, case["case_id"])).fetchone()
        position = case["position"]
        return page("case.html", reader=sess.name, opaque=opaque, csrf=sess.csrf, position=position + 1,
                    total=len(rows), done=sum(r["n_answered"] >= len(classes) for r in rows),
                    prev=f"/case/{rows[position - 1]['opaque']}" if position > 0 else None,
                    next=f"/case/{rows[position + 1]['opaque']}" if position + 1 < len(rows) else None,
                    kind=case["kind"], depth=image_depth(case["path"]), comment_max=db.COMMENT_MAX,
                    comment=comment["comment"] if comment else "",
                    classes=[{"index": k, "name": name,
                              "answer": answers[name]["answer"] if name in answers else None,
                              "confidence": answers[name]["confidence"] if name in answers else None}
                             for k, name in enumerate(classes)],
                    choices=[("present", "present", "p"), ("absent", "absent", "a"),
                             ("cannot_tell", "cannot tell", "c")],
                    confidences=range(db.CONFIDENCE[0], db.CONFIDENCE[1] + 1))

    def parse_answers(form: dict[str, str]) -> tuple[dict[str, tuple[str, int | None]], str | None, str]:
        """Validate a submission: ``({class: (answer, confidence)}, comment, go)``; 422 on anything off."""
        known = {"csrf", "comment", "go"} | {f"{p}_{k}" for k in range(len(classes)) for p in ("answer", "confidence")}
        unknown = sorted(set(form) - known)
        if unknown:
            raise Refused(422, f"Unknown fields: {', '.join(unknown)[:200]}")
        answers: dict[str, tuple[str, int | None]] = {}
        for k, name in enumerate(classes):
            answer, confidence = form.get(f"answer_{k}", ""), form.get(f"confidence_{k}", "")
            if not answer and not confidence:
                continue
            if answer not in db.ANSWERS:
                raise Refused(422, f"{name}: choose present, absent or cannot tell")
            if answer == "cannot_tell" and not confidence:
                answers[name] = (answer, None)
                continue
            if not re.fullmatch(r"[0-9]", confidence) or not db.CONFIDENCE[0] <= int(confidence) <= db.CONFIDENCE[1]:
                raise Refused(422, f"{name}: give a confidence from {db.CONFIDENCE[0]} to {db.CONFIDENCE[1]}")
            answers[name] = (answer, int(confidence))
        comment = form["comment"].replace("\r\n", "\n") if "comment" in form else None  # None: keep the old one
        if comment is not None and len(comment) > db.COMMENT_MAX:
            raise Refused(422, f"The comment is longer than {db.COMMENT_MAX} characters.")
        go = form.get("go", "next")
        if go not in GO:
            raise Refused(422, "Unknown navigation.")
        return answers, comment, go

    async def read_form(request: Request) -> dict[str, str]:
        if len(await request.body()) > 64_000:
            raise Refused(413, "This submission is too large.")
        form: dict[str, str] = {}
        for key, value in (await request.form()).multi_items():
            if not isinstance(value, str) or key in form:
                raise Refused(422, f"Field {key[:40]!r} is sent twice or is not text.")
            form[key] = value
        return form

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        """End the reader's (or, with ``who=admin``, the admin's) session; answers stay."""
        form = await read_form(request)
        admin = form.get("who") == "admin"
        sess = session(request, admin)
        check_post(request, form, sess)
        cookie = ADMIN_COOKIE if admin else READER_COOKIE
        with db.opened(db_path) as conn, db.transaction(conn):
            conn.execute("DELETE FROM sessions WHERE id_hash = ?", (db.digest(request.cookies[cookie]),))
        response = message(200, "Logged out", "Your answers are saved. Open your personal link to go on.")
        response.delete_cookie(cookie, path="/")
        return response

    @app.post("/case/{opaque}")
    async def save_case(opaque: str, request: Request) -> Response:
        sess = session(request)
        form = await read_form(request)
        check_post(request, form, sess)
        answers, comment, go = parse_answers(form)

        def save() -> str:
            with db.opened(db_path) as conn:
                case = assigned(conn, sess.reader_id, opaque)
                at = db.now()
                with db.transaction(conn):
                    for name, (answer, confidence) in answers.items():
                        conn.execute(
                            "INSERT INTO answers (reader_id, case_id, class, answer, confidence, updated_at) "
                            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (reader_id, case_id, class) DO UPDATE SET "
                            "answer = excluded.answer, confidence = excluded.confidence, "
                            "updated_at = excluded.updated_at",
                            (sess.reader_id, case["case_id"], name, answer, confidence, at))
                    if comment is not None:
                        conn.execute(
                            "INSERT INTO comments (reader_id, case_id, comment, updated_at) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (reader_id, case_id) DO UPDATE SET comment = excluded.comment, "
                            "updated_at = excluded.updated_at", (sess.reader_id, case["case_id"], comment, at))
                    conn.execute("INSERT INTO history (reader_id, case_id, submission, at) VALUES (?, ?, ?, ?)",
                                 (sess.reader_id, case["case_id"],
                                  json.dumps({"answers": {k: list(v) for k, v in answers.items()},
                                              "comment": comment}), at))
                rows = order(conn, sess.reader_id)
            position = case["position"]
            if go == "stay":
                return f"/case/{opaque}"
            if go == "prev":
                return f"/case/{rows[max(position - 1, 0)]['opaque']}"
            return f"/case/{rows[position + 1]['opaque']}" if position + 1 < len(rows) else first_open(rows)

        return RedirectResponse(await run_in_threadpool(save), status_code=303)

    @lru_cache(maxsize=256)
    def image_bytes(stored: str) -> bytes:
        return viewer_png(image_path(paths, stored))

    @lru_cache(maxsize=1024)
    def image_depth(stored: str) -> int:
        with Image.open(image_path(paths, stored)) as image:
            return 16 if image.mode in SIXTEEN_BIT else 8

    @app.get("/image/{opaque}")
    def image(opaque: str, request: Request) -> Response:
        sess = session(request)
        with db.opened(db_path) as conn:
            case = assigned(conn, sess.reader_id, opaque)
        return Response(image_bytes(case["path"]), media_type="image/png")

    @app.get("/done")
    def done(request: Request) -> Response:
        sess = session(request)
        with db.opened(db_path) as conn:
            rows = order(conn, sess.reader_id)
        return page("done.html", reader=sess.name, csrf=sess.csrf, total=len(rows),
                    cases=[{"n": r["position"] + 1, "href": f"/case/{r['opaque']}",
                            "complete": r["n_answered"] >= len(classes)} for r in rows],
                    done=sum(r["n_answered"] >= len(classes) for r in rows))

    @app.get("/static/{name}")
    def static_file(name: str, request: Request) -> Response:
        try:
            session(request)
        except Refused:
            session(request, admin=True)
        if name not in STATIC:
            raise Refused(404, "There is nothing here.")
        return Response(static[name], media_type=STATIC[name])

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # nothing, so browsers stop asking

    # ------------------------------------------------------------------ admin

    @app.get("/admin/login/{token}")
    def admin_login(token: str, request: Request) -> Response:
        if not (TOKEN.match(token) and secrets.compare_digest(db.digest(token), admin_hash)):
            raise Refused(403, "This admin link is not valid.")
        response = message(200, "Study admin", "Opening the progress page…", refresh="/admin")
        set_cookie(response, request, ADMIN_COOKIE, open_session(None), path="/")
        return response

    @app.get("/admin")
    def admin(request: Request) -> Response:
        sess = session(request, admin=True)
        with db.opened(db_path) as conn:
            n_cases = conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
            readers = conn.execute(
                "SELECT r.name, (SELECT COUNT(*) FROM (SELECT case_id FROM answers x WHERE x.reader_id = r.id "
                "GROUP BY case_id HAVING COUNT(*) >= ?)) AS complete, (SELECT COUNT(*) FROM answers x "
                "WHERE x.reader_id = r.id) AS n_answers, (SELECT MAX(updated_at) FROM answers x "
                "WHERE x.reader_id = r.id) AS last FROM readers r ORDER BY r.name", (len(classes),)).fetchall()
        return page("admin.html", csrf=sess.csrf, n_cases=n_cases, classes=classes, readers=readers)

    @app.get("/admin/export.csv")
    def export(request: Request) -> Response:
        session(request, admin=True)
        with db.opened(db_path) as conn:
            rows = conn.execute(
                "SELECT r.name AS reader, a.case_id, c.strategy, c.image_id, a.class, a.answer, a.confidence, "
                "m.comment, a.updated_at FROM answers a JOIN readers r ON r.id = a.reader_id JOIN cases c "
                "ON c.id = a.case_id LEFT JOIN comments m ON m.reader_id = a.reader_id AND m.case_id = a.case_id "
                "ORDER BY r.name, a.case_id, a.class").fetchall()
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["reader", "case_id", "strategy", "image_id", "class", "answer", "confidence", "comment",
                         "updated_at"])
        writer.writerows([tuple(r) for r in rows])
        return PlainTextResponse(out.getvalue(), media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="reader_answers.csv"'})

    return app

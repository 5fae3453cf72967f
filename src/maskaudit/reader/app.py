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

Hardening (docs/reliability.md, "Reader app hardening"): a POST is accepted from the configured origins only
(:func:`origins_for`: ``--base-url`` and the address ``serve`` listens on, never the request's own ``Host``); a
request body over :data:`MAX_BODY` is refused with 413 before it is read and before any session is looked up
(:class:`BodyLimit`, on ``Content-Length`` and on the bytes as they stream in); wrong links are throttled per
client address (:class:`Throttle`: after :data:`THROTTLE_FAILURES` in a minute, 429 for a minute); the CSV
export neutralises cells that a spreadsheet would read as a formula (:func:`maskaudit.reader.db.answers_csv`).
"""

from __future__ import annotations

import io
import json
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
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
from PIL import Image, ImageOps
from starlette.datastructures import MutableHeaders

from maskaudit.errors import MaskauditError
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
#: The largest request body accepted (a case's answers are well under 30 KB, with a comment of COMMENT_MAX characters).
MAX_BODY = 64 * 1024
#: Wrong links (reader or admin tokens) from one client address within THROTTLE_WINDOW seconds before it is refused
#: with 429 for THROTTLE_BLOCK seconds; at most THROTTLE_CLIENTS addresses are remembered.
THROTTLE_FAILURES, THROTTLE_WINDOW, THROTTLE_BLOCK, THROTTLE_CLIENTS = 10, 60.0, 60.0, 4096
#: The addresses ``serve`` listens on by default: what a browser on the same machine calls them.
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(scheme: str, host: str, port: int | None) -> str:
    """``scheme://host[:port]`` as a browser writes it in ``Origin`` (lower case, no default port, IPv6 in [])."""
    host = host.lower().strip("[]")
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + ("" if port is None or port == _DEFAULT_PORTS[scheme] else f":{port}")


def origins_for(host: str = "127.0.0.1", port: int = 8000, base_url: str | None = None) -> list[str]:
    """The origins a form may be posted from: ``base_url``'s (the address in the readers' links, e.g. behind an
    https proxy), and the listening address's (``http://host:port``; each loopback name for a loopback host).

    Raises
    ------
    MaskauditError
        For a ``base_url`` that is no http(s) URL, or a wildcard ``host`` (``0.0.0.0``, ``::``) without one:
        the listening address names no origin a browser would send.
    """
    origins = []
    if base_url is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(base_url.strip())
        try:
            url_port = parts.port
        except ValueError:
            url_port = -1
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or url_port == -1:
            raise MaskauditError(f"--base-url {base_url!r}: expected an http(s) address such as "
                                 "https://reader.example.org or http://10.0.0.5:8000")
        origins.append(_origin(parts.scheme, parts.hostname, url_port))
    if host in WILDCARD:
        if base_url is None:
            raise MaskauditError(f"--host {host or '(all)'} listens on every address, so it names none that readers "
                                 "open: give --base-url with the address in their links (e.g. http://10.0.0.5:8000)")
    else:
        origins += [_origin("http", name, port) for name in (LOOPBACK if host.lower() in LOOPBACK else (host,))]
    return list(dict.fromkeys(origins))


class SecurityHeaders:
    """ASGI middleware: :data:`HEADERS` on every response (pages, images, refusals).

    Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which reads the request body through a task group of
    its own, so that :class:`BodyLimit`'s refusal reaches the app's handler of :class:`Refused` as it is.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in HEADERS.items():
                    headers[key] = value
            await send(message)

        await self.app(scope, receive, with_headers)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 without reading it.

    A ``Content-Length`` over the limit is refused before the app runs (so before any session is looked up);
    a body without one (chunked) is counted as it streams in, and refused as soon as the count passes the
    limit: nothing more is read from the client.
    """

    def __init__(self, app: Any, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit():
                await self._refuse(send, 400, "This request's Content-Length is not a number.")
                return
            if int(length) > self.limit:
                await self._refuse(send, 413, "This submission is too large.")
                return
        received, started = 0, False

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge(413, "This submission is too large.")
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if started:
                raise
            await self._refuse(send, 413, "This submission is too large.")

    @staticmethod
    async def _refuse(send: Callable, status: int, text: str) -> None:
        body = text.encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in HEADERS.items())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Throttle:
    """Wrong links per client address: after ``failures`` within ``window`` seconds, refused for ``block`` seconds.

    Memory is bounded: at most ``clients`` addresses are kept (stale ones are dropped first, then the oldest).
    Thread-safe (the app's routes run in a thread pool).
    """

    def __init__(self, failures: int = THROTTLE_FAILURES, window: float = THROTTLE_WINDOW,
                 block: float = THROTTLE_BLOCK, clients: int = THROTTLE_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.window, self.block, self.clients, self.clock = failures, window, block, clients, clock
        self._seen: OrderedDict[str, tuple[deque[float], float]] = OrderedDict()  # address -> (failures, until)
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        with self._lock:
            entry = self._seen.get(address)
            return max(0.0, entry[1] - self.clock()) if entry else 0.0

    def failed(self, address: str) -> None:
        """Count one wrong link from ``address``."""
        now = self.clock()
        with self._lock:
            times, until = self._seen.pop(address, (deque(maxlen=self.failures), 0.0))
            while times and times[0] <= now - self.window:
                times.popleft()
            times.append(now)
            if len(times) >= self.failures:
                times.clear()
                until = now + self.block
            self._seen[address] = (times, until)
            if len(self._seen) > self.clients:  # forget addresses neither blocked nor recently wrong, then the oldest
                for stale in [a for a, (t, u) in self._seen.items()
                              if u <= now and (not t or t[-1] <= now - self.window)]:
                    del self._seen[stale]
                while len(self._seen) > self.clients:
                    self._seen.popitem(last=False)


#: Pillow modes of 16-bit gray images (PadChest's PNGs, most X-rays exported from DICOM).
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I")


def viewer_png(path: str | Path) -> bytes:
    """The image as the viewer receives it: a PNG with only the pixels (no text chunks, no file name), upright
    (its EXIF orientation applied, as ``prepare`` does, since the PNG carries no EXIF).

    A 16-bit gray image travels as an RGB PNG whose red byte is the value's high byte and green its
    low byte, since browsers decode PNGs to 8 bits per channel: the viewer (``static/app.js``) puts the
    16 bits back together, so window/level works on the image's full depth.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
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
    """Stop a request with a status and a short message (rendered as a page), and headers to add to it."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class _TooLarge(Refused):
    """A request body that passed :data:`MAX_BODY` while streaming in (raised by :class:`BodyLimit`)."""


@dataclass(frozen=True)
class Session:
    reader_id: int | None  # None: the admin
    name: str
    csrf: str


def create_app(run_dir: Path, session_days: float = 7.0, origins: Iterable[str] | None = None) -> FastAPI:
    """The app for the study in ``run_dir`` (``RUN/reader/study.sqlite``, made by ``maskaudit reader create``).

    A reader's session lasts ``session_days`` (the admin's :data:`ADMIN_SESSION`); after it, or after
    logging out, the reader opens their link again and goes on where they stopped. ``origins``: where a form
    may be posted from (:func:`origins_for`; default that of ``serve``'s defaults, ``http://127.0.0.1:8000``).
    """
    reader_session = timedelta(days=session_days)
    allowed = frozenset(o.lower().rstrip("/") for o in (origins_for() if origins is None else origins))
    throttle = Throttle()
    paths = study_paths(run_dir)
    if not paths.db.is_file():
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

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> Response:
        title = {401: "Not allowed", 403: "Not allowed", 429: "Too many attempts"}.get(exc.status, "Not accepted")
        response = message(exc.status, title, exc.message)
        response.headers.update(exc.headers)
        return response

    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, limit=MAX_BODY)  # outermost (added last): before the routes and the sessions

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
        if origin is not None and origin.lower() not in allowed:  # "null" is refused too; Host is never trusted
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

    def client_address(request: Request) -> str:
        return request.client.host if request.client else ""

    def throttled(request: Request) -> None:
        """429 while the client's address has had too many wrong links (:class:`Throttle`)."""
        wait = throttle.retry_after(client_address(request))
        if wait > 0:
            raise Refused(429, "Too many wrong links from your address: wait a minute, then open your link again.",
                          headers={"Retry-After": str(max(1, round(wait)))})

    @app.get("/r/{token}")
    def reader_login(token: str, request: Request) -> Response:
        throttled(request)
        row = None
        if TOKEN.match(token):
            with db.opened(db_path) as conn:
                row = conn.execute("SELECT id, name FROM readers WHERE token_hash = ?", (db.digest(token),)).fetchone()
        if row is None:
            throttle.failed(client_address(request))
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
        if len(await request.body()) > MAX_BODY:  # BodyLimit has refused anything larger already
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
        throttled(request)
        if not (TOKEN.match(token) and secrets.compare_digest(db.digest(token), admin_hash)):
            throttle.failed(client_address(request))
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
            text = db.answers_csv(conn)
        return PlainTextResponse(text, media_type="text/csv",
                                 headers={"Content-Disposition": 'attachment; filename="reader_answers.csv"'})

    return app

"""The review page: search the vocabulary and review mapping jobs, as your own database role.

Starlette + Jinja2, rendered on the server; the only JavaScript is ``static/review.js``
(keyboard shortcuts). Every query runs on the logged-in session's own connection
(see :mod:`.sessions`), so the extension's grants and row-level security decide what
each reviewer sees and may change. Errors from the database are shown with their
message, detail and hint, never as a stack trace.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..errors import OmopEmbError, from_db_error
from .server import DEFAULT_IDLE_TIMEOUT_S
from .sessions import COOKIE_NAME, Session, SessionStore
from .throttle import LoginThrottle

HERE = Path(__file__).resolve().parent

#: Terms per page of a job's queue (the ?per_page= choices are bounded by MAX_PAGE_SIZE).
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
#: Rows of a search (?k=); nearest() itself accepts 1..1000.
DEFAULT_SEARCH_K = 20
#: Rows of the review page's inline search for another concept (they join the term's candidates).
INLINE_SEARCH_K = 10
#: Rows shown per section of a concept's detail (ancestors, descendants, mapped from).
DETAIL_LIMIT = 100
SEARCH_MODES = ("", "semantic", "lexical", "hybrid")
DECISION_STATUSES = ("approved", "flagged", "unmapped", "ignored", "unreviewed")
QUEUE_STATUSES = ("approved", "flagged", "unmapped", "ignored", "unreviewed")
EQUIVALENCES = ("EQUAL", "EQUIVALENT", "WIDER", "NARROWER", "INEXACT", "UNMATCHED", "UNREVIEWED")
#: The order of a job's queue: most frequent source terms first (the contract's mapping_queue order).
QUEUE_ORDER = "source_frequency DESC NULLS LAST, source_code, term_id"


@dataclass
class UiSettings:
    """What ``omop-emb-pg ui`` was started with."""

    dsn: str = ""
    single_user: bool = False
    model: str | None = None
    vocabulary_schema: str | None = None
    cdm_schema: str | None = None
    secure_cookies: bool = False
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S


class PageError(Exception):
    """A message for the page (bad input): what was wrong, the value, what is valid."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = None


def error_view(err: BaseException) -> dict[str, str | None]:
    """The message, detail and hint of an error as the page shows them (no traceback)."""
    if isinstance(err, psycopg.Error) and getattr(err, "diag", None) is not None and err.diag.message_primary:
        err = from_db_error(err)
    if isinstance(err, (OmopEmbError, PageError)):
        return {"message": err.message, "detail": err.detail, "hint": err.hint}
    return {"message": str(err).strip() or err.__class__.__name__, "detail": None, "hint": None}


def split_list(value: str | None) -> list[str] | None:
    """'Condition, Drug' -> ['Condition', 'Drug']; blank -> None (no filter)."""
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    return items or None


def parse_int(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value.strip() == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise PageError(f"{name} must be a whole number, got {value!r}", hint=f"Use {lo}..{hi}.") from None
    if not lo <= n <= hi:
        raise PageError(f"{name} must be between {lo} and {hi}, got {n}", hint=f"Use {lo}..{hi}.")
    return n


def is_loopback(host: str | None) -> bool:
    if not host:
        return True  # a unix socket
    if host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def login_conninfo(dsn: str, user: str, password: str) -> str:
    """The DSN's host, port and database with the user and password typed in the form.

    The password is always set explicitly, so libpq never falls back on PGPASSWORD or a
    ~/.pgpass of the account running the page (someone else's credentials)."""
    return make_conninfo(dsn, user=user, password=password, passfile="/dev/null")


def dsn_target(dsn: str) -> str:
    """'host:port/dbname' of a DSN, for the login page (no user, no password)."""
    d = conninfo_to_dict(dsn)
    host = d.get("host") or "(local socket)"
    port = d.get("port") or "5432"
    return f"{host}:{port}/{d.get('dbname') or d.get('user') or ''}"


# ---------------------------------------------------------------- queries
def q_all(conn: psycopg.Connection, query: Any, params: Any = None) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description else []


def q_one(conn: psycopg.Connection, query: Any, params: Any = None) -> dict | None:
    rows = q_all(conn, query, params)
    return rows[0] if rows else None


def models(conn: psycopg.Connection) -> list[dict]:
    return q_all(conn, "SELECT name, vocabulary_schema FROM omop_emb.models ORDER BY model_id")


def default_vocabulary_schema(conn: psycopg.Connection, settings: UiSettings, model: str | None) -> str | None:
    """--vocabulary-schema, else the vocabulary_schema recorded for the model in omop_emb.models
    (the model given, else the omop_emb.model setting, else the first registered)."""
    if settings.vocabulary_schema:
        return settings.vocabulary_schema
    row = q_one(conn, """
        SELECT vocabulary_schema FROM omop_emb.models
        ORDER BY (name = coalesce(%s, nullif(current_setting('omop_emb.model', true), ''))) IS TRUE DESC,
                 model_id
        LIMIT 1""", (model or settings.model,))
    return row["vocabulary_schema"] if row else None


def search_rows(conn: psycopg.Connection, q: str, *, k: int, domain_ids, vocabulary_ids, concept_class_ids,
                standard_only: bool, mode: str | None, model: str | None) -> list[dict]:
    """omop_emb.nearest(); every column it returns (a confidence column when it has one)."""
    return q_all(conn, """
        SELECT * FROM omop_emb.nearest(%(q)s::text, k => %(k)s, domain_ids => %(d)s::text[],
                                       vocabulary_ids => %(v)s::text[], concept_class_ids => %(c)s::text[],
                                       standard_only => %(s)s, model => %(m)s::text, mode => %(mode)s::text)""",
                 {"q": q, "k": k, "d": domain_ids, "v": vocabulary_ids, "c": concept_class_ids,
                  "s": standard_only, "m": model, "mode": mode or None})


#: Where a CDM holds each concept's records (the tables mapping jobs count too, see omop_emb_internal.mapping_record_counts).
CDM_CONCEPT_COLUMNS = (
    ("condition_occurrence", "condition_concept_id"), ("drug_exposure", "drug_concept_id"),
    ("procedure_occurrence", "procedure_concept_id"), ("measurement", "measurement_concept_id"),
    ("observation", "observation_concept_id"), ("device_exposure", "device_concept_id"),
    ("visit_occurrence", "visit_concept_id"), ("specimen", "specimen_concept_id"),
)
#: Achilles analyses counting records per concept (stratum_1 = concept_id).
ACHILLES_RECORD_ANALYSES = (201, 401, 601, 701, 801, 1801, 2101)


def search_context(conn: psycopg.Connection, vocabulary_schema: str | None, cdm_schema: str | None,
                   concept_ids: list[int]) -> tuple[dict[int, dict], dict | None]:
    """Parents (concept_ancestor, one level up) and, with a CDM schema, record counts of the
    concepts found -- read as the logged-in role, only for these concepts. Returns
    ({concept_id: {"parents": [...], "records": n}}, the error that spoiled it or None)."""
    ctx: dict[int, dict] = {c: {"parents": [], "records": None} for c in concept_ids}
    if not concept_ids:
        return ctx, None
    try:
        if vocabulary_schema:
            for r in q_all(conn, sql.SQL("""
                    SELECT a.descendant_concept_id AS id, c.concept_name FROM {0}.concept_ancestor a
                    JOIN {0}.concept c ON c.concept_id = a.ancestor_concept_id
                    WHERE a.descendant_concept_id = ANY(%s) AND a.min_levels_of_separation = 1
                    ORDER BY c.concept_name""").format(sql.Identifier(vocabulary_schema)), (concept_ids,)):
                ctx[r["id"]]["parents"].append(r["concept_name"])
        if cdm_schema:
            cdm = sql.Identifier(cdm_schema)
            if q_one(conn, "SELECT to_regclass(format('%%I.achilles_results', %s::text)) IS NOT NULL AS y",
                     (cdm_schema,))["y"]:
                counts = q_all(conn, sql.SQL("""
                    SELECT stratum_1::integer AS id, sum(count_value)::bigint AS n FROM {}.achilles_results
                    WHERE analysis_id = ANY(%s) AND stratum_1 = ANY(%s::text[]) GROUP BY 1""").format(cdm),
                    (list(ACHILLES_RECORD_ANALYSES), [str(c) for c in concept_ids]))
            else:
                present = {r["t"] for r in q_all(conn, """
                    SELECT c.relname AS t FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = %s AND c.relname = ANY(%s)""", (cdm_schema, [t for t, _ in CDM_CONCEPT_COLUMNS]))}
                parts = [sql.SQL("SELECT {col} AS id FROM {cdm}.{tbl} WHERE {col} = ANY(%(ids)s)").format(
                    col=sql.Identifier(col), cdm=cdm, tbl=sql.Identifier(tbl))
                    for tbl, col in CDM_CONCEPT_COLUMNS if tbl in present]
                counts = q_all(conn, sql.SQL("SELECT id, count(*) AS n FROM ({}) x GROUP BY id").format(
                    sql.SQL(" UNION ALL ").join(parts)), {"ids": concept_ids}) if parts else []
            for c in ctx.values():
                c["records"] = 0
            for r in counts:
                if r["id"] in ctx:
                    ctx[r["id"]]["records"] = r["n"]
    except psycopg.Error as e:
        return ctx, error_view(e)
    return ctx, None


def concept_detail(conn: psycopg.Connection, schema: str, concept_id: int) -> dict[str, Any]:
    """A concept with its synonyms, ancestors, descendants and what maps to it / it maps to.
    Each section is read on its own: a missing table or privilege spoils only that section."""
    s = sql.Identifier(schema)
    sections: dict[str, Any] = {"errors": {}}

    def read(name: str, query: sql.Composable, params: tuple) -> None:
        try:
            sections[name] = q_all(conn, query, params)
        except psycopg.Error as e:
            sections[name] = []
            sections["errors"][name] = error_view(e)

    read("concept", sql.SQL("SELECT * FROM {}.concept WHERE concept_id = %s").format(s), (concept_id,))
    read("synonyms", sql.SQL("""
        SELECT concept_synonym_name, language_concept_id FROM {}.concept_synonym
        WHERE concept_id = %s ORDER BY concept_synonym_name LIMIT %s""").format(s), (concept_id, DETAIL_LIMIT))
    read("ancestors", sql.SQL("""
        SELECT c.concept_id, c.concept_name, c.vocabulary_id, c.concept_class_id, a.min_levels_of_separation AS levels
        FROM {0}.concept_ancestor a JOIN {0}.concept c ON c.concept_id = a.ancestor_concept_id
        WHERE a.descendant_concept_id = %s AND a.ancestor_concept_id <> %s
        ORDER BY a.min_levels_of_separation, c.concept_name LIMIT %s""").format(s),
         (concept_id, concept_id, DETAIL_LIMIT))
    read("descendants", sql.SQL("""
        SELECT c.concept_id, c.concept_name, c.vocabulary_id, c.concept_class_id, a.min_levels_of_separation AS levels,
               count(*) OVER () AS total
        FROM {0}.concept_ancestor a JOIN {0}.concept c ON c.concept_id = a.descendant_concept_id
        WHERE a.ancestor_concept_id = %s AND a.descendant_concept_id <> %s
        ORDER BY a.min_levels_of_separation, c.concept_name LIMIT %s""").format(s),
         (concept_id, concept_id, DETAIL_LIMIT))
    read("mapped_from", sql.SQL("""
        SELECT c.concept_id, c.concept_name, c.vocabulary_id, c.concept_code, count(*) OVER () AS total
        FROM {0}.concept_relationship r JOIN {0}.concept c ON c.concept_id = r.concept_id_1
        WHERE r.concept_id_2 = %s AND r.relationship_id = 'Maps to' AND r.concept_id_1 <> %s
          AND r.invalid_reason IS NULL
        ORDER BY c.vocabulary_id, c.concept_name LIMIT %s""").format(s), (concept_id, concept_id, DETAIL_LIMIT))
    read("maps_to", sql.SQL("""
        SELECT c.concept_id, c.concept_name, c.vocabulary_id, c.concept_code
        FROM {0}.concept_relationship r JOIN {0}.concept c ON c.concept_id = r.concept_id_2
        WHERE r.concept_id_1 = %s AND r.relationship_id = 'Maps to' AND r.concept_id_2 <> %s
          AND r.invalid_reason IS NULL
        ORDER BY c.concept_name LIMIT %s""").format(s), (concept_id, concept_id, DETAIL_LIMIT))
    return sections


def queue_filter(job_id: int, status: str | None, reviewer: str | None) -> tuple[sql.Composable, dict]:
    where = [sql.SQL("job_id = %(job)s")]
    params: dict[str, Any] = {"job": job_id}
    if status:
        where.append(sql.SQL("status = %(status)s"))
        params["status"] = status
    if reviewer:
        where.append(sql.SQL("(assigned_reviewer = %(reviewer)s OR decided_by = %(reviewer)s)"))
        params["reviewer"] = reviewer
    return sql.SQL(" AND ").join(where), params


def queue_page(conn: psycopg.Connection, job_id: int, *, status: str | None, reviewer: str | None,
               limit: int, offset: int) -> tuple[int, list[dict], dict[int, list[dict]]]:
    """(terms matching, the page's terms in queue order, their candidates by term_id), paginated in SQL.

    The page's term ids come first -- from mapping_term alone when nothing is filtered, else
    from mapping_queue reading only its status and reviewer columns -- and only those terms'
    current decisions, top candidates and candidates are read: the cost of a page is that of
    one ordered pass over the job's terms plus 50 terms' rows, not the whole queue's."""
    where, params = queue_filter(job_id, status, reviewer)
    source = "omop_emb.mapping_queue" if (status or reviewer) else "omop_emb.mapping_term"
    page_ids = q_all(conn, sql.SQL("SELECT term_id, count(*) OVER () AS total FROM " + source + " WHERE {} "
                                   "ORDER BY " + QUEUE_ORDER + " LIMIT %(limit)s OFFSET %(offset)s").format(where),
                     {**params, "limit": limit, "offset": offset})
    if page_ids:
        total = page_ids[0]["total"]
    else:  # past the last page: count alone
        total = q_one(conn, sql.SQL("SELECT count(*) AS n FROM " + source + " WHERE {}").format(where), params)["n"]
    ids = [r["term_id"] for r in page_ids]
    terms = q_all(conn, "SELECT * FROM omop_emb.mapping_queue WHERE term_id = ANY(%s) ORDER BY " + QUEUE_ORDER,
                  (ids,)) if ids else []
    cands: dict[int, list[dict]] = {t["term_id"]: [] for t in terms}
    if terms:
        for c in q_all(conn, "SELECT * FROM omop_emb.mapping_candidate WHERE term_id = ANY(%s) "
                             "ORDER BY term_id, rank", (ids,)):
            cands[c["term_id"]].append(c)
    return total, terms, cands


# ---------------------------------------------------------------- the application
def create_app(settings: UiSettings, store: SessionStore | None = None,
               throttle: LoginThrottle | None = None) -> Starlette:
    store = store or SessionStore(idle_timeout=settings.idle_timeout)
    throttle = throttle or LoginThrottle()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(urlencode=urlencode, EQUIVALENCES=EQUIVALENCES, QUEUE_STATUSES=QUEUE_STATUSES,
                                 SEARCH_MODES=SEARCH_MODES, fmt_num=_fmt_num)

    def render(request: Request, name: str, session: Session | None, status_code: int = 200, **ctx: Any):
        flash = []
        if session is not None:
            flash, session.flash = session.flash, []
        return templates.TemplateResponse(request, name, {"session": session, "flash": flash,
                                                          "single_user": settings.single_user, **ctx},
                                          status_code=status_code)

    def current(request: Request) -> Session | None:
        s = store.get(request.cookies.get(COOKIE_NAME))
        if s is None and settings.single_user:
            d = conninfo_to_dict(settings.dsn)
            s, cookie = store.create(d.get("user") or "(the DSN's user)", settings.dsn)
            request.state.new_cookie = cookie
        return s

    def with_cookie(request: Request, response: Response) -> Response:
        cookie = getattr(request.state, "new_cookie", None)
        if cookie:
            response.set_cookie(COOKIE_NAME, cookie, httponly=True, samesite="strict",
                                secure=settings.secure_cookies, path="/")
        return response

    def page(handler: Callable[[Request, Session], Response]):
        """A page that needs a session: login form otherwise; a broken connection is reported."""
        def endpoint(request: Request) -> Response:
            s = current(request)
            if s is None:
                nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse("/login?" + urlencode({"next": nxt}), status_code=303)
            if request.method == "POST":
                # CSRF: the form's token must be this session's (the cookie is SameSite=Strict, too).
                form = request.state.form = _form(request)
                if form.get("csrf") != s.csrf:
                    return render(request, "error.html", s, status_code=403,
                                  error={"message": "this form is out of date (session changed)",
                                         "detail": None, "hint": "Reload the page and try again."})
            try:
                resp = handler(request, s)
            except psycopg.OperationalError as e:
                resp = render(request, "error.html", s, status_code=503, error=error_view(e))
            except (psycopg.Error, OmopEmbError, PageError) as e:
                resp = render(request, "error.html", s, status_code=400, error=error_view(e))
            return with_cookie(request, resp)
        return endpoint

    # ------------------------------------------------------------ login
    def login(request: Request) -> Response:
        if settings.single_user:
            return RedirectResponse("/", status_code=303)
        nxt = request.query_params.get("next") or "/"
        error = None
        user = ""
        if request.method == "POST":
            form = _form(request)
            user = (form.get("user") or "").strip()
            password = form.get("password") or ""
            nxt = form.get("next") or "/"
            address = request.client.host if request.client else None
            wait, blocked = throttle.retry_after(address, user) if user else (0.0, None)
            if not user or not password:
                error = {"message": "enter a PostgreSQL user name and its password", "detail": None,
                         "hint": "The page runs every query as the role you log in with."}
            elif wait > 0:
                # Refused before the database is asked: the right password too.
                who = f"for user {user!r}" if blocked == "user" else "from this address"
                resp = render(request, "login.html", None, status_code=429, user=user, next=nxt,
                              target=dsn_target(settings.dsn), error={
                                  "message": f"too many failed logins {who}: try again in {math.ceil(wait)} s",
                                  "detail": None,
                                  "hint": f"At most {throttle.limits['user']} failed logins per user and "
                                          f"{throttle.limits['address']} per address in "
                                          f"{throttle.window_s / 60:g} minutes. A forgotten password is reset "
                                          "in PostgreSQL (ALTER ROLE ... PASSWORD)."})
                resp.headers["Retry-After"] = str(math.ceil(wait))
                return resp
            else:
                conninfo = login_conninfo(settings.dsn, user, password)
                try:
                    conn = psycopg.connect(conninfo, autocommit=True, application_name="omop-emb-pg ui")
                except psycopg.OperationalError as e:
                    if _is_auth_failure(e):  # not a database that is down or refuses connections
                        throttle.failed(address, user)
                    error = {"message": _connect_message(e), "detail": None,
                             "hint": "Check the user name and password (they are those of the database)."}
                else:
                    throttle.succeeded(address, user)
                    s, cookie = store.create(user, conninfo, conn)
                    resp = RedirectResponse(_safe_next(nxt), status_code=303)
                    resp.set_cookie(COOKIE_NAME, cookie, httponly=True, samesite="strict",
                                    secure=settings.secure_cookies, path="/")
                    return resp
        return render(request, "login.html", None, status_code=401 if error else 200, error=error, user=user,
                      next=nxt, target=dsn_target(settings.dsn))

    def logout(request: Request) -> Response:
        s = store.get(request.cookies.get(COOKIE_NAME))
        if s is not None and _form(request).get("csrf") == s.csrf:
            store.end(s)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE_NAME, path="/")
        return resp

    # ------------------------------------------------------------ search and concepts
    def search_params(request: Request) -> dict[str, Any]:
        qp = request.query_params
        return {
            "q": qp.get("q", ""),
            "domain": qp.get("domain", ""),
            "vocabulary": qp.get("vocabulary", ""),
            "concept_class": qp.get("concept_class", ""),
            # A checkbox sends nothing when unticked: 'submitted' tells "unticked" from "first visit".
            "standard": qp.get("standard") == "1" or "submitted" not in qp,
            "mode": qp.get("mode", ""),
            "k": qp.get("k", ""),
            "model": qp.get("model", "") or (settings.model or ""),
        }

    def search(request: Request, s: Session) -> Response:
        p = search_params(request)
        rows: list[dict] = []
        error = None
        with s.connection() as conn:
            try:
                model_list = models(conn)
            except psycopg.Error as e:
                model_list, error = [], error_view(e)
            if p["q"].strip() and error is None:
                try:
                    # k's range and the mode are the extension's to check: its message is shown.
                    rows = search_rows(conn, p["q"], k=parse_int(p["k"], "k", DEFAULT_SEARCH_K, -2**31, 2**31 - 1),
                                       domain_ids=split_list(p["domain"]), vocabulary_ids=split_list(p["vocabulary"]),
                                       concept_class_ids=split_list(p["concept_class"]),
                                       standard_only=p["standard"], mode=p["mode"], model=p["model"] or None)
                except (psycopg.Error, PageError) as e:
                    error = error_view(e)
            context, context_error = {}, None
            if rows:
                context, context_error = search_context(
                    conn, default_vocabulary_schema(conn, settings, p["model"] or None), settings.cdm_schema,
                    [r["concept_id"] for r in rows])
        return render(request, "search.html", s, p=p, rows=rows, error=error, models=model_list,
                      has_confidence=any(r.get("confidence") is not None for r in rows), context=context,
                      context_error=context_error, cdm_schema=settings.cdm_schema)

    def concept(request: Request, s: Session) -> Response:
        try:
            concept_id = int(request.path_params["concept_id"])
        except ValueError:
            raise PageError(f"not a concept_id: {request.path_params['concept_id']!r}") from None
        with s.connection() as conn:
            schema = request.query_params.get("schema") or default_vocabulary_schema(
                conn, settings, request.query_params.get("model"))
            if not schema:
                raise PageError("no vocabulary schema: no model records one",
                                hint="Start the page with --vocabulary-schema SCHEMA, or index a model with "
                                     "vocabulary_schema => 'SCHEMA'.")
            d = concept_detail(conn, schema, concept_id)
        return render(request, "concept.html", s, d=d, concept_id=concept_id, schema=schema)

    # ------------------------------------------------------------ review
    def jobs(request: Request, s: Session) -> Response:
        with s.connection() as conn:
            rows = q_all(conn, "SELECT * FROM omop_emb.mapping_jobs ORDER BY created_at DESC, job_id DESC")
        return render(request, "jobs.html", s, jobs=rows)

    def job_id_of(request: Request) -> int:
        try:
            return int(request.path_params["job_id"])
        except ValueError:
            raise PageError(f"not a job id: {request.path_params['job_id']!r}") from None

    def job(request: Request, s: Session) -> Response:
        job_id = job_id_of(request)
        qp = request.query_params
        status = qp.get("status") or None
        reviewer = (qp.get("reviewer") or "").strip() or None
        filters_error = None
        if status is not None and status not in QUEUE_STATUSES:
            filters_error = error_view(PageError(f"unknown status {status!r}",
                                                 hint="Use one of: " + ", ".join(QUEUE_STATUSES) + "."))
            status = None
        per_page = parse_int(qp.get("per_page"), "per_page", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        page_no = parse_int(qp.get("page"), "page", 1, 1, 10**9)
        with s.connection() as conn:
            summary = q_one(conn, "SELECT * FROM omop_emb.mapping_jobs WHERE job_id = %s", (job_id,))
            if summary is None:
                raise PageError(f"no mapping job {job_id} (or you may not see it)",
                                hint="See the list of jobs.")
            spec = q_one(conn, "SELECT * FROM omop_emb.mapping_job WHERE job_id = %s", (job_id,)) or {}
            total, terms, cands = queue_page(conn, job_id, status=status, reviewer=reviewer,
                                             limit=per_page, offset=(page_no - 1) * per_page)
            current_id = _int_or_none(qp.get("term"))
            if current_id not in cands:
                current_id = terms[0]["term_id"] if terms else None
            # Inline search for another concept for the current term, with the job's filters.
            inline = {"q": qp.get("q", ""), "rows": [], "error": None}
            if inline["q"].strip() and current_id is not None:
                try:
                    inline["rows"] = search_rows(
                        conn, inline["q"], k=INLINE_SEARCH_K, domain_ids=spec.get("domain_ids"),
                        vocabulary_ids=spec.get("vocabulary_ids"), concept_class_ids=spec.get("concept_class_ids"),
                        standard_only=True, mode=None, model=spec.get("model"))
                except psycopg.Error as e:
                    inline["error"] = error_view(e)
        pages = max(1, -(-total // per_page))
        base = {"status": status or "", "reviewer": reviewer or "", "per_page": per_page}
        for i, t in enumerate(terms):  # where the queue goes after a decision on t
            t["advance_to"] = terms[i + 1]["term_id"] if i + 1 < len(terms) else t["term_id"]
        return render(request, "job.html", s, job=summary, spec=spec, terms=terms, cands=cands, total=total,
                      page=page_no, pages=pages, per_page=per_page, status=status or "", reviewer=reviewer or "",
                      base=base, current_id=current_id, inline=inline, filters_error=filters_error,
                      default_stcm_target=_default_stcm_target(spec))

    def decide(request: Request, s: Session) -> Response:
        job_id = job_id_of(request)
        form = request.state.form
        back = form.get("back") or f"/jobs/{job_id}"
        term_id = _int_or_none(form.get("term_id"))
        status = form.get("status") or ""
        concept_ids = [int(x) for x in form.getlist("concept_id") if x.strip().lstrip("-").isdigit()] or None
        if status in ("unmapped", "ignored", "unreviewed"):
            concept_ids = None  # the radio button of a candidate is always set; these statuses take no concept
        equivalence = form.get("equivalence") or None
        comment = (form.get("comment") or "").strip() or None
        if term_id is None:
            raise PageError("no term given")
        if status == "comment":  # a comment on the current decision: same status and concepts
            with s.connection() as conn:
                cur = q_one(conn, "SELECT status, concept_ids, equivalence FROM omop_emb.mapping_queue "
                                  "WHERE term_id = %s", (term_id,)) or {}
            status, concept_ids, equivalence = (cur.get("status") or "unreviewed", cur.get("concept_ids"),
                                                cur.get("equivalence"))
            advance = term_id
        else:
            advance = _int_or_none(form.get("advance_to")) or term_id
        if status == "approved" and concept_ids is None and form.get("concept_id"):
            raise PageError(f"not a concept_id: {form.get('concept_id')!r}")
        try:
            with s.connection() as conn:
                q_all(conn, "SELECT omop_emb.record_decision(%s::bigint, %s::text, %s::integer[], %s::text, %s::text)",
                      (term_id, status, concept_ids, equivalence, comment))
            what = status + (f" → {', '.join(map(str, concept_ids))}" if concept_ids else "")
            label = (form.get("source_code") or "").strip() or f"term {term_id}"
            s.flash.append(("ok", f"{label}: {what}" + (" (with comment)" if comment else "")))
            return RedirectResponse(_with_term(back, advance), status_code=303)
        except psycopg.Error as e:
            # Back to the same term, the database's refusal on top.
            ev = error_view(e)
            s.flash.append(("error", ev["message"] + (f" — {ev['hint']}" if ev["hint"] else "")))
            return RedirectResponse(_with_term(back, term_id), status_code=303)

    def export_usagi(request: Request, s: Session) -> Response:
        from .. import mapping

        job_id = job_id_of(request)
        with s.connection() as conn, tempfile.TemporaryDirectory(prefix="omop_emb_ui_") as tmp:
            name = _job_name(conn, job_id)
            path = Path(tmp) / "usagi.csv"
            mapping.export_usagi_csv(conn, name, path)  # what `omop-emb-pg map export-usagi` writes
            body = path.read_bytes()
        filename = re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".usagi.csv"
        return Response(body, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    def export_stcm(request: Request, s: Session) -> Response:
        from .. import mapping

        job_id = job_id_of(request)
        form = request.state.form
        target = (form.get("target_table") or "").strip()
        back = form.get("back") or f"/jobs/{job_id}"
        if not target:
            raise PageError("give the target table, e.g. cdm.source_to_concept_map")
        try:
            with s.connection() as conn:
                name = _job_name(conn, job_id)
                r = mapping.export_source_to_concept_map(conn, name, target)
            s.flash.append(("ok", f"exported to {target}: {r['inserted']} inserted, {r['end_dated']} end-dated, "
                                  f"{r['unchanged']} unchanged"))
        except (psycopg.Error, OmopEmbError) as e:
            ev = error_view(e)
            s.flash.append(("error", ev["message"] + (f" — {ev['hint']}" if ev["hint"] else "")))
        return RedirectResponse(_safe_next(back), status_code=303)

    def home(request: Request, s: Session) -> Response:
        return RedirectResponse("/search", status_code=303)

    def sync_with_form(endpoint):
        # Starlette reads a form asynchronously; read it first, then run the (blocking, psycopg)
        # endpoint in the thread pool.
        from starlette.concurrency import run_in_threadpool

        async def wrapped(request: Request) -> Response:
            request.state.form_data = await request.form() if request.method == "POST" else None
            resp = await run_in_threadpool(endpoint, request)
            return _no_store(resp)
        return wrapped

    routes = [
        Route("/", sync_with_form(page(home))),
        Route("/login", sync_with_form(login), methods=["GET", "POST"]),
        Route("/logout", sync_with_form(logout), methods=["POST"]),
        Route("/search", sync_with_form(page(search))),
        Route("/concept/{concept_id}", sync_with_form(page(concept))),
        Route("/jobs", sync_with_form(page(jobs))),
        Route("/jobs/{job_id}", sync_with_form(page(job))),
        Route("/jobs/{job_id}/decide", sync_with_form(page(decide)), methods=["POST"]),
        Route("/jobs/{job_id}/export/usagi.csv", sync_with_form(page(export_usagi))),
        Route("/jobs/{job_id}/export/stcm", sync_with_form(page(export_stcm)), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        store.close_all()  # every session's connection closes with the page

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.store = store
    app.state.settings = settings
    return app


# ---------------------------------------------------------------- helpers
def _form(request: Request):
    return request.state.form_data or {}


def _no_store(resp: Response) -> Response:
    # Pages show what one role may see: no browser or proxy keeps them.
    resp.headers.setdefault("Cache-Control", "no-store")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    return resp


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _safe_next(nxt: str) -> str:
    """Only a path on this site (no //host, no scheme): no open redirect after login."""
    if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
        return "/"
    return nxt


def _with_term(back: str, term_id: int | None) -> str:
    back = _safe_next(back)
    path, _, query = back.partition("?")
    parts = [p for p in query.split("&") if p and not p.startswith("term=") and not p.startswith("q=")]
    if term_id is not None:
        parts.append(f"term={term_id}")
    return path + ("?" + "&".join(parts) if parts else "") + (f"#term-{term_id}" if term_id else "")


def _is_auth_failure(e: psycopg.OperationalError) -> bool:
    """A refused password or user (what guessing produces), as libpq reports it."""
    text = str(e)
    return any(m in text for m in ("password authentication failed", "authentication failed for user",
                                   "no pg_hba.conf entry", "password is required"))


def _connect_message(e: psycopg.OperationalError) -> str:
    """libpq's reason for refusing a login, without the 'connection to server at ...' preamble."""
    text = str(e).strip()
    m = re.search(r"FATAL:\s*(.*)", text)
    return m.group(1).strip() if m else text.splitlines()[-1] if text else "cannot connect"


def _job_name(conn: psycopg.Connection, job_id: int) -> str:
    row = q_one(conn, "SELECT name FROM omop_emb.mapping_job WHERE job_id = %s", (job_id,))
    if row is None:
        raise PageError(f"no mapping job {job_id} (or you may not see it)")
    return row["name"]


def _default_stcm_target(spec: dict) -> str:
    schema = spec.get("cdm_schema") or spec.get("vocabulary_schema")
    return f"{schema}.source_to_concept_map" if schema else "source_to_concept_map"


def _fmt_num(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)

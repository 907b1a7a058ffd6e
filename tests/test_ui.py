"""The review page (omop-emb-pg ui), end to end in a real browser.

Debian's chromium, driven by Playwright's Python API (no browser download), against
``omop-emb-pg ui`` started as a subprocess on a copy of the e5 sample database. Roles log
in with their password (the test cluster asks members of ``password_login`` for it):
a reviewer (omop_emb_mapper) searches, opens a job, approves with the keyboard and
exports; a reader sees the job but the database refuses its decision; a wrong password
is refused. The run saves screenshots of the search and review pages into docs/img/.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from conftest import E5_MODEL, ROOT, free_port, serve_command, stop_process, wait_http_ok

CHROMIUM = os.environ.get("OMOP_EMB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMG = ROOT / "docs" / "img"
JOB = "ui-clinic-terms"
# Source terms of a clinic's local list (code, text, how often it occurs).
TERMS = [
    ("HTN", "high blood pressure", 950),
    ("MI", "heart attack", 410),
    ("ASTH", "asthma attack", 380),
    ("SINUS", "sinus infection", 260),
    ("OTIT", "ear infection", 120),
    ("FX-ARM", "broken arm", 75),
    ("DIAB2", "type 2 diabetes", 40),
    ("ZZZ", "patient requested a copy of the leaflet", 3),
]


def _copy_database(pg_server, template: str, name: str) -> str:
    """CREATE DATABASE name TEMPLATE template (retried: the template must have no session)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                             sql.Identifier(template)))
            return pg_server.dsn(name)
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def ui_env(pg_server, e5_sample_db):
    """A copy of the e5 sample database, a reviewer (omop_emb_mapper) and a reader
    (omop_emb_reader), both with passwords, and ``omop-emb-pg ui`` serving it."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from omop_emb_pg.cluster import PASSWORD_LOGIN_ROLE

    tag = uuid.uuid4().hex[:8]
    dbname = f"ui_{tag}"
    dsn = _copy_database(pg_server, conninfo_to_dict(e5_sample_db)["dbname"], dbname)
    reviewer, reader = f"ui_reviewer_{tag}", f"ui_reader_{tag}"
    pw = {reviewer: f"rev-{tag}", reader: f"read-{tag}"}
    with psycopg.connect(dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_LOGIN_ROLE,)).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(PASSWORD_LOGIN_ROLE)))
        for role, group in ((reviewer, "omop_emb_mapper"), (reader, "omop_emb_reader")):
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}, {}").format(
                sql.Identifier(role), sql.Literal(pw[role]), sql.Identifier(group),
                sql.Identifier(PASSWORD_LOGIN_ROLE)))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA cdm TO {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA cdm TO {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT INSERT, UPDATE ON cdm.source_to_concept_map TO {}").format(
            sql.Identifier(reviewer)))
        # The sample has no hierarchy or 'Maps to' for its conditions: give Hypertensive disorder a
        # parent and a source code mapped to it, in this copy only, so the page has them to show.
        conn.execute("""
            INSERT INTO cdm.concept (concept_id, concept_name, domain_id, vocabulary_id, concept_class_id,
                                     standard_concept, concept_code, valid_start_date, valid_end_date)
            VALUES (134057, 'Disorder of cardiovascular system', 'Condition', 'SNOMED', 'Disorder', 'S',
                    '49601007', '1970-01-01', '2099-12-31'),
                   (45591453, 'Essential (primary) hypertension', 'Condition', 'ICD10CM', '3-char billing code',
                    NULL, 'I10', '1970-01-01', '2099-12-31')
            ON CONFLICT DO NOTHING""")
        conn.execute("""
            INSERT INTO cdm.concept_ancestor (ancestor_concept_id, descendant_concept_id,
                                              min_levels_of_separation, max_levels_of_separation)
            VALUES (134057, 316866, 1, 1)""")
        conn.execute("""
            INSERT INTO cdm.concept_relationship (concept_id_1, concept_id_2, relationship_id,
                                                  valid_start_date, valid_end_date)
            VALUES (45591453, 316866, 'Maps to', '1970-01-01', '2099-12-31')""")

    port = free_port()
    proc = subprocess.Popen(serve_command("ui", "--dsn", dsn, "--port", str(port), "--cdm-schema", "cdm"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/login", 60, proc)
        yield {"url": f"http://127.0.0.1:{port}", "dsn": dsn, "reviewer": reviewer, "reader": reader, "pw": pw,
               "reviewer_dsn": make_conninfo(dsn, user=reviewer, password=pw[reviewer])}
    finally:
        stop_process(proc)
        pg_server.drop_database(dbname)
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as conn:
            for role in (reviewer, reader):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture(scope="module")
def mapping_job(ui_env) -> str:
    """The reviewer's job over TERMS, its candidates suggested by the e5 model."""
    values = ", ".join(f"('{c}', '{n}', {f})" for c, n, f in TERMS)
    with psycopg.connect(ui_env["reviewer_dsn"], autocommit=True) as conn:
        conn.execute("SELECT omop_emb.create_mapping_job(%s, %s, model => %s, domain_ids => ARRAY['Condition'], "
                     "vocabulary_schema => 'cdm', cdm_schema => 'cdm', candidates_per_term => 5, "
                     "source_vocabulary_id => 'CLINIC_LOCAL')",
                     (JOB, f"SELECT * FROM (VALUES {values}) v(source_code, source_name, source_frequency)",
                      E5_MODEL))
        conn.execute("CALL omop_emb.suggest_mappings(%s)", (JOB,))
    return JOB


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: sudo bash scripts/install-server-deps.sh installs chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)  # the first search embeds through the real model, on a loaded machine
    try:
        yield pg
    finally:
        ctx.close()


def login(page, env, role: str, password: str | None = None, then: str = "/jobs") -> None:
    page.goto(env["url"] + then)
    assert "/login" in page.url  # not logged in yet: the page asks who you are
    page.fill("input[name=user]", role)
    page.fill("input[name=password]", env["pw"][role] if password is None else password)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def current_decision(dsn: str, source_code: str) -> dict:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT status, concept_ids, decided_by FROM omop_emb.mapping_queue q "
                           "JOIN omop_emb.mapping_job j USING (job_id) WHERE j.name = %s AND q.source_code = %s",
                           (JOB, source_code)).fetchone()
    return {"status": row[0], "concept_ids": row[1], "decided_by": row[2]}


def rank1(dsn: str, source_code: str) -> tuple[int, str]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT c.concept_id, c.concept_name FROM omop_emb.mapping_candidate c "
                            "JOIN omop_emb.mapping_term t USING (term_id) JOIN omop_emb.mapping_job j USING (job_id) "
                            "WHERE j.name = %s AND t.source_code = %s AND c.rank = 1", (JOB, source_code)).fetchone()


def test_search_filters_errors_and_concept_detail(ui_env, page):
    env = ui_env
    login(page, env, env["reader"], then="/search")
    assert page.url.endswith("/search")
    assert page.text_content("#current-role") == env["reader"]

    # Search: rank, concept, domain, similarity, matched text, match kind.
    page.fill("#q", "high blood pressure")
    page.press("#q", "Enter")
    page.wait_for_selector("#results")
    first = page.locator("#results tbody tr").first
    cells = first.locator("td").all_text_contents()
    assert cells[0] == "1" and "hypertens" in cells[1].lower(), cells
    assert cells[2] == "Condition"
    assert 0.5 < float(cells[6]) <= 1.0
    # Parents from the vocabulary, record counts from the CDM (--cdm-schema cdm), as the database has them.
    top_id = int(first.locator("td .id").text_content())
    with psycopg.connect(env["dsn"]) as conn:
        parents = [r[0] for r in conn.execute(
            "SELECT c.concept_name FROM cdm.concept_ancestor a JOIN cdm.concept c ON c.concept_id = a.ancestor_concept_id "
            "WHERE a.descendant_concept_id = %s AND a.min_levels_of_separation = 1 ORDER BY 1", (top_id,))]
        records = conn.execute("SELECT count(*) FROM cdm.condition_occurrence WHERE condition_concept_id = %s",
                               (top_id,)).fetchone()[0]
    assert parents == ["Disorder of cardiovascular system"]
    assert first.locator("td.parents").text_content() == "; ".join(parents)
    assert records > 0 and first.locator("td.records").text_content() == str(records)
    IMG.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMG / "ui-search.png"), full_page=True)

    # A bad value: the extension's message and hint, no stack trace; the form keeps what was typed.
    page.fill("input[name=k]", "5000")
    page.press("#q", "Enter")
    err = page.locator(".error").first
    err.wait_for()
    assert "k = 5000 is outside 1..1000" in err.text_content()
    assert "1 to 1000" in page.text_content(".error .hint")
    assert "Traceback" not in page.content()
    assert page.input_value("#q") == "high blood pressure"

    # The embedding server is down (this copy's model points at a closed port): its message.
    with psycopg.connect(env["dsn"], autocommit=True) as conn:
        endpoint, retries = conn.execute("SELECT endpoint, max_retries FROM omop_emb.models WHERE name = %s",
                                         (E5_MODEL,)).fetchone()
        conn.execute("SELECT omop_emb.alter_model(%s, endpoint => %s, max_retries => 0)",
                     (E5_MODEL, f"http://127.0.0.1:{free_port()}"))
    try:
        page.fill("input[name=k]", "")
        page.fill("#q", f"a query never embedded before {uuid.uuid4().hex[:6]}")
        page.press("#q", "Enter")
        page.locator(".error").first.wait_for()
        assert "embedding" in page.text_content(".error .message").lower()
        assert "Traceback" not in page.content()
    finally:
        with psycopg.connect(env["dsn"], autocommit=True) as conn:
            conn.execute("SELECT omop_emb.alter_model(%s, endpoint => %s, max_retries => %s)",
                         (E5_MODEL, endpoint, retries))

    # The concept's detail: its ancestors come from the vocabulary schema.
    page.fill("#q", "high blood pressure")
    page.fill("input[name=k]", "")
    page.press("#q", "Enter")
    page.locator("#results tbody tr").first.locator("td a").click()
    page.wait_for_selector("h1")
    assert "hypertens" in page.text_content("h1").lower()
    ancestors = page.locator("h2:has-text('Ancestors') + table").text_content()
    assert "Disorder of cardiovascular system" in ancestors
    mapped = page.locator("h2:has-text('Maps to it') + table").text_content()
    assert "Essential (primary) hypertension" in mapped and "I10" in mapped



def test_reviewer_approves_with_the_keyboard_and_exports(ui_env, mapping_job, page):
    env = ui_env
    login(page, env, env["reviewer"])

    # The job list shows the job and its progress; open it.
    row = page.locator("#jobs tr", has_text=JOB)
    assert row.locator("td").nth(3).text_content() == str(len(TERMS))  # terms
    row.locator("a").click()
    page.wait_for_selector("#queue")
    codes = page.locator("#queue tr.term td:first-child").all_text_contents()
    assert codes == [c for c, _, _ in sorted(TERMS, key=lambda t: -t[2])]  # by frequency
    assert "current" in page.get_attribute("#queue tr.term >> nth=0", "class")

    # Approve the most frequent term's top candidate with the keyboard: 'a'.
    concept_id, concept_name = rank1(env["dsn"], "HTN")
    page.keyboard.press("a")
    page.wait_for_selector(".flash.ok")
    assert f"approved → {concept_id}" in page.text_content(".flash.ok")
    assert page.text_content("#queue tr.term >> nth=0 >> .status") == "approved"
    assert "current" in page.get_attribute("#queue tr.term >> nth=1", "class")  # moved on to the next term
    d = current_decision(env["dsn"], "HTN")
    assert d == {"status": "approved", "concept_ids": [concept_id], "decided_by": env["reviewer"]}

    # Another term: 'j' moves down, '2' picks the second candidate, 'f' flags it with that concept.
    page.keyboard.press("j")  # ASTH (MI is current after the approval)
    assert "current" in page.get_attribute("#queue tr.term >> nth=2", "class")
    page.keyboard.press("2")
    page.keyboard.press("f")
    page.wait_for_selector(".flash.ok")
    d = current_decision(env["dsn"], "ASTH")
    with psycopg.connect(env["dsn"]) as conn:
        second = conn.execute("SELECT c.concept_id FROM omop_emb.mapping_candidate c JOIN omop_emb.mapping_term t "
                              "USING (term_id) WHERE t.source_code = 'ASTH' AND c.rank = 2").fetchone()[0]
    assert d["status"] == "flagged" and d["concept_ids"] == [second]

    # Choose another concept: 'j' to OTIT, 's' to its search box, Enter searches with the job's filters;
    # the results join the candidates, the first selected; 'a' approves it.
    page.keyboard.press("j")
    assert page.text_content("#queue tr.current td:first-child") == "OTIT"
    page.keyboard.press("s")
    page.keyboard.type("acute otitis media")
    page.keyboard.press("Enter")
    page.wait_for_selector("#panel-%s tr.searched" % page.get_attribute("#queue tr.current", "data-term"))
    picked = page.locator(".panel:not([hidden]) tr.searched input[type=radio]").first
    assert picked.is_checked()
    searched_id = int(picked.get_attribute("value"))
    assert "otitis" in page.locator(".panel:not([hidden]) tr.searched td a").first.text_content().lower()
    page.screenshot(path=str(IMG / "ui-review.png"), full_page=True)
    page.keyboard.press("a")
    page.wait_for_selector(".flash.ok")
    assert current_decision(env["dsn"], "OTIT") == {"status": "approved", "concept_ids": [searched_id],
                                                    "decided_by": env["reviewer"]}

    # Comment ('c', Enter saves it, the status stays) and unmapped ('u') on FX-ARM.
    assert page.text_content("#queue tr.current td:first-child") == "FX-ARM"
    page.keyboard.press("c")
    page.keyboard.type("no fracture concept in this vocabulary")
    page.keyboard.press("Enter")
    page.wait_for_selector(".flash.ok")
    with psycopg.connect(env["dsn"]) as conn:
        status, comment = conn.execute("SELECT status, comment FROM omop_emb.mapping_queue "
                                       "WHERE source_code = 'FX-ARM'").fetchone()
    assert (status, comment) == ("unreviewed", "no fracture concept in this vocabulary")
    assert page.text_content("#queue tr.current td:first-child") == "FX-ARM"
    page.keyboard.press("u")
    page.wait_for_selector(".flash.ok")
    assert current_decision(env["dsn"], "FX-ARM")["status"] == "unmapped"

    # Usagi CSV download: the approved row with its concept.
    with page.expect_download() as dl:
        page.click("#export-usagi")
    text = Path(dl.value.path()).read_text(encoding="utf-8")
    rows = {r["sourceCode"]: r for r in csv.DictReader(io.StringIO(text))}
    assert rows["HTN"]["conceptId"] == str(concept_id) and rows["HTN"]["mappingStatus"] == "APPROVED"

    # SOURCE_TO_CONCEPT_MAP export: the decision lands in the CDM table.
    page.goto(env["url"] + "/jobs")
    page.locator("#jobs a", has_text=JOB).click()
    page.fill("#export-stcm input[name=target_table]", "cdm.source_to_concept_map")
    page.click("#export-stcm button")
    flash = page.locator(".flash").first
    flash.wait_for()
    assert "2 inserted" in flash.text_content() and "error" not in flash.get_attribute("class"), flash.text_content()
    with psycopg.connect(env["dsn"]) as conn:
        stcm = conn.execute("SELECT source_code, source_vocabulary_id, target_concept_id "
                            "FROM cdm.source_to_concept_map "
                            "WHERE source_code IN ('HTN', 'ASTH', 'OTIT', 'FX-ARM') AND invalid_reason IS NULL "
                            "ORDER BY source_code").fetchall()
    # The approved terms, not the flagged or unmapped ones.
    assert stcm == [("HTN", "CLINIC_LOCAL", concept_id), ("OTIT", "CLINIC_LOCAL", searched_id)]


def test_reader_sees_the_job_but_the_database_refuses_its_decision(ui_env, mapping_job, page):
    env = ui_env
    login(page, env, env["reader"])
    page.locator("#jobs a", has_text=JOB).click()
    page.wait_for_selector("#queue")
    before = current_decision(env["dsn"], "DIAB2")
    page.select_option("#status-filter", "unreviewed")
    page.click("#filters button")
    page.wait_for_selector("#queue")
    page.locator("#queue tr.term", has_text="DIAB2").click()
    page.keyboard.press("a")
    alert = page.locator(".flash.error")
    alert.wait_for()
    text = alert.text_content()
    assert "may not decide" in text or "permission denied" in text, text
    assert current_decision(env["dsn"], "DIAB2") == before


def test_wrong_password_is_refused(ui_env, page):
    env = ui_env
    login(page, env, env["reviewer"], password="not-the-password")
    assert "/login" in page.url
    assert "password authentication failed" in page.text_content(".error")
    page.goto(env["url"] + "/jobs")
    assert "/login" in page.url  # still nobody


def test_logout_ends_the_session(ui_env, page):
    env = ui_env
    login(page, env, env["reader"])
    assert page.url.endswith("/jobs")
    page.click("text=log out")
    page.wait_for_url("**/login")
    page.goto(env["url"] + "/search?q=asthma")
    assert "/login" in page.url


# ---------------------------------------------------------------- without a browser
def test_non_loopback_bind_needs_tls_or_an_explicit_flag():
    from omop_emb_pg.web.server import UiStartError, check_bind

    assert check_bind("127.0.0.1", tls=False, insecure_bind=False, single_user=False) == []
    with pytest.raises(UiStartError, match="--tls-cert and --tls-key, or --insecure-bind"):
        check_bind("0.0.0.0", tls=False, insecure_bind=False, single_user=False)
    (warning,) = check_bind("0.0.0.0", tls=False, insecure_bind=True, single_user=False)
    assert "WITHOUT TLS" in warning
    assert "with TLS" in check_bind("192.0.2.7", tls=True, insecure_bind=False, single_user=False)[0]
    with pytest.raises(UiStartError, match="loopback only"):
        check_bind("0.0.0.0", tls=True, insecure_bind=True, single_user=True)
    r = subprocess.run(serve_command("ui", "--host", "0.0.0.0", "--dsn", "host=127.0.0.1 dbname=x"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "clear text" in r.stderr and "Traceback" not in r.stderr


def test_sessions_expire_and_cookies_cannot_be_forged():
    from omop_emb_pg.web.sessions import SessionStore

    store = SessionStore(idle_timeout=0.2, max_age=60)
    s, cookie = store.create("alice", "host=127.0.0.1 user=alice password=secret")
    assert store.get(cookie) is s and "secret" not in repr(s)
    assert store.get(s.sid) is None  # the bare id, unsigned
    assert store.get(cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")) is None
    time.sleep(0.3)
    assert store.get(cookie) is None and len(store) == 0 and s.conninfo == ""  # idle: ended, password dropped


def test_single_user_mode_and_forms_without_the_session_token(ui_env, mapping_job):
    """--single-user: no login form, the DSN's own role; a POST without the form's token changes nothing."""
    from psycopg.conninfo import make_conninfo
    from starlette.testclient import TestClient

    from omop_emb_pg.web.app import UiSettings, create_app

    env = ui_env
    app = create_app(UiSettings(dsn=env["reviewer_dsn"], single_user=True))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.get("/jobs")
        assert r.status_code == 200 and JOB in r.text and env["reviewer"] in r.text
        job_id = int(r.text.split('href="/jobs/')[1].split('"')[0])
        with psycopg.connect(env["dsn"]) as conn:
            term_id = conn.execute("SELECT term_id FROM omop_emb.mapping_term WHERE source_code = 'ZZZ'").fetchone()[0]
        before = current_decision(env["dsn"], "ZZZ")
        r = client.post(f"/jobs/{job_id}/decide", data={"term_id": term_id, "status": "ignored"},
                        follow_redirects=False)
        assert r.status_code == 403 and "out of date" in r.text
        assert current_decision(env["dsn"], "ZZZ") == before
    # A login page started for many users never uses the DSN's own credentials.
    app = create_app(UiSettings(dsn=make_conninfo(env["reviewer_dsn"])))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.get("/jobs", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        r = client.post("/login", data={"user": env["reviewer"], "password": ""})
        assert r.status_code == 401 and "enter a PostgreSQL user name and its password" in r.text


def test_failed_logins_are_limited_per_user_and_per_address(ui_env):
    """After too many wrong passwords the page refuses further tries without asking the database,
    the right password too, until the window has passed; another user is not held back."""
    from starlette.testclient import TestClient

    from omop_emb_pg.web.app import UiSettings, create_app
    from omop_emb_pg.web.throttle import LoginThrottle

    env = ui_env
    now = [1000.0]
    throttle = LoginThrottle(per_user=3, per_address=5, window_s=60, clock=lambda: now[0])
    app = create_app(UiSettings(dsn=env["dsn"]), throttle=throttle)
    reviewer, reader = env["reviewer"], env["reader"]
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for _ in range(3):
            r = client.post("/login", data={"user": reviewer, "password": "guess"}, follow_redirects=False)
            assert r.status_code == 401 and "password authentication failed" in r.text
        r = client.post("/login", data={"user": reviewer, "password": env["pw"][reviewer]}, follow_redirects=False)
        assert r.status_code == 429 and r.headers["Retry-After"] == "60", r.text
        assert f"too many failed logins for user &#39;{reviewer}&#39;" in r.text and "try again in 60 s" in r.text
        # another user from the same address: 3 of its 5 failures are used, it may still log in
        r = client.post("/login", data={"user": reader, "password": env["pw"][reader]}, follow_redirects=False)
        assert r.status_code == 303
        # two more failures (another user) fill the address's 5: everyone from it waits
        for _ in range(2):
            assert client.post("/login", data={"user": reader, "password": "guess"}).status_code == 401
        r = client.post("/login", data={"user": reader, "password": env["pw"][reader]}, follow_redirects=False)
        assert r.status_code == 429 and "from this address" in r.text
        now[0] += 61  # the window has passed: the right password is asked again and accepted
        r = client.post("/login", data={"user": reviewer, "password": env["pw"][reviewer]}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"

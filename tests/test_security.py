"""Security (issue 7), tested as a non-superuser LOGIN role granted omop_emb_reader.

The analyst can search and embed; cannot register, alter or drop models, set secrets or index;
cannot make the server call any host but the registered endpoints, whatever omop_emb.* setting
it SETs; cannot read an API key through settings, tables, views, error messages or the server
log; cannot hijack a SECURITY DEFINER function through search_path. Installing without the
needed privileges fails with a clear message.
"""

from __future__ import annotations

import http.server
import threading
import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from conftest import install_extension, register_fake_model
from test_faults import connect, full_text, sql_error, unique

SECRET = "sk-TOPSECRET-" + uuid.uuid4().hex
MODEL = "fake"
KEYED = "keyed"
SECURITY_RESULTS: dict[str, str] = {}


class EchoAuthServer:
    """Answers every POST with 401 and a body that echoes the Authorization header it got
    (a hostile or careless server): the key must still not reach the analyst."""

    def __init__(self, status: int = 401):
        self.seen: list[str] = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization") or ""
                outer.seen.append(auth)
                body = ('{"error": {"message": "bad key: %s"}}' % auth).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.status = status
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.httpd.server_address[1]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def echo_server():
    srv = EchoAuthServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sec_db(module_db, fake_embedder_session, echo_server):
    """A tiny vocabulary, the fake model indexed, a keyed model whose server echoes the key."""
    dsn = install_extension(module_db())
    with connect(dsn) as c:
        c.execute("CREATE SCHEMA voc; CREATE TABLE voc.concept (concept_id int PRIMARY KEY, "
                  "concept_name text, domain_id text, vocabulary_id text, concept_class_id text, "
                  "standard_concept text, concept_code text, invalid_reason text)")
        c.execute("INSERT INTO voc.concept SELECT i, 'concept ' || i, 'Condition', 'SNOMED', "
                  "'Clinical Finding', 'S', 'C' || i, NULL FROM generate_series(1, 60) i")
    register_fake_model(dsn, fake_embedder_session, name=MODEL)
    with connect(dsn) as c:
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'voc')", (MODEL,))
        c.execute("SELECT omop_emb.set_secret('k', %s)", (SECRET,))
        c.execute("SELECT omop_emb.bind_secret('k', %s)", (echo_server.url,))
        c.execute("SELECT omop_emb.register_model(%s, 'openai', %s, dimensions => 384, "
                  "document_prefix => '', query_prefix => '', api_key_ref => 'secret:k')",
                  (KEYED, echo_server.url))
        c.execute("SELECT omop_emb.alter_model(%s, max_retries => 0)", (KEYED,))
    return dsn


@pytest.fixture(scope="module")
def analyst(sec_db, pg):
    """(role name, DSN) of a password-less LOGIN role granted omop_emb_reader only."""
    role = "analyst_" + uuid.uuid4().hex[:8]
    with connect(pg) as c:
        c.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        c.execute(f"GRANT omop_emb_reader TO {role}")
    with connect(sec_db) as c:  # a schema of its own, for the search_path attack
        dbname = c.info.dbname
        c.execute(f"GRANT CREATE ON DATABASE {dbname} TO {role}")
        c.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    yield role, make_conninfo(sec_db, user=role)
    for d in (sec_db,):
        try:
            with connect(d) as c:
                c.execute(f"DROP OWNED BY {role} CASCADE")
        except psycopg.Error:
            pass
    with connect(pg) as c:
        c.execute(f"REVOKE omop_emb_reader FROM {role}")
        try:
            c.execute(f"DROP ROLE {role}")
        except psycopg.Error:
            pass  # still owns objects in a dropped database: harmless


@pytest.fixture
def aconn(analyst):
    with connect(analyst[1]) as c:
        assert not c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
        yield c


def test_analyst_can_search_and_embed(aconn, fake_embedder):
    assert aconn.execute("SELECT vector_dims(omop_emb.embed(%s, 'query', %s))", (unique(), MODEL)).fetchone()[0] == 384
    rows = aconn.execute("SELECT rank FROM omop_emb.nearest(%s, 5, model => %s)", (unique(), MODEL)).fetchall()
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    assert aconn.execute("SELECT count(*) FROM omop_emb.nearest_batch(ARRAY['a', 'b'], 2, model => %s)",
                         (MODEL,)).fetchone()[0] == 4
    assert aconn.execute("SELECT omop_emb.similarity('a', 'b', model => %s) IS NOT NULL", (MODEL,)).fetchone()[0]
    assert aconn.execute("SELECT count(*) FROM omop_emb.status()").fetchone()[0] == 2
    assert aconn.execute("SELECT count(*) FROM omop_emb.models").fetchone()[0] == 2
    SECURITY_RESULTS["reader can"] = "embed, embed_batch, similarity, nearest, nearest_batch, status(), models, index_status"


ADMIN_ONLY = [
    ("register_model", "SELECT omop_emb.register_model('evil', 'openai', 'http://10.0.0.1:1', 384)"),
    ("alter_model endpoint", f"SELECT omop_emb.alter_model('{MODEL}', endpoint => 'http://10.0.0.1:1')"),
    ("alter_model key ref", f"SELECT omop_emb.alter_model('{KEYED}', api_key_ref => 'env:HOME')"),
    ("drop_model", f"SELECT omop_emb.drop_model('{MODEL}')"),
    ("set_secret", "SELECT omop_emb.set_secret('k', 'mine')"),
    ("delete_secret", "SELECT omop_emb.delete_secret('k')"),
    ("index_concepts", f"CALL omop_emb.index_concepts(model => '{MODEL}', vocabulary_schema => 'voc')"),
    ("index_stage", f"SELECT * FROM omop_emb_internal.index_stage('{MODEL}', 'voc', NULL, NULL, NULL, "
                    "false, false, false, false, false)"),
    ("index_prepare", f"SELECT * FROM omop_emb_internal.index_prepare('{MODEL}')"),
    ("index_batch", f"SELECT omop_emb_internal.index_batch('{MODEL}', 10)"),
    ("index_build_next", f"SELECT omop_emb_internal.index_build_next('{MODEL}')"),
    ("stage rows", "INSERT INTO omop_emb_internal.index_stage_run (model_id, vocabulary_schema, "
                   "include_synonyms, include_mapped) VALUES (1, 'voc', false, false)"),
    ("create_index", f"SELECT omop_emb.create_index('{MODEL}')"),
    ("clear_cache", "SELECT omop_emb.clear_cache()"),
    ("_bootstrap", "SELECT omop_emb_internal._bootstrap()"),
    ("UPDATE model", "UPDATE omop_emb.model SET endpoint = 'http://10.0.0.1:1'"),
    ("INSERT model", "INSERT INTO omop_emb.model (name) VALUES ('x')"),
    ("SELECT secret", "SELECT * FROM omop_emb.secret"),
    ("SELECT model table", "SELECT api_key_ref FROM omop_emb.model"),
    ("SELECT query_cache", "SELECT * FROM omop_emb.query_cache"),
    ("DELETE embeddings", "DELETE FROM omop_emb.embedding_1"),
    ("CREATE in omop_emb", "CREATE FUNCTION omop_emb.lower(text) RETURNS text LANGUAGE sql AS 'SELECT 1::text'"),
    ("plpython3u", "DO $$ import os $$ LANGUAGE plpython3u"),
]


@pytest.mark.parametrize("what,sql", ADMIN_ONLY, ids=[a[0] for a in ADMIN_ONLY])
def test_analyst_cannot_administer(sec_db, aconn, fake_embedder, what, sql):
    before = _model_rows(sec_db)
    e, _ = sql_error(aconn, sql)
    assert e.diag.sqlstate == "42501", f"{what}: {full_text(e)}"
    assert "permission denied" in e.diag.message_primary
    assert _model_rows(sec_db) == before
    SECURITY_RESULTS.setdefault("reader cannot (42501)", "")
    SECURITY_RESULTS["reader cannot (42501)"] += what + "; "


def _model_rows(dsn):
    with connect(dsn) as c:
        return c.execute("SELECT name, endpoint, api_key_ref, (SELECT count(*) FROM omop_emb.secret), "
                         "(SELECT value FROM omop_emb.secret WHERE name = 'k') FROM omop_emb.model "
                         "ORDER BY name").fetchall()


def test_analyst_cannot_redirect_the_server(sec_db, aconn, fake_embedder):
    from omop_emb_pg.testing import DeterministicEmbeddingServer

    with DeterministicEmbeddingServer(dim=384) as evil:
        attempts = [
            ("omop_emb.model", evil.url), ("omop_emb.model", "nope"),
            ("omop_emb.endpoint", evil.url), ("omop_emb.base_url", evil.url),
            ("omop_emb.url", evil.url), ("omop_emb.provider", "ollama"),
            ("omop_emb.api_key_ref", "env:HOME"), ("omop_emb.document_embedding_prefix", evil.url),
            ("omop_emb.query_embedding_prefix", evil.url + " "),
        ]
        for name, value in attempts:
            aconn.execute("SELECT set_config(%s, %s, false)", (name, value))
        # omop_emb.model set to an unknown name (even a URL): an error, no call anywhere
        e, _ = sql_error(aconn, "SELECT omop_emb.embed('x', 'query')")
        assert e.diag.sqlstate == "OE004", full_text(e)
        e, _ = sql_error(aconn, "SELECT * FROM omop_emb.nearest('x', model => %s)", (evil.url,))
        assert e.diag.sqlstate == "OE004"
        aconn.execute("SELECT set_config('omop_emb.model', %s, false)", (MODEL,))
        aconn.execute("SELECT omop_emb.embed(%s, 'query')", (unique(),))
        aconn.execute("SELECT * FROM omop_emb.nearest(%s)", (unique(),))
        assert evil.stats()["requests"] == 0
        assert fake_embedder.stats()["requests"] == 2  # only the registered endpoint was called
        # the prefix settings only change the text sent, to the registered endpoint
        assert all(t.startswith(evil.url) for t in fake_embedder.received_texts)
    SECURITY_RESULTS["redirect"] = (f"{len(attempts)} omop_emb.* settings SET (model, endpoint, base_url, url, "
                                    "provider, api_key_ref, prefixes): unknown model -> OE004; other host got 0 requests")


def test_analyst_cannot_read_the_key(sec_db, pg_server, aconn, echo_server):
    texts = []
    # error messages: the server got the key and echoed it back in a 401 body
    e, _ = sql_error(aconn, "SELECT omop_emb.embed(%s, 'query', %s)", (unique(), KEYED))
    assert e.diag.sqlstate == "OE001" and "HTTP 401" in e.diag.message_primary
    assert echo_server.seen and echo_server.seen[-1] == "Bearer " + SECRET  # the key was sent...
    texts.append(full_text(e) + (e.diag.context or ""))
    echo_server.status = 500
    e, _ = sql_error(aconn, "SELECT * FROM omop_emb.nearest(%s, model => %s)", (unique(), KEYED))
    echo_server.status = 401
    texts.append(full_text(e) + (e.diag.context or ""))
    # settings, views, functions the reader may call
    texts.append(str(aconn.execute("SELECT array_agg(name || '=' || setting) FROM pg_settings").fetchone()))
    texts.append(str(aconn.execute("SELECT * FROM omop_emb.models").fetchall()))
    texts.append(str(aconn.execute("SELECT * FROM omop_emb.status()").fetchall()))
    texts.append(str(aconn.execute("SELECT * FROM omop_emb.index_status").fetchall()))
    texts.append(str(aconn.execute("SELECT * FROM omop_emb.embedding_role_prefixes(%s)", (KEYED,)).fetchall()))
    texts.append(str(aconn.execute("SELECT prosrc FROM pg_proc WHERE pronamespace = 'omop_emb'::regnamespace"
                                   ).fetchall()))
    for sql in ("SELECT value FROM omop_emb.secret", "SELECT * FROM omop_emb.model",
                "SELECT pg_read_file('postgresql.conf')", "SELECT current_setting('omop_emb.secret.k')"):
        try:
            texts.append(str(aconn.execute(sql).fetchall()))
        except psycopg.Error as err:
            assert err.diag.sqlstate in ("42501", "42704"), full_text(err)
            texts.append(full_text(err))
    leaked = [t[:200] for t in texts if SECRET in t or SECRET[3:] in t]
    assert not leaked, leaked
    # the server log
    cluster = pg_server.cluster
    if cluster is not None and cluster.log_file.exists():
        log = cluster.log_file.read_text(errors="replace")
        assert "HTTP 401" in log  # the errors above were logged ...
        assert SECRET not in log and SECRET[3:] not in log  # ... without the key
        where = "server log checked"
    else:
        where = "server log not reachable (pg_server.kind=%s)" % pg_server.kind
    SECURITY_RESULTS["key"] = ("not in 401/500 error messages (server echoed it), pg_settings, models view, "
                               "status(), function sources; omop_emb.secret/model tables 42501; " + where)


def test_search_path_hijack(sec_db, analyst, aconn, fake_embedder):
    role = analyst[0]
    aconn.execute("CREATE SCHEMA evil")
    aconn.execute("CREATE TABLE evil.pwned (who text, fn text)")
    aconn.execute("GRANT INSERT ON evil.pwned TO PUBLIC")
    aconn.execute("GRANT USAGE ON SCHEMA evil TO PUBLIC")
    trap = ("INSERT INTO evil.pwned VALUES (current_user, '{fn}')")
    for fn, sig, ret, body in [
        ("lower", "(text)", "text", "SELECT $1"),
        ("btrim", "(text)", "text", "SELECT $1"),
        ("regexp_replace", "(text, text, text, text)", "text", "SELECT $1"),
        ("set_config", "(text, text, boolean)", "text", "SELECT $2"),
        ("current_setting", "(text, boolean)", "text", "SELECT NULL::text"),
        ("sha256", "(bytea)", "bytea", "SELECT $1"),
        ("convert_to", "(text, name)", "bytea", "SELECT $1::bytea"),
        ("unnest", "(anyarray)", "SETOF anyelement", "SELECT NULL"),
        ("array_remove", "(anyarray, anyelement)", "anyarray", "SELECT $1"),
        ("pg_backend_pid", "()", "integer", "SELECT 0"),
        ("fold_text", "(text)", "text", "SELECT $1"),
    ]:
        aconn.execute(f"CREATE FUNCTION evil.{fn}{sig} RETURNS {ret} LANGUAGE sql AS "
                      f"$f$ {trap.format(fn=fn)}; {body} $f$")
    # an operator on vector (the distance operators) and on text equality
    aconn.execute("CREATE FUNCTION evil.dist(public.vector, public.vector) RETURNS float8 LANGUAGE sql AS "
                  f"$f$ {trap.format(fn='<=>')}; SELECT 0::float8 $f$")
    for op in ("<=>", "<->", "<#>"):
        aconn.execute(f"CREATE OPERATOR evil.{op} (LEFTARG = public.vector, RIGHTARG = public.vector, "
                      "FUNCTION = evil.dist)")
    aconn.execute("CREATE FUNCTION evil.teq(text, text) RETURNS boolean LANGUAGE sql AS "
                  f"$f$ {trap.format(fn='=')}; SELECT true $f$")
    aconn.execute("CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.teq)")
    aconn.execute("SET search_path = evil, pg_catalog, public")
    # control: the traps do fire for unqualified calls made in this search_path
    aconn.execute("SELECT lower('X')")
    assert aconn.execute("SELECT count(*) FROM evil.pwned").fetchone()[0] == 1
    aconn.execute("DELETE FROM evil.pwned")
    # the SECURITY DEFINER functions do not run them
    aconn.execute("SELECT count(*) FROM omop_emb.nearest(%s, 5, domain_ids => ARRAY['Condition'], "
                  "model => %s)", (unique(), MODEL))
    aconn.execute("SELECT count(*) FROM omop_emb.nearest('concept 7', 5, model => %s)", (MODEL,))
    aconn.execute("SELECT count(*) FROM omop_emb.nearest_batch(ARRAY[%s, 'concept 3'], 3, model => %s)",
                  (unique(), MODEL))
    aconn.execute("SELECT omop_emb.embed(%s, 'query', %s)", (unique(), MODEL))
    aconn.execute("SELECT * FROM omop_emb.status()")
    aconn.execute("SELECT * FROM omop_emb.models")
    aconn.execute("SET search_path = evil, pg_catalog, public")  # undisturbed for the check
    fired = aconn.execute("SELECT * FROM evil.pwned").fetchall()
    assert fired == [], fired
    # definers pin their search_path
    aconn.execute("RESET search_path")
    unpinned = aconn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'omop_emb'::regnamespace "
        "AND p.prosecdef AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%%')"
    ).fetchall()
    assert unpinned == []
    SECURITY_RESULTS["search_path"] = ("14 trap functions/operators in a schema first on search_path "
                                       "(lower, btrim, set_config, sha256, unnest, =, <=>, ...): none ran")


def test_install_without_privileges(fresh_db, analyst):
    from omop_emb_pg.errors import InstallError
    from omop_emb_pg.install import install

    dsn = fresh_db()
    with pytest.raises(InstallError) as ei:
        install(make_conninfo(dsn, user=analyst[0]))
    assert "superuser" in ei.value.message
    assert ei.value.hint
    SECURITY_RESULTS["install as non-superuser"] = "InstallError: " + ei.value.message


def test_zz_report_security():
    for k, v in SECURITY_RESULTS.items():
        print(f"SECURITY {k}: {v}")

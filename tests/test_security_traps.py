"""Security (issue 12): traps that an administrator or an analyst sets for the extension.

Run as non-superuser LOGIN roles: an administrator granted omop_emb_admin only, an analyst
granted omop_emb_reader only (with CREATE on schema public, as in databases upgraded from
PostgreSQL 14 and many OMOP installations).

* index_concepts / upsert_concept_texts given a view, a temporary relation or a relation of the
  admin's own whose column calls the admin's function: never run as the extension owner;
  refused unless the admin explicitly allows them (allow_any_relation => true), then read with
  the admin's rights.
* traps in public (functions, aggregates, operators, casts) and in a schema named like the
  caller ("$user"): no function of the extension runs them.
* env: and secret: key references: an admin cannot send the server's environment or a secret
  a superuser did not bind to the model to an endpoint of its choosing.
* register_model never drops a table of embeddings left behind; exact match folds text once.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from conftest import install_extension, register_fake_model
from test_faults import connect, full_text, sql_error, unique

MODEL = "fake"
RESULTS: dict[str, str] = {}

VOCAB_COLUMNS = ("concept_id int PRIMARY KEY, concept_name text, domain_id text, vocabulary_id text, "
                 "concept_class_id text, standard_concept text, concept_code text, invalid_reason text")


def _login_role(pg, dsn, prefix, grant):
    role = prefix + "_" + uuid.uuid4().hex[:8]
    with connect(pg) as c:
        c.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE")
        c.execute(f"GRANT {grant} TO {role}")
    with connect(dsn) as c:
        c.execute(f"GRANT CREATE ON DATABASE {c.info.dbname} TO {role}")
        c.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {role}")
        c.execute(f"GRANT USAGE ON SCHEMA voc TO {role}")
        c.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA voc TO {role}")
    return role


def _drop_role(pg, dsn, role):
    with connect(pg) as c:
        c.execute(f"ALTER ROLE {role} NOSUPERUSER")
    try:
        with connect(dsn) as c:
            c.execute(f"DROP OWNED BY {role} CASCADE")
    except psycopg.Error:
        pass
    with connect(pg) as c:
        try:
            c.execute(f"DROP ROLE {role}")
        except psycopg.Error:
            pass


@pytest.fixture(scope="module")
def trap_db(module_db, fake_embedder_session):
    dsn = install_extension(module_db())
    with connect(dsn) as c:
        c.execute(f"CREATE SCHEMA voc; CREATE TABLE voc.concept ({VOCAB_COLUMNS})")
        c.execute("INSERT INTO voc.concept SELECT i, 'concept ' || i, 'Condition', 'SNOMED', "
                  "'Clinical Finding', 'S', 'C' || i, NULL FROM generate_series(1, 40) i")
    register_fake_model(dsn, fake_embedder_session, name=MODEL)
    with connect(dsn) as c:
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'voc')", (MODEL,))
    return dsn


@pytest.fixture(scope="module")
def admin(trap_db, pg):
    """(role, DSN) of a LOGIN role granted omop_emb_admin only (and TEMP, CREATE on the database)."""
    role = _login_role(pg, trap_db, "adm", "omop_emb_admin")
    yield role, make_conninfo(trap_db, user=role)
    _drop_role(pg, trap_db, role)


def _is_superuser(dsn, role):
    with connect(dsn) as c:
        return c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


# ------------------------------------------------------------------ item 1: relations named by the caller
ESCALATE = """CREATE FUNCTION {schema}.escalate() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN
    INSERT INTO {schema}.ran_as VALUES (current_user);
    BEGIN
        EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', '{role}');
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
    RETURN '';
END $f$"""


def _plant_escalation(c, role, schema):
    c.execute(f"CREATE SCHEMA {schema}")
    c.execute(f"CREATE TABLE {schema}.ran_as (who text)")
    c.execute(f"GRANT USAGE ON SCHEMA {schema} TO PUBLIC")
    c.execute(f"GRANT INSERT ON {schema}.ran_as TO PUBLIC")
    c.execute(ESCALATE.format(schema=schema, role=role))
    c.execute(f"GRANT EXECUTE ON FUNCTION {schema}.escalate() TO PUBLIC")


def _concept_view(c, name, schema):
    c.execute(f"CREATE VIEW {name} AS SELECT concept_id, concept_name || {schema}.escalate() AS concept_name, "
              "domain_id, vocabulary_id, concept_class_id, standard_concept, concept_code, invalid_reason "
              "FROM voc.concept")


def test_index_concepts_never_reads_a_callers_view_as_the_owner(trap_db, admin, fake_embedder):
    role, dsn = admin
    schema = "adm_" + uuid.uuid4().hex[:6]
    with connect(dsn) as c:
        _plant_escalation(c, role, schema)
        _concept_view(c, f"{schema}.concept", schema)
        refused = []
        # the admin's own schema; its temporary schema; no schema (found through search_path:
        # pg_temp comes first for relations)
        for target in (schema, "pg_temp", None):
            if target == "pg_temp":
                _concept_view(c, "pg_temp.concept", schema)
            try:
                if target is None:
                    c.execute("CALL omop_emb.index_concepts(model => %s)", (MODEL,))
                else:
                    c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => %s)",
                              (MODEL, target))
                refused.append((target, None))
            except psycopg.Error as e:
                refused.append((target, e))
        ran_as = c.execute(f"SELECT who FROM {schema}.ran_as").fetchall()
    assert not _is_superuser(trap_db, role), f"{role} became superuser through index_concepts ({len(ran_as)} calls as {set(ran_as)})"
    assert ran_as == [], ran_as
    for target, e in refused:
        assert e is not None, f"vocabulary_schema {target}: a view was accepted"
        assert e.diag.sqlstate == "42809", full_text(e)
        assert "view" in e.diag.message_primary and "concept" in e.diag.message_primary, full_text(e)
        assert "allow_any_relation" in (e.diag.message_hint or ""), full_text(e)
    RESULTS["index_concepts views"] = ("a view in the admin's schema, a pg_temp view and one found "
                                       "through search_path: refused (42809), no function ran")


def test_index_concepts_reads_an_allowed_view_with_the_callers_rights(trap_db, admin, fake_embedder):
    role, dsn = admin
    schema = "adm_" + uuid.uuid4().hex[:6]
    with connect(dsn) as c:
        _plant_escalation(c, role, schema)
        _concept_view(c, f"{schema}.concept", schema)
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => %s, allow_any_relation => true)",
                  (MODEL, schema))
        ran_as = {r[0] for r in c.execute(f"SELECT who FROM {schema}.ran_as").fetchall()}
    assert not _is_superuser(trap_db, role)
    assert ran_as == {role}, ran_as  # the view's function ran, as the admin only
    with connect(trap_db) as c:  # the vocabulary was still indexed from the view
        assert c.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 40
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'voc')", (MODEL,))
    RESULTS["index_concepts allowed view"] = "allow_any_relation => true: read as the admin (function ran as it)"


def test_upsert_concept_texts_reads_the_vocabulary_as_the_caller(trap_db, admin, fake_embedder):
    """The model's recorded vocabulary schema is read for attributes: a table there replaced by a
    view afterwards must not run the admin's function as the owner."""
    role, dsn = admin
    schema = "adm_" + uuid.uuid4().hex[:6]
    with connect(dsn) as c:
        _plant_escalation(c, role, schema)
        c.execute(f"CREATE TABLE {schema}.concept ({VOCAB_COLUMNS})")
        c.execute(f"INSERT INTO {schema}.concept SELECT * FROM voc.concept")
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => %s)", (MODEL, schema))
        c.execute(f"DROP TABLE {schema}.concept")
        _concept_view(c, f"{schema}.concept", schema)
        try:
            c.execute("SELECT omop_emb.upsert_concept_texts(ARRAY[3], ARRAY['renamed three'], %s)", (MODEL,))
            err = None
        except psycopg.Error as e:
            err = e
        ran_as = c.execute(f"SELECT who FROM {schema}.ran_as").fetchall()
        c.execute(f"DROP VIEW {schema}.concept")
    with connect(trap_db) as c:
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'voc')", (MODEL,))
    assert not _is_superuser(trap_db, role), f"{role} became superuser through upsert_concept_texts"
    assert ran_as == [], ran_as
    assert err is not None and err.diag.sqlstate == "42809", full_text(err) if err else "accepted"
    RESULTS["upsert_concept_texts view"] = "refused (42809), no function ran"


# ------------------------------------------------------------------ item 8: tables left behind
def _orphan_embeddings(dsn, fake_embedder, name="old"):
    """A model with 30 embedded concepts whose registry row is gone and whose id will be
    handed out again (what DROP EXTENSION ... CASCADE and CREATE EXTENSION leave)."""
    with connect(dsn) as c:
        c.execute(f"CREATE SCHEMA voc; CREATE TABLE voc.concept ({VOCAB_COLUMNS})")
        c.execute("INSERT INTO voc.concept SELECT i, 'concept ' || i, 'Condition', 'SNOMED', "
                  "'Clinical Finding', 'S', 'C' || i, NULL FROM generate_series(1, 30) i")
    register_fake_model(dsn, fake_embedder, name=name)
    with connect(dsn) as c:
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'voc')", (name,))
        mid = c.execute("SELECT model_id FROM omop_emb.model WHERE name = %s", (name,)).fetchone()[0]
        c.execute("DELETE FROM omop_emb.model WHERE model_id = %s", (mid,))
        c.execute("SELECT setval('omop_emb.model_model_id_seq', %s, false)", (mid,))
        assert c.execute(f"SELECT count(*) FROM omop_emb.embedding_{mid}").fetchone()[0] == 30
    return mid


def test_register_model_never_drops_a_table_of_embeddings(fresh_db, fake_embedder):
    dsn = install_extension(fresh_db())
    mid = _orphan_embeddings(dsn, fake_embedder)
    table = f"omop_emb.embedding_{mid}"
    with connect(dsn) as c:
        e, _ = sql_error(c, "SELECT omop_emb.register_model('new', 'openai', %s, dimensions => 384, "
                            "document_prefix => '', query_prefix => '')", (fake_embedder.url,))
        assert c.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 30, "embeddings were dropped"
        assert c.execute("SELECT count(*) FROM omop_emb.model").fetchone()[0] == 0
        text = full_text(e)
        assert e.diag.sqlstate == "42P07", text
        assert table in e.diag.message_primary and "30 rows" in e.diag.message_primary, text
        assert "adopt_table => true" in e.diag.message_hint and f"DROP TABLE {table}" in e.diag.message_hint, text
        # the same call again still names the same table (the id was not used up)
        e2, _ = sql_error(c, "SELECT omop_emb.register_model('new', 'openai', %s, dimensions => 384, "
                             "document_prefix => '', query_prefix => '')", (fake_embedder.url,))
        assert table in e2.diag.message_primary
        # a shape that does not match is not adopted
        e3, _ = sql_error(c, "SELECT omop_emb.register_model('new', 'openai', %s, dimensions => 8, "
                             "document_prefix => '', query_prefix => '', adopt_table => true)",
                          (fake_embedder.url,))
        assert "384" in full_text(e3) and c.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 30
        # adopted: the embeddings serve searches and need no re-embedding
        assert c.execute("SELECT omop_emb.register_model('new', 'openai', %s, dimensions => 384, "
                         "document_prefix => '', query_prefix => '', adopt_table => true)",
                         (fake_embedder.url,)).fetchone()[0] == mid
        fake_embedder.reset()
        c.execute("CALL omop_emb.index_concepts(model => 'new', vocabulary_schema => 'voc')")
        assert fake_embedder.stats()["texts"] == 0
        assert c.execute("SELECT count(*) FROM omop_emb.nearest('concept 7', 5, model => 'new')").fetchone()[0] == 5
        # adopt_table => false leaves such a table alone and takes the next free id
        c.execute("DELETE FROM omop_emb.model WHERE model_id = %s", (mid,))
        c.execute("SELECT setval('omop_emb.model_model_id_seq', %s, false)", (mid,))
        other = c.execute("SELECT omop_emb.register_model('other', 'openai', %s, dimensions => 384, "
                          "document_prefix => '', query_prefix => '', adopt_table => false)",
                          (fake_embedder.url,)).fetchone()[0]
        assert other != mid and c.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 30
    RESULTS["register_model orphan table"] = (f"{table} with 30 rows: 42P07 naming it (kept); "
                                              "adopt_table => true adopts it (0 texts re-embedded)")


# ------------------------------------------------------------------ item 3: env: and secret: exfiltration
SU_SECRET = "sk-SUPERUSER-" + uuid.uuid4().hex


@pytest.fixture
def echo():
    from test_security import EchoAuthServer

    srv = EchoAuthServer(status=200)
    yield srv
    srv.stop()


def test_admin_cannot_send_the_servers_environment_or_a_secret_elsewhere(trap_db, admin, echo, fake_embedder):
    role, dsn = admin
    name = "exfil_" + uuid.uuid4().hex[:6]
    with connect(trap_db) as c:  # a superuser's key, bound to the endpoint it is for
        c.execute("SELECT omop_emb.set_secret('su_key', %s)", (SU_SECRET,))
        c.execute("SELECT omop_emb.bind_secret('su_key', %s)", (fake_embedder.url,))
        c.execute("SELECT omop_emb.register_model('su_model', 'openai', %s, dimensions => 384, "
                  "document_prefix => '', query_prefix => '', api_key_ref => 'secret:su_key')",
                  (fake_embedder.url,))
    attempts = [
        ("env:PATH at the admin's endpoint",
         f"SELECT omop_emb.register_model('{name}1', 'openai', '{echo.url}', dimensions => 384, "
         "document_prefix => '', query_prefix => '', api_key_ref => 'env:PATH')", f"{name}1"),
        ("env:PATH, probe call",
         f"SELECT omop_emb.register_model('{name}2', 'openai', '{echo.url}', "
         "document_prefix => '', query_prefix => '', api_key_ref => 'env:PATH')", f"{name}2"),
        ("a superuser's secret at the admin's endpoint",
         f"SELECT omop_emb.register_model('{name}3', 'openai', '{echo.url}', dimensions => 384, "
         "document_prefix => '', query_prefix => '', api_key_ref => 'secret:su_key')", f"{name}3"),
        ("the endpoint of the superuser's model moved",
         f"SELECT omop_emb.alter_model('su_model', endpoint => '{echo.url}')", "su_model"),
        ("another model pointed at the secret",
         f"SELECT omop_emb.alter_model('{name}0', api_key_ref => 'secret:su_key')", f"{name}0"),
    ]
    errors = []
    with connect(dsn) as c:
        c.execute(f"SELECT omop_emb.register_model('{name}0', 'openai', '{echo.url}', dimensions => 384, "
                  "document_prefix => '', query_prefix => '')")
        for what, sql, model in attempts:
            try:
                c.execute(sql)
                c.execute("SELECT omop_emb.embed('x', 'query', %s)", (model,))
                errors.append((what, None))
            except psycopg.Error as e:
                errors.append((what, e))
        c.execute("SELECT omop_emb.alter_model('su_model', endpoint => %s)", (fake_embedder.url,)) \
            if _model_endpoint(trap_db, "su_model") != fake_embedder.url else None
    sent = [a for a in echo.seen if a]
    assert sent == [], f"keys sent to the admin's endpoint: {[a[:24] + '...' for a in sent]}"
    for what, e in errors:
        assert e is not None, f"{what}: accepted"
        text = full_text(e) + (e.diag.context or "")
        assert e.diag.sqlstate == "42501", (what, text)
        assert SU_SECRET not in text and "/usr" not in text, (what, text)
        assert "superuser" in (e.diag.message_hint or ""), (what, text)
    # the superuser's own model still gets its key, at its endpoint
    with connect(trap_db) as c:
        assert c.execute("SELECT omop_emb.embed(%s, 'query', 'su_model') IS NOT NULL", (unique(),)).fetchone()[0]
        c.execute("SELECT omop_emb.drop_model('su_model')")
        for i in range(4):
            c.execute("SELECT omop_emb.drop_model(%s, if_exists => true)", (f"{name}{i}",))
    RESULTS["env:/secret: exfiltration"] = (f"{len(attempts)} attempts by an admin (env:PATH, a superuser's "
                                            "secret, a moved endpoint): 42501, no key sent")


def _model_endpoint(dsn, name):
    with connect(dsn) as c:
        row = c.execute("SELECT endpoint FROM omop_emb.models WHERE name = %s", (name,)).fetchone()
        return row[0] if row else None


# ------------------------------------------------------------------ item 9: one fold for exact match
# (name stored in the vocabulary, query typed by someone): the same words, written with other
# white space, control characters or case forms. Exact match must not depend on which side folds.
FOLD_CASES = [
    ("Acute\u00a0bronchitis", "acute bronchitis"),          # no-break space in the name
    ("  Leg\tcramp\n", "LEG CRAMP"),                         # tab, newline, padding
    ("Back\x1fpain", "back pain"),                            # a control character
    ("Influenza", "\u0130NFLUENZA"),                          # dotted capital I (Turkish)
    ("\u03a0\u03a5\u03a1\u0395\u03a4\u039f\u03a3", "\u03c0\u03c5\u03c1\u03b5\u03c4\u03bf\u03c2"),  # final sigma
    ("\u03a0\u03a5\u03a1\u0395\u03a4\u039f\u03a3", "\u03a0\u03a5\u03a1\u0395\u03a4\u039f\u03a3"),  # the same text
    ("Night\u2003sweats", "night\u3000sweats"),              # em space, ideographic space
]


def test_exact_match_folds_text_once(fresh_db, fake_embedder):
    dsn = install_extension(fresh_db())
    with connect(dsn) as c:
        c.execute(f"CREATE SCHEMA voc; CREATE TABLE voc.concept ({VOCAB_COLUMNS})")
        for i, (name, _) in enumerate(dict(FOLD_CASES).items(), 1):
            c.execute("INSERT INTO voc.concept VALUES (%s, %s, 'Condition', 'SNOMED', 'Clinical Finding', "
                      "'S', %s, NULL)", (i, name, "X%d" % i))
        c.execute("INSERT INTO voc.concept SELECT i, 'filler ' || i, 'Condition', 'SNOMED', "
                  "'Clinical Finding', 'S', 'F' || i, NULL FROM generate_series(100, 140) i")
    register_fake_model(dsn, fake_embedder, name=MODEL)
    missed = []
    with connect(dsn) as c:
        c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'voc')", (MODEL,))
        ids = dict(c.execute("SELECT concept_name, concept_id FROM voc.concept").fetchall())
        for name, query in FOLD_CASES:
            sql_equal = c.execute("SELECT omop_emb.fold_text(%s) = omop_emb.fold_text(%s)", (name, query)).fetchone()[0]
            row = c.execute("SELECT concept_id, exact_match FROM omop_emb.nearest(%s, 3) WHERE rank = 1",
                            (query,)).fetchone()
            if not sql_equal or row != (ids[name], True):
                missed.append((name, query, sql_equal, row))
        folded = c.execute("SELECT omop_emb.fold_text(%s)", ("  A\u00a0\tB\x01C  ",)).fetchone()[0]
    assert missed == [], missed
    assert folded == "a b c"
    RESULTS["fold"] = f"{len(FOLD_CASES)} name/query pairs (tab, newline, NBSP, control, \u0130, final sigma): all exact"


# ------------------------------------------------------------------ item 2: traps in public
# Look-alikes with argument types that match a call exactly where pg_catalog's own needs a
# coercion (so that they win when public is on the search_path), and same-signature ones
# (which win when public comes before pg_catalog). Each logs who ran it.
TRAP_FUNCTIONS = [
    # name, argument types, return type, what it returns
    ("lower", "text", "text", "$1"), ("btrim", "text", "text", "$1"), ("btrim", "text, text", "text", "$1"),
    ("translate", "text, text, text", "text", "$1"), ("length", "text", "integer", "1"),
    ("regexp_replace", "text, text, text, text", "text", "$1"),
    ("set_config", "text, text, boolean", "text", "$2"), ("current_setting", "text, boolean", "text", "NULL"),
    ("current_setting", "text", "text", "NULL"),
    ("sha256", "bytea", "bytea", "$1"), ("convert_to", "text, text", "bytea", "NULL"),
    ("unnest", "text[]", "SETOF text", "NULL"), ("unnest", "bytea[]", "SETOF bytea", "NULL"),
    ("unnest", "integer[]", "SETOF integer", "NULL"), ("cardinality", "text[]", "integer", "0"),
    ("to_regclass", "text", "regclass", "NULL"), ("quote_ident", "text", "text", "$1"),
    ("format", "text, text", "text", "$1"), ("pg_backend_pid", "", "integer", "0"),
    ("now", "", "timestamptz", "NULL"), ("clock_timestamp", "", "timestamptz", "NULL"),
    ("pg_sleep", "numeric", "void", "NULL"), ("round", "numeric, integer", "numeric", "0"),
    ("round", "double precision", "double precision", "0"), ("date_part", "text, interval", "double precision", "0"),
    ("to_tsvector", "regconfig, text", "tsvector", "NULL"), ("to_tsvector", "text, text", "tsvector", "NULL"),
    ("tsvector_to_array", "tsvector", "text[]", "NULL"), ("quote_literal", "text", "text", "$1"),
    ("array_remove", "text[], text", "text[]", "$1"), ("coalesce_", "text", "text", "$1"),
    ("pg_advisory_xact_lock", "integer, integer", "void", "NULL"),
    ("pg_size_pretty", "bigint", "text", "NULL"), ("pg_relation_size", "regclass", "bigint", "0"),
    ("has_table_privilege", "oid, text", "boolean", "true"),
    ("jsonb_build_object", "text, text", "jsonb", "NULL"), ("vector_dims", "vector", "integer", "0"),
    ("l2_distance", "vector, vector", "double precision", "0"), ("cosine_distance", "vector, vector", "double precision", "0"),
]
TRAP_AGGREGATES = [
    # name, argument types (empty: *), state type
    ("count", "", "bigint"), ("count", "integer", "bigint"), ("count", "bigint", "bigint"),
    ("count", "text", "bigint"),
    ("sum", "bigint", "bigint"), ("sum", "integer", "bigint"), ("max", "double precision", "double precision"),
    ("max", "timestamptz", "timestamptz"), ("min", "timestamptz", "timestamptz"),
    ("string_agg", "text, text", "text"), ("array_agg", "text", "text"),
]
TRAP_OPERATORS = [
    # operator, left, right, return type
    ("*", "numeric", "bigint", "numeric"), ("*", "numeric", "integer", "numeric"),
    ("*", "numeric", "numeric", "numeric"), ("/", "numeric", "integer", "numeric"),
    ("/", "bigint", "double precision", "double precision"), ("/", "numeric", "bigint", "numeric"),
    ("/", "double precision", "double precision", "double precision"),
    ("/", "double precision", "bigint", "double precision"), (">=", "timestamptz", "timestamptz", "boolean"),
    ("=", "text", "text", "boolean"), ("=", "integer", "integer", "boolean"), ("=", "oid", "regclass", "boolean"),
    ("=", "bytea", "bytea", "boolean"), ("=", "name", "text", "boolean"), ("<>", "text", "text", "boolean"),
    ("+", "integer", "integer", "integer"), ("+", "bigint", "integer", "bigint"), ("-", "timestamptz", "timestamptz", "interval"),
    (">", "interval", "interval", "boolean"), (">", "integer", "integer", "boolean"), ("<", "integer", "integer", "boolean"),
    (">=", "bigint", "bigint", "boolean"), ("||", "text", "text", "text"), ("~", "text", "text", "boolean"),
    ("@@", "tsvector", "tsquery", "boolean"), ("&&", "text[]", "text[]", "boolean"),
    ("<=>", "vector", "vector", "double precision"), ("<->", "vector", "vector", "double precision"),
    ("<#>", "vector", "vector", "double precision"), ("<=>", "vector", "text", "double precision"),
]
TRAP_CASTS = [("text", "regclass"), ("integer", "text"), ("text", "vector"), ("text[]", "vector[]")]


def _plant_traps(c, schema, log):
    """Create every trap in ``schema`` (as the connected role); returns (planted, refused)."""
    planted, refused = [], []

    def attempt(what, sql):
        try:
            c.execute(sql)
            planted.append(what)
        except psycopg.Error as e:
            refused.append((what, e.diag.message_primary))

    def body(what, ret_expr, ret):
        value = "NULL" if ret.startswith("SETOF") or ret == "void" else ret_expr
        return (f"$t$ INSERT INTO {log} VALUES (current_user, {what!r}); "
                f"SELECT {value}::{ret.replace('SETOF ', '')} $t$")

    for name, args, ret, expr in TRAP_FUNCTIONS:
        what = f"{name}({args})"
        attempt(what, f"CREATE FUNCTION {schema}.{name}({args}) RETURNS {ret} LANGUAGE sql "
                      f"AS {body(what, expr, ret)}")
    for i, (name, args, stype) in enumerate(TRAP_AGGREGATES):
        what = f"aggregate {name}({args or '*'})"
        sfunc = f"{schema}.trap_sfunc_{i}"
        attempt(what + " sfunc", f"CREATE FUNCTION {sfunc}({stype}{', ' + args if args else ''}) RETURNS {stype} "
                                 f"LANGUAGE sql AS {body(what, '$1', stype)}")
        attempt(what, f"CREATE AGGREGATE {schema}.{name}({args or '*'}) (SFUNC = {sfunc}, STYPE = {stype})")
    for i, (op, left, right, ret) in enumerate(TRAP_OPERATORS):
        what = f"operator {op}({left}, {right})"
        fn = f"{schema}.trap_op_{i}"
        attempt(what + " function", f"CREATE FUNCTION {fn}({left}, {right}) RETURNS {ret} LANGUAGE sql "
                                    f"AS {body(what, 'NULL', ret)}")
        attempt(what, f"CREATE OPERATOR {schema}.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {fn})")
    for i, (src, dst) in enumerate(TRAP_CASTS):
        what = f"cast ({src} AS {dst})"
        fn = f"{schema}.trap_cast_{i}"
        attempt(what + " function", f"CREATE FUNCTION {fn}({src}) RETURNS {dst} LANGUAGE sql "
                                    f"AS {body(what, 'NULL', dst)}")
        attempt(what, f"CREATE CAST ({src} AS {dst}) WITH FUNCTION {fn}({src}) AS IMPLICIT")
    # A domain named like a built-in type: wins over pg_catalog's only when the schema comes first.
    attempt("domain text", f"CREATE DOMAIN {schema}.text AS pg_catalog.varchar")
    return planted, refused


def _import_sql(f, middle):
    """An import of 3 exported rows back into the model, as omop-emb-pg import runs it (one
    transaction: the multi-statement string), with INSERT ... SELECT in place of the COPY."""
    cols = ("x.concept_id, x.text_kind, x.text, x.text_hash, x.source_concept_id, x.source_code, x.concept_name, "
            "x.domain_id, x.vocabulary_id, x.concept_class_id, x.standard_concept, x.invalid_reason")
    rows = f"FROM omop_emb.export_embeddings('{f}', max_rows => 3) x"
    return (f"SELECT omop_emb.import_begin('{f}', (SELECT pg_catalog.to_jsonb(m) FROM omop_emb.models m "
            f"WHERE m.name OPERATOR(pg_catalog.=) '{f}')); "
            f"INSERT INTO pg_temp.omop_emb_import_row SELECT (pg_catalog.row_number() OVER ())::pg_catalog.int4, "
            f"{cols} {rows}; "
            f"INSERT INTO pg_temp.omop_emb_import_vector SELECT (pg_catalog.row_number() OVER ())::pg_catalog.int4, "
            f"x.embedding {rows}; "
            f"SELECT pg_catalog.count(*) FROM omop_emb.import_chunk('{f}'); {middle}"
            f"SELECT pg_catalog.count(*) FROM omop_emb.import_end('{f}')")


def _calls(url, vec_sql):
    """(signature, who may call it, SQL) for every routine of the extension.
    who: reader (analyst, admin, superuser), admin (admin, superuser), superuser."""
    f = MODEL
    return [
        ("omop_emb_internal._bootstrap()", "superuser", "SELECT omop_emb_internal._bootstrap()"),
        ("omop_emb.version()", "reader", "SELECT omop_emb.version()"),
        ("omop_emb.fold_text(text)", "reader", "SELECT omop_emb.fold_text(E' Acute\\tCOUGH ')"),
        ("omop_emb.lexemes(text)", "admin", "SELECT omop_emb.lexemes('acute coughs')"),
        ("omop_emb.lexical_query(text)", "admin", "SELECT omop_emb.lexical_query('acute coughs')"),
        ("omop_emb.lexical_score(text[],text[])", "admin",
         "SELECT omop_emb.lexical_score(ARRAY['acut','cough'], ARRAY['cough'])"),
        ("omop_emb.embed(text,text,text)", "reader", f"SELECT omop_emb.embed('trap embed', 'query', '{f}')"),
        ("omop_emb.embed_batch(text[],text,text)", "reader",
         f"SELECT omop_emb.embed_batch(ARRAY['trap a', 'trap b'], 'document', '{f}')"),
        ("omop_emb.similarity(text,text,text,text,text)", "reader",
         f"SELECT omop_emb.similarity('trap a', 'concept 3', model => '{f}')"),
        ("omop_emb.embedding_role_prefixes(text)", "reader", f"SELECT * FROM omop_emb.embedding_role_prefixes('{f}')"),
        ("omop_emb.nearest(text,integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest('concept 7', 5, model => '{f}')"),
        ("omop_emb.nearest(text,integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest('trap query', 5, domain_ids => ARRAY['Condition'], "
         f"vocabulary_ids => ARRAY['SNOMED'], concept_class_ids => ARRAY['Clinical Finding'], model => '{f}')"),
        ("omop_emb.nearest(text,integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest('concept 7', 5, model => '{f}', mode => 'lexical')"),
        ("omop_emb.nearest(text,integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest('concept 7', 5, domain_ids => ARRAY['Condition'], "
         f"model => '{f}', mode => 'hybrid')"),
        ("omop_emb.nearest(vector,integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest(({vec_sql}), 5, model => '{f}')"),
        ("omop_emb.nearest(vector,integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest(({vec_sql}), 5, domain_ids => ARRAY['Condition'], "
         f"model => '{f}', mode => 'hybrid')"),
        ("omop_emb.nearest_batch(text[],integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest_batch(ARRAY['concept 2', 'trap b'], 3, model => '{f}')"),
        ("omop_emb.nearest_batch(text[],integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest_batch(ARRAY['concept 2', 'trap b'], 3, model => '{f}', "
         "mode => 'hybrid')"),
        ("omop_emb.nearest_batch(text[],integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest_batch(ARRAY['concept 2'], 3, model => '{f}', mode => 'lexical')"),
        # the fused ranking (pg_trgm, initials) and the reranking stage
        ("omop_emb.nearest(text,integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest('CN7', 5, domain_ids => ARRAY['Condition'], "
         f"model => '{f}', mode => 'fused')"),
        ("omop_emb.nearest_batch(text[],integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest_batch(ARRAY['concpet 2', 'trap b'], 3, model => '{f}', "
         "mode => 'fused')"),
        ("omop_emb.initials(text)", "reader", "SELECT omop_emb.initials('Type 2 diabetes mellitus')"),
        ("omop_emb.ranking_candidates(text[],integer,text[],text[],text[],boolean,boolean,text)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.ranking_candidates(ARRAY['concept 4', 'CF'], 3, model => '{f}')"),
        ("omop_emb.ranking(text)", "reader", f"SELECT omop_emb.ranking('{f}') IS NOT NULL"),
        ("omop_emb.set_ranking(text,jsonb)", "admin", f"SELECT omop_emb.set_ranking('{f}', NULL)"),
        # (the reranker trap_rr, registered before the traps, is the only one here)
        ("omop_emb.nearest(text,integer,text[],text[],text[],boolean,boolean,text,text,boolean)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.nearest('concept 7', 5, model => '{f}', rerank => true)"),
        ("omop_emb.register_reranker(text,text,text,text,text,integer,double precision,integer)", "admin",
         f"SELECT omop_emb.register_reranker('@JOB@_rr', 'tei', '{url}')"),
        ("omop_emb.drop_reranker(text,boolean)", "admin", "SELECT omop_emb.drop_reranker('@JOB@_rr', if_exists => true)"),
        ("omop_emb.explain_nearest(text,integer,text[],text[],text[],boolean,boolean,text)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.explain_nearest('concept 7', 5, model => '{f}')"),
        ("omop_emb.status()", "reader", "SELECT pg_catalog.count(*) FROM omop_emb.status()"),
        ("omop_emb.search_request_results(text,integer,text[],text[],text)", "reader",
         f"SELECT pg_catalog.count(*) FROM omop_emb.search_request_results('concept 5', 3, model => '{f}')"),
        ("omop_emb.clear_cache(text)", "admin", f"SELECT omop_emb.clear_cache('{f}')"),
        ("omop_emb.register_model(text,text,text,integer,text,text,text,text,text,integer,double precision,text,boolean)",
         "admin", f"SELECT omop_emb.register_model('trap_model', 'openai', '{url}', dimensions => 384, "
                  "document_prefix => '', query_prefix => '')"),
        ("omop_emb.alter_model(text,text,text,text,text,integer,double precision,double precision,integer,integer,text,text,text,text)",
         "admin", f"SELECT omop_emb.alter_model('trap_model', endpoint => '{url}', batch_size => 16, "
                  "new_name => 'trap_model2')"),
        ("omop_emb.create_index(text,text,integer,integer,text)", "admin",
         "SELECT omop_emb.create_index('trap_model2', m => 4, ef_construction => 8)"),
        ("omop_emb.calibrate_index(text,integer)", "admin", "SELECT omop_emb.calibrate_index('trap_model2')"),
        ("omop_emb.drop_model(text,boolean)", "admin", "SELECT omop_emb.drop_model('trap_model2')"),
        ("omop_emb.set_secret(text,text)", "admin", "SELECT omop_emb.set_secret('trap_secret', 'v')"),
        ("omop_emb.bind_secret(text,text)", "superuser", f"SELECT omop_emb.bind_secret('trap_secret', '{url}')"),
        ("omop_emb.delete_secret(text)", "admin", "SELECT omop_emb.delete_secret('trap_secret')"),
        ("omop_emb.allow_env_key(text)", "superuser", "SELECT omop_emb.allow_env_key('TRAP_VARIABLE')"),
        ("omop_emb.index_concepts(text,text,text[],text[],text[],boolean,boolean,boolean,boolean,integer,bigint,boolean)",
         "admin", f"CALL omop_emb.index_concepts(model => '{f}', vocabulary_schema => 'voc', "
                  "include_synonyms => true, include_mapped => true, batch_size => 7)"),
        ("omop_emb.upsert_concept_texts(integer[],text[],text)", "admin",
         f"SELECT omop_emb.upsert_concept_texts(ARRAY[41], ARRAY['trap concept'], '{f}')"),
        ("omop_emb_internal.load_runtime()", "admin", "SELECT omop_emb_internal.load_runtime()"),
        ("omop_emb_internal.index_model(text)", "admin", f"SELECT * FROM omop_emb_internal.index_model('{f}')"),
        ("omop_emb_internal.embedded_concepts(integer)", "admin",
         "SELECT pg_catalog.count(*) FROM omop_emb_internal.embedded_concepts(1)"),
        ("omop_emb_internal.index_stage(text,text,text[],text[],text[],boolean,boolean,boolean,boolean,boolean)",
         "admin", f"SELECT * FROM omop_emb_internal.index_stage('{f}', 'voc', ARRAY['Condition'], NULL, NULL, "
                  "false, false, true, true, false)"),
        ("omop_emb_internal.index_prepare(text)", "none", f"SELECT * FROM omop_emb_internal.index_prepare('{f}')"),
        ("omop_emb_internal.index_batch(text,integer)", "admin", f"SELECT omop_emb_internal.index_batch('{f}', 5)"),
        ("omop_emb_internal.index_finish(text)", "admin", f"SELECT omop_emb_internal.index_finish('{f}')"),
        ("omop_emb_internal.index_build_next(text)", "admin", f"SELECT omop_emb_internal.index_build_next('{f}')"),
        ("omop_emb_internal.secondary_index_names(text)", "admin",
         f"SELECT omop_emb_internal.secondary_index_names('{f}')"),
        ("omop_emb_internal.upsert_concept_texts_store(integer[],text[],text,text)", "admin",
         f"SELECT omop_emb_internal.upsert_concept_texts_store(ARRAY[42], ARRAY['trap store'], '{f}', '{{}}')"),
        # embedding bundles (export, then the same rows imported back)
        ("omop_emb.export_embeddings(text,integer,text,text,integer)", "admin",
         f"SELECT pg_catalog.count(*) FROM omop_emb.export_embeddings('{f}', max_rows => 5)"),
        *[(sig, "admin", _import_sql(f, middle)) for sig, middle in (
            ("omop_emb.import_begin(text,jsonb)", ""),
            ("omop_emb.import_chunk(text)", ""),
            ("omop_emb_internal.import_state(text)",
             f"SELECT pg_catalog.count(*) FROM omop_emb_internal.import_state('{f}'); "),
            ("omop_emb.import_end(text,boolean)", ""))],
        # source-term mapping (SECURITY INVOKER, search_path pinned); @JOB@: a job per caller and round
        ("omop_emb.create_mapping_job(text,text,text,text[],text[],text[],text,text,text,integer)", "admin",
         "SELECT omop_emb.create_mapping_job('@JOB@', $q$SELECT 'X1'::text AS source_code, 'concept 3'::text "
         f"AS source_name, 5 AS source_frequency$q$, model => '{f}', source_vocabulary_id => 'TRAP', "
         "vocabulary_schema => 'voc', cdm_schema => 'voc')"),
        ("omop_emb.add_mapping_terms(text,text)", "admin",
         "SELECT omop_emb.add_mapping_terms('@JOB@', $q$SELECT 'X2'::text AS source_code, "
         "'forty-one'::text AS source_name$q$)"),
        ("omop_emb_internal.mapping_job(text,boolean)", "admin", "SELECT (omop_emb_internal.mapping_job('@JOB@', true)).job_id"),
        ("omop_emb_internal.mapping_guard(omop_emb.mapping_job)", "admin",
         "SELECT omop_emb_internal.mapping_guard(omop_emb_internal.mapping_job('@JOB@', false))"),
        ("omop_emb_internal.mapping_check_schema(text,text,text)", "admin",
         "SELECT omop_emb_internal.mapping_check_schema('voc', 'vocabulary_schema', 'concept')"),
        ("omop_emb_internal.mapping_add_terms(bigint,text)", "admin",
         "SELECT omop_emb_internal.mapping_add_terms((omop_emb_internal.mapping_job('@JOB@', true)).job_id, "
         "$q$SELECT 'X3'::text AS source_code, 'concept 9'::text AS source_name$q$)"),
        ("omop_emb.assign_mapping_terms(text,name,bigint[])", "admin",
         "SELECT omop_emb.assign_mapping_terms('@JOB@', current_user)"),
        ("omop_emb.suggest_mappings_start(text,boolean)", "admin", "SELECT omop_emb.suggest_mappings_start('@JOB@')"),
        ("omop_emb.suggest_mappings_batch(text,integer,boolean)", "admin",
         "SELECT omop_emb.suggest_mappings_batch('@JOB@', 2)"),
        ("omop_emb_internal.mapping_record_counts(bigint)", "admin",
         "SELECT omop_emb_internal.mapping_record_counts((omop_emb_internal.mapping_job('@JOB@', true)).job_id)"),
        ("omop_emb.suggest_mappings(text,integer,boolean,boolean)", "admin",
         "CALL omop_emb.suggest_mappings('@JOB@', 2)"),
        ("omop_emb.record_decision(bigint,text,integer[],text,text)", "admin",
         "SELECT omop_emb.record_decision((SELECT pg_catalog.min(t.term_id) FROM omop_emb.mapping_term t "
         "WHERE t.job_id OPERATOR(pg_catalog.=) (omop_emb_internal.mapping_job('@JOB@', true)).job_id), 'approved', "
         "ARRAY[3], 'EQUAL', 'trap')"),
        ("omop_emb.auto_approve(text,double precision)", "admin", "SELECT omop_emb.auto_approve('@JOB@', 0.0)"),
        ("omop_emb.check_mappings(text)", "admin", "SELECT pg_catalog.count(*) FROM omop_emb.check_mappings('@JOB@')"),
        ("omop_emb.export_source_to_concept_map(text,text)", "admin",
         "SELECT * FROM omop_emb.export_source_to_concept_map('@JOB@', 'voc.source_to_concept_map')"),
        ("view omop_emb.mapping_jobs", "reader", "SELECT pg_catalog.count(*) FROM omop_emb.mapping_jobs"),
        ("view omop_emb.mapping_queue", "reader", "SELECT pg_catalog.count(*) FROM omop_emb.mapping_queue"),
        ("view omop_emb.mapping_current_decision", "reader",
         "SELECT pg_catalog.count(*) FROM omop_emb.mapping_current_decision"),
        ("view omop_emb.models", "reader", "SELECT pg_catalog.count(*) FROM omop_emb.models"),
        ("view omop_emb.index_status", "reader", "SELECT pg_catalog.count(*) FROM omop_emb.index_status"),
        ("view omop_emb.search_result", "reader", "SELECT pg_catalog.count(*) FROM omop_emb.search_result"),
    ]


@pytest.fixture(scope="module")
def analyst(trap_db, pg):
    role = _login_role(pg, trap_db, "ana", "omop_emb_reader")
    yield role, make_conninfo(trap_db, user=role)
    _drop_role(pg, trap_db, role)


def test_traps_in_public_never_fire(trap_db, pg, admin, analyst, fake_embedder):
    admin_role, admin_dsn = admin
    analyst_role, analyst_dsn = analyst
    log = "public.trap_log"
    with connect(trap_db) as c:  # the vocabulary's other tables, for include_synonyms/include_mapped
        c.execute("CREATE TABLE IF NOT EXISTS voc.concept_synonym (concept_id int, concept_synonym_name text, "
                  "language_concept_id int)")
        c.execute("CREATE TABLE IF NOT EXISTS voc.concept_relationship (concept_id_1 int, concept_id_2 int, "
                  "relationship_id text, invalid_reason text)")
        c.execute("INSERT INTO voc.concept_synonym VALUES (5, 'fifth concept', 4180186)")
        c.execute("INSERT INTO voc.concept_relationship VALUES (5, 6, 'Maps to', NULL)")
        c.execute("GRANT SELECT ON ALL TABLES IN SCHEMA voc TO PUBLIC")
        c.execute("CREATE TABLE IF NOT EXISTS voc.source_to_concept_map (source_code varchar(50) NOT NULL, "
                  "source_concept_id integer NOT NULL, source_vocabulary_id varchar(20) NOT NULL, "
                  "source_code_description varchar(255), target_concept_id integer NOT NULL, "
                  "target_vocabulary_id varchar(20) NOT NULL, valid_start_date date NOT NULL, "
                  "valid_end_date date NOT NULL, invalid_reason varchar(1))")
        c.execute("GRANT SELECT, INSERT, UPDATE ON voc.source_to_concept_map TO PUBLIC")
        c.execute("INSERT INTO voc.concept VALUES (41, 'forty-one', 'Condition', 'SNOMED', 'Clinical Finding', "
                  "'S', 'C41', NULL), (42, 'forty-two', 'Condition', 'SNOMED', 'Clinical Finding', 'S', 'C42', NULL) "
                  "ON CONFLICT DO NOTHING")
        superuser = c.execute("SELECT current_user").fetchone()[0]
        c.execute("SELECT omop_emb.register_reranker('trap_rr', 'tei', %s)", (fake_embedder.url,))
    planted, refused = [], []
    with connect(analyst_dsn) as c:
        c.execute(f"CREATE TABLE {log} (who text, what text)")
        c.execute(f"GRANT INSERT, SELECT ON {log} TO PUBLIC")
        p, r = _plant_traps(c, "public", log)
        planted += ["public." + x for x in p]
        refused += r
        # "$user" comes first on the default search_path: schemas named like the admin and the
        # superuser, owned by the analyst, hold the same traps (and pgvector's operators)
        for target in (admin_role, superuser):
            c.execute(f'CREATE SCHEMA "{target}"')
            c.execute(f'GRANT USAGE ON SCHEMA "{target}" TO PUBLIC')
            p, r = _plant_traps(c, f'"{target}"', log)
            planted += [f"{target}." + x for x in p]
        # control: a trap does fire for an unqualified call that matches it
        c.execute("SELECT 2.0 * 3::bigint")  # exact match in public beats pg_catalog's coercion
        c.execute("SET search_path = public, pg_catalog")
        c.execute("SELECT lower('X'::text)")  # same signature: public first wins
        assert c.execute(f"SELECT pg_catalog.count(*) FROM {log}").fetchone()[0] == 2
        c.execute(f"DELETE FROM {log}")
    vec_sql = f"SELECT omop_emb.embed('trap vector', 'query', '{MODEL}')"
    calls = _calls(fake_embedder.url, vec_sql)
    with connect(trap_db) as c:
        routines = {r[0] for r in c.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace IN "
            "('omop_emb'::regnamespace, 'omop_emb_internal'::regnamespace)").fetchall()}
    covered = {sig.replace(" ", "").replace("doubleprecision", "double precision") for sig, _, _ in calls}
    normal = {r.replace(", ", ",") for r in routines}
    assert normal - covered == set(), f"routines the trap test does not call (add them to _calls): {normal - covered}"
    may = {"reader": {"analyst", "admin", "superuser"}, "admin": {"admin", "superuser"},
           "superuser": {"superuser"}, "none": set()}
    failures, ran = [], 0
    for path in (None, "public, pg_catalog"):
        for who, dsn in (("analyst", analyst_dsn), ("admin", admin_dsn), ("superuser", trap_db)):
            with connect(dsn) as c:
                c.execute("SET statement_timeout = '60s'")  # a trap that ends no loop fails, not hangs
                if path:
                    c.execute(f"SET search_path = {path}")
                for sig, group, sql in calls:
                    if who not in may[group]:
                        continue
                    try:
                        c.execute(sql.replace("@JOB@", f"trap_{who}_{1 if path else 0}"))
                        ran += 1
                    except psycopg.Error as e:
                        failures.append((sig, who, path, e.diag.message_primary))
    with connect(analyst_dsn) as c:
        fired = c.execute(f"SELECT who, what, pg_catalog.count(*) FROM {log} GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    assert fired == [], f"traps fired: {fired}"
    assert failures == [], failures
    RESULTS["traps"] = (f"{len(planted)} traps planted by an analyst in public and in \"$user\" schemas "
                        f"({len(refused)} refused by PostgreSQL: {sorted({w for w, _ in refused})}); "
                        f"{len(normal)} routines + {sum(sig.startswith('view') for sig, _, _ in calls)} views called {ran} times as analyst/admin/superuser "
                        "with the default search_path and with public first: none fired")


def test_traps_planted_before_install_never_fire(fresh_db, pg, fake_embedder):
    """Views, defaults and constraints are bound when they are created: traps planted in public
    before a superuser installs (or upgrades) the extension must not be bound into them."""
    dsn = fresh_db()
    with connect(dsn) as c:
        c.execute(f"CREATE SCHEMA voc; CREATE TABLE voc.concept ({VOCAB_COLUMNS})")
        c.execute("INSERT INTO voc.concept SELECT i, 'concept ' || i, 'Condition', 'SNOMED', "
                  "'Clinical Finding', 'S', 'C' || i, NULL FROM generate_series(1, 40) i")
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
    role = _login_role(pg, dsn, "ana", "pg_read_all_settings")
    log = "public.trap_log"
    try:
        with connect(make_conninfo(dsn, user=role)) as c:
            c.execute(f"CREATE TABLE {log} (who text, what text)")
            c.execute(f"GRANT INSERT, SELECT ON {log} TO PUBLIC")
            planted, _ = _plant_traps(c, "public", log)
        install_extension(dsn)
        register_fake_model(dsn, fake_embedder, name=MODEL)
        failures = []
        with connect(dsn) as c:
            c.execute("CREATE TABLE voc.concept_synonym (concept_id int, concept_synonym_name text, "
                      "language_concept_id int)")
            c.execute("CREATE TABLE voc.concept_relationship (concept_id_1 int, concept_id_2 int, "
                      "relationship_id text, invalid_reason text)")
            c.execute("CREATE TABLE IF NOT EXISTS voc.source_to_concept_map (source_code varchar(50) NOT NULL, "
                      "source_concept_id integer NOT NULL, source_vocabulary_id varchar(20) NOT NULL, "
                      "source_code_description varchar(255), target_concept_id integer NOT NULL, "
                      "target_vocabulary_id varchar(20) NOT NULL, valid_start_date date NOT NULL, "
                      "valid_end_date date NOT NULL, invalid_reason varchar(1))")
            c.execute("GRANT SELECT, INSERT, UPDATE ON voc.source_to_concept_map TO PUBLIC")
            c.execute("CALL omop_emb.index_concepts(model => %s, vocabulary_schema => 'voc')", (MODEL,))
            c.execute("INSERT INTO omop_emb.search_request (query, k, model) VALUES ('concept 3', 3, %s)", (MODEL,))
            c.execute("SELECT omop_emb.register_reranker('trap_rr', 'tei', %s)", (fake_embedder.url,))
            for sig, group, sql in _calls(fake_embedder.url, f"SELECT omop_emb.embed('v', 'query', '{MODEL}')"):
                if group == "none":
                    continue
                try:
                    c.execute(sql.replace("@JOB@", "trap_job"))
                except psycopg.Error as e:
                    failures.append((sig, e.diag.message_primary))
            fired = c.execute(f"SELECT who, what, pg_catalog.count(*) FROM {log} GROUP BY 1, 2").fetchall()
    finally:
        _drop_role(pg, dsn, role)
    assert fired == [], f"traps bound at install fired: {fired}"
    assert failures == [], failures
    RESULTS["traps before install"] = (f"{len(planted)} traps in public before the superuser installed: "
                                       "none bound into a view, default or constraint")


def test_zz_report_traps():
    for k, v in RESULTS.items():
        print(f"SECURITY {k}: {v}")

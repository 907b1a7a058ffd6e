"""What a PostgreSQL engineer sees in the catalog: \\df+ omop_emb.* readable (the
runtime's Python lives in a table, not in a function body), the API apart from the
internals, and a client that exposes every argument of the SQL API."""

from __future__ import annotations

import psycopg

from conftest import register_fake_model


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


# What \df+ omop_emb.* prints is dominated by the functions' source code (prosrc).
DF_PLUS_SQL = """
SELECT p.proname, p.prosrc
FROM pg_catalog.pg_proc p
WHERE p.pronamespace = 'omop_emb'::regnamespace
"""


def test_df_plus_of_the_api_is_small_and_the_runtime_is_a_table(omop_db, fake_embedder):
    with connect(omop_db) as conn:
        rows = conn.execute(DF_PLUS_SQL).fetchall()
        total = sum(len(src) for _, src in rows)
        longest = max(len(line) for _, src in rows for line in src.splitlines())
        names = {name for name, _ in rows}
        # Before 0.2.0 one body held all the Python on a 102 KB line (\df+: 20.9 MB).
        print(f"\n\\df+ omop_emb.*: {len(rows)} routines, {total} characters of source, longest line {longest}")
        # The SQL and PL/Python entry points (~18 KB) and the mapping jobs' PL/pgSQL
        # (sql/api/80_mapping.sql, ~32 KB): readable source, not the runtime's 21 MB.
        assert total < 80_000, f"\\df+ omop_emb.* prints {total} characters of source"
        assert longest < 300, f"a source line of {longest} characters"
        assert "_bootstrap" not in names
        modules = conn.execute("SELECT name FROM omop_emb_internal.python_module "
                               "ORDER BY load_order").fetchall()
        assert modules[0][0] == "omop_emb_indb" and modules[-1][0] == "omop_emb_indb.runtime"
        secdef, config = conn.execute(
            "SELECT prosecdef, proconfig FROM pg_catalog.pg_proc "
            "WHERE oid = 'omop_emb_internal._bootstrap()'::regprocedure").fetchone()
        assert secdef and config == ["search_path=pg_catalog, pg_temp"]
        # The runtime loads from the table: a call works in a new session.
        register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        assert conn.execute("SELECT vector_dims(omop_emb.embed('aspirin', 'query'))").fetchone()[0] \
            == fake_embedder.dim

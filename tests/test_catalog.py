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
        biggest = max(len(src) for _, src in rows)
        assert biggest < 20_000, f"a routine of {biggest} characters"
        internal = sorted(n for n in names if n.startswith("_"))
        assert internal == [], f"internal routines belong in omop_emb_internal: {internal}"
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


# ------------------------------------------------------------------ one API, three doors
# SQL function -> (client method, {SQL argument: client parameter} where the names differ).
CLIENT = {
    "nearest(text)": ("nearest", {"query": "text"}),
    "nearest_batch": ("get_nearest_concepts_from_query_texts", {"queries": "query_texts"}),
    "explain_nearest": ("explain_nearest", {"query": "text"}),
    # omop-emb's names, kept so that its users can move over.
    "embed": ("embed", {"input": "text", "role": "embedding_role"}),
    "embed_batch": ("embed_texts", {"inputs": "texts", "role": "embedding_role"}),
    "similarity": ("similarity", {"a_role": "terms_role", "b_role": "terms_to_match_role"}),
    "embedding_role_prefixes": ("embedding_role_prefix_details", {}),
    "upsert_concept_texts": ("embed_and_upsert_concepts", {"texts": "concept_texts"}),
    "register_model": ("register_model", {}),
    "alter_model": ("alter_model", {}),
    "drop_model": ("drop_model", {}),
    "set_secret": ("set_secret", {}),
    "delete_secret": ("delete_secret", {}),
    "bind_secret": ("bind_secret", {}),
    "allow_env_key": ("allow_env_key", {}),
    "index_concepts": ("index_concepts", {}),
    "create_index": ("create_index", {}),
    "calibrate_index": ("calibrate_index", {}),
    "status": ("status", {}),
    "clear_cache": ("clear_cache", {}),
    "version": ("version", {}),
    "ranking": ("ranking", {}),
    "set_ranking": ("set_ranking", {}),
    "register_reranker": ("register_reranker", {}),
    "drop_reranker": ("drop_reranker", {}),
}
NOT_IN_CLIENT = {
    "nearest(vector)": "a query vector is SQL's business (nearest(text) embeds the text)",
    "fold_text": "SQL helper for expressions",
    "initials": "SQL helper for expressions (the fused ranking's initials index)",
    "ranking_candidates": "features for fitting: omop_emb_pg.ranking_fit and omop-emb-pg fit-ranking drive it",
    "lexemes": "SQL helper for expressions",
    "lexical_query": "SQL helper for expressions",
    "lexical_score": "SQL helper for expressions",
    "search_request_results": "row function of the view omop_emb.search_result",
    "export_embeddings": "chunks of a bundle: omop_emb_pg.bundle.export_bundle drives it",
    **{fn: "steps of a bundle import: omop_emb_pg.bundle.import_bundle drives them (COPY in between)"
       for fn in ("import_begin", "import_chunk", "import_end")},
    # Mapping jobs (issue 14): wrapped by omop_emb_pg.mapping and `omop-emb-pg map`, not OmopEmb.
    **{fn: "mapping jobs: omop_emb_pg.mapping" for fn in (
        "create_mapping_job", "add_mapping_terms", "assign_mapping_terms", "suggest_mappings",
        "suggest_mappings_batch", "suggest_mappings_start", "record_decision", "auto_approve",
        "export_source_to_concept_map", "check_mappings")},
}
# Client parameters whose default is the client's own (SQL has none for them).
CLIENT_OWN_DEFAULTS = {("register_model", "provider"), ("embed", "embedding_role"),
                       ("embed_texts", "embedding_role"), ("similarity", "terms_role"),
                       ("similarity", "terms_to_match_role")}
# CLI subcommand -> (SQL function, {SQL argument: option dest} where the names differ).
CLI = {
    "search": ("nearest_batch", {"queries": "text"}),
    "index": ("index_concepts", {}),
    "register-model": ("register_model", {}),
    "create-index": ("create_index", {}),
    "calibrate-index": ("calibrate_index", {}),
    "status": ("status", {}),
}

SIGNATURES_SQL = """
SELECT p.proname, pg_catalog.format_type(p.proargtypes[0], NULL) AS first_type,
       coalesce(p.proargnames[1:p.pronargs], '{}') AS args, p.pronargdefaults AS n_defaults
FROM pg_catalog.pg_proc p
WHERE p.pronamespace = 'omop_emb'::regnamespace
"""


def sql_signatures(dsn):
    """{name: (argument names, names of those with a default)}; overloads by first type."""
    with connect(dsn) as conn:
        rows = conn.execute(SIGNATURES_SQL).fetchall()
    names = [r[0] for r in rows]
    out = {}
    for name, first, args, n_def in rows:
        key = f"{name}({first})" if names.count(name) > 1 else name
        out[key] = (list(args), set(args[len(args) - n_def:]) if n_def else set())
    return out


def test_client_and_cli_expose_every_argument_of_the_sql_api(omop_db):
    import inspect

    from omop_emb_pg import OmopEmb
    from omop_emb_pg.cli import build_parser

    sigs = sql_signatures(omop_db)
    undecided = set(sigs) - set(CLIENT) - set(NOT_IN_CLIENT)
    assert not undecided, f"SQL functions neither in the client nor excluded: {sorted(undecided)}"
    problems = []
    for fn, (method, renames) in CLIENT.items():
        args, defaulted = sigs[fn]
        params = inspect.signature(getattr(OmopEmb, method)).parameters
        for a in args:
            name = renames.get(a, a)
            if name not in params:
                problems.append(f"OmopEmb.{method} lacks {name} (SQL {fn}.{a})")
            elif a in defaulted and params[name].default is not None \
                    and (method, name) not in CLIENT_OWN_DEFAULTS:
                # SQL decides: the client passes nothing unless asked to.
                problems.append(f"OmopEmb.{method}({name}={params[name].default!r}) restates "
                                f"the default of SQL {fn}.{a}")
    subparsers = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices
                      and "search" in a.choices).choices
    for command, (fn, renames) in CLI.items():
        args, _ = sigs[fn]
        dests = {a.dest for a in subparsers[command]._actions}
        for a in args:
            if renames.get(a, a) not in dests:
                problems.append(f"omop-emb-pg {command} has no option for SQL {fn}.{a}")
        for action in subparsers[command]._actions:
            if action.dest in args and fn != "register_model" and action.default is not None:
                problems.append(f"omop-emb-pg {command} {action.option_strings} restates the default "
                                f"of SQL {fn}.{action.dest}")
    assert not problems, "\n".join(problems)


def test_cli_options_are_never_abbreviated():
    import pytest

    from omop_emb_pg.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--mod", "hybrid", "x"])   # not --model
    args = build_parser().parse_args(["search", "--mode", "hybrid", "x"])
    assert args.mode == "hybrid" and args.model is None


def test_a_missing_runtime_is_a_clear_error(omop_db):
    with connect(omop_db) as conn:
        conn.execute("BEGIN")
        conn.execute("DELETE FROM omop_emb_internal.python_module")
        try:
            conn.execute("SELECT omop_emb_internal._bootstrap()")
        except psycopg.Error as e:
            assert e.diag.message_primary == ("omop_emb: the runtime's modules are missing "
                                              "(omop_emb_internal.python_module is empty)")
            assert "ALTER EXTENSION omop_emb UPDATE" in e.diag.message_hint
        else:
            raise AssertionError("no error")
        finally:
            conn.execute("ROLLBACK")

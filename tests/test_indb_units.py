"""Unit tests of the in-database Python modules, imported with plain pytest
(no PostgreSQL): the same source that extension/build.py embeds in the
extension script."""

from __future__ import annotations

import base64
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "extension"))

from omop_emb_indb import checks, lexical, prefixes, providers, sqlgen, vectors  # noqa: E402
from omop_emb_indb.errors import InvalidArgument, InvalidEmbeddingResponse, PrefixMismatch  # noqa: E402


def test_roles_are_checked_and_folded():
    assert prefixes.check_role(" Query ") == "query"
    with pytest.raises(InvalidArgument) as e:
        prefixes.check_role("passage")
    assert "'document'" in e.value.hint


def test_setting_wins_else_model_record_else_empty():
    assert prefixes.resolve("query", "q: ", "query: ") == ("q: ", "setting omop_emb.query_embedding_prefix")
    assert prefixes.resolve("query", None, "query: ") == ("query: ", "model")
    assert prefixes.resolve("document", None, None) == ("", "default (none set)")


def test_mismatch_warns_or_raises_in_strict_mode():
    assert prefixes.check_mismatch("query", "m", None, "query: ", False) is None
    assert prefixes.check_mismatch("query", "m", "query: ", "query: ", False) is None
    msg, _, hint = prefixes.check_mismatch("query", "m", "search_query: ", "query: ", False)
    assert "'search_query: '" in msg and "'query: '" in msg and "RESET" in hint
    with pytest.raises(PrefixMismatch):
        prefixes.check_mismatch("document", "m", "x: ", "passage: ", True)


@pytest.mark.parametrize("name,family", [("multilingual-e5-small", "e5"), ("nomic-embed-text:v1.5", "nomic-embed-text"),
                                         ("bge-large-en-v1.5", "bge"), ("text-embedding-3-small", None),
                                         ("all-MiniLM-L6-v2", "minilm")])
def test_model_families_are_recognised(name, family):
    assert prefixes.family_of(name)[0] == family
    msg, _, hint = prefixes.empty_prefix_warning("query", name)
    symmetric = family == "minilm"
    assert ("usually expects" in hint) == (family is not None and not symmetric)
    # For a symmetric model the warning says empty is right and that nothing is to be done.
    assert ("which is right" in msg and "Nothing to do" in hint) == symmetric


def test_urls_per_provider():
    assert providers.embeddings_url("openai", "http://h:1") == "http://h:1/v1/embeddings"
    assert providers.embeddings_url("openai", "https://api.example/v1/") == "https://api.example/v1/embeddings"
    assert providers.embeddings_url("ollama", "http://h:11434") == "http://h:11434/api/embed"
    with pytest.raises(InvalidArgument):
        providers.embeddings_url("openai", "file:///etc/passwd")


def test_openai_base64_and_order_by_index():
    vec = [0.5, -0.25, 1.0]
    b64 = base64.b64encode(struct.pack("<3f", *vec)).decode()
    body = {"data": [{"index": 1, "embedding": [0.0, 0.0, 1.0]}, {"index": 0, "embedding": b64}]}
    assert [list(v) for v in providers.parse_response("openai", body, 2)] == [vec, [0.0, 0.0, 1.0]]


@pytest.mark.parametrize("body,count", [({"embeddings": [[1.0]]}, 2), ({"nope": 1}, 1), ([], 1)])
def test_malformed_responses_are_refused(body, count):
    with pytest.raises(InvalidEmbeddingResponse):
        providers.parse_response("ollama", body, count)


@pytest.mark.parametrize("vecs", [[[1.0, float("nan")]], [[1.0, float("inf")]], [[1.0]], [[1.0, "x"]], [[]]])
def test_vectors_are_validated(vecs):
    with pytest.raises(InvalidEmbeddingResponse):
        providers.validate_vectors(vecs, 2)


def test_a_zero_vector_is_refused_unless_the_metric_is_l2():
    for metric in ("cosine", "ip", None):
        with pytest.raises(InvalidEmbeddingResponse, match="all zeros"):
            providers.validate_vectors([[0.5, 0.5], [0.0, -0.0]], 2, metric)
    assert providers.validate_vectors([[0.0, 0.0]], 2, "l2") == [[0.0, 0.0]]
    # The fast paths leave an all-zero vector to the full parse, which knows the metric.
    assert vectors.json_arrays(b'{"data": [{"index": 0, "embedding": [0.0, -0e0]}]}', 1, 2) is None
    zero = base64.b64encode(struct.pack("<2f", 0.0, 0.0))
    assert vectors.base64_vectors(b'{"data": [{"index": 0, "embedding": "' + zero + b'"}]}', 1, 2) is None
    one = base64.b64encode(struct.pack("<2f", 0.0, 1.0))
    assert vectors.base64_vectors(b'{"data": [{"index": 0, "embedding": "' + one + b'"}]}', 1, 2) is not None


def test_vector_text_round_trip_and_hash():
    v = [0.1, -2.5, 3e-8]
    assert vectors.from_sql(vectors.to_sql(v)) == pytest.approx(v, rel=1e-8)
    assert vectors.to_sql((0.5, -0.25)) == "[0.5,-0.25]"
    assert vectors.text_hash("passage: a") != vectors.text_hash("query: a")
    # one fold, in SQL (omop_emb.fold_text): tests/test_security_traps.py
    assert not hasattr(vectors, "fold")


def test_k_and_filters_are_checked():
    assert checks.check_k(1000) == 1000
    for bad in (0, -1, 10**6, None):
        with pytest.raises(InvalidArgument):
            checks.check_k(bad)
    with pytest.raises(InvalidArgument) as e:
        checks.check_filters(["Condition", None], None, None)
    assert "domain_ids" in e.value.message


def test_search_sql_is_index_shaped_and_parameterised():
    model = {"model_id": 3, "metric": "cosine", "storage": "vector", "dimensions": 384}
    sql, types, names = sqlgen.search(model, ((True, False, True), True, False))
    # pgvector's operator and type schema-qualified (search_path is pinned to pg_catalog, pg_temp)
    assert "ORDER BY e.embedding OPERATOR(public.<=>) $1 LIMIT $2" in sql
    assert "e.domain_id = ANY($3::text[])" in sql and "e.concept_class_id = ANY($4::text[])" in sql
    assert types == ["public.vector(384)", "int4", "text[]", "text[]"] and names == ["domain_ids", "concept_class_ids"]
    exact_sql, _, _ = sqlgen.search(model, ((False, False, False), True, False), exact=True)
    assert "ORDER BY (e.embedding OPERATOR(public.<=>) $1) + 0" in exact_sql  # no index can serve it
    assert sqlgen.storage_for(2000) == "vector" and sqlgen.storage_for(3072) == "halfvec"
    assert sqlgen.similarity_from_distance("cosine", 0.25) == 0.75


def test_lexical_words_split_by_how_many_texts_hold_them():
    stats = {"words": ["diseas", "oral", "tablet"], "freqs": [0.05, 0.2, 0.001, 0.001, 0.2, 0.0],
             "reltuples": 1_000_000.0}
    rows = lexical.word_rows(stats)
    assert rows == {"diseas": 50_000.0, "oral": 200_000.0, "tablet": 1_000.0}
    rare, common = lexical.split_words(["acetaminophen", "oral", "tablet", "diseas"], rows)
    assert rare == "'acetaminophen' | 'tablet'"  # not in the statistics: rarer than all listed
    assert common == "'oral' & 'diseas'"
    assert lexical.split_words(["oral"], rows) == (None, "'oral'")
    assert lexical.split_words(["x"], {}) == ("'x'", None)  # no statistics yet: every word is found
    # fused's trigram source looks up the words the statistics do not list (rare, or a
    # misspelling), once each; with no statistics yet, every word
    assert lexical.unlisted_words(["oral", "diseas"], rows) == []
    assert lexical.unlisted_words(["oral", "diabetis", "diabetis"], rows) == ["diabetis"]
    assert lexical.unlisted_words(["x"], {}) == ["x"] and lexical.unlisted_words(None, rows) == []
    # its abbreviation source keeps the tokens whose every lexeme is rare; stop words go
    assert lexical.rare_tokens([("mg", ["mg"]), ("copd", ["copd"]), ("or", []), ("oral", ["oral"])],
                               {"mg": 90_000.0, "oral": 200_000.0}) == ["copd"]
    assert lexical.word_rows(None) == {} and lexical.word_rows({"words": None, "freqs": None,
                                                                "reltuples": 0}) == {}
    # Lexemes are quoted for the tsquery cast: quotes doubled, backslashes escaped.
    assert lexical.tsquery_literal(["o'brien", "a\\b"], "|") == "'o''brien' | 'a\\\\b'"


def test_explain_lines_show_a_vector_abbreviated():
    vec = vectors.to_sql([0.5, -0.25] + [0.125] * 382)
    line = "Order By: (embedding <=> '%s'::vector)" % vec
    short = vectors.abbreviate_literals(line)
    assert short == "Order By: (embedding <=> '[0.5,-0.25,0.125,... 384 dims]'::vector)"
    assert vectors.abbreviate_literals("Filter: (domain_id = 'Condition'::text)") == \
        "Filter: (domain_id = 'Condition'::text)"


def test_json_float_arrays_are_cut_out_as_pgvector_text_in_input_order():
    import json

    vecs = [[0.25, -1.5e-3, 3.0], [1.0, 2.0, -0.5]]
    body = {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v}
                                       for i, v in enumerate(vecs)], "model": "m"}
    for seps in ((",", ":"), (", ", ": ")):
        raw = json.dumps(body, separators=seps).encode()
        got = vectors.json_arrays(raw, 2, 3)
        assert [vectors.from_sql(t) for t in got] == vecs
    # keys in another order, no index keys: order of appearance
    raw = json.dumps({"data": [{"embedding": v, "object": "embedding"} for v in vecs]}).encode()
    assert [vectors.from_sql(t) for t in vectors.json_arrays(raw, 2, 3)] == vecs


@pytest.mark.parametrize("change", ["count", "dims", "nan", "inf", "null", "string", "base64", "order"])
def test_json_arrays_leave_anything_unusual_to_the_full_parse(change):
    import json

    vecs = [[0.25, -1.5e-3, 3.0], [1.0, 2.0, -0.5]]
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
    count, dims = 2, 3
    if change == "count":
        count = 3
    elif change == "dims":
        dims = 4
    elif change in ("nan", "inf", "null", "string"):
        data[1]["embedding"] = [1.0, {"nan": float("nan"), "inf": float("-inf"), "null": None,
                                      "string": "x"}[change], 2.0]
    elif change == "base64":
        for d in data:
            d["embedding"] = base64.b64encode(struct.pack("<3f", *d["embedding"])).decode()
    elif change == "order":
        data.reverse()
    assert vectors.json_arrays(json.dumps({"data": data}).encode(), count, dims) is None


def test_identity_hash_keeps_version_0_and_separates_later_versions():
    sent = "query: high blood pressure"
    assert vectors.identity_hash(sent, 0) == vectors.text_hash(sent)  # rows and cache of 0.1.0 stay valid
    assert vectors.identity_hash(sent, 1) != vectors.identity_hash(sent, 0)
    assert vectors.identity_hash(sent, 2) != vectors.identity_hash(sent, 1)
    # the SQL side hashes salt || prefix || text the same way
    assert vectors.identity_hash(sent, 3) == vectors.text_hash(vectors.identity_salt(3) + sent)


def test_length_is_checked_on_what_is_sent_and_batches_are_bounded():
    model = {"name": "m", "max_input_chars": 10}
    checks.check_input_length(model, ["x" * 3], "query: ")  # 10 as sent: fine
    with pytest.raises(InvalidArgument) as e:
        checks.check_input_length(model, [None, "x" * 4], "query: ", "query")
    assert "text 2 is 11 characters long as sent" in e.value.message and "query: " in e.value.detail
    checks.check_batch_size(200, 1000)
    with pytest.raises(InvalidArgument) as e:
        checks.check_batch_size(2000, 1000)
    assert "chunks of 200" in e.value.hint


def _b64_body(vecs, reverse=False):
    import json

    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(struct.pack("<%df" % len(v), *v)).decode()}
            for i, v in enumerate(vecs)]
    if reverse:
        data.reverse()
    return json.dumps({"object": "list", "data": data, "model": "m"}).encode()


def test_base64_answers_become_pgvector_binary_in_input_order():
    vecs = [[0.25, -1.5e-3, 3.0], [1.0, 2.0, -0.5]]
    got = vectors.base64_vectors(_b64_body(vecs), 2, 3)
    # int16 dimensions, int16 unused, big-endian float32 values (pgvector's vector_recv)
    assert got[0][:4] == b"\x00\x03\x00\x00"
    assert got[0][4:8] == struct.pack(">f", 0.25)
    assert [vectors.from_binary(b) for b in got] == [list(struct.unpack("<3f", struct.pack("<3f", *v)))
                                                     for v in vecs]
    assert got == [vectors.to_binary(v) for v in vecs]


@pytest.mark.parametrize("change", ["count", "dims", "nan", "inf", "floats", "order", "garbage"])
def test_base64_vectors_leave_anything_unusual_to_the_full_parse(change):
    import json

    vecs = [[0.25, -1.5e-3, 3.0], [1.0, 2.0, -0.5]]
    count, dims = 2, 3
    body = _b64_body(vecs)
    if change == "count":
        count = 3
    elif change == "dims":
        dims = 4
    elif change in ("nan", "inf"):
        body = _b64_body([vecs[0], [1.0, float(change), 2.0]])
    elif change == "floats":
        body = json.dumps({"data": [{"index": i, "embedding": v} for i, v in enumerate(vecs)]}).encode()
    elif change == "order":
        body = _b64_body(vecs, reverse=True)
    elif change == "garbage":
        body = body.replace(b'"embedding": "', b'"embedding": "A', 1)
    assert vectors.base64_vectors(body, count, dims) is None


def test_binary_copy_rows_follow_postgresql_format():
    from omop_emb_indb import copy_binary

    data = copy_binary.encode([[7, None], ["naïve", "x"], [b"\x01\x02", b""]],
                              ("int4", "text", "bytes"))
    assert data.startswith(b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8) and data.endswith(b"\xff\xff")
    rows = data[19:-2]
    first = (b"\x00\x03" + struct.pack(">ii", 4, 7) + struct.pack(">i", 6) + "naïve".encode()
             + struct.pack(">i", 2) + b"\x01\x02")
    second = b"\x00\x03" + b"\xff\xff\xff\xff" + struct.pack(">i", 1) + b"x" + struct.pack(">i", 0)
    assert rows == first + second
    with pytest.raises(ValueError):
        copy_binary.encode([[1]], ("float8",))


def test_binary_copy_columns_match_the_embedding_table():
    assert len(sqlgen.COPY_COLUMNS) == len(sqlgen.COPY_KINDS)
    kinds = dict(zip(sqlgen.COPY_COLUMNS, sqlgen.COPY_KINDS))
    assert kinds["concept_id"] == kinds["source_concept_id"] == "int4"
    assert kinds["text_hash"] == kinds["embedding"] == "bytes"
    assert all(kinds[c] == "text" for c in ("text_kind", "text", "source_code") + sqlgen.ATTR_COLUMNS)


def test_ef_search_is_the_setting_else_the_calibrated_index_else_the_default():
    from omop_emb_indb import indexing, runtime

    assert indexing.choose_ef_search({40: 0.95, 60: 0.981, 80: 0.99}) == 60
    assert indexing.choose_ef_search({40: 0.9, 60: 0.95}) == 60  # none reaches: the largest measured
    assert runtime.ef_search({"ef_search": 120}, {"index_ef_search": 60}) == 120
    assert runtime.ef_search({"ef_search": None}, {"index_ef_search": 60}) == 60
    assert runtime.ef_search({"ef_search": None}, {"index_ef_search": None}) == runtime.DEFAULT_EF_SEARCH
    assert runtime.ef_search({"ef_search": None}, {}) == runtime.DEFAULT_EF_SEARCH


def test_calibration_sample_takes_cached_real_queries_first_then_query_texts_then_stored_vectors():
    from omop_emb_indb import indexing

    stored = [{"id": "(0,%d)" % i, "v": "[%d]" % i} for i in range(5)]
    got = indexing.calibration_sample(["[q1]", "[q2]"], stored, size=4)
    assert got == [{"id": None, "v": "[q1]", "kind": "cached"}, {"id": None, "v": "[q2]", "kind": "cached"},
                   dict(stored[0], kind="stored"), dict(stored[1], kind="stored")]
    assert indexing.calibration_sample(["[q%d]" % i for i in range(9)], stored, size=4) == \
        [{"id": None, "v": "[q%d]" % i, "kind": "cached"} for i in range(4)]  # enough real queries
    # the model's own texts embedded in the query role come before any stored vector
    got = indexing.calibration_sample(["[q1]"], stored, size=4, own_texts=["[t1]", "[t2]", "[t3]", "[t4]"])
    assert [r["kind"] for r in got] == ["cached", "text", "text", "text"]
    assert [r["v"] for r in got] == ["[q1]", "[t1]", "[t2]", "[t3]"] and all(r["id"] is None for r in got)


def _stats_rows(reltuples, cols):
    return [{"reltuples": reltuples, "col": col, "vals": vals, "freqs": freqs, "n_distinct": nd,
             "null_frac": 0.0} for col, (vals, freqs, nd) in cols.items()]


def test_a_selective_filter_is_scanned_exactly():
    from omop_emb_indb import selectivity

    # 1M texts: Condition 10%, Drug 60%; vocabulary CVX 1%, SNOMED 50%; 40 vocabularies in all.
    stats = selectivity.column_stats(_stats_rows(1_000_000, {
        "domain_id": (["Drug", "Condition"], [0.6, 0.1], 12),
        "vocabulary_id": (["SNOMED", "RxNorm", "CVX"], [0.5, 0.3, 0.01], 40)}))
    exact = selectivity.exact_is_better
    assert not exact(stats, {"domain_id": None, "vocabulary_id": None})       # no filter: the graph
    assert not exact(stats, {"domain_id": ["Condition"]})                     # 100,000 rows
    assert exact(stats, {"vocabulary_id": ["CVX"]})                           # 10,000 rows
    assert not exact(stats, {"vocabulary_id": ["CVX", "SNOMED"]})             # 510,000 rows
    # A value ANALYZE did not list is rarer than the listed ones: the rest spread over the others.
    assert selectivity.estimated_rows(stats, {"vocabulary_id": ["ICD10"]}) == pytest.approx(
        (1 - 0.81) / 37 * 1_000_000)
    # Two filters multiply (the planner's independence assumption).
    assert not exact(stats, {"domain_id": ["Condition"], "vocabulary_id": ["RxNorm"]})  # 30,000
    assert exact(stats, {"domain_id": ["Condition"], "vocabulary_id": ["CVX"]})         # 1,000
    # Under the cap but 3% of the table: the graph meets enough of them.
    assert not exact(stats, {"domain_id": ["Condition"], "vocabulary_id": ["RxNorm"]}, limit=50_000)
    # A small table: 1,500 of 10,000 texts (15%) is still cheap to scan exactly.
    small = selectivity.column_stats(_stats_rows(10_000, {"domain_id": (["Drug"], [0.15], 5)}))
    assert exact(small, {"domain_id": ["Drug"]})
    assert not exact(small, {"domain_id": ["Drug"]}, limit=1000)
    # A filtered column never analyzed: nothing is known, the graph as before.
    assert not exact(stats, {"concept_class_id": ["Vaccine"]})
    # A negative n_distinct is a fraction of the rows.
    s2 = selectivity.column_stats(_stats_rows(1000, {"concept_class_id": ([], [], -0.5)}))
    assert selectivity.estimated_rows(s2, {"concept_class_id": ["x"]}) == pytest.approx(2.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_pipeline_embeds_in_order_and_leaves_no_thread(threads):
    import threading

    from omop_emb_indb.http_client import EmbeddingHTTP, EmbeddingPipeline

    seen = []

    def embed(texts):
        seen.append(threading.current_thread().name)
        return [t.upper() for t in texts]

    with EmbeddingPipeline(EmbeddingHTTP(), embed, threads) as p:
        jobs = [p.submit(["a%d" % i, "b%d" % i]) for i in range(5)]
        assert [p.result(j) for j in jobs] == [["A%d" % i, "B%d" % i] for i in range(5)]
    assert set(seen) == {EmbeddingPipeline.THREAD_NAME}
    assert not any(t.name == EmbeddingPipeline.THREAD_NAME for t in threading.enumerate())


def test_pipeline_failure_fails_the_later_chunks_without_sending_them():
    from omop_emb_indb.errors import EmbeddingServiceError
    from omop_emb_indb.http_client import EmbeddingHTTP, EmbeddingPipeline

    sent = []

    def embed(texts):
        sent.append(texts[0])
        if texts[0] == "fail":
            raise EmbeddingServiceError("server said no")
        return texts

    with EmbeddingPipeline(EmbeddingHTTP(), embed) as p:
        ok, bad, later = p.submit(["ok"]), p.submit(["fail"]), p.submit(["later"])
        assert p.result(ok) == ["ok"]
        with pytest.raises(EmbeddingServiceError, match="server said no"):
            p.result(bad)
        with pytest.raises(EmbeddingServiceError):
            p.result(later)
    assert sent == ["ok", "fail"]


def test_pipeline_wait_is_interruptible_and_stops_the_thread():
    """A cancel seen by the backend's thread while it waits ends the wait; leaving the
    block stops the thread's request (its wait sees the stop flag) and joins it."""
    import threading
    import time

    from omop_emb_indb.http_client import EmbeddingHTTP, EmbeddingPipeline, PipelineStopped

    class Cancelled(Exception):
        pass

    http = EmbeddingHTTP()
    calls = []

    def interrupt():
        calls.append(threading.current_thread().name)
        if len(calls) > 3:
            raise Cancelled()

    http.interrupt = interrupt
    stopped = []

    def embed(texts):  # a request that never answers, checking the stop flag like _send
        try:
            while True:
                http._check_interrupt()
                time.sleep(0.005)
        except PipelineStopped:
            stopped.append(True)
            raise

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        with EmbeddingPipeline(http, embed) as p:
            p.result(p.submit(["x"]))
    assert time.monotonic() - t0 < 1
    assert stopped == [True]
    # only the waiting thread called the backend's interrupt check
    assert set(calls) == {threading.current_thread().name}
    assert not any(t.name == EmbeddingPipeline.THREAD_NAME for t in threading.enumerate())


def test_a_calibration_short_of_its_target_says_so():
    from omop_emb_indb import indexing

    msg = indexing.calibration_shortfall("e5-small", 400, 0.932)
    assert "recall@10 0.932 at ef_search 400" in msg and "below the 0.98 target" in msg
    assert "SET omop_emb.ef_search higher" in msg and "'e5-small'" in msg
    assert indexing.calibration_shortfall("e5-small", 100, 0.985) is None

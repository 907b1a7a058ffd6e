"""Indexing the vocabulary: which concept texts to embed, and embedding them.

``index_concepts`` (a procedure, so that it can commit each batch) calls
``prepare`` once and then ``batch`` until the work queue is empty:

* ``prepare`` computes the texts the vocabulary asks for (names, and on request
  English synonyms and the names of source concepts that 'Maps to' a standard
  concept), queues those whose hash of the exact text sent (prefix included)
  is not in the embedding table yet, deletes rows whose text is gone, and
  refreshes the concept attributes stored beside the vectors.
* ``batch`` claims queued texts with ``FOR UPDATE SKIP LOCKED`` (so several
  sessions share the work without doing it twice), embeds them in one request
  per chunk and upserts them. A failure rolls the batch back into the queue.
"""

import json

from . import copy_binary, http_client, providers, sqlgen, vectors
from .checks import check_filters
from .errors import InvalidArgument, UnsafeRelation

ENGLISH = 4180186
# First key of the pg_advisory_xact_lock(class, model_id) under which the
# preparation, the finish and the index DDL of one model run one session at a
# time ("OEmd"). Sessions indexing together otherwise deadlock: ANALYZE takes a
# self-conflicting lock, CREATE INDEX a SHARE lock, and two preparations
# insert the same queue rows.
MODEL_LOCK_CLASS = 0x4F456D64


def _model_columns():
    from .runtime import MODEL_COLUMNS
    return MODEL_COLUMNS


# Whether a batch may be stored with a binary COPY from a file (copy_binary): the
# extension's owner may read server files (a superuser, or pg_read_server_files),
# and text needs no conversion (binary COPY reads text in the client encoding).
# Otherwise the batch goes through INSERT ... ON CONFLICT with vectors as text.
COPY_BINARY_OK_SQL = (
    "SELECT pg_catalog.pg_has_role(current_user, 'pg_read_server_files', 'USAGE') "
    "AND pg_catalog.pg_client_encoding() OPERATOR(pg_catalog.=) 'UTF8' "
    "AND pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.=) 'UTF8' AS ok")

SWAP_LOCK_TIMEOUT_MS = 200
SWAP_TRIES = 20

# create_index measures recall@10 of the new HNSW index on a sample of queries against
# an exact scan and records in index_params the smallest of these hnsw.ef_search values
# that reaches the target; nearest() searches with it while the setting
# omop_emb.ef_search is unset. The sample is the model's most recent real queries (the
# query-role vectors of omop_emb.query_cache, this identity's only), topped up with the
# model's own texts embedded in the query role (one request to its server; what a user
# typing a concept's name sends), and only when those cannot be had (the server does not
# answer, or the setting omop_emb.calibration_embeds is off, as for a bundle import, which
# embeds nothing) with its stored vectors (each as a query, itself left out). Stored vectors
# flatter the index: each lies in a dense part of the graph, while a query-role vector lies
# farther from every document (realistic 1M: stored vectors chose ef 300, 0.992 on
# themselves, where 200 real names got 0.969; query-role texts chose 800, where they got
# 0.9785: bench/results/calibration_1m). calibrate_index() measures again later, once real
# queries have been cached. Real embeddings cluster, so most models need far less than a
# uniform-random worst case (bench/b_realistic.py). Each query costs an exact scan, about
# one sequential read of the table: ~1 s at 1,000,000 x 384. create_index takes
# CALIBRATION_QUERIES (a build takes minutes); calibrate_index takes RECALIBRATION_QUERIES
# by default, because 50 queries are a noisy sample (realistic 200k: 50 real queries
# measured 0.980 at ef 40, where 200 others measured 0.925: bench/results/recalibrate_200k).
# The ladder reaches 800: at 1,000,000 realistic vectors real queries needed 600-800.
EF_LADDER = (40, 60, 80, 100, 150, 200, 300, 400, 600, 800)
CALIBRATION_QUERIES = 50
RECALIBRATION_QUERIES = 200
MAX_CALIBRATION_QUERIES = 2000
CALIBRATION_TARGET = 0.98
# cached query vectors read (times the sample size) to find those of the model's current identity
CALIBRATION_CACHE_SCAN = 4


def choose_ef_search(recall_by_ef, target=CALIBRATION_TARGET):
    """The smallest ef_search whose recall reaches ``target``, else the largest measured."""
    ok = sorted(ef for ef, r in recall_by_ef.items() if r >= target)
    return ok[0] if ok else max(recall_by_ef)


def calibration_shortfall(model_name, ef, recall, target=CALIBRATION_TARGET):
    """The warning for a calibration whose chosen ``ef`` (choose_ef_search) reached only
    ``recall``, below ``target``, else None: nearest() then searches with the largest
    ef_search measured and its recall is lower than the defaults promise."""
    if recall >= target:
        return None
    return ("omop_emb: the HNSW index of model %r reached recall@10 %.3f at ef_search %d, the "
            "largest calibrated, below the %.2f target; nearest() searches with %d. For more "
            "recall at more latency SET omop_emb.ef_search higher (up to 1000), or rebuild the "
            "index with a larger ef_construction (omop_emb.create_index)"
            % (model_name, recall, ef, target, ef))


def calibration_sample(cached, stored, size=CALIBRATION_QUERIES, own_texts=()):
    """The queries of a calibration: ``cached`` real query vectors first, then
    ``own_texts`` (query-role vectors of the model's own texts), then ``stored`` vectors
    up to ``size``. Each is {"id": ctid or None, "v": vector text, "kind": ...}; a stored
    vector (id set) is left out of its own answers."""
    out = [{"id": None, "v": v, "kind": "cached"} for v in cached[:size]]
    out += [{"id": None, "v": v, "kind": "text"} for v in own_texts[:size - len(out)]]
    return out + [dict(r, kind="stored") for r in stored[:size - len(out)]]


def _cached_queries(plpy, model, size):
    """Text forms of the most recent query vectors cached for the model as it is now
    (the cache keeps entries of earlier identities, keyed by another hash)."""
    ident = model["identity_version"]
    rows = plpy.execute(plpy.prepare(
        "SELECT c.text, c.text_hash, c.embedding::pg_catalog.text AS v FROM omop_emb.query_cache c "
        "WHERE c.model_id OPERATOR(pg_catalog.=) $1 AND c.role OPERATOR(pg_catalog.=) 'query' "
        "ORDER BY c.created_at DESC, c.text_hash LIMIT %d" % (CALIBRATION_CACHE_SCAN * size), ["int4"]),
        [model["model_id"]])
    return [r["v"] for r in rows if bytes(r["text_hash"]) == vectors.identity_hash(r["text"], ident)][:size]


def _calibrate_ef_search(plpy, model, metric, size=CALIBRATION_QUERIES, embed_queries=None):
    """{"ef_search": .., "calibration": {..}} for the model's HNSW index, or {} when
    the table holds fewer rows than the sample needs. ``embed_queries(texts)``: their
    query-role vectors (text form), or None when they cannot be had."""
    t = sqlgen.table(model["model_id"])
    dist = "e.embedding %s $1" % sqlgen.op(metric)
    cached = _cached_queries(plpy, model, size)
    # The rows that make up the sample, read once: their texts (embedded in the query role)
    # or else their vectors. text_hash (SHA-256) orders them pseudo-randomly and the same
    # way on every run.
    rows = plpy.execute(
        "SELECT e.ctid::pg_catalog.text AS id, e.text, e.embedding::pg_catalog.text AS v FROM %s e "
        "ORDER BY e.text_hash LIMIT %d" % (t, size - len(cached))) if len(cached) < size else []
    own = []
    if embed_queries is not None and len(cached) + len(rows) >= size > len(cached):
        # (a smaller table is not calibrated)
        own = [v for v in (embed_queries([r["text"] for r in rows]) or []) if v is not None]
    stored = [{"id": r["id"], "v": r["v"]} for r in rows]
    sample = calibration_sample(cached, stored, size, own)
    # a table smaller than the sample is searched about exactly at any ef_search
    if len(sample) < size or \
            len(plpy.execute("SELECT 1 FROM %s LIMIT %d" % (t, CALIBRATION_QUERIES))) < CALIBRATION_QUERIES:
        return {}
    vt = sqlgen.vector_type(model)
    exact = plpy.prepare("SELECT e.ctid::pg_catalog.text AS id FROM %s e ORDER BY (%s) + 0 LIMIT 11"
                         % (t, dist), [vt])
    approx = plpy.prepare("SELECT e.ctid::pg_catalog.text AS id FROM %s e ORDER BY %s LIMIT 11"
                          % (t, dist), [vt])
    set_ef = plpy.prepare("SELECT pg_catalog.set_config('hnsw.ef_search', $1, true)", ["text"])

    def top10(plan, row):
        return [r["id"] for r in plan.execute([row["v"]]) if r["id"] != row["id"]][:10]

    truth = [set(top10(exact, row)) for row in sample]
    before = plpy.execute("SELECT pg_catalog.current_setting('hnsw.ef_search') AS v")[0]["v"]
    recall_by_ef = {}
    try:
        for ef in EF_LADDER:
            set_ef.execute([str(ef)])
            hits = sum(len(truth[i] & set(top10(approx, row))) for i, row in enumerate(sample))
            recall_by_ef[ef] = hits / float(sum(len(x) for x in truth))
            if recall_by_ef[ef] >= CALIBRATION_TARGET:
                break
    finally:
        set_ef.execute([before])
    ef = choose_ef_search(recall_by_ef)
    short = calibration_shortfall(model["name"], ef, recall_by_ef[ef])
    if short:
        plpy.warning(short)
    kinds = [row["kind"] for row in sample]
    return {"ef_search": ef,
            "calibration": {"queries": len(sample), "cached_queries": kinds.count("cached"),
                            "query_texts": kinds.count("text"),
                            "stored_vectors": kinds.count("stored"),
                            "target_recall_at_10": CALIBRATION_TARGET,
                            "recall_at_10_by_ef_search": {str(k): round(v, 4) for k, v in
                                                          recall_by_ef.items()}}}


def _with_short_locks(plpy, statements):
    """Run ``statements`` in a subtransaction with a short lock_timeout, tried
    SWAP_TRIES times; a last try waits as long as it must."""
    if not statements:
        return
    before = plpy.execute("SELECT pg_catalog.current_setting('lock_timeout') AS v")[0]["v"]
    try:
        for attempt in range(SWAP_TRIES + 1):
            last = attempt == SWAP_TRIES
            plpy.execute("SELECT pg_catalog.set_config('lock_timeout', '%s', true)"
                         % (before if last else "%dms" % SWAP_LOCK_TIMEOUT_MS))
            try:
                with plpy.subtransaction():
                    for stmt in statements:
                        plpy.execute(stmt)
                return
            except plpy.SPIError as e:
                if last or getattr(e, "sqlstate", None) != "55P03":
                    raise
                plpy.execute("SELECT pg_catalog.pg_sleep(%f)" % (0.05 * (attempt + 1)))
    finally:
        plpy.execute(plpy.prepare("SELECT pg_catalog.set_config('lock_timeout', $1, true)",
                                  ["text"]), [before])


# Texts index_concepts() claims, embeds and commits at a time when its batch_size
# is not given (at least PIPELINE_REQUESTS requests of the model's batch_size, so
# that two are in flight). Each transaction costs a claim, a COPY, a progress
# update, a commit and the wait for its first chunk (not hidden by the pipeline)
# whatever its size: with requests of 64 texts, 4 per transaction measured 13%
# more concepts/s than 1, and with two in flight 8 (512 texts) took 30% less time
# per concept than 4 (bench/b_pipeline.py); 2048 texts per transaction were within
# the noise of 512 with requests of 256 (100,000 concepts, instant server). A
# failure rolls back at most these texts, and progress moves by them.
TEXTS_PER_TRANSACTION = 512

# A first indexing (into an empty table) of at least this many texts loads the
# table without its secondary indexes (sqlgen.secondary_indexes: folded text,
# code, filters, full text, trigrams, initials) and builds them at its end: one
# build over all rows costs less than keeping them up to date row by row (the
# GIN indexes above all). Searches meanwhile find what is stored, unindexed.
DEFER_INDEXES_MIN_TEXTS = 10000

# Requests of one batch in flight at a time (http_client.EmbeddingPipeline): the
# server embeds the next chunk while the backend reads and checks the answer before,
# and a model with several servers has two of them busy. Measured per batch
# interleaved against one request at a time (bench/b_pipeline.py).
PIPELINE_REQUESTS = 2

# Whether another session is running index_concepts() of model $1 right now (its
# progress row unfinished, its backend active): the last one builds the indexes.
OTHERS_INDEXING_SQL = (
    "SELECT EXISTS (SELECT 1 FROM omop_emb.index_progress p "
    "JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) p.pid "
    "WHERE p.model_id OPERATOR(pg_catalog.=) $1 "
    "AND p.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid() "
    "AND p.finished_at IS NULL AND a.state OPERATOR(pg_catalog.=) 'active') AS busy")


# First key of the pg_try_advisory_xact_lock(class, model_id * 32 + i) under which one
# session builds the i-th secondary index of a model ("OEix"): sessions that finish a
# first indexing together build different indexes at once (index_build_next).
INDEX_BUILD_LOCK_CLASS = 0x4F456978

# Whether texts of model $1 are still queued.
QUEUE_LEFT_SQL = ("SELECT EXISTS (SELECT 1 FROM omop_emb.index_queue "
                  "WHERE model_id OPERATOR(pg_catalog.=) $1) AS any")


def _present_indexes(plpy, names):
    rows = plpy.execute(plpy.prepare(
        "SELECT c.relname::text AS name FROM pg_catalog.pg_class c "
        "WHERE c.relnamespace OPERATOR(pg_catalog.=) 'omop_emb'::pg_catalog.regnamespace "
        "AND c.relkind OPERATOR(pg_catalog.=) 'i' AND c.relname OPERATOR(pg_catalog.=) ANY($1::text[])",
        ["text[]"]), [names])
    present = {r["name"] for r in rows}
    return [n for n in names if n in present]


def ensure_secondary_indexes(plpy, model_id):
    """Build the secondary indexes of a model's table that are missing (left out
    by a first indexing, or made before they existed). Checked first rather than
    relying on IF NOT EXISTS: CREATE INDEX takes a SHARE lock on the table even
    when the index exists, and two sessions that each hold it and then ANALYZE
    deadlock. An index another session is building (index_build_next) is waited
    for under its lock, then found present. Returns how many were built."""
    wanted = sqlgen.secondary_indexes(model_id)
    present = set(_present_indexes(plpy, [n for n, _ in wanted]))
    lock = None
    built = 0
    for i, (name, ddl) in enumerate(wanted):
        if name in present:
            continue
        lock = lock or plpy.prepare("SELECT pg_catalog.pg_advisory_xact_lock($1, $2)", ["int4", "int4"])
        lock.execute([INDEX_BUILD_LOCK_CLASS, int(model_id) * 32 + i])
        if not _present_indexes(plpy, [name]):
            plpy.execute(ddl)
            built += 1
    return built


# The order in which index_build_next takes the secondary indexes (by the suffix of
# their names): the longest builds first, so that sessions building together end
# together. Measured at 100,000 concepts (bench/b_index_builds.py): full text 32% of
# the builds, trigrams 30%, initials 20%, folded text 8%, the four btrees 2-3% each.
BUILD_ORDER = {"fts": 0, "trgm": 1, "initials": 2, "fold": 3, "code": 4}


def _lock_model(plpy, model_id):
    plpy.execute("SELECT pg_advisory_xact_lock(%d, %d)" % (MODEL_LOCK_CLASS, int(model_id)))


def _scope(include_classification, include_invalid, alias, params):
    """WHERE conditions selecting the concepts to index (the targets)."""
    conds = ["%s.standard_concept IN ('S'%s)" % (alias, ", 'C'" if include_classification else "")]
    if not include_invalid:
        conds.append("%s.invalid_reason IS NULL" % alias)
    for col, arr in params:
        conds.append("%s.%s = ANY(%s)" % (alias, col, arr))
    return " AND ".join(conds)


def desired_texts_sql(vocab, include_classification, include_invalid, include_synonyms,
                      include_mapped, filter_params):
    """SELECT of (concept_id, text_kind, text, source_concept_id, source_code, attrs...).

    ``vocab`` is the quoted schema. One row per (concept, kind, text).
    """
    scope = _scope(include_classification, include_invalid, "c", filter_params)
    attrs = ("c.concept_name, c.domain_id, c.vocabulary_id, c.concept_class_id, "
             "c.standard_concept, c.invalid_reason")
    parts = ["SELECT c.concept_id, 'name'::text AS text_kind, c.concept_name AS text, "
             "c.concept_id AS source_concept_id, c.concept_code AS source_code, %s "
             "FROM %s.concept c WHERE %s AND c.concept_name IS NOT NULL "
             "AND btrim(c.concept_name) <> ''" % (attrs, vocab, scope)]
    if include_synonyms:
        parts.append(
            "SELECT c.concept_id, 'synonym', s.concept_synonym_name, c.concept_id, "
            "c.concept_code, %s FROM %s.concept c JOIN %s.concept_synonym s "
            "ON s.concept_id = c.concept_id WHERE %s "
            "AND (s.language_concept_id = %d OR s.language_concept_id IS NULL) "
            "AND btrim(s.concept_synonym_name) <> '' "
            "AND s.concept_synonym_name <> c.concept_name" % (attrs, vocab, vocab, scope, ENGLISH))
    if include_mapped:
        # Source concept --'Maps to'--> standard concept. Invalid source concepts
        # and invalid relationships are never followed.
        mapped_from = ("FROM %s.concept c JOIN %s.concept_relationship r ON r.concept_id_2 = "
                       "c.concept_id AND r.relationship_id = 'Maps to' AND r.invalid_reason IS NULL "
                       "JOIN %s.concept src ON src.concept_id = r.concept_id_1 "
                       "AND src.invalid_reason IS NULL AND src.concept_id <> c.concept_id "
                       % (vocab, vocab, vocab))
        parts.append("SELECT c.concept_id, 'mapped', src.concept_name, src.concept_id, "
                     "src.concept_code, %s %s WHERE %s AND btrim(src.concept_name) <> '' "
                     "AND src.concept_name <> c.concept_name" % (attrs, mapped_from, scope))
        if include_synonyms:
            parts.append(
                "SELECT c.concept_id, 'mapped', s.concept_synonym_name, src.concept_id, "
                "src.concept_code, %s %s JOIN %s.concept_synonym s ON s.concept_id = "
                "src.concept_id WHERE %s AND (s.language_concept_id = %d OR "
                "s.language_concept_id IS NULL) AND btrim(s.concept_synonym_name) <> '' "
                "AND s.concept_synonym_name <> c.concept_name"
                % (attrs, mapped_from, vocab, scope, ENGLISH))
    union = " UNION ALL ".join("(%s)" % p for p in parts)
    # One row per key; a text that is both a name and a synonym keeps the better kind.
    return ("SELECT DISTINCT ON (concept_id, text_kind, text) * FROM (%s) t "
            "ORDER BY concept_id, text_kind, text, (source_concept_id = concept_id) DESC, "
            "source_concept_id" % union)


# What index_stage reads as the caller: plain and partitioned tables whose columns
# all have built-in types. A view (its query), a foreign table (its wrapper), a
# table with row-level security (its policies) or a column of a user-defined type
# (its casts) runs code of whoever made it, with the rights of the reader; a
# temporary relation shadows the vocabulary of that name for one session only.
RELATION_SQL = (
    "SELECT c.relkind::text AS kind, c.relpersistence = 't' AS temporary, "
    "c.relrowsecurity AS row_security, "
    "pg_catalog.has_table_privilege(c.oid, 'SELECT') AS readable, "
    "(SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname::text), ', ') "
    " FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid "
    " WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
    " AND t.typnamespace <> 'pg_catalog'::pg_catalog.regnamespace) AS user_typed "
    "FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass("
    "pg_catalog.quote_ident($1) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) "
    "pg_catalog.quote_ident($2))")

RELATION_KINDS = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}


def check_relation(plpy, schema, table, allow_any, required=True, what="index_concepts"):
    """True when ``schema.table`` may be read by ``what`` as the caller; False when it
    is absent and not ``required``; raises otherwise."""
    rows = plpy.execute(plpy.prepare(RELATION_SQL, ["text", "text"]), [schema, table])
    name = "%s.%s" % (schema, table)
    if not rows:
        if not required:
            return False
        raise InvalidArgument("table %s does not exist" % name,
                              hint="Load the OMOP vocabulary there, or pass the schema "
                                   "that holds it as vocabulary_schema.")
    r = rows[0]
    if not r["readable"]:
        raise InvalidArgument("you may not read %s" % name,
                              hint="GRANT SELECT on the vocabulary tables to the role "
                                   "that runs %s." % what)
    why = None
    if r["kind"] not in ("r", "p"):
        why = RELATION_KINDS.get(r["kind"], "not a table (relkind %s)" % r["kind"])
    elif r["temporary"]:
        why = "a temporary table"
    elif r["row_security"]:
        why = "a table with row-level security"
    elif r["user_typed"]:
        why = "a table with columns of user-defined types (%s)" % r["user_typed"]
    if why and not allow_any:
        raise UnsafeRelation(
            "%s is %s; %s reads only plain tables of the vocabulary" % (name, why, what),
            detail="Reading it could run code of whoever made it (a view's functions, a "
                   "policy, a cast, a foreign-data wrapper), with your rights.",
            hint="Index from the vocabulary's own tables (vocabulary_schema => '...'). If you "
                 "trust every function it uses, pass allow_any_relation => true to "
                 "index_concepts(): it is then read with your rights, never the extension "
                 "owner's.")
    return True


STAGE_TEXT_COLUMNS = ("concept_id", "text_kind", "text", "source_concept_id",
                      "source_code") + sqlgen.ATTR_COLUMNS

# This session's rows of the staging tables (filled by index_stage as the caller).
MINE = "pid = pg_catalog.pg_backend_pid()"


def _check_upsert_args(concept_ids, texts):
    """False when there is nothing to store; raises on bad input."""
    if concept_ids is None or texts is None:
        return False
    if len(concept_ids) != len(texts):
        raise InvalidArgument("%d concept ids but %d texts" % (len(concept_ids), len(texts)),
                              hint="Pass one text per concept id.")
    if any(c is None for c in concept_ids) or any(t is None or not t.strip() for t in texts):
        raise InvalidArgument("concept ids and texts must not be NULL or blank")
    if len(set(concept_ids)) != len(concept_ids):
        raise InvalidArgument("concept ids repeat", hint="Pass each concept once.")
    return True


class IndexingMixin:
    def index_model(self, plpy, model_name):
        """(model_id, name, recorded vocabulary schema) of a model, resolved as every
        function does (argument, setting, the only model): for the invoker steps,
        which cannot read omop_emb.model."""
        model = self.model(plpy, model_name)
        return [(model["model_id"], model["name"], model["vocabulary_schema"])]

    def _vocabulary_has(self, plpy, vocab_schema, table):
        return plpy.execute(plpy.prepare(
            "SELECT pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.' || $2) IS NOT NULL "
            "AS present", ["text", "text"]), [vocab_schema, table])[0]["present"]

    def index_stage(self, plpy, model_name, vocab_schema, domain_ids, vocabulary_ids,
                    concept_class_ids, include_classification, include_invalid,
                    include_synonyms, include_mapped, allow_any):
        """SECURITY INVOKER step of index_concepts: reads the vocabulary with the
        caller's rights into this session's staging rows, then runs index_prepare
        (SECURITY DEFINER), which reads only those rows."""
        if not vocab_schema:
            raise InvalidArgument(
                "no vocabulary schema: no table named concept is on the search_path",
                hint="Pass vocabulary_schema => 'cdm' (the schema holding CONCEPT), or SET "
                     "search_path so that it is found.")
        # NULL (the default): synonyms and mapped source names are indexed whenever
        # the vocabulary has the table they come from.
        if include_synonyms is None:
            include_synonyms = self._vocabulary_has(plpy, vocab_schema, "concept_synonym")
        if include_mapped is None:
            include_mapped = self._vocabulary_has(plpy, vocab_schema, "concept_relationship")
        for t in ["concept"] + (["concept_synonym"] if include_synonyms else []) + \
                (["concept_relationship"] if include_mapped else []):
            check_relation(plpy, vocab_schema, t, allow_any)
        filters = check_filters(domain_ids, vocabulary_ids, concept_class_ids)
        mid, name, _ = plpy.execute(plpy.prepare(
            "SELECT * FROM omop_emb_internal.index_model($1)", ["text"]), [model_name])[0].values()
        params, args, types = [], [], []
        for col, arr in zip(("domain_id", "vocabulary_id", "concept_class_id"), filters):
            if arr is not None:
                args.append(arr)
                types.append("text[]")
                params.append((col, "$%d" % len(args)))
        vocab = plpy.quote_ident(vocab_schema)
        desired = desired_texts_sql(vocab, bool(include_classification), bool(include_invalid),
                                    bool(include_synonyms), bool(include_mapped), params)
        cols = ", ".join(STAGE_TEXT_COLUMNS)
        plpy.execute(plpy.prepare(
            "INSERT INTO omop_emb_internal.index_stage_text (%s) SELECT %s FROM (%s) d"
            % (cols, cols, desired), types), args)
        # Attributes of the concepts in scope and of every concept embedded already
        # (refreshed, or removed when gone from the vocabulary).
        in_scope = "coalesce(%s, false)" % _scope(bool(include_classification),
                                                   bool(include_invalid), "c", params)
        attrs = ", ".join("c." + a for a in sqlgen.ATTR_COLUMNS)
        plpy.execute(plpy.prepare(
            "INSERT INTO omop_emb_internal.index_stage_concept (concept_id, in_scope, %s) "
            "SELECT c.concept_id, %s, %s FROM %s.concept c WHERE %s OR c.concept_id IN "
            "(SELECT omop_emb_internal.embedded_concepts($%d))"
            % (", ".join(sqlgen.ATTR_COLUMNS), in_scope, attrs, vocab, in_scope, len(args) + 1),
            types + ["int4"]), args + [mid])
        version = None
        if check_relation(plpy, vocab_schema, "vocabulary", allow_any, required=False):
            rows = plpy.execute("SELECT vocabulary_version FROM %s.vocabulary "
                                "WHERE vocabulary_id = 'None'" % vocab)
            version = rows[0]["vocabulary_version"] if rows else None
        plpy.execute(plpy.prepare(
            "INSERT INTO omop_emb_internal.index_stage_run (model_id, vocabulary_schema, "
            "vocabulary_version, include_synonyms, include_mapped) VALUES ($1, $2, $3, $4, $5)",
            ["int4", "text", "text", "bool", "bool"]),
            [mid, vocab_schema, version, bool(include_synonyms), bool(include_mapped)])
        return [tuple(r.values()) for r in plpy.execute(plpy.prepare(
            "SELECT * FROM omop_emb_internal.index_prepare($1)", ["text"]), [name])]

    def index_prepare(self, plpy, model_name):
        """SECURITY DEFINER step of index_concepts: from this session's staging rows
        (never from a relation the caller named), queue the texts whose embedding is
        missing or stale, delete texts no longer asked for, refresh attributes."""
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        doc_prefix, _ = self.prefix(plpy, model, "document", st)
        qry_prefix, _ = self.prefix(plpy, model, "query", st)
        mid = int(model["model_id"])
        runs = plpy.execute(plpy.prepare(
            "DELETE FROM omop_emb_internal.index_stage_run WHERE %s RETURNING *" % MINE, []))
        run = [r for r in runs if r["model_id"] == mid]
        if len(run) != 1:
            raise InvalidArgument(
                "nothing was staged for model %s in this transaction" % model["name"],
                hint="Run CALL omop_emb.index_concepts(...); this step is internal.")
        run = run[0]
        _lock_model(plpy, mid)
        # $1: what goes before a text in the hash of what is sent (vectors.identity_hash).
        hashed_prefix = vectors.identity_salt(model["identity_version"]) + doc_prefix
        emb = sqlgen.table(mid)
        cols = ", ".join(sqlgen.ROW_COLUMNS)
        text_rows = "omop_emb_internal.index_stage_text d"
        concept_rows = "omop_emb_internal.index_stage_concept c"
        # Stale rows: the concept is in scope but this text is no longer asked for
        # (a renamed concept). Kinds not asked for in this run are left alone.
        kinds = ["name"] + (["synonym"] if run["include_synonyms"] else []) + \
            (["mapped"] if run["include_mapped"] else [])
        deleted = plpy.execute(
            "DELETE FROM %s e WHERE e.concept_id IN (SELECT c.concept_id FROM %s WHERE c.%s "
            "AND c.in_scope) AND e.text_kind = ANY(%s) AND NOT EXISTS (SELECT 1 FROM %s "
            "WHERE d.%s AND d.concept_id = e.concept_id AND d.text_kind = e.text_kind "
            "AND d.text = e.text)"
            % (emb, concept_rows, MINE, "ARRAY[%s]" % ", ".join("'%s'" % k for k in kinds),
               text_rows, MINE)).nrows()
        # Concepts that left the vocabulary entirely go too (every embedded concept
        # still in the vocabulary was staged); attributes that changed (deprecated,
        # re-domained) are refreshed without re-embedding.
        deleted += plpy.execute(
            "DELETE FROM %s e WHERE NOT EXISTS (SELECT 1 FROM %s WHERE c.%s "
            "AND c.concept_id = e.concept_id)" % (emb, concept_rows, MINE)).nrows()
        plpy.execute(
            "UPDATE %s e SET concept_name = c.concept_name, domain_id = c.domain_id, "
            "vocabulary_id = c.vocabulary_id, concept_class_id = c.concept_class_id, "
            "standard_concept = c.standard_concept, invalid_reason = c.invalid_reason "
            "FROM %s WHERE c.%s AND c.concept_id = e.concept_id AND "
            "(e.concept_name, e.domain_id, e.vocabulary_id, e.concept_class_id, "
            "e.standard_concept, e.invalid_reason) IS DISTINCT FROM (c.concept_name, c.domain_id, "
            "c.vocabulary_id, c.concept_class_id, c.standard_concept, c.invalid_reason)"
            % (emb, concept_rows, MINE))
        queue_sql = (
            "INSERT INTO omop_emb.index_queue (model_id, %s) "
            "SELECT %d, d.concept_id, d.text_kind, d.text, "
            "sha256(convert_to($1 || d.text, 'UTF8')), d.source_concept_id, d.source_code, "
            "d.concept_name, d.domain_id, d.vocabulary_id, d.concept_class_id, "
            "d.standard_concept, d.invalid_reason FROM %s WHERE d.%s AND NOT EXISTS "
            "(SELECT 1 FROM %s e "
            "WHERE e.concept_id = d.concept_id AND e.text_kind = d.text_kind AND e.text = d.text "
            "AND e.text_hash = sha256(convert_to($1 || d.text, 'UTF8')))"
            % (cols, mid, text_rows, MINE, emb))
        on_conflict = (
            " ON CONFLICT (model_id, concept_id, text_kind, text) DO UPDATE SET "
            "text_hash = EXCLUDED.text_hash "
            # Rows already queued unchanged are left alone: rewriting them would
            # lock rows another session is claiming.
            "WHERE omop_emb.index_queue.text_hash IS DISTINCT FROM EXCLUDED.text_hash")
        queued = None
        if not plpy.execute(plpy.prepare(QUEUE_LEFT_SQL, ["int4"]), [mid])[0]["any"]:
            # Nothing queued for the model (a first indexing, or the run after a
            # completed one): a plain INSERT, which does not look for a conflict row
            # by row (at 100,000 texts 0.4-0.5 s against 0.8-1.0 s). The staged texts
            # are distinct and preparations of a model hold its lock; a bundle import
            # queueing texts of the same model meanwhile makes it fall back.
            try:
                with plpy.subtransaction():
                    queued = plpy.execute(plpy.prepare(queue_sql, ["text"]),
                                          [hashed_prefix]).nrows()
            except plpy.SPIError as e:
                if getattr(e, "sqlstate", None) != "23505":
                    raise
        if queued is None:
            queued = plpy.execute(plpy.prepare(queue_sql + on_conflict, ["text"]),
                                  [hashed_prefix]).nrows()
        total = plpy.execute("DELETE FROM omop_emb_internal.index_stage_text WHERE %s" % MINE).nrows()
        plpy.execute("DELETE FROM omop_emb_internal.index_stage_concept WHERE %s" % MINE)
        if model["vectors_stale"]:
            # What produces the vectors changed: every row made before is queued
            # again, in the scope of this run or not, so that no vector of the old
            # model stays.
            queued += plpy.execute(plpy.prepare(
                "INSERT INTO omop_emb.index_queue (model_id, %s) "
                "SELECT $1, e.concept_id, e.text_kind, e.text, "
                "pg_catalog.sha256(pg_catalog.convert_to($2 || e.text, 'UTF8')), e.source_concept_id, e.source_code, "
                "e.concept_name, e.domain_id, e.vocabulary_id, e.concept_class_id, "
                "e.standard_concept, e.invalid_reason FROM %s e "
                "WHERE e.text_hash <> pg_catalog.sha256(pg_catalog.convert_to($2 || e.text, 'UTF8')) "
                "ON CONFLICT (model_id, concept_id, text_kind, text) DO NOTHING"
                % (cols, emb), ["int4", "text"]), [mid, hashed_prefix]).nrows()
        plpy.execute(plpy.prepare(
            "UPDATE omop_emb.model SET document_prefix = $2, query_prefix = $3, "
            "vocabulary_schema = $4, vocabulary_version = coalesce($5, vocabulary_version), "
            "indexed_at = now(), updated_at = now() WHERE model_id = $1",
            ["int4", "text", "text", "text", "text"]),
            [mid, doc_prefix, qry_prefix, run["vocabulary_schema"], run["vocabulary_version"]])
        plpy.execute(plpy.prepare(
            "DELETE FROM omop_emb.index_progress p WHERE p.model_id = $1 AND (p.pid = "
            "pg_backend_pid() OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = p.pid))",
            ["int4"]), [mid])
        plpy.execute(plpy.prepare(
            "INSERT INTO omop_emb.index_progress (model_id, pid, done, started_at, updated_at) "
            "VALUES ($1, pg_backend_pid(), 0, clock_timestamp(), clock_timestamp())", ["int4"]),
            [mid])
        pending = plpy.execute(plpy.prepare(
            "SELECT count(*) AS n FROM omop_emb.index_queue WHERE model_id = $1", ["int4"]),
            [mid])[0]["n"]
        if pending >= DEFER_INDEXES_MIN_TEXTS and not plpy.execute(
                "SELECT EXISTS (SELECT 1 FROM %s) AS any" % emb)[0]["any"]:
            # A first indexing: loaded without the secondary indexes, which
            # index_finish builds once over all rows.
            present = _present_indexes(plpy, [n for n, _ in sqlgen.secondary_indexes(mid)])
            _with_short_locks(plpy, ["DROP INDEX omop_emb.%s" % n for n in present])
        return [(model["name"], total, queued, pending, deleted)]

    def index_batch(self, plpy, model_name, batch_size):
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        mid = model["model_id"]
        chunk = max(1, int(model["batch_size"]))
        size = int(batch_size or max(TEXTS_PER_TRANSACTION, PIPELINE_REQUESTS * chunk))
        if not 1 <= size <= 100000:
            raise InvalidArgument("batch_size = %d is outside 1..100000" % size)
        claim = self.plan(plpy, ("claim", mid), sqlgen.claim(mid), ["int4", "int4"])
        while True:
            # The first chunk alone: the server embeds it while the rest is claimed.
            claimed = claim.execute([mid, min(size, chunk)])
            rows = [r for r in claimed if r["stored_hash"] != r["text_hash"]]
            if rows or claimed.nrows() == 0:
                break
            # Only texts embedded meanwhile (a session that prepared while this one
            # embedded queued them again): they are off the queue now; take more.
        if not rows:
            # Claimed nothing: either the queue is empty or all of it is locked by
            # other sessions; tell the caller which.
            left = self.plan(plpy, "queue_left", "SELECT EXISTS (SELECT 1 FROM omop_emb.index_queue "
                             "WHERE model_id = $1) AS any", ["int4"]).execute([mid])[0]["any"]
            return -1 if left else 0
        doc_prefix, _ = self.prefix(plpy, model, "document", st)
        # halfvec's binary form holds float16: those models keep the text path.
        binary = model["storage"] == "vector" and \
            self.plan(plpy, "copy_binary_ok", COPY_BINARY_OK_SQL).execute([])[0]["ok"]
        key = self.api_key(plpy, model)

        def embed(texts):  # in a thread of the pipeline: no plpy here
            return self.http.embed(model, [doc_prefix + t for t in texts], key,
                                   sql_text=not binary, binary=binary)

        with http_client.EmbeddingPipeline(self.http, embed, PIPELINE_REQUESTS) as pipeline:
            jobs = [pipeline.submit([r["text"] for r in rows])]
            if claimed.nrows() < size:
                more = [r for r in claim.execute([mid, size - claimed.nrows()])
                        if r["stored_hash"] != r["text_hash"]]
                for j in range(0, len(more), chunk):
                    jobs.append(pipeline.submit([r["text"] for r in more[j:j + chunk]]))
                rows += more
            vecs = []
            for job in jobs:
                vecs.extend(pipeline.result(job))
        self._notice_request_cap(plpy, model, chunk)
        # One COPY per batch: the backend holds Python's lock while it runs SQL, so
        # a COPY between chunks would stall the threads reading the next answers.
        self._store_rows(plpy, model, rows, vecs, doc_prefix, binary)
        n = len(rows)
        self.plan(plpy, "progress",
                  "UPDATE omop_emb.index_progress SET done = done + $2, "
                  "updated_at = clock_timestamp() WHERE model_id = $1 AND pid = pg_backend_pid()",
                  ["int4", "int8"]).execute([mid, n])
        return n

    def _notice_request_cap(self, plpy, model, chunk):
        """Say once per session and server when a server refused the model's
        batch_size texts per request and indexing sends fewer (http_client.post_fitting)."""
        if not self.http.request_cap:  # (every batch: nothing to do unless a server refused)
            return
        for server in providers.split_endpoints(model["endpoint"]):
            cap = self.http.request_cap.get(server)
            key = ("request_cap", model["name"], server, cap)
            if cap and cap < chunk and key not in self.warned:
                self.warned.add(key)
                plpy.notice(
                    "omop_emb: %s refused %d texts per request (HTTP 413) and took %d: "
                    "model %s sends it at most %d per request from now on in this session. "
                    "To skip the refused requests in every new session: "
                    "SELECT omop_emb.alter_model(%s, batch_size => %d)"
                    % (server, chunk, cap, model["name"], cap,
                       plpy.quote_literal(model["name"]), cap))

    def _store_rows(self, plpy, model, rows, vecs, doc_prefix, binary):
        mid = model["model_id"]
        cols = [[r[c] for r in rows] for c in sqlgen.ROW_COLUMNS]
        # What was really sent, by the model as this batch read it: when alter_model()
        # commits meanwhile, these rows keep the old identity and are re-embedded.
        cols[3] = [vectors.identity_hash(doc_prefix + r["text"], model["identity_version"])
                   for r in rows]
        if binary:
            self._copy_rows(plpy, mid, rows, cols + [vecs])
        else:
            sql, types = sqlgen.upsert(model)
            self.plan(plpy, ("upsert", mid), sql, types).execute(cols + [vecs])

    def _copy_rows(self, plpy, mid, rows, columns):
        """Store a batch with a binary COPY (vectors in pgvector's binary form,
        neither formatted nor parsed as text), after deleting the rows it replaces.
        A row of the same key inserted meanwhile by someone else makes the COPY fail
        with unique_violation; index_concepts then retries the batch."""
        replaced = [r for r in rows if r["stored_hash"] is not None]
        if replaced:
            self.plan(plpy, ("delete_keys", mid), sqlgen.delete_keys(mid),
                      ["int4[]", "text[]", "text[]"]).execute(
                [[r["concept_id"] for r in replaced], [r["text_kind"] for r in replaced],
                 [r["text"] for r in replaced]])
        path = copy_binary.spool_path()
        copy_binary.write_spool(path, copy_binary.encode(columns, sqlgen.COPY_KINDS))
        try:
            plpy.execute(sqlgen.copy_from(mid, plpy.quote_literal(path)))
        finally:
            copy_binary.remove_spool(path)

    def create_index(self, plpy, model_name, method, m, ef_construction, metric):
        from .registry import check_metric
        model = self.model(plpy, model_name)
        # The defaults are those of the SQL signature (sql/api/40_index.sql) only.
        for arg, value in (("method", method), ("m", m), ("ef_construction", ef_construction)):
            if value is None:
                raise InvalidArgument("%s must not be NULL" % arg,
                                      hint="Leave %s out to get its default (\\df omop_emb.create_index)."
                                           % arg)
        method = method.strip().lower()
        if method not in ("hnsw", "none"):
            raise InvalidArgument("unknown index method %r" % method,
                                  hint="Use 'hnsw' (approximate, fast) or 'none' (exact search).")
        metric = check_metric(metric or model["metric"])
        m, ef_construction = int(m), int(ef_construction)
        if not 2 <= m <= 100:
            raise InvalidArgument("m = %d is outside 2..100" % m)
        if not 4 <= ef_construction <= 1000 or ef_construction < 2 * m:
            raise InvalidArgument("ef_construction = %d must be in 4..1000 and at least 2 * m"
                                  % ef_construction)
        mid = model["model_id"]
        _lock_model(plpy, mid)
        name = sqlgen.hnsw_index_name(mid)
        ensure_secondary_indexes(plpy, mid)
        params = {}
        if method == "hnsw":
            # Built beside the old index, under another name: CREATE INDEX takes a
            # SHARE lock, which holds writers of this model (index_concepts) back
            # but not searches, which keep using the old index meanwhile. (CREATE
            # INDEX CONCURRENTLY cannot run in a function, nor in a procedure.)
            model["metric"] = metric
            plpy.execute("DROP INDEX IF EXISTS omop_emb.%s_new" % name)
            plpy.execute(sqlgen.create_hnsw(model, metric, m, ef_construction,
                                            name=name + "_new"))
            params = {"m": m, "ef_construction": ef_construction}
        # The swap takes an ACCESS EXCLUSIVE lock for a moment: each try waits at
        # most SWAP_LOCK_TIMEOUT for searches running now (while a lock request
        # waits, searches that start queue behind it), between tries they run.
        present = plpy.execute("SELECT pg_catalog.to_regclass('omop_emb.%s') IS NOT NULL AS present"
                               % name)[0]["present"]
        swap = (["DROP INDEX omop_emb.%s" % name] if present else []) + \
            (["ALTER INDEX omop_emb.%s_new RENAME TO %s" % (name, name)] if method == "hnsw" else [])
        _with_short_locks(plpy, swap)
        if method == "hnsw":
            params.update(_calibrate_ef_search(plpy, model, metric,
                                               embed_queries=self._query_embedder(plpy, model)))
        plpy.execute(plpy.prepare(
            "UPDATE omop_emb.model SET index_method = $2, index_params = $3::jsonb, metric = $4, "
            "generation = pg_catalog.nextval('omop_emb.model_generation_seq'), "
            "updated_at = now() WHERE model_id = $1", ["int4", "text", "text", "text"]),
            [mid, method, json.dumps(params), metric])
        # Plans were prepared for the old metric (other sessions see the generation).
        self.forget_model(mid)
        return method

    def _query_embedder(self, plpy, model):
        """What a calibration embeds the model's own texts with (query role, no cache):
        texts -> vectors in text form, or None when the server cannot embed them now
        (said in a NOTICE: the calibration then takes stored vectors). None when the
        setting omop_emb.calibration_embeds is off."""
        from .runtime import TRUE_WORDS
        on = plpy.execute("SELECT pg_catalog.current_setting('omop_emb.calibration_embeds', true) AS v")[0]["v"]
        if on and on.strip().lower() not in TRUE_WORDS:
            return None
        st = self.settings(plpy)

        def embed(texts):
            try:
                with plpy.subtransaction():
                    return self.embed_texts(plpy, model, "query", texts, st, use_cache=False)
            except Exception as e:  # the build stands; only its calibration is less exact
                plpy.notice("omop_emb: could not embed %d texts of model %r in the query role to calibrate "
                            "its index (%s); calibrating on its stored vectors, which flatter the index: "
                            "run omop_emb.calibrate_index(%s) once the server answers or users have searched"
                            % (len(texts), model["name"], str(e).splitlines()[0][:200],
                               plpy.quote_literal(model["name"])))
                return None
        return embed

    def calibrate_index(self, plpy, model_name, queries):
        """Measure the HNSW index's ef_search again (create_index's calibration) on the
        real queries cached since; returns the new index_params."""
        model = self.model(plpy, model_name)
        if queries is None or not CALIBRATION_QUERIES <= queries <= MAX_CALIBRATION_QUERIES:
            raise InvalidArgument(
                "queries = %s is outside %d..%d" % (queries, CALIBRATION_QUERIES, MAX_CALIBRATION_QUERIES),
                hint="Each query costs one exact scan of the table; the default is %d." % RECALIBRATION_QUERIES)
        if model["index_method"] != "hnsw":
            raise InvalidArgument(
                "model %r has no HNSW index to calibrate (index method: %s)"
                % (model["name"], model["index_method"] or "none"),
                hint="Build one first: SELECT omop_emb.create_index(%s);" % plpy.quote_literal(model["name"]))
        mid = model["model_id"]
        _lock_model(plpy, mid)
        params = json.loads(plpy.execute(plpy.prepare(
            "SELECT index_params::pg_catalog.text AS p FROM omop_emb.model WHERE model_id = $1",
            ["int4"]), [mid])[0]["p"] or "{}")
        found = _calibrate_ef_search(plpy, model, model["metric"], queries,
                                     embed_queries=self._query_embedder(plpy, model))
        if not found:
            plpy.notice("omop_emb: model %r holds fewer vectors than the %d queries need: its index_params "
                        "stay as they are (a table this small is searched about exactly at any ef_search)"
                        % (model["name"], queries))
            return json.dumps(params)
        params.update(found)
        plpy.execute(plpy.prepare(
            "UPDATE omop_emb.model SET index_params = $2::jsonb, "
            "generation = pg_catalog.nextval('omop_emb.model_generation_seq'), "
            "updated_at = now() WHERE model_id = $1", ["int4", "text"]), [mid, json.dumps(params)])
        self.forget_model(mid)
        return json.dumps(params)

    def index_build_next(self, plpy, model_name):
        """Build one secondary index the model's table lacks that no other session is
        building, and return its name; None when none is left to this session (all
        present or being built, or texts are still queued while other sessions index:
        they build at their end). index_concepts calls it until None, committing after
        each, before index_finish; a second connection may call it meanwhile (the CLI
        does) to build beside it. One index per transaction: a session holds the
        table's SHARE lock only while it builds, so that ANALYZE (index_finish) never
        waits for a session that waits for it."""
        model = self.model(plpy, model_name)
        mid = model["model_id"]
        wanted = sqlgen.secondary_indexes(mid)
        present = set(_present_indexes(plpy, [n for n, _ in wanted]))
        missing = [(i, name, ddl) for i, (name, ddl) in enumerate(wanted) if name not in present]
        if not missing:
            return None
        if plpy.execute(plpy.prepare(OTHERS_INDEXING_SQL, ["int4"]), [mid])[0]["busy"] and \
                plpy.execute(plpy.prepare(QUEUE_LEFT_SQL, ["int4"]), [mid])[0]["any"]:
            return None
        # A session preparing the model (under its lock) may queue texts or rewrite
        # rows yet, which the indexes would then slow down: leave the builds to the
        # end of the sessions. Only a look: the lock is released at once.
        if not plpy.execute(plpy.prepare(
                "SELECT pg_catalog.pg_try_advisory_lock($1, $2) AND "
                "pg_catalog.pg_advisory_unlock($1, $2) AS free", ["int4", "int4"]),
                [MODEL_LOCK_CLASS, mid])[0]["free"]:
            return None
        lock = plpy.prepare("SELECT pg_catalog.pg_try_advisory_xact_lock($1, $2) AS got",
                            ["int4", "int4"])
        missing.sort(key=lambda m: BUILD_ORDER.get(m[1].rsplit("_", 1)[-1], len(BUILD_ORDER)))
        for i, name, ddl in missing:
            if not lock.execute([INDEX_BUILD_LOCK_CLASS, mid * 32 + i])[0]["got"]:
                continue  # another session is building it
            if _present_indexes(plpy, [name]):
                continue  # built and committed by another session since the look above
            plpy.execute(ddl)
            return name
        return None

    def secondary_index_names(self, plpy, model_name):
        """The names of the indexes index_build_next builds (sqlgen.secondary_indexes)."""
        return [n for n, _ in sqlgen.secondary_indexes(self.model(plpy, model_name)["model_id"])]

    def index_finish(self, plpy, model_name):
        """Refresh planner statistics so that searches plan on the real row count."""
        model = self.model(plpy, model_name)
        _lock_model(plpy, model["model_id"])
        if not plpy.execute(plpy.prepare(OTHERS_INDEXING_SQL, ["int4"]),
                            [model["model_id"]])[0]["busy"]:
            # The last session of a first indexing builds what index_prepare left out
            # (a session that failed left them to the next run).
            ensure_secondary_indexes(plpy, model["model_id"])
        plpy.execute("ANALYZE %s" % sqlgen.table(model["model_id"]))
        if model["vectors_stale"]:
            # Searchable again once no row made before the change is left.
            plpy.execute(plpy.prepare(
                "UPDATE omop_emb.model m SET vectors_stale = false, generation = "
                "pg_catalog.nextval('omop_emb.model_generation_seq') WHERE m.model_id = $1 AND "
                "NOT EXISTS (SELECT 1 FROM %s e WHERE e.text_hash <> "
                "pg_catalog.sha256(pg_catalog.convert_to($2 || e.text, 'UTF8')))" % sqlgen.table(model["model_id"]),
                ["int4", "text"]),
                [model["model_id"], vectors.identity_salt(model["identity_version"])
                 + model["document_prefix"]])
        plpy.execute(plpy.prepare(
            "UPDATE omop_emb.index_progress SET finished_at = clock_timestamp() "
            "WHERE model_id = $1 AND pid = pg_backend_pid()", ["int4"]), [model["model_id"]])
        return True

    def upsert_concept_texts(self, plpy, concept_ids, texts, model_name):
        """SECURITY INVOKER: reads the attributes of the concepts from the vocabulary
        the model was indexed from, with the caller's rights, and hands them as
        values to upsert_concept_texts_store (SECURITY DEFINER)."""
        if not _check_upsert_args(concept_ids, texts):
            return 0
        _, name, schema = plpy.execute(plpy.prepare(
            "SELECT * FROM omop_emb_internal.index_model($1)", ["text"]), [model_name])[0].values()
        attrs = {}
        if schema and check_relation(plpy, schema, "concept", False, required=False,
                                     what="upsert_concept_texts"):
            for r in plpy.execute(plpy.prepare(
                    "SELECT concept_id, concept_code, domain_id, vocabulary_id, concept_class_id, "
                    "standard_concept, invalid_reason FROM %s.concept WHERE concept_id = ANY($1)"
                    % plpy.quote_ident(schema), ["int4[]"]), [list(concept_ids)]):
                attrs[str(r["concept_id"])] = dict(r)
        return plpy.execute(plpy.prepare(
            "SELECT omop_emb_internal.upsert_concept_texts_store($1, $2, $3, $4) AS n",
            ["int4[]", "text[]", "text", "text"]),
            [list(concept_ids), list(texts), name, json.dumps(attrs)])[0]["n"]

    def upsert_concept_texts_store(self, plpy, concept_ids, texts, model_name, attrs_json):
        """Embed (DOCUMENT role) and store one name per concept, replacing the
        concept's previous name rows. Attributes (``attrs_json``: {concept id:
        row of the vocabulary}) when the vocabulary has the concept; otherwise the
        text is the name and the concept counts as standard and valid."""
        if not _check_upsert_args(concept_ids, texts):
            return 0
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        mid = model["model_id"]
        vecs = self.embed_texts(plpy, model, "document", list(texts), st, use_cache=False)
        doc_prefix, _ = self.prefix(plpy, model, "document", st)
        attrs = {int(k): v for k, v in json.loads(attrs_json or '{}').items()}
        plpy.execute(plpy.prepare(
            "DELETE FROM %s WHERE concept_id = ANY($1) AND text_kind = 'name'" % sqlgen.table(mid),
            ["int4[]"]), [list(concept_ids)])
        cols = {c: [] for c in sqlgen.ROW_COLUMNS}
        for cid, t in zip(concept_ids, texts):
            a = attrs.get(cid) or {}
            row = {"concept_id": cid, "text_kind": "name", "text": t,
                   "text_hash": vectors.identity_hash(doc_prefix + t, model["identity_version"]),
                   "source_concept_id": cid,
                   "source_code": a.get("concept_code"), "concept_name": t,
                   "domain_id": a.get("domain_id"), "vocabulary_id": a.get("vocabulary_id"),
                   "concept_class_id": a.get("concept_class_id"),
                   "standard_concept": a.get("standard_concept", "S") if a else "S",
                   "invalid_reason": a.get("invalid_reason")}
            for c in sqlgen.ROW_COLUMNS:
                cols[c].append(row[c])
        sql, types = sqlgen.upsert(model)
        self.plan(plpy, ("upsert", mid), sql, types).execute(
            [cols[c] for c in sqlgen.ROW_COLUMNS] + [vecs])
        return len(concept_ids)

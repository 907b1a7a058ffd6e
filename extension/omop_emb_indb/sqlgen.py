"""SQL text generated per model: embedding tables, indexes and search queries.

Only integers (model ids, dimensions) and fixed keywords are interpolated;
every user value travels as a query parameter. Identifiers that come from
users (the vocabulary schema) are quoted by the caller with
``plpy.quote_ident``.
"""

import re

METRIC_OPS = {
    # metric: (operator, opclass suffix)
    "cosine": ("<=>", "cosine_ops"),
    "l2": ("<->", "l2_ops"),
    "ip": ("<#>", "ip_ops"),
}

# The attributes of the standard concept a text stands for, stored beside the
# vector so that filtered index scans need no join.
ATTR_COLUMNS = ("concept_name", "domain_id", "vocabulary_id", "concept_class_id",
                "standard_concept", "invalid_reason")

ROW_COLUMNS = ("concept_id", "text_kind", "text", "text_hash", "source_concept_id",
               "source_code") + ATTR_COLUMNS

MAX_VECTOR_DIMS = 2000    # pgvector's HNSW limit for vector
MAX_HALFVEC_DIMS = 4000   # and for halfvec


# pgvector's and pg_trgm's schemas, read once per session (Runtime.call). Every
# type, operator, operator class and function of theirs is written qualified with
# them: a SECURITY DEFINER function runs with search_path = pg_catalog, pg_temp,
# where their objects are not found, and where nothing a user created (in public,
# say) can stand in for them.
VECTOR_SCHEMA = "public"
TRGM_SCHEMA = "public"

EXTENSION_SCHEMAS_SQL = ("SELECT e.extname, n.nspname FROM pg_catalog.pg_extension e "
                         "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
                         "WHERE e.extname IN ('vector', 'pg_trgm')")


def _quoted_schema(name):
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else '"%s"' % name.replace('"', '""')


def set_extension_schemas(rows):
    """Record the schemas of EXTENSION_SCHEMAS_SQL's rows (an extension not installed
    keeps its default)."""
    global VECTOR_SCHEMA, TRGM_SCHEMA
    for r in rows:
        if r["extname"] == "vector":
            VECTOR_SCHEMA = _quoted_schema(r["nspname"])
        else:
            TRGM_SCHEMA = _quoted_schema(r["nspname"])


def trgm(function):
    """A pg_trgm function, schema-qualified: ``public.similarity``."""
    return "%s.%s" % (TRGM_SCHEMA, function)


def trgm_op():
    """pg_trgm's similarity operator, schema-qualified: ``OPERATOR(public.%)``."""
    return "OPERATOR(%s.%%)" % TRGM_SCHEMA


def op(metric):
    """The distance operator of a metric, schema-qualified: ``OPERATOR(public.<=>)``."""
    return "OPERATOR(%s.%s)" % (VECTOR_SCHEMA, METRIC_OPS[metric][0])


def vector_base_type(storage):
    """``public.vector`` or ``public.halfvec``."""
    return "%s.%s" % (VECTOR_SCHEMA, storage)


STORAGES = {"vector": MAX_VECTOR_DIMS, "halfvec": MAX_HALFVEC_DIMS}


def storage_for(dimensions):
    """The default storage: ``vector`` (float32) where HNSW can index it, else
    ``halfvec`` (float16, half the size)."""
    return "vector" if dimensions <= MAX_VECTOR_DIMS else "halfvec"


def alter_storage(model, storage):
    """Convert a model's embedding column in place to ``storage`` (its HNSW index,
    built for the old type, is dropped first and rebuilt by the caller)."""
    t = table(model["model_id"])
    target = "%s(%d)" % (vector_base_type(storage), int(model["dimensions"]))
    return ("ALTER TABLE %s ALTER COLUMN embedding TYPE %s USING embedding::%s"
            % (t, target, target))


def table(model_id):
    return "omop_emb.embedding_%d" % int(model_id)


def vector_type(model):
    return "%s(%d)" % (vector_base_type(model["storage"]), int(model["dimensions"]))


def create_table(model):
    t = table(model["model_id"])
    mid = int(model["model_id"])
    return [
        """CREATE TABLE %s (
    concept_id integer NOT NULL,
    text_kind text NOT NULL CHECK (text_kind IN ('name', 'synonym', 'mapped')),
    text text NOT NULL,
    text_hash bytea NOT NULL,
    source_concept_id integer NOT NULL,
    source_code text,
    concept_name text NOT NULL,
    domain_id text,
    vocabulary_id text,
    concept_class_id text,
    standard_concept text,
    invalid_reason text,
    embedding %s NOT NULL,
    embedded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (concept_id, text_kind, text)
)""" % (t, vector_type(model)),
    ] + [ddl for _, ddl in secondary_indexes(mid)] + [
        "COMMENT ON TABLE %s IS 'omop_emb: embeddings of model %d (one row per concept text)'"
        % (t, mid),
    ]


def secondary_indexes(model_id):
    """(name, DDL) of the indexes of an embedding table besides its primary key and
    its vector index. A first indexing of many texts builds them once at its end
    (IndexingMixin.index_prepare / index_finish)."""
    from . import lexical  # loaded after this module (build.py MODULES)

    mid = int(model_id)
    t = table(mid)
    trgm_ddl, initials_ddl = ranking_index_statements(mid)
    return [
        # Exact-match lookups (case and whitespace folded) and code lookups.
        ("embedding_%d_fold" % mid,
         "CREATE INDEX embedding_%d_fold ON %s (omop_emb.fold_text(text))" % (mid, t)),
        ("embedding_%d_code" % mid,
         "CREATE INDEX embedding_%d_code ON %s (lower(source_code))" % (mid, t)),
        # Selective filters fall back to an exact scan driven by these.
        ("embedding_%d_vocabulary" % mid,
         "CREATE INDEX embedding_%d_vocabulary ON %s (vocabulary_id)" % (mid, t)),
        ("embedding_%d_domain" % mid,
         "CREATE INDEX embedding_%d_domain ON %s (domain_id)" % (mid, t)),
        ("embedding_%d_class" % mid,
         "CREATE INDEX embedding_%d_class ON %s (concept_class_id)" % (mid, t)),
        # Lexical side of hybrid search (omop_emb_indb.lexical).
        ("embedding_%d_fts" % mid, lexical.index_statement(mid)),
        # Candidate sources of the fused ranking.
        ("embedding_%d_trgm" % mid, trgm_ddl),
        ("embedding_%d_initials" % mid, initials_ddl),
    ]


def ranking_index_statements(model_id):
    """The indexes of the fused ranking's candidate sources: character trigrams
    (pg_trgm GIN) and word initials (btree on omop_emb.initials(text))."""
    mid = int(model_id)
    return [
        "CREATE INDEX embedding_%d_trgm ON %s USING gin (text %s)" % (mid, table(mid), trgm("gin_trgm_ops")),
        "CREATE INDEX embedding_%d_initials ON %s (omop_emb.initials(text))" % (mid, table(mid)),
    ]


def hnsw_index_name(model_id):
    return "embedding_%d_hnsw" % int(model_id)


def create_hnsw(model, metric, m, ef_construction, name=None):
    _, suffix = METRIC_OPS[metric]
    return ("CREATE INDEX %s ON %s USING hnsw (embedding %s_%s) WITH (m = %d, ef_construction = %d)"
            % (name or hnsw_index_name(model["model_id"]), table(model["model_id"]),
               vector_base_type(model["storage"]), suffix, int(m), int(ef_construction)))


FILTERS = (
    ("domain_ids", "e.domain_id = ANY(${n}::text[])"),
    ("vocabulary_ids", "e.vocabulary_id = ANY(${n}::text[])"),
    ("concept_class_ids", "e.concept_class_id = ANY(${n}::text[])"),
)


def filter_clause(shape, first_param):
    """WHERE clause for a filter shape; returns (sql, names of array params)."""
    present, standard_only, include_invalid = shape
    conds, names = [], []
    n = first_param
    for (name, tmpl), on in zip(FILTERS, present):
        if on:
            conds.append(tmpl.replace("${n}", "$%d" % n))
            names.append(name)
            n += 1
    if standard_only:
        conds.append("e.standard_concept = 'S'")
    if not include_invalid:
        conds.append("e.invalid_reason IS NULL")
    return (" AND ".join(conds) if conds else "true"), names


SELECT_COLS = ("e.concept_id, e.concept_name, e.domain_id, e.vocabulary_id, e.concept_class_id, "
               "e.standard_concept, e.text_kind, e.text")


def search(model, shape, exact=False):
    """The k-NN query: ``ORDER BY embedding <op> $1 LIMIT $2`` so that the HNSW
    index is used, then re-sorted (iterative scans in relaxed order may return
    rows slightly out of order). With ``exact`` the ordering expression is
    wrapped so that no index can serve it: an exact scan over the filtered rows,
    the fallback for filters too selective for the graph.
    """
    dist = op(model["metric"])
    where, names = filter_clause(shape, 3)
    order = "e.embedding %s $1" % dist
    if exact:
        order = "(%s) + 0" % order
    sql = ("SELECT * FROM (SELECT %s, e.embedding %s $1 AS distance FROM %s e WHERE %s "
           "ORDER BY %s LIMIT $2) s ORDER BY distance"
           % (SELECT_COLS, dist, table(model["model_id"]), where, order))
    return sql, [vector_type(model), "int4"] + ["text[]"] * len(names), names


def exact_match(model, shape):
    """Rows whose text or source code equals the query ($2, unfolded), both folded
    by ``omop_emb.fold_text``, the one fold (its index serves the lookup), with
    their trigram similarity to the query (1 for the text itself)."""
    where, names = filter_clause(shape, 3)
    sql = ("SELECT %s, e.embedding %s $1 AS distance, %s(e.text, $2) AS trigram FROM %s e "
           "WHERE (omop_emb.fold_text(e.text) = omop_emb.fold_text($2) "
           "OR lower(e.source_code) = omop_emb.fold_text($2)) AND %s "
           "ORDER BY distance LIMIT 100"
           % (SELECT_COLS, op(model["metric"]), trgm("similarity"), table(model["model_id"]),
              where))
    return sql, [vector_type(model), "text"] + ["text[]"] * len(names), names


def fused_semantic(model, shape, exact=False):
    """The semantic source of the fused ranking: the k-NN query of ``search``
    ($1 vector, $2 limit, $3... filter arrays), each row with its trigram
    similarity to the query text (the last parameter)."""
    inner, types, names = search(model, shape, exact=exact)
    n = len(types) + 1
    sql = ("SELECT s.*, %s(s.text, $%d) AS trigram FROM (%s) s"
           % (trgm("similarity"), n, inner))
    return sql, types + ["text"], names


def _kept_rows(model, inner, trigram):
    """The rows of ``inner`` (SELECT_COLS and e.embedding, its LIMIT applied) with their
    distance to $1 and ``trigram``, computed for those rows only. The vector stays
    inside: returned, it would be converted to text and to a Python string for every row."""
    return ("SELECT %s, %s AS trigram, s.embedding %s $1 AS distance FROM (%s) s"
            % (SELECT_COLS.replace("e.", "s."), trigram, op(model["metric"]), inner))


def fused_trigram(model, shape):
    """Trigram candidates: texts whose pg_trgm similarity to $2 reaches the
    threshold (the % operator, GIN index), best first, at most $3, each with its
    distance to $1. Returns (sql, types, names)."""
    where, names = filter_clause(shape, 4)
    inner = ("SELECT %s, e.embedding, %s(e.text, $2) AS trigram FROM %s e WHERE e.text %s $2 AND %s "
             "ORDER BY trigram DESC, length(e.text) LIMIT $3"
             % (SELECT_COLS, trgm("similarity"), table(model["model_id"]), trgm_op(), where))
    return _kept_rows(model, inner, "s.trigram"), \
        [vector_type(model), "text", "int4"] + ["text[]"] * len(names), names


def fused_initials(model, shape):
    """Texts whose word initials are one of $2 (abbreviation-like query tokens),
    at most $3, each with its distance to $1 and trigram similarity to $4."""
    where, names = filter_clause(shape, 5)
    sql = ("SELECT %s, e.embedding %s $1 AS distance, %s(e.text, $4) AS trigram FROM %s e "
           "WHERE omop_emb.initials(e.text) = ANY($2) AND %s LIMIT $3"
           % (SELECT_COLS, op(model["metric"]), trgm("similarity"), table(model["model_id"]),
              where))
    return sql, [vector_type(model), "text[]", "int4", "text"] + ["text[]"] * len(names), names


def fused_abbreviation(model, shape):
    """Texts holding one of the abbreviation-like query tokens as a word ($2: the
    tokens joined by ' | ', plain letters and digits; full-text index), at most
    $3, shortest first, with distance to $1 and trigram similarity to $4."""
    where, names = filter_clause(shape, 5)
    # Distance and trigram similarity for the rows kept only: the texts holding a
    # token are all sorted by length first (1M realistic texts: 1,564 for 'ATRX', and
    # pg_trgm computing the query's trigrams again for each of them cost 34 ms).
    inner = ("SELECT %s, e.embedding FROM %s e WHERE pg_catalog.to_tsvector('english'::regconfig, e.text) "
             "OPERATOR(pg_catalog.@@) pg_catalog.to_tsquery('english'::regconfig, $2) AND %s "
             "ORDER BY length(e.text) LIMIT $3" % (SELECT_COLS, table(model["model_id"]), where))
    return _kept_rows(model, inner, "%s(s.text, $4)" % trgm("similarity")), \
        [vector_type(model), "text", "int4", "text"] + ["text[]"] * len(names), names


def claim(model_id):
    """Take up to $2 queued texts of model $1 off the queue (rows locked by other
    sessions are skipped) and return them, each with ``stored_hash``: the text hash
    of the row of that key in the embedding table, NULL when there is none. A
    queued text whose exact text is embedded already (another session queued it
    again meanwhile; the hash is salted with the model's identity version,
    vectors.identity_hash) has its own hash there. One index probe per text (a
    scalar subquery: a join may be planned as a scan of the whole table)."""
    return ("WITH claimed AS (DELETE FROM omop_emb.index_queue q WHERE q.ctid = ANY(ARRAY("
            "SELECT ctid FROM omop_emb.index_queue WHERE model_id = $1 "
            "ORDER BY concept_id, text_kind, text LIMIT $2 FOR UPDATE SKIP LOCKED)) "
            "RETURNING q.*) SELECT c.*, (SELECT e.text_hash FROM %s e "
            "WHERE e.concept_id = c.concept_id AND e.text_kind = c.text_kind AND e.text = c.text) "
            "AS stored_hash FROM claimed c" % table(model_id))


def delete_keys(model_id):
    """Delete the rows of keys ($1 concept ids, $2 kinds, $3 texts): those a
    batch replaces before copying the new rows in."""
    return ("DELETE FROM %s e USING unnest($1::int4[], $2::text[], $3::text[]) AS k(c, kind, t) "
            "WHERE e.concept_id = k.c AND e.text_kind = k.kind AND e.text = k.t" % table(model_id))


# The columns a batch copies in, and how copy_binary writes each (the last is the
# vector in pgvector's binary form).
COPY_COLUMNS = ROW_COLUMNS + ("embedding",)
COPY_KINDS = ("int4", "text", "text", "bytes", "int4") + ("text",) * (1 + len(ATTR_COLUMNS)) \
    + ("bytes",)


def copy_from(model_id, path_literal):
    """COPY of a batch's rows (copy_binary) from a file into the embedding table."""
    return ("COPY %s (%s) FROM %s WITH (FORMAT binary)"
            % (table(model_id), ", ".join(COPY_COLUMNS), path_literal))


def upsert(model):
    cols = ", ".join(ROW_COLUMNS) + ", embedding"
    types = ["int4[]", "text[]", "text[]", "bytea[]", "int4[]", "text[]"] + ["text[]"] * len(ATTR_COLUMNS)
    n = len(types) + 1
    unnest = ", ".join("$%d" % (i + 1) for i in range(len(types)))
    sets = ", ".join("%s = EXCLUDED.%s" % (c, c) for c in ROW_COLUMNS[3:] + ("embedding",))
    sql = ("INSERT INTO %s (%s) SELECT * FROM unnest(%s, $%d::%s[]) "
           "ON CONFLICT (concept_id, text_kind, text) DO UPDATE SET %s, embedded_at = now()"
           % (table(model["model_id"]), cols, unnest, n, vector_type(model), sets))
    return sql, types + ["text[]"]


def similarity_from_distance(metric, distance):
    """Similarity reported beside the distance.

    cosine: 1 - cosine distance (the cosine similarity, 1 = same direction);
    ip: the inner product (pgvector's <#> is its negative; equals cosine
    similarity for the unit vectors embedding servers return);
    l2: 1 / (1 + Euclidean distance), in (0, 1].
    """
    if distance is None:
        return None
    if metric == "cosine":
        return 1.0 - distance
    if metric == "ip":
        return -distance
    return 1.0 / (1.0 + distance)

"""The per-session runtime behind every SQL function of the extension.

One ``Runtime`` lives in ``GD["omop_emb"]`` for the life of a backend: it holds
the HTTP session, prepared plans, the small per-session query-embedding cache
and the set of warnings already given. ``plpy`` is passed in on each call so
that this module imports without PostgreSQL.
"""

import time
from collections import OrderedDict

from . import (companion_weights, drift, lexical, prefixes, ranking, ranking_weights, rerank as rerank_api, selectivity,
               sqlgen, suggest, vectors)
from .checks import (MAX_K, check_batch_size, check_filters, check_input_length, check_k,
                     int_setting, sql_array)
from .errors import InvalidArgument, ModelNotFound, NotIndexed, OmopEmbError
from .http_client import EmbeddingHTTP
from .indexing import IndexingMixin
from .registry import RegistryMixin

# Vectors are kept as pgvector text (~8 KB at 384 dimensions): 512 entries ~ 4 MB per backend.
SESSION_CACHE_SIZE = 512
# hnsw.ef_search when neither the setting omop_emb.ef_search nor the model's index
# (create_index records the smallest value reaching recall@10 0.98 on the model's own
# vectors: indexing.EF_LADDER) gives one. Measured at 1,000,000 x 384 uniform-random
# clusters, the hardest case (bench/results/efc128_1m): with ef_construction 128, ef_search
# 100 gives recall@10 0.973 unfiltered, 200 gives 0.9975 for +6 ms.
DEFAULT_EF_SEARCH = 200
# nearest_batch embeds and searches its queries this many at a time.
BATCH_CHUNK = 256

MODEL_COLUMNS = ("model_id, name, provider, endpoint, remote_model, dimensions, metric, "
                 "document_prefix, query_prefix, api_key_ref, batch_size, max_input_chars, "
                 "connect_timeout_s, read_timeout_s, max_retries, storage, index_method, "
                 "generation, identity_version, vectors_stale, ranking::text AS ranking, "
                 "vocabulary_schema, vocabulary_version, "
                 "pg_catalog.jsonb_extract_path_text(index_params, 'ef_search')::pg_catalog.int4 "
                 "AS index_ef_search")

def ef_search(st, model):
    """hnsw.ef_search of a search: the setting, else the model's calibrated value, else the default."""
    return st["ef_search"] or model.get("index_ef_search") or DEFAULT_EF_SEARCH


SETTINGS_SQL = """SELECT current_setting('omop_emb.model', true) AS model,
       current_setting('omop_emb.document_embedding_prefix', true) AS document,
       current_setting('omop_emb.query_embedding_prefix', true) AS query,
       current_setting('omop_emb.strict_prefixes', true) AS strict,
       current_setting('omop_emb.ef_search', true) AS ef_search,
       current_setting('omop_emb.exact_scan_rows', true) AS exact_scan_rows,
       current_setting('omop_emb.search_mode', true) AS search_mode,
       current_setting('omop_emb.reranker', true) AS reranker,
       current_setting('omop_emb.rerank', true) AS rerank,
       current_setting('transaction_read_only') = 'on' OR pg_is_in_recovery() AS read_only"""

TRUE_WORDS = ("on", "true", "yes", "1", "t", "y")


class Runtime(RegistryMixin, IndexingMixin):
    def __init__(self, version):
        self.version = version
        self.http = EmbeddingHTTP()
        self.plans = {}
        self.generations = {}  # model_id -> generation the plans and caches were made for
        self.warned = set()
        self.session_cache = OrderedDict()
        self.word_stats = {}  # model_id -> (read at, {lexeme: texts holding it})
        self.filter_stats = {}  # model_id -> (read at, selectivity.column_stats)
        self.known_values = {}  # (model_id, column) -> values the embedding table holds
        self._error_class = None
        self.scorers = {}  # (model_id, ranking json) -> ranking.Scorer
        self.rerank_cache = OrderedDict()  # (reranker_id, key hash) -> scores
        self.cache_hits = 0
        self.cache_misses = 0
        self._unflushed = [0, 0]  # hits, misses not yet written to cache_stats

    # -- plumbing ---------------------------------------------------------
    def plan(self, plpy, key, sql, types=()):
        # Kept with its SQL: a model altered by another session (its storage type,
        # its metric) generates other SQL, which is prepared anew.
        hit = self.plans.get(key)
        if hit is None or hit[0] != sql or hit[1] != tuple(types):
            hit = self.plans[key] = (sql, tuple(types), plpy.prepare(sql, list(types)))
        return hit[2]

    def call(self, plpy, name, *args):
        """Run method ``name``; turn our errors into PostgreSQL errors."""
        if self.http.interrupt is None:
            check = self.plan(plpy, "interrupt", "SELECT pg_catalog.pg_sleep(0)")
            self.http.interrupt = lambda: check.execute([])
            sqlgen.set_extension_schemas(plpy.execute(sqlgen.EXTENSION_SCHEMAS_SQL))
        try:
            return getattr(self, name)(plpy, *args)
        except OmopEmbError as e:
            raise self.pg_error(plpy, e) from None

    def pg_error(self, plpy, e):
        """The plpy.Error that PL/Python reports as ``omop_emb: <message>``, with
        SQLSTATE, detail, hint and (for a bad argument) the argument's name in the
        column field. PL/Python prefixes a message with its exception's module and
        class (``plpy.Error: ...``); this class is named after the extension."""
        if self._error_class is None:
            self._error_class = type("omop_emb", (plpy.Error,), {"__module__": "builtins"})
        exc = self._error_class(e.message)
        exc.sqlstate = e.sqlstate
        exc.detail = e.detail
        exc.hint = e.hint
        exc.column_name = getattr(e, "column", None)
        return exc

    def warn_once(self, plpy, key, msg, detail=None, hint=None):
        if key in self.warned:
            return
        self.warned.add(key)
        extra = {k: v for k, v in (("detail", detail), ("hint", hint)) if v is not None}
        plpy.warning(msg, **extra)

    def settings(self, plpy):
        row = self.plan(plpy, "settings", SETTINGS_SQL).execute([])[0]
        st = {
            "model": row["model"] or None,
            "strict": (row["strict"] or "").strip().lower() in TRUE_WORDS,
            "read_only": bool(row["read_only"]),
            "ef_search": int_setting(row["ef_search"], "omop_emb.ef_search", 1, MAX_K * 10),
            "exact_scan_rows": int_setting(row["exact_scan_rows"], "omop_emb.exact_scan_rows", 0,
                                           2 ** 31 - 1),
            "search_mode": row["search_mode"],
            "reranker": row["reranker"] or None,
            "rerank": (row["rerank"] or "").strip().lower() in TRUE_WORDS,
        }
        for role in prefixes.ROLES:
            # Custom settings cannot tell "set to ''" from "RESET" (placeholders are
            # not in pg_settings), so '' means unset: the model's recorded prefix
            # applies. A symmetric model is registered with empty prefixes.
            st[role] = row[role] or None
        return st

    # -- the model registry -------------------------------------------------
    def model(self, plpy, name, st=None):
        if name is None:
            st = st or self.settings(plpy)
            name = st["model"]
        if name is not None:
            rows = self.plan(plpy, "model_by_name",
                             "SELECT %s FROM omop_emb.model WHERE name = $1" % MODEL_COLUMNS,
                             ["text"]).execute([name])
            if rows:
                return self._current(rows[0])
            raise ModelNotFound("unknown model %r" % (name,),
                                detail="Registered models: %s" % self._model_names(plpy),
                                hint="Pick one of the registered models (SET omop_emb.model = "
                                     "'...'), or register it with omop_emb.register_model().")
        rows = self.plan(plpy, "models_all",
                         "SELECT %s FROM omop_emb.model ORDER BY name LIMIT 2" % MODEL_COLUMNS
                         ).execute([])
        if len(rows) == 1:
            return self._current(rows[0])
        if not rows:
            raise ModelNotFound(
                "no embedding model is registered",
                hint="An administrator registers one with SELECT omop_emb.register_model("
                     "'e5-small', 'openai', 'http://127.0.0.1:8765');")
        raise ModelNotFound("several models are registered and none is chosen",
                            detail="Registered models: %s" % self._model_names(plpy),
                            hint="SET omop_emb.model = '<name>', or pass model => '<name>'.")

    def _current(self, row):
        """The model row, after dropping what this session prepared or cached for
        an older generation of the model (another session ran create_index,
        alter_model, a re-index with another prefix, or dropped and registered it)."""
        model = dict(row)
        mid, gen = model["model_id"], model["generation"]
        if self.generations.get(mid, gen) != gen:
            self.forget_model(mid)
        self.generations[mid] = gen
        return model

    def forget_model(self, mid):
        """Drop the plans, cached query vectors and word statistics of a model."""
        self.plans = {k: v for k, v in self.plans.items()
                      if not (isinstance(k, tuple) and len(k) > 1 and k[1] == mid)}
        for key in [k for k in self.session_cache if k[0] == mid]:
            del self.session_cache[key]
        self.word_stats.pop(mid, None)
        self.filter_stats.pop(mid, None)
        self.generations.pop(mid, None)

    def _model_names(self, plpy):
        rows = plpy.execute("SELECT string_agg(name, ', ' ORDER BY name) AS n FROM omop_emb.model")
        return rows[0]["n"] or "(none)"

    # -- prefixes -----------------------------------------------------------
    def prefix(self, plpy, model, role, st):
        setting = st[role]
        recorded = model[role + "_prefix"]
        value, source = prefixes.resolve(role, setting, recorded)
        mismatch = prefixes.check_mismatch(role, model["name"], setting, recorded, st["strict"])
        if mismatch:
            self.warn_once(plpy, ("mismatch", model["model_id"], role, setting, recorded), *mismatch)
        if value == "":
            self.warn_once(plpy, ("empty", model["model_id"], role),
                           *prefixes.empty_prefix_warning(role, model["name"]))
        return value, source

    def embedding_role_prefixes(self, plpy, model_name):
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        out = []
        for role in prefixes.ROLES:
            value, source = self.prefix(plpy, model, role, st)
            out.append((role, value, source, st[role], model[role + "_prefix"]))
        return out

    # -- embedding ----------------------------------------------------------
    def embed_texts(self, plpy, model, role, texts, st, use_cache=True):
        """Vectors (pgvector text form) for ``texts``; None for NULL or blank.

        Cache order: this session's LRU, then the shared ``query_cache`` table,
        then one HTTP request per chunk of ``batch_size`` distinct texts.
        """
        role = prefixes.check_role(role)
        prefix, _ = self.prefix(plpy, model, role, st)
        mid = model["model_id"]
        # Cached vectors are those of this identity of the model (provider, remote
        # model, dimensions): never an older one's.
        ident = model["identity_version"]
        out = [None] * len(texts)
        todo = OrderedDict()  # sent text -> positions
        check_input_length(model, texts, prefix, role)
        for i, t in enumerate(texts):
            if t is None or not t.strip():
                continue
            sent = prefix + t
            hit = self.session_cache.get((mid, ident, role, sent)) if use_cache else None
            if hit is not None:
                self.session_cache.move_to_end((mid, ident, role, sent))
                out[i] = hit
                self.cache_hits += 1
                self._unflushed[0] += 1
            else:
                todo.setdefault(sent, []).append(i)
        if not todo:
            return out
        found = {}
        if use_cache:
            hashes = {vectors.identity_hash(s, ident): s for s in todo}
            rows = self.plan(plpy, "cache_get",
                             "SELECT text_hash, embedding::text AS v FROM omop_emb.query_cache "
                             "WHERE model_id = $1 AND role = $2 AND text_hash = ANY($3)",
                             ["int4", "text", "bytea[]"]).execute([mid, role, list(hashes)])
            for r in rows:
                found[hashes[bytes(r["text_hash"])]] = r["v"]
            self.cache_hits += len(found)
            self._unflushed[0] += len(found)
        missing = [s for s in todo if s not in found]
        if missing:
            key = self.api_key(plpy, model)
            size = max(1, int(model["batch_size"]))
            for j in range(0, len(missing), size):
                chunk = missing[j:j + size]
                vecs = self.http.embed(model, chunk, key, sql_text=True)
                for s, v in zip(chunk, vecs):
                    found[s] = v
            self.cache_misses += len(missing)
            self._unflushed[1] += len(missing)
            if use_cache and not st["read_only"]:
                self._cache_put(plpy, mid, ident, role, missing, found)
        for s, positions in todo.items():
            v = found[s]
            for i in positions:
                out[i] = v
            if use_cache:
                self.session_cache[(mid, ident, role, s)] = v
        while len(self.session_cache) > SESSION_CACHE_SIZE:
            self.session_cache.popitem(last=False)
        return out

    def _cache_put(self, plpy, mid, ident, role, sent_texts, found):
        """Write the new query vectors to the shared cache, never waiting for anyone.

        Written only on a miss, so that cached searches stay read-only: they run
        in READ ONLY transactions and on hot standbys. The INSERT runs in the
        caller's transaction: when another session inserted the same text and has
        not committed (a client idle in transaction), ON CONFLICT would wait for
        it. So it runs in a subtransaction with lock_timeout 1 ms (0 would mean
        no limit) and is skipped on a conflict: the other session's row serves
        the next search once it commits; this one already has its vector.
        """
        put = self.plan(plpy, "cache_put",
                        "INSERT INTO omop_emb.query_cache (model_id, role, text_hash, text, embedding) "
                        "SELECT $1, $2, h, t, v::%s FROM unnest($3::bytea[], $4::text[], $5::text[]) "
                        "AS u(h, t, v) ON CONFLICT DO NOTHING" % sqlgen.vector_base_type("vector"),
                        ["int4", "text", "bytea[]", "text[]", "text[]"])
        timeout = self.plan(plpy, "lock_timeout", "SELECT pg_catalog.current_setting('lock_timeout') "
                            "AS v, pg_catalog.set_config('lock_timeout', $1, true)", ["text"])
        before = timeout.execute(["1ms"])[0]["v"]
        try:
            with plpy.subtransaction():
                put.execute([mid, role, [vectors.identity_hash(s, ident) for s in sent_texts],
                             sent_texts, [found[s] for s in sent_texts]])
        except plpy.SPIError as e:
            if getattr(e, "sqlstate", None) != "55P03":  # lock_not_available
                raise
        finally:
            timeout.execute([before])
        hits, misses = self._unflushed
        self.plan(plpy, "stats_put",
                  "INSERT INTO omop_emb.cache_stats (model_id, hits, misses) VALUES ($1, $2, $3)",
                  ["int4", "int8", "int8"]).execute([mid, hits, misses])
        self._unflushed = [0, 0]

    def embed(self, plpy, text, role, model_name):
        prefixes.check_role(role)
        if text is None:
            return None
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        return self.embed_texts(plpy, model, role, [text], st)[0]

    def embed_batch(self, plpy, texts, role, model_name):
        prefixes.check_role(role)
        if texts is None:
            return None
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        return self.embed_texts(plpy, model, role, list(texts), st)

    def similarity(self, plpy, a, b, a_role, b_role, model_name):
        prefixes.check_role(a_role)
        prefixes.check_role(b_role)
        if a is None or b is None:
            return None
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        va = self.embed_texts(plpy, model, a_role, [a], st)[0]
        vb = self.embed_texts(plpy, model, b_role, [b], st)[0]
        if va is None or vb is None:
            return None
        return vectors.cosine(vectors.from_sql(va), vectors.from_sql(vb))

    # -- search -------------------------------------------------------------
    def nearest(self, plpy, query, k, domain_ids, vocabulary_ids, concept_class_ids,
                standard_only, include_invalid, model_name, mode=None, rerank=None):
        k = check_k(k)
        filters = check_filters(domain_ids, vocabulary_ids, concept_class_ids)
        st = self.settings(plpy)
        mode = lexical.check_mode(mode, st["search_mode"])
        if query is None:
            return []
        if not query.strip():
            plpy.warning("omop_emb: the query text is blank: no rows",
                         hint="Pass the words to search for; a NULL query gives no rows silently.")
            return []
        model = self.model(plpy, model_name, st)
        self.check_filter_values(plpy, model, filters)  # before the embedding call
        self.warn_drift_once(plpy, model)
        if mode == "lexical":
            # Lexical mode needs no embedding service: similarity/distance are NULL.
            check_input_length(model, [query])
            vec = None
        else:
            self.check_vectors_current(model)
            vec = self.embed_texts(plpy, model, "query", [query], st)[0]
        return self.search(plpy, model, st, vec, k, filters, standard_only, include_invalid,
                           query_text=query, mode=mode, rerank=rerank)

    def nearest_vector(self, plpy, vec, k, domain_ids, vocabulary_ids, concept_class_ids,
                       standard_only, include_invalid, model_name, mode=None, rerank=None):
        k = check_k(k)
        filters = check_filters(domain_ids, vocabulary_ids, concept_class_ids)
        if rerank:
            raise InvalidArgument("a query vector cannot be reranked: the reranker reads the "
                                  "query text",
                                  hint="Pass the query text: omop_emb.nearest('...', "
                                       "rerank => true).")
        if mode is not None and lexical.check_mode(mode) == "lexical":
            raise InvalidArgument("a query vector cannot be searched lexically",
                                  hint="Pass the query text: omop_emb.nearest('...', "
                                       "mode => 'lexical').")
        if vec is None:
            return []
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        parsed = vectors.from_sql(vec)
        dims = len(parsed)
        if dims != model["dimensions"]:
            raise InvalidArgument(
                "query vector has %d dimensions; model %s has %d"
                % (dims, model["name"], model["dimensions"]),
                hint="Embed the query with omop_emb.embed(text, 'query') for this model.")
        if model["metric"] != "l2" and vectors.norm(parsed) == 0:
            raise InvalidArgument(
                "query vector is all zeros: %s similarity to it is undefined (model %s)"
                % ("cosine" if model["metric"] == "cosine" else "inner-product", model["name"]),
                detail="Every concept would be equally far (cosine: NaN), so the ranking "
                       "would be arbitrary.",
                hint="Pass the vector of a text, e.g. omop_emb.embed('...', 'query').")
        self.check_vectors_current(model)
        # No text: the vector ranking alone (hybrid falls back to semantic).
        return self.search(plpy, model, st, vec, k, filters, standard_only, include_invalid,
                           mode="semantic")

    def nearest_batch(self, plpy, queries, k, domain_ids, vocabulary_ids, concept_class_ids,
                      standard_only, include_invalid, model_name, mode=None, rerank=None):
        """Rows of every query, streamed: a generator, so that PostgreSQL takes
        each row as it comes (its tuplestore spills to disk past work_mem) and
        this backend holds the vectors of one chunk of queries (BATCH_CHUNK) and
        the rows of one query at a time. queries x k is capped
        (checks.MAX_BATCH_ROWS) before any work."""
        k = check_k(k)
        filters = check_filters(domain_ids, vocabulary_ids, concept_class_ids)
        st = self.settings(plpy)
        mode = lexical.check_mode(mode, st["search_mode"])
        if not queries:
            return []
        queries = list(queries)
        check_batch_size(len(queries), k)
        model = self.model(plpy, model_name, st)
        self.check_filter_values(plpy, model, filters)  # before the embedding call
        self.warn_drift_once(plpy, model)
        blank = [i + 1 for i, q in enumerate(queries) if q is not None and not q.strip()]
        if blank:
            plpy.warning("omop_emb: %d of %d query texts are blank: no rows for them"
                         % (len(blank), len(queries)),
                         detail="query_index %s" % ", ".join(map(str, blank[:20])))
        if mode == "lexical":
            check_input_length(model, queries)
        else:
            self.check_vectors_current(model)
            prefix, _ = self.prefix(plpy, model, "query", st)
            check_input_length(model, queries, prefix, "query")  # all of them, before any work
        return self._stream(plpy, self._batch_rows(plpy, model, st, queries, k, filters,
                                                   standard_only, include_invalid, mode, rerank))

    def _batch_rows(self, plpy, model, st, queries, k, filters, standard_only,
                    include_invalid, mode, rerank=None):
        # Embedded chunk by chunk: a chunk at least as large as the model's batch
        # size costs no extra request, and the vectors (and the cache rows written
        # for them) of 2,000 queries at once took 112 MB.
        chunk = max(BATCH_CHUNK, int(model["batch_size"]))
        # A fused ranking that names a companion model: the companion embeds the
        # chunk in batches too (one request per chunk, not one per query).
        comp = self._companion_model(plpy, model, self.scorer(model), st) if mode == "fused" else None
        searched = found = False
        for start in range(0, len(queries), chunk):
            part = queries[start:start + chunk]
            if mode == "lexical":
                vecs = [None if q is None or not q.strip() else "" for q in part]
            else:
                vecs = self.embed_texts(plpy, model, "query", part, st)
            comp_vecs = ([None] * len(part) if comp is None
                         else self.embed_texts(plpy, comp, "query", part, st))
            for i, (q, v, cv) in enumerate(zip(part, vecs, comp_vecs), start):
                if v is None:
                    continue
                searched = True
                for row in self.search(plpy, model, st, v or None, k, filters, standard_only,
                                       include_invalid, query_text=q, notice=False, mode=mode,
                                       rerank=rerank,
                                       companion=None if comp is None else (comp, cv)):
                    found = True
                    yield (i + 1, q) + row
        if searched and not found and all(f != [] for f in filters):
            # One notice for the statement (search() says nothing per query here).
            standard_only = True if standard_only is None else bool(standard_only)
            shape = (tuple(f is not None for f in filters), standard_only, bool(include_invalid))
            self._explain_empty(plpy, model, shape, filters, True)

    def _stream(self, plpy, rows):
        """Rows of a generator, with our errors raised as PostgreSQL errors (the
        generator runs after call() returned, outside its error handling)."""
        try:
            for row in rows:
                yield row
        except OmopEmbError as e:
            raise self.pg_error(plpy, e) from None

    def check_vectors_current(self, model):
        """Refuse a vector search while the stored vectors come from what the model
        was before a change of provider, remote model or dimensions."""
        if model["vectors_stale"]:
            raise NotIndexed(
                "the embeddings of model %s were made by what the model was before its last "
                "change (provider %s, remote model %s, %d dimensions now): vector "
                "searches are refused until they are re-embedded"
                % (model["name"], model["provider"], model["remote_model"],
                   model["dimensions"]),
                detail="Comparing a query vector of one model with document vectors of "
                       "another ranks concepts at random. Lexical search (mode => 'lexical') "
                       "reads no vector and keeps working.",
                hint="An administrator re-embeds them with CALL omop_emb.index_concepts("
                     "model => '%s'); (a re-run resumes where it stopped)." % model["name"])

    def search(self, plpy, model, st, vec, k, filters, standard_only, include_invalid,
               query_text=None, notice=True, mode="semantic", rerank=None, companion=None):
        """Rows of nearest(): exact matches first, then the ranking of ``mode``.

        score: semantic -> similarity; lexical -> lexical score (Dice overlap of
        stemmed words, 0..1); hybrid -> similarity + lexical.LEXICAL_WEIGHT *
        lexical score, over the union of both rankings (lexical.fuse).
        """
        standard_only = True if standard_only is None else bool(standard_only)
        include_invalid = bool(include_invalid)
        shape = (tuple(f is not None for f in filters), standard_only, include_invalid)
        args = [f for f in filters if f is not None]
        if any(f == [] for f in args):
            if notice:
                plpy.notice("omop_emb: an empty filter array matches no concept")
            return []
        self.check_filter_values(plpy, model, filters)
        if query_text is None:
            mode = "semantic"
        mid = model["model_id"]
        exact_rows = OrderedDict()
        exact_texts = []
        if query_text is not None:
            sql, types, _ = sqlgen.exact_match(model, shape)
            for r in self.plan(plpy, ("exact", mid, shape), sql, types).execute(
                    [vec, query_text] + args):
                exact_texts.append(r)
                if r["concept_id"] not in exact_rows and len(exact_rows) < k:
                    exact_rows[r["concept_id"]] = r
        if query_text is not None and (rerank if rerank is not None else st["rerank"]):
            return self._reranked(plpy, model, st, vec, k, filters, standard_only,
                                  include_invalid, query_text, notice, mode, companion)
        if mode == "fused":
            return self._fused(plpy, model, st, vec, k, shape, args, filters, query_text,
                               exact_rows, exact_texts, notice, companion)
        want = k if mode == "semantic" else lexical.depth(k)
        sem = lex = None
        if mode != "lexical":
            sem = self._semantic_ranking(plpy, model, st, vec, want, shape, args)
        if mode != "semantic":
            lex = self._lexical_ranking(plpy, model, vec, query_text, want, shape, args)
        if mode == "semantic":
            order = [(cid, sqlgen.similarity_from_distance(model["metric"], r["distance"]))
                     for cid, r in sem.items()]
        elif mode == "lexical":
            order = [(cid, r["lex_score"]) for cid, r in lex.items()]
        else:
            # Exact matches are scored too, so that every hybrid row has a score.
            feats = self._fusion_features(plpy, model, vec, query_text,
                                          list(exact_rows) + list(sem) + list(lex), shape, args)
            sem = feats  # rows of the hybrid result: each concept's nearest text
            metric = model["metric"]
            order = lexical.fuse([(cid, sqlgen.similarity_from_distance(metric, r["distance"]),
                                   r["lex_score"]) for cid, r in feats.items()])
        scores = dict(order)
        picked = OrderedDict((cid, r) for cid, r in exact_rows.items())
        for cid, _ in order:
            if len(picked) >= k:
                break
            if cid not in picked:
                # The text shown: the concept's nearest text (semantic, hybrid),
                # its best lexical text (lexical).
                picked[cid] = (sem or {}).get(cid) or lex[cid]
        if not picked and mode == "lexical":
            self._explain_empty(plpy, model, shape, filters, False)
            if notice:
                plpy.notice("omop_emb: no word of the query (stemmed, stop words dropped) is in "
                            "an indexed text that passes the filters; lexical search needs a "
                            "shared word (mode => 'semantic' compares meaning)")
        elif not picked:
            self._explain_empty(plpy, model, shape, filters, notice)
        metric = model["metric"]
        out = []
        for rank, (cid, r) in enumerate(picked.items(), 1):
            d = r["distance"]
            sim = sqlgen.similarity_from_distance(metric, d)
            score = scores.get(cid)
            if score is None:  # an exact match outside the ranking
                score = 1.0 if mode == "lexical" else sim
            out.append((rank, cid, r["concept_name"], r["domain_id"],
                        r["vocabulary_id"], r["concept_class_id"], r["standard_concept"],
                        sim, d, r["text"], r["text_kind"], cid in exact_rows, score, None))
        return out

    # -- the reranking stage (omop_emb_indb.rerank) -------------------------------
    RERANKER_COLUMNS = ("reranker_id, name, provider, endpoint, remote_model, api_key_ref, top_n, "
                        "connect_timeout_s, read_timeout_s, max_retries")

    def reranker(self, plpy, st):
        name = st["reranker"]
        if name is not None:
            rows = self.plan(plpy, "reranker_by_name", "SELECT %s FROM omop_emb.reranker "
                             "WHERE name = $1" % self.RERANKER_COLUMNS, ["text"]).execute([name])
            if not rows:
                raise InvalidArgument("unknown reranker %r (setting %s)" % (name, rerank_api.SETTING),
                                      detail="Registered rerankers: %s" % self._reranker_names(plpy),
                                      hint="SET %s to a registered reranker, or RESET it."
                                           % rerank_api.SETTING)
            return dict(rows[0])
        rows = self.plan(plpy, "rerankers_all", "SELECT %s FROM omop_emb.reranker ORDER BY name "
                         "LIMIT 2" % self.RERANKER_COLUMNS).execute([])
        if len(rows) == 1:
            return dict(rows[0])
        if not rows:
            raise InvalidArgument(
                "rerank was asked for but no reranker is registered",
                hint="An administrator registers one with SELECT omop_emb.register_reranker("
                     "'bge-reranker', 'tei', 'http://127.0.0.1:8080'); or search without "
                     "rerank => true (and RESET %s)." % rerank_api.RERANK_SETTING)
        raise InvalidArgument("several rerankers are registered and none is chosen",
                              detail="Registered rerankers: %s" % self._reranker_names(plpy),
                              hint="SET %s = '<name>'." % rerank_api.SETTING)

    def _reranker_names(self, plpy):
        rows = plpy.execute("SELECT string_agg(name, ', ' ORDER BY name) AS n FROM omop_emb.reranker")
        return rows[0]["n"] or "(none)"

    def rerank_scores(self, plpy, rr, st, query, texts):
        key = rerank_api.cache_key(query, texts)
        ck = (rr["reranker_id"], key)
        hit = self.rerank_cache.get(ck)
        if hit is not None:
            self.rerank_cache.move_to_end(ck)
            return hit
        rows = self.plan(plpy, "rerank_cache_get", "SELECT scores FROM omop_emb.rerank_cache "
                         "WHERE reranker_id = $1 AND key_hash = $2", ["int4", "bytea"]).execute(
            [rr["reranker_id"], key])
        if rows:
            scores = list(rows[0]["scores"])
        else:
            scores = self.http.post_rerank(rr, query, texts, self.api_key(plpy, rr))
            if not st["read_only"]:
                self.plan(plpy, "rerank_cache_put",
                          "INSERT INTO omop_emb.rerank_cache (reranker_id, key_hash, scores) "
                          "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                          ["int4", "bytea", "float8[]"]).execute([rr["reranker_id"], key, scores])
        self.rerank_cache[ck] = scores
        while len(self.rerank_cache) > SESSION_CACHE_SIZE:
            self.rerank_cache.popitem(last=False)
        return scores

    def _reranked(self, plpy, model, st, vec, k, filters, standard_only, include_invalid,
                  query_text, notice, mode, companion=None):
        """The top ``top_n`` rows of ``mode`` reordered by the reranker (exact matches
        stay first); score = the reranker's score, confidence = it in [0, 1]."""
        rr = self.reranker(plpy, st)
        n = min(MAX_K, max(k, int(rr["top_n"])))
        rows = self.search(plpy, model, st, vec, n, filters, standard_only, include_invalid,
                           query_text=query_text, notice=notice, mode=mode, rerank=False,
                           companion=companion)
        if not rows:
            return rows
        scores = self.rerank_scores(plpy, rr, st, query_text, [r[2] for r in rows])
        order = sorted(range(len(rows)), key=lambda i: (not rows[i][11], -scores[i], i))[:k]
        out, last = [], None
        for rank, i in enumerate(order, 1):
            conf = rerank_api.confidence_of(scores[i])
            last = conf if last is None else min(conf, last)
            out.append((rank,) + tuple(rows[i][1:12]) + (scores[i], last))
        return out

    def register_reranker(self, plpy, name, provider, endpoint, remote_model, api_key_ref,
                          top_n, read_timeout_s, max_retries):
        from .registry import check_key_ref, check_name
        check_name(name)
        provider = rerank_api.check_provider(provider)
        rerank_api.rerank_url(provider, endpoint)
        api_key_ref = check_key_ref(api_key_ref)
        top_n = rerank_api.DEFAULT_TOP_N if top_n is None else int(top_n)
        if not 2 <= top_n <= MAX_K:
            raise InvalidArgument("top_n = %d is outside 2..%d" % (top_n, MAX_K),
                                  hint="The reranker reorders the first top_n candidates "
                                       "(default %d)." % rerank_api.DEFAULT_TOP_N)
        if plpy.execute(plpy.prepare("SELECT 1 FROM omop_emb.reranker WHERE name = $1", ["text"]),
                        [name]):
            raise InvalidArgument("reranker %r is already registered" % name,
                                  hint="omop_emb.drop_reranker() it first.")
        row = plpy.execute(plpy.prepare(
            "INSERT INTO omop_emb.reranker (name, provider, endpoint, remote_model, api_key_ref, "
            "top_n, read_timeout_s, max_retries) VALUES ($1, $2, $3, $4, $5, $6, "
            "coalesce($7, 60), coalesce($8, 3)) RETURNING reranker_id",
            ["text", "text", "text", "text", "text", "int4", "float8", "int4"]),
            [name, provider, endpoint, remote_model, api_key_ref, top_n, read_timeout_s,
             max_retries])[0]
        return row["reranker_id"]

    def drop_reranker(self, plpy, name, if_exists):
        rows = plpy.execute(plpy.prepare("DELETE FROM omop_emb.reranker WHERE name = $1 "
                                         "RETURNING reranker_id", ["text"]), [name])
        if not rows and not if_exists:
            raise InvalidArgument("unknown reranker %r" % (name,),
                                  detail="Registered rerankers: %s" % self._reranker_names(plpy))
        self.rerank_cache.clear()
        return bool(rows)

    # -- the fused ranking (omop_emb_indb.ranking) --------------------------------
    def ranking_candidates(self, plpy, queries, k, domain_ids, vocabulary_ids,
                           concept_class_ids, standard_only, include_invalid, model_name):
        k = check_k(k)
        filters = check_filters(domain_ids, vocabulary_ids, concept_class_ids)
        if not queries:
            return []
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        standard_only = True if standard_only is None else bool(standard_only)
        shape = (tuple(f is not None for f in filters), standard_only, bool(include_invalid))
        args = [f for f in filters if f is not None]
        vecs = self.embed_texts(plpy, model, "query", list(queries), st)
        out = []
        names = list(ranking.FEATURES)
        # (the companion features are those of the companion the model's ranking names)
        scorer = self.scorer(model)
        comp_model = self._companion_model(plpy, model, scorer, st)
        comp_vecs = ([None] * len(queries) if comp_model is None
                     else self.embed_texts(plpy, comp_model, "query", list(queries), st))
        for i, (q, v, cv) in enumerate(zip(queries, vecs, comp_vecs), 1):
            if v is None:
                continue
            sql, types, _ = sqlgen.exact_match(model, shape)
            exact = list(self.plan(plpy, ("exact", model["model_id"], shape), sql, types)
                         .execute([v, q] + args))
            cands = self.fused_candidates(plpy, model, st, v, k, shape, args, q, exact)
            best_sim = max((r["similarity"] for r in cands if r["similarity"] is not None),
                           default=0.0)
            best_trg = max((r["trigram"] or 0.0 for r in cands), default=0.0)
            csim = ranking.concept_similarities(cands)
            query = ranking.Query(q)
            exact_ids = {r["concept_id"] for r in exact}
            comp = self._companion(plpy, model, scorer, st, q, cands,
                                   None if comp_model is None else (comp_model, cv))
            for r in cands:
                out.append((i, r["concept_id"], r["text"], r["text_kind"],
                            r["concept_id"] in exact_ids,
                            ranking.text_features(query, r, best_sim, best_trg,
                                                  csim[r["concept_id"]],
                                                  ranking.companion_of(comp, r["concept_id"])),
                            names))
        return out

    def set_ranking(self, plpy, model_name, weights):
        import json
        model = self.model(plpy, model_name)
        value = None
        if weights is not None:
            w = json.loads(weights) if isinstance(weights, str) else weights
            if isinstance(w, dict) and set(w) == {"companion"}:
                # {"companion": "<model>"} alone: the shipped ranking of the pair
                w = self._shipped_pair(plpy, model, w["companion"])
            w = ranking.check_weights(w)
            if w.get("companion") is not None:
                comp = self.model(plpy, w["companion"])
                if comp["model_id"] == model["model_id"]:
                    raise InvalidArgument(
                        "model %s cannot be its own companion" % model["name"],
                        hint="Name another registered model, indexed over the same vocabulary.")
            value = json.dumps(w)
        plpy.execute(plpy.prepare(
            "UPDATE omop_emb.model SET ranking = $2::jsonb, updated_at = now() WHERE model_id = $1",
            ["int4", "text"]), [model["model_id"], value])
        return True

    def ranking_of(self, plpy, model_name):
        import json
        model = self.model(plpy, model_name)
        w = dict(self.scorer(model).weights)
        if model.get("ranking"):
            w["source"] = "model (omop_emb.set_ranking)"
        elif ranking_weights.DEFAULTS.get(model.get("remote_model") or "") or \
                ranking_weights.DEFAULTS.get(model["name"]):
            w["source"] = "shipped for %s" % (model.get("remote_model") or model["name"])
        else:
            w["source"] = "generic (not fitted for this model: omop-emb-pg fit-ranking)"
        return json.dumps(w)

    def _shipped_pair(self, plpy, model, companion_name):
        """The shipped ranking of ``model`` with companion ``companion_name``
        (companion_weights.DEFAULTS, by the two remote models)."""
        comp = self.model(plpy, companion_name)
        key = (model.get("remote_model") or model["name"], comp.get("remote_model") or comp["name"])
        shipped = companion_weights.DEFAULTS.get(key)
        if shipped is None:
            raise InvalidArgument(
                "no ranking is shipped for model %s (%s) with companion %s (%s)"
                % (model["name"], key[0], comp["name"], key[1]),
                detail="Shipped pairs: %s" % ", ".join(
                    "%s with %s" % p for p in sorted(companion_weights.DEFAULTS)),
                hint="Fit one on your own labelled pairs: omop-emb-pg fit-ranking --model %s "
                     "--companion %s --pairs PAIRS.csv" % (model["name"], comp["name"]))
        return dict(shipped, companion=comp["name"])

    def scorer(self, model):
        """The model's ranking model: its own fit (omop_emb.model.ranking), else the
        one shipped for its remote model, else the generic one."""
        raw = model.get("ranking")
        key = (model["model_id"], raw)
        sc = self.scorers.get(key)
        if sc is None:
            if raw:
                weights = raw
            else:
                weights = ranking_weights.DEFAULTS.get(model.get("remote_model") or "") or \
                    ranking_weights.DEFAULTS.get(model["name"]) or ranking_weights.GENERIC
            sc = self.scorers[key] = ranking.Scorer(weights)
        return sc

    def fused_candidates(self, plpy, model, st, vec, k, shape, args, query_text, exact_texts,
                         semantic_ids=None):
        """Candidate text rows of the fused ranking, each with similarity and
        trigram (see omop_emb_indb.ranking for the sources); the concepts of the
        semantic source, nearest first, are appended to ``semantic_ids``."""
        mid = model["model_id"]
        metric = model["metric"]
        rows = list(exact_texts)
        exact_keys = {(r["concept_id"], r["text_kind"], r["text"]) for r in exact_texts}
        # Semantic source: at least k concepts whenever k pass the filters.
        sem_rows = []
        sem = self._semantic_ranking(plpy, model, st, vec, max(k, ranking.SEMANTIC_DEPTH), shape,
                                     args, fused_text=query_text, all_rows=sem_rows)
        if semantic_ids is not None:
            semantic_ids.extend(sem)
        rows += sem_rows
        # Trigram candidates are for misspellings and word fragments: words no text of
        # the model holds. A query whose every word is in the vocabulary gets nothing
        # from them that the semantic source misses, and the GIN lookup costs more than
        # the whole semantic search: it merges the posting lists of all the query's
        # trigrams (realistic 200k texts: 10 ms at 20-40 characters, 40 ms at 60-100;
        # 1M, common words only: p99 557 ms). Words the statistics list are in the
        # vocabulary; the others are looked up, one short posting list each.
        words_by_text = self._lexemes(plpy, [query_text] + ranking.abbreviations(query_text))
        word_rows = self._word_rows(plpy, mid)
        unlisted = lexical.unlisted_words(words_by_text[0][1], word_rows)
        if unlisted and self.plan(plpy, ("unknown_words", mid), lexical.unknown_words_sql(model),
                                  ["pg_catalog.tsquery[]"]).execute(
                [[lexical.tsquery_literal([w], "|") for w in unlisted]])[0]["unknown"]:
            sql, types, _ = sqlgen.fused_trigram(model, shape)
            rows += self.plan(plpy, ("fused_trgm", mid, shape), sql, types).execute(
                [vec, query_text, ranking.TRIGRAM_DEPTH * 2] + args)
        abbrevs = [t for t, _ in words_by_text[1:]]
        if abbrevs:
            sql, types, _ = sqlgen.fused_initials(model, shape)
            rows += self.plan(plpy, ("fused_ini", mid, shape), sql, types).execute(
                [vec, abbrevs, ranking.INITIALS_DEPTH, query_text] + args)
            # Texts holding a token as a word, shortest first: only for rare tokens. A
            # common one ('MG', 'ML', 'SR' in drug and lab names) matches tens of thousands
            # of texts, the shortest of which are no answer (realistic 200k: 350 ms).
            rare = lexical.rare_tokens(words_by_text[1:], word_rows)
            if rare:
                sql, types, _ = sqlgen.fused_abbreviation(model, shape)
                rows += self.plan(plpy, ("fused_abbr", mid, shape), sql, types).execute(
                    [vec, " | ".join(rare), ranking.ABBREVIATION_DEPTH, query_text] + args)
        out, seen = [], set()
        for r in rows:
            key = (r["concept_id"], r["text_kind"], r["text"])
            if key in seen:
                continue
            seen.add(key)
            r = dict(r)
            r["similarity"] = sqlgen.similarity_from_distance(metric, r["distance"])
            r["exact"] = key in exact_keys
            out.append(r)
        return out

    def _fused(self, plpy, model, st, vec, k, shape, args, filters, query_text, exact_rows,
               exact_texts, notice, companion=None):
        sem_ids = []
        cands = self.fused_candidates(plpy, model, st, vec, k, shape, args, query_text,
                                      exact_texts, sem_ids)
        scorer = self.scorer(model)
        q = ranking.Query(query_text)
        ranked = ranking.rank(q, cands, scorer,
                              self._companion(plpy, model, scorer, st, query_text, cands,
                                              companion))
        # Exact matches first (every mode), then by score; the semantic ranking's
        # first k (at most KEPT_ROWS) concepts (exact matches first, as in mode
        # semantic) stay in the first k rows.
        ranked = [t for t in ranked if t[0] in exact_rows] + \
            [t for t in ranked if t[0] not in exact_rows]
        semantic = list(exact_rows) + [cid for cid in sem_ids if cid not in exact_rows]
        ranked = ranking.fused_rows(ranked, semantic, k)
        if not ranked:
            self._explain_empty(plpy, model, shape, filters, notice)
            return []
        confidences = scorer.confidences([t[1] for t in ranked])
        out = []
        for rank, ((cid, score, r, _), conf) in enumerate(zip(ranked, confidences), 1):
            out.append((rank, cid, r["concept_name"], r["domain_id"], r["vocabulary_id"],
                        r["concept_class_id"], r["standard_concept"], r["similarity"],
                        r["distance"], r["text"], r["text_kind"], cid in exact_rows, score, conf))
        return out

    def _companion_model(self, plpy, model, scorer, st):
        """The registered companion model the ranking of ``model`` names (None: no
        companion)."""
        if not scorer.companion:
            return None
        try:
            comp = self.model(plpy, scorer.companion, st)
        except ModelNotFound:
            raise ModelNotFound(
                "the ranking of model %s names companion model %r, which is not registered"
                % (model["name"], scorer.companion),
                detail="Registered models: %s" % self._model_names(plpy),
                hint="Register and index it, or give model %s a ranking without it "
                     "(SELECT omop_emb.set_ranking(%s, NULL) restores the shipped one)."
                % (model["name"], plpy.quote_literal(model["name"])))
        return comp

    def _companion(self, plpy, model, scorer, st, query_text, cands, given=None):
        """ranking.companion_pairs of the candidates' concepts when the model's ranking
        names a companion model (else None): the companion embeds the query (query
        role, cached like any query) and each concept takes its best similarity over
        the concept's texts in the companion's index. ``given``: (the companion model,
        the query's vector by it), resolved and embedded by a caller that batches."""
        if not scorer.companion or not cands:
            return None
        if given is not None:
            comp, vec = given
        else:
            comp = self._companion_model(plpy, model, scorer, st)
            vec = self.embed_texts(plpy, comp, "query", [query_text], st)[0]
        if vec is None:
            return None
        ids = sorted({r["concept_id"] for r in cands})
        sql = ("SELECT e.concept_id, pg_catalog.min(e.embedding %s $1) AS distance FROM %s e "
               "WHERE e.concept_id OPERATOR(pg_catalog.=) ANY ($2) GROUP BY e.concept_id"
               % (sqlgen.op(comp["metric"]), sqlgen.table(comp["model_id"])))
        rows = self.plan(plpy, ("companion", comp["model_id"]), sql,
                         [sqlgen.vector_type(comp), "int4[]"]).execute([vec, ids])
        if not rows and ("companion_empty", comp["model_id"]) not in self.warned:
            self.warned.add(("companion_empty", comp["model_id"]))
            plpy.notice("omop_emb: companion model %s of model %s holds none of the candidates' "
                        "concepts: its features are 0 (index it over the same vocabulary)"
                        % (comp["name"], model["name"]))
        return ranking.companion_pairs(
            {r["concept_id"]: sqlgen.similarity_from_distance(comp["metric"], r["distance"])
             for r in rows})

    def _semantic_ranking(self, plpy, model, st, vec, want, shape, args, fused_text=None,
                          all_rows=None):
        """{concept_id: nearest text row} for the ``want`` nearest concepts, best first.

        With ``fused_text``: the rows carry their trigram similarity to it, the
        window is at least ranking.SEMANTIC_FETCH texts, and every text row read
        is appended to ``all_rows``."""
        mid = model["model_id"]
        # Texts collapse onto concepts: ask for more texts than concepts wanted.
        fetch = want if want >= 50 else min(MAX_K, want + max(want, 20))
        if fused_text is not None:
            fetch = max(fetch, ranking.SEMANTIC_FETCH)
        picked = OrderedDict()
        # A filter that keeps few rows is scanned exactly from the start (selectivity).
        exact = self._filter_is_selective(plpy, model, st, shape, args)
        while True:
            ef = max(fetch, ef_search(st, model))
            self.plan(plpy, "set_ef", "SELECT set_config('hnsw.ef_search', $1, true)",
                      ["text"]).execute([str(min(ef, 1000))])
            if fused_text is None:
                sql, types, _ = sqlgen.search(model, shape, exact=exact)
                rows = self.plan(plpy, ("search", mid, shape, exact), sql, types).execute(
                    [vec, fetch] + args)
            else:
                sql, types, _ = sqlgen.fused_semantic(model, shape, exact=exact)
                rows = self.plan(plpy, ("fused_sem", mid, shape, exact), sql, types).execute(
                    [vec, fetch] + args + [fused_text])
                del all_rows[:]
                all_rows.extend(rows)
            for r in rows:
                if len(picked) >= want:
                    break
                if r["concept_id"] not in picked:
                    picked[r["concept_id"]] = r
            if len(picked) >= want or exact:
                break
            if len(rows) >= fetch and fetch < 4 * MAX_K:
                fetch *= 4  # synonyms crowded the window: widen it
                continue
            if any(shape[0]) or not shape[1] or not shape[2]:
                # Filtered and short: the graph gave up before finding enough
                # (hnsw.max_scan_tuples). Scan the filtered rows exactly instead.
                exact = True
                fetch = max(fetch, want * 4)
                continue
            break
        return picked

    def _filter_is_selective(self, plpy, model, st, shape, args):
        """Whether the filters of a search keep so few rows (planner statistics,
        read once a minute per session; at most omop_emb.exact_scan_rows, 0: never)
        that an exact scan beats the graph."""
        limit = st["exact_scan_rows"]
        if limit is None:
            limit = selectivity.EXACT_SCAN_ROWS
        if not any(shape[0]) or limit == 0:
            return False
        mid = model["model_id"]
        now = time.monotonic()
        hit = self.filter_stats.get(mid)
        if hit is None or now - hit[0] > 60:
            rows = self.plan(plpy, "filter_stats", selectivity.STATS_SQL, ["text"]).execute(
                [sqlgen.table(mid)])
            hit = (now, selectivity.column_stats(rows))
            self.filter_stats[mid] = hit
        given = iter(args)
        filters = {col: (next(given) if on else None)
                   for col, on in zip(selectivity.COLUMNS, shape[0])}
        return selectivity.exact_is_better(hit[1], filters, limit)

    def _lexical_ranking(self, plpy, model, vec, query_text, want, shape, args):
        """{concept_id: best lexical text row} for up to ``want`` concepts, best first."""
        mid = model["model_id"]
        op = sqlgen.op(model["metric"])
        words = self._lexemes(plpy, [query_text])[0][1]
        if not words:
            return OrderedDict()
        rare_q, common_q = lexical.split_words(words, self._word_rows(plpy, mid))
        where, names = sqlgen.filter_clause(shape, 7)
        sql, types = lexical.search_sql(model, where, op, len(names))
        rows = self.plan(plpy, ("lexical", mid, shape), sql, types).execute(
            [vec, words, min(4 * MAX_K, want * 4), rare_q, common_q,
             lexical.COMMON_WORD_CAP] + args)
        return lexical.best_per_concept(rows, want)

    def _lexemes(self, plpy, texts):
        """[(text, its lexemes: omop_emb.lexemes)] in the order of ``texts``."""
        rows = self.plan(plpy, "lexemes_of", "SELECT t.text, omop_emb.lexemes(t.text) AS words "
                         "FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS t(text, n) "
                         "ORDER BY t.n", ["text[]"]).execute([texts])
        return [(r["text"], r["words"] or []) for r in rows]

    def _word_rows(self, plpy, mid):
        """{lexeme: texts holding it} of a model's full-text index, from the planner
        statistics; read once a minute per session."""
        now = time.monotonic()
        hit = self.word_stats.get(mid)
        if hit is None or now - hit[0] > 60:
            rows = self.plan(plpy, "word_stats", lexical.WORD_STATS_SQL, ["name", "text"]).execute(
                ["embedding_%d_fts" % mid, sqlgen.table(mid)])
            hit = (now, lexical.word_rows(rows[0] if rows else None))
            self.word_stats[mid] = hit
        return hit[1]

    def _fusion_features(self, plpy, model, vec, query_text, ids, shape, args):
        """{concept_id: row of its nearest text, with lex_score = its best
        lexical score over all its texts} for the candidate concepts ``ids``,
        in the order of ``ids`` (the order ties keep)."""
        ids = list(OrderedDict.fromkeys(ids))
        if not ids:
            return OrderedDict()
        mid = model["model_id"]
        op = sqlgen.op(model["metric"])
        where, names = sqlgen.filter_clause(shape, 4)
        sql, types = lexical.features_sql(model, where, op, len(names))
        rows = {r["concept_id"]: r for r in self.plan(plpy, ("fusion", mid, shape), sql, types)
                .execute([vec, query_text, ids] + args)}
        return OrderedDict((cid, rows[cid]) for cid in ids if cid in rows)

    def explain_nearest(self, plpy, query, k, domain_ids, vocabulary_ids, concept_class_ids,
                        standard_only, include_invalid, model_name):
        """EXPLAIN of the statement nearest() runs for this query, with its vector."""
        k = check_k(k)
        filters = check_filters(domain_ids, vocabulary_ids, concept_class_ids)
        st = self.settings(plpy)
        model = self.model(plpy, model_name, st)
        self.check_vectors_current(model)
        vec = self.embed_texts(plpy, model, "query", [query], st)[0]
        standard_only = True if standard_only is None else bool(standard_only)
        shape = (tuple(f is not None for f in filters), standard_only, bool(include_invalid))
        args = [f for f in filters if f is not None]
        sql, types, _ = sqlgen.search(model, shape,
                                      exact=self._filter_is_selective(plpy, model, st, shape, args))
        fetch = k if k >= 50 else min(MAX_K, k + max(k, 20))
        self.plan(plpy, "set_ef", "SELECT set_config('hnsw.ef_search', $1, true)",
                  ["text"]).execute([str(min(max(fetch, ef_search(st, model)), 1000))])
        rows = plpy.execute(plpy.prepare("EXPLAIN " + sql, types), [vec, fetch] + args)
        return [vectors.abbreviate_literals(r["QUERY PLAN"]) for r in rows]

    def vocabulary_version_now(self, plpy, schema):
        """The release stamped in ``schema``.vocabulary, or None (no such table, or the
        session user may not read it)."""
        ok = self.plan(plpy, "vocab_readable", drift.READABLE_SQL, ["text", "text"]).execute(
            [schema, "vocabulary"])
        if not ok or not ok[0]["ok"]:
            return None
        rows = plpy.execute(drift.version_sql(plpy.quote_ident(schema)))
        return rows[0]["v"] if rows else None

    def warn_drift_once(self, plpy, model):
        """A WARNING when the vocabulary's release moved since the model was indexed;
        checked at most once per session per model (one small query)."""
        key = ("drift", model["model_id"])
        if key in self.warned:
            return
        self.warned.add(key)
        if not model["vocabulary_schema"] or model["vocabulary_version"] is None:
            return
        now = self.vocabulary_version_now(plpy, model["vocabulary_schema"])
        found = drift.changes(model["vocabulary_version"], now, 0)
        if found:
            plpy.warning("omop_emb: model %s may be stale: %s since it was indexed"
                         % (model["name"], "; ".join(found)),
                         detail="Searches use the embeddings made before the change; "
                                "omop_emb.status() counts the names that changed.",
                         hint=drift.action(model["name"]) + ".")

    def check_filter_values(self, plpy, model, filters):
        """Raise when a filter value is held by no row of the model's embedding
        table, naming the closest values it holds. The values are read once per
        session (a loose index scan) and read again only when a value is not
        among them, so the check costs a set lookup per value."""
        mid = model["model_id"]
        for (argument, column), values in zip(suggest.FILTER_COLUMNS, filters):
            if not values:
                continue
            known = self.known_values.get((mid, column))
            if known is None or any(v not in known for v in values):
                known = frozenset(r["x"] for r in self.plan(
                    plpy, ("known", mid, column),
                    suggest.distinct_values_sql(sqlgen.table(mid), column)).execute([]))
                self.known_values[(mid, column)] = known
            if not known:
                return  # nothing indexed: _explain_empty says so
            for v in values:
                if v not in known:
                    raise suggest.unknown_value_error(argument, column, v, known, model["name"])

    def _explain_empty(self, plpy, model, shape, filters, notice):
        rows = plpy.execute("SELECT EXISTS (SELECT 1 FROM %s) AS any"
                            % sqlgen.table(model["model_id"]))
        if not rows[0]["any"]:
            raise NotIndexed(
                "model %s has no embeddings yet" % model["name"],
                hint="An administrator indexes the vocabulary with "
                     "CALL omop_emb.index_concepts(model => '%s');" % model["name"])
        if notice:
            names = ("domain_ids", "vocabulary_ids", "concept_class_ids")
            used = ["%s => '%s'" % (n, sql_array(f)) for n, f in zip(names, filters) if f is not None]
            used += ["standard_only => %s" % str(shape[1]).lower(),
                     "include_invalid => %s" % str(shape[2]).lower()]
            plpy.notice("omop_emb: no indexed concept matches the filters (%s)" % ", ".join(used))

    # -- status -------------------------------------------------------------
    def status(self, plpy):
        st = self.settings(plpy)
        out = []
        for m in plpy.execute("SELECT %s, index_params::text AS params, indexed_at "
                              "FROM omop_emb.model ORDER BY name"
                              % MODEL_COLUMNS):
            m = dict(m)
            t = sqlgen.table(m["model_id"])
            counts = plpy.execute(
                "SELECT count(*) AS texts, count(DISTINCT concept_id) AS concepts, "
                "(SELECT count(*) FROM omop_emb.index_queue WHERE model_id = %d) AS pending, "
                "(SELECT count(*) FROM omop_emb.query_cache WHERE model_id = %d) AS cached, "
                "(SELECT coalesce(sum(hits), 0) FROM omop_emb.cache_stats WHERE model_id = %d) "
                "AS hits, (SELECT coalesce(sum(misses), 0) FROM omop_emb.cache_stats "
                "WHERE model_id = %d) AS misses, pg_size_pretty(pg_relation_size(to_regclass("
                "'omop_emb.%s'))) AS index_size, "
                "array_agg(DISTINCT domain_id ORDER BY domain_id) AS domains FROM %s"
                % (m["model_id"], m["model_id"], m["model_id"], m["model_id"],
                   sqlgen.hnsw_index_name(m["model_id"]), t))[0]
            hits = counts["hits"]
            total = hits + counts["misses"]
            now = stale = None
            if m["vocabulary_schema"]:
                now = self.vocabulary_version_now(plpy, m["vocabulary_schema"])
                ok = self.plan(plpy, "vocab_readable", drift.READABLE_SQL, ["text", "text"]).execute(
                    [m["vocabulary_schema"], "concept"])
                if ok and ok[0]["ok"]:
                    stale = plpy.execute(drift.stale_sql(t, plpy.quote_ident(m["vocabulary_schema"])))[0]["n"]
            out.append((m["name"], m["provider"], m["endpoint"], m["dimensions"], m["metric"],
                        m["document_prefix"], m["query_prefix"],
                        prefixes.resolve("document", st["document"], m["document_prefix"])[0],
                        prefixes.resolve("query", st["query"], m["query_prefix"])[0],
                        counts["texts"], counts["concepts"], counts["pending"],
                        m["index_method"], m["params"], counts["index_size"], counts["cached"],
                        hits, counts["misses"], (hits / total) if total else None,
                        m["vocabulary_version"], m["indexed_at"], counts["domains"] or [], now, stale,
                        drift.advice(m["name"], m["vocabulary_version"], now, stale)))
        return out

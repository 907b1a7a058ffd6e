"""The model registry: register, alter and drop embedding models.

Administrator only (EXECUTE is granted to omop_emb_admin). Endpoints and key
references live here, in a table analysts can read but not change; keys
themselves live in the server's environment or in ``omop_emb.secret``, which
only the extension owner can read.
"""

import os
import re

from . import prefixes, providers, sqlgen
from .errors import DuplicateTable, InvalidArgument, KeyNotAllowed, ModelNotFound

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}$")
KEY_REF_RE = re.compile(r"^(env|secret):[A-Za-z_][A-Za-z0-9_]{0,62}$")
METRICS = ("cosine", "l2", "ip")
PROBE_TEXT = "omop_emb dimension probe"
# pg_advisory_xact_lock(REGISTRY_LOCK_CLASS, 0): registrations one at a time ("OEmr").
REGISTRY_LOCK_CLASS = 0x4F456D72


def check_name(name):
    if name is None or not NAME_RE.match(name):
        raise InvalidArgument("invalid model name %r" % (name,),
                              hint="Use 1-128 letters, digits and _ . : / @ + -, "
                                   "starting with a letter or digit.")
    return name


def check_key_ref(ref):
    if ref is None or ref == "":
        return None
    if not KEY_REF_RE.match(ref):
        raise InvalidArgument(
            "api_key_ref %r is not a key reference" % ("***" if len(ref) > 12 else ref,),
            detail="A key reference says where the key lives; it is never the key itself.",
            hint="Use 'env:VARIABLE' (an environment variable of the PostgreSQL server "
                 "process) or 'secret:NAME' (stored with omop_emb.set_secret()).")
    return ref


# The registry's defaults are the column defaults of omop_emb.model (sql/schema):
# read from the catalog, never written again here.
DEFAULTED_COLUMNS = ("metric", "batch_size", "connect_timeout_s", "read_timeout_s", "max_retries")
COLUMN_DEFAULTS_SQL = (
    "SELECT a.attname AS name, pg_catalog.pg_get_expr(d.adbin, d.adrelid) AS expr "
    "FROM pg_catalog.pg_attrdef d JOIN pg_catalog.pg_attribute a "
    "ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
    "WHERE d.adrelid = 'omop_emb.model'::pg_catalog.regclass AND a.attname = ANY($1)")


def check_metric(metric):
    m = (metric or "").strip().lower()
    if m not in METRICS:
        raise InvalidArgument("unknown metric %r" % (metric,),
                              hint="Use 'cosine' (default), 'l2' or 'ip' (inner product).")
    return m


def check_storage(storage, dimensions):
    """``vector`` (float32) or ``halfvec`` (float16: half the table and index, recall
    within 0.01 at 384 dimensions; bench/b_halfvec.py); NULL picks the default."""
    if storage is None:
        return sqlgen.storage_for(dimensions)
    st = storage.strip().lower()
    if st not in sqlgen.STORAGES:
        raise InvalidArgument("unknown storage %r" % (storage,),
                              hint="Use 'vector' (4 bytes per dimension) or 'halfvec' "
                                   "(2 bytes per dimension).")
    if dimensions > sqlgen.STORAGES[st]:
        raise InvalidArgument(
            "storage %r cannot index %d dimensions (at most %d)"
            % (st, dimensions, sqlgen.STORAGES[st]),
            hint="Use storage => 'halfvec' (HNSW up to %d dimensions)." % sqlgen.MAX_HALFVEC_DIMS)
    return st


# What produces a model's vectors. A change of any of them puts the stored
# vectors in another space: searches refuse until index_concepts() re-embedded
# them (mark_identity_changed). Not part of it:
# - the endpoint: another server of the same model (a replica, a new host) needs
#   no re-embedding. A different model behind the same remote_model name is a
#   change the database cannot see: change remote_model too (or re-register);
# - the prefixes: the same model with another prefix stays in the same space.
#   The document prefix is in the hash of every stored text, so index_concepts()
#   re-embeds the texts in place while searches go on; the query prefix is in
#   the text a cached query vector is keyed by.
IDENTITY_FIELDS = ("provider", "remote_model", "dimensions")


def mark_identity_changed(plpy, model_id):
    """Record that what produces the vectors of a model changed: a new identity
    version (query-cache keys), a new generation (every session drops its plans
    and cached vectors), and stale vectors when the table holds any."""
    mid = int(model_id)
    plpy.execute(
        "UPDATE omop_emb.model SET identity_version = identity_version + 1, "
        "identity_changed_at = pg_catalog.now(), "
        "generation = pg_catalog.nextval('omop_emb.model_generation_seq'), "
        "vectors_stale = EXISTS (SELECT 1 FROM %s), updated_at = pg_catalog.now() "
        "WHERE model_id = %d" % (sqlgen.table(mid), mid))


def bump_generation(plpy, model_id):
    plpy.execute("UPDATE omop_emb.model SET generation = pg_catalog.nextval("
                 "'omop_emb.model_generation_seq') WHERE model_id = %d" % int(model_id))


def discover_prefixes(http, provider, endpoint, timeout=(3.0, 10.0), remote_model=None):
    """Prefixes a server advertises on GET /v1/models (omop-emb-pg serve does).

    A server that lists several models: the entry whose id is ``remote_model``
    (none matching: nothing is guessed). Returns {"document": ..., "query": ...} or
    {} when the server says nothing.
    """
    # Ollama serves the OpenAI-compatible /v1/models too.
    base = providers.split_endpoints(endpoint)[0].rstrip("/")
    for suffix in ("/v1/embeddings", "/embeddings", "/api/embed", "/v1"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    url = base + "/v1/models"
    import requests  # loaded by http.session() in any case
    from .http_client import DeadlineExceeded

    try:
        # Through the cancellable path: a cancel or statement_timeout ends it, and
        # so does the deadline (a server that drips its answer).
        resp = http.get(url, timeout)
        data = resp.json().get("data") if resp.status_code == 200 else None
    except (requests.exceptions.RequestException, ValueError, DeadlineExceeded):
        return {}
    if not data or not isinstance(data, list):
        return {}
    entries = [e for e in data if isinstance(e, dict)]
    if len(entries) > 1:
        entries = [e for e in entries if e.get("id") == remote_model]
    if len(entries) != 1:
        return {}
    entry = entries[0]
    found = entry.get("prefixes")
    if isinstance(found, dict):
        doc = found.get("document", found.get("passage"))
        qry = found.get("query")
    else:
        doc, qry = entry.get("document_prefix"), entry.get("query_prefix")
    if isinstance(doc, str) and isinstance(qry, str):
        return {"document": doc, "query": qry}
    return {}


# Environment variables an api_key_ref may read without a superuser's leave:
# the server's environment holds more than keys (PGDATA, PATH, credentials of
# other services), and an administrator chooses where the key is sent.
ENV_KEY_PREFIX = "OMOP_EMB_"


class RegistryMixin:
    def registry_defaults(self, plpy):
        """{column: default} of omop_emb.model for DEFAULTED_COLUMNS, read once a session."""
        found = getattr(self, "_registry_defaults", None)
        if found is None:
            exprs = plpy.execute(plpy.prepare(COLUMN_DEFAULTS_SQL, ["name[]"]),
                                 [list(DEFAULTED_COLUMNS)])
            # Constants of the extension's own table (e.g. 64, 'cosine'::text).
            found = dict(plpy.execute("SELECT " + ", ".join(
                "%s AS %s" % (r["expr"], plpy.quote_ident(r["name"])) for r in exprs))[0])
            self._registry_defaults = found
        return found

    def check_key_use(self, plpy, ref, endpoint):
        """Raise unless the key ``ref`` points at may be sent to ``endpoint``:
        env:NAME when NAME is OMOP_EMB_* or allowed by a superuser
        (omop_emb.allow_env_key); secret:NAME when a superuser bound the secret to
        that endpoint (omop_emb.bind_secret). Names the reference, never the key."""
        kind, _, name = ref.partition(":")
        if kind == "env":
            if name.startswith(ENV_KEY_PREFIX) or self.plan(
                    plpy, "env_key_allowed", "SELECT EXISTS (SELECT 1 FROM "
                    "omop_emb_internal.env_key_allowed WHERE variable = $1) AS ok",
                    ["text"]).execute([name])[0]["ok"]:
                return
            raise KeyNotAllowed(
                "api_key_ref %s: the server's environment variable %s is not allowed as an "
                "API key" % (ref, name),
                detail="Only variables named %s* and those a superuser allowed are read."
                       % ENV_KEY_PREFIX,
                hint="Name the variable %s..., or a superuser runs SELECT "
                     "omop_emb.allow_env_key('%s');" % (ENV_KEY_PREFIX, name))
        # Every server of the endpoint (a model may list several) must be bound.
        servers = [u.rstrip("/") for u in providers.split_endpoints(endpoint or "")] or [""]
        bound = {r["endpoint"] for r in self.plan(
            plpy, "secret_bound", "SELECT endpoint FROM omop_emb_internal.secret_endpoint "
            "WHERE secret_name = $1 AND endpoint = ANY($2)", ["text", "text[]"]).execute(
                [name, servers])}
        unbound = [u for u in servers if u not in bound]
        if unbound:
            raise KeyNotAllowed(
                "api_key_ref %s may not be sent to %s: a superuser has not bound that secret "
                "to that endpoint" % (ref, " ".join(unbound)),
                detail="A stored secret goes only to the endpoints a superuser bound it to; "
                       "a model whose endpoint changed needs the binding again.",
                hint="A superuser runs SELECT omop_emb.bind_secret('%s', '%s');"
                     % (name, unbound[0]))

    def api_key(self, plpy, model):
        ref = model.get("api_key_ref")
        if not ref:
            return None
        self.check_key_use(plpy, ref, model.get("endpoint"))
        kind, _, name = ref.partition(":")
        if kind == "env":
            return os.environ.get(name) or None
        rows = self.plan(plpy, "secret", "SELECT value FROM omop_emb.secret WHERE name = $1",
                         ["text"]).execute([name])
        return rows[0]["value"] if rows else None

    def register_model(self, plpy, name, provider, endpoint, dimensions, metric,
                       document_prefix, query_prefix, remote_model, api_key_ref, batch_size,
                       read_timeout_s, storage=None, adopt_table=None):
        name = check_name(name)
        provider = providers.check_provider(provider)
        endpoint = providers.check_endpoints(provider, endpoint)
        defaults = self.registry_defaults(plpy)
        metric = check_metric(metric or defaults["metric"])
        api_key_ref = check_key_ref(api_key_ref)
        if api_key_ref:
            self.check_key_use(plpy, api_key_ref, endpoint)
        if plpy.execute(plpy.prepare("SELECT 1 FROM omop_emb.model WHERE name = $1", ["text"]),
                        [name]):
            raise InvalidArgument("model %r is already registered" % name,
                                  hint="Use omop_emb.alter_model() to change it, or "
                                       "omop_emb.drop_model() first.")
        st = self.settings(plpy)
        sources = {}
        given = {"document": document_prefix, "query": query_prefix}
        advertised = None
        for role in prefixes.ROLES:
            if given[role] is not None:
                sources[role] = "argument"
            elif st[role] is not None:
                given[role], sources[role] = st[role], "setting"
            else:
                if advertised is None:
                    advertised = discover_prefixes(self.http, provider, endpoint,
                                                   remote_model=remote_model or name)
                if role in advertised:
                    given[role], sources[role] = advertised[role], "server"
                else:
                    given[role], sources[role] = "", "none"
        model = {
            "model_id": None, "name": name, "provider": provider, "endpoint": endpoint,
            "remote_model": remote_model or name, "dimensions": dimensions,
            "api_key_ref": api_key_ref, "connect_timeout_s": float(defaults["connect_timeout_s"]),
            "read_timeout_s": float(read_timeout_s or defaults["read_timeout_s"]),
            "max_retries": int(defaults["max_retries"]),
        }
        if dimensions is None:
            # One probe call, with the document prefix (some servers refuse bare text).
            vec = self.http.embed(model, [given["document"] + PROBE_TEXT],
                                            self.api_key(plpy, model))[0]
            dimensions = len(vec)
        if not 1 <= dimensions <= sqlgen.MAX_HALFVEC_DIMS:
            raise InvalidArgument(
                "dimensions = %d is outside 1..%d" % (dimensions, sqlgen.MAX_HALFVEC_DIMS),
                hint="pgvector indexes vector up to 2000 and halfvec up to 4000 dimensions; "
                     "ask the server for fewer dimensions (Matryoshka models allow it).")
        storage = check_storage(storage, dimensions)
        model_id, adopted = self._model_id_for(plpy, adopt_table, storage, dimensions)
        row = plpy.execute(plpy.prepare(
            "INSERT INTO omop_emb.model (model_id, name, provider, endpoint, remote_model, "
            "dimensions, metric, document_prefix, query_prefix, api_key_ref, batch_size, "
            "read_timeout_s, storage) VALUES ($13, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
            "RETURNING model_id, storage, dimensions",
            ["text", "text", "text", "text", "int4", "text", "text", "text", "text", "int4",
             "float8", "text", "int4"]),
            [name, provider, endpoint, remote_model or name, dimensions, metric,
             given["document"], given["query"], api_key_ref,
             defaults["batch_size"] if batch_size is None else batch_size,
             defaults["read_timeout_s"] if read_timeout_s is None else read_timeout_s,
             storage, model_id])[0]
        for stmt in sqlgen.create_table(dict(row)):
            if not adopted:
                plpy.execute(stmt)
            elif stmt.startswith("CREATE INDEX "):
                # Indexes on the extension's functions went with the old installation.
                plpy.execute(stmt.replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1))
        if adopted:
            self._adopt_index(plpy, row["model_id"])
        # An id used before (a model dropped with DROP EXTENSION): nothing this
        # session prepared or cached for it applies to the new model.
        self.forget_model(row["model_id"])
        plpy.notice("omop_emb: registered model %s (%s, %d dimensions, %s; prefixes: document "
                    "%r from %s, query %r from %s)"
                    % (name, provider, dimensions, metric, given["document"],
                       sources["document"], given["query"], sources["query"]))
        if given["document"] == "" or given["query"] == "":
            fam, usual = prefixes.family_of(name + " " + (remote_model or ""))
            if fam and (usual["document"] != given["document"] or usual["query"] != given["query"]):
                plpy.warning("omop_emb: model %s looks like %s, which usually expects document "
                             "prefix %r and query prefix %r; it was registered with %r and %r"
                             % (name, fam, usual["document"], usual["query"],
                                given["document"], given["query"]),
                             hint="Pass document_prefix and query_prefix to register_model(), "
                                  "or fix them with omop_emb.alter_model().")
        return row["model_id"]

    def _model_id_for(self, plpy, adopt_table, storage, dimensions):
        """(model id for a new model, whether its embedding table exists and is adopted).

        A table ``omop_emb.embedding_<id>`` of an id the registry does not know was
        left by an earlier installation (DROP EXTENSION ... CASCADE keeps tables that
        functions created) and holds embeddings: it is never dropped. adopt_table
        NULL: an error that names it; true: the new model takes it over when its
        shape matches; false: it is left alone and the next free id is taken.
        """
        # One registration at a time: the id is read before it is used.
        plpy.execute("SELECT pg_advisory_xact_lock(%d, 0)" % REGISTRY_LOCK_CLASS)
        seq = "omop_emb.model_model_id_seq"
        mid = plpy.execute("SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END "
                           "AS id FROM %s" % seq)[0]["id"]
        # Ids taken already (a row inserted with an explicit id) are skipped too.
        while plpy.execute("SELECT EXISTS (SELECT 1 FROM omop_emb.model WHERE model_id = %d) AS t"
                           % mid)[0]["t"]:
            mid += 1
        while True:
            table = sqlgen.table(mid)
            found = plpy.execute(
                "SELECT t.typname::text AS storage, a.atttypmod AS dims FROM pg_catalog.pg_attribute a "
                "JOIN pg_catalog.pg_type t ON t.oid = a.atttypid WHERE a.attrelid = "
                "to_regclass('%s') AND a.attname = 'embedding' AND NOT a.attisdropped" % table)
            exists = plpy.execute("SELECT to_regclass('%s') IS NOT NULL AS e" % table)[0]["e"]
            if not exists:
                break
            rows = plpy.execute("SELECT count(*) AS n FROM %s" % table)[0]["n"]
            shape = ("%s(%s)" % (found[0]["storage"], found[0]["dims"])) if found else "unknown shape"
            if adopt_table is None:
                raise DuplicateTable(
                    "table %s already exists (%d rows, embedding %s), left by an earlier "
                    "installation; registering a model would take its id" % (table, rows, shape),
                    detail="It is not dropped: it holds embeddings.",
                    hint="register_model(..., adopt_table => true) makes this model use it (same "
                         "dimensions and storage; index_concepts then re-embeds only what changed), "
                         "adopt_table => false leaves it alone and takes another id, or DROP TABLE "
                         "%s discards it." % table)
            if adopt_table:
                cols = {r["c"] for r in plpy.execute(
                    "SELECT a.attname::text AS c FROM pg_catalog.pg_attribute a WHERE a.attrelid = "
                    "to_regclass('%s') AND a.attnum > 0 AND NOT a.attisdropped" % table)}
                missing = [c for c in sqlgen.ROW_COLUMNS + ("embedding",) if c not in cols]
                if missing or not found or found[0]["storage"] != storage or \
                        found[0]["dims"] != dimensions:
                    raise InvalidArgument(
                        "table %s (%d rows, embedding %s%s) does not have the shape of this model "
                        "(embedding %s(%d))" % (table, rows, shape, ", missing columns %s"
                                                % ", ".join(missing) if missing else "",
                                                storage, dimensions),
                        hint="Register the model with the table's dimensions, or use adopt_table "
                             "=> false to leave the table alone.")
                break
            plpy.notice("omop_emb: left %s (%d rows) alone; the model takes the next id"
                        % (table, rows))
            mid += 1
        plpy.execute("SELECT setval('%s', greatest(%d, (SELECT coalesce(max(model_id), 1) "
                     "FROM omop_emb.model)))" % (seq, mid))
        return mid, bool(exists)

    def _adopt_index(self, plpy, model_id):
        """An adopted table's HNSW index (it outlives the extension) decides the
        model's index method and metric."""
        rows = plpy.execute(
            "SELECT opc.opcname::text AS opclass FROM pg_catalog.pg_index i "
            "JOIN pg_catalog.pg_opclass opc ON opc.oid = i.indclass[0] "
            "WHERE i.indexrelid = to_regclass('omop_emb.%s')" % sqlgen.hnsw_index_name(model_id))
        if not rows:
            return
        metric = next((m for m, (_, suffix) in sqlgen.METRIC_OPS.items()
                       if rows[0]["opclass"].endswith(suffix)), None)
        if metric:
            plpy.execute(plpy.prepare(
                "UPDATE omop_emb.model SET index_method = 'hnsw', metric = $2 WHERE model_id = $1",
                ["int4", "text"]), [model_id, metric])

    def alter_model(self, plpy, name, endpoint, provider, remote_model, api_key_ref, batch_size,
                    connect_timeout_s, read_timeout_s, max_retries, max_input_chars,
                    document_prefix, query_prefix, new_name, storage=None):
        model = self.model(plpy, check_name(name))
        if storage is not None:
            storage = check_storage(storage, model["dimensions"])
        if provider is not None:
            provider = providers.check_provider(provider)
        if endpoint is not None:
            endpoint = providers.check_endpoints(provider or model["provider"], endpoint)
        if new_name is not None:
            check_name(new_name)
        if api_key_ref is not None:
            api_key_ref = check_key_ref(api_key_ref) or ""
        # The key reference in force afterwards must reach the endpoint in force.
        ref_after = model["api_key_ref"] if api_key_ref is None else api_key_ref
        if ref_after and (api_key_ref or endpoint is not None):
            self.check_key_use(plpy, ref_after, endpoint if endpoint is not None else model["endpoint"])
        plpy.execute(plpy.prepare(
            "UPDATE omop_emb.model SET endpoint = coalesce($2, endpoint), "
            "provider = coalesce($3, provider), remote_model = coalesce($4, remote_model), "
            "api_key_ref = CASE WHEN $5 IS NULL THEN api_key_ref ELSE nullif($5, '') END, "
            "batch_size = coalesce($6, batch_size), "
            "connect_timeout_s = coalesce($7, connect_timeout_s), "
            "read_timeout_s = coalesce($8, read_timeout_s), max_retries = coalesce($9, max_retries), "
            "max_input_chars = coalesce($10, max_input_chars), "
            "document_prefix = coalesce($11, document_prefix), "
            "query_prefix = coalesce($12, query_prefix), name = coalesce($13, name), "
            "updated_at = now() WHERE model_id = $1",
            ["int4", "text", "text", "text", "text", "int4", "float8", "float8", "int4", "int4",
             "text", "text", "text"]),
            [model["model_id"], endpoint, provider, remote_model, api_key_ref, batch_size,
             connect_timeout_s, read_timeout_s, max_retries, max_input_chars, document_prefix,
             query_prefix, new_name])
        if storage is not None and storage != model["storage"]:
            self._convert_storage(plpy, model, storage)
            bump_generation(plpy, model["model_id"])  # other sessions' plans name the old type
        new = {"provider": provider, "remote_model": remote_model}
        changed = [f for f in IDENTITY_FIELDS
                   if new.get(f) is not None and new[f] != model[f]]
        if changed:
            mark_identity_changed(plpy, model["model_id"])
            plpy.notice("omop_emb: %s of model %s changed, so its stored embeddings are of "
                        "another model: vector searches are refused until CALL "
                        "omop_emb.index_concepts(model => '%s') re-embeds them"
                        % (" and ".join(changed), new_name or name, new_name or name))
        elif document_prefix is not None and document_prefix != model["document_prefix"]:
            plpy.notice("omop_emb: the document prefix of %s changed; CALL "
                        "omop_emb.index_concepts() re-embeds every concept text" % name)
        self.forget_model(model["model_id"])
        return True

    def _convert_storage(self, plpy, model, storage):
        """Rewrite the embedding table with the other storage type, in this
        transaction (nothing is lost if it fails), and rebuild the HNSW index
        with the parameters it had. Searches wait on the table lock meanwhile."""
        import json
        from .indexing import _lock_model

        mid = model["model_id"]
        _lock_model(plpy, mid)
        info = plpy.execute(plpy.prepare(
            "SELECT index_method, index_params::text AS params, metric FROM omop_emb.model "
            "WHERE model_id = $1", ["int4"]), [mid])[0]
        plpy.execute("DROP INDEX IF EXISTS omop_emb.%s" % sqlgen.hnsw_index_name(mid))
        plpy.execute(sqlgen.alter_storage(model, storage))
        plpy.execute(plpy.prepare("UPDATE omop_emb.model SET storage = $2, updated_at = now() "
                                  "WHERE model_id = $1", ["int4", "text"]), [mid, storage])
        if info["index_method"] == "hnsw":
            params = json.loads(info["params"] or "{}")
            plpy.execute(sqlgen.create_hnsw(dict(model, storage=storage), info["metric"],
                                            params.get("m", 16), params.get("ef_construction", 128)))
        plpy.notice("omop_emb: model %s now stores its embeddings as %s%s"
                    % (model["name"], storage,
                       " (HNSW index rebuilt)" if info["index_method"] == "hnsw" else ""))
        self.plans.clear()

    def drop_model(self, plpy, name, if_exists):
        try:
            model = self.model(plpy, check_name(name))
        except ModelNotFound:
            if if_exists:
                return False
            raise
        plpy.execute("DROP TABLE IF EXISTS %s" % sqlgen.table(model["model_id"]))
        # The queue has no foreign key to the model (sql/schema/0.2.0/50_index_queue_no_fk.sql).
        plpy.execute(plpy.prepare("DELETE FROM omop_emb.index_queue WHERE model_id = $1", ["int4"]),
                     [model["model_id"]])
        plpy.execute(plpy.prepare("DELETE FROM omop_emb.model WHERE model_id = $1", ["int4"]),
                     [model["model_id"]])
        self.forget_model(model["model_id"])
        return True

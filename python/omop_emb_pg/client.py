"""A typed thin client over the omop_emb SQL API.

Every method is one SQL call of the extension; the package never embeds a text or
writes a vector itself. Errors raised in the database come back as the exception
hierarchy of :mod:`omop_emb_pg.errors` (message, detail and a hint saying what to do).

    from omop_emb_pg import OmopEmb, EmbeddingRole

    with OmopEmb("dbname=omop", model="e5-small") as db:
        for hit in db.nearest("high blood pressure", k=5, domain_ids=["Condition"]):
            print(hit.concept_id, hit.concept_name, round(hit.similarity, 3))
        vecs = db.embed_texts(["Hypertensive disorder"], embedding_role=EmbeddingRole.DOCUMENT)

Names follow the Python library omop-emb (``EmbeddingRole``, ``embed_texts``,
``embeddings``, ``similarity``, ``embedding_role_prefixes``, ``embed_and_upsert_concepts``,
``get_nearest_concepts_from_query_texts``) so that its users can move over;
``EmbeddingClient`` is an alias of :class:`OmopEmb`.
"""

from __future__ import annotations

import enum
import logging
import warnings
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Callable, Iterator, Sequence

import psycopg
from psycopg.rows import dict_row

from .errors import InvalidArgument, OmopEmbError, OmopEmbWarning, clean_message, from_db_error

log = logging.getLogger("omop_emb_pg")

#: ``on_notice(severity, message, hint)``: receives what the SQL API says besides its
#: results (severity ``WARNING``, ``NOTICE``, ``INFO``...).
NoticeCallback = Callable[[str, str, "str | None"], None]


def default_notice(severity: str, message: str, hint: str | None) -> None:
    """WARNINGs become Python warnings (:class:`OmopEmbWarning`, shown once per text
    by default); NOTICEs and the rest go to the logger ``omop_emb_pg`` at INFO."""
    text = f"{message} ({hint})" if hint else message
    if severity == "WARNING":
        warnings.warn(text, OmopEmbWarning, stacklevel=2)
    else:
        log.info("%s", text)

__all__ = [
    "EmbeddingRole",
    "NearestConcept",
    "ModelStatus",
    "IndexStatus",
    "RolePrefix",
    "OmopEmb",
    "EmbeddingClient",
]


class EmbeddingRole(str, enum.Enum):
    """Which side of an asymmetric model a text is embedded for."""

    DOCUMENT = "document"
    QUERY = "query"

    def __str__(self) -> str:  # so that f"{role}" gives 'document' / 'query'
        return self.value


def _role(role: EmbeddingRole | str) -> str:
    try:
        return EmbeddingRole(role.value if isinstance(role, EmbeddingRole) else str(role).lower()).value
    except ValueError:
        raise InvalidArgument(f"invalid embedding role {role!r}",
                              hint="Use EmbeddingRole.DOCUMENT or EmbeddingRole.QUERY.") from None


def _from_row(cls, row: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in row.items() if k in names})


@dataclass(frozen=True)
class NearestConcept:
    """One row of ``omop_emb.nearest`` / ``nearest_batch``."""

    rank: int
    concept_id: int
    concept_name: str
    domain_id: str
    vocabulary_id: str
    concept_class_id: str
    standard_concept: str | None
    similarity: float
    distance: float
    matched_text: str | None
    match_kind: str | None
    exact_match: bool
    #: what rows are ordered by after exact matches (see the mode)
    score: float | None = None
    #: mode 'fused' and reranked searches: the estimated probability (0..1) that
    #: the row is a right concept; None in the other modes
    confidence: float | None = None
    query_index: int | None = None
    query: str | None = None


@dataclass(frozen=True)
class ModelStatus:
    """One row of ``omop_emb.status()``."""

    model: str
    provider: str
    endpoint: str
    dimensions: int
    metric: str
    document_prefix_recorded: str | None
    query_prefix_recorded: str | None
    document_prefix_in_force: str | None
    query_prefix_in_force: str | None
    texts: int
    concepts: int
    pending: int
    index_method: str | None
    index_params: Any
    index_size: str | None
    cache_entries: int
    cache_hits: int
    cache_misses: int
    cache_hit_rate: float | None
    vocabulary_version: str | None
    indexed_at: datetime | None
    domains: list[str] | None = None  # domains of the embedded concepts
    vocabulary_version_now: str | None = None
    stale_texts: int | None = None
    advice: str | None = None


@dataclass(frozen=True)
class IndexStatus:
    """One row of the view ``omop_emb.index_status``."""

    model: str
    active_sessions: int
    done: int
    pending: int
    total: int
    rate_per_s: float
    started_at: datetime | None
    updated_at: datetime | None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def eta_s(self) -> float | None:
        return self.pending / self.rate_per_s if self.rate_per_s else None


@dataclass(frozen=True)
class RolePrefix:
    """One row of ``omop_emb.embedding_role_prefixes()``."""

    role: str
    prefix: str
    source: str
    setting_value: str | None
    recorded_prefix: str | None


def _named(args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``, a => %(a)s, ...`` for the arguments given (not None), and their values.
    An argument left out takes the SQL function's default: the defaults live in the
    SQL signatures (``\\df omop_emb.*``) and nowhere else."""
    given = {k: v for k, v in args.items() if v is not None}
    return "".join(f", {k} => %({k})s" for k in given), given


class OmopEmb:
    """Client of the omop_emb extension over one psycopg 3 connection.

    ``conninfo_or_connection``: a libpq conninfo / URL (``""`` = the ``PG*`` environment
    variables) -- the client then owns an autocommit connection and closes it in
    :meth:`close` -- or an open ``psycopg.Connection`` (left open). ``model``: the model
    every call uses unless given one (``None``: the ``omop_emb.model`` setting, else the
    only registered model). ``on_notice``: what to do with the WARNINGs and NOTICEs the SQL
    API raises (default :func:`default_notice`: warnings and logging).
    """

    def __init__(self, conninfo_or_connection: str | psycopg.Connection = "", model: str | None = None,
                 *, on_notice: NoticeCallback | None = default_notice, **connect_kwargs: Any) -> None:
        self.model = model
        if isinstance(conninfo_or_connection, psycopg.Connection):
            self.conn = conninfo_or_connection
            self._owns = False
        else:
            try:
                self.conn = psycopg.connect(conninfo_or_connection or "", autocommit=True, **connect_kwargs)
            except psycopg.OperationalError as e:
                raise OmopEmbError(f"cannot connect to PostgreSQL: {str(e).strip()}",
                                   hint="Pass --dsn / a conninfo string, or set PGHOST, PGPORT, PGDATABASE, "
                                        "PGUSER (libpq conventions).") from None
            self._owns = True
        self._vector_registered = False
        self._notice_handler = None
        if on_notice is not None:
            def handler(diag: psycopg.errors.Diagnostic) -> None:
                on_notice(diag.severity_nonlocalized or diag.severity or "NOTICE",
                          clean_message(diag.message_primary or ""), diag.message_hint)
            self._notice_handler = handler
            self.conn.add_notice_handler(handler)

    # ------------------------------------------------------------ plumbing
    def close(self) -> None:
        if self._owns:
            self.conn.close()
        elif self._notice_handler is not None:
            self.conn.remove_notice_handler(self._notice_handler)
            self._notice_handler = None

    def __enter__(self) -> "OmopEmb":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _register_vector(self) -> None:
        if self._vector_registered:
            return
        from pgvector.psycopg import register_vector

        try:
            register_vector(self.conn)
        except psycopg.ProgrammingError:
            raise OmopEmbError("the vector type is not installed in this database",
                               hint="Install the extension first: omop-emb-pg install --dsn ...") from None
        self._vector_registered = True

    def _m(self, model: str | None) -> str | None:
        return model if model is not None else self.model

    def _rows(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[dict[str, Any]]:
        try:
            with self.conn.cursor(row_factory=dict_row) as cur:
                cur.execute(query, params)
                rows = cur.fetchall() if cur.description else []
            return rows
        except psycopg.Error as e:
            if not self.conn.autocommit and not self.conn.closed:
                try:
                    self.conn.rollback()
                except psycopg.Error:
                    pass
            raise _map_error(e) from None

    def _scalar(self, query: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
        rows = self._rows(query, params)
        return next(iter(rows[0].values())) if rows else None

    # ------------------------------------------------------------ embeddings
    def embed_texts(self, texts: Sequence[str], embedding_role: EmbeddingRole | str = EmbeddingRole.DOCUMENT,
                    *, model: str | None = None) -> list:
        """Embed ``texts`` with the role's prefix (one ``omop_emb.embed_batch`` call).
        Returns one vector (numpy array) per text; ``None`` for a NULL or blank text."""
        texts = _texts(texts)
        if not texts:
            return []
        self._register_vector()
        vecs = self._scalar("SELECT omop_emb.embed_batch(%s::text[], %s, %s)",
                            (texts, _role(embedding_role), self._m(model)))
        return [_np(v) for v in (vecs or [])]

    def embeddings(self, texts: Sequence[str] | str, embedding_role: EmbeddingRole | str = EmbeddingRole.DOCUMENT,
                   *, model: str | None = None) -> list:
        """Same as :meth:`embed_texts` (omop-emb's ``EmbeddingClient.embeddings``); a single
        string is taken as a list of one."""
        if isinstance(texts, str):
            texts = [texts]
        return self.embed_texts(texts, embedding_role, model=model)

    def embed(self, text: str, embedding_role: EmbeddingRole | str = EmbeddingRole.QUERY,
              *, model: str | None = None):
        """One text's vector (``omop_emb.embed``)."""
        self._register_vector()
        return _np(self._scalar("SELECT omop_emb.embed(%s, %s, %s)",
                                (text, _role(embedding_role), self._m(model))))

    def similarity(self, a: str | Sequence[str], b: str | Sequence[str],
                   terms_role: EmbeddingRole | str = EmbeddingRole.QUERY,
                   terms_to_match_role: EmbeddingRole | str = EmbeddingRole.DOCUMENT,
                   *, model: str | None = None):
        """Cosine similarity of ``a`` (embedded with ``terms_role``) and ``b`` (with
        ``terms_to_match_role``). Two strings give a float; lists give a matrix
        ``[len(a)][len(b)]`` (one statement)."""
        ra, rb, m = _role(terms_role), _role(terms_to_match_role), self._m(model)
        if isinstance(a, str) and isinstance(b, str):
            return self._scalar("SELECT omop_emb.similarity(%s, %s, %s, %s, %s)", (a, b, ra, rb, m))
        la = [a] if isinstance(a, str) else _texts(a)
        lb = [b] if isinstance(b, str) else _texts(b)
        if not la or not lb:
            return [[] for _ in la]
        rows = self._rows(
            "SELECT x.i, y.j, omop_emb.similarity(x.t, y.t, %s, %s, %s) AS s "
            "FROM unnest(%s::text[]) WITH ORDINALITY AS x(t, i), "
            "unnest(%s::text[]) WITH ORDINALITY AS y(t, j)",
            (ra, rb, m, la, lb))
        out = [[None] * len(lb) for _ in la]
        for r in rows:
            out[r["i"] - 1][r["j"] - 1] = r["s"]
        return out

    def embedding_role_prefixes(self, *, model: str | None = None) -> dict[EmbeddingRole, str]:
        """The prefix each role gets for the model, as in force in this session."""
        return {EmbeddingRole(p.role): p.prefix for p in self.embedding_role_prefix_details(model=model)}

    def embedding_role_prefix_details(self, *, model: str | None = None) -> list[RolePrefix]:
        """Per role: prefix in force, its source (setting or model record), setting and recorded prefix."""
        rows = self._rows("SELECT * FROM omop_emb.embedding_role_prefixes(%s)", (self._m(model),))
        return [_from_row(RolePrefix, r) for r in rows]

    def embed_and_upsert_concepts(self, concept_ids: Sequence[int], concept_texts: Sequence[str],
                                  *, model: str | None = None) -> int:
        """Embed ``concept_texts`` with the DOCUMENT role and store them for ``concept_ids``
        in the model's embedding table, in the database (one call of
        ``omop_emb.upsert_concept_texts(int[], text[], model)``). Returns the rows written."""
        ids = [int(c) for c in concept_ids]
        texts = list(concept_texts)
        if len(ids) != len(texts):
            raise InvalidArgument(f"{len(ids)} concept ids but {len(texts)} texts",
                                  hint="Pass one text per concept id.")
        if not ids:
            return 0
        return self._scalar("SELECT omop_emb.upsert_concept_texts(%s::int[], %s::text[], %s)",
                            (ids, texts, self._m(model)))

    # ------------------------------------------------------------ search
    def nearest(self, text: str, k: int | None = None, *, domain_ids: Sequence[str] | None = None,
                vocabulary_ids: Sequence[str] | None = None, concept_class_ids: Sequence[str] | None = None,
                standard_only: bool | None = None, include_invalid: bool | None = None,
                model: str | None = None, mode: str | None = None,
                rerank: bool | None = None) -> list[NearestConcept]:
        """The ``k`` concepts nearest in meaning to ``text`` (``omop_emb.nearest``), best first.
        Arguments left ``None`` take the SQL defaults; ``mode``: 'fused', 'semantic', 'lexical'
        or 'hybrid' (default: the setting omop_emb.search_mode); ``rerank``: reorder the top
        candidates with the registered reranker (default: the setting omop_emb.rerank)."""
        named, params = _named({"k": k, "domain_ids": _opt(domain_ids), "vocabulary_ids": _opt(vocabulary_ids),
                                "concept_class_ids": _opt(concept_class_ids), "standard_only": standard_only,
                                "include_invalid": include_invalid, "model": self._m(model), "mode": mode,
                                "rerank": rerank})
        rows = self._rows(f"SELECT * FROM omop_emb.nearest(%(query)s::text{named})", {"query": text, **params})
        return [_from_row(NearestConcept, r) for r in rows]

    def get_nearest_concepts_from_query_texts(
            self, query_texts: Sequence[str], k: int | None = None, *, domain_ids: Sequence[str] | None = None,
            vocabulary_ids: Sequence[str] | None = None, concept_class_ids: Sequence[str] | None = None,
            standard_only: bool | None = None, include_invalid: bool | None = None,
            model: str | None = None, mode: str | None = None,
            rerank: bool | None = None) -> list[list[NearestConcept]]:
        """For each query text (QUERY role), its ``k`` nearest concepts, best first
        (one ``omop_emb.nearest_batch`` call). The outer list follows ``query_texts``.
        ``mode`` and ``rerank`` as for :meth:`nearest`."""
        texts = list(query_texts)
        if not texts:
            return []
        named, params = _named({"k": k, "domain_ids": _opt(domain_ids), "vocabulary_ids": _opt(vocabulary_ids),
                                "concept_class_ids": _opt(concept_class_ids), "standard_only": standard_only,
                                "include_invalid": include_invalid, "model": self._m(model), "mode": mode,
                                "rerank": rerank})
        rows = self._rows(f"SELECT * FROM omop_emb.nearest_batch(%(queries)s::text[]{named})"
                          " ORDER BY query_index, rank", {"queries": texts, **params})
        out: list[list[NearestConcept]] = [[] for _ in texts]
        for r in rows:
            out[r["query_index"] - 1].append(_from_row(NearestConcept, r))
        return out

    def explain_nearest(self, text: str, k: int | None = None, *, domain_ids: Sequence[str] | None = None,
                        vocabulary_ids: Sequence[str] | None = None,
                        concept_class_ids: Sequence[str] | None = None, standard_only: bool | None = None,
                        include_invalid: bool | None = None, model: str | None = None) -> list[str]:
        """The plan of the k-NN statement ``nearest`` runs (``omop_emb.explain_nearest``), one
        line per element: shows whether the HNSW index is used."""
        named, params = _named({"k": k, "domain_ids": _opt(domain_ids), "vocabulary_ids": _opt(vocabulary_ids),
                                "concept_class_ids": _opt(concept_class_ids), "standard_only": standard_only,
                                "include_invalid": include_invalid, "model": self._m(model)})
        rows = self._rows(f"SELECT * FROM omop_emb.explain_nearest(%(query)s::text{named}) AS plan",
                          {"query": text, **params})
        return [r["plan"] for r in rows]

    # ------------------------------------------------------------ administration
    def set_secret(self, name: str, value: str) -> None:
        """Store an API key under ``name`` for ``api_key_ref='secret:NAME'`` (``omop_emb.set_secret``)."""
        self._rows("SELECT omop_emb.set_secret(%s, %s)", (name, value))

    def delete_secret(self, name: str) -> bool:
        return self._scalar("SELECT omop_emb.delete_secret(%s)", (name,))

    def bind_secret(self, name: str, endpoint: str) -> bool:
        """Superuser: allow the stored secret ``name`` to be sent to ``endpoint``
        (``omop_emb.bind_secret``)."""
        return self._scalar("SELECT omop_emb.bind_secret(%s, %s)", (name, endpoint))

    def allow_env_key(self, variable: str) -> bool:
        """Superuser: let ``api_key_ref='env:VARIABLE'`` read this server environment variable
        (``omop_emb.allow_env_key``)."""
        return self._scalar("SELECT omop_emb.allow_env_key(%s)", (variable,))

    def register_model(self, name: str, endpoint: str, *, provider: str = "openai",
                       dimensions: int | None = None, metric: str | None = None,
                       document_prefix: str | None = None, query_prefix: str | None = None,
                       remote_model: str | None = None, api_key_ref: str | None = None,
                       batch_size: int | None = None, read_timeout_s: float | None = None,
                       storage: str | None = None, adopt_table: bool | None = None) -> int:
        """Register an embedding model (``omop_emb.register_model``); returns its id.
        ``provider`` (which SQL requires): 'openai' (any OpenAI-compatible server) unless
        given. ``None``: the SQL default (prefixes: the settings, else what the server
        advertises, else empty; the rest: the registry's column defaults). ``storage``: 'vector'
        (float32) or 'halfvec' (float16). ``adopt_table``: what to do with a table of embeddings left
        by an earlier installation (None: an error naming it; True: use it; False: leave it)."""
        named, params = _named({"provider": provider, "dimensions": dimensions, "metric": metric,
                                "document_prefix": document_prefix, "query_prefix": query_prefix,
                                "remote_model": remote_model, "api_key_ref": api_key_ref,
                                "batch_size": batch_size, "read_timeout_s": read_timeout_s,
                                "storage": storage, "adopt_table": adopt_table})
        return self._scalar(f"SELECT omop_emb.register_model(name => %(name)s, endpoint => %(endpoint)s{named})",
                            {"name": name, "endpoint": endpoint, **params})

    def alter_model(self, name: str, *, endpoint: str | None = None, provider: str | None = None,
                    remote_model: str | None = None, api_key_ref: str | None = None,
                    batch_size: int | None = None, connect_timeout_s: float | None = None,
                    read_timeout_s: float | None = None, max_retries: int | None = None,
                    max_input_chars: int | None = None, document_prefix: str | None = None,
                    query_prefix: str | None = None, new_name: str | None = None,
                    storage: str | None = None) -> bool:
        """Change a registered model (``omop_emb.alter_model``): only the arguments given change."""
        named, params = _named({"endpoint": endpoint, "provider": provider, "remote_model": remote_model,
                                "api_key_ref": api_key_ref, "batch_size": batch_size,
                                "connect_timeout_s": connect_timeout_s, "read_timeout_s": read_timeout_s,
                                "max_retries": max_retries, "max_input_chars": max_input_chars,
                                "document_prefix": document_prefix, "query_prefix": query_prefix,
                                "new_name": new_name, "storage": storage})
        return self._scalar(f"SELECT omop_emb.alter_model(%(name)s{named})", {"name": name, **params})

    def drop_model(self, name: str, *, if_exists: bool | None = None) -> bool:
        named, params = _named({"if_exists": if_exists})
        return self._scalar(f"SELECT omop_emb.drop_model(%(name)s{named})", {"name": name, **params})

    # ------------------------------------------------------------ ranking and reranking
    def ranking(self, *, model: str | None = None) -> dict[str, Any]:
        """The ranking model mode 'fused' uses for a model (``omop_emb.ranking``), with its source."""
        named, params = _named({"model": self._m(model)})
        return self._scalar(f"SELECT omop_emb.ranking({named[2:]})", params)

    def set_ranking(self, model: str, ranking: dict[str, Any] | None) -> bool:
        """Store a fitted ranking model for ``model`` (None: back to the shipped default);
        ``omop-emb-pg fit-ranking`` writes it."""
        import json

        return self._scalar("SELECT omop_emb.set_ranking(%s, %s::jsonb)",
                            (model, None if ranking is None else json.dumps(ranking)))

    def register_reranker(self, name: str, provider: str, endpoint: str, *,
                          remote_model: str | None = None, api_key_ref: str | None = None,
                          top_n: int | None = None, read_timeout_s: float | None = None,
                          max_retries: int | None = None) -> int:
        """Register a reranker (``omop_emb.register_reranker``): provider 'tei' (POST /rerank)
        or 'cohere' (POST /v1/rerank). Returns its id."""
        named, params = _named({"remote_model": remote_model, "api_key_ref": api_key_ref,
                                "top_n": top_n, "read_timeout_s": read_timeout_s,
                                "max_retries": max_retries})
        return self._scalar(f"SELECT omop_emb.register_reranker(%(name)s, %(provider)s, "
                            f"%(endpoint)s{named})",
                            {"name": name, "provider": provider, "endpoint": endpoint, **params})

    def drop_reranker(self, name: str, *, if_exists: bool | None = None) -> bool:
        named, params = _named({"if_exists": if_exists})
        return self._scalar(f"SELECT omop_emb.drop_reranker(%(name)s{named})", {"name": name, **params})

    def models(self) -> list[dict[str, Any]]:
        """Rows of the view ``omop_emb.models`` (no secrets)."""
        return self._rows("SELECT * FROM omop_emb.models ORDER BY 1")

    def index_concepts(self, *, model: str | None = None, vocabulary_schema: str | None = None,
                       domain_ids: Sequence[str] | None = None, vocabulary_ids: Sequence[str] | None = None,
                       concept_class_ids: Sequence[str] | None = None,
                       include_classification: bool | None = None, include_invalid: bool | None = None,
                       include_synonyms: bool | None = None, include_mapped: bool | None = None,
                       batch_size: int | None = None,
                       max_texts: int | None = None, allow_any_relation: bool | None = None,
                       on_notice: Callable[[str], None] | None = None) -> None:
        """``CALL omop_emb.index_concepts(...)``: embed the concepts in scope (DOCUMENT role),
        committing every batch; resumable. The connection must not be inside a transaction
        block. ``on_notice`` receives the progress NOTICEs."""
        if not self.conn.autocommit:
            if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                raise InvalidArgument("index_concepts must run outside a transaction block",
                                      hint="Commit first, or use an autocommit connection.")
        handler = None
        if on_notice is not None:
            def handler(diag: psycopg.errors.Diagnostic) -> None:
                on_notice(diag.message_primary or "")
            self.conn.add_notice_handler(handler)
        old_ac = self.conn.autocommit
        try:
            if not old_ac:
                self.conn.autocommit = True
            named, params = _named({
                "model": self._m(model), "vocabulary_schema": vocabulary_schema, "domain_ids": _opt(domain_ids),
                "vocabulary_ids": _opt(vocabulary_ids), "concept_class_ids": _opt(concept_class_ids),
                "include_classification": include_classification, "include_invalid": include_invalid,
                "include_synonyms": include_synonyms, "include_mapped": include_mapped,
                "batch_size": batch_size, "max_texts": max_texts, "allow_any_relation": allow_any_relation})
            self._rows(f"CALL omop_emb.index_concepts({named[2:]})", params)
        finally:
            if not old_ac and not self.conn.closed:
                self.conn.autocommit = False
            if handler is not None:
                self.conn.remove_notice_handler(handler)

    def create_index(self, *, model: str | None = None, method: str | None = None, m: int | None = None,
                     ef_construction: int | None = None, metric: str | None = None) -> str:
        """(Re)build the model's vector index (``omop_emb.create_index``); returns its method.
        ``None``: the SQL defaults (``\\df omop_emb.create_index``)."""
        named, params = _named({"model": self._m(model), "method": method, "m": m,
                                "ef_construction": ef_construction, "metric": metric})
        return self._scalar(f"SELECT omop_emb.create_index({named[2:]})", params)

    def calibrate_index(self, *, model: str | None = None, queries: int | None = None) -> dict:
        """Measure the HNSW index's ef_search again on the real queries cached since the
        build (``omop_emb.calibrate_index``); returns the new ``index_params``.
        ``queries=None``: the SQL default."""
        named, params = _named({"model": self._m(model), "queries": queries})
        return self._scalar(f"SELECT omop_emb.calibrate_index({named[2:]})", params)

    def status(self) -> list[ModelStatus]:
        """One :class:`ModelStatus` per registered model (``omop_emb.status()``)."""
        return [_from_row(ModelStatus, r) for r in self._rows("SELECT * FROM omop_emb.status()")]

    def index_status(self, model: str | None = None) -> list[IndexStatus]:
        """Progress of ``index_concepts`` per model (view ``omop_emb.index_status``)."""
        m = self._m(model)
        rows = self._rows("SELECT * FROM omop_emb.index_status WHERE %s::text IS NULL OR model = %s "
                          "ORDER BY model", (m, m))
        return [_from_row(IndexStatus, r) for r in rows]

    def clear_cache(self, *, model: str | None = None) -> int:
        named, params = _named({"model": self._m(model)})
        return self._scalar(f"SELECT omop_emb.clear_cache({named[2:]})", params)

    def version(self) -> str:
        return self._scalar("SELECT omop_emb.version()")


#: omop-emb's name for the client.
EmbeddingClient = OmopEmb


def _np(v: Any) -> Any:
    """pgvector ``Vector`` (arrays of vectors come back that way) -> numpy array."""
    if v is None:
        return None
    to_numpy = getattr(v, "to_numpy", None)
    return to_numpy() if to_numpy is not None else v


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidArgument("expected a list of texts, got one string", hint="Wrap it: [text].")
    return list(texts)


def _opt(values: Sequence[str] | str | None) -> list[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        return [values]
    return list(values) or None


def _map_error(e: psycopg.Error) -> OmopEmbError:
    err = from_db_error(e)
    state = getattr(e.diag, "sqlstate", None)
    if state == "42883" and "omop_emb." in str(e):
        err.hint = err.hint or ("This SQL function does not exist in the installed omop_emb: upgrade the "
                                "extension (omop-emb-pg install --dsn ...).")
    elif state == "3F000":  # schema omop_emb does not exist
        err.hint = err.hint or "Install the extension: omop-emb-pg install --dsn ..."
    elif state == "57014":
        err.hint = err.hint or "The statement was cancelled; index_concepts can simply be run again to resume."
    return err


def iter_nearest(rows: Sequence[NearestConcept]) -> Iterator[dict[str, Any]]:
    """Rows as plain dicts (for JSON/CSV output)."""
    for r in rows:
        yield {f.name: getattr(r, f.name) for f in fields(r)}

"""Wire formats of the rerank APIs, and the rerankers' registry rules.

``tei``: ``POST <endpoint>/rerank`` with ``{"query", "texts"}``, answered by a
list of ``{"index", "score"}`` (Hugging Face TEI, Infinity). ``cohere``:
``POST <endpoint>/v1/rerank`` with ``{"model", "query", "documents", "top_n"}``,
answered by ``{"results": [{"index", "relevance_score"}]}`` (vLLM, Jina, Cohere).
"""

import hashlib
import json
import math

from .errors import InvalidArgument, InvalidEmbeddingResponse

PROVIDERS = ("tei", "cohere")
DEFAULT_TOP_N = 50
SETTING = "omop_emb.reranker"
RERANK_SETTING = "omop_emb.rerank"


def check_provider(provider):
    norm = (provider or "").strip().lower()
    if norm not in PROVIDERS:
        raise InvalidArgument(
            "unknown reranker provider %r" % (provider,),
            hint="Use 'tei' for POST /rerank (Hugging Face TEI, Infinity) or 'cohere' for "
                 "POST /v1/rerank (Cohere-compatible: vLLM, Jina, Cohere).")
    return norm


def rerank_url(provider, endpoint):
    url = (endpoint or "").strip().rstrip("/")
    if not (url.startswith("http://") or url.startswith("https://")):
        raise InvalidArgument("endpoint %r is not an http(s) URL" % (endpoint,),
                              hint="Register the server's base URL, e.g. 'http://127.0.0.1:8080'.")
    if url.endswith("/rerank"):
        return url
    if provider == "cohere":
        return url + ("/rerank" if url.endswith("/v1") else "/v1/rerank")
    return url + "/rerank"


def request_body(provider, remote_model, query, texts):
    if provider == "tei":
        body = {"query": query, "texts": list(texts), "raw_scores": False}
        if remote_model:
            body["model"] = remote_model
        return body
    body = {"query": query, "documents": list(texts), "top_n": len(texts)}
    if remote_model:
        body["model"] = remote_model
    return body


def parse_response(provider, payload, n):
    """Scores in input order; every index 0..n-1 exactly once, finite numbers."""
    if provider == "cohere":
        if not isinstance(payload, dict) or not isinstance(payload.get("results"), list):
            raise InvalidEmbeddingResponse("response has no 'results' list")
        items = [(r.get("index"), r.get("relevance_score")) if isinstance(r, dict) else (None, None)
                 for r in payload["results"]]
    else:
        if not isinstance(payload, list):
            raise InvalidEmbeddingResponse("response is not a list of {index, score}")
        items = [(r.get("index"), r.get("score")) if isinstance(r, dict) else (None, None)
                 for r in payload]
    if len(items) != n:
        raise InvalidEmbeddingResponse("expected %d scores, got %d" % (n, len(items)))
    scores = [None] * n
    for idx, sc in items:
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n \
                or scores[idx] is not None:
            raise InvalidEmbeddingResponse("index %r is not one of 0..%d, or repeats" % (idx, n - 1))
        if isinstance(sc, bool) or not isinstance(sc, (int, float)) or not math.isfinite(sc):
            raise InvalidEmbeddingResponse("score of document %d is %r, not a finite number"
                                           % (idx, sc))
        scores[idx] = float(sc)
    return scores


def cache_key(query, texts):
    """sha256 of the query and the candidate texts in order."""
    return hashlib.sha256(json.dumps([query, list(texts)], ensure_ascii=False)
                          .encode("utf-8")).digest()


def confidence_of(score):
    """A reranker score as a number in [0, 1]: as it is when it is one (Cohere's
    relevance_score, TEI without raw scores), else through the logistic function."""
    if 0.0 <= score <= 1.0:
        return score
    return 1.0 / (1.0 + math.exp(-score)) if score >= 0 else math.exp(score) / (1.0 + math.exp(score))

"""Wire formats of the embedding providers.

``openai``: any OpenAI-compatible ``/v1/embeddings`` (vLLM, TEI, llama.cpp,
LM Studio, OpenAI, ``omop-emb-pg serve``). ``ollama``: ``/api/embed``.
Each provider turns texts into a request body and a response body into
validated vectors.
"""

import base64
import math
import struct

from .errors import InvalidArgument, InvalidEmbeddingResponse

PROVIDERS = ("openai", "ollama")


def check_provider(provider):
    norm = (provider or "").strip().lower()
    if norm not in PROVIDERS:
        raise InvalidArgument(
            "unknown provider %r" % (provider,),
            hint="Use 'openai' for any OpenAI-compatible /v1/embeddings server "
                 "(vLLM, TEI, llama.cpp, LM Studio, OpenAI, omop-emb-pg serve) "
                 "or 'ollama' for Ollama's /api/embed.")
    return norm


def embeddings_url(provider, endpoint):
    """The URL texts are posted to, from the registered endpoint.

    A full route is used as given; a base URL gets the provider's route.
    """
    url = (endpoint or "").strip().rstrip("/")
    if not (url.startswith("http://") or url.startswith("https://")):
        raise InvalidArgument(
            "endpoint %r is not an http(s) URL" % (endpoint,),
            hint="Register the server's base URL, e.g. 'http://127.0.0.1:8765'.")
    if provider == "ollama":
        if url.endswith("/api/embed"):
            return url
        return url + "/api/embed"
    if url.endswith("/embeddings"):
        return url
    if url.endswith("/v1"):
        return url + "/embeddings"
    return url + "/v1/embeddings"


def split_endpoints(endpoint):
    """The servers of a model: its endpoint is one base URL, or several separated by
    white space (``'http://gpu1:8000 http://gpu2:8000'``), all running the same model."""
    return (endpoint or "").replace(",", " ").split() or [""]


def check_endpoints(provider, endpoint):
    """Validate every server URL of ``endpoint``; return it normalised (one space
    between servers). A repeated server is refused: it would take twice the load."""
    urls = split_endpoints(endpoint)
    for u in urls:
        embeddings_url(provider, u)
    if len(set(u.rstrip("/") for u in urls)) != len(urls):
        raise InvalidArgument("endpoint %r names a server twice" % (endpoint,),
                              hint="List each embedding server once, separated by spaces.")
    return " ".join(urls)


def request_body(provider, remote_model, texts, floats=False):
    if provider == "ollama":
        return {"model": remote_model, "input": list(texts)}
    # base64 halves the bytes on the wire and decodes faster than JSON floats into
    # Python floats; ``floats`` asks for JSON floats, whose arrays are pgvector's
    # text form already (vectors.json_arrays: indexing never decodes them).
    return {"model": remote_model, "input": list(texts),
            "encoding_format": "float" if floats else "base64"}


def _decode_b64(s):
    raw = base64.b64decode(s)
    if len(raw) % 4:
        raise InvalidEmbeddingResponse("base64 embedding is not a whole number of float32 values")
    return struct.unpack("<%df" % (len(raw) // 4), raw)


def parse_response(provider, body, expected_count):
    """Extract the list of vectors from a decoded JSON body, in input order."""
    if not isinstance(body, dict):
        raise InvalidEmbeddingResponse("response body is not a JSON object")
    if provider == "ollama":
        vecs = body.get("embeddings")
        if vecs is None and "embedding" in body:  # older /api/embeddings shape
            vecs = [body["embedding"]]
        if not isinstance(vecs, list):
            raise InvalidEmbeddingResponse("response has no 'embeddings' list")
    else:
        data = body.get("data")
        if not isinstance(data, list):
            raise InvalidEmbeddingResponse("response has no 'data' list")
        if all(isinstance(d, dict) and isinstance(d.get("index"), int) for d in data):
            data = sorted(data, key=lambda d: d["index"])
        vecs = []
        for d in data:
            emb = d.get("embedding") if isinstance(d, dict) else None
            if isinstance(emb, str):
                emb = _decode_b64(emb)
            vecs.append(emb)
    if len(vecs) != expected_count:
        raise InvalidEmbeddingResponse(
            "expected %d vectors, got %d" % (expected_count, len(vecs)))
    return vecs


def validate_vectors(vecs, dimensions, metric=None):
    """Every vector is a list of ``dimensions`` finite numbers, not all zero unless
    the model's metric is L2 (a zero vector has no direction: its cosine similarity
    to anything is NaN and its inner product 0, so it would rank nothing)."""
    for i, v in enumerate(vecs):
        if not isinstance(v, (list, tuple)) or not v:
            raise InvalidEmbeddingResponse("vector %d is not a list of numbers" % i)
        if dimensions is not None and len(v) != dimensions:
            raise InvalidEmbeddingResponse(
                "vector %d has %d dimensions, the model is registered with %d"
                % (i, len(v), dimensions))
        for x in v:
            if x.__class__ is not float:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    raise InvalidEmbeddingResponse("vector %d holds a non-number %r" % (i, x))
            if not math.isfinite(x):
                raise InvalidEmbeddingResponse("vector %d holds %r" % (i, x))
        if metric != "l2" and not any(v):
            raise InvalidEmbeddingResponse(
                "vector %d is all zeros: its %s similarity to any text is undefined"
                % (i, "inner-product" if metric == "ip" else "cosine"))
    return vecs

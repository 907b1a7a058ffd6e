"""Document/query role prefixes: which prefix applies, where it came from, and
what to warn about.

The rules (see the seed ``asymmetric-embeddings.txt`` and DESIGN.md):

* Documents get the document prefix at index time, queries the query prefix at
  query time, always.
* The settings ``omop_emb.document_embedding_prefix`` and
  ``omop_emb.query_embedding_prefix`` win when they are set (per database, role
  or session). An unset setting falls back to the prefix recorded for the model.
* An empty prefix is allowed (symmetric models) with one WARNING per session.
* A setting that disagrees with the model's record is a WARNING naming both
  values, or an ERROR when ``omop_emb.strict_prefixes`` is on.
"""

from .errors import InvalidArgument, PrefixMismatch

ROLES = ("document", "query")

SETTING_NAMES = {
    "document": "omop_emb.document_embedding_prefix",
    "query": "omop_emb.query_embedding_prefix",
}

# Usual prefixes by model family, for the hint in the empty-prefix warning.
# Always check the model card: prefixes are model-specific.
MODEL_FAMILIES = (
    ("e5", {"document": "passage: ", "query": "query: "}),
    ("nomic-embed-text", {"document": "search_document: ", "query": "search_query: "}),
    ("nomic", {"document": "search_document: ", "query": "search_query: "}),
    ("bge", {"document": "", "query": "Represent this sentence for searching relevant passages: "}),
    # Symmetric sentence-transformers models: no prefix is right.
    ("minilm", {"document": "", "query": ""}),
    ("mpnet", {"document": "", "query": ""}),
)


def check_role(role):
    """Return the normalised role or raise a clear error."""
    if role is None:
        raise InvalidArgument(
            "embedding role must not be NULL",
            hint="Pass 'document' for concept texts being indexed, 'query' for search terms.")
    norm = str(role).strip().lower()
    if norm not in ROLES:
        raise InvalidArgument(
            "unknown embedding role %r" % (role,),
            detail="The role decides which prefix is prepended to the text.",
            hint="Use 'document' for concept texts being indexed, 'query' for search terms.")
    return norm


def family_of(model_name):
    """The model family's usual prefixes, when the name is recognisable."""
    name = (model_name or "").lower()
    for key, prefixes in MODEL_FAMILIES:
        if key in name:
            return key, prefixes
    return None, None


def resolve(role, setting_value, recorded):
    """Return ``(prefix, source)`` for ``role``.

    ``setting_value`` is the session's setting, or None when the setting is not
    set. ``recorded`` is the prefix recorded for the model (None = unknown).
    """
    if setting_value is not None:
        return setting_value, "setting " + SETTING_NAMES[role]
    if recorded is not None:
        return recorded, "model"
    return "", "default (none set)"


def empty_prefix_warning(role, model_name):
    """Text of the once-per-session warning for an empty prefix."""
    msg = ("omop_emb: the %s embedding prefix is empty for model %s; texts of role %r are "
           "embedded without a prefix" % (role, model_name, role))
    fam, prefixes = family_of(model_name)
    detail = ("%s is prepended to every %s text. Empty is right for symmetric models; "
              "asymmetric models (E5, nomic-embed-text, BGE) silently lose quality without "
              "their prefixes." % (SETTING_NAMES[role], role))
    if fam and not any(prefixes.values()):
        msg += ", which is right: it looks like the %s family, a symmetric model" % fam
        hint = ("Nothing to do: %s embeds documents and queries the same way. Leave %s and %s "
                "unset (or empty) for it." % (model_name, SETTING_NAMES["document"],
                                              SETTING_NAMES["query"]))
    elif fam:
        hint = ("Model %s looks like the %s family, which usually expects %s=%r and %s=%r."
                % (model_name, fam, SETTING_NAMES["document"], prefixes["document"],
                   SETTING_NAMES["query"], prefixes["query"]))
    else:
        hint = ("Check the model card. Usual values: e5 'passage: ' / 'query: ', "
                "nomic-embed-text 'search_document: ' / 'search_query: ', "
                "bge '' / 'Represent this sentence for searching relevant passages: '.")
    return msg, detail, hint


def check_mismatch(role, model_name, setting_value, recorded, strict):
    """Compare a set prefix with the model's record.

    Returns ``None`` when they agree (or nothing is recorded), else
    ``(message, detail, hint)`` for a WARNING; raises PrefixMismatch when strict.
    """
    if setting_value is None or recorded is None or setting_value == recorded:
        return None
    what = "indexed with" if role == "document" else "registered with"
    msg = ("omop_emb: %s = %r but model %s was %s %s prefix %r"
           % (SETTING_NAMES[role], setting_value, model_name, what, role, recorded))
    detail = ("Mixing prefixes between index time and query time degrades similarity "
              "silently.")
    hint = ("RESET %s to use the model's recorded prefix, or re-index with "
            "CALL omop_emb.index_concepts() after changing it." % SETTING_NAMES[role])
    if strict:
        raise PrefixMismatch(msg, detail=detail, hint=hint)
    return msg, detail, hint

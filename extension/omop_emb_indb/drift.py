"""Vocabulary drift: has the vocabulary changed since a model was indexed?

Two signs, both cheap: the vocabulary's version (``vocabulary.vocabulary_version``
of the row ``'None'``, which OMOP vocabulary releases stamp) against the one
recorded at indexing, and the count of embedded concept names that no longer
equal the concept's name (or whose concept became invalid). status() shows both;
a search warns once per session per model when the version moved.
"""

# The vocabulary schema was chosen by an administrator (index_concepts); its
# tables are read only when the session user may read them.
READABLE_SQL = (
    "SELECT r IS NOT NULL AND pg_catalog.has_table_privilege(session_user, r, 'SELECT') AS ok "
    "FROM pg_catalog.to_regclass(pg_catalog.quote_ident($1) || '.' || $2) AS r")


def version_sql(vocab):
    """The vocabulary release of schema ``vocab`` (quoted)."""
    return ("SELECT vocabulary_version AS v FROM %s.vocabulary WHERE vocabulary_id = 'None'" % vocab)


def stale_sql(table, vocab):
    """Embedded concept names whose concept was renamed, removed or invalidated since."""
    return ("SELECT pg_catalog.count(*) AS n FROM %s e LEFT JOIN %s.concept c "
            "ON c.concept_id = e.concept_id WHERE e.text_kind = 'name' AND (c.concept_id IS NULL "
            "OR c.concept_name IS DISTINCT FROM e.text "
            "OR (c.invalid_reason IS NOT NULL AND e.invalid_reason IS NULL))" % (table, vocab))


def changes(recorded, current, stale):
    """What changed since indexing, as phrases (empty: nothing)."""
    out = []
    if current is not None and recorded is not None and current != recorded:
        out.append("vocabulary version %s -> %s" % (recorded, current))
    if stale:
        out.append("%d embedded names no longer match the vocabulary" % stale)
    return out


def action(model_name):
    return "CALL omop_emb.index_concepts(model => '%s') re-embeds what changed" % model_name


def advice(model_name, recorded, current, stale):
    """status()'s advice column: what changed and what to run, or None."""
    found = changes(recorded, current, stale)
    if not found:
        return None
    return "%s since indexing: %s" % ("; ".join(found), action(model_name))

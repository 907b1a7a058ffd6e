"""Upgrades in place: a database made with the released 0.1.0 (the frozen script,
extension/frozen/omop_emb--0.1.0.sql, exactly what 0.1.0 installed) moves to the
current version with ALTER EXTENSION ... UPDATE, or over the connection with
install(method="script"), keeping every embedding: nothing is re-embedded.
A session that was using the old runtime reloads itself on its next call."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from omop_emb_pg.install import extension_version, install

ROOT = Path(__file__).resolve().parent.parent
FROZEN = ROOT / "extension" / "frozen" / "omop_emb--0.1.0.sql"
VERSION = extension_version()


def connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


def _vocabulary(conn) -> None:
    conn.execute("CREATE SCHEMA voc; CREATE TABLE voc.concept (concept_id int PRIMARY KEY, "
                 "concept_name text, domain_id text, vocabulary_id text, concept_class_id text, "
                 "standard_concept text, concept_code text, invalid_reason text)")
    conn.execute("INSERT INTO voc.concept SELECT i, 'concept number ' || i, 'Condition', 'SNOMED', "
                 "'Clinical Finding', 'S', 'C' || i, NULL FROM generate_series(1, 40) i")


def _install_010(dsn: str, how: str) -> None:
    with connect(dsn) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        if how == "extension":
            conn.execute("CREATE EXTENSION omop_emb VERSION '0.1.0'")
        else:
            body = "\n".join(l for l in FROZEN.read_text().splitlines() if not l.startswith("\\echo"))
            conn.execute("CREATE SCHEMA omop_emb")
            conn.execute(body)
        assert conn.execute("SELECT omop_emb.version()").fetchone()[0] == "0.1.0"


def _index_with_010(dsn: str, server) -> dict:
    with connect(dsn) as conn:
        _vocabulary(conn)
        conn.execute("SELECT omop_emb.register_model('fake', 'openai', %s, dimensions => %s, "
                     "document_prefix => '', query_prefix => '')", (server.url, server.dim))
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'voc')")
        conn.execute("SELECT omop_emb.create_index('fake')")
        before = conn.execute("SELECT concept_id, embedded_at FROM omop_emb.embedding_1 ORDER BY 1").fetchall()
        top = conn.execute("SELECT concept_id FROM omop_emb.nearest('concept number 7', 3)").fetchall()
    return {"rows": before, "top": top}


@pytest.mark.parametrize("how", ["extension", "script"])
def test_upgrade_from_010_keeps_every_embedding(fresh_db, fake_embedder, how):
    if not FROZEN.is_file():
        pytest.fail(f"{FROZEN} is missing: the released 0.1.0 script must ship with the repository")
    dsn = fresh_db()
    _install_010(dsn, how)
    old = _index_with_010(dsn, fake_embedder)
    assert len(old["rows"]) == 40

    with connect(dsn) as old_session:  # a session that has loaded the 0.1.0 runtime
        old_session.execute("SELECT count(*) FROM omop_emb.nearest('concept number 3', 2)")
        texts_before = fake_embedder.stats()["texts"]

        r = install(dsn, method=how)
        assert r.changed and r.method == f"{how} upgrade from 0.1.0", r
        with connect(dsn) as conn:
            assert conn.execute("SELECT omop_emb.version()").fetchone()[0] == VERSION
            if how == "extension":
                assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'omop_emb'"
                                    ).fetchone()[0] == VERSION
            # Same embeddings, untouched; searching finds the same concepts.
            after = conn.execute("SELECT concept_id, embedded_at FROM omop_emb.embedding_1 ORDER BY 1").fetchall()
            assert after == old["rows"]
            assert conn.execute("SELECT concept_id FROM omop_emb.nearest('concept number 7', 3)"
                                ).fetchall() == old["top"]
            # Re-running the indexing finds nothing to embed.
            conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'voc')")
            assert conn.execute("SELECT count(*) FROM omop_emb.index_queue").fetchone()[0] == 0
        assert fake_embedder.stats()["texts"] == texts_before, "the upgrade re-embedded texts"

        # The session that ran 0.1.0 reloads the runtime on its next call.
        old_session.execute("SELECT count(*) FROM omop_emb.nearest('concept number 3', 2)")
        notices = []
        old_session.add_notice_handler(lambda d: notices.append(d.message_primary))
        old_session.execute("DO $$ plpy.notice(GD['omop_emb'].version) $$ LANGUAGE plpython3u")
        assert notices == [VERSION]
    assert install(dsn).method == "already installed"


def test_a_newer_installation_is_refused(fresh_db, monkeypatch):
    import omop_emb_pg.install as inst

    dsn = fresh_db()
    install(dsn)
    monkeypatch.setattr(inst, "extension_files", lambda: ("0.0.9", {}))
    with pytest.raises(inst.InstallError, match="older 0.0.9"):
        inst.install(dsn)


def test_an_api_object_a_user_built_on_stops_the_upgrade_and_nothing_changes(fresh_db, fake_embedder):
    dsn = fresh_db()
    _install_010(dsn, "script")
    with connect(dsn) as conn:
        conn.execute("CREATE VIEW public.my_models AS SELECT name FROM omop_emb.models")
    with pytest.raises(psycopg.errors.DependentObjectsStillExist):
        install(dsn, method="script")
    with connect(dsn) as conn:  # rolled back whole: still 0.1.0, the user's view intact
        assert conn.execute("SELECT omop_emb.version()").fetchone()[0] == "0.1.0"
        assert conn.execute("SELECT count(*) FROM public.my_models").fetchone()[0] == 0

"""Issue 16.5: embedding bundles. `omop-emb-pg export` writes a model's embeddings
and identity to Parquet; `omop-emb-pg import` loads them into another database
without any embedding request, refuses a bundle of another model, skips what is
present and queues rows whose hash differs."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from conftest import load_synthetic_vocabulary, register_fake_model
from omop_emb_pg import cli

import pyarrow.parquet as pq  # the test extra has pyarrow: a missing one fails, never skips


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def load_vocab(dsn, n=400):
    load_synthetic_vocabulary(dsn, ((i, f"concept {i} kind {i % 9}", ["Condition", "Drug"][i % 2], "V", "C", "S",
                                     f"C{i}", None) for i in range(1, n + 1)))


def nearest_by_vector(dsn, vectors):
    with connect(dsn) as conn:
        return [conn.execute("SELECT concept_id, round(distance::numeric, 5) FROM omop_emb.nearest(%s::vector, 10)",
                             (v,)).fetchall() for v in vectors]


@pytest.fixture
def two_dbs(fresh_db, fake_embedder):
    from conftest import install_extension

    a, b = install_extension(fresh_db()), install_extension(fresh_db())
    for dsn in (a, b):
        load_vocab(dsn)
        register_fake_model(dsn, fake_embedder, document_prefix="passage: ", query_prefix="query: ")
    with connect(a) as conn:
        # A's identity version moves on (and salts its stored hashes); B's stays 0:
        # bundles carry the unsalted hash of the text sent.
        conn.execute("SELECT omop_emb.alter_model('fake', remote_model => 'other')")
        conn.execute("SELECT omop_emb.alter_model('fake', remote_model => 'fake')")
        assert conn.execute("SELECT identity_version FROM omop_emb.model").fetchone()[0] > 0
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        conn.execute("SELECT omop_emb.create_index()")
        vecs = [r[0] for r in conn.execute(
            "SELECT omop_emb.embed(t, 'query') FROM unnest(ARRAY['kind 3', 'concept 17', 'drug 5']) t")]
    return a, b, vecs


def test_round_trip_gives_the_same_results_without_embedding(two_dbs, fake_embedder, tmp_path, capsys):
    a, b, vecs = two_dbs
    path = tmp_path / "fake.parquet"
    assert cli.main(["export", "--dsn", a, str(path)]) == 0
    out = capsys.readouterr().out
    assert "exported 400 embeddings of model 'fake'" in out
    ident = cli_identity(path)
    assert ident["remote_model"] == "fake" and ident["dimensions"] == 384 and ident["document_prefix"] == "passage: "
    assert pq.read_table(path).num_rows == 400
    # written in pages of 150 rows (keyset on the primary key): the same bundle
    from omop_emb_pg.bundle import export_bundle

    export_bundle(a, tmp_path / "paged.parquet", chunk_rows=150)
    assert pq.read_table(tmp_path / "paged.parquet").drop(["embedding"]).equals(pq.read_table(path).drop(["embedding"]))
    assert pq.read_table(tmp_path / "paged.parquet").column("embedding").equals(pq.read_table(path).column("embedding"))
    fake_embedder.reset()
    assert cli.main(["import", "--dsn", b, str(path)]) == 0
    out = capsys.readouterr().out
    assert "imported 400 embeddings into model 'fake', skipped 0" in out and "queued 0" in out
    assert "vectors/s" in out
    assert fake_embedder.stats()["texts"] == 0  # no embedding request
    assert nearest_by_vector(b, vecs) == nearest_by_vector(a, vecs)
    with connect(b) as conn:
        assert conn.execute("SELECT omop_emb.create_index()").fetchone()[0] == "hnsw"
        # (a site's own create_index calibrates on 50 of the texts embedded in the query role)
        assert fake_embedder.stats()["texts"] == 50
        fake_embedder.reset()
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
    assert fake_embedder.stats()["texts"] == 0  # everything was in the bundle
    assert nearest_by_vector(b, vecs) == nearest_by_vector(a, vecs)
    # a second import skips everything
    assert cli.main(["import", "--dsn", b, str(path)]) == 0
    assert "imported 0 embeddings into model 'fake', skipped 400" in capsys.readouterr().out


def cli_identity(path):
    from omop_emb_pg.bundle import read_identity

    return read_identity(path)


def test_rows_whose_hash_differs_are_queued_for_re_embedding(two_dbs, fake_embedder, tmp_path, capsys):
    import pyarrow as pa

    a, b, _ = two_dbs
    path = tmp_path / "fake.parquet"
    assert cli.main(["export", "--dsn", a, str(path)]) == 0
    t = pq.read_table(path)
    hashes = t.column("text_hash").to_pylist()
    hashes[7] = bytes(32)  # this vector was not embedded from 'passage: ' + its text
    t = t.set_column(t.schema.get_field_index("text_hash"), t.schema.field("text_hash"),
                     pa.array(hashes, pa.binary(32)))
    pq.write_table(t, path)
    capsys.readouterr()
    assert cli.main(["import", "--dsn", b, str(path)]) == 0
    assert "imported 399 embeddings into model 'fake', skipped 0 already present with the same hash, " \
           "queued 1 for re-embedding" in capsys.readouterr().out
    fake_embedder.reset()
    with connect(b) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 400
    assert list(fake_embedder.received_texts) == ["passage: " + t.column("text").to_pylist()[7]]


@pytest.mark.parametrize("change,detail", [
    ({"dims": 8}, "dimensions: bundle 384, model 8"),
    ({"remote_model": "other-model"}, "remote_model: bundle 'fake', model 'other-model'"),
    ({"document_prefix": "search_document: "}, "document_prefix: bundle 'passage: ', model 'search_document: '"),
])
def test_a_bundle_of_another_model_is_refused(two_dbs, fresh_db, fake_embedder, tmp_path, capsys, change, detail):
    from conftest import install_extension

    a, _, _ = two_dbs
    path = tmp_path / "fake.parquet"
    assert cli.main(["export", "--dsn", a, str(path)]) == 0
    c = install_extension(fresh_db())
    kw = {"document_prefix": "passage: ", "query_prefix": "query: ", **change}
    register_fake_model(c, fake_embedder, **kw)
    capsys.readouterr()
    assert cli.main(["import", "--dsn", c, str(path)]) == 1
    err = capsys.readouterr().err
    assert "the bundle of model 'fake' does not match registered model 'fake'" in err and detail in err, err
    # the database function refuses it too (a client that skips the check)
    with connect(c) as conn:
        ident = cli_identity(path)
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.import_begin('fake', %s::jsonb)", (psycopg.types.json.Jsonb(ident),))
        assert "does not match registered model" in e.value.diag.message_primary
        assert detail.replace("bundle 384", "bundle '384'").replace("model 8", "model '8'") in e.value.diag.message_detail
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 0


@pytest.mark.parametrize("present", [0, 100])
def test_a_bundle_holding_a_text_twice_is_refused(two_dbs, tmp_path, capsys, present):
    """Into an empty model (bulk) and one holding texts (merge): a clear error naming the text,
    and nothing imported."""
    a, b, _ = two_dbs
    path = tmp_path / "fake.parquet"
    assert cli.main(["export", "--dsn", a, str(path)]) == 0
    t = pq.read_table(path)
    if present:
        pq.write_table(t.slice(0, present), tmp_path / "part.parquet")
        assert cli.main(["import", "--dsn", b, str(tmp_path / "part.parquet")]) == 0
    import pyarrow as pa

    pq.write_table(pa.concat_tables([t.slice(0, 300), t.slice(250, 1), t.slice(300)]), path)
    before = index_definitions(b)
    capsys.readouterr()
    assert cli.main(["import", "--dsn", b, str(path)]) == 1
    err = capsys.readouterr().err
    text = t.column("text")[250].as_py()
    assert f"holds the text (251, 'name', {text!r}) (concept_id, text_kind, text) twice (rows 251 and 301); " \
           "nothing was imported" in err, err
    assert "one row per concept text" in err
    with connect(b) as conn:
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == present
    assert index_definitions(b) == before


def index_definitions(dsn):
    with connect(dsn) as conn:
        return conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'omop_emb' "
                            "AND tablename = 'embedding_1' ORDER BY 1").fetchall()


@pytest.mark.parametrize("index_connections", [1, 2])
def test_into_an_empty_model_with_an_hnsw_index(two_dbs, fake_embedder, tmp_path, capsys, index_connections):
    """Bulk mode: the indexes of the empty table are built once at the end (inside the import's
    transaction, or after commit on two connections at once), an index of the site's own too,
    the HNSW index again after commit (with the model's parameters); searches give the same results."""
    a, b, vecs = two_dbs
    path = tmp_path / "fake.parquet"
    assert cli.main(["export", "--dsn", a, str(path)]) == 0
    with connect(b) as conn:
        conn.execute("SELECT omop_emb.create_index('fake', m => 8, ef_construction => 32)")
        conn.execute("CREATE INDEX site_own_index ON omop_emb.embedding_1 (text_kind, concept_id)")
    before = index_definitions(b)
    assert any("hnsw" in d for _, d in before) and len(before) == 11
    capsys.readouterr()
    fake_embedder.reset()
    assert cli.main(["import", "--dsn", b, str(path), "--index-connections", str(index_connections)]) == 0
    out = capsys.readouterr().out
    assert "imported 400 embeddings into model 'fake', skipped 0" in out
    assert "the model was empty: 9 indexes built after the rows" in out and "HNSW index rebuilt" in out, out
    assert index_definitions(b) == before
    with connect(b) as conn:
        method, params = conn.execute("SELECT index_method, index_params FROM omop_emb.model").fetchone()
        # the same parameters, and create_index's ef_search calibration of the rebuilt graph
        assert method == "hnsw" and {k: params[k] for k in ("m", "ef_construction")} == {"m": 8, "ef_construction": 32}
        assert params["calibration"]["queries"] == 50 and params["ef_search"] >= 40, params
    assert fake_embedder.stats()["texts"] == 0
    assert nearest_by_vector(b, vecs) == nearest_by_vector(a, vecs)


@pytest.mark.parametrize("max_texts,batch_size,mode", [(60, 64, "merge"), (16, 8, "rebuild")])
def test_into_a_model_holding_some_texts(two_dbs, fake_embedder, tmp_path, capsys, max_texts, batch_size, mode):
    """Texts present with the same hash are skipped, the others stored and taken off the queue;
    a row whose hash differs is queued. Merge mode (the model holds more than a tenth of the
    bundle's rows) maintains the indexes; rebuild mode builds them again after the rows."""
    import pyarrow as pa

    a, b, vecs = two_dbs
    path = tmp_path / "fake.parquet"
    assert cli.main(["export", "--dsn", a, str(path)]) == 0
    t = pq.read_table(path)
    hashes = t.column("text_hash").to_pylist()
    texts = t.column("text").to_pylist()
    with connect(b) as conn:
        # some texts embedded here already (max_texts: whole batches); the rest stays queued
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab', max_texts => %s, batch_size => %s)",
                     (max_texts, batch_size))
        present = {r[0] for r in conn.execute("SELECT text FROM omop_emb.embedding_1")}
        assert max_texts <= len(present) < 400 and (len(present) <= 40) == (mode == "rebuild")
        pending = conn.execute("SELECT count(*) FROM omop_emb.index_queue").fetchone()[0]
    bad = next(i for i, x in enumerate(texts) if x not in present)
    hashes[bad] = bytes(32)
    pq.write_table(t.set_column(t.schema.get_field_index("text_hash"), t.schema.field("text_hash"),
                                pa.array(hashes, pa.binary(32))), path)
    before = index_definitions(b)
    if mode == "rebuild":
        # an index the table lacks (a first indexing stopped midway) is built too
        with connect(b) as conn:
            conn.execute("DROP INDEX omop_emb.embedding_1_trgm")
    capsys.readouterr()
    assert cli.main(["import", "--dsn", b, str(path)]) == 0
    out = capsys.readouterr().out
    assert f"imported {399 - len(present)} embeddings into model 'fake', skipped {len(present)} already present " \
           "with the same hash, queued 1 for re-embedding" in out
    assert ("the model held at most a tenth as many texts as the bundle: 8 indexes built" in out) == \
        (mode == "rebuild"), out
    assert index_definitions(b) == before
    with connect(b) as conn:
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 399
        # the queue held what index_concepts had not embedded yet: only the queued row is left
        assert pending > 0
        assert conn.execute("SELECT text FROM omop_emb.index_queue").fetchall() == [(texts[bad],)]
    fake_embedder.reset()
    with connect(b) as conn:
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
    assert list(fake_embedder.received_texts) == ["passage: " + texts[bad]]
    assert nearest_by_vector(b, vecs) == nearest_by_vector(a, vecs)


def admin_role(dsn):
    role = f"importer_{uuid.uuid4().hex[:8]}"
    with connect(dsn) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'x' IN ROLE omop_emb_admin")
    return role, psycopg.conninfo.make_conninfo(dsn, user=role, password="x")


def test_an_administrator_imports_through_the_staging_tables_only(two_dbs, tmp_path):
    """A non-superuser administrator: the import works (COPY into the staging tables the
    import made), but those tables are not theirs: no reading, changing or replacing them,
    and look-alikes of their own are never read by the import."""
    from omop_emb_pg.bundle import import_bundle, read_identity

    a, b, vecs = two_dbs
    path = tmp_path / "fake.parquet"
    assert cli.main(["export", "--dsn", a, str(path)]) == 0
    ident = psycopg.types.json.Jsonb(read_identity(path))
    role, dsn = admin_role(b)
    try:
        with connect(dsn) as conn:
            # look-alikes made first: import_begin refuses to start
            conn.execute("CREATE TEMP TABLE omop_emb_import_row (x int)")
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                conn.execute("SELECT omop_emb.import_begin('fake', %s)", (ident,))
            conn.execute("DROP TABLE pg_temp.omop_emb_import_row")
            # the caller's own tables of those names are never read by import_chunk
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="no import under way"):
                with conn.transaction():
                    for t in ("omop_emb_import_state", "omop_emb_import_row", "omop_emb_import_vector"):
                        conn.execute(f"CREATE TEMP TABLE {t} (ord int)")
                    conn.execute("SELECT * FROM omop_emb.import_chunk('fake')")
            with conn.transaction():
                assert conn.execute("SELECT omop_emb.import_begin('fake', %s)", (ident,)).fetchone()[0] == "bulk"
                for sql in ("SELECT * FROM pg_temp.omop_emb_import_row", "DELETE FROM pg_temp.omop_emb_import_vector",
                            "SELECT * FROM pg_temp.omop_emb_import_state", "DROP TABLE pg_temp.omop_emb_import_row",
                            "CREATE TRIGGER t BEFORE INSERT ON pg_temp.omop_emb_import_row "
                            "FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        with conn.transaction():
                            conn.execute(sql)
                conn.execute("SELECT * FROM omop_emb.import_end('fake')")
        r = import_bundle(dsn, path)
        assert (r.mode, r.imported, r.skipped, r.queued) == ("bulk", 400, 0, 0)
        assert nearest_by_vector(b, vecs) == nearest_by_vector(a, vecs)
    finally:
        with connect(b) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_analysts_cannot_import_or_export(two_dbs):
    a, _, _ = two_dbs
    role = f"analyst_{uuid.uuid4().hex[:8]}"
    with connect(a) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'x' IN ROLE omop_emb_reader")
    try:
        dsn = psycopg.conninfo.make_conninfo(a, user=role, password="x")
        with connect(dsn) as conn:
            for sql in ("SELECT * FROM omop_emb.export_embeddings('fake')",
                        "SELECT omop_emb.import_begin('fake', '{}')", "SELECT * FROM omop_emb.import_chunk('fake')",
                        "SELECT * FROM omop_emb.import_end('fake')"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(sql)
    finally:
        with connect(a) as conn:
            conn.execute(f"DROP ROLE {role}")


def test_a_bad_number_of_index_connections_is_refused_before_anything_is_written(two_dbs, tmp_path, capsys):
    a, b, _ = two_dbs
    path = tmp_path / "fake.parquet"
    assert cli.main(["export", "--dsn", a, str(path)]) == 0
    capsys.readouterr()
    assert cli.main(["import", "--dsn", b, str(path), "--index-connections", "0"]) != 0
    err = capsys.readouterr().err
    assert "index_connections = 0 is outside 1..16" in err and "Pass 1" in err, err
    with connect(b) as conn:
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 0

"""Issue 16.6: a model served by several embedding servers. Indexing sessions
spread their batches over them, queries go to any healthy one, and
`omop-emb-pg index --jobs N` runs N indexing sessions at once."""

from __future__ import annotations

import psycopg
import pytest

from conftest import load_synthetic_vocabulary, register_fake_model
from omop_emb_pg import cli
from omop_emb_pg.testing import DeterministicEmbeddingServer


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def load_vocab(dsn, n):
    load_synthetic_vocabulary(dsn, ((i, f"concept {i}", "Condition", "V", "C", "S", f"C{i}", None)
                                    for i in range(1, n + 1)))


@pytest.fixture
def second_embedder():
    with DeterministicEmbeddingServer(dim=384) as srv:
        yield srv


class _Endpoints:
    def __init__(self, *servers):
        self.url = " ".join(s.url for s in servers)
        self.dim = servers[0].dim


def test_one_session_spreads_its_batches_over_both_servers(omop_db, fake_embedder, second_embedder):
    load_vocab(omop_db, 1000)
    register_fake_model(omop_db, _Endpoints(fake_embedder, second_embedder), batch_size=50)
    with connect(omop_db) as conn:
        assert conn.execute("SELECT endpoint FROM omop_emb.models").fetchone()[0] == \
            f"{fake_embedder.url} {second_embedder.url}"
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 1000
    a, b = fake_embedder.stats()["texts"], second_embedder.stats()["texts"]
    assert a + b == 1000 and a >= 300 and b >= 300, (a, b)


def test_index_jobs_runs_sessions_that_share_the_servers(omop_db, fake_embedder, second_embedder, capsys):
    load_vocab(omop_db, 3000)
    register_fake_model(omop_db, _Endpoints(fake_embedder, second_embedder), batch_size=50)
    code = cli.main(["index", "--dsn", omop_db, "--schema", "vocab", "--jobs", "2", "--progress", "plain"])
    assert code == 0
    with connect(omop_db) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT concept_id) FROM omop_emb.embedding_1"
                            ).fetchone() == (3000, 3000)
        sessions = conn.execute("SELECT count(*), sum(done) FROM omop_emb.index_progress").fetchone()
    assert sessions[0] == 2 and sessions[1] == 3000  # two sessions did the work between them
    a, b = fake_embedder.stats()["texts"], second_embedder.stats()["texts"]
    assert a + b <= 3000 + 100 and a >= 500 and b >= 500, (a, b)
    assert "3000" in capsys.readouterr().err


def test_a_server_that_is_down_is_skipped(omop_db, fake_embedder, second_embedder):
    load_vocab(omop_db, 300)
    register_fake_model(omop_db, _Endpoints(fake_embedder, second_embedder), batch_size=50)
    second_embedder.set_fault("refuse")
    with connect(omop_db) as conn:
        conn.execute("SELECT omop_emb.alter_model('fake', max_retries => 0)")
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 300
        for q in ("fever", "cough", "rash"):
            assert conn.execute("SELECT count(*) FROM omop_emb.nearest(%s, 5)", (q,)).fetchone()[0] == 5
    assert fake_embedder.stats()["texts"] == 303
    second_embedder.clear_fault()
    fake_embedder.set_fault("refuse")
    with connect(omop_db) as conn:  # a new session: the other server takes over
        assert conn.execute("SELECT count(*) FROM omop_emb.nearest('headache', 5)").fetchone()[0] == 5
        second_embedder.set_fault("refuse")
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT * FROM omop_emb.nearest('nausea', 5)")
        assert "all 2 servers of model fake failed" in e.value.diag.message_primary


@pytest.mark.parametrize("endpoint,message", [
    ("http://127.0.0.1:1 http://127.0.0.1:1", "names a server twice"),
    ("http://127.0.0.1:1 ftp://x", "'ftp://x' is not an http(s) URL"),
])
def test_bad_server_lists_are_refused(omop_db, endpoint, message):
    with connect(omop_db) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.register_model('m', 'openai', %s, dimensions => 8, "
                         "document_prefix => '', query_prefix => '')", (endpoint,))
        assert message in e.value.diag.message_primary
        assert conn.execute("SELECT count(*) FROM omop_emb.models").fetchone()[0] == 0


def test_a_server_that_caps_request_size_gets_smaller_requests(omop_db, fake_embedder):
    """Hugging Face TEI refuses more than 32 texts in one request (HTTP 413) unless it was
    started with a larger --max-client-batch-size, and a model's default batch_size is
    larger. Indexing and search still work against it: a refused request is sent again in
    halves, the size that passed is kept for the session (no further refusals), and a
    NOTICE says how to make it the model's batch_size."""
    load_vocab(omop_db, 600)
    register_fake_model(omop_db, fake_embedder)  # the default batch_size
    fake_embedder.set_max_batch(32)
    with connect(omop_db) as conn:
        default = conn.execute("SELECT batch_size FROM omop_emb.models").fetchone()[0]
        assert default > 32
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("CALL omop_emb.index_concepts(vocabulary_schema => 'vocab')")
        assert conn.execute("SELECT count(*) FROM omop_emb.embedding_1").fetchone()[0] == 600
        st = fake_embedder.stats()
        assert st["texts"] == 600 and st["max_batch"] <= 32, st
        # at most the refusals that find the size, for each of the two requests in flight
        refused = st["refused_batches"]
        assert 1 <= refused <= 2 * (default // 32).bit_length(), st
        said = [n for n in notices if "HTTP 413" in n]
        assert len(said) == 1, notices
        assert f"refused {default} texts per request" in said[0] and \
            "omop_emb.alter_model('fake', batch_size => 32)" in said[0], said
        # later requests of the session are cut to 32 before they are sent
        queries = [f"query {i}" for i in range(100)]
        assert conn.execute("SELECT count(DISTINCT query_index) FROM omop_emb.nearest_batch(%s, 3)",
                            (queries,)).fetchone()[0] == 100
        assert fake_embedder.stats()["refused_batches"] == refused
    # A single text the server refuses stays an error, which says what to check.
    fake_embedder.set_max_batch(0)
    with connect(omop_db) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT omop_emb.embed('fever', 'query')")
    assert "HTTP 413" in e.value.diag.message_primary and "one text was too long" in e.value.diag.message_hint

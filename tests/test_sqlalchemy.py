"""examples/pandas_sqlalchemy.py: nearest() into a DataFrame through SQLAlchemy + psycopg 3."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import E5_MODEL

pd = pytest.importorskip("pandas")
sqlalchemy = pytest.importorskip("sqlalchemy")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pandas_sqlalchemy.py"


def load_example():
    spec = importlib.util.spec_from_file_location("pandas_sqlalchemy_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sqlalchemy_url(dsn: str) -> str:
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import URL

    p = conninfo_to_dict(dsn)
    host = p.get("host")
    query = {"host": host} if host and host.startswith("/") else {}
    return URL.create("postgresql+psycopg", username=p.get("user"), password=p.get("password"),
                      host=None if query else host, port=int(p["port"]) if p.get("port") else None,
                      database=p["dbname"], query=query).render_as_string(hide_password=False)


@pytest.fixture
def engine(e5_sample_db):
    eng = sqlalchemy.create_engine(sqlalchemy_url(e5_sample_db))
    yield eng
    eng.dispose()


def test_nearest_into_dataframe(engine):
    ex = load_example()
    df = ex.nearest_df(engine, "broken hip", k=5, domain_ids=["Condition"], model=E5_MODEL)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["rank", "concept_id", "concept_name", "domain_id", "vocabulary_id",
                                "similarity", "exact_match"]
    assert len(df) == 5
    assert df["rank"].tolist() == [1, 2, 3, 4, 5]
    assert df.loc[0, "concept_id"] == 4230399  # Closed fracture of hip
    assert (df["domain_id"] == "Condition").all()
    assert df["similarity"].between(0, 1).all()
    assert df["similarity"].is_monotonic_decreasing or df.loc[0, "exact_match"]


def test_nearest_with_default_filters_and_quotes(engine):
    ex = load_example()
    df = ex.nearest_df(engine, "patient's \"sugar\" diabetes; DROP TABLE x --", k=3, model=E5_MODEL)
    assert len(df) == 3  # bound parameters: quotes are text, not SQL


def test_map_terms_dataframe(engine):
    ex = load_example()
    terms = ["sugar diabetes", "broken hip", "gout"]
    df = ex.map_terms_df(engine, terms, domain_ids=["Condition"], model=E5_MODEL)
    assert df["query_index"].tolist() == [1, 2, 3]
    assert df["query"].tolist() == terms
    assert dict(zip(df["query"], df["concept_id"])) == {
        "sugar diabetes": 201826, "broken hip": 4230399, "gout": 440674}


def test_example_runs_as_a_script(e5_sample_db):
    out = subprocess.run([sys.executable, str(EXAMPLE), sqlalchemy_url(e5_sample_db), "broken hip"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "concept_id" in out.stdout and "Closed fracture of hip" in out.stdout

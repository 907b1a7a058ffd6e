"""Read omop_emb.nearest() into a pandas DataFrame through SQLAlchemy (psycopg 3).

    pip install "sqlalchemy>=2" pandas "psycopg[binary]"
    python examples/pandas_sqlalchemy.py "postgresql+psycopg://user:pass@host/db" "high blood pressure"

The URL's driver must be ``postgresql+psycopg`` (psycopg 3). The role needs
omop_emb_reader. Parameters are bound (never formatted into the SQL).
"""

from __future__ import annotations

import sys
from typing import Sequence

import pandas as pd
from sqlalchemy import bindparam, create_engine, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Engine
from sqlalchemy.types import Text

NEAREST = text(
    "SELECT rank, concept_id, concept_name, domain_id, vocabulary_id, similarity, exact_match "
    "FROM omop_emb.nearest(:query, k => :k, domain_ids => :domain_ids, model => :model)"
).bindparams(bindparam("domain_ids", type_=ARRAY(Text)))

NEAREST_BATCH = text(
    "SELECT query_index, query, rank, concept_id, concept_name, similarity "
    "FROM omop_emb.nearest_batch(:queries, k => :k, domain_ids => :domain_ids, model => :model)"
).bindparams(bindparam("queries", type_=ARRAY(Text)), bindparam("domain_ids", type_=ARRAY(Text)))


def nearest_df(engine: Engine, query: str, k: int = 10, domain_ids: Sequence[str] | None = None,
               model: str | None = None) -> pd.DataFrame:
    """The k nearest standard concepts of ``query`` as a DataFrame, best first."""
    params = {"query": query, "k": k, "domain_ids": list(domain_ids) if domain_ids else None, "model": model}
    with engine.connect() as conn:
        return pd.read_sql(NEAREST, conn, params=params)


def map_terms_df(engine: Engine, terms: Sequence[str], domain_ids: Sequence[str] | None = None,
                 model: str | None = None) -> pd.DataFrame:
    """Best standard concept for each term (one embedding request for all uncached terms)."""
    params = {"queries": list(terms), "k": 1, "domain_ids": list(domain_ids) if domain_ids else None,
              "model": model}
    with engine.connect() as conn:
        return pd.read_sql(NEAREST_BATCH, conn, params=params)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    engine = create_engine(argv[1])
    df = nearest_df(engine, argv[2], k=5)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

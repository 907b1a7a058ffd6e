"""omop_emb_pg: install and call the omop_emb PostgreSQL extension (semantic search over OMOP)."""

__version__ = "0.1.0"

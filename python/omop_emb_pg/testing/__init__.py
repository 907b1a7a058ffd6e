"""Test helpers: a deterministic embedding server with fault injection (stdlib only)."""

from .deterministic_server import DeterministicEmbeddingServer, deterministic_vector

__all__ = ["DeterministicEmbeddingServer", "deterministic_vector"]

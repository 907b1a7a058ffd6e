"""omop_emb_pg: install and call the omop_emb PostgreSQL extension (semantic search over OMOP)."""

__version__ = "0.1.0"

from .client import (  # noqa: E402
    EmbeddingClient,
    EmbeddingRole,
    IndexStatus,
    ModelStatus,
    NearestConcept,
    OmopEmb,
    RolePrefix,
)
from .errors import (  # noqa: E402
    ConfigurationError,
    EmbeddingServiceError,
    InstallError,
    InvalidArgument,
    InvalidEmbeddingResponse,
    ModelNotFound,
    NotIndexed,
    OmopEmbError,
    PermissionDenied,
    PrefixMismatch,
)

__all__ = [
    "__version__",
    "OmopEmb", "EmbeddingClient", "EmbeddingRole", "NearestConcept", "ModelStatus", "IndexStatus", "RolePrefix",
    "OmopEmbError", "InstallError", "ConfigurationError", "ModelNotFound", "PrefixMismatch", "NotIndexed",
    "EmbeddingServiceError", "InvalidEmbeddingResponse", "InvalidArgument", "PermissionDenied",
]

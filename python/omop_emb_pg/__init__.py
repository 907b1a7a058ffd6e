"""omop_emb_pg: install and call the omop_emb PostgreSQL extension (semantic search over OMOP)."""

from importlib.metadata import PackageNotFoundError, version as _dist_version

try:  # the file VERSION at the repository's top is the one place it is written
    __version__ = _dist_version("omop-emb-pg")
except PackageNotFoundError:  # pragma: no cover - a source tree on sys.path, not installed
    __version__ = "0+unknown"

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

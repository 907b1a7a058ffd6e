"""Errors raised by the in-database code, with the SQLSTATE they surface as.

Each carries a message, a detail and a hint so that ``plpy.error`` can raise a
PostgreSQL error the analyst can act on. The SQLSTATEs are stable: the Python
client maps them onto its exception hierarchy.
"""


class OmopEmbError(Exception):
    sqlstate = "OE000"

    def __init__(self, message, detail=None, hint=None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint


class EmbeddingServiceError(OmopEmbError):
    """The embedding server could not be reached or answered with an error."""
    sqlstate = "OE001"


class RequestTooLarge(EmbeddingServiceError):
    """The server refused a request as too large (HTTP 413): a request of several
    texts is sent again in halves (http_client.EmbeddingHTTP.post_fitting)."""


class InvalidEmbeddingResponse(OmopEmbError):
    """The embedding server answered, but not with what was asked for."""
    sqlstate = "OE002"


class PrefixMismatch(OmopEmbError):
    """Prefix settings disagree with the model's record (strict mode)."""
    sqlstate = "OE003"


class ModelNotFound(OmopEmbError):
    sqlstate = "OE004"


class NotIndexed(OmopEmbError):
    sqlstate = "OE005"


class InvalidArgument(OmopEmbError):
    # invalid_parameter_value: a standard SQLSTATE clients already understand.
    sqlstate = "22023"


class UnsafeRelation(OmopEmbError):
    """A relation the caller named is not a plain table (a view, a temporary or
    foreign table...): reading it could run someone else's code."""
    # wrong_object_type
    sqlstate = "42809"


class DuplicateTable(OmopEmbError):
    """A table the extension would create exists already and holds data."""
    sqlstate = "42P07"


class KeyNotAllowed(OmopEmbError):
    """An API key reference that may not be read, or not sent to this endpoint."""
    # insufficient_privilege
    sqlstate = "42501"

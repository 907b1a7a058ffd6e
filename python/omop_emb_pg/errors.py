"""Exceptions of the client package: each says what went wrong and what to do.

Errors raised inside the database carry stable SQLSTATEs (``OE001``...);
``from_db_error`` maps a psycopg error onto this hierarchy, keeping the
server's message, detail and hint.
"""

from __future__ import annotations

import psycopg


class OmopEmbError(Exception):
    """Base class. ``hint`` says what to do about it."""

    def __init__(self, message: str, *, hint: str | None = None, detail: str | None = None,
                 argument: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail
        #: The SQL argument that was wrong (e.g. ``domain_ids``), when the server says.
        self.argument = argument

    def __str__(self) -> str:
        parts = [self.message]
        if self.detail:
            parts.append(f"DETAIL: {self.detail}")
        if self.hint:
            parts.append(f"HINT: {self.hint}")
        return "\n".join(parts)


class OmopEmbWarning(UserWarning):
    """A WARNING raised by the SQL API (a blank query, prefixes that disagree, ...)."""


class InstallError(OmopEmbError):
    """The extension cannot be installed: a prerequisite or privilege is missing."""


class ConfigurationError(OmopEmbError):
    """No model, an unknown model, or prefixes that disagree in strict mode."""


class ModelNotFound(ConfigurationError):
    """The model named (or the default one) is not registered."""


class PrefixMismatch(ConfigurationError):
    """Prefix settings disagree with the model's record and omop_emb.strict_prefixes is on."""


class NotIndexed(OmopEmbError):
    """The model has no embeddings yet: run index_concepts."""


class EmbeddingServiceError(OmopEmbError):
    """The embedding server could not be reached, timed out or failed."""


class InvalidEmbeddingResponse(EmbeddingServiceError):
    """The embedding server answered with the wrong count, dimension or non-finite numbers."""


class InvalidArgument(OmopEmbError, ValueError):
    """An argument was rejected (role, k, filters, text length...)."""


class PermissionDenied(OmopEmbError):
    """The role lacks the privilege: grant omop_emb_reader or omop_emb_admin."""


SQLSTATES: dict[str, type[OmopEmbError]] = {
    "OE001": EmbeddingServiceError,
    "OE002": InvalidEmbeddingResponse,
    "OE003": PrefixMismatch,
    "OE004": ModelNotFound,
    "OE005": NotIndexed,
    "22023": InvalidArgument,
    "42501": PermissionDenied,
}

# What PL/Python and the extension put before a message: the exception's type
# (plpy.Error, spiexceptions.X) and the extension's name.
_PREFIXES = ("omop_emb: ", "plpy.Error: ", "spiexceptions.")


def clean_message(msg: str) -> str:
    """The server's message without PL/Python's exception type or the ``omop_emb:`` tag."""
    for p in _PREFIXES:
        if msg.startswith(p):
            return clean_message(msg.split(": ", 1)[1]) if ": " in msg else msg
    return msg


def from_db_error(err: psycopg.Error) -> OmopEmbError:
    diag = err.diag
    cls = SQLSTATES.get(diag.sqlstate or "", OmopEmbError)
    message = clean_message(diag.message_primary or str(err))
    hint = diag.message_hint
    if cls is PermissionDenied and not hint:
        hint = ("Ask an administrator for GRANT omop_emb_reader TO <you> (search and embed) "
                "or omop_emb_admin (register models, index).")
    return cls(message, hint=hint, detail=diag.message_detail or None,
               argument=diag.column_name or None)

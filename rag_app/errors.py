"""Domain errors: expected failures whose message tells the user what to change."""

from __future__ import annotations


class RagError(Exception):
    """Base of every expected failure; shells print the message and exit non-zero."""

    exit_code = 1


class SettingsError(RagError):
    """A setting is invalid; the message names it."""

    exit_code = 2


class EmptyIndexError(RagError):
    """The collection does not exist or holds no documents."""


class EmbeddingMismatchError(RagError):
    """The table was built with another embedding model."""


class ModelLoadError(RagError):
    """The causal LM or embedder could not be loaded."""


class ModelServerError(RagError):
    """The model server of llm.provider = openai cannot be reached, or failed a request."""


class LoaderError(RagError):
    """A file could not be read or parsed (reported per file, the batch goes on)."""


class StoreError(RagError):
    """The database location cannot be used."""


class StoreBusyError(StoreError):
    """Another process is writing the same collection and the write could not be merged."""


class MissingDependencyError(RagError):
    """An optional feature needs a package that is not installed; the message names the extra."""


class ClusterError(RagError):
    """The Ray cluster of `ingestion.engine=ray` cannot be reached."""


class TuneError(RagError):
    """`rag tune` cannot use its training data, checkpoint or output folder."""

"""Exception classes. Each also subclasses the builtin a caller would naturally catch."""


class StratascopeError(Exception):
    """Base class: a problem with the user's input, stated in one sentence."""


class CorpusError(StratascopeError, ValueError):
    """The corpus cannot be read or is empty."""


class ModelNotFoundError(StratascopeError, LookupError):
    """The model is neither bundled, a local directory, nor reachable."""


class UnsupportedModelError(StratascopeError, TypeError):
    """The model's architecture has parts no adapter knows how to find."""


class StoreExistsError(StratascopeError, FileExistsError):
    """The output path already exists."""


class StoreNotFoundError(StratascopeError, FileNotFoundError):
    """No stratascope store at the given path."""


class SchemaVersionError(StratascopeError, ValueError):
    """The store was written with an unknown or missing schema version."""


class SchemaError(StratascopeError, ValueError):
    """The store does not match the schema."""


class IncompleteRunError(StratascopeError, RuntimeError):
    """The capture that wrote this store did not finish."""


class MissingArrayError(StratascopeError, LookupError):
    """An analysis needs an array this run did not capture."""


class OutOfRangeError(StratascopeError, IndexError):
    """A prompt, position, layer or depth outside what the run holds."""


class ConfigError(StratascopeError, ValueError):
    """A capture or analysis option has a bad value."""


class DeviceError(StratascopeError, RuntimeError):
    """The requested device is not available."""


class DiskSpaceError(StratascopeError, OSError):
    """The capture would not fit on the disk."""


class OverflowError16(StratascopeError, OverflowError):
    """A value does not fit in float16."""


class ResumeMismatchError(StratascopeError, ValueError):
    """--resume was asked for a store written from another corpus, model or options."""


class MissingMetadataError(StratascopeError, LookupError):
    """An analysis needs corpus metadata (a prompt column) this run does not carry."""


class DamagedStoreError(StratascopeError, OSError):
    """A chunk of a store is damaged or missing: its checksum or length is wrong, or it was never found."""


class StoreLockedError(StratascopeError, BlockingIOError):
    """Another process is writing what this command would write (its lock file names it)."""

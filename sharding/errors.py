"""Exceptions of the sharding package."""


class ShardingError(Exception):
    """Root of every error raised by the sharding package."""


class CodecError(ShardingError):
    """A boundary codec was given a tensor or payload it cannot encode or decode."""


class DataError(ShardingError):
    """A corpus could not be loaded or a batch request cannot be served."""


class StageError(ShardingError):
    """A stage module was called with inputs that do not fit its role."""


class DeviceError(ShardingError):
    """A device or execution setting was asked for that this machine or torch does not offer."""


class StageMemoryError(StageError):
    """A stage does not fit in the memory of its device; raised before any weight is allocated."""

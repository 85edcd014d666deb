"""The user-facing errors of gemforge. Each names what was wrong: the file, tensor, field, value."""


class GemforgeError(Exception):
    """Base class of every error gemforge raises on purpose."""


class ConfigError(GemforgeError, ValueError):
    """A model's config.json is missing, malformed or describes an unsupported model."""


class CheckpointError(GemforgeError, ValueError):
    """A checkpoint's files or tensors are missing, unexpected, mis-shaped or corrupt."""


class TokenizerError(GemforgeError, ValueError):
    """The tokenizer file is missing or lacks a token gemforge needs."""


class RequestError(GemforgeError, ValueError):
    """A request or its SamplingParams is invalid; `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

"""User-facing failures. Every error a user can cause is an MrsError with a message
that says what was wrong and what to do; the CLI prints it on one line, the server
maps it to a status code (``http_status``)."""

from __future__ import annotations


class MrsError(Exception):
    """Base of every user-facing mrs failure."""

    http_status = 400


class InvalidParameterError(MrsError, ValueError):
    """A generation or sampling parameter is out of range or of the wrong type."""

    def __init__(self, name: str, value: object, valid: str):
        self.name, self.value, self.valid = name, value, valid
        super().__init__(f"invalid {name}={value!r}: must be {valid}")


class InvalidModelNameError(MrsError, ValueError):
    """A model name is malformed or would escape the models directory."""


class ModelNotFoundError(MrsError, FileNotFoundError):
    """No model by that name or path."""

    http_status = 404


class NotAModelError(MrsError):
    """A folder exists but is not a usable Hugging Face model folder."""


class UnsupportedModelError(MrsError):
    """The model's architecture or a config value is not supported by mrs."""


class WeightsError(MrsError):
    """Checkpoint tensors are missing, unexpected, mis-shaped, truncated or unsafe."""


class ContextLengthError(MrsError, ValueError):
    """The prompt (plus requested tokens) does not fit the model's context."""


class TokenizerError(MrsError):
    """The tokenizer or chat template is missing or failed."""

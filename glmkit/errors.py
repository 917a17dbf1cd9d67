"""The library's typed errors: a caller (the server) maps each type to its answer, never a message.

The request errors are ValueErrors, so code that catches ValueError keeps working. CheckpointError lives
here, below every reader (convert, ggufio), so each can raise it without importing the others.
"""


class ContextLengthError(ValueError):
    """A prompt and the tokens to generate do not fit the context (the model's positions or the cache)."""


class ParameterError(ValueError):
    """A parameter's value is outside its domain; `param` names the parameter."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as it claims to be; the message says what to do."""

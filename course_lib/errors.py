"""Error types with messages that say what is wrong and what to do.

Every check in course_lib raises one of these instead of letting a bad input reach torch,
where it would surface as an opaque shape or index error deep in a stack trace.
"""


class CourseError(ValueError):
    """Base class: a bad input, caught before any computation starts."""


class ConfigError(CourseError):
    """A model config field is missing, of the wrong type or out of range."""


class TokenizerError(CourseError):
    """Text the tokenizer cannot encode, or ids it cannot decode."""


class InputError(CourseError):
    """Token ids or tensors of the wrong shape, dtype or range for the model."""


class CheckpointError(CourseError):
    """A checkpoint directory that is missing a file, truncated or inconsistent."""

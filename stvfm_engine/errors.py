"""User-facing errors. The CLI prints any of these as one line on stderr and exits with code 2."""


class STVFMError(Exception):
    """An expected failure caused by the user's input (file, option, data), not by a bug."""


class ConfigError(STVFMError, ValueError):
    """A configuration that the model cannot be built from."""


class CheckpointError(STVFMError):
    """A checkpoint that cannot be read as ST-VFM data."""


class DataError(STVFMError):
    """A data set that does not fit the model or the expected layout."""


class InputError(STVFMError, ValueError):
    """Inference inputs that do not match what the model expects."""


class ServeError(STVFMError):
    """A server that cannot start or a request it cannot honour (bad model names, ports, answers)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, or its type name: for one-line error text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

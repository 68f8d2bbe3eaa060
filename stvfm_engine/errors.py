"""Every error class of the project, in one place. The CLI prints any :class:`STVFMError` as one line on
stderr and exits with code 2; the modules that raise them import them from here."""


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


class BackendError(STVFMError):
    """A backend that cannot run here, or an artifact it cannot open."""


class ExportError(STVFMError):
    """An artifact build step that failed or produced an artifact that does not check."""


class EngineDirError(STVFMError):
    """An engine directory that is missing, unreadable, or does not match its manifest."""


class KernelArgError(STVFMError, ValueError):
    """An argument that breaks a public ``torch.ops.stvfm.*`` op's contract (device, shape, dtype, strides)."""


class PrecisionGateError(STVFMError):
    """A reduced-precision artifact that loses more accuracy than the gate allows."""


class BuildError(STVFMError):
    """A build that cannot start or finish (bad options, unbuildable backend, unsafe output path)."""


class ParityError(STVFMError):
    """A built artifact whose output does not match the reference model within tolerance."""


class PlotError(STVFMError):
    """A plot that cannot be drawn (matplotlib missing, results that do not fit)."""


class BenchError(STVFMError):
    """A benchmark request that cannot be run (unknown backend, mismatched engines, ...)."""


class LoadError(STVFMError):
    """A load test that cannot run (bad URL, a server that is not there, an unknown model)."""


class ProtocolError(ServeError):
    """A request that is not a valid inference request for the model (answered with HTTP 400)."""


class RequestTooLarge(ProtocolError):
    """A request body over the server's size limit (answered with HTTP 413)."""


class StoreError(STVFMError):
    """A forecast-stream store that cannot be opened or written (bad path or URL, lost connection)."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, or its type name: for one-line error text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

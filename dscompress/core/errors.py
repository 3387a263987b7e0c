"""The exception type that means "the user's input is wrong", and the warnings dscompress gives."""


class DscompressError(Exception):
    """A problem with the user's input, reported by the CLI as one line and a non-zero exit.

    The message says what is wrong and what to do about it. Anything else that escapes is a bug
    in dscompress and keeps its traceback.
    """


class DscompressWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain (``raise ... from e``), where the real reason usually is."""
    seen = set()
    while error.__cause__ is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__
    return error


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (or its type name), for one-line errors."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def does_not_run(input_size, error: BaseException) -> DscompressError:
    """The error for a model that fails on a dummy input of ``input_size`` (C, H, W)."""
    return DscompressError(
        f"the model does not run on inputs of size {','.join(map(str, input_size))}: {first_line(root_cause(error))}; "
        "check --input-size (C,H,W)"
    )

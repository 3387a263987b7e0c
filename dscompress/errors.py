"""The one exception type that means "the user's input is wrong"."""


class DscompressError(Exception):
    """A problem with the user's input, reported by the CLI as one line and a non-zero exit.

    The message says what is wrong and what to do about it. Anything else that escapes is a bug
    in dscompress and keeps its traceback.
    """


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (or its type name), for one-line errors."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def does_not_run(input_size, error: BaseException) -> DscompressError:
    """The error for a model that fails on a dummy input of ``input_size`` (C, H, W)."""
    return DscompressError(
        f"the model does not run on inputs of size {','.join(map(str, input_size))}: {first_line(error)}; "
        "check --input-size (C,H,W)"
    )

"""The one exception type that means "the user's input is wrong"."""


class DscompressError(Exception):
    """A problem with the user's input, reported by the CLI as one line and a non-zero exit.

    The message says what is wrong and what to do about it. Anything else that escapes is a bug
    in dscompress and keeps its traceback.
    """

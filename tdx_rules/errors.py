"""The one exception type of tdx-rules.

Every expected failure (bad input, failed download, unsafe archive) raises
:class:`TdxError` with a one-line message that names the input and the fix.
Stage entry points print it as ``tdx-rules: error: <message>``; the SCons
glue turns that line into ``scons: *** [target] <message>``.
"""

ERROR_PREFIX = "tdx-rules: error: "


class TdxError(Exception):
    """A user-facing error: one line naming the input and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


class NotFound(TdxError):
    """The server answered 404 or 410: the file is not there (not a transient failure)."""


class ChecksumMismatch(TdxError):
    """Downloaded bytes do not have the expected SHA-256."""


class BadChecksumFile(TdxError):
    """An upstream checksum file is malformed or does not list the expected file."""

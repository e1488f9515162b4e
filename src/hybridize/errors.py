"""One exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class HybridizeError(Exception):
    """A problem the user can fix (bad source, bad flag, existing output). Never a bug in hybridize."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (for wrapping library errors)."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

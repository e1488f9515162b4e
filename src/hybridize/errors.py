"""One exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class HybridizeError(Exception):
    """A problem the user can fix (bad source, bad flag, existing output). Never a bug in hybridize."""

"""The one exception type users see: its message is the one-line error the CLI prints."""


class LazyshimError(Exception):
    """An expected failure (bad input, bad image, unreachable registry): no traceback."""

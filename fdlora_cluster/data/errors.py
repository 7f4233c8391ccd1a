"""The one error type of the data layer."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and line (or row, or client)."""

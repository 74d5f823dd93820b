"""The exception the data layer raises for bad input (re-exported by :mod:`contrast.data`)."""


class DatasetError(ValueError):
    """Bad dataset input; the message always names the offending file or folder."""

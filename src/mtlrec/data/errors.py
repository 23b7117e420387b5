"""The error every data problem raises: the message names the column (and row, and file)."""


class DataError(ValueError):
    """The data does not fit the schema; the message names the column (and row)."""


def row_label(value):
    """A row label as Python shows it in a message: 3, not np.int64(3)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value

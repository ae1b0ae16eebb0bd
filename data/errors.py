"""The one exception type the data package raises for problems with dataset files."""


class DatasetError(ValueError):
    """Dataset files are missing, truncated or corrupt; the message is one line saying
    which file or folder is at fault and what to put where."""

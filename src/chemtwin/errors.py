"""The one exception type that means "the user gave bad input".

The CLI turns it into a single line on stderr and exit code 2; the Python API lets
it propagate so that notebooks see a normal traceback.
"""


class InputError(ValueError):
    """Bad user input: wrong path, wrong shape, NaNs, labels out of range, ..."""

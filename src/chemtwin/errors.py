"""The one exception type that means "the user gave bad input".

The CLI turns it into a single line on stderr and exit code 2; the Python API lets
it propagate so that notebooks see a normal traceback.

Library messages speak Python: they name parameters (``overwrite=True``, ``n_groups``).
``options`` lists the parameters a message names, so that the CLI can show its own
flags in their place (``--overwrite``, ``--n-groups``; ``chemtwin.cli.main``).
"""


class InputError(ValueError):
    """Bad user input: wrong path, wrong shape, NaNs, labels out of range, ..."""

    def __init__(self, message: str = "", *options: str):
        super().__init__(message)
        self.options = options

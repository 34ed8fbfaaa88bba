"""chemtwin: find chemically identical stars from their spectra."""

__version__ = "0.1.0"

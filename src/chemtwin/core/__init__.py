"""The ground floor: what every layer may import, and which imports nothing of chemtwin
above it (docs/architecture.md).

* ``chemtwin.core.files``      atomic writes, output checks, the one JSON writer
* ``chemtwin.core.grids``      the APOGEE wavelength grids, conversion and resampling
* ``chemtwin.core.ranks``      doppelganger ranks, twin pairs and groups, the distances
* ``chemtwin.core.whitening``  whitening by a covariance (the Mahalanobis distance)
"""

"""Readers for APOGEE spectra: apStar, aspcapStar and apVisit files (catalogues: ``allstar``).

What the files hold (checked against real DR17 files; details in docs/apogee.md):

* **apStar** -- primary header: OBJID (the APOGEE ID), NVISITS, SNR, VHELIO, CRVAL1 = 4.179,
  CDELT1 = 6e-6, NWAVE = 8575.  HDU1 flux, HDU2 error, HDU3 pixel bitmask, each
  (rows, 8575).  With NVISITS > 1 there are NVISITS + 2 rows: row 0 the combined spectrum
  with pixel-based weighting (the one with a bitmask), row 1 the combined spectrum with
  global weighting (its bitmask row is all zero), then one row per visit.  With NVISITS = 1
  row 0 is the spectrum (we also met a second, all-zero row).  Combined rows are NaN in the
  detector gaps; visit rows are 0 there.  The spectra are in the stellar rest frame.
* **aspcapStar** -- HDU1 normalized flux, HDU2 error on an APOGEE grid (8,575 or 7,214
  pixels), HDU3 the best-fit model; no pixel bitmask.  Rest frame, already normalized.
  (No real aspcapStar file was available to check; the reader follows the DR17 data model.)
* **apVisit** -- HDU1 flux, HDU2 error, HDU3 bitmask, HDU4 wavelength, each (3, 4096): one
  row per chip in the order red, green, blue, wavelengths *decreasing* along each row, in the
  observatory frame.  Header VHELIO = VRAD + BC; VRAD is the shift to remove to reach the
  stellar rest frame.

Bad pixels: a pixel whose bitmask has any of the bits in ``BAD_PIXEL_BITS`` set, whose error
is not finite and positive, or whose flux is not finite gets ``ivar = 0``.  Its flux is kept
when finite (0 otherwise).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chemtwin.core.files import describe_error, open_fits
from chemtwin.core.grids import (
    APSTAR_LOG10_START,
    APSTAR_LOG10_STEP,
    APSTAR_N_PIXELS,
    get_grid,
)
from chemtwin.errors import InputError

# APOGEE_PIXMASK bit names (DR17).
PIXMASK_BITS = {
    0: "BADPIX", 1: "CRPIX", 2: "SATPIX", 3: "UNFIXABLE", 4: "BADDARK", 5: "BADFLAT", 6: "BADERR",
    7: "NOSKY", 8: "LITTROW_GHOST", 9: "PERSIST_HIGH", 10: "PERSIST_MED", 11: "PERSIST_LOW",
    12: "SIG_SKYLINE", 13: "SIG_TELLURIC", 14: "NOT_ENOUGH_PSF",
}
BAD_PIXEL_BITS = tuple(range(10)) + (12, 13)
BAD_PIXEL_MASK = sum(1 << b for b in BAD_PIXEL_BITS)
SPECTRUM_KINDS = ("apStar", "aspcapStar", "apVisit")
# The DR17 layout of a local mirror of the SDSS Science Archive Server (the SDSS data model):
# {root}/apogee/spectro/redux/dr17/stars/{TELESCOPE}/{FIELD}/apStar-dr17-{APOGEE_ID}.fits and
# {root}/apogee/spectro/aspcap/dr17/synspec_rev1/{TELESCOPE}/{FIELD}/aspcapStar-dr17-{APOGEE_ID}.fits
DR17_LAYOUT = {
    "apStar": ("apogee/spectro/redux/dr17/stars", "apStar-dr17-{}.fits"),
    "aspcapStar": ("apogee/spectro/aspcap/dr17/synspec_rev1", "aspcapStar-dr17-{}.fits"),
}


@dataclass
class Spectrum:
    """One spectrum as read from a file (not yet normalized unless ``normalized``).

    ``wavelength`` is increasing, vacuum Angstrom.  For apVisit files the three chips are
    concatenated (blue, green, red) and ``chip_slices`` marks them; the detector gaps lie
    between chips.  ``bitmask`` is the APOGEE pixel mask (zeros when the file has none).
    """

    path: str
    kind: str  # one of SPECTRUM_KINDS
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    bitmask: np.ndarray
    apogee_id: str
    snr: float
    vhelio: float  # barycentric radial velocity, km/s (NaN if unknown)
    nvisits: int
    vrad: float = float("nan")  # apVisit: observed-frame Doppler shift (VHELIO - BC), km/s
    rest_frame: bool = True
    normalized: bool = False
    grid: str | None = None  # name of the APOGEE grid the pixels are on, or None
    chip_slices: tuple[slice, ...] = field(default_factory=tuple)
    header: dict = field(default_factory=dict)

    @property
    def n_good(self) -> int:
        return int(np.count_nonzero(self.ivar > 0))


def dr17_path(root: str | os.PathLike, telescope: str, field: str, apogee_id: str, kind: str = "apStar") -> Path:
    """Where the DR17 ``kind`` file (apStar or aspcapStar) of a star lies under a mirror ``root``
    (allStar's TELESCOPE, FIELD, APOGEE_ID; ``DR17_LAYOUT``)."""
    if kind not in DR17_LAYOUT:
        raise InputError(f"unknown DR17 spectrum kind {kind!r}; choose {' or '.join(DR17_LAYOUT)}")
    folder, name = DR17_LAYOUT[kind]
    telescope, field, apogee_id = (str(v).strip() for v in (telescope, field, apogee_id))
    if not (telescope and field and apogee_id) or any("/" in v or v in (".", "..") for v in (telescope, field)):
        raise InputError(f"no DR17 path for TELESCOPE={telescope!r}, FIELD={field!r}, APOGEE_ID={apogee_id!r}")
    return Path(root) / folder / telescope / field / name.format(apogee_id)


def dr17_location(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(TELESCOPE, FIELD)`` of a file placed as DR17 places it (``.../stars/TEL/FIELD/apStar-dr17-ID.fits``
    or ``.../synspec_rev1/TEL/FIELD/aspcapStar-dr17-ID.fits``); None for any other path."""
    parts = Path(path).parts
    if len(parts) < 4:
        return None
    for folder, name in DR17_LAYOUT.values():
        prefix = name.split("{}")[0]
        if parts[-4] == Path(folder).name and parts[-1].startswith(prefix):
            return parts[-3], parts[-2]
    return None


def _header_value(header, keys, default=None):
    for key in keys:
        if key in header:
            value = header[key]
            if isinstance(value, str):
                value = value.strip()
            return value
    return default


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _as_int(value, default: int) -> int:
    number = _as_float(value)
    return int(number) if np.isfinite(number) else default


def _ivar(flux: np.ndarray, error: np.ndarray, bitmask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(flux with non-finite values set to 0, ivar with bad pixels set to 0)."""
    flux = np.asarray(flux, dtype=np.float64)
    error = np.asarray(error, dtype=np.float64)
    # Exactly 0 flux means "no data" (apStar visit rows in the detector gaps carry 0 +- 1e13).
    good = np.isfinite(flux) & (flux != 0) & np.isfinite(error) & (error > 0)
    if bitmask is not None:
        good &= (np.asarray(bitmask, dtype=np.int64) & BAD_PIXEL_MASK) == 0
    ivar = np.zeros_like(flux)
    np.divide(1.0, error**2, out=ivar, where=good)
    ivar[~np.isfinite(ivar)] = 0.0
    return np.where(np.isfinite(flux), flux, 0.0), ivar


def _data(hdus, index: int, path: Path) -> np.ndarray:
    """Data of HDU ``index`` as a native-endian array; InputError if absent or unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*truncated.*")
            data = hdus[index].data
    except IndexError:
        raise InputError(f"{path}: has no HDU{index}") from None
    except Exception as exc:
        raise InputError(f"{path}: HDU{index} is unreadable ({describe_error(exc, 120)})") from None
    if data is None:
        raise InputError(f"{path}: HDU{index} holds no data")
    return np.asarray(data).astype(np.asarray(data).dtype.newbyteorder("="), copy=True)


def detect_kind(hdus) -> str | None:
    """'apStar', 'aspcapStar', 'apVisit' or None, from the HDU structure (not the file name).

    Only headers are looked at (shapes from NAXISn, integer type from BITPIX).
    """
    if len(hdus) < 3:
        return None

    def shape(i):
        if i >= len(hdus) or not hdus[i].is_image:
            return None
        return tuple(hdus[i].shape) or None

    first = shape(1)
    if first is None:
        return None
    if first == (3, 4096) and shape(4) == (3, 4096) and "wave" in str(hdus[4].header.get("BUNIT", "")).lower():
        return "apVisit"
    if shape(2) != first or len(first) > 2:
        return None
    n_pixels = first[-1]
    if n_pixels not in (APSTAR_N_PIXELS, get_grid("aspcap").n_pixels, get_grid("aspcap7514").n_pixels):
        return None
    integer_hdu3 = shape(3) == first and int(hdus[3].header.get("BITPIX", -32)) > 0
    if integer_hdu3 and n_pixels == APSTAR_N_PIXELS:
        return "apStar"
    if len(first) == 1 and not integer_hdu3:
        return "aspcapStar"
    return None


def read_spectrum(path: str | os.PathLike, row: int | str = "combined") -> Spectrum:
    """Read any supported APOGEE spectrum file; the kind is recognized from its structure."""
    with open_fits(path) as hdus:
        kind = detect_kind(hdus)
        if kind is None:
            raise InputError(f"{path}: not an APOGEE apStar, aspcapStar or apVisit spectrum")
        return _READERS[kind](hdus, Path(path), row)


@dataclass
class FileFacts:
    """What the primary header says about a spectrum file, read without its pixels."""

    path: str
    kind: str
    apogee_id: str
    snr: float
    telescope: str  # "" when unknown
    field: str      # "" when unknown


def file_facts(path: str | os.PathLike) -> FileFacts:
    """Kind, APOGEE ID, SNR, TELESCOPE and FIELD of a spectrum file: TELESCOPE and FIELD from a
    DR17 path (``dr17_location``), else the header (apStar FIELD, apVisit TELESCOP); InputError
    when it is not an APOGEE spectrum."""
    with open_fits(path) as hdus:
        kind = detect_kind(hdus)
        if kind is None:
            raise InputError(f"{path}: not an APOGEE apStar, aspcapStar or apVisit spectrum")
        header = hdus[0].header
        info = _common_header(header)
        location = dr17_location(path) or (str(_header_value(header, ("TELESCOPE", "TELESCOP"), "")),
                                           str(_header_value(header, ("FIELD",), "")))
    return FileFacts(str(path), kind, info["apogee_id"].strip(), info["snr"], *location)


def read_apstar(path: str | os.PathLike, row: int | str = "combined") -> Spectrum:
    """An apStar spectrum: ``row`` is 'combined' (row 0), 'global' (row 1 when NVISITS > 1),
    'visitK' (visit K, 1-based) or an integer row index."""
    with open_fits(path) as hdus:
        if detect_kind(hdus) != "apStar":
            raise InputError(f"{path}: not an apStar file (expected HDU1-3 flux, error, bitmask of 8575 pixels)")
        return _apstar(hdus, Path(path), row)


def read_aspcapstar(path: str | os.PathLike, row: int | str = "combined") -> Spectrum:
    with open_fits(path) as hdus:
        if detect_kind(hdus) != "aspcapStar":
            raise InputError(f"{path}: not an aspcapStar file (expected 1-D HDU1 flux and HDU2 error)")
        return _aspcapstar(hdus, Path(path), row)


def read_apvisit(path: str | os.PathLike, row: int | str = "combined") -> Spectrum:
    with open_fits(path) as hdus:
        if detect_kind(hdus) != "apVisit":
            raise InputError(f"{path}: not an apVisit file (expected (3, 4096) flux and HDU4 wavelengths)")
        return _apvisit(hdus, Path(path), row)


def apstar_row(header, n_rows: int, row: int | str) -> int:
    """Index of the requested row in an apStar HDU1 with ``n_rows`` rows."""
    nvisits = _as_int(header.get("NVISITS"), 1)
    combined_rows = 2 if nvisits > 1 else 1
    if isinstance(row, (int, np.integer)):
        index = int(row)
    elif row == "combined":
        index = 0
    elif row == "global":
        if nvisits <= 1:
            raise InputError("a single-visit apStar file has no globally weighted combined row")
        index = 1
    elif isinstance(row, str) and row.startswith("visit") and row[5:].isdigit():
        k = int(row[5:])
        if not 1 <= k <= nvisits:
            raise InputError(f"visit {k} requested; the file has NVISITS = {nvisits}")
        index = combined_rows + k - 1 if nvisits > 1 else 0
    else:
        raise InputError(f"unknown apStar row {row!r}; use 'combined', 'global', 'visitK' or an integer")
    if not 0 <= index < n_rows:
        raise InputError(f"row {index} requested; HDU1 has {n_rows} row(s)")
    return index


def _common_header(header) -> dict:
    return {
        "apogee_id": str(_header_value(header, ("APOGEE_ID", "OBJID", "OBJECT", "TARGET_ID"), "")),
        "snr": _as_float(_header_value(header, ("SNR",), np.nan)),
        "vhelio": _as_float(_header_value(header, ("VHELIO",), np.nan)),
    }


def _check_wcs(header, path: Path, n_pixels: int) -> None:
    crval = _as_float(header.get("CRVAL1", APSTAR_LOG10_START))
    cdelt = _as_float(header.get("CDELT1", APSTAR_LOG10_STEP))
    if n_pixels == APSTAR_N_PIXELS and (abs(crval - APSTAR_LOG10_START) > 1e-9 or abs(cdelt - APSTAR_LOG10_STEP) > 1e-12):
        raise InputError(f"{path}: CRVAL1={crval}, CDELT1={cdelt} is not the apStar grid (4.179, 6e-6)")


def _apstar(hdus, path: Path, row) -> Spectrum:
    header = hdus[0].header
    flux_all = np.atleast_2d(_data(hdus, 1, path))
    err_all = np.atleast_2d(_data(hdus, 2, path))
    mask_all = np.atleast_2d(_data(hdus, 3, path))
    if not (flux_all.shape == err_all.shape == mask_all.shape) or flux_all.shape[-1] != APSTAR_N_PIXELS:
        raise InputError(f"{path}: HDU1-3 shapes {flux_all.shape}, {err_all.shape}, {mask_all.shape} disagree")
    _check_wcs(hdus[1].header if "CRVAL1" in hdus[1].header else header, path, APSTAR_N_PIXELS)
    index = apstar_row(header, flux_all.shape[0], row)
    bitmask = mask_all[index].astype(np.int64)
    flux, ivar = _ivar(flux_all[index], err_all[index], bitmask)
    info = _common_header(header)
    nvisits = _as_int(header.get("NVISITS"), 1)
    return Spectrum(
        path=str(path), kind="apStar", wavelength=get_grid("apstar").wavelength, flux=flux, ivar=ivar,
        bitmask=bitmask, nvisits=nvisits, rest_frame=True, normalized=False, grid="apstar",
        chip_slices=get_grid("apstar").chip_slices, header=dict(header), **info,
    )


def _aspcapstar(hdus, path: Path, row) -> Spectrum:
    header = hdus[0].header
    flux = _data(hdus, 1, path).astype(np.float64)
    error = _data(hdus, 2, path).astype(np.float64)
    if flux.ndim != 1 or flux.shape != error.shape:
        raise InputError(f"{path}: aspcapStar HDU1/HDU2 shapes {flux.shape}, {error.shape} disagree")
    grid_name = {APSTAR_N_PIXELS: "apstar", get_grid("aspcap").n_pixels: "aspcap",
                 get_grid("aspcap7514").n_pixels: "aspcap7514"}[flux.size]
    grid = get_grid(grid_name)
    if grid_name == "apstar":
        _check_wcs(hdus[1].header if "CRVAL1" in hdus[1].header else header, path, flux.size)
    flux, ivar = _ivar(flux, error, None)
    # ASPCAP stores masked pixels / gaps as flux 0 or huge errors: _ivar already zeroes those
    # with non-finite errors; zero flux is never a usable normalized flux.
    ivar[flux <= 0] = 0.0
    info = _common_header(header)
    nvisits = _as_int(header.get("NVISITS"), 0)
    return Spectrum(
        path=str(path), kind="aspcapStar", wavelength=grid.wavelength, flux=flux, ivar=ivar,
        bitmask=np.zeros(flux.size, dtype=np.int64), nvisits=nvisits, rest_frame=True, normalized=True,
        grid=grid_name, chip_slices=grid.chip_slices, header=dict(header), **info,
    )


def _apvisit(hdus, path: Path, row) -> Spectrum:
    if row not in ("combined", 0):
        raise InputError(f"{path}: an apVisit file holds one spectrum; row {row!r} does not exist")
    header = hdus[0].header
    flux = _data(hdus, 1, path).astype(np.float64)
    error = _data(hdus, 2, path).astype(np.float64)
    mask = _data(hdus, 3, path).astype(np.int64)
    wave = _data(hdus, 4, path).astype(np.float64)
    if not (flux.shape == error.shape == mask.shape == wave.shape):
        raise InputError(f"{path}: apVisit HDU1-4 shapes disagree")
    # Each chip's wavelengths must be monotonic; put everything in increasing order, chips by
    # wavelength (blue, green, red).
    chips = []
    for c in range(wave.shape[0]):
        w = wave[c]
        if not np.all(np.isfinite(w)) or not (np.all(np.diff(w) < 0) or np.all(np.diff(w) > 0)):
            raise InputError(f"{path}: chip {c} wavelengths are not finite and monotonic")
        order = np.argsort(w)
        chips.append((w[order][0], w[order], flux[c][order], error[c][order], mask[c][order]))
    chips.sort(key=lambda item: item[0])
    w = np.concatenate([c[1] for c in chips])
    if np.any(np.diff(w) <= 0):
        raise InputError(f"{path}: apVisit chips overlap in wavelength")
    bitmask = np.concatenate([c[4] for c in chips])
    f, ivar = _ivar(np.concatenate([c[2] for c in chips]), np.concatenate([c[3] for c in chips]), bitmask)
    sizes = np.cumsum([0] + [c[1].size for c in chips])
    info = _common_header(header)
    vrad = _as_float(header.get("VRAD", np.nan))
    if not np.isfinite(vrad):
        vrad = info["vhelio"] - _as_float(header.get("BC", np.nan))
    return Spectrum(
        path=str(path), kind="apVisit", wavelength=w, flux=f, ivar=ivar, bitmask=bitmask, nvisits=1,
        vrad=vrad, rest_frame=False, normalized=False, grid=None,
        chip_slices=tuple(slice(int(a), int(b)) for a, b in zip(sizes[:-1], sizes[1:])),
        header=dict(header), **info,
    )


_READERS = {"apStar": _apstar, "aspcapStar": _aspcapstar, "apVisit": _apvisit}


# Header keywords that may hold a label, in order of preference: the label's own name (files
# written by other tools), then DR17 apStar's Doppler fit (RV_TEFF, "Effective temperature
# from RV fit"), then apVisit's mini-grid cross-correlation (RVTEFF).  The last two are the
# RV pipeline's template parameters -- coarse (apVisit values sit on a 500 K / 1 dex grid)
# and sometimes pinned at a grid edge -- not ASPCAP labels.
HEADER_LABEL_KEYS = {
    "TEFF": ("TEFF", "RV_TEFF", "RVTEFF"),
    "LOGG": ("LOGG", "RV_LOGG", "RVLOGG"),
    "FE_H": ("FE_H", "FEH", "RV_FEH", "RVFEH"),
}


def header_labels(spectrum: Spectrum, names) -> np.ndarray:
    """Values of labels ``names`` from the spectrum's primary header (``HEADER_LABEL_KEYS``);
    InputError naming the file when one has no finite value."""
    values = []
    for name in names:
        keys = HEADER_LABEL_KEYS.get(name, (name,))
        found = [v for v in (_as_float(spectrum.header.get(k)) for k in keys if k in spectrum.header) if np.isfinite(v)]
        if not found:
            raise InputError(f"{spectrum.path}: no {name} in the header (looked for {', '.join(keys)}); use a catalogue")
        values.append(found[0])
    return np.array(values, dtype=np.float64)



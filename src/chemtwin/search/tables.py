"""Outputs the field opens: latents, twin-search results and cluster assignments as astropy tables.

One table per output, written as a FITS binary table (``.fits``), ECSV (``.ecsv``) or an HDF5
file in astropy's table layout (a compound dataset ``table`` + ``table.__table_column_meta__``),
so that ``astropy.table.Table.read(path)`` and TOPCAT open them without arguments
(docs/search.md "Tables for the field").  The format is ``--format`` or the output's suffix.

Columns follow APOGEE's allStar names where there is one: ``APOGEE_ID`` (chemtwin's
``star_id``), ``TELESCOPE``, ``FIELD``; labels keep their allStar names with astropy units
(TEFF in K, LOGG and abundances in dex, velocities in km/s).  FITS has no ``dex``: the
column's TUNIT is written as ``dex`` anyway (TOPCAT shows it; astropy reads it back as an
``UnrecognizedUnit`` with a UnitsWarning); ECSV and HDF5 keep ``u.dex`` exactly.

This module owns the FITS and ECSV tables and the astropy HDF5 table files of search results
(``search_table``) and clusters; the latent table's columns are built by the latent file's
owner (``chemtwin.search.latents.latent_table``).  Every write is atomic (``core.files``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import astropy.units as u
import h5py
import numpy as np
from astropy.io import fits
from astropy.io.misc.hdf5 import write_table_hdf5
from astropy.table import Table
from astropy.utils.exceptions import AstropyWarning

from chemtwin.core.files import atomic_output, json_safe, new_hdf5
from chemtwin.errors import InputError

FORMATS = ("hdf5", "fits", "ecsv")
SUFFIXES = {".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".fits": "fits", ".fit": "fits", ".fts": "fits",
            ".ecsv": "ecsv"}
HDF5_TABLE = "table"  # where an astropy table lies in chemtwin's HDF5 files

_DEX = {"LOGG", "M_H", "ALPHA_M", "FE_H"}
_KMS = {"VMICRO", "VMACRO", "VSINI", "VHELIO", "VSCATTER", "VRAD"}


def label_unit(name: str) -> u.UnitBase | None:
    """The astropy unit of an allStar label column (None when it has none)."""
    name = str(name).upper()
    if name == "TEFF":
        return u.K
    if name in _DEX or name.endswith(("_FE", "_H", "_M")):
        return u.dex
    if name in _KMS:
        return u.km / u.s
    return None


def output_format(path, fmt: str | None = None, option: str = "format") -> str:
    """The table format of ``path``: ``fmt`` when given (it must agree with a known suffix), else
    the suffix's, else hdf5 (the format chemtwin's commands read back)."""
    suffix = Path(str(path)).suffix.lower()
    by_suffix = SUFFIXES.get(suffix)
    if fmt is None:
        return by_suffix or "hdf5"
    if fmt not in FORMATS:
        raise InputError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}", option)
    if by_suffix is not None and by_suffix != fmt:
        raise InputError(f"{path}: format {fmt} does not match the suffix {suffix} (a {by_suffix} file); "
                         f"rename the output or drop the format option", option)
    return fmt


def _meta_value(value):
    value = json_safe(value)
    return value if isinstance(value, (str, int, float, bool)) else json.dumps(value)


def _fits_hdu(table: Table) -> fits.BinTableHDU:
    """The binary table HDU of ``table``, with the units FITS has no name for (dex) kept as TUNIT."""
    meta = {str(k).upper(): _meta_value(v) for k, v in table.meta.items()}
    t = table.copy(copy_data=False)
    t.meta.clear()
    odd = {}
    for i, col in enumerate(t.itercols(), 1):
        if col.unit is not None:
            try:
                col.unit.to_string("fits")
            except ValueError:
                odd[i] = col.unit.to_string()
                col.unit = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)  # HIERARCH cards for long keys are expected
        hdu = fits.table_to_hdu(t)
        for i, unit in odd.items():
            hdu.header.set(f"TUNIT{i}", unit, after=f"TFORM{i}")
        for key, value in meta.items():
            hdu.header[key] = value
    hdu.header.set("EXTNAME", str(table.meta.get("extname", "CHEMTWIN")).upper())
    return hdu


def write_hdf5_table(table: Table, f: h5py.File | h5py.Group, name: str = HDF5_TABLE) -> None:
    """``table`` into an open HDF5 file in astropy's layout (``Table.read(file)`` finds it)."""
    t = table.copy(copy_data=False)
    t.meta.clear()
    t.meta.update({str(k): _meta_value(v) for k, v in table.meta.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        write_table_hdf5(t, f, path=name, serialize_meta=True)


def write_table(table: Table, path, fmt: str, overwrite: bool = False) -> Path:
    """``table`` as one FITS, ECSV or HDF5 file at ``path``, written under a temporary name and renamed."""
    path = Path(path)
    with atomic_output(path, overwrite) as tmp:
        if fmt == "fits":
            fits.HDUList([fits.PrimaryHDU(), _fits_hdu(table)]).writeto(tmp)
        elif fmt == "ecsv":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AstropyWarning)
                table.write(tmp, format="ascii.ecsv")
        elif fmt == "hdf5":
            with new_hdf5(tmp) as f:
                write_hdf5_table(table, f)
                f.attrs["chemtwin_table"] = str(table.meta.get("extname", ""))
        else:
            raise InputError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}", "format")
    return path


def star_columns(table: Table, star_id=None, telescope=None, field=None) -> None:
    """APOGEE_ID, TELESCOPE and FIELD (each when given) as the first columns of ``table``."""
    for pos, (name, values, text) in enumerate(
            [c for c in (("APOGEE_ID", star_id, "star name (APOGEE_ID for APOGEE stars; chemtwin's star_id)"),
                         ("TELESCOPE", telescope, "telescope of the spectrum (apo25m, lco25m, ...)"),
                         ("FIELD", field, "APOGEE field of the spectrum")) if c[1] is not None]):
        table.add_column(np.asarray(values, dtype=str), name=name, index=pos)
        table[name].description = text


def search_table(queries, nbr_ids, rows, dist, *, query_group=None, nbr_group=None, query_flags=None,
                 meta=None) -> Table:
    """Twin-search results as one row per (query, neighbour): QUERY_ID, RANK (1 = nearest),
    APOGEE_ID, ROW (the neighbour's row in the index), DISTANCE, GROUP / QUERY_GROUP when known,
    QUERY_FLAGS (the query's out-of-depth bitmask) when the query file has one.  Missing
    neighbours (row -1) are left out."""
    rows = np.asarray(rows)
    q, j = np.nonzero(rows >= 0)
    t = Table(meta={"extname": "TWINS", **(meta or {})})
    t["QUERY_ID"] = np.asarray(queries, dtype=str)[q]
    t["QUERY_ID"].description = "the star whose twins these are"
    if query_group is not None:
        t["QUERY_GROUP"] = np.asarray(query_group, np.int64)[q]
        t["QUERY_GROUP"].description = "twin group of the query (-1 = none)"
    if query_flags is not None:
        t["QUERY_FLAGS"] = np.asarray(query_flags, np.int16)[q]
        t["QUERY_FLAGS"].description = "out-of-depth bitmask of the query (0 = in depth; see its latent file)"
    t["RANK"] = (j + 1).astype(np.int32)
    t["RANK"].description = "1 = the nearest latent"
    t["APOGEE_ID"] = np.asarray(nbr_ids, dtype=str)[q, j]
    t["APOGEE_ID"].description = "the neighbour (chemtwin's star_id)"
    t["ROW"] = rows[q, j].astype(np.int64)
    t["ROW"].description = "the neighbour's row in the index"
    t["DISTANCE"] = np.asarray(dist, np.float64)[q, j]
    t["DISTANCE"].description = "latent distance (the index's metric, in latent units)"
    if nbr_group is not None:
        t["GROUP"] = np.asarray(nbr_group, np.int64)[q, j]
        t["GROUP"].description = "twin group of the neighbour (-1 = none)"
    return t


def cluster_table(labels, probabilities, *, star_id=None, group=None, meta=None) -> Table:
    """Cluster assignments: APOGEE_ID (when known), CLUSTER (-1 = noise), PROBABILITY, GROUP."""
    t = Table(meta={"extname": "CLUSTERS", **(meta or {})})
    t["CLUSTER"] = np.asarray(labels, np.int64)
    t["CLUSTER"].description = "found cluster, -1 = noise"
    t["PROBABILITY"] = np.asarray(probabilities, np.float32)
    t["PROBABILITY"].description = "membership strength (HDBSCAN; 1/0 for Ward and DBSCAN)"
    if group is not None:
        t["GROUP"] = np.asarray(group, np.int64)
        t["GROUP"].description = "known twin group (-1 = none)"
    star_columns(t, star_id)
    return t

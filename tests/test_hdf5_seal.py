"""The attribute seal (core/hdf5_seal.py): a damaged or edited attribute of a lone file is refused."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.core.hdf5_seal import SEAL
from chemtwin.data.dataset import open_dataset
from chemtwin.data.generate import generate_dataset
from chemtwin.errors import InputError
from chemtwin.search.latents import open_latents, write_latents


@pytest.fixture()
def dataset(tmp_path):
    return Path(generate_dataset(tmp_path / "d.h5", n_groups=3, group_size=2, snr=100, seed=1, progress=False))


def test_every_attribute_is_sealed_and_an_intact_file_reads(dataset):
    with h5py.File(dataset, "r") as f:
        sealed = json.loads(f.attrs[SEAL])
    assert {"/:snr", "/:seed", "/:generator", "/:layout_version", "/labels:names"} <= set(sealed)
    with open_dataset(dataset) as ds:
        assert ds.n_stars == 6


def _flip_first(path, needle: bytes) -> None:
    """Flip one bit of the first occurrence of ``needle`` in the file's bytes, as a damaged disk would."""
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0, needle
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_heap_string_is_refused_naming_the_attribute(dataset, capsys):
    # The label names are variable-length strings in the global heap, which HDF5 does not checksum:
    # without the seal this file reads, with "MG_FE" renamed to "LG_FE".
    _flip_first(dataset, b"MG_FE")
    with h5py.File(dataset, "r") as f:
        assert "LG_FE" in list(f["labels"].attrs["names"].astype(str))  # HDF5 itself sees nothing wrong
    with pytest.raises(InputError, match=r"attribute 'names' of /labels differs"):
        open_dataset(dataset)
    assert main(["info", str(dataset)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attribute 'names' of /labels differs" in err[0]


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.attrs.__setitem__("snr", 30.0), "attribute 'snr' of / differs"),
    (lambda f: f.attrs.__delitem__("generator"), "attribute 'generator' of / is missing"),
    (lambda f: f.attrs.__setitem__(SEAL, "{not json"), "attribute seal is damaged"),
])
def test_edited_or_deleted_attributes_are_refused(dataset, edit, message):
    with h5py.File(dataset, "r+") as f:
        edit(f)
    with pytest.raises(InputError, match=message):
        open_dataset(dataset)


def test_same_meaning_other_storage_and_added_attributes_are_accepted(dataset):
    with h5py.File(dataset, "r+") as f:
        names = f["labels"].attrs["names"].astype(str)
        f["labels"].attrs["names"] = np.array(names, dtype="S8")  # fixed-length bytes, same text
        f.attrs["seed"] = np.int32(f.attrs["seed"])  # another integer width, same value
        f.attrs["observer_notes"] = "checked by eye"  # the user's own attribute: not covered
    with open_dataset(dataset) as ds:
        assert list(ds.label_names) == list(names)


def test_latent_files_are_sealed(tmp_path):
    path = write_latents(tmp_path / "z.h5", np.zeros((4, 3)), group=np.arange(4), attrs={"model": "m"})
    with open_latents(path) as lat:
        assert lat.n_stars == 4
    with h5py.File(path, "r+") as f:
        f.attrs["model"] = "another model"
    with pytest.raises(InputError, match="attribute 'model' of / differs"):
        open_latents(path)


def test_files_without_a_seal_are_read_as_before(dataset):
    with h5py.File(dataset, "r+") as f:
        del f.attrs[SEAL]
        f.attrs["snr"] = 30.0
    with open_dataset(dataset) as ds:
        assert ds.attrs["snr"] == 30.0

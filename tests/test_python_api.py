"""The Python API for astropy and scikit-learn users (issue 17, item 5): ChemTwin is a
scikit-learn estimator, labels come as tables (astropy, pandas, dicts, structured arrays), and
errors name keyword arguments, not flags."""

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_twins import LABEL_NAMES, fake_twins
from sklearn.base import clone

from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import is_table, label_table
from chemtwin.tagging import ChemTwin, FaderConfig
from chemtwin.tagging.cannon import Cannon

torch.set_num_threads(1)
SRC = Path(__file__).resolve().parents[1] / "src" / "chemtwin"
TINY = dict(epochs=2, latent_dim=3, batch_size=16, decoder_hidden=(8,), adversary_hidden=(8,), val_fraction=0.0, seed=5)


@pytest.fixture(scope="module")
def twins():
    return fake_twins(40, 60, seed=2)


def test_clone_get_params_and_set_params_round_trip():
    ct = ChemTwin(latent_dim=7, condition=("TEFF", "LOGG", "FE_H"), lr=1e-4, model="cae")
    params = ct.get_params()
    assert params["latent_dim"] == 7 and params["model"] == "cae" and params["lr"] == 1e-4
    assert params["epochs"] is None and params["preset"] == "fast" and params["seed"] == 0
    assert set(params) == set(FaderConfig().to_dict())  # every FaderConfig field, nothing else
    twin = clone(ct)
    assert twin is not ct and twin.get_params() == params
    assert ChemTwin().set_params(**params).get_params() == params
    assert ct.set_params(latent_dim=4) is ct and ct.latent_dim == 4 and ct.config.net.latent_dim == 4
    with pytest.raises(ValueError, match="bogus"):
        ct.set_params(bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        ChemTwin(bogus=1)
    assert "latent_dim=4" in repr(ct)


def test_the_constructor_only_stores_and_fit_checks(twins):
    flux, ivar, labels, group = twins
    ct = ChemTwin(latent_dim=0)  # sklearn's rule: no validation in __init__
    assert ct.latent_dim == 0
    with pytest.raises(InputError, match="latent dimension"):
        ct.fit(flux, ivar, labels, label_names=LABEL_NAMES, progress=False)


def test_fit_transform_equals_fit_then_transform_and_clone_is_unfitted(twins):
    flux, ivar, labels, group = twins
    table = {name: labels[:, k] for k, name in enumerate(LABEL_NAMES)}
    z = ChemTwin(**TINY).fit_transform(flux, ivar, table, progress=False)
    ct = ChemTwin(**TINY).fit(flux, ivar, table, progress=False)
    np.testing.assert_array_equal(z, ct.transform(flux, ivar, labels[:, :2]))
    assert z.shape == (len(flux), 3) and ct.n_features_in_ == flux.shape[1]
    assert not hasattr(clone(ct), "net_")
    with pytest.raises(InputError, match="not fitted"):
        clone(ct).transform(flux, ivar, labels[:, :2])


def test_transform_without_conditions_says_what_is_missing(twins):
    flux, ivar, labels, _ = twins
    ct = ChemTwin(**TINY).fit(flux, ivar, labels, label_names=LABEL_NAMES, progress=False)
    with pytest.raises(InputError, match=r"cond is missing: the latents are conditioned on TEFF,LOGG") as err:
        ct.transform(flux, ivar)
    assert err.value.options == ("cond",) and "--" not in str(err.value)


def test_an_astropy_table_of_labels_is_accepted(twins):
    from astropy.table import MaskedColumn, Table

    flux, ivar, labels, group = twins
    table = Table(labels, names=LABEL_NAMES)
    table["APOGEE_ID"] = [f"2M{k:08d}" for k in range(len(table))]  # text columns not asked for are fine
    ct = ChemTwin(**TINY).fit(flux, ivar, table, label_names=["TEFF", "LOGG", "FE_H"], progress=False)
    z = ct.transform(flux, ivar, table)  # cond: the condition columns of the table
    np.testing.assert_array_equal(z, ct.transform(flux, ivar, labels[:, :2]))
    # the same stars from a dict of columns train the same model
    same = ChemTwin(**TINY).fit(flux, ivar, {n: labels[:, k] for k, n in enumerate(LABEL_NAMES)},
                                label_names=["TEFF", "LOGG", "FE_H"], progress=False)
    np.testing.assert_array_equal(same.transform(flux, ivar, labels[:, :2]), z)
    # masked entries are unknown (NaN): a conditioning label must be known
    masked = Table({"TEFF": MaskedColumn(labels[:3, 0], mask=[False, True, False]), "LOGG": labels[:3, 1]})
    assert np.isnan(label_table(masked)[1][1, 0])
    with pytest.raises(InputError, match="row 1"):
        ct.transform(flux[:3], ivar[:3], masked)
    with pytest.raises(InputError, match=r"lacks label\(s\) LOGG"):
        ct.transform(flux[:3], ivar[:3], Table({"TEFF": labels[:3, 0]}))


def test_label_tables_of_every_kind():
    values = np.arange(6.0).reshape(3, 2)
    structured = np.zeros(3, dtype=[("TEFF", float), ("LOGG", float)])
    structured["TEFF"], structured["LOGG"] = values[:, 0], values[:, 1]

    class FakeFrame:  # pandas' duck type: .columns and column access (pandas is not a dependency)
        columns = ["LOGG", "TEFF"]

        def __getitem__(self, name):
            return values[:, ["TEFF", "LOGG"].index(name)]

    for table in ({"TEFF": values[:, 0], "LOGG": values[:, 1]}, structured, FakeFrame()):
        assert is_table(table)
        names, got = label_table(table, ["TEFF", "LOGG"])
        assert names == ["TEFF", "LOGG"]
        np.testing.assert_array_equal(got, values)
    assert not is_table(values)
    assert label_table(values, ["TEFF", "LOGG"])[0] == ["TEFF", "LOGG"]
    with pytest.raises(InputError, match="label_names") as err:
        label_table(values)
    assert err.value.options == ("label_names",)
    with pytest.raises(InputError, match="not numeric"):
        label_table({"TEFF": ["hot", "cold"]})


def test_pandas_dataframe_when_installed():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"LOGG": [2.0, None], "TEFF": [4500.0, 4600.0]})
    names, values = label_table(frame, ["TEFF", "LOGG"])
    assert values[0].tolist() == [4500.0, 2.0] and np.isnan(values[1, 1])


def test_the_cannon_takes_label_tables():
    from astropy.table import Table

    rng = np.random.default_rng(0)
    labels = np.column_stack([rng.uniform(4000, 5000, 40), rng.uniform(1, 3, 40)])
    flux = 1 + 1e-4 * (labels[:, :1] - 4500) * np.linspace(0, 1, 30) + 0.01 * labels[:, 1:] * np.linspace(1, 0, 30)
    ivar = np.full_like(flux, 1e4)
    table = Table({"LOGG": labels[:, 1], "TEFF": labels[:, 0], "NAME": ["x"] * 40})
    a = Cannon(["TEFF", "LOGG"], order=1, n_jobs=1).fit(flux, ivar, table)
    b = Cannon(["TEFF", "LOGG"], order=1, n_jobs=1).fit(flux, ivar, labels)
    np.testing.assert_array_equal(a.theta_, b.theta_)
    np.testing.assert_array_equal(a.predict_flux(table[:5]), b.predict_flux(labels[:5]))
    assert a.score(flux[:10], ivar[:10], table[:10]) == b.score(flux[:10], ivar[:10], labels[:10])
    with pytest.raises(InputError, match=r"lacks label\(s\) LOGG"):
        Cannon(["TEFF", "LOGG"], order=1).fit(flux, ivar, {"TEFF": labels[:, 0]})


def test_library_messages_name_keywords_not_flags():
    """Outside cli/, an InputError's message never spells a command-line flag (--name)."""
    found = []
    for path in SRC.rglob("*.py"):
        if "cli" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InputError" and node.args:
                text = ast.unparse(node.args[0])
                if re.search(r"(?<![\w-])--[a-z]", text):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: {text[:80]}")
    assert not found, "\n".join(found)

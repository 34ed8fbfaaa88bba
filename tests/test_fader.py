"""The fader model: weights, masking, bins, presets, disentanglement, save/load."""

import json

import numpy as np
import pytest
import torch
from fake_twins import LABEL_NAMES, fake_twins

from chemtwin.data.spectra import check_spectra, pixel_weights
from chemtwin.errors import InputError
from chemtwin.tagging import ChemTwin, FaderConfig, FaderNet
from chemtwin.tagging.fader import recon_loss

torch.set_num_threads(1)


def test_pixel_weights_normalised_and_masked():
    ivar = np.array([[4.0, 4.0, 0.0, 8.0], [1e30, 1e30, 1e30, 1e30], [np.inf, 5.0, np.inf, 0.0], [0, 0, 0, 0]])
    w = pixel_weights(ivar)
    good = w[0] > 0
    assert w[0, 2] == 0 and np.isclose(w[0][good].mean(), 1.0)
    np.testing.assert_allclose(w[0], [0.75, 0.75, 0, 1.5])
    np.testing.assert_array_equal(w[1], 1.0)          # huge constant ivar = noiseless: unit weights
    np.testing.assert_array_equal(w[2], [1, 0, 1, 0])  # inf pixels dominate finite ones
    np.testing.assert_array_equal(w[3], 0)
    assert np.isfinite(w).all()


def test_check_spectra_rejects_nan_flux_with_row_and_flags_empty_rows():
    flux, ivar = np.ones((5, 3)), np.ones((5, 3))
    ivar[1] = 0
    flux[1, 0] = np.nan  # masked: allowed
    assert check_spectra(flux, ivar).tolist() == [True, False, True, True, True]
    flux[3, 2] = np.nan
    with pytest.raises(InputError, match="row 13, pixel 2 has NaN/inf flux"):
        check_spectra(flux, ivar, row0=10)
    flux[3, 2] = 1
    ivar[4, 1] = -1
    with pytest.raises(InputError, match="row 4, pixel 1 has NaN or negative ivar"):
        check_spectra(flux, ivar)


def test_masked_pixels_are_ignored_by_loss_and_encoder():
    cfg = FaderConfig(latent_dim=4)
    torch.manual_seed(0)
    net = FaderNet(cfg.net, 50)
    coef = np.zeros((len(net.exponents), 50))
    coef[0] = 1
    net.set_statistics([3500, 0], [5500, 4], coef, np.full(50, 0.1), True, True)
    net.eval()
    x = 1 + 0.1 * torch.randn(8, 50)
    w = torch.ones(8, 50)
    w[:, 10:20] = 0
    u = torch.tensor([[4500.0, 2.0]]).repeat(8, 1)
    x2 = x.clone()
    x2[:, 10:20] = torch.nan  # garbage where masked
    z1, z2 = net.encode(x, w, u), net.encode(x2, w, u)
    torch.testing.assert_close(z1, z2)
    xh = net.decode(z1, u)
    torch.testing.assert_close(recon_loss(xh, x, w), recon_loss(xh, x2, w))
    assert recon_loss(xh, x, w) != recon_loss(xh, x, None)


def test_encoder_gain_in_u_undoes_an_imprint_that_weakens_with_teff():
    # the chemistry's imprint on the residual is v c / (1 + beta s), s = TEFF scaled to [-0.5, 0.5]:
    # weights affine in u, (w0 + s w1) with w1 = beta w0, give every TEFF the same z; one weight cannot
    p, beta = 50, 0.8
    net = FaderNet(FaderConfig(latent_dim=1).net, p)
    assert net.enc_gain is not None and not net.enc_gain[1].weight.any()  # it starts as the plain linear encoder
    coef = np.zeros((len(net.exponents), p))
    coef[0] = 1
    net.set_statistics([3500, 0], [5500, 4], coef, np.full(p, 0.1), False, False)
    net.eval()
    v = torch.randn(p, generator=torch.Generator().manual_seed(0))
    v /= v.norm()
    teff = torch.linspace(3500, 5500, 9)
    u = torch.stack([teff, torch.full_like(teff, 2.0)], dim=1)
    s = net.scale_u(u)[:, 0]
    x = 1 + (0.03 * v)[None, :] / (1 + beta * s)[:, None]  # one chemistry (c = 0.03) at nine TEFF
    with torch.no_grad():
        net.encoder.layers[0].weight.copy_(v[None, :])
        net.encoder.layers[0].bias.zero_()
        plain = net.encode(x, None, u)[:, 0]
        net.enc_gain[0].weight.zero_()
        net.enc_gain[0].weight[0] = v
        net.enc_gain[1].weight[0, 0] = beta  # the TEFF row; LOGG's stays 0
        gained = net.encode(x, None, u)[:, 0]
    assert plain.max() / plain.min() > 1.5
    torch.testing.assert_close(gained, torch.full_like(gained, 0.03), rtol=1e-4, atol=0)


def test_a_quadratic_gain_undoes_an_imprint_that_is_quadratic_in_teff():
    # imprint v c / (1 + beta s + gamma s^2): weights of degree 2 in u undo it exactly, degree 1 cannot
    p, beta, gamma = 40, 0.5, 1.5
    teff = torch.linspace(3500, 5500, 9)
    u = torch.stack([teff, torch.full_like(teff, 2.0)], dim=1)
    v = torch.randn(p, generator=torch.Generator().manual_seed(1))
    v /= v.norm()
    spread = {}
    for degree in (1, 2):
        net = FaderNet(FaderConfig(latent_dim=1, encoder_u_gain=degree).net, p)
        assert net.enc_gain[1].weight.shape == (len(net.gain_exponents), 3)
        coef = np.zeros((len(net.exponents), p))
        coef[0] = 1
        net.set_statistics([3500, 0], [5500, 4], coef, np.full(p, 0.1), False, False)
        net.eval()
        s = net.scale_u(u)[:, 0]
        x = 1 + (0.03 * v)[None, :] / (1 + beta * s + gamma * s**2)[:, None]
        monomials = [tuple(e) for e in net.gain_exponents.tolist()]
        with torch.no_grad():
            net.encoder.layers[0].weight.copy_(v[None, :])
            net.encoder.layers[0].bias.zero_()
            net.enc_gain[0].weight.zero_()
            net.enc_gain[0].weight[0] = v
            net.enc_gain[1].weight[monomials.index((1, 0)), 0] = beta
            if degree == 2:
                net.enc_gain[1].weight[monomials.index((2, 0)), 0] = gamma
            z = net.encode(x, None, u)[:, 0]
        spread[degree] = (z.max() / z.min()).item()
    assert len(monomials) == 5  # TEFF, LOGG, TEFF^2, TEFF LOGG, LOGG^2
    assert spread[1] > 1.05 and spread[2] == pytest.approx(1.0, abs=1e-4)
    # a config.json of the affine gain's first version says "true": the same network (degree 1)
    assert FaderConfig.from_dict({**FaderConfig().to_dict(), "encoder_u_gain": True}).net.encoder_u_gain == 1
    with pytest.raises(InputError, match="encoder_u_gain"):
        FaderConfig(encoder_u_gain=4)


def test_encoder_gain_reads_the_leading_principal_components_and_starts_at_zero():
    torch.manual_seed(0)
    net = FaderNet(FaderConfig(latent_dim=4).net, 40)
    r = torch.randn(500, 40) * torch.linspace(3, 0.1, 40)  # 40 directions of falling variance
    net.init_from_pca(r)
    q = net.enc_gain[0].weight
    assert q.shape == (12, 40) and not net.enc_gain[1].weight.any()
    torch.testing.assert_close(q[:4], net.encoder.layers[0].weight)  # the gain's first components are z's own
    projected = r @ q.T
    torch.testing.assert_close(projected.var(dim=0), torch.ones(12), rtol=0.05, atol=0)  # whitened
    # the 12 components hold the most variance 12 directions can
    assert (projected @ torch.linalg.pinv(q).T).var(dim=0).sum() > 0.97 * r[:, :12].var(dim=0).sum()


def test_joint_bins_from_training_range():
    net = FaderNet(FaderConfig(n_cat=10, baseline_degree=0).net, 5)
    net.set_statistics([4000, 1.0], [5000, 3.0], np.ones((1, 5)), np.ones(5), False, False)
    u = torch.tensor([[4000.0, 1.0], [4999.0, 1.0], [4000.0, 2.95], [6000.0, 9.0], [3000.0, -1.0], [4150.0, 1.45]])
    assert net.u_bins(u).tolist() == [0, 9, 90, 99, 0, 1 + 10 * 2]


def test_config_presets_and_validation():
    fast, paper = FaderConfig(), FaderConfig(preset="paper", lr=3e-5)
    assert fast.net.standardize and fast.optim.lr == 3e-4 and fast.optim.adversary_lr_factor == 5
    assert paper.net.encoder_hidden == (2048, 512, 128) and paper.net.decoder_hidden == (512, 2048, 8192)
    assert paper.net.activation == "selu" and paper.optim.optimizer == "adam" and paper.optim.lr == 3e-5
    assert FaderConfig(model="cae", lambda_adv=0.5).optim.lambda_adv == 0
    assert FaderConfig.from_dict(paper.to_dict()) == paper
    net = FaderNet(paper.net, 300)
    assert [m.out_features for m in net.encoder.layers] == [2048, 512, 128, 20]
    assert [m.out_features for m in net.decoder.layers] == [512, 2048, 8192, 300]
    assert net.encoder.cond.in_features == 2 and net.decoder.cond.in_features == 2  # E(x, u), D(z, u)
    assert isinstance(net.encoder.act, torch.nn.SELU) and net.enc_skip is None and net.encoder.film is None
    with pytest.raises(InputError, match="latent dimension"):
        FaderConfig(latent_dim=0)
    with pytest.raises(InputError, match="preset"):
        FaderConfig(preset="huge")
    # lambda: linear warm-up from 0, then constant
    cfg = FaderConfig(lambda_adv=1e-2, lambda_warmup_frac=0.5).optim
    assert cfg.lambda_at(0.0, 0) == 0 and np.isclose(cfg.lambda_at(0.25, 10), 5e-3) and cfg.lambda_at(0.9, 99) == 1e-2
    assert FaderConfig(lambda_adv=1.0, lambda_warmup_steps=100).optim.lambda_at(0.9, 50) == 0.5


# config.json's "config" of a model folder written before FaderConfig was split in parts
OLD_LAYOUT = {"model": "cae", "preset": "paper", "condition": ["TEFF", "LOGG"], "latent_dim": 8, "n_cat": 10,
              "encoder_hidden": [2048, 512, 128], "decoder_hidden": [512, 2048, 8192], "adversary_hidden": [512, 512],
              "activation": "selu", "baseline_degree": 0, "encoder_direct_u": True, "film": False, "linear_skip": False,
              "latent_norm": False, "adversary_factorized": False, "adversary_dropout": 0.0, "adversary_square": False,
              "pca_init": False, "standardize": False, "normalize_loss": False, "lambda_adv": 0.0,
              "lambda_warmup_frac": 0.0, "lambda_warmup_steps": None, "optimizer": "adam", "lr": 1e-05,
              "adversary_lr_factor": 1.0, "weight_decay": 0.0, "schedule": "constant", "lr_warmup_frac": 0.03,
              "min_lr_frac": 0.02, "batch_size": 128, "epochs": 100, "time_limit": 60.0, "seed": 3,
              "val_fraction": 0.1, "eval_max_stars": 2000, "max_memory_gb": 4.0, "device": "auto"}


def test_a_config_of_the_flat_layout_loads_into_its_parts_and_is_written_back_the_same():
    cfg = FaderConfig.from_dict(json.loads(json.dumps(OLD_LAYOUT)))
    assert cfg.model == "cae" and cfg.net.latent_dim == 8 and cfg.net.encoder_hidden == (2048, 512, 128)
    assert cfg.optim.lr == 1e-5 and cfg.optim.batch_size == 128 and cfg.run.time_limit == 60.0 and cfg.run.seed == 3
    # a knob added since is written back as the value the old model was trained with
    assert cfg.net.encoder_u_gain == 0
    assert json.loads(json.dumps(cfg.to_dict())) == {**OLD_LAYOUT, "encoder_u_gain": 0}
    assert [k for k in cfg.to_dict() if k != "encoder_u_gain"] == list(OLD_LAYOUT)
    assert FaderConfig.from_dict({**OLD_LAYOUT, "time_limit": "inf"}).run.time_limit == float("inf")


@pytest.fixture(scope="module")
def trained():
    """cae and fader trained on the same fake twins (TEFF strongly encoded in the spectra)."""
    flux, ivar, labels, group = fake_twins(400, 200, seed=3)
    vf, vi, vl, vg = fake_twins(150, 200, seed=4)
    out = {}
    for model in ("cae", "fader"):
        # baseline degree 1 leaves most of TEFF/LOGG's (nonlinear) imprint for the networks
        ct = ChemTwin(model=model, epochs=60, latent_dim=8, seed=1, val_fraction=0.3, lambda_adv=0.1, baseline_degree=1)
        ct.fit(flux, ivar, labels, label_names=LABEL_NAMES, group=group, progress=False)
        z = ct.transform(vf, vi, vl[:, :2])
        out[model] = (ct, z)
    return out, (vf, vi, vl, vg), (flux, labels)


def test_adversary_pushes_nuisance_out_of_the_latent(trained):
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsRegressor

    models, (vf, vi, vl, vg), _ = trained
    cae, fader = models["cae"][0].history[-1], models["fader"][0].history[-1]
    chance = cae["adv_chance"]
    # the adversary reads TEFF/LOGG bins off the cae latent, but not off the fader's
    assert cae["val_adv_acc"] > 3 * chance
    assert fader["val_adv_acc"] < 2 * chance and fader["val_adv_acc"] < cae["val_adv_acc"] / 2
    # a post-hoc regressor finds TEFF in the cae latent, not in the fader's
    r2 = {m: cross_val_score(KNeighborsRegressor(10), models[m][1], vl[:, 0], cv=3).mean() for m in models}
    assert r2["cae"] > 0.15 and r2["fader"] < r2["cae"] - 0.15, r2
    # and its latent finds twins better; swapping latents between twins costs less
    assert fader["val_swap"] < cae["val_swap"]
    from chemtwin.core.ranks import doppelganger_ranks

    rank0 = {m: (doppelganger_ranks(models[m][1], vg, progress=False).rank == 0).mean() for m in models}
    assert rank0["fader"] > rank0["cae"], rank0


def test_save_load_roundtrip_gives_identical_outputs(trained, tmp_path):
    models, (vf, vi, vl, vg), _ = trained
    ct, z = models["fader"]
    ct.save(tmp_path / "m")
    back = ChemTwin.load(tmp_path / "m")
    assert FaderConfig.from_dict({**back.config.to_dict(), "device": "auto"}) == ct.config
    np.testing.assert_array_equal(back.transform(vf, vi, vl[:, :2]), z)
    cond = {"TEFF": vl[:, 0], "LOGG": vl[:, 1]}
    np.testing.assert_array_equal(back.transform(vf, vi, cond), z)
    np.testing.assert_array_equal(back.reconstruct(vf[:5], vi[:5], vl[:5, :2]), ct.reconstruct(vf[:5], vi[:5], vl[:5, :2]))
    assert back.history and len(back.history) == len(ct.history)


def test_transform_reconstruct_swap(trained):
    models, (vf, vi, vl, vg), _ = trained
    ct = models["fader"][0]
    ivar = vi[:6].copy()
    ivar[2] = 0
    z = ct.transform(vf[:6], ivar, vl[:6, :2])
    assert z.shape == (6, 8) and z.dtype == np.float32
    assert np.isnan(z[2]).all() and np.isfinite(np.delete(z, 2, 0)).all()
    rec = ct.reconstruct(vf[:6], vi[:6], vl[:6, :2])
    assert rec.shape == (6, 200) and np.mean((rec - vf[:6]) ** 2) < 1e-3
    # swapping: twin 0's latent at twin 1's TEFF/LOGG rebuilds twin 1
    zz = ct.transform(vf[:2], vi[:2], vl[:2, :2])
    swapped = ct.swap(zz[[0]], vl[[1], :2])
    assert np.mean((swapped - vf[1]) ** 2) < np.mean((vf[0] - vf[1]) ** 2)
    with pytest.raises(InputError, match="cond must be"):
        ct.transform(vf[:3], vi[:3], vl[:3, :3])
    with pytest.raises(InputError, match="flux must be"):
        ct.transform(vf[:3, :100], vi[:3, :100], vl[:3, :2])
    with pytest.raises(InputError, match="not fitted"):
        ChemTwin().transform(vf[:3], vi[:3], vl[:3, :2])


def test_baseline_fit_recovers_a_polynomial_and_its_scatter():
    from chemtwin.tagging.fader import fit_baseline, poly_exponents, poly_features

    rng = np.random.default_rng(0)
    e = poly_exponents(2, 3)
    assert e.shape == (10, 2) and e[0].tolist() == [0, 0] and (e.sum(1) <= 3).all()
    s = rng.uniform(-0.5, 0.5, (500, 2))
    phi = poly_features(s, e)
    coef = rng.normal(size=(10, 6))
    x = phi @ coef + rng.normal(0, 0.01, (500, 6)) * np.arange(6)  # pixel p scatters by 0.01 p
    w = np.ones_like(x)
    w[:250, 5] = 0  # half of pixel 5 masked
    A = np.einsum("np,nf,ng->pfg", w, phi, phi)
    b = np.einsum("np,nf->pf", w * x, phi)
    got, std = fit_baseline(A, b, (w * x * x).sum(0), w.sum(0))
    np.testing.assert_allclose(got[:, 0], coef[:, 0], atol=1e-5)  # exact up to the tiny ridge
    np.testing.assert_allclose(std, 0.01 * np.arange(6), rtol=0.15, atol=1e-6)


def test_factorized_adversary_gives_joint_logits():
    from chemtwin.tagging.fader import Adversary

    torch.manual_seed(0)
    adv = Adversary(4, (8,), n_cat=3, k=2, act="silu", square=True, factorized=True)
    torch.nn.init.normal_(adv.net[-1].weight)
    z = torch.randn(5, 4)
    raw = adv.net(torch.cat([z, z * z], 1))
    joint = adv(z)
    assert joint.shape == (5, 9)
    b1, b2 = 2, 1  # joint class b1 + 3 * b2
    torch.testing.assert_close(joint[:, b1 + 3 * b2], raw[:, b1 + 3 * b2] + raw[:, 9 + b1] + raw[:, 9 + 3 + b2])

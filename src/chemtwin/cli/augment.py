"""``chemtwin augment IN.h5 -o OUT.h5 --seed N [...]``: noise, RV, broadening and masks on a dataset."""

from __future__ import annotations

import sys

import numpy as np

from chemtwin.cli.arguments import add_output, positive_int, seed
from chemtwin.core.files import prepare_output
from chemtwin.data.augment import CHIP_NAMES, Augmenter
from chemtwin.data.broadening import MACRO_KINDS
from chemtwin.data.dataset import open_dataset
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.errors import InputError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "augment",
        help="make synthetic spectra look real: noise, RV, rotation, tellurics, bad pixels",
        description=(
            "Stream a dataset in batches through chemtwin.data.augment.Augmenter and write the "
            "augmented copy (labels, groups and star ids unchanged). Every augmentation is off "
            "unless asked for. Same seed and batch size -> same output."
        ),
    )
    p.add_argument("input", metavar="IN.h5", help="dataset to augment")
    add_output(p, "OUT.h5", "augmented dataset to write", positional=True)
    p.add_argument("--seed", type=seed, required=True, help="random seed")
    p.add_argument("--snr", metavar="S|LO:HI", help="add Gaussian noise to reach SNR S per pixel, or log-uniform in [LO, HI]")
    p.add_argument("--rv-max", type=float, default=0.0, metavar="KMS", help="Doppler shift uniform in [-KMS, KMS] km/s")
    p.add_argument("--vsini-max", type=float, default=0.0, metavar="KMS", help="rotational broadening, vsini uniform in [0, KMS] km/s")
    p.add_argument("--limb-darkening", type=float, default=0.6, help="linear limb-darkening coefficient of the rotation profile (default 0.6)")
    p.add_argument("--vmacro-max", type=float, default=0.0, metavar="KMS", help="extra macroturbulence uniform in [0, KMS] km/s")
    p.add_argument("--macro", default="gaussian", choices=MACRO_KINDS, help="macroturbulence profile (default gaussian)")
    p.add_argument("--telluric", action="store_true", help="mask (ivar 0) the telluric windows at a random observed RV")
    p.add_argument("--telluric-rv-max", type=float, default=100.0, metavar="KMS", help="observed RV range for the telluric windows (default 100 km/s)")
    p.add_argument("--bad-pixel-frac", type=float, default=0.0, metavar="F", help="fraction of pixels set to flux 0, ivar 0")
    p.add_argument("--persistence", type=float, default=0.0, metavar="A", help="persistence-like line dilution, amplitude uniform in [0, A]")
    p.add_argument("--persistence-chip", default="green", choices=CHIP_NAMES, help="chip that gets persistence (default green, where the DR17 files flag it)")
    p.add_argument("--continuum", type=float, default=0.0, metavar="A",
                   help="continuum-normalization errors: tilt and curvature per chip, coefficients ~ N(0, A)")
    p.add_argument("--batch-size", type=positive_int, default=512, help="spectra per batch (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.h5 if it exists")
    p.set_defaults(func=run)


def parse_snr(text: str | None):
    if text is None:
        return None
    try:
        parts = [float(x) for x in text.split(":")]
    except ValueError:
        raise InputError(f"--snr {text!r}: give a number S or a range LO:HI") from None
    if len(parts) not in (1, 2) or any(not np.isfinite(x) or x <= 0 for x in parts):
        raise InputError(f"--snr {text!r}: give a positive number S or a range LO:HI")
    return parts[0] if len(parts) == 1 else tuple(parts)


def run(args) -> int:
    from tqdm import tqdm

    augmenter = Augmenter(
        snr=parse_snr(args.snr), rv_max=args.rv_max, vsini_max=args.vsini_max, limb_darkening=args.limb_darkening,
        vmacro_max=args.vmacro_max, macro_kind=args.macro, telluric=args.telluric, telluric_rv_max=args.telluric_rv_max,
        bad_pixel_frac=args.bad_pixel_frac, persistence=args.persistence, persistence_chip=args.persistence_chip,
        continuum=args.continuum,
    )
    prepare_output(args.out, args.overwrite, inputs=(args.input,))
    with open_dataset(args.input) as ds:
        wavelength = ds.wavelength
        star_id = ds.star_id
        attrs = {k: v for k, v in ds.attrs.items() if k not in ("chemtwin_version", "layout_version")}
        attrs["augment"] = augmenter.to_json()
        attrs["augment_seed"] = args.seed
        attrs["augment_source"] = str(args.input)
        if augmenter.snr is not None:
            # a float per docs/dataset.md; NaN for a range (the range is in the `augment` JSON)
            attrs["snr"] = float(augmenter.snr) if np.ndim(augmenter.snr) == 0 else float("nan")
        with DatasetWriter(args.out, wavelength, ds.label_names, attrs=attrs, overwrite=args.overwrite,
                           with_star_id=star_id is not None, expected_rows=ds.n_stars) as writer:
            bar = tqdm(total=ds.n_stars, desc="augment", unit="spectrum", disable=not args.progress, file=sys.stderr)
            usable = 0
            for batch in ds.iter_batches(args.batch_size):
                usable += int((batch.ivar > 0).any(axis=1).sum())
                rng = np.random.default_rng([args.seed, batch.start])
                flux, ivar = augmenter(batch.flux, batch.ivar, wavelength, rng)
                ids = None if star_id is None else star_id[batch.start : batch.stop]
                writer.append(flux, ivar, batch.labels, batch.group, ids)
                bar.update(len(batch.flux))
            bar.close()
            if usable == 0:  # inside the writer: its temporary file goes, nothing is left
                raise InputError(f"{args.input}: no row has a usable spectrum (every ivar is 0); nothing written")
    print(f"wrote {args.out}: {ds.n_stars} augmented spectra (seed {args.seed})")
    return 0

"""The Payne emulators (Ting et al. 2019): neural networks that map labels to a spectrum.

Both public ``.npz`` weight formats are supported (docs/science.md section 4).  The
labels are scaled to ``s = (l - x_min) / (x_max - x_min) - 0.5`` first.

* **per-pixel** (early Payne, binary-star work): one small sigmoid network per pixel,
  ``w_array_0 (P, H, L)``, ``b_array_0 (P, H)``, ``w_array_1 (P, H)``, ``b_array_1 (P,)``:
  ``flux_p = w_array_1[p] . sigmoid(w_array_0[p] @ s + b_array_0[p]) + b_array_1[p]``.
* **mlp** (2019 onward): ``w_array_0 (H, L)``, ``b_array_0 (H,)``, ``w_array_1 (H2, H)``,
  ``b_array_1 (H2,)``, ``w_array_2 (P, H2)``, ``b_array_2 (P,)``; leaky ReLU (slope
  0.01) after each hidden layer, linear output.

Both also hold ``x_min (L,)`` and ``x_max (L,)``.  chemtwin adds ``label_names`` (array
of str) and ``wavelength`` (P,) when known; public files without them load when the
label names are given by the caller.  Files are read with ``allow_pickle=False`` and
written atomically.

:class:`PayneEmulator` is a ``torch.nn.Module``: ``emulator(labels)`` is batched over
any leading dimensions and differentiable with respect to the labels (and the weights,
which is how :mod:`chemtwin.tagging.payne_train` trains the MLP format).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from chemtwin.core.files import atomic_output, prepare_output
from chemtwin.errors import InputError

FORMATS = ("mlp", "per_pixel")
MLP_ARRAYS = ("w_array_0", "b_array_0", "w_array_1", "b_array_1", "w_array_2", "b_array_2", "x_min", "x_max")
PER_PIXEL_ARRAYS = ("w_array_0", "b_array_0", "w_array_1", "b_array_1", "x_min", "x_max")
LEAKY_SLOPE = 0.01
# Labels that are not chemistry: the stars of a twin group draw these independently.
# Compared case-insensitively; covers The Payne's own names (Vturb, Vmacro, ...) too.
NON_CHEMICAL_NAMES = frozenset(
    name.upper()
    for name in (
        "TEFF", "LOGG", "VMICRO", "VMACRO", "VTURB", "VMAC", "VMIC", "XI", "VSINI", "VROT",
        "VBROAD", "VSCATTER", "RV", "VRAD", "VHELIO", "VHELIO_AVG", "VLOS",
    )
)
# Relative slack on the x_min/x_max box (float32 round-off of labels at its edges).
_BOX_SLACK = 1e-6


def is_chemical_label(name: str) -> bool:
    """False for TEFF, LOGG, micro/macro turbulence and velocities; True otherwise."""
    return name.strip().upper() not in NON_CHEMICAL_NAMES


def _shape_error(source: str, name: str, shape: tuple, expected: str) -> InputError:
    return InputError(f"{source}: array {name} has shape {tuple(shape)}, expected {expected}")


def _normalize_names(names, source: str) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = [n for n in names.replace(",", " ").split() if n]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(names).reshape(-1).tolist()]
    if any(not n.strip() for n in names):
        raise InputError(f"{source}: empty label name in label_names")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{source}: label name {dup} appears twice in label_names")
    return names


def validate_arrays(arrays: dict, source: str = "emulator") -> str:
    """Check a dict of Payne arrays; return its format ("mlp" or "per_pixel").

    Raises InputError naming the first missing array or the first inconsistent shape.
    """
    if "w_array_0" not in arrays:
        raise InputError(f"{source}: missing array w_array_0 (not a Payne emulator)")
    w0 = np.asarray(arrays["w_array_0"])
    if w0.ndim == 3:
        fmt, required = "per_pixel", PER_PIXEL_ARRAYS
    elif w0.ndim == 2:
        fmt, required = "mlp", MLP_ARRAYS
    else:
        raise _shape_error(source, "w_array_0", w0.shape, "(P, H, L) (per-pixel format) or (H, L) (MLP format)")
    missing = [name for name in required if name not in arrays]
    if missing:
        raise InputError(f"{source}: missing array {missing[0]} ({fmt.replace('_', '-')} format needs {', '.join(required)})")
    shapes = {name: tuple(np.shape(arrays[name])) for name in required}
    # expected shape of each array, and where its dimensions come from
    if fmt == "per_pixel":
        p, h, n_labels = w0.shape
        origin = "P, H, L from w_array_0"
        expected = {"b_array_0": ((p, h), "(P, H)"), "w_array_1": ((p, h), "(P, H)"), "b_array_1": ((p,), "(P,)")}
    else:
        for name in ("w_array_1", "w_array_2"):
            if len(shapes[name]) != 2:
                raise _shape_error(source, name, shapes[name], "a 2-D array")
        h, n_labels = w0.shape
        h2, p = shapes["w_array_1"][0], shapes["w_array_2"][0]
        origin = "H, L from w_array_0, H2 from w_array_1, P from w_array_2"
        expected = {
            "b_array_0": ((h,), "(H,)"),
            "w_array_1": ((h2, h), "(H2, H)"),
            "b_array_1": ((h2,), "(H2,)"),
            "w_array_2": ((p, h2), "(P, H2)"),
            "b_array_2": ((p,), "(P,)"),
        }
    expected["x_min"] = ((n_labels,), "(L,)")
    expected["x_max"] = ((n_labels,), "(L,)")
    for name, (shape, text) in expected.items():
        if shapes[name] != shape:
            raise _shape_error(source, name, shapes[name], f"{text} = {shape} ({origin})")
    empty = [name for name in required if 0 in shapes[name]]
    if empty:
        raise _shape_error(source, empty[0], shapes[empty[0]], "no empty dimension")
    for name in required:
        values = np.asarray(arrays[name])
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
            raise InputError(f"{source}: array {name} is not real-valued (dtype {values.dtype})")
        if not np.all(np.isfinite(values)):
            raise InputError(f"{source}: array {name} holds NaN or infinite values")
    x_min = np.asarray(arrays["x_min"], dtype=np.float64)
    x_max = np.asarray(arrays["x_max"], dtype=np.float64)
    bad = np.flatnonzero(~(x_max > x_min))
    if bad.size:
        k = int(bad[0])
        raise InputError(f"{source}: x_max[{k}]={x_max[k]:g} is not above x_min[{k}]={x_min[k]:g}")
    return fmt


class PayneEmulator(nn.Module):
    """A Payne emulator in either public format: labels (..., L) -> flux (..., P).

    Build one with :meth:`load`, :meth:`from_arrays` or :meth:`mlp` (fresh weights for
    training).  ``emulator(labels)`` takes physical labels (torch, any leading batch
    shape) and raises InputError for labels outside the x_min/x_max box unless
    ``allow_extrapolation=True``; :meth:`predict` does the same for NumPy in batches.
    """

    def __init__(
        self,
        arrays: dict,
        label_names: Sequence[str] | str | None,
        wavelength: np.ndarray | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        source: str = "emulator",
    ):
        super().__init__()
        self.format = validate_arrays(arrays, source)
        self.source = source
        names = _normalize_names(label_names, source)
        n_labels = int(np.shape(arrays["x_min"])[0])
        if names is None:
            raise InputError(
                f"{source}: label names missing (the file has no label_names array; pass label_names)", "label_names"
            )
        if len(names) != n_labels:
            raise InputError(f"{source}: {len(names)} label names given for an emulator of {n_labels} labels")
        self.label_names = names
        self.x_min = np.asarray(arrays["x_min"], dtype=np.float64).copy()
        self.x_max = np.asarray(arrays["x_max"], dtype=np.float64).copy()
        self.register_buffer("_x_min", torch.as_tensor(self.x_min, dtype=torch.float64))
        self.register_buffer("_x_range", torch.as_tensor(self.x_max - self.x_min, dtype=torch.float64))
        names_w = PER_PIXEL_ARRAYS[:4] if self.format == "per_pixel" else MLP_ARRAYS[:6]
        for name in names_w:
            values = torch.as_tensor(np.array(arrays[name], dtype=np.float64), dtype=dtype)
            self.register_parameter(name, nn.Parameter(values, requires_grad=False))
        p = self.n_pixels
        if wavelength is not None:
            wavelength = np.asarray(wavelength, dtype=np.float64).reshape(-1)
            if wavelength.size != p:
                raise InputError(f"{source}: wavelength has {wavelength.size} pixels, the weights {p}")
            if not np.all(np.isfinite(wavelength)) or np.any(np.diff(wavelength) <= 0):
                raise InputError(f"{source}: wavelength must be finite and strictly increasing")
        self.wavelength = wavelength

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(cls, arrays: dict, label_names=None, wavelength=None, **kwargs) -> "PayneEmulator":
        """From a dict of arrays; ``label_names``/``wavelength`` in the dict are used if not given."""
        source = kwargs.pop("source", "emulator")
        stored = _normalize_names(arrays.get("label_names"), source)
        given = _normalize_names(label_names, source)
        if stored is not None and given is not None and stored != given:
            raise InputError(
                f"{source}: label names given ({' '.join(given)}) differ from those stored in the file ({' '.join(stored)})"
            )
        if wavelength is None and "wavelength" in arrays:
            wavelength = arrays["wavelength"]
        return cls(arrays, stored if stored is not None else given, wavelength, source=source, **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike, label_names=None, *, dtype: torch.dtype = torch.float32) -> "PayneEmulator":
        """Read a Payne ``.npz`` (either format) without unpickling anything."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path}: not a readable .npz file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
            raise InputError(f"{path}: not a readable .npz file ({exc.__class__.__name__})") from None
        except ValueError:  # object arrays need pickle
            raise InputError(f"{path}: holds object arrays, which would need pickle; chemtwin does not unpickle") from None
        return cls.from_arrays(arrays, label_names, dtype=dtype, source=str(path))

    @classmethod
    def mlp(
        cls,
        x_min,
        x_max,
        n_pixels: int,
        label_names,
        hidden: int = 300,
        wavelength=None,
        seed: int | None = 0,
        dtype: torch.dtype = torch.float32,
        output_bias: np.ndarray | None = None,
    ) -> "PayneEmulator":
        """A freshly initialized MLP-format emulator (He-style init, leaky ReLU)."""
        rng = np.random.default_rng(seed)
        x_min = np.asarray(x_min, dtype=np.float64)
        n_labels = x_min.size

        def layer(n_out, n_in, gain):
            return rng.normal(0.0, gain / np.sqrt(n_in), size=(n_out, n_in))

        arrays = {
            # scaled labels lie in [-0.5, 0.5] (std ~0.29): a larger first-layer gain keeps
            # the pre-activations O(1)
            "w_array_0": layer(hidden, n_labels, np.sqrt(2.0) / 0.29),
            "b_array_0": rng.normal(0.0, 0.1, size=hidden),
            "w_array_1": layer(hidden, hidden, np.sqrt(2.0)),
            "b_array_1": np.zeros(hidden),
            "w_array_2": layer(n_pixels, hidden, 0.01),
            "b_array_2": np.ones(n_pixels) if output_bias is None else np.asarray(output_bias, dtype=np.float64),
            "x_min": x_min,
            "x_max": np.asarray(x_max, dtype=np.float64),
        }
        return cls(arrays, label_names, wavelength, dtype=dtype, source="new emulator")

    # ------------------------------------------------------------------ properties
    @property
    def n_labels(self) -> int:
        return int(self.x_min.size)

    @property
    def n_pixels(self) -> int:
        return int(self.w_array_1.shape[0] if self.format == "per_pixel" else self.w_array_2.shape[0])

    @property
    def n_hidden(self) -> int:
        return int(self.w_array_0.shape[1] if self.format == "per_pixel" else self.w_array_0.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.w_array_0.dtype

    @property
    def box(self) -> dict[str, tuple[float, float]]:
        """{label: (x_min, x_max)}: where the emulator was trained."""
        return {n: (float(a), float(b)) for n, a, b in zip(self.label_names, self.x_min, self.x_max)}

    def chemical_label_names(self) -> list[str]:
        return [n for n in self.label_names if is_chemical_label(n)]

    def __repr__(self) -> str:
        return (
            f"PayneEmulator(format={self.format}, labels={self.n_labels}, hidden={self.n_hidden}, "
            f"pixels={self.n_pixels}, source={self.source!r})"
        )

    # ------------------------------------------------------------------ labels
    def check_labels(self, labels, allow_extrapolation: bool = False) -> None:
        """Raise InputError for non-finite labels or, unless allowed, labels outside the box."""
        values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels, dtype=np.float64)
        if values.ndim == 0 or values.shape[-1] != self.n_labels:
            raise InputError(f"labels have shape {values.shape}; expected (..., {self.n_labels}) for {', '.join(self.label_names)}")
        flat = values.reshape(-1, self.n_labels)
        finite = np.isfinite(flat)
        if not finite.all():
            row, k = (int(i) for i in np.argwhere(~finite)[0])
            raise InputError(f"label {self.label_names[k]} (row {row}) is not finite")
        if allow_extrapolation:
            return
        slack = _BOX_SLACK * (self.x_max - self.x_min)
        outside = (flat < self.x_min - slack) | (flat > self.x_max + slack)
        if outside.any():
            row, k = (int(i) for i in np.argwhere(outside)[0])
            raise InputError(
                f"label {self.label_names[k]}={flat[row, k]:g} (row {row}) is outside the emulator's box "
                f"[{self.x_min[k]:g}, {self.x_max[k]:g}]"
            )

    def scale(self, labels: torch.Tensor) -> torch.Tensor:
        """Physical labels -> scaled labels s in [-0.5, 0.5] (in the model's dtype)."""
        labels = torch.as_tensor(labels)
        s = (labels.to(torch.float64) - self._x_min) / self._x_range - 0.5
        return s.to(self.dtype)

    def unscale(self, s: torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(s).to(torch.float64) + 0.5) * self._x_range + self._x_min

    # ------------------------------------------------------------------ forward
    def forward_scaled(self, s: torch.Tensor) -> torch.Tensor:
        """Flux from scaled labels s (..., L) -> (..., P); no range check."""
        if self.format == "per_pixel":
            p, h, n_labels = self.w_array_0.shape
            inside = (s @ self.w_array_0.reshape(p * h, n_labels).T).unflatten(-1, (p, h)) + self.b_array_0
            return (torch.sigmoid(inside) * self.w_array_1).sum(-1) + self.b_array_1
        h = torch.nn.functional.leaky_relu(s @ self.w_array_0.T + self.b_array_0, LEAKY_SLOPE)
        h = torch.nn.functional.leaky_relu(h @ self.w_array_1.T + self.b_array_1, LEAKY_SLOPE)
        return h @ self.w_array_2.T + self.b_array_2

    def forward(self, labels: torch.Tensor, allow_extrapolation: bool = False) -> torch.Tensor:
        """Flux for physical labels (..., L) -> (..., P); differentiable w.r.t. labels."""
        labels = torch.as_tensor(labels)
        self.check_labels(labels, allow_extrapolation)
        return self.forward_scaled(self.scale(labels))

    @torch.no_grad()
    def predict(self, labels, batch_size: int = 4096, allow_extrapolation: bool = False) -> np.ndarray:
        """NumPy in, NumPy out: flux (N, P) for labels (N, L) (or (P,) for (L,))."""
        values = np.asarray(labels, dtype=np.float64)
        self.check_labels(values, allow_extrapolation)
        flat = values.reshape(-1, self.n_labels)
        out = np.empty((flat.shape[0], self.n_pixels), dtype=torch.empty(0, dtype=self.dtype).numpy().dtype)
        for a in range(0, flat.shape[0], batch_size):
            out[a : a + batch_size] = self.forward_scaled(self.scale(torch.from_numpy(flat[a : a + batch_size]))).numpy()
        return out.reshape(values.shape[:-1] + (self.n_pixels,))

    def jacobian(self, labels, allow_extrapolation: bool = False) -> np.ndarray:
        """d flux / d labels (N, P, L) in physical units, by forward-mode autodiff."""
        values = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        self.check_labels(values, allow_extrapolation)
        s = self.scale(torch.from_numpy(values))
        with torch.no_grad():
            jac = torch.func.vmap(torch.func.jacfwd(self.forward_scaled))(s)
        return (jac.to(torch.float64) / self._x_range).numpy()

    # ------------------------------------------------------------------ saving
    def arrays(self) -> dict[str, np.ndarray]:
        """The weights in the public layout, plus label_names and (if known) wavelength."""
        names = PER_PIXEL_ARRAYS[:4] if self.format == "per_pixel" else MLP_ARRAYS[:6]
        out = {name: getattr(self, name).detach().cpu().numpy().copy() for name in names}
        out["x_min"] = self.x_min.copy()
        out["x_max"] = self.x_max.copy()
        out["label_names"] = np.array(self.label_names, dtype=str)
        if self.wavelength is not None:
            out["wavelength"] = self.wavelength.copy()
        return out

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the public .npz layout atomically (temporary name, then rename)."""
        path = prepare_output(path, overwrite)
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            np.savez(fh, **self.arrays())
        return path




# ---------------------------------------------------------------------- emulators as generators
def parse_label_ranges(ranges: dict[str, tuple[float, float]] | None, emulator: PayneEmulator) -> dict[str, tuple[float, float]]:
    """Label ranges to draw from: the emulator's box, narrowed by ``ranges``.

    Raises InputError for an unknown label, an empty range or one reaching outside the box.
    """
    box = emulator.box
    out = dict(box)
    for name, (lo, hi) in (ranges or {}).items():
        if name not in box:
            raise InputError(f"label {name} is not one of the emulator's labels ({', '.join(emulator.label_names)})")
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise InputError(f"label {name}: range [{lo:g}, {hi:g}] is empty or not finite")
        b_lo, b_hi = box[name]
        slack = _BOX_SLACK * (b_hi - b_lo)
        if lo < b_lo - slack or hi > b_hi + slack:
            raise InputError(f"label {name}: range [{lo:g}, {hi:g}] is outside the emulator's box [{b_lo:g}, {b_hi:g}]")
        out[name] = (float(lo), float(hi))
    return out


def emulator_population(
    emulator: PayneEmulator,
    group_sizes,
    rng: np.random.Generator | int | None,
    *,
    chemical_labels: Sequence[str] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels of twin groups for an emulator: (labels (N, L) in the emulator's order, group (N,)).

    ``group_sizes`` (G,) gives the stars per group.  The stars of a group share the
    chemical labels (default: every label but TEFF, LOGG, micro/macro turbulence and
    velocities); the other labels are drawn per star.  All are uniform inside the
    emulator's x_min/x_max box, or inside ``ranges`` {name: (lo, hi)} (which must lie in it).
    """
    rng = np.random.default_rng(rng)
    names = emulator.label_names
    chemical = emulator.chemical_label_names() if chemical_labels is None else list(chemical_labels)
    unknown = [n for n in chemical if n not in names]
    if unknown:
        raise InputError(f"chemical label {unknown[0]} is not one of the emulator's labels ({', '.join(names)})")
    bounds = parse_label_ranges(ranges, emulator)
    sizes = np.asarray(group_sizes, dtype=np.int64).reshape(-1)
    if sizes.size and sizes.min() < 1:
        raise InputError("every twin group needs at least one star")
    group = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    lo = np.array([bounds[n][0] for n in names])
    hi = np.array([bounds[n][1] for n in names])
    shared = np.array([n in chemical for n in names])
    per_group = lo + (hi - lo) * rng.uniform(size=(sizes.size, len(names)))
    per_star = lo + (hi - lo) * rng.uniform(size=(group.size, len(names)))
    labels = np.where(shared, per_group[group], per_star) if group.size else np.zeros((0, len(names)))
    return labels, group

"""Models that turn spectra into chemical tags: the fader disentangling autoencoder (and
StarNet, a CNN that regresses labels).

``ChemTwin``, ``FaderConfig``, ``FaderNet``, ``train``, ``StarNet`` and ``StarNetConfig`` are
imported on first use, so that ``import chemtwin.tagging.<module>`` does not load torch.
"""

import importlib

_EXPORTS = {
    "ChemTwin": "chemtwin.tagging.estimator",
    "FaderConfig": "chemtwin.tagging.fader_config",
    "FaderNet": "chemtwin.tagging.fader",
    "train": "chemtwin.tagging.training",
    "StarNet": "chemtwin.tagging.starnet_estimator",
    "StarNetConfig": "chemtwin.tagging.starnet",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'chemtwin.tagging' has no attribute {name!r}")

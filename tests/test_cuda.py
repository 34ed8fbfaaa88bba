"""Training and embedding on a CUDA GPU (issue 18, item 6): run where CUDA exists, skipped elsewhere.

The GPU model must be the same model: its latents, computed on the GPU and on the CPU from the same
weights, agree to float32 rounding (cuDNN and CPU kernels sum in other orders: a relative tolerance
of a few 1e-5 of the latents' spread, not bit identity).
"""

import h5py
import numpy as np
import pytest
import torch
from fake_twins import write_fake

from chemtwin.cli import main


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_train_and_embed_on_cuda_agree_with_the_cpu(tmp_path):
    data = write_fake(tmp_path / "d.h5", 80, seed=3)
    model = tmp_path / "m"
    assert main(["train", str(data), "-o", str(model), "--epochs", "2", "--device", "cuda"]) == 0
    for device in ("cuda", "cpu"):
        assert main(["embed", str(model), str(data), "-o", str(tmp_path / f"z_{device}.h5"), "--device", device]) == 0
    with h5py.File(tmp_path / "z_cuda.h5") as f_gpu, h5py.File(tmp_path / "z_cpu.h5") as f_cpu:
        z_gpu, z_cpu = f_gpu["z"][()], f_cpu["z"][()]
    assert z_gpu.shape == z_cpu.shape and np.isfinite(z_gpu).all()
    # float32 kernels in another summation order: ~1e-6 relative per operation, a few layers deep
    assert np.abs(z_gpu - z_cpu).max() <= 5e-5 * max(float(z_cpu.std()), 1e-6) * z_cpu.shape[1] ** 0.5 + 1e-6


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_fake(tmp_path / "d.h5", 20, seed=4)
    assert main(["train", str(data), "-o", str(tmp_path / "m"), "--epochs", "1", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["chemtwin train: error: --device cuda: this machine has no CUDA GPU"]

"""2.5D FID: slicing, resampling, feature networks, per-plane scores."""

import numpy as np
import pytest
import torch
from monai.networks.nets import resnet50
from safetensors.torch import save_file

from evaluation.data import Case, stack_grid, to_grid
from evaluation.fid25d import (
    PLANES,
    PhantomSliceNet,
    RadImageNetResNet50,
    features_2p5d,
    fid_2p5d,
    grid_for,
    load_feature_net,
    plane_slices,
    train_slice_net,
)
from report2ct.bundle import BundleError


def test_planes_cut_across_the_named_ras_axis():
    volume = torch.zeros(1, 1, 6, 5, 4)
    volume[0, 0, 2, :, :] = 1.0  # one sagittal (fixed-x) plane lit
    sagittal = plane_slices(volume, "sagittal")
    assert sagittal.shape == (6, 1, 5, 4)
    assert sagittal.sum(dim=(1, 2, 3)).nonzero().flatten().tolist() == [2]
    assert plane_slices(volume, "axial").shape == (4, 1, 6, 5)
    assert plane_slices(volume, "coronal").shape == (5, 1, 6, 4)
    assert plane_slices(volume, "axial", center_slices_ratio=0.5).shape == (2, 1, 6, 5)


def test_resampling_uses_each_volumes_spacing():
    # The same 40 x 40 x 40 mm cube of soft tissue, voxelised at two spacings,
    # lands on the same common grid.
    def cube(spacing_mm):
        n = [int(120 / s) for s in spacing_mm]
        v = np.full(n, -1000.0, dtype=np.float32)
        lo = [int(40 / s) for s in spacing_mm]
        hi = [int(80 / s) for s in spacing_mm]
        v[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 40.0
        return Case("c", v, tuple(spacing_mm), np.zeros(18), "")

    fine = to_grid(cube((2.0, 2.0, 2.0)), spacing_mm=(4.0, 4.0, 4.0), shape=(30, 30, 30))
    coarse = to_grid(cube((4.0, 4.0, 8.0)), spacing_mm=(4.0, 4.0, 4.0), shape=(30, 30, 30))
    assert fine.shape == coarse.shape == (1, 30, 30, 30)
    soft = 1040 / 2000  # 40 HU in the [-1000, 1000] window
    assert float(fine.sum()) / soft == pytest.approx(10**3, rel=0.1)  # 10 voxels of 4 mm a side
    assert float(coarse.sum()) / soft == pytest.approx(10**3, rel=0.15)
    assert grid_for([(2, 2, 2), (4, 4, 8)]) == (4.0, 4.0, 8.0)


def _blobs(n, *, bright, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, 1, 16, 16, 12, generator=g) * 0.2
    if bright:
        v[:, :, 5:11, 5:11, 4:8] += 0.7
    return v


def test_fid_2p5d_is_zero_on_itself_and_grows_with_a_real_difference():
    torch.manual_seed(0)
    net = PhantomSliceNet(num_labels=2).eval()
    real_a, real_b = _blobs(6, bright=False, seed=1), _blobs(6, bright=False, seed=2)
    shifted = _blobs(6, bright=True, seed=3)
    fa = features_2p5d(real_a, net)
    same = fid_2p5d(fa, fa)
    assert set(same) == {*PLANES, "mean"}
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in same.values())
    between_real = fid_2p5d(fa, features_2p5d(real_b, net))
    to_shifted = fid_2p5d(fa, features_2p5d(shifted, net))
    for key in (*PLANES, "mean"):
        assert to_shifted[key] > 5 * between_real[key], key
    assert to_shifted["mean"] == pytest.approx(np.mean([to_shifted[p] for p in PLANES]))


def test_slice_net_trains_saves_and_loads(tmp_path, phantoms_train, phantom_grid):
    cases = phantoms_train[:24]
    volumes = stack_grid(cases, **phantom_grid)
    labels = torch.from_numpy(np.stack([c.labels for c in cases]))
    net = train_slice_net(volumes, labels, epochs=1, sample_every_k=4)
    net.save(tmp_path / "slice", metadata={"trained_on": "24 phantoms"})
    loaded = load_feature_net(str(tmp_path / "slice"))
    x = plane_slices(volumes[:2], "axial")
    torch.testing.assert_close(loaded(x), net(x))
    weights = tmp_path / "slice" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="checksum"):
        load_feature_net(str(tmp_path / "slice"))


def test_radimagenet_hook_loads_a_local_torchvision_layout_file(tmp_path):
    torch.manual_seed(0)
    source = resnet50(spatial_dims=2, n_input_channels=3, num_classes=1000)
    # As such files come: a DataParallel prefix and a classifier head.
    save_file(
        {f"module.{k}": v.contiguous() for k, v in source.state_dict().items()},
        tmp_path / "r50.safetensors",
    )
    net = load_feature_net(f"radimagenet:{tmp_path / 'r50.safetensors'}")
    slices = torch.rand(2, 1, 32, 32)
    feats = net(slices)
    assert feats.shape == (2, 2048)
    source.fc = torch.nn.Identity()
    x = slices.repeat(1, 3, 1, 1)
    x = (x - x.min()) / (x.max() - x.min() + 1e-10) - torch.tensor(
        RadImageNetResNet50.BGR_MEAN
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(feats, source.eval()(x))

    save_file({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="torchvision layout"):
        RadImageNetResNet50.from_file(tmp_path / "wrong.safetensors")

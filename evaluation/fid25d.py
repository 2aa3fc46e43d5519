"""2.5D FID: FID of 2D slice features, per plane and averaged.

The recipe of MONAI's MAISI evaluation (`compute_fid_2-5d_ct.py`, the one the
VLM3D challenge adopts): bring every volume to one grid (common spacing from
its metadata, then pad/crop), cut it into all slices along each axis (or a
central fraction), run every slice through a 2D feature network, pool the
feature maps spatially, and compute one FID per plane with MONAI's
`FIDMetric` over all slices of all volumes; the headline is the mean of the
three planes.

Feature networks are pluggable (`SliceFeatureNet`): the default is a small 2D
ResNet trained here on phantom slices (`train_slice_net`); a user with the
RadImageNet ResNet-50 weights loads them from a local file
(`RadImageNetResNet50.from_file`). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from monai.networks.nets import ResNet, resnet50
from torch import nn

from evaluation.bundle import EvalBundleModule
from evaluation.metrics import fid

# In RAS+ [x, y, z] (docs/conventions.md) the plane is named by the axis a
# slice is cut across: axial = fixed z (an x-y image), coronal = fixed y,
# sagittal = fixed x.
PLANE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
PLANES = tuple(PLANE_AXIS)


class SliceFeatureNet(Protocol):
    """A 2D feature network: (K, 1, h, w) slices with intensities in [0, 1]
    (HU window scaled, evaluation.data.HU_WINDOW) -> (K, D) features. Any
    preprocessing the network was trained with (channels, mean) is its own."""

    name: str

    def __call__(self, slices: torch.Tensor) -> torch.Tensor: ...


def plane_slices(
    volumes: torch.Tensor, plane: str, *, center_slices_ratio: float = 1.0, sample_every_k: int = 1
) -> torch.Tensor:
    """Slices of (N, 1, X, Y, Z) volumes across one plane's axis -> (N*K, 1, h, w).

    center_slices_ratio keeps the central fraction of slices along the axis (the
    MAISI script's option, to leave out slices of mostly air at the ends)."""
    axis = PLANE_AXIS[plane] + 2  # skip (N, C)
    length = volumes.shape[axis]
    start = int((1.0 - center_slices_ratio) / 2.0 * length)
    stop = max(int((1.0 + center_slices_ratio) / 2.0 * length), start + 1)
    index = torch.arange(start, stop, sample_every_k)
    chosen = volumes.index_select(axis, index)  # (N, 1, ..., K, ...)
    chosen = chosen.movedim(axis, 1)  # (N, K, 1, h, w)
    return chosen.reshape(-1, 1, *chosen.shape[3:])


@torch.no_grad()
def features_2p5d(
    volumes: torch.Tensor,
    net: SliceFeatureNet,
    *,
    center_slices_ratio: float = 1.0,
    sample_every_k: int = 1,
    batch_slices: int = 256,
) -> dict[str, torch.Tensor]:
    """{plane: (M, D) features} of (N, 1, X, Y, Z) volumes on a common grid."""
    out = {}
    for plane in PLANES:
        slices = plane_slices(
            volumes, plane, center_slices_ratio=center_slices_ratio, sample_every_k=sample_every_k
        )
        out[plane] = torch.cat([net(chunk) for chunk in slices.split(batch_slices)]).double()
    return out


def fid_2p5d(
    generated: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, float]:
    """{"axial", "coronal", "sagittal", "mean"} FIDs from two `features_2p5d` outputs."""
    scores = {plane: fid(generated[plane], reference[plane]) for plane in PLANES}
    scores["mean"] = float(np.mean([scores[p] for p in PLANES]))
    return scores


# --- feature networks -------------------------------------------------------


class RadImageNetResNet50(nn.Module):
    """RadImageNet ResNet-50 as the MAISI/VLM3D scripts use it, for users who
    have its weights (torchvision/`Warvito/radimagenet-models` key layout,
    which MONAI's ResNet shares).

    Preprocessing follows the MAISI script: grey to 3 channels, min-max over
    the batch of slices, subtract the ImageNet BGR means; features are the
    spatial average of the last feature map, (K, 2048).
    """

    name = "radimagenet-resnet50"
    BGR_MEAN = (0.406, 0.456, 0.485)

    def __init__(self) -> None:
        super().__init__()
        self.backbone = resnet50(spatial_dims=2, n_input_channels=3, feed_forward=False)

    @classmethod
    def from_file(cls, weights_path: str | Path) -> RadImageNetResNet50:
        """Load a local state dict (.safetensors, or a tensors-only .pt/.pth read
        with weights_only=True); a classifier head (`fc.*`) is ignored."""
        path = Path(weights_path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        net = cls()
        try:
            missing, unexpected = net.backbone.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shapes that do not fit
            missing, unexpected = [str(error).splitlines()[0]], []
        if missing or unexpected:
            raise ValueError(
                f"{path}: not a ResNet-50 state dict in the torchvision layout "
                f"(missing {missing[:5]}..., unexpected {unexpected[:5]}...)"
            )
        return net.eval()

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        x = slices.repeat(1, 3, 1, 1)  # grey -> 3 identical channels, so RGB->BGR is a no-op
        x = (x - x.min()) / (x.max() - x.min() + 1e-10)
        x = x - torch.tensor(self.BGR_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return self.backbone(x)  # feed_forward=False: (K, 2048) after global average pooling


def small_resnet_2d(num_outputs: int, *, width: int = 8) -> ResNet:
    """A four-stage basic-block ResNet (MONAI), ~100k parameters at width 8."""
    return ResNet(
        block="basic",
        layers=(1, 1, 1, 1),
        block_inplanes=[width, 2 * width, 4 * width, 8 * width],
        spatial_dims=2,
        n_input_channels=1,
        conv1_t_size=3,
        conv1_t_stride=1,
        num_classes=num_outputs,
    )


class PhantomSliceNet(EvalBundleModule, nn.Module):
    """The default feature network: a small 2D ResNet trained on phantom slices
    to tell each slice's plane and its volume's findings (`train_slice_net`);
    features are the pooled last stage, (K, 8 * width)."""

    name = "phantom-slice-resnet"
    KIND = "slice-feature-net"

    def __init__(self, *, num_labels: int, width: int = 8) -> None:
        super().__init__()
        self.config = {"num_labels": num_labels, "width": width}
        # heads: 3 plane logits + num_labels finding logits
        self.net = small_resnet_2d(len(PLANES) + num_labels, width=width)

    def features(self, slices: torch.Tensor) -> torch.Tensor:
        # MONAI ResNet's forward without its head: (K, 1, h, w) -> (K, 8 * width)
        net = self.net
        x = net.act(net.bn1(net.conv1(slices)))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return net.avgpool(x).flatten(1)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return self.features(slices)

    def logits(self, slices: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.features(slices))


def train_slice_net(
    volumes: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 3,
    slices_per_step: int = 64,
    sample_every_k: int = 2,
    width: int = 8,
    seed: int = 0,
) -> PhantomSliceNet:
    """Train the default feature network on (N, 1, X, Y, Z) real volumes on the
    common grid with their (N, L) 0/1 labels (each slice inherits its volume's).

    Supervision by plane and findings makes the features respond to anatomy
    orientation and to lesions, which is what 2.5D FID should compare; it is
    not a replacement for a network trained on millions of real images.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = PhantomSliceNet(num_labels=labels.shape[1], width=width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    slices, targets = [], []
    for plane_id, plane in enumerate(PLANES):
        s = plane_slices(volumes, plane, sample_every_k=sample_every_k)  # (N*K, 1, h, w)
        per_volume = s.shape[0] // volumes.shape[0]
        t = torch.zeros(s.shape[0], len(PLANES) + labels.shape[1])
        t[:, plane_id] = 1.0
        t[:, len(PLANES) :] = labels.float().repeat_interleave(per_volume, dim=0)
        slices.append(s)
        targets.append(t)
    # Planes have different in-plane shapes on a non-cubic grid: train per plane.
    net.train()
    for _ in range(epochs):
        for s, t in zip(slices, targets, strict=True):
            order = torch.randperm(s.shape[0], generator=generator)
            for batch in order.split(slices_per_step):
                logits = net.logits(s[batch])
                plane_loss = nn.functional.cross_entropy(
                    logits[:, : len(PLANES)], t[batch, : len(PLANES)]
                )
                label_loss = nn.functional.binary_cross_entropy_with_logits(
                    logits[:, len(PLANES) :], t[batch, len(PLANES) :]
                )
                optimizer.zero_grad()
                (plane_loss + label_loss).backward()
                optimizer.step()
    return net.eval()


def load_feature_net(spec: str) -> SliceFeatureNet:
    """A feature network from a spec: a PhantomSliceNet bundle directory, or
    "radimagenet:<local weights file>"."""
    if spec.startswith("radimagenet:"):
        return RadImageNetResNet50.from_file(spec.removeprefix("radimagenet:"))
    return PhantomSliceNet.load(spec)


def grid_for(spacings_mm: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """The common spacing: the coarsest spacing per axis among all volumes, so
    no volume is upsampled beyond what it holds."""
    return tuple(float(max(s[i] for s in spacings_mm)) for i in range(3))

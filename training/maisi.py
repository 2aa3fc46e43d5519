"""NVIDIA's pretrained MAISI VAE as a VAE run.

    import_maisi_vae("autoencoder_epoch273.pt", "runs/vae", preset("paper"))

`LatentCodec.vae` is MONAI's `AutoencoderKlMaisi`, so MAISI's weights load
into it unchanged once the state dict is found inside the file: NVIDIA's
`.pt` is read with `torch.load(weights_only=True)` (tensors and plain
containers, never code) and may hold the state dict itself, or nest it under
a key ("state_dict", "autoencoder", ...), with DataParallel's "module."
prefix; a `.safetensors` file holds it flat. The result is the layout a
`train vae` run leaves (`checkpoints/step-0/ema.safetensors` +
`client.json`), so `train ldm --vae-run` and `train export --vae-run` read it
through `training.engine.load_ema` exactly like a VAE trained here. It has no
DeepSpeed state: `train vae` cannot resume (fine-tune) from it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from report2ct.codec import build_vae
from report2ct.config import ModelConfig

# Where checkpoints nest a network's state dict (MAISI's scripts, Lightning,
# MONAI bundles, plain `torch.save({"autoencoder": ...})`).
NESTING_KEYS = (
    "state_dict",
    "autoencoder",
    "autoencoder_state_dict",
    "unet_state_dict",
    "model",
    "model_state_dict",
    "vae",
    "net",
)
# Added by DataParallel / DistributedDataParallel / torch.compile wrappers.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class MaisiImportError(ValueError):
    """A checkpoint that cannot become a VAE run; the message says why."""


def read_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The VAE's state dict inside a `.pt`/`.pth`/`.ckpt` or `.safetensors` file."""
    path = Path(checkpoint)
    if not path.is_file():
        raise MaisiImportError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _unwrap(path, load_file(str(path)))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure: not a plain-tensor checkpoint
        raise MaisiImportError(
            f"{path}: not a tensors-only checkpoint (read with weights_only=True): "
            f"{type(error).__name__}: {str(error)[:300]}"
        ) from None
    return _unwrap(path, loaded)


def _unwrap(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    trail = []
    while isinstance(loaded, Mapping) and not _is_state_dict(loaded):
        key = next((k for k in NESTING_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if key is None:
            raise MaisiImportError(
                f"{path}: no state dict found{' under ' + '/'.join(trail) if trail else ''}; "
                f"top-level keys {sorted(map(str, loaded))[:12]} (looked under {NESTING_KEYS})"
            )
        trail.append(key)
        loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not loaded:
        raise MaisiImportError(f"{path}: holds {type(loaded).__name__}, not a state dict")
    state = dict(loaded)
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def _is_state_dict(mapping: Mapping) -> bool:
    return bool(mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items()
    )


def check_vae_state(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], where: str
) -> None:
    """Raise MaisiImportError unless `state` has exactly `expected`'s keys and
    shapes (shapes only: `expected` may live on the meta device)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or shapes:
        parts = [
            f"{len(items)} {what}, e.g. {items[:3]}"
            for what, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("of another shape", shapes),
            )
            if items
        ]
        raise MaisiImportError(f"{where}: not this preset's VAE shape: {'; '.join(parts)}")


def import_maisi_vae(checkpoint: str | Path, out: str | Path, config: ModelConfig) -> Path:
    """Write `checkpoint`'s VAE (the shape of `config.vae`) as the VAE run
    `out`; returns its checkpoint folder. Refuses a directory that already
    holds a run; nothing is left behind when the weights do not fit."""
    checkpoint, out = Path(checkpoint), Path(out)
    if any(out.glob("checkpoints/step-*")):
        raise MaisiImportError(f"{out}: already holds a run's checkpoints; give a new --out")
    state = read_state_dict(checkpoint)
    vae = build_vae(config.vae)
    check_vae_state(vae.state_dict(), state, f"{checkpoint} for preset {config.name!r}")
    vae.load_state_dict(state)  # the real load: dtypes and values, strict
    ema = {key: value.detach().float().contiguous() for key, value in vae.state_dict().items()}
    final = out / "checkpoints" / "step-0"
    staging = out / "checkpoints" / ".step-0.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(ema, staging / "ema.safetensors")
    with checkpoint.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    # `latest_checkpoint` counts a checkpoint once client.json exists.
    client = {"step": 0, "losses": [], "rng": {}, "imported_from": str(checkpoint)}
    (staging / "client.json").write_text(json.dumps(client))
    staging.rename(final)
    (out / "imported.json").write_text(
        json.dumps(
            {
                "what": "pretrained MAISI VAE (AutoencoderKlMaisi)",
                "checkpoint": str(checkpoint.resolve()),
                "sha256": digest,
                "preset": config.name,
                "vae": config.to_dict()["vae"],
                "tensors": len(ema),
            },
            indent=2,
        )
        + "\n"
    )
    return final

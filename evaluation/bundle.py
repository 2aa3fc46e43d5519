"""Evaluation model bundles (classifier, slice feature network, CLIP pair).

The same on-disk contract as the generator's bundles, with the same code:
`config.json` + `model.safetensors` + `SHA256SUMS`, written and verified by
`report2ct.bundle` (checksums first, data formats only, never a pickle).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from report2ct.bundle import BundleError, verify_bundle, write_checksums

FORMAT = "ctfactory-eval-bundle/1"
WEIGHTS = "model.safetensors"


def save_eval_bundle(
    out_dir: str | Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write a bundle of `kind` (e.g. "label-classifier"); returns its sha256.

    config: the constructor arguments that rebuild the module; metadata: facts
    about how it was trained (data, epochs, measured held-out metrics).
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    save_file(tensors, root / WEIGHTS, metadata={"format": "pt"})
    document = {
        "format": FORMAT,
        "kind": kind,
        "config": dict(config),
        "metadata": dict(metadata or {}),
    }
    (root / "config.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return write_checksums(root)


def load_eval_bundle(
    path: str | Path, *, kind: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Verify, then return (config, metadata, state_dict) of a bundle of `kind`."""
    root = Path(path)
    verify_bundle(root)
    document = json.loads((root / "config.json").read_text())
    if document.get("format") != FORMAT or document.get("kind") != kind:
        raise BundleError(
            f"{root / 'config.json'}: a {document.get('kind')!r} bundle ({document.get('format')!r}); "
            f"expected a {kind!r} bundle ({FORMAT!r})"
        )
    return document["config"], document["metadata"], load_file(root / WEIGHTS)


class EvalBundleModule:
    """`save` / `load` for an evaluation network (an `nn.Module` with a
    `KIND` and a `config` dict of its constructor's arguments)."""

    KIND: str
    config: dict[str, Any]

    def save(self, out_dir: str | Path, *, metadata: Mapping[str, Any] | None = None) -> str:
        return save_eval_bundle(
            out_dir,
            kind=self.KIND,
            config=self.config,
            state_dict=self.state_dict(),
            metadata=metadata,
        )

    @classmethod
    def load(cls, path: str | Path):
        config, _, state = load_eval_bundle(path, kind=cls.KIND)
        model = cls(**config)
        model.load_state_dict(state)
        return model.eval()

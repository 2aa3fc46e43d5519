"""The report condition: FINDINGS and IMPRESSION, each encoded by several
frozen pretrained text encoders, masked-mean pooled and concatenated.

    context = [pool_1(findings) | ... | pool_N(findings)]      -> token 0
              [pool_1(impression) | ... | pool_N(impression)]  -> token 1
    shape (B, 2, sum_of_encoder_dims)

Reports longer than an encoder's position limit are encoded whole: split into
windows that fit, each framed by the encoder's own special tokens, and pooled
over every token of every window (never silently truncated; CT-RATE findings
often exceed 512 tokens). The empty condition used for classifier-free
guidance is explicit (`report2ct.condition`): a missing section encodes to
the empty token, the same one guidance and condition dropout use.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from report2ct.condition import empty, section
from report2ct.config import EncoderSpec


class EncoderLoadError(RuntimeError):
    pass


def resolve_source(spec: EncoderSpec, bundle_dir: Path | None = None) -> tuple[str, str | None]:
    """(what to pass to from_pretrained, revision) for an encoder spec."""
    source = spec.source
    if source.startswith("package:"):
        module = importlib.import_module(source.removeprefix("package:"))
        return str(module.get_model_path()), None
    if source.startswith("bundle:"):
        if bundle_dir is None:
            raise EncoderLoadError(f"encoder {spec.name}: {source} needs a bundle directory")
        path = (bundle_dir / source.removeprefix("bundle:")).resolve()
        if bundle_dir.resolve() not in path.parents:
            raise EncoderLoadError(f"encoder {spec.name}: {source} points outside the bundle")
        return str(path), None
    return source, spec.revision  # a local directory or a hub id (at its revision)


def encoder_revision(spec: EncoderSpec) -> str:
    """What identifies the weights, for the cache key and provenance."""
    if spec.source.startswith("package:"):
        from importlib.metadata import version

        package = spec.source.removeprefix("package:")
        return f"{package.replace('_', '-')}=={version(package.replace('_', '-'))}"
    return spec.revision or "unpinned"


class TextConditioner:
    """Frozen encoders -> context tokens, with an embedding cache keyed by
    (encoder, revision, text hash) so repeated reports cost nothing.

    The cache (LRU, `cache_size` embeddings on the CPU) and its `cache_hits`
    counter belong to this conditioner, so to the process that loaded it: in
    the factory each generation actor has its own; nothing is shared across
    actors or persisted."""

    def __init__(
        self,
        specs: Sequence[EncoderSpec],
        *,
        bundle_dir: Path | None = None,
        device: torch.device | str = "cpu",
        allow_remote_code: bool = False,
        cache_size: int = 4096,
    ) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load bar in every worker's log helps no one
        self.specs = tuple(specs)
        self.device = torch.device(device)
        self.tokenizers, self.models = [], []
        for spec in self.specs:
            if spec.trust_remote_code and not allow_remote_code:
                raise EncoderLoadError(
                    f"encoder {spec.name} asks to run code from its repository "
                    "(trust_remote_code); refused unless remote code is allowed "
                    "(allow_remote_code=True; on the command line --allow-remote-code, "
                    "in a job spec allow_remote_code: true)"
                )
            where, revision = resolve_source(spec, bundle_dir)
            kwargs = {"revision": revision, "trust_remote_code": spec.trust_remote_code}
            try:
                tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
                model = _load_encoder(spec, where, kwargs)
            except (OSError, ValueError) as error:
                raise EncoderLoadError(f"encoder {spec.name} from {where}: {error}") from error
            model.requires_grad_(False).eval().to(self.device)
            self.tokenizers.append(tokenizer)
            self.models.append(model)
        self.revisions = tuple(encoder_revision(spec) for spec in self.specs)
        self._cache: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self.cache_hits = 0

    @property
    def dim(self) -> int:
        return sum(spec.dim for spec in self.specs)

    def null_context(self, batch_size: int) -> torch.Tensor:
        """The empty report condition, (B, 2, D)."""
        return empty(batch_size, 2, self.dim, device=self.device)

    @torch.inference_mode()
    def encode(
        self, findings: Sequence[str | None], impressions: Sequence[str | None]
    ) -> torch.Tensor:
        """(B, 2, D) float32 context for B reports. A missing section (None,
        "" or only whitespace: `report2ct.condition.section`) is the empty
        condition's token, zeros, in training as in generation: a label-only
        record has no text at all."""
        if len(findings) != len(impressions):
            raise ValueError("findings and impressions must have the same length")
        return torch.stack([self._encode_section(findings), self._encode_section(impressions)], 1)

    def _encode_section(self, texts: Sequence[str | None]) -> torch.Tensor:
        texts = [section(text) for text in texts]
        out = empty(len(texts), self.dim, device=self.device)
        given = [i for i, text in enumerate(texts) if text is not None]
        if given:
            out[given] = self.encode_texts([texts[i] for i in given])
        return out

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(B, D): every encoder's pooled embedding, concatenated."""
        return torch.cat(
            [self._encode_with(index, texts) for index in range(len(self.specs))], dim=-1
        )

    def _encode_with(self, index: int, texts: list[str]) -> torch.Tensor:
        spec = self.specs[index]
        keys = [
            (spec.name, self.revisions[index], hashlib.sha256(text.encode()).hexdigest())
            for text in texts
        ]
        missing = sorted({i for i, key in enumerate(keys) if key not in self._cache})
        self.cache_hits += len(keys) - len(missing)
        if missing:
            pooled = self._pool_windows(index, [texts[i] for i in missing])
            for i, vector in zip(missing, pooled, strict=True):
                self._remember(keys[i], vector)
        return torch.stack([self._cache[key] for key in keys]).to(self.device)

    def _remember(self, key: tuple[str, str, str], vector: torch.Tensor) -> None:
        self._cache[key] = vector.float().cpu()
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _pool_windows(self, index: int, texts: list[str]) -> torch.Tensor:
        """Masked mean over all tokens of all windows of each text -> (B, dim)."""
        tokenizer, model, spec = self.tokenizers[index], self.models[index], self.specs[index]
        limit = min(
            spec.max_tokens, getattr(model.config, "max_position_embeddings", spec.max_tokens)
        )
        prefix, suffix = _special_frame(tokenizer)
        body = limit - len(prefix) - len(suffix)
        windows, owners = [], []
        for owner, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
            for start in range(0, max(len(ids), 1), body):
                windows.append(prefix + ids[start : start + body] + suffix)
                owners.append(owner)
        batch = tokenizer.pad({"input_ids": windows}, return_tensors="pt", padding=True)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        hidden = model(**batch).last_hidden_state.float()  # (W, L, dim)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (W, L, 1)
        owner = torch.tensor(owners, device=self.device)
        sums = torch.zeros(len(texts), hidden.shape[-1], device=self.device)
        counts = torch.zeros(len(texts), 1, device=self.device)
        sums.index_add_(0, owner, (hidden * mask).sum(dim=1))  # (B, dim)
        counts.index_add_(0, owner, mask.sum(dim=1))  # (B, 1)
        return sums / counts.clamp(min=1.0)


# Weights an encoder may lack: the context is pooled from the last hidden
# state here, so a checkpoint saved without its pooler head is complete.
UNUSED_HEADS = ("pooler.",)


def _load_encoder(spec: EncoderSpec, where: str, kwargs: dict):
    """AutoModel from `where`, refusing a checkpoint that lacks weights the
    context depends on. transformers prints a load report for any missing
    key (a missing pooler in every worker's log); the check here is stricter
    and says only what matters, so its report is kept quiet."""
    import logging

    from transformers import AutoModel

    def not_the_load_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    folder = Path(where)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        raise EncoderLoadError(
            f"encoder {spec.name} from {where}: no safetensors weights"
            + (f" (only {', '.join(pickled)}, a pickle never loaded here)" if pickled else "")
            + f"; import it with `--encoder {spec.name}={where}` (bundle init, train ldm, "
            "train export), which converts the weights to safetensors"
        )
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(not_the_load_report)
    try:
        model, info = AutoModel.from_pretrained(
            where, use_safetensors=True, output_loading_info=True, **kwargs
        )
    finally:
        report.removeFilter(not_the_load_report)
    missing = [key for key in info["missing_keys"] if not key.startswith(UNUSED_HEADS)]
    if missing:
        raise EncoderLoadError(
            f"encoder {spec.name} from {where}: the checkpoint lacks {len(missing)} weights "
            f"the context needs, e.g. {sorted(missing)[:3]}"
        )
    return model


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence
    (e.g. [CLS] ... [SEP]), found by framing a probe word."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(bare) + 1):
        if framed[start : start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare) :]
    raise EncoderLoadError(f"cannot find how {type(tokenizer).__name__} frames a sequence")

"""Text encoders for bundles and training runs.

- `train_report_bert`: a small BERT for the offline `demo` preset: a
  WordPiece vocabulary and a masked-language model learned from the training
  reports, saved as an ordinary transformers directory (safetensors) that
  the bundle ships.
- `import_encoders`: the pretrained encoders a preset names (the `paper`
  preset's CXR-BERT, MedEmbed, Bio_ClinicalBERT), or the local directories
  `--encoder NAME=SOURCE` points them at, copied into a bundle or a run as
  `encoders/<name>/` (spec source `bundle:encoders/<name>`), so that no node
  ever reaches a hub. A hub id is read from the local Hugging Face cache only;
  `pytorch_model.bin` weights are read with `torch.load(weights_only=True)`
  and stored as safetensors; a repository's own code (config.json
  `auto_map`) is copied only when remote code is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from report2ct.config import EncoderSpec, ModelConfig

log = logging.getLogger(__name__)

# Written beside a run's imported encoders: the specs its text cache used.
ENCODERS_JSON = "encoders.json"
# Data files an encoder directory may carry into a bundle (weights apart).
_DATA_SUFFIXES = {".json", ".txt", ".model", ".md"}
# A pickle's tensors (`pytorch_model.bin`, or shards with an index).
_PICKLED = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")
# transformers' own pattern for the sibling modules a remote-code file imports.
_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+))", re.M)


class EncoderImportError(ValueError):
    """An encoder that cannot be imported; the message names it and why."""


def parse_encoder_overrides(values: Sequence[str] | None) -> dict[str, str]:
    """`NAME=SOURCE` options -> {name: source}; SOURCE is a local directory
    or a hub id found in the local Hugging Face cache."""
    out: dict[str, str] = {}
    for value in values or ():
        name, sep, source = value.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise EncoderImportError(
                f"--encoder {value!r}: expected NAME=SOURCE (a local directory or a hub id)"
            )
        if name in out:
            raise EncoderImportError(f"--encoder {name}: given twice")
        out[name] = source
    return out


def resolve_encoder_dir(
    name: str, source: str, revision: str | None = None
) -> tuple[Path, str | None]:
    """(a local directory holding the encoder, the hub commit when it came
    from the cache). Never downloads."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local.resolve(), None
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise EncoderImportError(f"encoder {name}: {source} is not a directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as error:
        raise EncoderImportError(
            f"encoder {name}: {source!r} is neither a local directory nor a hub id in the "
            f"local Hugging Face cache ({type(error).__name__}); nothing is downloaded here: "
            f"fetch it where the hub is reachable (`hf download {source}`) or pass "
            f"--encoder {name}=DIR"
        ) from None
    return folder, folder.name  # a cache snapshot is named by its commit


def remote_code_files(name: str, folder: Path) -> list[str]:
    """The `.py` files an encoder's configs name in `auto_map` (and the
    sibling modules they import): what `trust_remote_code` would run."""
    modules: set[str] = set()
    for config_name in ("config.json", "tokenizer_config.json"):
        file = folder / config_name
        if not file.is_file():
            continue
        auto_map = json.loads(file.read_text()).get("auto_map") or {}
        for value in auto_map.values():
            for reference in value if isinstance(value, list) else [value]:
                if not reference:
                    continue
                if "--" in reference:
                    raise EncoderImportError(
                        f"encoder {name}: {config_name} auto_map {reference!r} points at code "
                        "in another repository, which cannot ship inside a bundle"
                    )
                modules.add(reference.rsplit(".", 1)[0])
    pending, files = sorted(modules), []
    while pending:
        module = pending.pop()
        file = folder / f"{module}.py"
        if f"{module}.py" in files:
            continue
        if not file.is_file():
            raise EncoderImportError(f"encoder {name}: auto_map names {module}.py, missing")
        files.append(f"{module}.py")
        for match in _RELATIVE_IMPORT.finditer(file.read_text()):
            pending.append(match.group(1) or match.group(2))
    return sorted(files)


def import_encoder(
    spec: EncoderSpec,
    source: str,
    dest: str | Path,
    *,
    allow_remote_code: bool = False,
) -> EncoderSpec:
    """Copy the encoder at `source` into `dest` (written aside and renamed,
    so a failure leaves nothing) and return its spec as a `bundle:` encoder
    of the directory that holds `encoders/<name>` (`dest`'s grandparent)."""
    from safetensors.torch import save_file

    folder, commit = resolve_encoder_dir(spec.name, source, spec.revision)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EncoderImportError(f"encoder {spec.name} from {folder}: no config.json")
    config = json.loads(config_file.read_text())
    hidden = config.get("hidden_size", config.get("d_model", config.get("dim")))
    if hidden != spec.dim:
        raise EncoderImportError(
            f"encoder {spec.name} from {folder}: hidden size {hidden}, the model's context "
            f"expects {spec.dim}"
        )
    code = remote_code_files(spec.name, folder)
    if code and not allow_remote_code:
        raise EncoderImportError(
            f"encoder {spec.name} from {folder} runs code from its repository "
            f"({', '.join(code)}, named in auto_map); remote code must be allowed: "
            "pass --allow-remote-code (allow_remote_code=True)"
        )
    dest = Path(dest)
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for file in sorted(folder.rglob("*")):
            relative = file.relative_to(folder)
            if not file.is_file() or any(part.startswith(".") for part in relative.parts):
                continue
            if relative.name == "pytorch_model.bin.index.json":
                continue  # indexes the pickles, replaced by one safetensors file
            if file.suffix in _DATA_SUFFIXES or (
                file.suffix == ".safetensors" and len(relative.parts) == 1
            ):
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, staging / relative)  # follows the cache's symlinks
        for name in code:
            shutil.copyfile(folder / name, staging / name)
        if not any(staging.glob("*.safetensors")):
            pickles = sorted(f for f in folder.iterdir() if _PICKLED.match(f.name))
            if not pickles:
                raise EncoderImportError(
                    f"encoder {spec.name} from {folder}: no weights (model.safetensors or "
                    "pytorch_model.bin)"
                )
            state: dict[str, torch.Tensor] = {}
            for pickle in pickles:
                try:
                    loaded = torch.load(pickle, map_location="cpu", weights_only=True)
                except Exception as error:  # any unpickling failure is a refusal
                    raise EncoderImportError(
                        f"encoder {spec.name}: {pickle} is not a plain tensor state dict "
                        f"({type(error).__name__}: {str(error)[:200]})"
                    ) from None
                state.update(loaded)
            # Tied weights share storage, which safetensors refuses: one copy each.
            tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
            save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("encoder %s imported from %s into %s", spec.name, folder, dest)
    return dataclasses.replace(
        spec,
        source=f"bundle:encoders/{dest.name}",
        revision=commit or spec.revision,
        trust_remote_code=bool(code),
    )


def import_encoders(
    config: ModelConfig,
    root: str | Path,
    overrides: Mapping[str, str] | None = None,
    *,
    allow_remote_code: bool = False,
    encoders_dir: str | Path | None = None,
) -> tuple[ModelConfig, dict[str, Path]]:
    """Every encoder of `config` that a hub or a local directory would
    provide (the preset's source, or `overrides[name]`) imported into
    `root/encoders/<name>/`. Returns the config with those specs as
    `bundle:encoders/<name>` and {"encoders/<name>": directory} for every
    `bundle:` encoder (imported ones under `root`, the others under
    `encoders_dir`); the packaged MiniLM stays as it is."""
    overrides = dict(overrides or {})
    names = [spec.name for spec in config.encoders]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise EncoderImportError(
            f"--encoder {', '.join(unknown)}: not an encoder of preset {config.name!r} "
            f"({', '.join(names)})"
        )
    root = Path(root)
    specs, dirs = [], {}
    for spec in config.encoders:
        source = overrides.get(spec.name, spec.source)
        if source.startswith("package:"):
            specs.append(dataclasses.replace(spec, source=source))
            continue
        if source.startswith("bundle:") and spec.name not in overrides:
            where = source.removeprefix("bundle:")
            if encoders_dir is not None:
                dirs[where] = Path(encoders_dir) / where
                if not dirs[where].is_dir():
                    raise EncoderImportError(
                        f"encoder {spec.name}: {dirs[where]} missing (--encoders-dir holds "
                        "the preset's bundle: encoders)"
                    )
            specs.append(spec)
            continue
        if source.startswith("bundle:"):
            raise EncoderImportError(f"--encoder {spec.name}={source}: give a directory or hub id")
        imported = import_encoder(
            spec,
            source,
            root / "encoders" / _safe_name(spec.name),
            allow_remote_code=allow_remote_code,
        )
        dirs[imported.source.removeprefix("bundle:")] = root / "encoders" / _safe_name(spec.name)
        specs.append(imported)
    return dataclasses.replace(config, encoders=tuple(specs)), dirs


def _safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise EncoderImportError(f"encoder name {name!r} cannot name a directory")
    return name


def train_report_bert(
    texts: list[str],
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    layers: int = 2,
    steps: int = 300,
    batch_size: int = 32,
    max_length: int = 128,
    vocab_size: int = 2000,
    seed: int = 0,
) -> Path:
    from tokenizers import BertWordPieceTokenizer
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertTokenizer,
        DataCollatorForLanguageModeling,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2)
    wordpiece.save_model(str(out))  # vocab.txt
    tokenizer = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=True)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer.vocab),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 32),
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_length,
    )
    model = BertForMaskedLM(config)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        picks = torch.randint(0, len(texts), (batch_size,), generator=generator).tolist()
        encoded = tokenizer([texts[i] for i in picks], truncation=True, max_length=max_length)
        batch = collator([{"input_ids": ids} for ids in encoded["input_ids"]])
        loss = model(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            attention_mask=(batch["input_ids"] != tokenizer.pad_token_id).long(),
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("report-bert step %d mlm loss %.3f", step, loss.item())
    model.bert.save_pretrained(out, safe_serialization=True)  # the encoder, without the MLM head
    tokenizer.save_pretrained(out)
    return out

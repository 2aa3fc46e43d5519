"""Model bundles: a directory with `config.json`, `*.safetensors` weights,
text encoders shipped inside it (ordinary transformers directories), and
`SHA256SUMS` covering every file.

Loading verifies every checksum *before* anything is built, refuses files the
sums do not list, and refuses any file type that could carry code or a
pickle: only data formats on an allow-list are accepted, and weights are read
with safetensors alone. The bundle's identity (`bundle_sha256`, written into
every output's provenance) is the sha256 of its `SHA256SUMS`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from report2ct.config import ModelConfig, preset

FORMAT = "report2ct-bundle/1"
SUMS = "SHA256SUMS"
# Data formats only: no pickles (.bin/.pt/.pth/.pkl/.ckpt), no code (.py).
ALLOWED_SUFFIXES = {".json", ".safetensors", ".txt", ".md", ".png", ".csv", ".model"}
# The one exception: the code an encoder's repository ships (CXR-BERT's
# modeling files), allowed only inside that encoder's directory, only when
# its spec trusts remote code and only when SHA256SUMS lists it; loading such
# a bundle still needs `allow_remote_code=True`.
CODE_SUFFIX = ".py"


class BundleError(RuntimeError):
    """A bundle that must not be loaded; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise BundleError(f"{path}: symbolic links are not allowed in a bundle")
        if path.is_file():
            out.append(path.relative_to(root).as_posix())
    return out


def write_checksums(root: Path) -> str:
    """(Re)write SHA256SUMS over every file; returns the bundle sha256."""
    lines = [f"{_sha256(root / name)}  {name}\n" for name in _files(root) if name != SUMS]
    (root / SUMS).write_text("".join(lines))
    return hashlib.sha256((root / SUMS).read_bytes()).hexdigest()


def verify_bundle(path: str | Path) -> str:
    """Check a bundle directory completely; return its sha256.

    Raises BundleError for: a missing directory or SHA256SUMS, a malformed
    line, a listed file missing or modified, a file not listed, a file type
    not on the allow-list.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    sums_path = root / SUMS
    if not sums_path.is_file():
        raise BundleError(f"{root}: missing {SUMS}; refusing an unverifiable bundle")
    listed: dict[str, str] = {}
    for number, line in enumerate(sums_path.read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or name.startswith("/") or ".." in Path(name).parts:
            raise BundleError(f"{sums_path}:{number}: malformed line {line[:80]!r}")
        listed[name] = digest
    present = [name for name in _files(root) if name != SUMS]
    code_dirs = _remote_code_dirs(root) if any(_is_code(n) for n in present) else set()
    for name in present:
        if _is_code(name) and Path(name).parent.as_posix() in code_dirs:
            pass  # its encoder's own code: checked against SHA256SUMS below
        elif Path(name).suffix.lower() not in ALLOWED_SUFFIXES:
            raise BundleError(
                f"{root / name}: file type not allowed in a bundle (only data formats: "
                f"{', '.join(sorted(ALLOWED_SUFFIXES))}; never pickles; code only in "
                "encoders/<name>/ of an encoder whose spec trusts remote code)"
            )
        if name not in listed:
            raise BundleError(f"{root / name}: not listed in {SUMS}")
    for name, digest in listed.items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"{file}: listed in {SUMS} but missing")
        if _sha256(file) != digest:
            raise BundleError(f"{file}: checksum mismatch (modified or corrupt)")
    return hashlib.sha256(sums_path.read_bytes()).hexdigest()


def _is_code(name: str) -> bool:
    return Path(name).suffix.lower() == CODE_SUFFIX


def _remote_code_dirs(root: Path) -> set[str]:
    """The directories whose code a bundle may carry: `encoders/<name>` of
    each encoder that lives in the bundle and trusts remote code. The
    config's own checksum is verified with every other file's."""
    try:
        encoders = json.loads((root / "config.json").read_text())["model"]["encoders"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return set()
    return {
        e["source"].removeprefix("bundle:")
        for e in encoders
        if isinstance(e, dict)
        and e.get("trust_remote_code") is True
        and str(e.get("source", "")).startswith("bundle:encoders/")
        and len(Path(e["source"].removeprefix("bundle:")).parts) == 2
    }


def read_config(path: str | Path) -> ModelConfig:
    """The bundle's ModelConfig (call after verify_bundle)."""
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BundleError(f"{file}: unreadable config: {error}") from None
    if data.get("format") != FORMAT:
        raise BundleError(f"{file}: format {data.get('format')!r} is not {FORMAT!r}")
    try:
        return ModelConfig.from_dict(data["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{file}: invalid model config: {error}") from None


def save_bundle(
    out_dir: str | Path,
    *,
    config: ModelConfig,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    extra_dirs: Mapping[str, str | Path] = {},
    extra_files: Mapping[str, str | Path] = {},
    metadata: Mapping[str, object] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> str:
    """Write a bundle; returns its sha256.

    weights: {"vae": state_dict, "denoiser": state_dict, ...} -> <name>.safetensors
    extra_dirs: {"encoders/phantom-bert": src_dir} copied in (e.g. text encoders)
    extra_files: {"training/loss_ldm.png": src} copied in
    metadata: JSON-able facts kept in config.json (training data, recipe, ...)
    weights_dtype: floating-point weights stored in this dtype (e.g.
        torch.float16, half the bytes); loading casts them back to the
        model's dtype (`load_state_dict` copies into its parameters)
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name, state in weights.items():
        tensors = {
            key: value.detach().to("cpu", dtype=_stored_dtype(value, weights_dtype)).contiguous()
            for key, value in state.items()
        }
        save_file(tensors, root / f"{name}.safetensors", metadata={"format": "pt"})
    for dest, src in extra_dirs.items():
        shutil.copytree(src, root / dest, dirs_exist_ok=True)
    for dest, src in extra_files.items():
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / dest)
    document = {"format": FORMAT, "model": config.to_dict(), "metadata": dict(metadata or {})}
    (root / "config.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return write_checksums(root)


def _stored_dtype(value: torch.Tensor, weights_dtype: torch.dtype | None) -> torch.dtype:
    if weights_dtype is not None and value.is_floating_point():
        return weights_dtype
    return value.dtype


def load_weights(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    file = Path(path) / f"{name}.safetensors"
    if not file.is_file():
        raise BundleError(f"{file}: missing weight file")
    return load_file(file)


def load_bundle(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    allow_remote_code: bool = False,
    torch_compile: bool = False,
    channels_last: bool = False,
    cudnn_benchmark: bool = False,
):
    """Verify, then build a ready `Report2CT` from a bundle directory, with
    the speed options of `apply_speed_options` (all off by default)."""
    from report2ct.pipeline import Report2CT

    root = Path(path)
    sha = verify_bundle(root)
    config = read_config(root)
    model = Report2CT(
        config,
        bundle_dir=root,
        bundle_sha256=sha,
        device=device,
        allow_remote_code=allow_remote_code,
    )
    for name, module in model.weight_modules().items():
        try:
            module.load_state_dict(load_weights(root, name))
        except RuntimeError as error:
            raise BundleError(
                f"{root / name}.safetensors: weights do not fit the config: {error}"
            ) from None
    return apply_speed_options(
        model.eval(),
        torch_compile=torch_compile,
        channels_last=channels_last,
        cudnn_benchmark=cudnn_benchmark,
    )


def apply_speed_options(
    model,
    *,
    torch_compile: bool = False,
    channels_last: bool = False,
    cudnn_benchmark: bool = False,
):
    """Speed options for a loaded `Report2CT` (returned, changed in place);
    none changes a weight or a state dict key.

    - `torch_compile`: `nn.Module.compile()` on the UNet, the ControlNet and
      the VAE decoder (in place, so state dict keys keep no `_orig_mod.`).
      The first call at each new shape compiles (tens of seconds); later
      ones run the fused kernels. Decode tiles all share one shape.
    - `channels_last`: the convolution weights in `channels_last_3d`, which
      cuDNN's fastest 3-D kernels read without a transpose.
    - `cudnn_benchmark`: `torch.backends.cudnn.benchmark`, process-wide:
      cuDNN times its algorithms at each new input shape and keeps the
      fastest (the sampler's shapes never change within a job). CUDA only.
    """
    modules = [model.denoiser.unet, model.codec.vae]
    if model.denoiser.controlnet is not None:
        modules.append(model.denoiser.controlnet)
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if channels_last:
        for module in modules:
            module.to(memory_format=torch.channels_last_3d)
    if torch_compile:
        model.denoiser.unet.compile()
        if model.denoiser.controlnet is not None:
            model.denoiser.controlnet.compile()
        model.codec.vae.decoder.compile()
    model.speed_options = {
        "torch_compile": torch_compile,
        "channels_last": channels_last,
        "cudnn_benchmark": cudnn_benchmark,
    }
    return model


# --- Random bundles (tests, benchmarks, development) -----------------------

_REPORT_WORDS = [
    "the",
    "a",
    "an",
    "and",
    "or",
    "of",
    "in",
    "on",
    "at",
    "to",
    "with",
    "without",
    "no",
    "not",
    "is",
    "are",
    "was",
    "were",
    "be",
    "seen",
    "observed",
    "detected",
    "noted",
    "normal",
    "limits",
    "within",
    "examination",
    "thorax",
    "ct",
    "chest",
    "trachea",
    "main",
    "bronchi",
    "bronchus",
    "open",
    "lung",
    "lungs",
    "left",
    "right",
    "both",
    "bilateral",
    "upper",
    "middle",
    "lower",
    "lobe",
    "lobes",
    "parenchyma",
    "window",
    "mass",
    "nodule",
    "nodules",
    "lesion",
    "mm",
    "cm",
    "size",
    "diameter",
    "heart",
    "contour",
    "cardiac",
    "enlarged",
    "cardiomegaly",
    "pericardial",
    "pleural",
    "effusion",
    "thickening",
    "fluid",
    "emphysema",
    "emphysematous",
    "consolidation",
    "atelectasis",
    "opacity",
    "opacities",
    "ground",
    "glass",
    "calcification",
    "calcified",
    "plaques",
    "aorta",
    "aortic",
    "coronary",
    "artery",
    "arteries",
    "wall",
    "lymph",
    "node",
    "nodes",
    "lymphadenopathy",
    "mediastinal",
    "hilar",
    "axillary",
    "hernia",
    "hiatal",
    "esophagus",
    "medical",
    "material",
    "port",
    "catheter",
    "pacemaker",
    "bone",
    "bones",
    "structures",
    "vertebra",
    "rib",
    "ribs",
    "spine",
    "liver",
    "diaphragm",
    "impression",
    "findings",
    "minimal",
    "mild",
    "moderate",
    "large",
    "small",
    "measuring",
    "approximately",
    "segment",
    "segments",
    "area",
    "areas",
    "sequela",
    "fibrotic",
    "mosaic",
    "attenuation",
    "pattern",
    "peribronchial",
    "bronchiectasis",
    "interlobular",
    "septal",
]


def write_random_bert(out_dir: str | Path, *, hidden_size: int, seed: int = 0) -> Path:
    """A tiny randomly initialised BERT + WordPiece tokenizer, saved as an
    ordinary transformers directory (safetensors)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,;:-()/%"
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *_REPORT_WORDS,
        *letters,
        *(f"##{c}" for c in letters),
    ]
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True)
    torch.manual_seed(seed)
    model = BertModel(
        BertConfig(
            vocab_size=len(tokenizer.vocab),
            hidden_size=hidden_size,
            num_hidden_layers=2,
            num_attention_heads=max(1, hidden_size // 16),
            intermediate_size=2 * hidden_size,
            max_position_embeddings=128,
        )
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_random_bundle(
    out_dir: str | Path,
    *,
    preset_name: str = "tiny",
    seed: int = 0,
    config: ModelConfig | None = None,
    encoder_dirs: Mapping[str, str | Path] = {},
    metadata: Mapping[str, object] | None = None,
) -> str:
    """A randomly initialised bundle of a preset (encoders inside it random
    too, the packaged MiniLM referenced): for tests and benchmarks.
    `encoder_dirs` ({"encoders/<name>": directory}) ships real encoders
    instead of random ones for those `bundle:` sources."""
    import tempfile

    from report2ct.codec import LatentCodec
    from report2ct.denoiser import Denoiser, perturb_zero_init
    from report2ct.pipeline import weight_modules

    config = config or preset(preset_name)
    torch.manual_seed(seed)
    codec = LatentCodec(config.vae, latent_scale=config.latent_scale)
    denoiser = Denoiser.for_model(config)
    perturb_zero_init(denoiser, seed=seed)
    weights = {name: m.state_dict() for name, m in weight_modules(codec, denoiser).items()}
    with tempfile.TemporaryDirectory() as scratch:
        extra = dict(encoder_dirs)
        for spec in config.encoders:
            dest = spec.source.removeprefix("bundle:")
            if spec.source.startswith("bundle:") and dest not in extra:
                extra[dest] = write_random_bert(
                    Path(scratch) / dest, hidden_size=spec.dim, seed=seed
                )
        return save_bundle(
            out_dir,
            config=config,
            weights=weights,
            extra_dirs=extra,
            metadata={
                "trained": False,
                "note": f"randomly initialised {config.name} bundle, seed {seed}",
                **(metadata or {}),
            },
        )

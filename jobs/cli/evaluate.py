"""`ctfactory evaluate`: does a generated set show what its reports say?"""

from __future__ import annotations

from pathlib import Path

import typer

from jobs.cli._app import app


@app.command()
def evaluate(
    generated: str = typer.Option(
        ..., "--generated", "-g", help="a generate job's run (<output>/<run>, local path or s3://)"
    ),
    reference: Path = typer.Option(
        ..., "--reference", "-r", help="CT-RATE-layout data set (a phantom set or CT-RATE)"
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="directory for metrics.json, report.md, montages/"
    ),
    classifier: str | None = typer.Option(
        None,
        "--classifier",
        help="label-classifier bundle (default: train one on the reference's train split)",
    ),
    clip: str | None = typer.Option(None, "--clip", help="CLIP-pair bundle (default: train one)"),
    feature_net: str | None = typer.Option(
        None,
        "--feature-net",
        help="slice feature network: a bundle dir, or radimagenet:<local weights file> (default: train one)",
    ),
    spacing_mm: tuple[float, float, float] = typer.Option(
        (8.0, 8.0, 10.0), "--spacing-mm", help="common grid spacing x y z (mm)"
    ),
    shape: tuple[int, int, int] = typer.Option(
        (48, 48, 32), "--shape", help="common grid shape x y z"
    ),
    epochs: int = typer.Option(20, "--epochs", min=1, help="epochs for networks trained here"),
    seed: int = typer.Option(0, "--seed", help="seed of networks trained here"),
    classifier_grid: str = typer.Option(
        "fine",
        "--classifier-grid",
        help="grid of a label classifier trained here: 'fine' (4 x 4 x 5 mm, a nodule spans "
        "several voxels) or 'common' (--spacing-mm/--shape)",
    ),
) -> None:
    """Label fidelity (classifier AUROC, generated vs held-out real), 2.5D FID
    per plane and CLIP scores; writes OUT/metrics.json and OUT/report.md.

    The reference's 'train' split trains any evaluation network not given as
    a bundle; its 'valid' split is the held-out real set. A classifier trained
    here is saved (OUT/models/classifier) with per-label thresholds chosen on
    the held-out set: `ctfactory generate --verify` takes it as a verifier.
    """
    from rich.console import Console

    from evaluation.data import generated_cases, reference_cases
    from evaluation.report import EvalSettings
    from evaluation.report import evaluate as run

    settings = EvalSettings(
        spacing_mm=spacing_mm,
        shape=shape,
        classifier_epochs=epochs,
        clip_epochs=epochs,
        seed=seed,
        classifier_grid=classifier_grid,
    )
    try:
        gen = generated_cases(generated)
        train = reference_cases(reference, split="train")
        held_out = reference_cases(reference, split="valid")
    except (OSError, ValueError) as error:
        Console(stderr=True).print(f"[red]evaluate: {error}[/red]")
        raise typer.Exit(2) from None
    metrics = run(
        gen,
        train,
        held_out,
        out_dir=out,
        settings=settings,
        classifier=classifier,
        clip=clip,
        feature_net=feature_net,
    )
    fidelity, fid, scores = metrics["label_fidelity"], metrics["fid_2p5d"], metrics["clip"]
    Console().print(
        f"label fidelity ratio {fidelity['ratio']} (macro AUROC generated "
        f"{fidelity['generated']['macro']}, held-out real {fidelity['real']['macro']}), "
        f"2.5D FID {fid['mean']:.4f}, "
        f"CLIP text-to-image {scores['text_to_image']:.1f}; wrote {out / 'metrics.json'}, {out / 'report.md'}"
    )


@app.command()
def ablate(
    bundle: list[str] = typer.Option(
        ...,
        "--bundle",
        "-b",
        help="NAME=DIR, repeatable: e.g. 'several encoders=report2ct/bundles/demo' "
        "'one encoder=runs/demo-one-encoder'. Guidance is ablated on the first.",
    ),
    reference: Path = typer.Option(
        ...,
        "--reference",
        "-r",
        help="CT-RATE-layout phantom set: trains the networks, held-out split scores",
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="directory for ablation.json and ablation.md"
    ),
    n: int = typer.Option(40, "--n", min=4, help="reports (fresh phantom seeds) per variant"),
    steps: int | None = typer.Option(None, "--steps", help="sampler steps (default: the bundle's)"),
    scales: list[float] = typer.Option(
        [3.0, 5.0], "--scale", help="guidance scales 'on', repeatable"
    ),
    classifier: str | None = typer.Option(None, "--classifier", help="label-classifier bundle"),
    clip: str | None = typer.Option(None, "--clip", help="CLIP-pair bundle"),
    feature_net: str | None = typer.Option(None, "--feature-net", help="slice feature network"),
    spacing_mm: tuple[float, float, float] = typer.Option(
        (8.0, 8.0, 10.0), "--spacing-mm", help="common grid spacing x y z (mm)"
    ),
    shape: tuple[int, int, int] = typer.Option(
        (48, 48, 32), "--shape", help="common grid shape x y z"
    ),
    epochs: int = typer.Option(20, "--epochs", min=1, help="epochs for networks trained here"),
    classifier_grid: str = typer.Option(
        "fine", "--classifier-grid", help="'fine' (4 x 4 x 5 mm) or 'common'"
    ),
    ask_by: list[str] = typer.Option(
        [],
        "--ask-by",
        help="also ask the first bundle by 'labels' alone or by 'text+labels' (at the "
        "largest --scale), repeatable; needs a bundle with the label condition",
    ),
) -> None:
    """The paper's ablations on the phantom world: guidance off (s=1) vs on at
    each --scale for the first bundle, and one row per further bundle (e.g. one
    text encoder vs several). Every variant generates the same reports with the
    same seeds and is scored by the same networks against the same held-out set.
    """
    import json

    from rich.console import Console

    from evaluation.ablation import (
        Variant,
        ablation_markdown,
        condition_variants,
        guidance_variants,
        phantom_records,
        run_ablation,
    )
    from evaluation.data import reference_cases
    from evaluation.report import EvalSettings, evaluation_models
    from report2ct.bundle import BundleError, read_config

    named = []
    for item in bundle:
        name, sep, path = item.rpartition("=")
        named.append((name if sep else Path(path).name, path))
    settings = EvalSettings(
        spacing_mm=spacing_mm,
        shape=shape,
        classifier_epochs=epochs,
        clip_epochs=epochs,
        classifier_grid=classifier_grid,
    )
    try:
        first = read_config(named[0][1])  # a bad bundle fails before any work
        extra = condition_variants(
            named[0][1], ask_by, guidance_scale=max(scales), prefix=f"{named[0][0]}: "
        )
        if ask_by and not first.label_condition:
            raise ValueError(f"{named[0][1]}: --ask-by needs a bundle with the label condition")
        train = reference_cases(reference, split="train")
        held_out = reference_cases(reference, split="valid")
    except (OSError, ValueError, BundleError) as error:
        Console(stderr=True).print(f"[red]ablate: {error}[/red]")
        raise typer.Exit(2) from None
    out.mkdir(parents=True, exist_ok=True)
    models = evaluation_models(
        train, settings, out, classifier=classifier, clip=clip, feature_net=feature_net
    )
    variants = guidance_variants(named[0][1], scales_on=scales, prefix=f"{named[0][0]}: ")
    variants += extra + [Variant(name, path, max(scales)) for name, path in named[1:]]
    # Fresh seeds: neither the reference nor the generator's training set drew them.
    records = phantom_records(range(900_000, 900_000 + n), spacing_mm=first.default_spacing_mm)
    rows = run_ablation(
        variants,
        records,
        held_out,
        classifier=models[0],
        clip_model=models[1],
        feature_net=models[2],
        settings=settings,
        num_steps=steps,
    )
    (out / "ablation.json").write_text(
        json.dumps({"rows": rows, "models": models[3]}, indent=2) + "\n"
    )
    (out / "ablation.md").write_text(ablation_markdown(rows))
    Console().print(ablation_markdown(rows))


@app.command("train-verifier")
def train_verifier(
    out: Path = typer.Option(..., "--out", "-o", help="bundle directory to write"),
    n_train: int = typer.Option(160, "--n-train", min=8, help="training phantoms"),
    n_held_out: int = typer.Option(
        80, "--n-held-out", min=8, help="held-out phantoms the thresholds are chosen on"
    ),
    epochs: int = typer.Option(10, "--epochs", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Train a label verifier on phantoms drawn in memory (the fine grid) and
    write it as a verified bundle with per-label thresholds chosen on
    held-out phantoms (`ctfactory generate --verify OUT`). The committed
    report2ct/bundles/verifier is this command's output with its defaults."""
    import json

    from rich.console import Console

    from evaluation.classifier import build_verifier

    metadata = build_verifier(
        str(out), n_train=n_train, n_held_out=n_held_out, epochs=epochs, seed=seed
    )
    judged = {n: t for n, t in metadata["thresholds"].items() if t is not None}
    Console().print(
        f"wrote {out}: held-out macro AUROC {metadata['held_out_macro_auroc']:.3f}, judges "
        f"{json.dumps(judged)}, held-out pass rate {metadata['held_out_pass_rate']:.3f}"
    )

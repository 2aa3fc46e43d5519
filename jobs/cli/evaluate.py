"""`ctfactory evaluate`: does a generated set show what its reports say?"""

from __future__ import annotations

from pathlib import Path

import typer

from jobs.cli._app import app


@app.command()
def evaluate(
    generated: str = typer.Option(
        ..., "--generated", "-g", help="a generate job's index.jsonl (local path or s3://)"
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
        help="label-classifier bundle [default: train one on the reference's train split]",
    ),
    clip: str | None = typer.Option(None, "--clip", help="CLIP-pair bundle [default: train one]"),
    feature_net: str | None = typer.Option(
        None,
        "--feature-net",
        help="slice feature network: a bundle dir, or radimagenet:<local weights file> [default: train one]",
    ),
    spacing_mm: tuple[float, float, float] = typer.Option(
        (8.0, 8.0, 10.0), "--spacing-mm", help="common grid spacing x y z (mm)"
    ),
    shape: tuple[int, int, int] = typer.Option(
        (48, 48, 32), "--shape", help="common grid shape x y z"
    ),
    epochs: int = typer.Option(20, "--epochs", min=1, help="epochs for networks trained here"),
    seed: int = typer.Option(0, "--seed", help="seed of networks trained here"),
) -> None:
    """Label fidelity (classifier AUROC, generated vs held-out real), 2.5D FID
    per plane and CLIP scores; writes OUT/metrics.json and OUT/report.md.

    The reference's 'train' split trains any evaluation network not given as
    a bundle; its 'valid' split is the held-out real set.
    """
    from rich.console import Console

    from evaluation.data import generated_cases, reference_cases
    from evaluation.report import EvalSettings
    from evaluation.report import evaluate as run

    settings = EvalSettings(
        spacing_mm=spacing_mm, shape=shape, classifier_epochs=epochs, clip_epochs=epochs, seed=seed
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
        f"label fidelity ratio {fidelity['ratio']}, 2.5D FID {fid['mean']:.4f}, "
        f"CLIP text-to-image {scores['text_to_image']:.1f}; wrote {out / 'metrics.json'}, {out / 'report.md'}"
    )

"""Entry point: score a generated set against a phantom reference (`kind: evaluate`).

ray job submit -- python -m jobs.evaluate --spec evaluate.yaml

`reference` is a CT-RATE-layout directory on the head node's file system
(its train split trains the evaluation networks, its valid split is the
held-out real set); `output` is a directory or an s3:// prefix, which gets
metrics.json, report.md, montages/ and the trained networks under models/.
"""

import json
import tempfile
from pathlib import Path

from jobs._entry import main


def run(spec) -> int:
    from evaluation.data import generated_cases, reference_cases
    from evaluation.report import EvalSettings, evaluate
    from factory.storage import StorageError, open_storage
    from jobs.specs import SpecError

    try:
        reference = open_storage(spec.reference).local_path()
        output = open_storage(spec.output)
    except StorageError as error:
        raise SpecError(str(error)) from None
    if reference is None:
        raise SpecError(f"reference {spec.reference!r}: give a local directory (CT-RATE layout)")
    generated = generated_cases(spec.generated)
    train = reference_cases(reference, split="train")
    held_out = reference_cases(reference, split="valid")
    with tempfile.TemporaryDirectory() as scratch:
        # Object storage gets the results uploaded once they are all written.
        out = output.local_path() or Path(scratch)
        settings = EvalSettings(classifier_epochs=spec.epochs, clip_epochs=spec.epochs)
        metrics = evaluate(generated, train, held_out, out_dir=out, settings=settings)
        if output.local_path() is None:
            output.upload_dir(out, "")
    print(json.dumps({k: metrics[k] for k in ("label_fidelity", "fid_2p5d", "clip")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main("evaluate", run))

"""Entry point: a generate job (`kind: generate`).

    ray job submit -- python -m jobs.generate --spec generate.yaml

Exit code 0: every record committed; 3: some rejected or failed (see
errors.jsonl); 2: the job could not run.
"""

import json

from jobs._entry import main


def run(spec) -> int:
    from factory.job import GenerateOptions, run_generate

    options = GenerateOptions(
        manifest=spec.manifest,
        output=spec.output,
        bundle=spec.bundle,
        run=spec.run,
        workers=spec.workers,
        gpus_per_worker=spec.gpus_per_worker,
        cpus_per_worker=spec.cpus_per_worker,
        precision=spec.precision,
        num_steps=spec.num_steps,
        guidance_scale=spec.guidance_scale,
        batch_size=spec.batch_size,
        nifti=spec.nifti,
        preview=spec.preview,
    )
    result = run_generate(options)
    print(
        json.dumps(
            {"run": result.run_uri, "counts": result.counts, "exit_code": result.exit_code},
            indent=2,
        )
    )
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main("generate", run))

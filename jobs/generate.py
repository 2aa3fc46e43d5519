"""Entry point: a generate job (`kind: generate`).

    ray job submit -- python -m jobs.generate --spec generate.yaml

Exit code 0: every record committed; 3: some rejected or failed (see
<run>/errors/); 2: the job could not run.
"""

import json

from jobs._entry import main


def run(spec) -> int:
    from factory.job import run_generate

    result = run_generate(spec)  # a GenerateSpec is the job's GenerateOptions
    print(
        json.dumps(
            {"run": result.run_uri, "counts": result.counts, "exit_code": result.exit_code},
            indent=2,
        )
    )
    return result.exit_code


if __name__ == "__main__":
    raise SystemExit(main("generate", run))

"""What every job entry point shares: read the spec (a file or inline JSON),
check it is of the entry's kind, run, and exit with the run's code.

Entry points are thin on purpose: spec -> one library call. `ray job submit`
runs them on the cluster's head node, e.g.

    ray job submit -- python -m jobs.generate --spec generate.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from jobs.specs import SpecError, load_spec, parse_spec

EXIT_FATAL = 2  # the spec was invalid or the job could not start


def read_spec(argv: list[str] | None, kind: str) -> Any:
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{kind}", description=f"Run a {kind} job."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="a YAML or JSON job spec file")
    source.add_argument("--spec-json", help="the job spec as inline JSON")
    args = parser.parse_args(argv)
    if args.spec:
        spec = load_spec(args.spec)
    else:
        try:
            data = json.loads(args.spec_json)
        except json.JSONDecodeError as error:
            raise SpecError(f"--spec-json: not valid JSON: {error}") from None
        spec = parse_spec(data, source="--spec-json")
    if spec.kind != kind:
        raise SpecError(f"this entry point runs '{kind}' jobs, the spec is a '{spec.kind}' job")
    return spec


def main(kind: str, run: Callable[[Any], int], argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        spec = read_spec(argv, kind)
        return int(run(spec))
    except SpecError as error:
        print(error, file=sys.stderr)
        return EXIT_FATAL

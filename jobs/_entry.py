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
import time
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
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text, or one JSON object a line (for log collectors)",
    )
    args = parser.parse_args(argv)
    _configure_logging(args.log_format)
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


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: time, level, logger, message (and the
    traceback, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def main(kind: str, run: Callable[[Any], int], argv: list[str] | None = None) -> int:
    """Exit codes, the same as the CLI's: the run's own (0 done, 3 partial),
    2 for a spec that cannot run or any failure that stopped the job."""
    try:
        spec = read_spec(argv, kind)
    except SpecError as error:
        print(error, file=sys.stderr)
        return EXIT_FATAL
    try:
        return int(run(spec))
    except Exception:
        logging.getLogger(f"jobs.{kind}").exception("the %s job stopped", kind)
        return EXIT_FATAL

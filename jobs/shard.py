"""Entry point: split a manifest into N shards (`kind: shard`).

ray job submit -- python -m jobs.shard --spec shard.yaml
"""

import json

from jobs._entry import main


def run(spec) -> int:
    from factory.shard import shard_manifest

    shards = shard_manifest(spec.manifest, spec.output, spec.num_shards)
    print(json.dumps({"shards": shards, "records": sum(shards.values())}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main("shard", run))

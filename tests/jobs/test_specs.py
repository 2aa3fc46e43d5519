"""Job specs: validated before anything starts, errors name the field, and the
submission id is a function of the spec's meaning."""

import pytest

from jobs.specs import GenerateSpec, SpecError, load_spec, parse_spec
from jobs.submit import absolutize, entrypoint, submission_id

GOOD = {"kind": "generate", "manifest": "s3://bucket/m.jsonl", "output": "s3://bucket/out"}


def test_defaults_and_kinds():
    spec = parse_spec(GOOD)
    assert isinstance(spec, GenerateSpec)
    assert spec.precision == "bf16" and spec.workers == 1
    for data in (
        {"kind": "train", "stage": "ldm", "data": "d", "output": "o", "vae_run": "v"},
        {"kind": "evaluate", "generated": "g/index.jsonl", "reference": "r", "output": "o"},
        {"kind": "shard", "manifest": "m.jsonl", "output": "shards", "num_shards": 4},
    ):
        assert parse_spec(data).kind == data["kind"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"precision": "int8"}, "precision"),
        ({"gpus_per_worker": -1}, "gpus_per_worker"),
        ({"run": "../escape"}, "run"),
        ({"surprise": True}, "surprise"),
        ({"manifest": ""}, "manifest"),
    ],
)
def test_invalid_generate_spec_names_the_field(change, field):
    with pytest.raises(SpecError) as excinfo:
        parse_spec({**GOOD, **change}, source="job.yaml")
    message = str(excinfo.value)
    assert message.startswith("job.yaml")
    assert f"field '{field}'" in message


def test_missing_required_and_unknown_kind():
    with pytest.raises(SpecError, match="field 'output'"):
        parse_spec({"kind": "generate", "manifest": "m"})
    with pytest.raises(SpecError, match="field 'kind'"):
        parse_spec({"kind": "generat", "manifest": "m"})
    with pytest.raises(SpecError, match="field 'num_shards'"):
        parse_spec({"kind": "shard", "manifest": "m", "output": "o", "num_shards": 0})


def test_load_spec_reads_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text("kind: generate\nmanifest: m.jsonl\noutput: out\nworkers: 2\n")
    (tmp_path / "b.json").write_text(
        '{"kind": "generate", "manifest": "m.jsonl", "output": "out", "workers": 2}'
    )
    assert load_spec(tmp_path / "a.yaml") == load_spec(tmp_path / "b.json")
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_submission_id_is_deterministic_and_meaningful():
    a = parse_spec(GOOD)
    b = parse_spec(
        {"output": "s3://bucket/out", "manifest": "s3://bucket/m.jsonl", "kind": "generate"}
    )
    c = parse_spec({**GOOD, "workers": 2})
    assert submission_id(a) == submission_id(b)  # key order does not matter
    assert submission_id(a) == submission_id(parse_spec({**GOOD, "workers": 1}))  # explicit default
    assert submission_id(a) != submission_id(c)
    assert submission_id(a, attempt=1).endswith("-retry1")


def test_entrypoint_round_trips_the_spec():
    import shlex

    from jobs._entry import read_spec

    spec = parse_spec({**GOOD, "guidance_scale": 5.0})
    argv = shlex.split(entrypoint(spec))
    assert argv[:3] == ["python", "-m", "jobs.generate"]
    assert read_spec(argv[3:], "generate") == spec
    with pytest.raises(SpecError, match="runs 'shard' jobs"):
        read_spec(argv[3:], "shard")


def test_absolutize_makes_local_paths_absolute(tmp_path):
    spec = parse_spec({"kind": "generate", "manifest": "m.jsonl", "output": "s3://b/o"})
    resolved = absolutize(spec, base=tmp_path)
    assert resolved.manifest == str(tmp_path / "m.jsonl")
    assert resolved.output == "s3://b/o"


def test_every_example_spec_is_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[2] / "examples" / "jobs").glob("*.yaml"))
    assert {load_spec(path).kind for path in examples} == {"generate", "train", "evaluate", "shard"}

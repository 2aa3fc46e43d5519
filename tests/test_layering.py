"""The import arrows of ARCHITECTURE.md, checked on the source itself."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "report2ct": {"ray", "deepspeed", "boto3", "botocore", "training", "factory", "jobs"},
    "training": {"factory", "jobs"},
    "factory": {"training", "jobs", "deepspeed"},
    "phantom": {"torch", "ray", "deepspeed", "boto3", "training", "factory", "jobs"},
    "evaluation": {"jobs"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    offenders = {path: bad for path, bad in offenders.items() if bad}
    assert not offenders, f"{package} imports what it must not: {offenders}"


def test_nothing_imports_jobs():
    for package in ("report2ct", "phantom", "training", "factory"):
        for path in (ROOT / package).rglob("*.py"):
            assert "jobs" not in imported_modules(path), path

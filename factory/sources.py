"""Manifests as users have them: JSONL (optionally gzipped), Parquet, and
CT-RATE's own reports CSV joined with its labels CSV.

    rows = manifest_rows("s3://b/train_reports.csv", labels="s3://b/train_predicted_labels.csv")
    for line, result in read_manifest(rows, config=config): ...

Every format becomes the same stream for `factory.manifest.read_manifest`:
JSON lines as bytes (each validated by `parse_line`) or tabular rows as
dicts (by `parse_record`), numbered from 1 in file order, so errors name the
line or row whatever the format (a row a source itself refuses comes as a
Rejection, numbered the same way). The format is chosen by the file name:
`.jsonl.gz` / `.json.gz`, `.parquet`, `.csv`; anything else is JSONL.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from typing import Any

from factory.manifest import Rejection
from factory.storage import storage_for
from report2ct.labels import CTRATE_LABELS

# CT-RATE's reports CSV: the columns a record is made of (the clinical
# information and technique columns are not part of a volume's condition).
CTRATE_ID, CTRATE_FINDINGS, CTRATE_IMPRESSION = "VolumeName", "Findings_EN", "Impressions_EN"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class ManifestError(ValueError):
    """A manifest that cannot be read at all (not one bad row): the job stops."""


def manifest_format(uri: str) -> str:
    name = uri.lower().rstrip("/")
    if name.endswith(".gz"):
        return "jsonl.gz"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "ctrate-csv"
    return "jsonl"


def manifest_rows(
    uri: str, *, labels: str | None = None
) -> Iterator[bytes | dict[str, Any] | Rejection]:
    """The manifest at `uri` as JSON lines (bytes) or rows (dicts), streamed
    where the format allows. `labels`: a CT-RATE labels CSV to join with a
    reports CSV by VolumeName."""
    kind = manifest_format(uri)
    if labels is not None and kind != "ctrate-csv":
        raise ManifestError(f"--labels joins a CT-RATE reports CSV; {uri} is {kind}")
    store, key = storage_for(uri)
    if kind == "jsonl":
        return store.iter_lines(key)
    data = store.read_bytes(key)
    if kind == "jsonl.gz":
        return _gzip_lines(data)
    if kind == "parquet":
        return _parquet_rows(uri, data)
    return _ctrate_rows(uri, data, None if labels is None else _ctrate_labels(labels))


def _gzip_lines(data: bytes) -> Iterator[bytes]:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        for line in stream:
            yield line.rstrip(b"\r\n")


def _parquet_rows(uri: str, data: bytes) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet manifest (columns = record fields; `labels` a struct
    or map column); nulls are fields not given."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(io.BytesIO(data))
    except Exception as error:  # pyarrow raises several types for a broken file
        raise ManifestError(f"{uri}: not a readable Parquet file: {error}") from None
    for batch in table.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            labels = row.get("labels")
            if isinstance(labels, list):  # a map column arrives as [(key, value), ...]
                row["labels"] = dict(labels)
            elif isinstance(labels, dict):  # a struct column: absent labels are null
                row["labels"] = {k: v for k, v in labels.items() if v is not None}
            yield {k: v for k, v in row.items() if v is not None}


def _csv_reader(uri: str, data: bytes) -> csv.DictReader:
    try:
        text = data.decode("utf-8-sig")  # a BOM is tolerated, CRLF too (csv handles it)
    except UnicodeDecodeError as error:
        raise ManifestError(f"{uri}: not UTF-8 (byte {error.start})") from None
    return csv.DictReader(io.StringIO(text, newline=""))


def volume_id(volume_name: str) -> str:
    """CT-RATE's `train_10008_a_1.nii.gz` -> the record id `train_10008_a_1`."""
    for suffix in NIFTI_SUFFIXES:
        if volume_name.endswith(suffix):
            return volume_name[: -len(suffix)]
    return volume_name


def _ctrate_rows(
    uri: str, data: bytes, labels: dict[str, dict[str, int]] | None
) -> Iterator[dict[str, Any] | Rejection]:
    """Records from CT-RATE's reports CSV: id from VolumeName, findings and
    impression from Findings_EN / Impressions_EN (an empty section is left
    out, as a missing one), labels from the joined labels CSV."""
    reader = _csv_reader(uri, data)
    missing = {CTRATE_ID, CTRATE_FINDINGS, CTRATE_IMPRESSION} - set(reader.fieldnames or ())
    if missing:
        raise ManifestError(f"{uri}: not a CT-RATE reports CSV: no column {sorted(missing)}")
    for row in reader:
        record: dict[str, Any] = {"id": volume_id(row[CTRATE_ID] or "")}
        for field, column in (("findings", CTRATE_FINDINGS), ("impression", CTRATE_IMPRESSION)):
            text = (row[column] or "").strip()
            if text:
                record[field] = text
        if labels is not None:
            if record["id"] not in labels:  # reported, never generated unlabelled
                yield Rejection(0, record["id"], f"{row[CTRATE_ID]}: no row in the labels CSV")
                continue
            record["labels"] = labels[record["id"]]
        yield record


def _ctrate_labels(uri: str) -> dict[str, dict[str, int]]:
    """CT-RATE's labels CSV as {record id: {label: 0/1}} (tens of thousands
    of rows: small enough to hold for the join)."""
    store, key = storage_for(uri)
    reader = _csv_reader(uri, store.read_bytes(key))
    missing = {CTRATE_ID, *CTRATE_LABELS} - set(reader.fieldnames or ())
    if missing:
        raise ManifestError(f"{uri}: not a CT-RATE labels CSV: no column {sorted(missing)}")
    out = {}
    for number, row in enumerate(reader, start=2):
        try:
            out[volume_id(row[CTRATE_ID])] = {n: int(float(row[n])) for n in CTRATE_LABELS}
        except (TypeError, ValueError):
            raise ManifestError(f"{uri}: line {number}: label values must be 0 or 1") from None
    return out

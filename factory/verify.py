"""Per-volume label verification: does a generated volume show the labels its
record asked for? If not, draw it again with the next derived seed.

    ctfactory generate ... --verify [BUNDLE] --resample K [--drop-unverified]

The verifier is a label-classifier bundle (`evaluation.classifier`) whose
metadata holds per-label decision thresholds chosen on held-out real
phantoms: by default the one committed at `report2ct/bundles/verifier`,
or any verified classifier bundle `ctfactory evaluate` writes (local
directory or s3:// prefix; SHA256SUMS checked before anything is read).

Per volume, in the worker's sample step, on the worker's device:

- its scores on all 18 labels;
- only the labels the record specifies count, and of those only the ones
  the verifier judges (a threshold in its bundle; a label it cannot
  separate on held-out phantoms has none). A volume passes when every
  counted positive label scores at or above its threshold and every counted
  negative one below;
- a volume that fails is drawn again with `redraw_seed(seed, n)`, n = 1..K,
  a seed derived (like every seed here, `report2ct.rng.volume_seed`) from
  the record's own: deterministic, so a rerun delivers the same volume;
- the first draw that passes is delivered. When none of the K + 1 draws
  passes, the draw that came closest (largest worst-label margin) is
  committed with `passed: false`, or with `--drop-unverified` not committed
  and reported in the errors with its scores. Never kept as if verified.

Every index row and every volume's attributes carry
`verification: {scores, passed, tries, verifier_sha256, seed, disagree}`;
`seed` is the seed of the delivered draw (the index row's `seed` is the same),
`disagree` the counted labels the delivered draw disagrees with. A record
that specifies no label the verifier judges (a report-only record) is scored
but not judged: `passed` is null, `tries` 1. Without --verify there is no
`verification` at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from report2ct.labels import CTRATE_LABELS
from report2ct.pipeline import GenerationResult, VolumeRequest
from report2ct.rng import volume_seed

# The committed verifier, and what `--verify` alone (or "default") means.
DEFAULT_VERIFIER = Path(__file__).resolve().parents[1] / "report2ct" / "bundles" / "verifier"
DEFAULT = "default"


class Unverified(ValueError):
    """A volume that passed none of its draws, dropped (--drop-unverified):
    the message names the record's key, the tries and the scores."""


@dataclass(frozen=True)
class VerifyOptions:
    """How a worker verifies (`WorkerOptions.verify`; None: no --verify):
    `bundle` the verifier bundle, `resample` the redraws of a volume that
    fails, `drop_unverified` what to do when none passes."""

    bundle: str = DEFAULT
    resample: int = 0
    drop_unverified: bool = False


def redraw_seed(seed: int, redraw: int) -> int:
    """The seed of redraw `redraw` (1, 2, ...) of the volume of seed `seed`
    (0: the seed itself): derived by `volume_seed`'s rule from a name of the
    pair, so it does not collide with a record's other samples (seed + i)."""
    if redraw == 0:
        return int(seed)
    return volume_seed(f"redraw:{int(seed)}:{redraw}", None)


def resolve(bundle: str) -> str:
    """The bundle a `--verify` value names ("default": the committed one)."""
    return str(DEFAULT_VERIFIER) if bundle in ("", DEFAULT) else bundle


class Verifier:
    """A loaded verifier: the classifier, its thresholds, its identity."""

    def __init__(
        self, classifier: Any, thresholds: Mapping[str, float | None], sha256: str, source: str
    ) -> None:
        unknown = sorted(set(thresholds) - set(CTRATE_LABELS))
        if unknown:
            raise ValueError(f"{source}: thresholds for unknown labels {unknown}")
        self.classifier = classifier
        self.thresholds = {n: thresholds.get(n) for n in CTRATE_LABELS}
        self.sha256 = sha256
        self.source = source

    @classmethod
    def load(cls, bundle: str, *, device: str = "cpu") -> Verifier:
        """Verify (SHA256SUMS) and load a verifier bundle (local or s3://)."""
        from evaluation.bundle import load_eval_bundle
        from evaluation.classifier import LabelClassifier
        from factory.storage import local_copy
        from report2ct.bundle import BundleError, verify_bundle

        uri = resolve(bundle)
        local = local_copy(uri)
        sha256 = verify_bundle(local)
        config, metadata, state = load_eval_bundle(local, kind=LabelClassifier.KIND)
        thresholds = metadata.get("thresholds")
        if not isinstance(thresholds, dict) or not any(v is not None for v in thresholds.values()):
            raise BundleError(
                f"{uri}: a label classifier without per-label thresholds in its metadata is not "
                "a verifier (write one with `ctfactory evaluate` or `ctfactory train-verifier`)"
            )
        classifier = LabelClassifier(**config)
        classifier.load_state_dict(state)
        return cls(classifier.to(device).eval(), thresholds, sha256, uri)

    def score(
        self, volumes_hu: Sequence[np.ndarray], spacings_mm: Sequence[Sequence[float]]
    ) -> np.ndarray:
        """(N, 18) probabilities of (X, Y, Z) HU volumes."""
        return self.classifier.predict_volumes(volumes_hu, spacings_mm)

    def judge(
        self, scores: np.ndarray, asked: Mapping[str, int]
    ) -> tuple[bool | None, float, list[str]]:
        """(passed, margin, disagreeing labels) of one volume's (18,) scores
        against the labels a record specifies. passed None: none of them is
        judged. margin: the worst counted label's distance to its threshold
        on the right side (negative: on the wrong side)."""
        margins = {}
        for name, value in asked.items():
            threshold = self.thresholds.get(name)
            if threshold is None:
                continue
            score = float(scores[CTRATE_LABELS.index(name)])
            margins[name] = score - threshold if value else threshold - score
        if not margins:
            return None, 0.0, []
        disagree = sorted(
            n for n, m in margins.items() if (m < 0 if asked[n] else m <= 0)
        )  # a negative label at exactly the threshold is called positive
        return not disagree, min(margins.values()), disagree


_CACHE: dict[tuple[str, str], Verifier] = {}
_CACHE_LOCK = threading.Lock()


def verifier_for(bundle: str, device: str) -> Verifier:
    """The verifier of `bundle` on `device`, loaded once per process."""
    key = (resolve(bundle), str(device))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = Verifier.load(bundle, device=str(device))
        return _CACHE[key]


def sample_verified(
    draw: Callable[[list[VolumeRequest]], GenerationResult],
    requests: Sequence[VolumeRequest],
    asked: Sequence[Mapping[str, int]],
    verifier: Verifier,
    *,
    resample: int,
) -> tuple[GenerationResult, list[dict[str, Any]]]:
    """Draw `requests` (one `draw` call per round: the batch, then the
    volumes still failing), verify each volume against `asked` (the labels
    its record specifies), redraw failures up to `resample` times.

    Returns the delivered volumes as one GenerationResult (timings summed
    over every round, plus `verify`: the scoring) and one verification dict
    per request."""
    if resample < 0:
        raise ValueError(f"resample must be >= 0, got {resample}")
    n = len(requests)
    rounds: list[GenerationResult] = []
    best: list[dict[str, Any] | None] = [None] * n
    volumes: list[np.ndarray | None] = [None] * n
    verify_s = 0.0
    pending = list(range(n))
    for redraw in range(resample + 1):
        batch = [_with_seed(requests[i], redraw_seed(requests[i].seed, redraw)) for i in pending]
        result = draw(batch)
        rounds.append(result)
        start = time.perf_counter()
        scores = verifier.score(result.volumes_hu, result.spacings_mm)
        verify_s += time.perf_counter() - start
        for row, i in enumerate(pending):
            passed, margin, disagree = verifier.judge(scores[row], asked[i])
            candidate = {
                "scores": {
                    name: float(s) for name, s in zip(CTRATE_LABELS, scores[row], strict=True)
                },
                "passed": passed,
                "tries": redraw + 1,
                "verifier_sha256": verifier.sha256,
                "seed": int(batch[row].seed),
                "disagree": disagree,
                "_margin": margin,
            }
            previous = best[i]
            if (
                previous is None
                or passed
                or (previous["passed"] is False and margin > previous["_margin"])
            ):
                best[i], volumes[i] = candidate, result.volumes_hu[row]
            best[i]["tries"] = redraw + 1
        pending = [i for i in pending if best[i]["passed"] is False]
        if not pending:
            break
    timings: dict[str, float] = {}
    for result in rounds:
        for name, value in result.timings_s.items():
            timings[name] = timings.get(name, 0.0) + value
    timings["verify"] = verify_s
    first = rounds[0]
    delivered = GenerationResult(
        volumes_hu=np.stack(volumes),
        timings_s=timings,
        shape=first.shape,
        spacings_mm=list(first.spacings_mm),
        seeds=[b["seed"] for b in best],
        sampler=first.sampler,
    )
    return delivered, [{k: v for k, v in b.items() if k != "_margin"} for b in best]


def _with_seed(request: VolumeRequest, seed: int) -> VolumeRequest:
    import dataclasses

    return request if seed == request.seed else dataclasses.replace(request, seed=seed)


def specified_labels(record_labels: Mapping[str, int], labels: Mapping[str, int]) -> dict[str, int]:
    """The labels a record specifies (its `labels` keys), valued as the
    volume was asked to show them (`labels`: all 18, after a phantom mask
    may have set them)."""
    return {name: int(labels[name]) for name in record_labels}


def check_delivered(key: str, verification: Mapping[str, Any] | None, *, drop: bool) -> None:
    """Raise Unverified for a volume that passed none of its draws when the
    job drops those; the errors row then holds the tries and the scores."""
    if not drop or not verification or verification.get("passed") is not False:
        return
    scores = ", ".join(f"{n}: {s:.3f}" for n, s in verification["scores"].items())
    raise Unverified(
        f"volume {key} passed label verification in none of {verification['tries']} draws "
        f"(verifier {verification['verifier_sha256'][:12]}; disagrees on "
        f"{', '.join(verification['disagree'])}); scores of the closest draw "
        f"(seed {verification['seed']}): {{{scores}}}"
    )


# --- the worker's hooks (factory.worker: its sample step and index entry) ---


def sample_step(
    draw: Callable[[list[VolumeRequest]], GenerationResult],
    ready: Sequence[Any],
    options: VerifyOptions,
    device: Any,
) -> GenerationResult:
    """The worker's sample step under --verify: draw and verify the batch
    `ready` (factory.worker.Prepared items), fill each item's
    `verification`, return the delivered volumes. Call holding the
    accelerator: scoring runs on it too."""
    verifier = verifier_for(options.bundle, str(device))
    asked = [specified_labels(item.task.record.labels, item.labels) for item in ready]
    result, verifications = sample_verified(
        draw, [item.request for item in ready], asked, verifier, resample=options.resample
    )
    for item, verification in zip(ready, verifications, strict=True):
        item.verification.clear()
        item.verification.update(verification)
    return result


def delivered(
    key: str, verification: Mapping[str, Any], options: VerifyOptions | None, seed: int
) -> tuple[int, dict[str, Any] | None]:
    """(seed of the delivered draw, the verification to store with it; None
    without --verify) of a volume about to be written; raises Unverified
    for one that passed none of its draws when the job drops those."""
    if options is None or not verification:
        return seed, None
    check_delivered(key, verification, drop=options.drop_unverified)
    return int(verification["seed"]), dict(verification)

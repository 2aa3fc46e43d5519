"""Does the accelerator wait for writes? A simulated accelerator at paper size.

The real factory worker (plan, prepare, the accelerator lock, OME-Zarr write,
storage, commit) generates 480x480x256 volumes, but the sampler and the
decoder are stand-ins that sleep for a set compute time per volume (a sleep
releases the GIL and uses no CPU, as a GPU kernel would), returning a chest
phantom drawn once. What is left on the host inside the lock is what the
real path does there on this CPU (the per-sample noise, which a GPU would
draw on the device); the int16 conversion and the copy to the host run
after the lock, beside the writes. `factory.job.PIPELINE_DEPTH` calls run
at once, as Ray Data runs them in one actor, so the writes of one volume
overlap the "sampling" of the next; the same worker then runs one call at a
time (the serial path) for comparison.

Printed, side by side in one run:
- the core-seconds of writing one volume (OME-Zarr encode + compress +
  store), and the CPU write rate that sets the limit on this machine;
- seconds per volume with the pipeline and without it (1 call), each with
  the host CPU it used per volume (all threads): the pipeline can only hide
  the writes if that stays under the compute time;
- last line: RATIO overlap <end-to-end s per volume / simulated compute s per
  volume>: 1.0 means the accelerator never waited. It can only approach 1
  when the writer keeps up: pick --compute-s above the write core-seconds
  (on 2 cores the sampling thread's own CPU work competes with the writer),
  and run it on a quiet machine (other processes take the writer's cores).
  The host work inside the lock (the noise: hundredths of a second per
  volume here, nothing on an accelerator) adds to the sampling step
  whatever the pipeline does; RATIO overlap_vs_sampling_step (end to end
  over the measured step) says whether the writes were hidden at any
  compute time.

    python bench/bench_overlap.py [--n 6] [--compute-s 8.0] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from factory.job import PIPELINE_DEPTH

SHAPE = (480, 480, 256)
SPACING = (1.0, 1.0, 1.5)  # the phantom's; records ask the demo bundle's own spacing


class SleepingDenoiser(torch.nn.Module):
    """Stands in for the UNet: the sampler below sleeps its whole time."""

    def __init__(self, sample_s: float) -> None:
        super().__init__()
        self.sample_s = sample_s
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # Report2CT.device reads a parameter


def sleeping_sampler(denoiser, noise, cond, times, *, guidance_scale):
    """All the sampling steps as one sleep: on an accelerator the per-step
    latent arithmetic runs on the device too, not on the host's cores."""
    time.sleep(denoiser.sample_s)
    return noise


class SleepingCodec(torch.nn.Module):
    """Sleeps `decode_s`, then returns the prepared volume (1, 1, X, Y, Z) HU."""

    def __init__(self, decode_s: float, volume_hu: np.ndarray, downsample: int) -> None:
        super().__init__()
        self.decode_s, self.downsample = decode_s, downsample
        self.volume = torch.from_numpy(volume_hu.astype(np.float32))[None, None]

    def decode_volume(self, latent):
        time.sleep(self.decode_s)
        return self.volume


def make_worker(out: Path, compute_s: float, num_steps: int):
    from factory.job import DEFAULT_BUNDLE
    from factory.worker import GenerateWorker, WorkerOptions
    from phantom.world import make_phantom
    from report2ct.pipeline import SAMPLERS, SamplingOptions

    worker = GenerateWorker(
        WorkerOptions(
            bundle=str(DEFAULT_BUNDLE),
            run_root=str(out),
            sampling=SamplingOptions(num_steps=num_steps, guidance_scale=5.0),
        )
    )
    volume = make_phantom(1, shape=SHAPE, spacing_mm=SPACING).volume_hu
    # The demo bundle's own grid stops at 192 voxels; the stand-ins do not care.
    config = worker.model.config
    worker.model.config = dataclasses.replace(config, max_shape=(512, 512, 512))
    # 80 % of the compute in the sampling steps, 20 % in the decode.
    worker.model.denoiser = SleepingDenoiser(0.8 * compute_s)
    for method in SAMPLERS:
        SAMPLERS[method] = sleeping_sampler
    worker.model.codec = SleepingCodec(0.2 * compute_s, volume, worker.model.config.vae.downsample)
    return worker, volume


def batch(record_id: str) -> dict[str, np.ndarray]:
    record = {
        "id": record_id,
        "findings": "Right pleural effusion.",
        "shape": list(SHAPE),
    }
    return {"item": np.array([json.dumps({"line": 1, "record": record})])}


@dataclasses.dataclass
class Measured:
    wall_s: float  # end-to-end seconds per volume
    cpu_s: float  # host CPU seconds (all threads) per volume
    sampling_s: float  # the sampling step per volume, inside the accelerator lock
    write_s: float  # write + commit per volume, as the worker timed it


def run(worker, ids: list[str], calls: int) -> Measured:
    """Per volume, with `calls` concurrent calls of the worker."""
    queue, lock, failures, entries = list(ids), threading.Lock(), [], []

    def loop():
        while True:
            with lock:
                if not queue:
                    return
                record_id = queue.pop(0)
            (row,) = worker(batch(record_id))["result"]
            outcome = json.loads(row)
            if outcome["status"] != "generated":
                failures.append(row)
            else:
                entries.append(outcome["entry"]["timings_s"])

    threads = [threading.Thread(target=loop) for _ in range(calls)]
    start, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"volumes failed: {failures}")
    n = len(ids)
    return Measured(
        wall_s=(time.perf_counter() - start) / n,
        cpu_s=(time.process_time() - cpu) / n,
        sampling_s=sum(t["text"] + t["sample"] + t["decode"] for t in entries) / n,
        write_s=sum(t["write"] for t in entries) / n,
    )


def write_core_seconds(worker, volume: np.ndarray, repeats: int = 2) -> float:
    """CPU seconds (all threads) to write one volume the worker's way."""
    from factory.outputs import VolumeOutput, write_all

    item = VolumeOutput(
        key="probe", title="probe", volume_xyz=volume, spacing_mm=SPACING, attributes={}
    )
    used = []
    for i in range(repeats):
        start = time.process_time()
        write_all(worker.outputs, worker.run, f"_bench/probe-{i}", item)
        used.append(time.process_time() - start)
    worker.run.delete_prefix("_bench")
    return min(used)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6, help="volumes per measurement")
    parser.add_argument("--compute-s", type=float, default=8.0, help="simulated s per volume")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    parser.add_argument("--out", type=Path, default=None, help="output root (default: a tmp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        worker, volume = make_worker(out / "run", args.compute_s, args.steps)
        write_s = write_core_seconds(worker, volume)
        run(worker, ["warm-up"], 1)
        serial = run(worker, [f"serial-{i}" for i in range(args.n)], 1)
        piped = run(worker, [f"piped-{i}" for i in range(args.n)], PIPELINE_DEPTH)
    cores = torch.get_num_threads()
    print(
        f"volume {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} int16, simulated compute {args.compute_s:.2f} s"
    )
    print(
        f"write: {write_s:.2f} core-s per volume -> at most {cores / write_s:.2f} volumes/s "
        f"on {cores} cores ({3600 * cores / write_s:.0f} per hour)"
    )
    print(f"{'per volume (s)':<26}{'1 call':>10}{f'{PIPELINE_DEPTH} calls':>10}")
    for label, field in (
        ("end to end", "wall_s"),
        ("sampling step (locked)", "sampling_s"),
        ("write (to the commit)", "write_s"),
        ("host CPU, all threads", "cpu_s"),
    ):
        print(f"{label:<26}{getattr(serial, field):>10.2f}{getattr(piped, field):>10.2f}")
    # The sampling step holds, besides the simulated compute, the host work
    # that an accelerator does on the device (the noise): end to end over the
    # step says whether it waited for writes.
    print(f"RATIO overlap_vs_sampling_step {piped.wall_s / piped.sampling_s:.3f}")
    print(f"RATIO serial_vs_compute {serial.wall_s / args.compute_s:.3f}")
    print(f"RATIO overlap {piped.wall_s / args.compute_s:.3f}")


if __name__ == "__main__":
    main()

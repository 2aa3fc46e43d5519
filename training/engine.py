"""A small, model-agnostic DeepSpeed training loop.

    result = train(module, loss_fn, dataset, config, out_dir)

- `TrainConfig` -> the DeepSpeed config (ZeRO stage 2 by default, bf16,
  explicit gradient clipping, AdamW from torch (no fused-Adam JIT), warm-up
  then cosine, gradient accumulation).
- EMA of the weights in fp32, saved with every checkpoint, used for export.
- Checkpoints every N steps and at the end (DeepSpeed's own format plus our
  client state: step, EMA, RNG states, data position); `resume=True` continues
  exactly: a killed run resumed gives the same next loss as an uninterrupted
  one, because the data order is a pure function of (seed, epoch) and every
  RNG is restored. `resume=False` starts the run directory afresh.
- A data set held in memory is read in the loop's process, `dataset[i]`; a
  streamed one (it reads volumes or shards: `num_workers` > 0, or one that
  takes `(epoch, index)` keys, e.g. `training.data.stream.VolumeCrops`)
  through a DataLoader whose sampler (`StreamKeys`) yields the very same
  positions of the same shuffled stream, so the order, the batches and a
  resume are the same either way.
- The noise of each training sample comes from its own generator, seeded by
  (seed, step, the sample's index in the global batch): the same whatever the
  number of ranks and the micro-batch split.
- Writes the resolved config (train_config.json) into the run directory at
  start; logs the loss (mean over ranks), learning rate and samples per second
  (log.jsonl) and draws the loss curve (loss.png) at the end.
- Stops with `NonFiniteLossError` (stage, step, loss per rank) the first time
  a loss is NaN or infinite, before it reaches the weights.

Launch: one process (CPU or one GPU) directly; several with `deepspeed` or
`torchrun`, across nodes with a hostfile, or as Ray Train workers (a
`kind: train` job, docs/training.md). The loop takes its rank and world
size from the process group when one exists (Ray Train makes it before the
loop runs), else from RANK / WORLD_SIZE like any torch.distributed job.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    micro_batch: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    gradient_clipping: float = 1.0
    zero_stage: int = 2
    bf16: bool = True
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    # Further DeepSpeed settings passed to the engine as they are (ZeRO bucket
    # sizes, communication overlap, ...): what `with_deepspeed` leaves of a
    # DeepSpeed JSON once the loop's own keys are read into the fields above.
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def deepspeed_config(self, world_size: int = 1) -> dict[str, Any]:
        if self.zero_stage not in (0, 1, 2):
            # The EMA and the exported weights read whole parameters, which
            # ZeRO-3 partitions across ranks.
            raise ValueError(f"ZeRO stage {self.zero_stage}: this loop runs stages 0, 1 and 2")
        config = copy.deepcopy(self.deepspeed)
        config.setdefault("train_batch_size", self.micro_batch * self.grad_accum * world_size)
        config.setdefault("steps_per_print", 10**9)  # we log ourselves
        config.setdefault("wall_clock_breakdown", False)
        config.update(
            {
                "train_micro_batch_size_per_gpu": self.micro_batch,
                "gradient_accumulation_steps": self.grad_accum,
                # explicit: its default changed in 0.19.3
                "gradient_clipping": self.gradient_clipping,
                "bf16": {**config.get("bf16", {}), "enabled": self.bf16},
                "zero_optimization": {
                    **config.get("zero_optimization", {}),
                    "stage": self.zero_stage,
                },
            }
        )
        return config


# DeepSpeed keys the loop itself must agree with: read into TrainConfig fields.
_LOOP_KEYS = {
    "train_micro_batch_size_per_gpu": "micro_batch",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_clipping": "gradient_clipping",
}


def with_deepspeed(config: TrainConfig, settings: Mapping[str, Any]) -> TrainConfig:
    """`config` under a DeepSpeed JSON: its batch shape, clipping, ZeRO stage
    and precision replace the config's (the loop feeds the batches and must
    agree with the engine), everything else goes to the engine as given.
    `optimizer` and `scheduler` are refused rather than silently dropped: the
    loop builds AdamW and the warm-up + cosine schedule from the config."""
    settings = copy.deepcopy(dict(settings))
    for key in ("optimizer", "scheduler"):
        if key in settings:
            raise ValueError(
                f"DeepSpeed config: {key!r} is built by the training loop from TrainConfig "
                "(lr, weight_decay, warmup_steps, min_lr_ratio); remove it and set those"
            )
    updates: dict[str, Any] = {
        name: settings.pop(key) for key, name in _LOOP_KEYS.items() if key in settings
    }
    zero = settings.get("zero_optimization", {})
    if "stage" in zero:
        updates["zero_stage"] = int(zero.pop("stage"))
    if "enabled" in settings.get("bf16", {}):
        updates["bf16"] = bool(settings["bf16"].pop("enabled"))
    elif settings.get("fp16", {}).get("enabled"):
        updates["bf16"] = False
    merged = {**config.deepspeed, **settings}
    return dataclasses.replace(config, **updates, deepspeed=merged)


def read_deepspeed_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config given inline (a mapping) or as a JSON file (a local
    path or an fsspec URI such as s3://)."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    text = str(source)
    if "://" in text:
        import fsspec

        with fsspec.open(text, "r") as handle:
            return json.load(handle)
    return json.loads(Path(text).read_text())


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(
            1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        )
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    return factor


def ensure_distributed_env() -> None:
    """Single-process defaults, so a plain `python` launch works like torchrun."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def process_rank() -> tuple[int, int]:
    """(rank, world size): the process group's when one is initialised
    (torchrun, DeepSpeed, Ray Train), else the environment's (1 process by
    default)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class EMA:
    """Exponential moving average of the trained parameters, kept in fp32
    (frozen ones, e.g. the UNet under a ControlNet, are not copied)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {
            name: p.detach().float().clone()
            for name, p in module.named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, param in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A full state dict of `module` with EMA parameters (buffers as is)."""
        state = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
        state.update({k: v.clone() for k, v in self.shadow.items()})
        return state


def sample_generator(seed: int, step: int, index: int, device="cpu") -> torch.Generator:
    """The generator of the sample at `index` of the global batch of `step`:
    a function of (seed, step, index) alone, so a sample draws the same noise
    whether the global batch runs on one rank or many, in one micro-batch or
    several."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0]))


def data_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch `epoch`: a pure function, so resuming knows it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, seed: int, position: int, size: int) -> list[int]:
    """Samples [position, position + size) of the endless shuffled stream."""
    out = []
    for p in range(position, position + size):
        epoch, offset = divmod(p, n)
        out.append(int(data_order(n, seed, epoch)[offset]))
    return out


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": random.getstate()[1],
        "python_pos": random.getstate()[2],
    }


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state(
        ("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate((3, tuple(state["python"]), state["python_pos"]))


class NonFiniteLossError(FloatingPointError):
    """A training loss went NaN or infinite; raised before it reaches the weights."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    ema: dict[str, torch.Tensor]
    out_dir: Path


def latest_checkpoint(out_dir: Path) -> Path | None:
    tags = sorted(
        out_dir.glob("checkpoints/step-*/client.json"), key=lambda p: int(p.parent.name[5:])
    )
    return tags[-1].parent if tags else None


def load_ema(module: torch.nn.Module, run_dir: Path) -> int:
    """Load the EMA weights of a run's latest checkpoint into `module` (fp32);
    returns the checkpoint's step. Raises if the run has no checkpoint."""
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/step-*/ to load EMA weights from")
    state = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    state.update(load_file(checkpoint / "ema.safetensors"))
    module.float().load_state_dict(state)
    return int(checkpoint.name.removeprefix("step-"))


def train(
    module: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any, Sequence[torch.Generator]], torch.Tensor],
    dataset,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    collate: Callable[[list[Any]], Any] | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    name: str | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    num_workers: int = 0,
) -> TrainResult:
    """Train `module` to `config.steps` optimizer steps (or stop early after
    `stop_after` steps). `loss_fn(engine_module, batch, generators)` returns
    the scalar loss, drawing sample i's noise from `generators[i]`;
    `dataset[i]` gives one sample. `name` (default: the run directory's)
    names the stage in errors. `on_checkpoint(folder)` runs on every rank
    once a checkpoint is complete on this rank's disk (e.g. to upload it).
    `num_workers` > 0 reads the samples in that many DataLoader worker
    processes (`micro_batches`), in the same order.

    A process group that already exists (Ray Train's TorchTrainer sets one
    up in each worker) is what DeepSpeed uses, its rank and size included."""
    import deepspeed
    import torch.distributed as dist

    ensure_distributed_env()
    out_dir = Path(out_dir)
    name = name or out_dir.name
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    _seed_all(config.seed)
    rank, world = process_rank()

    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    ds_config = config.deepspeed_config(world)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    distributed = dist.is_initialized() and world > 1
    if rank == 0:
        if not resume:
            _start_afresh(out_dir)
        document = {"train": asdict(config), "deepspeed": ds_config, "world_size": world}
        _write_atomic(out_dir / "train_config.json", json.dumps(document, indent=2))
    if distributed:
        dist.barrier()  # rank 0 has cleared the run directory before anyone reads it
    dtype = compute_dtype(engine)
    ema = EMA(engine.module, config.ema_decay)
    step, losses = 0, []
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is not None:
        engine.load_checkpoint(str(out_dir / "checkpoints"), tag=checkpoint.name)
        client = json.loads((checkpoint / "client.json").read_text())
        step, losses = client["step"], client["losses"]
        _set_rng_state(
            client["rng"][str(rank)] if str(rank) in client["rng"] else client["rng"]["0"]
        )
        ema.shadow = load_file(checkpoint / "ema.safetensors")
        log.info("resumed from %s at step %d", checkpoint, step)

    collate = collate or _stack
    per_step = config.micro_batch * config.grad_accum * world
    log_file = (out_dir / "log.jsonl").open("a") if rank == 0 else None
    started, last = time.perf_counter(), step
    target = config.steps if stop_after is None else min(config.steps, step + stop_after)
    batches = micro_batches(
        dataset,
        config,
        collate,
        start_step=step,
        steps=target - step,
        rank=rank,
        world=world,
        num_workers=num_workers,
    )
    while step < target:
        step_loss = 0.0
        for micro in range(config.grad_accum):
            first = (micro * world + rank) * config.micro_batch
            batch = _to(next(batches), engine.device, dtype)
            generators = [
                sample_generator(config.seed, step, first + j, engine.device)
                for j in range(config.micro_batch)
            ]
            loss = loss_fn(engine, batch, generators)
            per_rank = _gather_loss(loss, rank, world if distributed else 1)
            if not torch.isfinite(per_rank).all():
                raise NonFiniteLossError(
                    f"{name}: the loss went non-finite at step {step + 1} of {config.steps} "
                    f"(micro-batch {micro + 1} of {config.grad_accum}); loss per rank: "
                    f"{per_rank.tolist()}; stopped before the update, last checkpoint: "
                    f"{latest_checkpoint(out_dir) or 'none'}"
                )
            engine.backward(loss)
            engine.step()
            step_loss += float(per_rank.mean()) / config.grad_accum
        step += 1
        ema.update(engine.module)
        losses.append(step_loss)
        if log_file and (step % config.log_every == 0 or step == target):
            elapsed = time.perf_counter() - started
            record = {
                "step": step,
                "loss": step_loss,
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": (step - last) * per_step / max(elapsed, 1e-9),
            }
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            log.info(
                "step %d loss %.4f lr %.2e %.1f samples/s",
                step,
                step_loss,
                record["lr"],
                record["samples_per_s"],
            )
            started, last = time.perf_counter(), step
        if step % config.checkpoint_every == 0 or step == target:
            _save(engine, ema, out_dir, step, losses, rank, world)
            if on_checkpoint is not None:
                on_checkpoint(out_dir / "checkpoints" / f"step-{step}")
    if log_file:
        log_file.close()
        plot_losses(losses, out_dir / "loss.png")
    if dist.is_initialized():
        dist.barrier()
    return TrainResult(
        steps=step, losses=losses, ema=ema.state_dict(engine.module), out_dir=out_dir
    )


def takes_epoch_keys(dataset) -> bool:
    """Whether `dataset[(epoch, index)]` is how it is read (its samples
    differ by epoch: a streamed split's spacing and crop)."""
    return bool(getattr(dataset, "takes_epoch_keys", False))


def micro_batches(
    dataset,
    config: TrainConfig,
    collate: Callable[[list[Any]], Any],
    *,
    start_step: int,
    steps: int,
    rank: int = 0,
    world: int = 1,
    num_workers: int = 0,
) -> Iterator[Any]:
    """This rank's micro-batches of steps [start_step, start_step + steps),
    collated: step s, micro-batch m holds positions s * per_step +
    (m * world + rank) * micro_batch + j of the endless shuffled stream
    (`batch_indices`), resumable by construction. An in-memory data set is
    read here; a streamed one (`num_workers` > 0, or `takes_epoch_keys`)
    through a DataLoader over `StreamKeys`, the same positions as (epoch,
    index) keys (the index alone for a data set that takes plain indices)."""
    per_step = config.micro_batch * config.grad_accum * world
    if num_workers == 0 and not takes_epoch_keys(dataset):
        for step in range(start_step, start_step + steps):
            for micro in range(config.grad_accum):
                first = (micro * world + rank) * config.micro_batch
                indices = batch_indices(
                    len(dataset), config.seed, step * per_step + first, config.micro_batch
                )
                yield collate([dataset[i] for i in indices])
        return
    from torch.utils.data import DataLoader

    from training.data.stream import StreamKeys

    keys = StreamKeys(
        len(dataset),
        config.seed,
        micro_batch=config.micro_batch,
        grad_accum=config.grad_accum,
        world=world,
        rank=rank,
        start_step=start_step,
        steps=steps,
    )
    loader = DataLoader(
        dataset if takes_epoch_keys(dataset) else _ByIndex(dataset),
        sampler=keys,
        batch_size=config.micro_batch,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers else None,
        # Its own generator: making the iterator leaves the global RNG as it was.
        generator=torch.Generator().manual_seed(config.seed),
    )
    yield from loader


class _ByIndex:
    """A map-style data set read by (epoch, index) keys: the index alone."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.dataset[key[1]]


def _gather_loss(loss: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Every rank's loss of this micro-batch, on every rank (CPU, fp32): all
    ranks then log the same mean and stop together on a non-finite one."""
    values = torch.zeros(world, device=loss.device)
    values[rank] = loss.detach().float()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values.cpu()


def _start_afresh(out_dir: Path) -> None:
    """`resume=False`: drop what an earlier run left, so neither this run nor
    a later resume mixes with it."""
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    (out_dir / "checkpoints").mkdir(parents=True)
    for leftover in ("log.jsonl", "loss.png"):
        (out_dir / leftover).unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a process killed mid-write
    leaves the old file or none, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _save(
    engine, ema: EMA, out_dir: Path, step: int, losses: list[float], rank: int, world: int
) -> None:
    import torch.distributed as dist

    tag = f"step-{step}"
    engine.save_checkpoint(str(out_dir / "checkpoints"), tag=tag)
    states = [None] * world
    if dist.is_initialized() and world > 1:
        dist.all_gather_object(states, _rng_state())
    else:
        states = [_rng_state()]
    if rank == 0:
        folder = out_dir / "checkpoints" / tag
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, folder / "ema.safetensors")
        client = {"step": step, "losses": losses, "rng": {str(r): s for r, s in enumerate(states)}}
        # Last and atomic: a checkpoint counts once its client.json exists
        # (`latest_checkpoint`), so a kill mid-save leaves the previous one.
        _write_atomic(folder / "client.json", json.dumps(client))


def compute_dtype(engine) -> torch.dtype:
    """What inputs must be cast to: DeepSpeed's bf16/fp16 modes run the module in that type."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def _stack(items: list[Any]) -> Any:
    if isinstance(items[0], dict):
        return {key: _stack([item[key] for item in items]) for key in items[0]}
    if isinstance(items[0], torch.Tensor):
        return torch.stack(items)
    return items


def _to(batch: Any, device, dtype) -> Any:
    """Floating tensors to the module's dtype (bf16 under DeepSpeed's bf16)."""
    if isinstance(batch, dict):
        return {key: _to(value, device, dtype) for key, value in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device=device, dtype=dtype if batch.is_floating_point() else batch.dtype)
    return batch


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 20:
        window = max(5, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

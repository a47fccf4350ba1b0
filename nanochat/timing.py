"""How the kit times things: the facts every measurement states (device, dtype, versions), the
timed windows between device syncs, and the training step they time. Used by the KV-cache stage
(nanochat/kv_bench.py), the cluster check, batch-size discovery's probes and the benchmarks in
the checkout's bench/; and the set-up phases of a training process (imports, data) that its
`timing` record reports."""
from __future__ import annotations

import dataclasses
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import psutil
import torch

from nanochat.config import OptimArgs, TrainArgs
from nanochat.gpt import GPTConfig, build_model
from nanochat.grad_sync import clear_to_none, finish_step_sync, micro_step_context, training_model
from nanochat.optim import build_optimizers, optimizer_step
from nanochat.runtime import Runtime, maybe_compile


# Set-up phases this process timed (imports_done, setup_phase): the parts of setup_s the summary
# and the `timing` record name; the rest of setup_s is the model, optimizer and batch size
SETUP_PHASES: dict[str, float] = {}


def process_start() -> float:
    return psutil.Process().create_time()


def process_age_s() -> float:
    return time.time() - process_start()


def imports_done() -> None:
    """Called where a training stage's function starts: the process's time so far went to the
    interpreter, the imports (torch's the most) and reading the recipe."""
    SETUP_PHASES.clear()
    SETUP_PHASES["imports_s"] = process_age_s()


@contextmanager
def setup_phase(name: str):
    """Time a set-up phase (data_s: shards, tokenizer, a base checkpoint); repeated phases add up."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        SETUP_PHASES[name] = SETUP_PHASES.get(name, 0.0) + time.perf_counter() - t0


def environment(device: torch.device, dtype: torch.dtype, cpu_name: str | None = None) -> dict:
    """What every benchmark report states about where it ran: device, dtype and versions."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({cpu_name or platform.processor() or platform.machine()}, " \
               f"{torch.get_num_threads()} threads)"
    return {"device": name, "dtype": str(dtype).replace("torch.", ""),
            "versions": {"torch": torch.__version__, "python": platform.python_version()}}


def seconds_per_call(fn: Callable[[], object], sync: Callable[[], None], warmup: int, windows: int,
                     calls: int) -> list[float]:
    """`warmup` untimed calls of `fn`, then `windows` windows of `calls` back-to-back calls, each
    window between two device syncs: seconds per call, one figure per window."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return times


def device_sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose work is done on return)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(make_stream, device: torch.device) -> dict:
    """One pass over a token stream (`make_stream()` yields once per decode step): its total and
    first-token seconds and the gaps between steps, from a device sync before it starts."""
    device_sync(device)
    t0 = time.perf_counter()
    arrivals = [time.perf_counter() for _ in make_stream()]
    return {"total_s": arrivals[-1] - t0, "ttft_s": arrivals[0] - t0,
            "gaps_s": [b - a for a, b in zip(arrivals, arrivals[1:])], "steps": len(arrivals)}


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of one call of `fn`, between two device syncs."""
    return seconds_per_call(fn, sync, 0, 1, 1)[0]


# --------------------------------------------------------------------------------------------
# The training step on random tokens: what the cluster check, discovery's memory probes and the
# throughput and communication benchmarks all measure, so each measures the loop's own step.

@dataclass
class TrainingStep:
    """The step of nanochat/trainer.py on fixed random micro-batches: `micro_steps` (forward
    under autocast, backward of loss / accum, DDP's no_sync but on the last one when
    overlapped), `average` (the gradients across ranks, grad_sync.finish_step_sync), `update`
    (optim.optimizer_step: clip, step, clear the gradients as the loop does). Calling it runs
    all three and returns the tokens it trained on."""
    model: torch.nn.Module          # the plain module (weights, evaluation)
    step_model: torch.nn.Module     # what the micro-steps call: compiled, DDP-wrapped when overlapped
    optimizers: list
    rt: Runtime
    batches: list                   # `accum` (inputs, targets) pairs
    grad_clip: float
    sync: str                       # "local" | "after" | "overlap" (training_step)

    @property
    def params(self) -> list:
        return list(self.model.parameters())

    @property
    def tokens(self) -> int:
        return sum(x.numel() for x, _ in self.batches)

    def micro_steps(self) -> None:
        last = len(self.batches) - 1
        for i, (x, y) in enumerate(self.batches):
            with micro_step_context(self.step_model, communicate=self.sync == "overlap" and i == last):
                with self.rt.autocast():
                    loss = self.step_model(x, y)
                (loss / len(self.batches)).backward()

    def average(self) -> None:
        if self.sync != "local":
            finish_step_sync(self.step_model, self.params, self.rt, overlapped=self.sync == "overlap")

    def update(self) -> None:
        optimizer_step(self.params, self.optimizers, self.grad_clip,
                       set_to_none=clear_to_none(self.step_model))

    def __call__(self) -> int:
        self.micro_steps()
        self.average()
        self.update()
        return self.tokens


def training_step(config: GPTConfig, optim: OptimArgs, train: TrainArgs, rt: Runtime, batch: int,
                  accum: int = 1, seed: int = 0, sync: str = "local",
                  model: torch.nn.Module | None = None) -> TrainingStep:
    """The step at `batch` rows × `accum` micro-steps of `config`'s model (built seeded unless
    `model` is given), the recipe's optimizers and `train`'s compile, compile_mode and
    grad_clip. Tokens: `seed`'s generator on the CPU, the same on every device. `sync`: "local"
    (no collective at all: one rank alone, Muon included), "after" (the plain loop: all-reduce
    after backward), "overlap" (DDP, as training runs)."""
    assert sync in ("local", "after", "overlap"), sync
    if model is None:
        torch.manual_seed(0)
        model = build_model(config, rt.device)
    optimizers = build_optimizers(model.param_groups(), optim, config.n_embd,
                                  all_params=model.parameters(), local=sync == "local")
    if train.compile:
        # a fresh compiler state per step built: an earlier one's graphs (or its hitting the
        # recompile limit, after which dynamo silently runs eager) must not carry over
        torch._dynamo.reset()
    step_model = maybe_compile(model, train) if sync == "local" else \
        training_model(model, rt, train, overlap=sync == "overlap")
    gen = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, config.vocab_size, (accum, batch, config.sequence_len + 1), generator=gen).to(rt.device)
    return TrainingStep(model, step_model, optimizers, rt, [(t[:, :-1], t[:, 1:]) for t in xy],
                        train.grad_clip, sync)


def recipe_step(recipe, rt: Runtime, batch: int, compile: bool | None = None, **kw) -> TrainingStep:
    """`training_step` of the recipe's model, optimizers and train section (`compile`: instead
    of the recipe's train.compile)."""
    train = recipe.train if compile is None else dataclasses.replace(recipe.train, compile=compile)
    config = GPTConfig.from_args(recipe.model, recipe.model.vocab_size or recipe.tokenizer.vocab_size)
    return training_step(config, recipe.optim, train, rt, batch, **kw)

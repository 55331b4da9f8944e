"""Typed run configuration: YAML presets and `--set key=value` overrides validated into one object.

The code defaults are the `tiny` preset (CPU, minutes); `configs/<name>.yaml` files hold only what
differs from them. Unknown keys and wrong types fail before anything starts, naming the file, the key
and what was expected (with a "did you mean" for typos). Validated configs are passed down as objects.

Light on purpose: imports neither torch nor Ray, so a typo fails in a second.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from apr_ray.countdown.problems import ProblemConfig
from apr_ray.countdown.solvers import SolverConfig
from apr_ray.data import DemosConfig
from apr_ray.learner.config import GRPOConfig, LearnerConfig
from apr_ray.modeling import MODEL_PRESETS, ModelConfig
from apr_ray.rewards import RewardConfig
from apr_ray.rollout.engine_config import VllmEngineConfig
from apr_ray.rollout.engines import SamplingConfig
from apr_ray.rollout.runtime import RuntimeConfig
from apr_ray.sweep import SweepConfig
from apr_ray.tracking import TrackingConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, with the source and key in the message."""


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    problems: ProblemConfig = Field(default_factory=lambda: ProblemConfig(num_operands=3, num_max=20, target_max=30))
    train_problems: int = Field(2000, ge=1, description="problems in the train split")
    val_problems: int = Field(200, ge=1, description="problems in the validation split")
    test_problems: int = Field(100, ge=0, description="problems in the test split")
    # Children listed as generated: a 1M-parameter model copies the reference's best-first permutation
    # with repeats, which is a malformed spawn (docs/results.md, runs A-C).
    demos: DemosConfig = Field(default_factory=lambda: DemosConfig(solver=SolverConfig(apr_spawn_order="generated")))
    num_workers: int = Field(2, ge=1, le=1024, description="Ray Data parallelism for generation")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_problems, "val": self.val_problems, "test": self.test_problems}


class SFTConfig(BaseModel):
    """Supervised training on the solver demonstrations (one thread request per sequence)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2400, ge=0, description="optimizer steps; 0 skips SFT (GRPO then starts from the initial model)")
    batch_sequences: int = Field(16, ge=1, description="thread sequences per optimizer step")
    shuffle_buffer: int = Field(4096, ge=0, description="sequences held for shuffling the stream; <= 1 keeps file order")
    # Warm-up, stable, decay (docs/results.md): the tiny model learns the arithmetic at a high constant rate and
    # turns it into solved problems while the rate decays. The last third decays linearly to near zero, as
    # tiny-long's does: on the same batches 38.0% solved against 33.0% with a 100-step drop to 0.15x held.
    learner: LearnerConfig = Field(default_factory=lambda: LearnerConfig(
        lr=2e-3, warmup_steps=20, weight_decay=0.01, lr_schedule="linear", decay_start=1600, decay_steps=2400,
        min_lr_ratio=0.02))
    eval_every: int = Field(0, ge=0, description="evaluate on the validation split every this many steps; 0: at the end only")
    checkpoint_every: int = Field(0, ge=0, description="DeepSpeed checkpoint every this many steps; 0: at the end only")
    log_every: int = Field(10, ge=1, description="metrics to MLflow every this many steps")
    max_minutes: float | None = Field(None, gt=0.0, description="stop after this many minutes even if steps remain")


class PoolConfig(BaseModel):
    """The generator actors. The pool can grow and shrink within [min_workers, max_workers]."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(1, ge=1, description="generator actors at start")
    min_workers: int = Field(1, ge=1, description="the pool never shrinks below this")
    max_workers: int = Field(4, ge=1, description="the pool never grows above this")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="Ray CPUs per generator (also its torch / OMP threads)")
    threads_per_worker: int = Field(
        0, ge=0, description="torch / OMP threads of each generator; 0: its cpus_per_worker. On CPU the learner "
        "idles while the generators roll out (and they idle while it trains), so the generators may use the "
        "learner's cores too: set it to the node's cores")
    gpus_per_worker: float = Field(0.0, ge=0.0, description="Ray GPUs per generator (vLLM's GPU share)")
    max_concurrent_trees: int = Field(256, ge=1, description="trees in flight per generator")
    groups_per_request: int = Field(4, ge=1, description="problems (each a group of samples) per request to a generator")
    requests_per_worker: int = Field(4, ge=1, description="requests in flight per generator")
    max_restarts: int = Field(10, ge=0, description="replacements of dead generators per stage before the run fails")
    placement_timeout_s: float = Field(
        120.0, ge=0.0, description="how long a new generator may wait for the cluster to have room for it (its "
        "CPUs, GPUs, worker_resource) before the pool goes on without it; fewer than min_workers placed fails the "
        "run, naming what is missing. Raise it where an autoscaler adds nodes. 0: wait without end")
    worker_resource: str = Field(
        "", description="a custom Ray resource each generator takes one unit of (e.g. 'rollout', offered by the "
        "rollout worker group of cluster/raycluster.yaml); empty: none")
    follow_cluster: bool = Field(
        False, description="between GRPO steps, size the pool to the units of worker_resource the cluster's live "
        "nodes offer (within [min_workers, max_workers]): a node that joins serves from the next step, a node "
        "that leaves takes its actors with it and the step completes on the others")
    scale_up_share: float = Field(
        0.0, ge=0.0, le=1.0, description="with follow_cluster and an autoscaler: when rollout takes more than "
        "this share of a step, ask the autoscaler for one more worker_resource unit (up to max_workers); "
        "below it, withdraw the request. 0: never ask")

    @model_validator(mode="after")
    def _range(self) -> PoolConfig:
        if not self.min_workers <= self.num_workers <= self.max_workers:
            raise ValueError(f"need min_workers <= num_workers <= max_workers, got {self.min_workers}, "
                             f"{self.num_workers}, {self.max_workers}")
        if (self.follow_cluster or self.scale_up_share) and not self.worker_resource:
            raise ValueError("rollout.pool.follow_cluster / scale_up_share need rollout.pool.worker_resource: the "
                             "custom resource that says where generators may run (e.g. 'rollout')")
        return self


class RolloutConfig(BaseModel):
    """How trees are generated, in GRPO and in evaluation."""

    model_config = ConfigDict(extra="forbid")

    # The tiny preset's 1M-parameter model on 2 CPU cores: vLLM's per-step overhead dominates and the
    # transformers engine decodes its trees ~2-3x faster (docs/results.md); the GPU presets set vllm.
    backend: Literal["vllm", "transformers"] = Field(
        "transformers", description="generation engine of the actors: vllm (GPUs, larger models) or transformers")
    engine: VllmEngineConfig = Field(default_factory=lambda: VllmEngineConfig(kv_cache_memory_bytes=256 * 1024**2))
    runtime: RuntimeConfig = Field(default_factory=lambda: RuntimeConfig(max_tokens=1024, context_window=2048),
                                   description="limits of every tree; its sampling is the training rollouts' "
                                   "(evaluation samples with eval.sampling)")
    # One OpenMP thread: for the tiny preset's 1M-parameter model on the transformers engine, a second thread
    # costs more per op than it shares (serial GRPO rollouts 1.6-1.75x faster at one thread, tree rollouts
    # 1.08x; docs/results.md, 2026-12-07). vLLM's CPU backend is the other way round: give it 2 there.
    # Two generators: the learner idles while they roll out and evaluate, so the second takes its other core
    # (200 validation problems of the longer preset: 88 s against 122 s with one).
    pool: PoolConfig = Field(default_factory=lambda: PoolConfig(num_workers=2, threads_per_worker=1))


class GRPOStageConfig(BaseModel):
    """Reinforcement learning from the trees' rewards."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(3, ge=0, description="rollout + update steps; 0 skips GRPO")
    problems_per_step: int = Field(8, ge=1, description="train problems per step, each sampled group_size times")
    algorithm: GRPOConfig = Field(default_factory=lambda: GRPOConfig(group_size=8, inner_steps=1, kl_coef=0.0,
                                                                     loss_norm="constant"))
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=lambda: LearnerConfig(lr=1e-4))
    eval_every: int = Field(0, ge=0, description="evaluate every this many steps; 0: at the end only")
    checkpoint_every: int = Field(
        10, ge=0, description="checkpoint every this many steps (what `apr-ray grpo --resume` continues from after a "
        "learner died); 0: at the end only")


class LearnerResources(BaseModel):
    """The learner group's actors (data-parallel ranks), for SFT and GRPO."""

    model_config = ConfigDict(extra="forbid")

    num_learners: int = Field(1, ge=1, description="data-parallel learner ranks (Ray actors)")
    cpus_per_learner: float = Field(2.0, gt=0.0, description="Ray CPUs per rank (also its torch threads on CPU)")
    gpus_per_learner: float = Field(0.0, ge=0.0, description="Ray GPUs per rank (1 on a GPU cluster)")


class EvalConfig(BaseModel):
    """Validation: the ladder metrics and accuracy on the first `problems` of a split."""

    model_config = ConfigDict(extra="forbid")

    split: Literal["val", "test"] = Field("val", description="problems split evaluated")
    problems: int = Field(200, ge=1, description="problems evaluated (the split's first ones, a fixed set)")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(temperature=0.0),
                                     description="greedy by default")
    sample_trees: int = Field(4, ge=0, description="trees logged as artifacts (JSON + HTML) per evaluation")
    sampled_problems: int = Field(
        10, ge=0, description="of the evaluated problems, the first this many (at most all) are also sampled samples_per_problem "
        "times like the training rollouts (val/sampled_solved: the earlier, steadier RL signal); 0: off")
    samples_per_problem: int = Field(4, ge=1, description="samples per problem of the sampled evaluation")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="what `apr-ray eval --sweep` measures")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("tiny", description="preset / run name")
    seed: int = Field(0, description="seed of every random stream in the run")
    output_dir: Path = Field(Path("runs/tiny"), description="where data, checkpoints and exports go")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=lambda: MODEL_PRESETS["tiny"].model_copy())
    sft: SFTConfig = Field(default_factory=SFTConfig)
    learners: LearnerResources = Field(default_factory=LearnerResources)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    grpo: GRPOStageConfig = Field(default_factory=GRPOStageConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @property
    def protocol(self) -> str:
        """The thread protocol trained and rolled out: the demonstrations' kind."""
        return self.data.demos.kind

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        window, positions = self.rollout.runtime.context_window, self.model.max_position_embeddings
        if window > positions:
            raise ValueError(f"rollout.runtime.context_window ({window}) exceeds model.max_position_embeddings "
                             f"({positions}): the model cannot attend that far")
        if self.rollout.runtime.max_tokens > window:
            raise ValueError(f"rollout.runtime.max_tokens ({self.rollout.runtime.max_tokens}) exceeds "
                             f"rollout.runtime.context_window ({window})")
        split_size = self.data.val_problems if self.eval.split == "val" else self.data.test_problems
        if self.eval.problems > split_size:
            raise ValueError(f"eval.problems ({self.eval.problems}) exceeds the {self.eval.split} split "
                             f"(data.{self.eval.split}_problems = {split_size})")
        if self.grpo.steps > 0:
            # The rollouts record vLLM's raw logprobs (the unmodified distribution) and grpo.policy_loss takes
            # its ratio against them, so the tokens must be drawn from that same distribution. A warped sampler
            # would make every ratio off-policy by an amount nothing corrects for.
            off = SamplingConfig()
            sampling = self.rollout.runtime.sampling
            warped = [f"rollout.runtime.sampling.{key}={getattr(sampling, key)}"
                      for key in ("temperature", "top_p", "top_k") if getattr(sampling, key) != getattr(off, key)]
            if warped:
                raise ValueError(f"{', '.join(warped)}: GRPO's ratio uses the sampler's raw logprobs, which are those "
                                 f"of temperature {off.temperature:g} with no top_p/top_k, so training rollouts "
                                 f"must sample that way (temperature={off.temperature:g}, top_p={off.top_p:g}, "
                                 f"top_k={off.top_k}); set eval.sampling to change how evaluation samples, "
                                 "or grpo.steps=0")
        for stage in (self.sft, self.grpo):  # a decay spans its stage unless told otherwise
            if stage.learner.lr_schedule != "constant" and stage.learner.decay_steps == 0:
                stage.learner.decay_steps = max(stage.steps, stage.learner.warmup_steps + 1,
                                                stage.learner.decay_start + 1)
        if self.grpo.algorithm.kl_coef > 0 and not self.grpo.learner.reference_model:
            self.grpo.learner.reference_model = True  # the KL term needs the frozen reference
        return self


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the model reached by following `loc` (for "did you mean" hints)."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


# pydantic prefixes what a validator raised with these; the validators' own words are clearer alone.
_VALIDATOR_PREFIXES = ("Value error, ", "Assertion failed, ")
_MAX_INPUT_REPR = 80  # a pasted list or long string is cut, so one error stays one readable line


def _error_text(e: dict) -> str:
    """What was expected (or what a validator said), without pydantic's wording around it."""
    if e["type"] == "model_type":  # a value where a section of keys belongs
        return f"expected a section of keys (a mapping), got {type(e.get('input')).__name__}"
    if e["type"] == "missing":
        return "required key, not given"
    msg = str(e["msg"])
    for prefix in _VALIDATOR_PREFIXES:
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def _input_text(e: dict) -> str:
    # Validator errors describe their own values; for a missing key the input is only the parent section.
    if e["type"] in ("model_type", "value_error", "assertion_error", "missing"):
        return ""
    got = e.get("input")
    if isinstance(got, dict):  # e.g. `--set seed.x=1` made `seed` a section
        return " (got a section of keys, not a value)"
    text = repr(got)
    if len(text) > _MAX_INPUT_REPR:
        text = text[: _MAX_INPUT_REPR - 3] + "..."
    return f" (got {text})"


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent, leaf = e["loc"][:-1], str(e["loc"][-1])
            lines.append(f"{source}: unknown key '{key}'{_suggest(leaf, _fields_at(RunConfig, parent))}")
        elif not key:  # a cross-section check: its message names the keys involved
            lines.append(f"{source}: {_error_text(e)}")
        else:
            lines.append(f"{source}: {key}: {_error_text(e)}{_input_text(e)}")
    return "\n".join(lines)


def _set_path(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value`, the value read as YAML (so 3 is an int, true a bool, [1,2] a list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set data.train_problems=500")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from None


def resolve_source(config: str | Path | None) -> Path | None:
    """A preset name (`tiny`, `small`, ...) or a YAML path; None means the built-in defaults."""
    if config is None:
        return None
    path = Path(config)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = CONFIG_DIR / f"{config}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset '{config}'{_suggest(str(config), names)}; presets: {', '.join(names)}")
    return preset


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a preset or YAML file, apply `key=value` overrides, validate. Raises ConfigError."""
    path = resolve_source(config)
    source = str(path) if path else "defaults"
    tree: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
            opened = f" ({context} at line {start.line + 1})" if context and start is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}{opened}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        tree = loaded or {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(tree, key, value, f"--set {item}")
    if overrides:
        source += " + --set overrides"
    try:
        return RunConfig.model_validate(_merge(_DEFAULTS_TREE(), tree))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _DEFAULTS_TREE() -> dict:  # noqa: N802 (reads as the constant it stands for)
    return RunConfig.model_construct().model_dump(mode="json")


def _merge(base: Any, override: Any) -> Any:
    """`override` laid over `base`, section by section: setting one key of a section keeps the section's
    other values (the preset's / the code defaults'), instead of resetting them to the class defaults."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) if k in base else v for k, v in override.items()}}
    return override


# What each command leaves unused, as (key prefix, why); the longest matching prefix decides, and a None
# reason marks a key inside an unused section that the command does use. A `--set` of an unused key is an
# error (`check_overrides_used`): a setting the command would silently ignore is a setting the user thinks
# is in force. Presets and YAML files are shared by all commands, so only --set is checked.
_NO_GRPO = "it runs no GRPO (`apr-ray grpo` and `apr-ray run` do)"
_NO_SFT = "it runs no SFT (`apr-ray sft` and `apr-ray run` do)"
_NO_SWEEP = "it runs no sweep (`apr-ray eval --sweep` does)"
_EVAL_SAMPLING = ("how GRPO's training rollouts sample; evaluations sample with eval.sampling "
                  "(--set eval.sampling.temperature=...)")
UNUSED_BY_COMMAND: dict[str, tuple[tuple[str, str | None], ...]] = {
    "run": (("eval.sweep", _NO_SWEEP),),
    "config show": (),
    "sft": (("grpo", _NO_GRPO), ("rollout.runtime.sampling", _EVAL_SAMPLING), ("eval.sweep", _NO_SWEEP)),
    "grpo": (("sft", _NO_SFT), ("eval.sweep", _NO_SWEEP)),
    "eval": (("sft", _NO_SFT), ("grpo", _NO_GRPO), ("learners", "it trains nothing"),
             ("rollout.runtime.sampling", _EVAL_SAMPLING)),
    "plain": (
        ("grpo", "the plain script runs SFT and evaluation only"),
        ("eval.sweep", _NO_SWEEP),
        ("tracking", "the plain script writes metrics to output_dir/metrics.jsonl, not to MLflow"),
        ("learners", "the plain script trains in its own process (sft.learner.torch_threads sets its threads)"),
        ("data.num_workers", "the plain script writes data with --workers processes"),
        ("rollout.backend", "the plain script evaluates with the transformers engine"),
        ("rollout.engine", "the plain script has no vLLM engine"),
        ("rollout.engine.max_num_seqs", None),  # the transformers engine's batch
        ("rollout.pool", "the plain script has no generator actors"),
        ("rollout.pool.max_concurrent_trees", None),
        ("rollout.runtime.sampling", _EVAL_SAMPLING),
    ),
    "data problems": (
        ("", "`apr-ray data problems` reads only seed, data.problems, data.*_problems and data.num_workers "
             "(it writes to --out)"),
        ("seed", None), ("data.problems", None), ("data.train_problems", None), ("data.val_problems", None),
        ("data.test_problems", None), ("data.num_workers", None),
    ),
    "data demos": (
        ("", "`apr-ray data demos` reads only data.demos and data.num_workers (it writes to --out)"),
        ("data.demos", None), ("data.num_workers", None),
    ),
    "data import-apr": (
        ("", "`apr-ray data import-apr` reads only data.demos.format (the kind is --kind, the output --out)"),
        ("data.demos.format", None),
    ),
}
MODEL_FROM_DIRECTORY = "{command} starts from the model directory {model}, whose config.json fixes the shape"


def unused_reason(command: str, key: str) -> str | None:
    """Why `command` does not use the config key `key` (dotted), or None when it does."""
    if command not in UNUSED_BY_COMMAND:
        raise ValueError(f"unknown command {command!r}; expected one of {sorted(UNUSED_BY_COMMAND)}")
    best: tuple[int, str | None] = (-1, None)
    for prefix, reason in UNUSED_BY_COMMAND[command]:
        if (not prefix or key == prefix or key.startswith(prefix + ".")) and len(prefix) > best[0]:
            best = (len(prefix), reason)
    return best[1]


def check_overrides_used(command: str, overrides: list[str] | None, model: Path | str | None = None) -> None:
    """Refuse a `--set` that `command` would ignore, naming the key and why. With `model` (the directory the
    command starts from), model.* is unused too."""
    problems = []
    for item in overrides or []:
        key, _ = parse_override(item)
        reason = unused_reason(command, key)
        if reason is None and model is not None and (key == "model" or key.startswith("model.")):
            reason = MODEL_FROM_DIRECTORY.format(command=command, model=model)
        if reason is not None:
            problems.append(f"--set {item}: `{command}` does not use {key}: {reason}")
    if problems:
        raise ConfigError("\n".join(problems))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (logged with every run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

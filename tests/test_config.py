"""Config loading and validation: every bad input stops with one message naming the key."""

import ast
import inspect
from pathlib import Path

import pytest
import yaml

import icm_dist.config as config_module
from icm_dist.config import Config, apply_override, config_hash, load_config
from icm_dist.errors import ConfigError


def test_defaults_are_the_paper():
    cfg = load_config(None)
    assert cfg.expert.num == 10 and cfg.train.batch_size == 32 and cfg.train.iterations == 2000
    assert len(cfg.data.mechanisms) == 10
    assert cfg.identity_init.max_steps == 500 and cfg.identity_init.mse == 0.002
    assert cfg.train.split_every == 50  # beyond the paper, on by default because it measured better


def test_paper_suite_runs_the_papers_algorithm():
    """Every experiment of configs/paper/ but split.yaml turns splits off: the suite measures the paper."""
    folder = Path(__file__).resolve().parents[1] / "configs" / "paper"
    for p in sorted(folder.glob("*.yaml")):
        if p.name == "suite.yaml":
            continue
        cfg = load_config(p)
        assert (cfg.train.split_every > 0) == (p.name == "split.yaml"), p.name


def test_shipped_configs_load():
    for name in ("paper", "quick", "tiny", "scale"):
        load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")


def test_every_suite_entry_loads_with_its_overrides():
    """launch/reproduce.py starts each entry as its config plus its overrides: a typo there would only show
    once the suite's run started."""
    suites = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/suite.yaml"))
    assert len(suites) >= 3
    for suite in suites:
        for name, spec in yaml.safe_load(suite.read_text())["experiments"].items():
            cfg = load_config(suite.parent / spec["config"], spec.get("overrides", []))
            assert spec["seeds"] >= 1 and cfg.expert.num >= 1, f"{suite}: {name}"


def test_overrides_are_yaml_scalars():
    cfg = load_config(None, ["seed=3", "train.iterations=500", "run.out_dir=runs/x", "data.mechanisms=[invert,noise]",
                             "train.stop_when_stable=null", "resume=auto", "tracking.wandb.mode=offline"])
    assert cfg.seed == 3 and cfg.train.iterations == 500 and cfg.run.out_dir == "runs/x"
    assert cfg.data.mechanisms == ["invert", "noise"] and cfg.resume == "auto"
    # "1e-4" is a string to YAML 1.1; a float field takes it anyway
    assert load_config(None, ["train.lr_expert=1e-4"]).train.lr_expert == 1e-4
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        load_config(None, ["train.lr_expert=fast"])


@pytest.mark.parametrize("override,message", [
    ("train.iteratons=5", "unknown config key 'train.iteratons' (did you mean 'train.iterations'?)"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.batch_size=0", "config key 'train.batch_size' = 0: must be >= 1"),
    ("train.batch_size=abc", "config key 'train.batch_size': expected an integer, got 'abc'"),
    ("expert.num=0", "config key 'expert.num' = 0: needs at least one expert"),
    ("data.mechanisms=[]", "config key 'data.mechanisms' = []: needs at least one mechanism"),
    ("data.mechanisms=[invert,twist]", "config key 'data.mechanisms': unknown mechanism 'twist'"),
    ("train.precision=fp8", "config key 'train.precision': 'fp8' is not one of auto, fp32, bf16"),
    ("train.lr_expert=-1", "config key 'train.lr_expert' = -1.0: must be > 0"),
    ("identity_init.enabled=maybe", "config key 'identity_init.enabled': expected true or false"),
    ("train=3", "config section 'train' must be a mapping"),
    ("seed", "override 'seed' is not of the form key.path=value"),
    ("expert.pool=2", "config key 'expert.depth' = 4: must be at least 2 * expert.pool = 4") ,
    ("expert.parts=[{num: 10, widht: 3}]", "unknown config key 'expert.parts[0].widht' (did you mean "
                                           "'expert.parts[0].width'?)"),
    ("expert.parts=[{num: 10, norm: batchy}]", "config key 'expert.parts[0].norm': 'batchy' is not one of"),
    ("expert.parts=[{width: 3}]", "config key 'expert.parts[0].num': every part needs its number of experts"),
    ("expert.parts=[{num: 10, parts: []}]", "config key 'expert.parts[0].parts': a part cannot have parts"),
    ("expert.parts=[3]", "config key 'expert.parts[0]': expected a mapping of expert.* keys, got 3"),
])
def test_bad_values_name_the_key(override, message):
    if override == "expert.pool=2":  # depth 4 allows pool 2; depth 3 does not
        with pytest.raises(ConfigError, match="must be at least 2"):
            load_config(None, ["expert.pool=2", "expert.depth=3"])
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_compile_without_a_compiler_names_the_key(monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no g++, c++ or clang++
    with pytest.raises(ConfigError, match="config key 'train.compile' = True: torch.compile needs a C\\+\\+ compiler"):
        load_config(None, ["train.compile=true"])
    load_config(None, ["train.compile=false"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {iterations: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("expert:\n  widht: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'expert.widht' \\(did you mean 'expert.width'\\?\\)"):
        load_config(unknown)


def test_hash_changes_with_any_field():
    a, b = Config(), Config()
    assert config_hash(a) == config_hash(b)
    apply_override(b, "seed=1")
    assert config_hash(a) != config_hash(b)


def test_split_keys_are_checked():
    with pytest.raises(ConfigError, match="'train.split_steps' = 20: must be in 1..train.split_every"):
        load_config(None, ["train.split_every=10", "train.split_steps=20"])
    with pytest.raises(ConfigError, match="'train.split_idle_share' = 2.0: must be >= 0 and below"):
        load_config(None, ["train.split_every=50", "train.split_idle_share=2"])
    with pytest.raises(ConfigError, match="'train.split_every' = -1"):
        load_config(None, ["train.split_every=-1"])
    # with splits off, split_steps is not checked
    assert load_config(None, ["train.split_every=0", "train.split_steps=500"]).train.split_steps == 500


# Every range check of config.validate, each with an input that trips it. The key must be the one the
# error names; test_every_range_check_is_tested below fails when validate gains a check without a row here.
RANGE_CHECKS = [
    (["seed=-1"], "seed"),
    (["threads=0"], "threads"),
    (["data.mechanisms=[]"], "data.mechanisms"),
    (["data.mechanisms=[twist]"], "data.mechanisms"),
    (["data.mechanisms=[3]"], "data.mechanisms"),
    (["data.mechanisms=[up,up]"], "data.mechanisms"),
    (["data.mechanisms=[{name: rotate}]"], "data.mechanisms"),
    (["data.mechanisms=[{name: blur, sigma: -1}]"], "data.mechanisms"),
    (['data.mechanisms=[":fn"]'], "data.mechanisms"),
    (["data.dataset=symbols", "data.image_size=16"], "data.image_size"),
    (["data.dataset=cifar"], "data.dataset"),
    (["data.dataset=folder:"], "data.dataset"),
    (["data.image_size=30"], "data.image_size"),
    (["discriminator.widths=[8,8,8,8,8,8]"], "data.image_size"),
    (["data.symbol_classes=1"], "data.symbol_classes"),
    (["data.tint=0"], "data.tint"),
    (["data.tint=1.5"], "data.tint"),
    (["data.canonical_examples=0"], "data.canonical_examples"),
    (["data.transformed_examples=0"], "data.transformed_examples"),
    (["expert.num=0"], "expert.num"),
    (["expert.width=0"], "expert.width"),
    (["expert.depth=0"], "expert.depth"),
    (["expert.pool=3", "expert.depth=6"], "expert.pool"),
    (["expert.pool=2", "expert.depth=3"], "expert.depth"),
    (["expert.norm=group", "expert.groups=3"], "expert.groups"),
    (["expert.parts=[{num: 2}, {num: 3}]"], "expert.num"),
    (["expert.num=2", "expert.arch_args={width: 4}", "expert.parts=[{num: 2}]"], "expert.arch_args"),
    (["expert.num=3", "expert.parts=[{num: 3}, {num: 0}]"], "expert.parts"),
    (["expert.num=4", "expert.parts=[{num: 2}, {num: 2, width: 0}]"], "expert.parts[1].width"),
    (["expert.num=4", "expert.parts=[{num: 2, arch: stn, pool: 2, depth: 3}, {num: 2}]"], "expert.parts[0].depth"),
    (["discriminator.widths=[]"], "discriminator.widths"),
    (["discriminator.widths=[8,0]"], "discriminator.widths"),
    (["discriminator.hidden=0"], "discriminator.hidden"),
    (["identity_init.max_steps=-1"], "identity_init.max_steps"),
    (["identity_init.mse=0"], "identity_init.mse"),
    (["identity_init.batch_size=0"], "identity_init.batch_size"),
    (["train.iterations=-1"], "train.iterations"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.lr_expert=0"], "train.lr_expert"),
    (["train.lr_discriminator=-1"], "train.lr_discriminator"),
    (["train.eps=0"], "train.eps"),
    (["train.betas=[0.9]"], "train.betas"),
    (["train.betas=[0.9,1.0]"], "train.betas"),
    (["train.capacity_factor=0.5"], "train.capacity_factor"),
    (["train.route_k=0"], "train.route_k"),
    (["train.route_k=10"], "train.route_k"),
    (["train.route_k=3", "train.capacity_factor=1.5"], "train.capacity_factor"),
    (["train.route_k=3", "train.expert_backward=winners"], "train.expert_backward"),
    (["train.route_k=3", "train.route_full_every=0"], "train.route_full_every"),
    (["train.route_k=3", "train.route_warmup=-1"], "train.route_warmup"),
    (["train.route_k=3", "train.lr_router=0"], "train.lr_router"),
    (["train.route_k=3", "train.route_min_recall=1.5"], "train.route_min_recall"),
    (["train.route_k=3", "train.route_explore=8"], "train.route_explore"),
    (["train.route_k=3", "train.route_k_max=2"], "train.route_k_max"),
    (["train.route_k=3", "train.route_k_max=10"], "train.route_k_max"),
    (["train.route_k=3", "train.route_k_max=6", "train.route_explore=5"], "train.route_explore"),
    (["train.route_k=2", "train.route_temperature=0"], "train.route_temperature"),
    (["train.split_merged_share=1.0"], "train.split_merged_share"),
    (["train.capacity_iterations=-1"], "train.capacity_iterations"),
    (["train.split_every=-1"], "train.split_every"),
    (["train.split_every=10", "train.split_steps=20"], "train.split_steps"),
    (["train.split_every=10", "train.split_steps=0"], "train.split_steps"),
    (["train.split_idle_share=-0.1"], "train.split_idle_share"),
    (["train.split_idle_share=2"], "train.split_idle_share"),
    (["train.stop_when_stable=0"], "train.stop_when_stable"),
    (["train.stop_when_stable=2", "eval.every=0"], "train.stop_when_stable"),
    (["eval.every=-1"], "eval.every"),
    (["eval.examples=0"], "eval.examples"),
    (["eval.final_examples=0"], "eval.final_examples"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.classifier_epochs=0"], "eval.classifier_epochs"),
    (["eval.capture_threshold=0.5"], "eval.capture_threshold"),
    (["eval.capture_threshold=1.5"], "eval.capture_threshold"),
    (["checkpoint.every=-1"], "checkpoint.every"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["tracking.log_every=0"], "tracking.log_every"),
    (["tracking.figures_every=-1"], "tracking.figures_every"),
    (["tracking.figures_every=150", "eval.every=100"], "tracking.figures_every"),
    (["dist.timeout_s=0"], "dist.timeout_s"),
    (["run.out_dir=''"], "run.out_dir"),
]


def _range_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    return str(e.value)


@pytest.mark.parametrize("overrides,key", RANGE_CHECKS, ids=[" ".join(o) for o, _ in RANGE_CHECKS])
def test_every_range_check_names_its_key(overrides, key):
    msg = _range_error(overrides)
    assert msg.startswith(f"config key '{key}'"), msg
    assert len(msg.splitlines()) == 1, msg


def _validate_checks() -> list[tuple[str, str]]:
    """(key, the literal start of the message) of every need(...) call in config.validate, a key written
    as an f-string expanded over the tuple its enclosing loop runs over."""
    tree = ast.parse(inspect.getsource(config_module.validate))

    def text(node, loop_values=()) -> list[str]:
        if isinstance(node, ast.Constant):
            return [node.value]
        head = node.values[0].value if isinstance(node.values[0], ast.Constant) else ""
        return [head + v for v in loop_values] if loop_values and len(node.values) == 2 else [head]

    def calls(node, loop_values=()):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.For) and isinstance(child.iter, ast.Tuple):
                yield from calls(child, [c.value for c in child.iter.elts])
                continue
            if isinstance(child, ast.Call) and getattr(child.func, "id", None) == "need":
                yield from ((k, text(child.args[3])[0]) for k in text(child.args[1], loop_values))
            yield from calls(child, loop_values)

    return list(calls(tree))


def test_every_range_check_is_tested():
    """Each need(...) in validate (key and message) is tripped by some row of RANGE_CHECKS; the compiler
    check has its own test above (it needs a PATH without a compiler)."""
    errors = [_range_error(o) for o, _ in RANGE_CHECKS]
    checks = _validate_checks()
    assert len(checks) >= 40, checks
    untested = [(k, m) for k, m in checks if k != "train.compile"
                and not any(e.startswith(f"config key '{k}'") and m in e for e in errors)]
    assert untested == []


def test_a_user_mechanism_is_imported_when_the_data_is_built_not_when_a_config_loads():
    """A run's config (in a checkpoint, config.yaml) loads where the user's module is not installed; the
    import, and its one-line error, come when the protocol is built."""
    from icm_dist.data.library import resolve_mechanisms

    cfg = load_config(None, ["data.mechanisms=[up, no_such_module_xyz:smudge]"])
    assert resolve_mechanisms(cfg.data.mechanisms, import_functions=False)[1].label == "no_such_module_xyz:smudge"
    with pytest.raises(ConfigError, match="mechanism 'no_such_module_xyz:smudge': cannot import it"):
        resolve_mechanisms(cfg.data.mechanisms)


def test_a_config_saved_before_new_keys_is_the_same_experiment():
    """icm-dist compare and wandb group runs by experiment_hash: a config.yaml written before data.dataset,
    data.image_size, ... existed must hash like today's config of the same experiment."""
    from icm_dist.config import experiment_hash, to_dict

    now = to_dict(load_config(None, ["seed=3"]))
    old = {**now, "data": {k: v for k, v in now["data"].items()
                           if k not in ("dataset", "download", "split", "image_size", "tint", "symbol_classes")}}
    assert experiment_hash(old) == experiment_hash(now)
    assert experiment_hash(old) != experiment_hash(to_dict(load_config(None, ["data.image_size=64"])))


def test_a_committee_of_several_families_is_parts_of_expert_keys():
    """``expert.parts``: each part takes the keys it does not name from ``expert`` (its ``arch_args`` its own),
    holds the next ``num`` global ids, and an expert's config is its part's."""
    cfg = load_config(None, ["expert.num=5", "expert.width=8",
                             "expert.parts=[{num: 2}, {num: 3, arch: stn, arch_args: {kernel: 1}, "
                             "train_identity: false}]"])
    conv, stn = config_module.expert_parts(cfg.expert)
    assert (conv.arch, conv.num, conv.width, conv.arch_args, conv.parts) == ("conv", 2, 8, {}, [])
    assert (stn.arch, stn.num, stn.width, stn.arch_args, stn.train_identity) == ("stn", 3, 8, {"kernel": 1}, False)
    assert [config_module.part_of(cfg.expert, g) for g in range(5)] == [0, 0, 1, 1, 1]
    assert config_module.expert_config(cfg.expert, 3) == stn
    assert config_module.expert_parts(load_config().expert) == [load_config().expert]
    with pytest.raises(ValueError, match="beyond"):
        config_module.part_of(cfg.expert, 5)


"""Config loading and validation: every bad input stops with one message naming the key."""

from pathlib import Path

import pytest

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
    for name in ("paper", "quick", "tiny"):
        load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")


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
    ("data.mechanisms=[invert,twist]", "config key 'data.mechanisms' = 'twist': is not a known mechanism"),
    ("train.precision=fp8", "config key 'train.precision': 'fp8' is not one of auto, fp32, bf16"),
    ("train.lr_expert=-1", "config key 'train.lr_expert' = -1.0: must be > 0"),
    ("identity_init.enabled=maybe", "config key 'identity_init.enabled': expected true or false"),
    ("train=3", "config section 'train' must be a mapping"),
    ("seed", "override 'seed' is not of the form key.path=value"),
    ("expert.pool=2", "config key 'expert.depth' = 4: must be at least 2 * expert.pool = 4") ,
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

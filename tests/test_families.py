"""Expert families behind one seam (icm_dist/families/): the torch.func block against a loop of plain modules,
the probe check of a user's factory, and whole runs of every family through the real entry points (train,
resume, reshard, export, apply), a user's factory from a temporary module under launch/torchrun.sh 2.

The world-size invariance of the stn family and of a committee of two families (conv and unet), step by step
with losers bitwise unchanged, is in tests/test_distributed.py (its ``stn`` and ``mixed`` variants); the fast
step of a committee of two families against the reference is in tests/test_competition.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from inproc import same_tensors, train_here
from procs import run
from safetensors.torch import save_file

from icm_dist.config import ExpertConfig
from icm_dist.errors import ConfigError
from icm_dist.experts import MaskedAdam
from icm_dist.families import ModuleFamily, StackedExperts, check_expert, get_family
from icm_dist.families.stn import STNExpert
from icm_dist.families.unet import UNetExpert

REPO = Path(__file__).resolve().parents[1]
SHORT = ["threads=1", "train.iterations=4", "checkpoint.every=2", "eval.every=2", "eval.examples=50",
         "eval.final_examples=50", "identity_init.max_steps=3", "data.transformed_examples=300",
         "run.progress=false", "tracking.wandb.mode=disabled"]
SMALL = {"stn": "{width: 8, depth: 2, loc_width: 4}", "unet": "{width: 4, levels: 2}"}

USER_MODULE = '''
import torch.nn as nn

def make(channels, width=4):
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(1, width), nn.ELU(),
                         nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid())

def wrong_shape(channels):
    return nn.Conv2d(channels, channels + 1, 3, padding=1)

def unbounded(channels):
    return nn.Conv2d(channels, channels, 3, padding=1)
'''


ROTATIONS = [0, 90, 180, 270]


@pytest.mark.parametrize("make", [lambda gid: STNExpert(1, width=8, depth=2, loc_width=4),
                                  lambda gid: STNExpert(1, width=8, depth=2, loc_width=4, rotations=ROTATIONS,
                                                    select="example"),
                                  lambda gid: STNExpert(1, width=8, depth=1, loc_width=4, rotations=ROTATIONS),
                                  lambda gid: STNExpert(1, width=8, depth=1, loc_width=4, warp_gain=5, own_scale=False),
                                  lambda gid: STNExpert(1, loc_width=4, rotations=ROTATIONS, select="spread",
                                                        refine=False, expert_id=gid),
                                  lambda gid: STNExpert(1, width=4, depth=1, loc_width=4, rotations=[0, 180],
                                                        select="spread", residual=True, paint=[False, True],
                                                        expert_id=gid),
                                  lambda gid: UNetExpert(1, width=4, levels=2)],
                         ids=["stn", "stn-rotations-per-example", "stn-rotations-per-expert", "stn-own-warp",
                              "stn-warp-only-spread", "stn-paint-spread", "unet"])
def test_stacked_experts_compute_what_each_module_computes(make):
    """vmap and the plain loop give each copy's own output, on a shared batch and on a batch per expert;
    one expert's state loads into a fresh module that computes the same."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    per = torch.rand(4, 3, 1, 16, 16)
    fast = StackedExperts(make, seed=3, ids=[0, 5, 7], channels=1, image_size=16)
    slow = StackedExperts(make, seed=3, ids=[0, 5, 7], channels=1, image_size=16, use_vmap=False)
    assert fast.use_vmap
    for block in (fast, slow):
        mods = block.to_experts()
        y = block.outputs(block(block.inputs(x)))
        y_per = block.outputs(block(block.inputs(per)))
        assert y.shape == (4, 3, 1, 16, 16)
        for j, m in enumerate(mods):
            torch.testing.assert_close(y[:, j], m.train()(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(y_per[:, j], m(per[:, j]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(block.forward_one(j, x, None), m(x), rtol=1e-5, atol=1e-6)
    # Copies are keyed by their global ids: expert 5 is the same in any block.
    alone = StackedExperts(make, seed=3, ids=[5], channels=1, image_size=16)
    for k, v in alone.expert_state(0).items():
        assert torch.equal(v, fast.expert_state(1)[k]), k


def test_stn_own_warp_moves_by_its_gain_and_without_own_scale_only_turns_and_translates():
    """``warp_gain``: the expert's own warp, the same for every example, scaled by the gain on top of the
    per-example one (zero at the start, so the expert starts at the identity warp); ``own_scale: false``
    leaves its scale entry out."""
    feat = torch.zeros(3, 64)  # the head is zero at the start: only the own warp acts
    e = STNExpert(1, warp_gain=10)
    assert torch.equal(e.theta(feat), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(3, 2, 3))
    with torch.no_grad():
        e.warp_p.copy_(torch.tensor([math.pi / 20, 0.01, 0.02, -0.03]))
    s = math.exp(0.1)
    want = torch.tensor([[s * math.cos(math.pi / 2), -s, 0.2], [s, s * math.cos(math.pi / 2), -0.3]])
    torch.testing.assert_close(e.theta(feat), want.expand(3, 2, 3))
    rigid = STNExpert(1, warp_gain=10, own_scale=False)
    rigid.load_state_dict(e.state_dict())
    c = math.cos(math.pi / 2)
    torch.testing.assert_close(rigid.theta(feat), torch.tensor([[c, -1.0, 0.2], [1.0, c, -0.3]]).expand(3, 2, 3))
    assert not hasattr(STNExpert(1), "warp_p")  # gain 1: no own warp, the expert as before


def test_stn_base_rotations_are_exact_quarter_turns_and_the_mixture_starts_uniform():
    """A base rotation samples the input at turned pixel centres: a quarter turn and a half turn are
    torch.rot90 up to float rounding, not an interpolated approximation; the hypotheses start equal."""
    x = torch.rand(2, 1, 16, 16)
    H = 16
    c = (torch.arange(H) * 2 + 1) / H - 1
    grid = torch.stack([c.expand(H, H), c[:, None].expand(H, H)], -1)[None].expand(2, H, H, 2)
    for degrees, turns in ((90, 1), (180, 2), (270, 3)):
        e = STNExpert(1, rotations=[0, degrees])
        cos, sin = e.rotations[1]
        torch.testing.assert_close(e._sample(x, grid, cos, sin), torch.rot90(x, turns, (-2, -1)), atol=1e-5, rtol=0)
    e = STNExpert(1, rotations=ROTATIONS)
    assert torch.equal(e.weights(None), torch.full((4,), 0.25))
    # Spread over a committee: expert i turns by rotations[i % K] after its warp, the base a buffer that a
    # block keys by the global id (so a split's copy and a checkpoint carry it).
    def make(gid):
        return STNExpert(1, width=4, depth=1, loc_width=4, rotations=[0, 180, 270], select="spread", residual=True,
                         expert_id=gid)
    block = StackedExperts(make, 0, [0, 1, 2, 4], 1, 16)
    y = block.outputs(block(block.inputs(x)))
    for j, turns in enumerate((0, 2, 3, 2)):  # ids 0, 1, 2, 4: bases 0, 180, 270, 180
        torch.testing.assert_close(y[:, j], torch.rot90(x, turns, (-2, -1)), atol=1e-5, rtol=0)
    assert block.expert_tensors()["base"].shape == (4, 2)
    # The bases are the block's niches (what the splits keep one expert of): ids 0, 1, 2, 4.
    assert block.niches() == [(1.0, 0.0), (-1.0, 0.0), (0.0, -1.0), (-1.0, 0.0)]
    assert StackedExperts(lambda gid: STNExpert(1, width=4, depth=1, loc_width=4), 0, [0, 1], 1, 16).niches() is None
    with pytest.raises(ValueError, match="select must be"):
        STNExpert(1, rotations=ROTATIONS, select="batch")
    for bad in ({}, {"warp_gain": 10, "warp": "affine"}):  # no own warp, or one without a scale entry to mask
        with pytest.raises(ValueError, match="own_scale: false"):
            STNExpert(1, own_scale=False, **bad)
    with pytest.raises(ValueError, match="must be 1 or 3"):
        STNExpert(1, kernel=5)
    # A 1x1 refinement moves nothing: a pixel's output changes with its own input and the image's statistics,
    # so a change at one pixel is seen elsewhere only through GroupNorm's mean and variance (equal for a swap).
    pointwise = STNExpert(1, width=8, depth=2, loc_width=4, kernel=1, residual=True, refine=True)
    torch.nn.init.normal_(pointwise.refine[-1].weight)  # residual starts at zero: give the map something to do
    img = x[:1].clone()
    swapped = img.clone()
    swapped[..., 3, 5], swapped[..., 9, 11] = img[..., 9, 11], img[..., 3, 5]
    with torch.no_grad():
        a, b = pointwise.refine(img), pointwise.refine(swapped)
    torch.testing.assert_close(a[..., 3, 5], b[..., 9, 11])
    torch.testing.assert_close(a[..., 9, 11], b[..., 3, 5])
    keep = torch.ones_like(img, dtype=torch.bool)
    keep[..., 3, 5] = keep[..., 9, 11] = False
    torch.testing.assert_close(a[keep], b[keep])
    with pytest.raises(ValueError, match="needs refine: true"):
        STNExpert(1, residual=True, refine=False)
    # Without a refinement an expert only moves pixels: at the start, its base rotation of the input exactly.
    warp_only = STNExpert(1, loc_width=4, rotations=[0, 180], select="spread", refine=False, expert_id=1)
    assert not any(n.startswith("refine") for n, _ in warp_only.named_parameters())
    torch.testing.assert_close(warp_only(x), torch.rot90(x, 2, (-2, -1)), atol=1e-5, rtol=0)
    assert ModuleFamily("stn", STNExpert)._factory(ExpertConfig(arch_args={"rotations": [0, 90], "select": "spread"}),
                                                   1)(3).base.tolist() == [0.0, 1.0]


def test_a_chain_of_other_families_applies_and_names_the_size_it_needs():
    from icm_dist.commands.reuse import apply_chain
    from icm_dist.errors import CheckpointError

    chain = [STNExpert(1, width=4, depth=1, loc_width=4).eval(), UNetExpert(1, width=4, levels=2).eval()]
    assert apply_chain(chain, torch.rand(3, 1, 32, 32)).shape == (3, 1, 32, 32)
    with pytest.raises(CheckpointError, match="needs sizes divisible by 4"):
        apply_chain(chain, torch.rand(3, 1, 30, 30))


def test_the_layout_rule_of_the_seam():
    """Every parameter and buffer of a block splits as [E, ...] with expert j's tensors at j (what the masked
    Adam and the losers' buffer restore rely on), under the standalone module's names."""
    block = StackedExperts(lambda gid: STNExpert(1, width=8, depth=2, loc_width=4), 0, [2, 3], 1, 16)
    names = dict(STNExpert(1, width=8, depth=2, loc_width=4).state_dict())
    views = block.expert_tensors()
    assert set(views) == set(names)
    assert all(views[k].shape == (2, *names[k].shape) for k in names)
    assert [n for n, _ in block.expert_params()] == [n for n, _ in STNExpert(1, 8, 2, 4).named_parameters()]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "myexperts.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("arch, message", [
    ("myexperts:wrong_shape", "maps a probe batch (2, 1, 16, 16) float32 to (2, 2, 16, 16)"),
    ("myexperts:unbounded", "an expert's output must lie in [0, 1]"),
    ("myexperts:missing", "cannot be imported"),
    ("no_such_package_icm:make", "cannot be imported"),
    ("sideways", "is not a family"),
])
def test_a_bad_family_stops_with_one_line_naming_it(user_module, arch, message):
    with pytest.raises(ConfigError) as e:
        family = get_family(ExpertConfig(arch=arch))
        check_expert(arch, lambda gid: family.expert(ExpertConfig(arch=arch), 1), 1, 16)
    assert message in str(e.value) and arch in str(e.value) and "\n" not in str(e.value)


def _train(out: Path, data_root: str, *more: str) -> dict:
    train_here(REPO / "configs/tiny.yaml", [f"run.out_dir={out}", f"data.root={data_root}", *SHORT, *more])
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("arch", ["stn"])  # unet: the same seam (StackedExperts), stepped in test_distributed.py
def test_a_family_trains_resumes_bitwise_and_exports(arch, tmp_path, data_root, mnist):
    more = [f"expert.arch={arch}", f"expert.arch_args={SMALL[arch]}", "train.precision=fp32"]
    whole = _train(tmp_path / "whole", data_root, *more)
    assert whole["mechanisms_captured"] >= 0 and whole["world_size"] == 1
    _train(tmp_path / "cut", data_root, *more, "train.iterations=2")
    _train(tmp_path / "cut", data_root, *more, "resume=auto")
    a, b = (tmp_path / r / "checkpoints" / "iter_0000004" for r in ("whole", "cut"))
    assert sorted(p.name for p in a.glob("*.safetensors")) == sorted(p.name for p in b.glob("*.safetensors"))
    assert same_tensors(a, b) == []
    # Export one expert and apply the committee: the standalone module is the family's, rebuilt from metadata.
    from icm_dist.commands.reuse import apply, load_expert, load_module_file, open_source

    r = run([sys.executable, "-m", "icm_dist.commands.cli", "export", str(tmp_path / "whole"), "--expert", "1",
             "--out", str(tmp_path / "e1.safetensors")], cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    module, meta = load_module_file(tmp_path / "e1.safetensors")
    assert f"expert.arch {arch}" in meta["architecture"]
    x = mnist.test_x[:3]
    with torch.no_grad():
        torch.testing.assert_close(module(x), load_expert(open_source(tmp_path / "whole"), 1)(x))
        # The exported file applied on its own (a chain of one), as `icm-dist apply e1.safetensors x` does.
        save_file({"images": x.contiguous()}, str(tmp_path / "x.safetensors"))
        res = apply(tmp_path / "e1.safetensors", tmp_path / "x.safetensors", tmp_path / "y.safetensors")
        torch.testing.assert_close(res["restored"], module(x))
    # Surgery: drop expert 0, add a fresh (identity-initialized) one; the kept experts move bitwise.
    r = run([sys.executable, "-m", "icm_dist.commands.cli", "surgery", str(tmp_path / "whole"), "--remove", "0",
             "--add", "1", "--out", str(tmp_path / "cut2")], cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = open_source(tmp_path / "whole"), open_source(tmp_path / "cut2")
    assert after.manifest["num_experts"] == 3
    for k, v in load_expert(before, 1).state_dict().items():
        assert torch.equal(v, load_expert(after, 0).state_dict()[k]), k
    # The unseen-symbols check runs the family's experts on symbols of another size (46: padded for them).
    from icm_dist.commands.generalize import generalize

    res = generalize(tmp_path / "whole", n=4, source="fonts", chain=["up", "invert", "noise"], log=lambda *a: None)
    assert res["symbols"]["size"] == 46 and len(res["generalization"]["mse"]) == len(whole["mechanisms"])


def test_a_user_factory_trains_under_torchrun_and_reshards(tmp_path, data_root, mnist):
    """``expert.arch: myexperts:make`` from a temporary module: two ranks train it, one rank resumes it, and
    apply rebuilds it; where the module is not importable, apply says that it needs it."""
    (tmp_path / "myexperts.py").write_text(USER_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("TORCHELASTIC_", "ICM_DIST_TEST_"))}
    args = ["--config", "configs/tiny.yaml", f"run.out_dir={tmp_path / 'run'}", f"data.root={data_root}", *SHORT,
            "expert.arch=myexperts:make", "expert.arch_args={width: 6}"]
    r = run([str(REPO / "launch" / "torchrun.sh"), "2", *args], cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2
    r = run([sys.executable, str(REPO / "launch" / "train.py"), *args, "train.iterations=6", "resume=auto"],
            cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "iter_0000006").is_dir()
    save_file({"images": mnist.test_x[:2].contiguous()}, str(tmp_path / "x.safetensors"))
    cmd = [sys.executable, "-m", "icm_dist.commands.cli", "apply", str(tmp_path / "run"),
           str(tmp_path / "x.safetensors"), "--out", str(tmp_path / "y.safetensors")]
    r = run(cmd, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(cmd + ["--force"], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode != 0 and "expert.arch 'myexperts:make' cannot be imported" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_stn_paint_makes_two_kinds_of_expert_and_only_the_painters_refinement_learns():
    """``paint: [false, true]`` with two spread bases: ids 0, 1 move pixels only, ids 2, 3 paint too (each kind
    at both bases), ids 4, 5 start over. A non-painter's output is its warped input and its refinement gets a
    zero gradient; the kind is a buffer and part of the niche, so the splits keep one of each base and kind."""
    def make(gid):
        return STNExpert(1, width=4, depth=1, loc_width=4, rotations=[0, 180], select="spread", residual=True,
                         paint=[False, True], expert_id=gid)
    assert [make(i).paints.item() for i in range(6)] == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    x = torch.rand(3, 1, 16, 16)
    for gid in (1, 3):
        e = make(gid)
        torch.nn.init.normal_(e.refine[-1].weight)  # the residual starts at zero: make the painter paint
        y = e(x)
        turned = torch.rot90(x, 2, (-2, -1))
        if gid == 1:
            torch.testing.assert_close(y, turned, atol=1e-5, rtol=0)
        else:
            assert (y - turned).abs().max() > 1e-2
        y.square().mean().backward()
        grads = [p.grad for n, p in e.named_parameters() if n.startswith("refine")]
        assert all(g is not None for g in grads)
        assert all(bool((g == 0).all()) for g in grads) == (gid == 1)
    block = StackedExperts(make, 0, [0, 1, 2, 3], 1, 16)
    assert block.niches() == [(1.0, 0.0, 0.0), (-1.0, 0.0, 0.0), (1.0, 0.0, 1.0), (-1.0, 0.0, 1.0)]
    # A few masked Adam steps of every expert: the non-painters' refinements stay bitwise where they were.
    with torch.no_grad():
        block.expert_tensors()["refine.3.weight"].normal_()  # past the residual's zero start
    opt = MaskedAdam(block, 1e-2, (0.9, 0.999), 1e-8)
    before = {k: v.clone() for k, v in block.expert_tensors().items()}
    for _ in range(3):
        opt.zero_grad()
        block.outputs(block(block.inputs(x))).square().mean().backward()
        opt.step(torch.ones(4, dtype=torch.bool))
    after = block.expert_tensors()
    for k in before:
        if k.startswith("refine"):
            assert torch.equal(after[k][:2], before[k][:2]), k
            assert not torch.equal(after[k][2:], before[k][2:]), k
    nospread = StackedExperts(lambda gid: STNExpert(1, width=4, depth=1, loc_width=4, residual=True,
                                                    paint=[True, False], expert_id=gid), 0, [0, 1, 2], 1, 16)
    assert nospread.niches() == [(1.0,), (0.0,), (1.0,)]
    for bad in ({"paint": [False, True]}, {"paint": [], "residual": True}, {"paint": ["no"], "residual": True}):
        with pytest.raises(ValueError, match="paint is a list"):
            STNExpert(1, **bad)


MIXED = ("expert.parts=[{num: 2}, {num: 2, arch: stn, train_identity: false, arch_args: {width: 8, depth: 2, "
         "loc_width: 4, rotations: [0, 180], select: spread, residual: true}}]")


def test_a_committee_of_two_families_trains_resumes_bitwise_and_exports_each_expert_as_its_own(tmp_path, data_root,
                                                                                                mnist):
    """``expert.parts``: two conv experts and two spread stn experts (bases 0 and 180, counted from the part's
    first expert) in one committee. Identity initialization trains only the part that asks for it; a run cut and
    resumed is bitwise the whole run; an stn expert exports as an stn module that computes what the committee's
    expert computes; surgery removes within the parts."""
    from icm_dist.commands.reuse import export_expert, load_expert, load_module_file, open_source, surgery
    from icm_dist.errors import CheckpointError

    more = ["expert.num=4", MIXED, "train.precision=fp32", "train.split_every=2", "train.split_steps=1"]
    whole = _train(tmp_path / "whole", data_root, *more)
    assert whole["num_experts"] == 4
    steps = json.loads((tmp_path / "whole" / "summary.json").read_text())["identity_init"]["steps"]
    assert steps[0] > 0 and steps[1] > 0 and steps[2:] == [0, 0], steps
    _train(tmp_path / "cut", data_root, *more, "train.iterations=2")
    _train(tmp_path / "cut", data_root, *more, "resume=auto")
    a, b = (tmp_path / r / "checkpoints" / "iter_0000004" for r in ("whole", "cut"))
    assert same_tensors(a, b) == []
    src = open_source(tmp_path / "whole")
    assert load_expert(src, 3).base.tolist() == [-1.0, 0.0]  # the part's second expert: base 180
    export_expert(tmp_path / "whole", tmp_path / "e3.safetensors", "3")
    module, meta = load_module_file(tmp_path / "e3.safetensors")
    assert "expert.arch stn" in meta["architecture"] and json.loads(meta["expert_config"])["arch"] == "stn"
    conv_file, _ = load_module_file(a / "expert_000.safetensors")  # a checkpoint's expert file loads alone too
    assert type(conv_file).__name__ == "Expert"
    x = mnist.test_x[:3]
    with torch.no_grad():
        torch.testing.assert_close(module(x), load_expert(src, 3)(x))
    # Surgery removes within the parts (each keeps its run of ids) and refuses to add (to which part?).
    surgery(tmp_path / "whole", tmp_path / "cut2", remove=[0], log=lambda *a: None)
    after = open_source(tmp_path / "cut2")
    assert [p["num"] for p in after.cfg.expert.parts] == [1, 2] and after.manifest["num_experts"] == 3
    for k, v in load_expert(src, 3).state_dict().items():
        assert torch.equal(v, load_expert(after, 2).state_dict()[k]), k
    with pytest.raises(ConfigError, match="surgery --add on a committee of several families"):
        surgery(tmp_path / "whole", tmp_path / "cut3", add=1)
    with pytest.raises(CheckpointError, match="part 0 of expert.parts without an expert"):
        surgery(tmp_path / "whole", tmp_path / "cut4", remove=[0, 1])

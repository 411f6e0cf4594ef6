"""World-size invariance with real gloo process groups: W = 1, 2, 3, 4 train the same committee.

Five experts make every plan with W > 1 uneven (3+2, 2+2+1, 2+1+1+1). Every rank runs the real
sharded step (all-gathered scores, DDP discriminator, local expert updates) on real MNIST digits.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_competition import assert_adam_close

STEPS = 6
OVERRIDES = ["expert.num=5", "expert.width=8", "expert.depth=3", "discriminator.widths=[8,16,16]",
             "discriminator.hidden=64", "data.mechanisms=[invert,up,noise,left,right]",
             "data.transformed_examples=2000", "identity_init.max_steps=5", "train.batch_size=16",
             "train.precision=fp32"]


def _worker(rank, world, init_file, out_dir, data_root, mode, split=False):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from icm_dist.config import load_config
    from icm_dist.data.protocol import build_protocol
    from icm_dist.dist import Dist, ShardPlan
    from icm_dist.experts import LocalExperts, copy_expert
    from icm_dist.identity import identity_init
    from icm_dist.models import make_discriminator
    from icm_dist.rng import sample_indices
    from icm_dist.step import competition_step

    cfg = load_config(None, [f"data.root={data_root}", f"train.expert_backward={mode}", *OVERRIDES])
    dist = Dist(rank, world, 0, torch.device("cpu"))
    plan = ShardPlan(cfg.expert.num, world)
    proto = build_protocol(cfg)
    experts = LocalExperts(cfg, list(plan.block(rank)), dist.device)
    identity_init(experts, proto.transformed_x, cfg, dist.device)
    D = make_discriminator(cfg)
    opt = torch.optim.Adam(D.parameters(), lr=1e-3)
    ddp = dist.wrap_discriminator(D)
    winners, donor, copy = [], None, None
    for t in range(STEPS):
        f = proto.transformed_x[sample_indices(proto.transformed_x.shape[0], 16, cfg.seed, "fake-batch", t)]
        r = proto.canonical_x[sample_indices(proto.canonical_x.shape[0], 16, cfg.seed, "real-batch", t)]
        # split: after step 2 the busiest expert of that step (the donor) is copied into expert 4 (or 0), on
        # another rank for W = 3; the two divide the donor's wins for steps 3 and 4.
        divisions = [(donor, copy)] if split and t in (3, 4) else []
        res = competition_step(experts, ddp, opt, f, r, plan, dist, divisions=divisions)
        winners.append(res.winners_B)
        if split and t == 2:
            donor = int(torch.bincount(res.winners_B, minlength=5).argmax())
            copy = 4 if donor != 4 else 0
            copy_expert(experts, plan, dist, donor, copy)
            if world == 1:  # all in one bank: the copy must equal its source to the bit
                for a, b in ((experts.bank.expert_state(donor), experts.bank.expert_state(copy)),
                             (experts.opt.expert_state(donor), experts.opt.expert_state(copy))):
                    assert all(torch.equal(a[k], b[k]) for k in a), "copy differs from its source"
    if split:
        winners.append(torch.tensor([donor, copy] + [-1] * 14))  # which pair was split, for the test
    for j, gid in enumerate(experts.ids):
        st = {k: v for k, v in experts.bank.expert_state(j).items() if not k.endswith("num_batches_tracked")}
        save_file({k: v.contiguous() for k, v in st.items()}, os.path.join(out_dir, f"expert_{gid}.safetensors"))
    if rank == 0:
        tensors = {f"D.{k}": v for k, v in D.state_dict().items()}
        tensors["winners"] = torch.stack(winners)
        save_file(tensors, os.path.join(out_dir, "rank0.safetensors"))
    tdist.destroy_process_group()


def run_world(world, data_root, mode, split=False):
    out = tempfile.mkdtemp(prefix=f"icm_w{world}_")
    init = os.path.join(out, "pg_init")
    mp.start_processes(_worker, args=(world, init, out, data_root, mode, split), nprocs=world, start_method="spawn")
    experts = {g: load_file(os.path.join(out, f"expert_{g}.safetensors")) for g in range(5)}
    return experts, load_file(os.path.join(out, "rank0.safetensors"))


@pytest.mark.parametrize("mode,worlds", [("dense", (2, 3, 4)), ("winners", (3,))])
def test_world_size_invariance(data_root, mnist, mode, worlds):
    """Same winners at every step; parameters equal within Adam-aware float tolerance (see
    test_competition.assert_adam_close: DDP's all-reduce sums D's gradient in another order).
    The default (dense) mode runs every world size; winners mode one uneven plan, to keep CI short."""
    base_experts, base = run_world(1, data_root, mode)
    for world in worlds:
        experts, rank0 = run_world(world, data_root, mode)
        assert torch.equal(rank0["winners"], base["winners"]), f"W={world}: winners differ"
        for g in range(5):
            for k, v in experts[g].items():
                assert_adam_close(v, base_experts[g][k], steps=STEPS, name=f"W={world} expert {g} {k}")
        for k, v in rank0.items():
            if k.startswith("D."):
                assert_adam_close(v, base[k], steps=STEPS, name=f"W={world} {k}")


def test_split_copies_across_ranks(data_root, mnist):
    """train.split_every's copy and division: one process and three (expert 0 on rank 0, expert 4 on
    rank 2) agree on every winner and every parameter, and the division hands the copy half the pool."""
    base_experts, base = run_world(1, data_root, "dense", split=True)
    w = base["winners"]
    donor, copy = w[STEPS, :2].tolist()
    for t in (3, 4):
        pool = int(((w[t] == donor) | (w[t] == copy)).sum())
        assert int((w[t] == copy).sum()) == pool // 2 and pool >= 2, f"step {t}: {w[t].tolist()}"
    experts, rank0 = run_world(3, data_root, "dense", split=True)
    assert torch.equal(rank0["winners"], w), "W=3: winners differ"
    for g in range(5):
        for k, v in experts[g].items():
            assert_adam_close(v, base_experts[g][k], steps=STEPS, name=f"W=3 expert {g} {k}")

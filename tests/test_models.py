"""Networks of appendix B, the bank of grouped convolutions against a loop of Expert modules, the precision policy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icm_dist import precision
from icm_dist.config import DiscriminatorConfig, ExpertConfig
from icm_dist.families.conv import Expert, ExpertBank, make_expert
from icm_dist.models import Classifier, Discriminator, num_params


def test_expert_shapes_and_parameter_count():
    e = Expert(ExpertConfig())
    assert e(torch.rand(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    assert e(torch.rand(2, 1, 46, 46)).shape == (2, 1, 46, 46)  # fully convolutional (Figure 7)
    # Footnote 5: ~27K weights at 32 filters, ~110K at 64, ~440K at 128.
    assert 26_000 <= num_params(e) <= 30_000
    assert 105_000 <= num_params(Expert(ExpertConfig(width=64))) <= 115_000
    assert 420_000 <= num_params(Expert(ExpertConfig(width=128))) <= 450_000
    pooled = Expert(ExpertConfig(pool=2))
    assert pooled(torch.rand(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    out = e(torch.rand(3, 1, 32, 32))
    assert (out >= 0).all() and (out <= 1).all()


def test_pooled_expert_upsamples_before_its_last_blocks():
    # expert.pool=2: pool after blocks 0 and 1, upsample before blocks 2 and 3, so the last block and the
    # output convolution see the full 32x32 (an upsampling after the last block left the blocky
    # nearest-neighbour copies to the output convolution alone).
    e = Expert(ExpertConfig(width=4, depth=4, pool=2))
    sizes = []
    for m in [*e.convs, e.out]:
        m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[-1]))
    e(torch.rand(2, 1, 32, 32))
    assert sizes == [32, 16, 16, 32, 32]


def test_discriminator_and_classifier_shapes():
    d = Discriminator(DiscriminatorConfig())
    assert d(torch.rand(5, 1, 32, 32)).shape == (5,)
    assert Classifier()(torch.rand(5, 1, 32, 32)).shape == (5, 10)


def test_expert_init_is_keyed_by_seed_and_id():
    a, b, c = make_expert(ExpertConfig(), 0, 3), make_expert(ExpertConfig(), 0, 3), make_expert(ExpertConfig(), 0, 4)
    assert torch.equal(a.convs[0].weight, b.convs[0].weight)
    assert not torch.equal(a.convs[0].weight, c.convs[0].weight)


def test_bank_matches_a_loop_of_experts():
    cfg = ExpertConfig(width=8, depth=3, pool=1)
    ids = [4, 5, 6]
    bank = ExpertBank.create(cfg, seed=1, ids=ids)
    experts = [make_expert(cfg, 1, g) for g in ids]
    x = torch.rand(6, 1, 32, 32)
    out = bank(x.expand(6, 3, 32, 32).contiguous())
    for j, e in enumerate(experts):
        torch.testing.assert_close(out[:, j:j + 1], e(x), rtol=1e-5, atol=1e-6)
    # running statistics moved identically
    for j, e in enumerate(experts):
        torch.testing.assert_close(bank.expert_state(j)["norms.0.running_var"], e.norms[0].running_var)
    bank.eval()
    for e in experts:
        e.eval()
    out = bank(x.expand(6, 3, 32, 32).contiguous())
    for j, e in enumerate(experts):
        torch.testing.assert_close(out[:, j:j + 1], e(x), rtol=1e-5, atol=1e-6)


def test_expert_state_round_trip_and_standalone_load():
    cfg = ExpertConfig(width=8, depth=2)
    bank = ExpertBank.create(cfg, seed=0, ids=[0, 1])
    e = Expert(cfg)
    e.load_state_dict(bank.expert_state(1))
    other = ExpertBank(cfg, [7, 8])
    other.load_expert_state(0, bank.expert_state(1))
    assert torch.equal(other.expert_state(0)["convs.1.weight"], e.convs[1].weight)


def test_bank_views_work_in_channels_last():
    cfg = ExpertConfig(width=8, depth=2)
    bank = ExpertBank.create(cfg, seed=0, ids=[0, 1, 2]).to(memory_format=torch.channels_last)
    ref = make_expert(cfg, 0, 2)
    assert torch.equal(bank.expert_state(2)["convs.1.weight"], ref.convs[1].weight)


@pytest.mark.parametrize("depth,pool", [(3, 0), (4, 2)])
def test_forward_one_reproduces_the_full_pass(depth, pool):
    cfg = ExpertConfig(width=8, depth=depth, pool=pool)
    bank = ExpertBank.create(cfg, seed=0, ids=[0, 1, 2])
    x = torch.rand(10, 1, 32, 32)
    stats = []
    with torch.no_grad():
        full = bank(x.expand(10, 3, 32, 32).contiguous(), collect_stats=stats)
    rows = torch.tensor([1, 4, 7])
    one = bank.forward_one(2, x[rows], stats)
    torch.testing.assert_close(one[:, 0], full[rows, 2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags,aten,onednn,expected", [
    (("avx2", "avx512_bf16"), "AVX512", None, "bf16"),
    (("avx2", "amx_bf16"), "AVX512", "AVX512_CORE_AMX", "bf16"),
    (("avx2", "avx512_bf16"), "AVX2", None, "fp32"),       # ATen capped
    (("avx2", "avx512_bf16"), "AVX512", "AVX2", "fp32"),   # oneDNN capped
    (("avx2", "avx512_bf16"), "AVX512", "avx512_core", "fp32"),
    (("avx2", "avx512_bf16"), "AVX512", "AVX512_CORE_BF16", "bf16"),  # the lowest level with bf16
    (("avx2", "avx512_bf16"), "AVX512", "dnnl:AVX2", "fp32"),  # the older variable name, DNNL_MAX_CPU_ISA
    (("avx2",), "AVX512", None, "fp32"),                   # no bf16 instructions
])
def test_auto_precision_needs_the_bf16_instructions_and_kernels_allowed_to_use_them(monkeypatch, flags, aten,
                                                                                    onednn, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    if onednn is not None:
        name, _, value = onednn.rpartition(":")
        monkeypatch.setenv("DNNL_MAX_CPU_ISA" if name == "dnnl" else "ONEDNN_MAX_CPU_ISA", value)
    precision._cpu_has_bf16.cache_clear()  # decided once per process: decide again under this case's CPU
    try:
        assert precision.resolve_precision("auto", torch.device("cpu")) == expected
    finally:
        precision._cpu_has_bf16.cache_clear()  # the next caller sees this machine's CPU again


def test_auto_precision_is_fp32_where_aten_dispatches_below_avx512():
    """The real cap: ATEN_CPU_CAPABILITY=avx2 holds ATen to its AVX2 kernels on any CPU, whatever
    /proc/cpuinfo lists, so ``auto`` picks fp32."""
    code = ("import torch; from icm_dist.precision import resolve_precision; "
            "print(torch.backends.cpu.get_cpu_capability()); print(resolve_precision('auto', torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    capability, picked = out.stdout.splitlines()[-2:]
    assert not capability.startswith("AVX512") and picked == "fp32"


@pytest.mark.parametrize("picked", ["fp32", "bf16"])
def test_on_cuda_the_start_up_line_claims_no_world_size_invariance(picked):
    """Nothing is measured on GPUs (fp32 convolutions run in TF32 there by torch's default): the line says so."""
    text = precision.world_size_promise(picked, torch.device("cuda"))
    assert text == f"precision {picked} (world-size invariance is tested on CPUs only; on CUDA winners may differ)"


def test_win_matrix_labels_read_as_their_values():
    from icm_dist.figures import share_label

    assert [share_label(v) for v in (0.05, 0.374, 0.994, 0.996, 0.999, 1.0)] == [".05", ".37", ".99", "1", "1", "1"]

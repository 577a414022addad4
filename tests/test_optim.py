"""SparseAdamW (SET) and FrozenEntries (SPA) on a tiny random Llama.

Tolerances: the sparse update runs the same element-wise ops in the same order as
``torch.optim.AdamW`` (single-tensor path), so the trajectories are compared with
rtol=1e-5 / atol=1e-6 (weights and moments) although they are bit-identical in practice;
unselected entries and mode-vs-mode comparisons use ``torch.equal``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lit_safety.esi.mask import MaskMismatchError, SafetyMask
from lit_safety.optim import FrozenEntries, SparseAdamW, prepare_model

VOCAB = 64
RTOL, ATOL = 1e-5, 1e-6
EMPTY = "model.layers.0.self_attn.q_proj.weight"  # in mask.indices with 0 entries
ABSENT = "model.norm.weight"  # not in mask.indices at all


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def random_mask(model: nn.Module, ratio: float = 0.05, seed: int = 1) -> SafetyMask:
    """Unique sorted random indices per parameter, except EMPTY (0 entries) and ABSENT."""
    g = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, p in model.named_parameters():
        shapes[name] = tuple(p.shape)
        if name == ABSENT:
            continue
        k = 0 if name == EMPTY else max(1, round(ratio * p.numel()))
        indices[name] = torch.randperm(p.numel(), generator=g)[:k].sort().values
    return SafetyMask(indices=indices, shapes=shapes)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1000 + step))


def backward(model: nn.Module, step: int) -> None:
    x = batch(step)
    model(input_ids=x, labels=x).loss.backward()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, sched=None) -> None:
    for step in steps:
        backward(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 150)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and spinning OpenMP workers on a shared 2-core
    machine made these tests up to 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base() -> tuple[nn.Module, SafetyMask]:
    model = tiny_llama()
    return model, random_mask(model)


def set_model(base, **opt_kwargs) -> tuple[nn.Module, SparseAdamW]:
    model, mask = copy.deepcopy(base[0]), base[1]
    prepare_model(model, mask)
    opt = SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1, **opt_kwargs)
    return model, opt


# ----------------------------------------------------------------------------------- SparseAdamW
def test_matches_masked_dense_adamw(base):
    model0, mask = base
    model, opt = set_model(base)
    sched = schedule(opt)
    ref = copy.deepcopy(model0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    ref_sched = schedule(ref_opt)
    selected = {n: mask.bool_mask(n) for n in mask.shapes}  # dense masks: reference only
    original = params(model0)

    assert not model.get_parameter(EMPTY).requires_grad and not model.get_parameter(ABSENT).requires_grad
    for step in range(100):
        backward(model, step)
        backward(ref, step)
        assert model.get_parameter(EMPTY).grad is None and model.get_parameter(ABSENT).grad is None
        opt.step()
        ref_opt.step()
        with torch.no_grad():  # masked reference: only selected entries move
            for n, p in ref.named_parameters():
                p.copy_(torch.where(selected[n], p, original[n]))
        for o in (opt, ref_opt):
            o.zero_grad(set_to_none=True)
        sched.step()
        ref_sched.step()

    named = dict(model.named_parameters())
    moved = 0
    for n, p_ref in ref.named_parameters():
        p, sel = named[n].detach(), selected[n]
        assert torch.equal(p[~sel], original[n][~sel]), f"unselected entries of {n} changed"
        torch.testing.assert_close(p[sel], p_ref.detach()[sel], rtol=RTOL, atol=ATOL)
        moved += int((p[sel] != original[n][sel]).sum())
        if n in (EMPTY, ABSENT):
            assert n not in {name for g in opt.param_groups for name in g["param_names"]}
            continue
        state, ref_state = opt.state[named[n]], ref_opt.state[p_ref]
        idx = mask.indices[n]
        assert torch.equal(state["indices"], idx)
        torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"].view(-1)[idx], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"].view(-1)[idx], rtol=RTOL, atol=ATOL)
        assert float(state["step"]) == 100
    assert moved == mask.k  # every selected entry was updated


def test_state_is_o_of_k(base):
    _, opt = set_model(base)
    mask = base[1]
    assert opt.state_numel() == 2 * mask.k
    assert mask.k < 0.06 * mask.n
    assert opt.state_nbytes() == mask.k * (4 + 4 + 8)


def test_step_in_backward_equals_normal_mode(base):
    normal, opt_a = set_model(base)
    fused, opt_b = set_model(base, step_in_backward=True)
    train(normal, opt_a, range(20), schedule(opt_a))
    train(fused, opt_b, range(20), schedule(opt_b))
    assert all(p.grad is None for p in fused.parameters())  # gradients were freed in backward
    for (n, a), b in zip(normal.named_parameters(), fused.parameters()):
        assert torch.equal(a, b), n
    for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])


def test_state_dict_round_trip(base):
    straight, opt = set_model(base)
    train(straight, opt, range(100), schedule(opt))

    resumed, opt1 = set_model(base)
    sched1 = schedule(opt1)
    train(resumed, opt1, range(50), sched1)
    buffer = io.BytesIO()
    torch.save({"opt": opt1.state_dict(), "sched": sched1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    opt2 = SparseAdamW(resumed, base[1], lr=123.0, weight_decay=0.1)  # lr comes from the checkpoint
    sched2 = schedule(opt2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    train(resumed, opt2, range(50, 100), sched2)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


def test_load_rejects_other_mask(base):
    model, opt = set_model(base)
    other = random_mask(model, seed=7)
    opt2 = SparseAdamW(model, other)
    with pytest.raises(ValueError, match="another mask"):
        opt2.load_state_dict(opt.state_dict())


def test_bf16_params_fp32_state():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    mask = SafetyMask(indices={"weight": torch.tensor([0, 5, 17, 100])}, shapes={"weight": (8, 16), "bias": (8,)})
    named = prepare_model(lin, mask)
    assert set(named) == {"weight"} and not lin.bias.requires_grad
    before = lin.weight.detach().clone()
    opt = SparseAdamW(lin, mask, lr=0.1)
    lin(torch.randn(4, 16, dtype=torch.bfloat16)).square().sum().backward()
    opt.step()
    state = opt.state[lin.weight]
    assert state["exp_avg"].dtype == torch.float32 and lin.weight.dtype == torch.bfloat16
    sel = mask.bool_mask("weight")
    assert torch.equal(lin.weight.detach()[~sel], before[~sel])
    assert (lin.weight.detach()[sel] != before[sel]).all()


def _bf16_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0.0, 0.02)  # the scale of real LLM weights
    return lin.to(torch.bfloat16)


def test_bf16_master_weights_match_fp32_reference():
    """bf16 weights, lr 2e-5, 10 steps: each selected entry equals an fp32-master AdamW reference
    rounded to bf16, and > 99% of them move (without masters ~30% did: steps < half a bf16 ulp)."""
    lin = _bf16_linear()
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(lin.weight.numel(), generator=g)[:512].sort().values
    mask = SafetyMask(indices={"weight": idx}, shapes={"weight": (32, 64)})
    prepare_model(lin, mask)
    before = lin.weight.detach().clone()
    opt = SparseAdamW(lin, mask, lr=2e-5, weight_decay=0.01)
    ref = nn.Parameter(before.float())  # the fp32 master of the reference
    ref_opt = torch.optim.AdamW([ref], lr=2e-5, weight_decay=0.01, foreach=False)
    x = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    target = torch.randn(8, 32, generator=g).to(torch.bfloat16)
    for step in range(10):  # a fixed regression: gradients keep their sign, as fine-tuning's mostly do
        (lin(x) - target).square().sum().backward()
        ref.grad = lin.weight.grad.float()
        ref_opt.step()
        opt.step()
        lin.weight.grad = None
        got = lin.weight.detach().view(-1)[idx]
        assert torch.equal(got, ref.detach().view(-1)[idx].to(torch.bfloat16)), f"step {step}"
    assert torch.equal(opt.state[lin.weight]["master"], ref.detach().view(-1)[idx])
    moved = (lin.weight.detach().view(-1)[idx] != before.view(-1)[idx]).float().mean().item()
    assert moved > 0.99
    sel = mask.bool_mask("weight")
    assert torch.equal(lin.weight.detach()[~sel], before[~sel])
    assert opt.state_numel() == 3 * idx.numel()


def test_bf16_master_resyncs_after_outside_change_and_round_trips():
    lin = _bf16_linear(1)
    idx = torch.tensor([0, 7, 100, 2047])
    mask = SafetyMask(indices={"weight": idx}, shapes={"weight": (32, 64)})
    prepare_model(lin, mask)
    opt = SparseAdamW(lin, mask, lr=1e-3, weight_decay=0.0)
    lin(torch.ones(2, 64, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    with torch.no_grad():  # a weight load from outside: the master must follow it
        lin.weight.view(-1)[7] = 0.5
    twin = copy.deepcopy(lin)  # same weights and gradient, its own optimizer restored from the state dict
    twin.weight.grad = lin.weight.grad.clone()
    restored = SparseAdamW(twin, mask, lr=1e-3, weight_decay=0.0)
    restored.load_state_dict(opt.state_dict())
    assert restored.state[twin.weight]["master"].dtype == torch.float32
    assert torch.equal(restored.state[twin.weight]["master"], opt.state[lin.weight]["master"])
    opt.step()
    restored.step()
    master = opt.state[lin.weight]["master"]
    assert torch.equal(master, restored.state[twin.weight]["master"])
    assert torch.equal(lin.weight, twin.weight)
    # entry 7 continued from the outside value 0.5 (one step of ~lr), not from the stale master
    assert abs(master[1].item() - 0.5) < 2e-3 and lin.weight.view(-1)[7] == master[1].to(torch.bfloat16)


def test_rejects_bad_masks(base):
    model = copy.deepcopy(base[0])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    name = "lm_head.weight"
    dup = SafetyMask(indices={name: torch.tensor([1, 1, 2])}, shapes=shapes)
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseAdamW(model, dup)
    wrong = SafetyMask(indices={"nope.weight": torch.tensor([0])}, shapes={**shapes, "nope.weight": (3,)})
    with pytest.raises(MaskMismatchError):
        SparseAdamW(model, wrong)
    frozen_param = SafetyMask(indices={name: torch.tensor([0])}, shapes=shapes)
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="prepare_model"):
        SparseAdamW(model, frozen_param)


# --------------------------------------------------------------------------------- FrozenEntries
def _optimizers():
    yield "adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    yield "sgd", lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=0.1)
    yield "adamw8bit", "bnb"


@pytest.mark.parametrize("kind,make", list(_optimizers()), ids=[k for k, _ in _optimizers()])
def test_frozen_entries_stay_bit_identical(base, kind, make):
    if make == "bnb":
        bnb = pytest.importorskip("bitsandbytes")
        make = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, weight_decay=0.1, min_8bit_size=256)  # noqa: E731
    model0, _ = base
    model = copy.deepcopy(model0)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    mask = random_mask(model, ratio=0.1, seed=3)
    full = "model.layers.1.input_layernorm.weight"  # every entry frozen -> requires_grad False
    mask.indices[full] = torch.arange(shapes[full][0])
    before = params(model)

    frozen = FrozenEntries(model, mask)
    assert not model.get_parameter(full).requires_grad
    assert frozen.k == mask.k and frozen.nbytes() == 4 * mask.k
    opt = make([p for p in model.parameters() if p.requires_grad])
    frozen.attach(opt)
    train(model, opt, range(30))
    assert model.get_parameter(full).grad is None

    assert frozen.verify() and frozen.max_abs_drift() == 0.0
    changed = total = 0
    for n, p in model.named_parameters():
        sel = mask.bool_mask(n)
        assert torch.equal(p.detach()[sel], before[n][sel]), f"{kind}: frozen entries of {n} moved"
        diff = p.detach()[~sel] != before[n][~sel]
        changed, total = changed + int(diff.sum()), total + diff.numel()
        if (~sel).any():
            assert diff.any(), f"{kind}: trainable entries of {n} never changed"
    assert changed / total > 0.9, f"{kind}: only {changed}/{total} trainable entries changed"


def test_frozen_grads_are_zeroed_and_drift_detected(base):
    model = copy.deepcopy(base[0])
    mask = base[1]
    frozen = FrozenEntries(model, mask)
    backward(model, 0)
    name = "lm_head.weight"
    p = model.get_parameter(name)
    idx = mask.indices[name]
    assert torch.equal(p.grad.view(-1)[idx], torch.zeros(idx.numel()))
    assert p.grad.abs().sum() > 0
    with torch.no_grad():
        p.view(-1)[idx[0]] += 1.0
    assert not frozen.verify() and frozen.max_abs_drift() == pytest.approx(1.0, abs=1e-6)
    frozen.restore()
    assert frozen.verify()
    frozen.remove()
    model.zero_grad(set_to_none=True)
    backward(model, 0)
    assert p.grad.view(-1)[idx].abs().sum() > 0  # hooks are gone


def test_full_selection_equals_torch_adamw_maximize():
    torch.manual_seed(0)
    a = nn.Linear(6, 5)
    b = copy.deepcopy(a)
    mask = SafetyMask(indices={n: torch.arange(p.numel()) for n, p in a.named_parameters()},
                      shapes={n: tuple(p.shape) for n, p in a.named_parameters()})
    opt_a = SparseAdamW(a, mask, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3, maximize=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3,
                              maximize=True, foreach=False)
    for step in range(10):
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, opt_a), (b, opt_b)):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------- DTensor
def test_local_indices_of_a_row_shard():
    from lit_safety.parallel import local_indices

    idx = torch.tensor([1, 5, 9, 15, 16, 23])
    # rows [2, 4) of a (6, 4) tensor hold global flat entries [8, 16)
    assert local_indices(idx, (6, 4), row_offset=2, local_rows=2).tolist() == [1, 7]
    assert local_indices(idx, (6, 4), row_offset=0, local_rows=6).tolist() == idx.tolist()


def test_frozen_entries_dtensor_single_rank():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group yet")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        lin = nn.Linear(8, 6)
        lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Shard(0)]))
        lin.bias = nn.Parameter(distribute_tensor(lin.bias.detach(), mesh, [Replicate()]))
        sel = [1, 7, 30]
        mask = SafetyMask(indices={"weight": torch.tensor(sel), "bias": torch.tensor([2])},
                          shapes={"weight": (6, 8), "bias": (6,)})
        frozen = FrozenEntries(lin, mask)
        opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
        frozen.attach(opt)
        before = lin.weight.full_tensor().clone()
        for step in range(3):
            x = distribute_tensor(torch.randn(4, 8, generator=torch.Generator().manual_seed(step)), mesh, [Replicate()])
            lin(x).sum().backward()
            opt.step()
            opt.zero_grad()
        after = lin.weight.full_tensor()
        assert frozen.verify()
        assert torch.equal(after.view(-1)[sel], before.view(-1)[sel])
        assert int((after != before).sum()) == after.numel() - len(sel)
    finally:
        dist.destroy_process_group()

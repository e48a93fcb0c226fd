"""MoE layer: the torch backend against a naive per-token loop, MegaBlocks' layout, balancing, errors."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_mhc.moe import (
    MoEConfig,
    TorchDroplessMoE,
    _grouped_mm_supported,
    build_moe,
    grouped_matmul,
    iter_moe_layers,
    load_balancing_loss,
    load_imbalance,
    megablocks_available,
    moe_aux_loss,
    set_balance_group,
    strip_expert_bias,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def naive_moe(moe: TorchDroplessMoE, x: torch.Tensor) -> torch.Tensor:
    """One token and one chosen expert at a time, straight from the parameters (MegaBlocks' math, written out)."""
    cfg = moe.config
    e, f, h = cfg.num_experts, cfg.ffn_hidden_size, cfg.hidden_size
    act = (lambda t: F.gelu(t, approximate="tanh")) if cfg.activation_name == "gelu" else F.silu
    w1 = moe.experts.mlp.w1.view(e, f, h)
    w2 = moe.experts.mlp.w2.view(e, f, h)
    v1 = moe.experts.mlp.v1.view(e, f, h) if cfg.mlp_type == "glu" else None
    rows = []
    for token in x.reshape(-1, h):
        probs = torch.softmax(moe.router.layer.weight @ token, dim=0)
        choice = probs.detach() + (moe.expert_bias if cfg.balancing == "aux_free" else 0.0)
        chosen = torch.argsort(choice, descending=True)[: cfg.top_k]
        gates = probs[chosen]
        if cfg.normalize_expert_weights:
            gates = gates / gates.sum()
        out = torch.zeros(h, dtype=x.dtype)
        for gate, expert in zip(gates, chosen.tolist()):
            hidden = act(w1[expert] @ token)
            if v1 is not None:
                hidden = hidden * (v1[expert] @ token)
            out = out + gate * (hidden @ w2[expert])
        shared = moe.shared_expert
        if shared is not None:
            if shared.gate_proj is None:
                out = out + shared.down_proj.weight @ act(shared.up_proj.weight @ token)
            else:
                gated = act(shared.gate_proj.weight @ token) * (shared.up_proj.weight @ token)
                out = out + shared.down_proj.weight @ gated
        rows.append(out)
    return torch.stack(rows).view(x.shape)


def _grads(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, probe: torch.Tensor) -> list[torch.Tensor]:
    inputs = [x, *module.parameters()]
    return list(torch.autograd.grad((out * probe).sum(), inputs))


CASES = [
    # (mlp_type, shared, top_k, hidden, ffn, experts, tokens): aligned sizes take torch._grouped_mm, odd ones the loop
    ("mlp", 0, 1, 16, 8, 4, 37),
    ("mlp", 12, 2, 16, 8, 4, 37),
    ("glu", 0, 2, 16, 8, 5, 29),
    ("glu", 10, 1, 16, 8, 4, 31),
    ("mlp", 0, 2, 6, 5, 3, 23),
    ("glu", 7, 2, 6, 5, 3, 19),
    ("mlp", 3, 1, 6, 5, 6, 11),
    ("glu", 0, 1, 6, 5, 4, 13),
]


@pytest.mark.parametrize(("mlp_type", "shared", "top_k", "hidden", "ffn", "experts", "tokens"), CASES)
def test_torch_backend_matches_naive_loop(mlp_type, shared, top_k, hidden, ffn, experts, tokens):
    torch.manual_seed(0)
    cfg = MoEConfig(
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_experts=experts,
        top_k=top_k,
        mlp_type=mlp_type,
        shared_expert_hidden_size=shared,
        init_std=0.5,
    )
    moe = build_moe(cfg, backend="torch")
    assert isinstance(moe, TorchDroplessMoE)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    probe = torch.randn(1, tokens, hidden)
    out = moe(x)
    ref = naive_moe(moe, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(_grads(moe, x, out, probe), _grads(moe, x, ref, probe)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert int(moe.tokens_per_expert.sum()) == tokens * top_k
    assert moe.tokens_per_expert.dtype == torch.long and not moe.tokens_per_expert.requires_grad
    assert 0.0 < float(moe.router_entropy) <= math.log(experts) + 1e-6


def test_grouped_mm_path_is_taken_for_aligned_sizes():
    aligned = torch.zeros(4, 8, 16)
    assert _grouped_mm_supported(torch.zeros(3, 16), aligned) == hasattr(torch, "_grouped_mm")
    assert not _grouped_mm_supported(torch.zeros(3, 6), torch.zeros(4, 6, 5))
    assert not _grouped_mm_supported(torch.zeros(3, 16, dtype=torch.float64), aligned.double())


def test_grouped_matmul_backward_accepts_expanded_gradients():
    x = torch.randn(11, 16, requires_grad=True)
    weight = torch.randn(3, 16, 8, requires_grad=True)
    counts = torch.tensor([4, 0, 7])
    grouped_matmul(x, weight, counts, transpose=False).sum().backward()  # the gradient of a sum has stride 0
    rows = torch.repeat_interleave(torch.arange(3), counts)
    torch.testing.assert_close(x.grad, weight.detach()[rows].sum(-1))
    assert torch.equal(weight.grad[1], torch.zeros(16, 8))


def test_aux_free_bias_moves_selection_but_not_gate_weights():
    torch.manual_seed(1)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, balancing="aux_free", init_std=0.5)
    moe = build_moe(cfg, backend="torch").eval()
    x = torch.randn(25, 8)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
        out = moe(x)
        torch.testing.assert_close(out, naive_moe(moe, x), atol=1e-5, rtol=1e-5)
    assert int(moe.tokens_per_expert[3]) == 25  # the bias forces expert 3 into every token's top-2
    torch.testing.assert_close(moe.expert_bias, torch.tensor([0.0, 0.0, 0.0, 2.0]))  # no update in eval


def test_normalized_expert_weights_match_naive_loop():
    torch.manual_seed(2)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, normalize_expert_weights=True)
    moe = build_moe(cfg, backend="torch")
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=1e-5)


# MegaBlocks dMoE's state dict with bias=False and no expert parallelism (megablocks 0.10, databricks/megablocks):
#   router.layer.weight              [E, h]     layers/router.py  LearnedRouter.__init__ (Linear(h, E, bias=False))
#   experts.mlp.w1 / experts.mlp.w2  [E*f, h]   layers/mlp.py     SparseMLP.__init__ (GroupedMLP's base), lines 315-330
#   experts.mlp.v1                   [E*f, h]   layers/glu.py     SparseGLU.__init__, lines 23-30
#   shared_expert.up_proj.weight     [s, h]     layers/mlp.py     SharedMLP.__init__, lines 541-551
#   shared_expert.down_proj.weight   [h, s]     layers/mlp.py     SharedMLP.__init__, lines 541-551
#   shared_expert.gate_proj.weight   [s, h]     layers/glu.py     SharedGLU.__init__, lines 216-220
#   (experts.bias is registered as None when bias=False: layers/moe.py ParallelMLP.__init__)
def megablocks_layout(h: int, f: int, e: int, s: int, glu: bool) -> dict[str, tuple[int, ...]]:
    table = {"router.layer.weight": (e, h), "experts.mlp.w1": (e * f, h)}
    if glu:
        table["experts.mlp.v1"] = (e * f, h)
    table["experts.mlp.w2"] = (e * f, h)
    if s:
        table["shared_expert.up_proj.weight"] = (s, h)
        table["shared_expert.down_proj.weight"] = (h, s)
        if glu:
            table["shared_expert.gate_proj.weight"] = (s, h)
    return table


@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
@pytest.mark.parametrize("shared", [0, 24])
def test_state_dict_names_and_shapes_equal_megablocks(mlp_type, shared):
    cfg = MoEConfig(
        hidden_size=16, ffn_hidden_size=32, num_experts=4, mlp_type=mlp_type, shared_expert_hidden_size=shared
    )
    moe = build_moe(cfg, backend="torch")
    got = {name: tuple(t.shape) for name, t in moe.state_dict().items()}
    assert got == megablocks_layout(16, 32, 4, shared, mlp_type == "glu")


def test_megablocks_state_dict_loads_into_aux_free_backend():
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, mlp_type="glu", shared_expert_hidden_size=6)
    layout = megablocks_layout(8, 4, 4, 6, glu=True)
    foreign = {name: torch.randn(shape) for name, shape in layout.items()}
    moe = build_moe(dataclasses.replace(cfg, balancing="aux_free"), backend="torch")
    with torch.no_grad():
        moe.expert_bias.fill_(0.3)
    moe.load_state_dict(foreign, strict=True)
    assert torch.equal(moe.expert_bias, torch.zeros(4))
    assert torch.equal(moe.experts.mlp.v1, foreign["experts.mlp.v1"])
    ours = moe.state_dict()
    assert "expert_bias" in ours
    plain = build_moe(cfg, backend="torch")
    plain.load_state_dict(strip_expert_bias(ours), strict=True)
    nested = strip_expert_bias({"block.0.moe.expert_bias": 1, "block.0.moe.router.layer.weight": 2})
    assert nested == {"block.0.moe.router.layer.weight": 2}


def test_expert_bias_stays_float32_under_dtype_casts():
    moe = build_moe(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, balancing="aux_free"), backend="torch")
    moe.to(torch.bfloat16)
    assert moe.router.layer.weight.dtype == torch.bfloat16
    assert moe.expert_bias.dtype == torch.float32
    assert moe(torch.randn(5, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_aux_loss_matches_megablocks_formula_and_is_collected():
    torch.manual_seed(3)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2, aux_loss_weight=0.5)
    model = torch.nn.Sequential(build_moe(cfg, backend="torch"), build_moe(cfg, backend="torch"))
    x = torch.randn(21, 8)
    model(x)
    first = model[0]
    scores = torch.softmax(x @ first.router.layer.weight.detach().T, dim=-1)
    counts = first.tokens_per_expert.double()
    expected = 0.5 * 4 / (21 * 2) * float((counts * scores.double().mean(0)).sum())
    assert first.aux_loss is not None and first.aux_loss.requires_grad
    assert float(first.aux_loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert len(list(iter_moe_layers(model))) == 2
    total = moe_aux_loss(model)
    assert total is not None and total.requires_grad
    assert all(layer.aux_loss is None for layer in model) and moe_aux_loss(model) is None
    model.eval()
    model(x)
    assert moe_aux_loss(model) is None
    uniform = load_balancing_loss(torch.full((4,), 5), torch.full((10, 4), 0.25), top_k=2, weight=1.0)
    assert float(uniform) == pytest.approx(1.0)


def _train_skewed(balancing: str, steps: int = 150) -> tuple[float, float]:
    """Train one MoE layer on a regression task from a router that sends every token to experts 0 and 1."""
    torch.manual_seed(0)
    h = 16
    cfg = MoEConfig(
        hidden_size=h,
        ffn_hidden_size=16,
        num_experts=8,
        top_k=2,
        balancing=balancing,
        aux_loss_weight=0.1,
        bias_update_rate=1e-2,
    )
    moe = build_moe(cfg, backend="torch")
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(h, h, generator=gen) / math.sqrt(h)
    with torch.no_grad():
        moe.router.layer.weight[0] += 0.15
        moe.router.layer.weight[1] += 0.1
    probe = torch.randn(256, h, generator=gen) + 1.0

    def imbalance() -> float:
        moe.eval()
        with torch.no_grad():
            moe(probe)
        moe.train()
        return load_imbalance(moe.tokens_per_expert)

    before = imbalance()
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(256, h, generator=gen) + 1.0
        loss = F.mse_loss(moe(x), torch.tanh(x @ teacher))
        aux = moe_aux_loss(moe)
        if aux is not None:
            loss = loss + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, imbalance()


# --- aux-free balancing under torch.distributed: the bias follows the global load ----------------------------

BALANCE_CFG = MoEConfig(
    hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, balancing="aux_free", bias_update_rate=0.05
)
BALANCE_STEPS = 4


def _balance_moe() -> TorchDroplessMoE:
    """The same layer every call; its router prefers expert ``e`` for tokens large in feature ``e``."""
    torch.manual_seed(0)
    moe = build_moe(BALANCE_CFG, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        moe.router.layer.weight[:, :4] += torch.eye(4, dtype=torch.float64)
    return moe


def _balance_batches() -> list[torch.Tensor]:
    """Per step 32 tokens: the first half (rank 0's) leans to expert 0, the second (rank 1's) to expert 1, so one
    rank's load alone says "expert 1 is underused" while the global load says it is overused."""
    gen = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(BALANCE_STEPS):
        x = 0.3 * torch.randn(32, BALANCE_CFG.hidden_size, generator=gen, dtype=torch.float64)
        x[:16, 0] += 2.0
        x[16:, 1] += 2.0
        batches.append(x)
    return batches


def _run_balance(moe: torch.nn.Module, batches: list[torch.Tensor], rows: slice) -> list[torch.Tensor]:
    """Training forwards (and backwards, as DDP needs) on ``rows`` of each batch; the bias before each step and the
    local load of each step."""
    layer = moe.module if isinstance(moe, torch.nn.parallel.DistributedDataParallel) else moe
    history = []
    for x in batches:
        bias = layer.expert_bias.clone()
        moe(x[rows]).sum().backward()
        history.append((bias, layer.tokens_per_expert.clone()))
    return history


def _balance_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches, rows = _balance_batches(), slice(16 * rank, 16 * (rank + 1))
        ddp = torch.nn.parallel.DistributedDataParallel(_balance_moe())  # broadcasts rank 0's buffers every forward
        loads = [load for _, load in _run_balance(ddp, batches, rows)]
        group = _balance_moe()
        assert set_balance_group(group, dist.new_group([0, 1])) == 1
        _run_balance(group, batches, rows)
        local = _balance_moe()
        assert set_balance_group(local, None) == 1
        _run_balance(local, batches, rows)
        torch.save(
            {"ddp": ddp.module.expert_bias, "group": group.expert_bias, "local": local.expert_bias, "loads": loads},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_aux_free_bias_under_ddp_follows_the_global_load(tmp_path):
    mp.spawn(_balance_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    batches = _balance_batches()
    whole = _balance_moe()
    biases = [bias for bias, _ in _run_balance(whole, batches, slice(None))]
    assert whole.expert_bias.abs().max() > 0
    for rank in range(2):
        rows = slice(16 * rank, 16 * (rank + 1))
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # the data differs between the halves, so one half's load alone would move the bias differently
        alone = _balance_moe()
        _run_balance(alone, batches, rows)
        assert not torch.equal(alone.expert_bias, whole.expert_bias)
        # every rank's bias equals the bias of one process that saw the whole batch, after the same steps
        torch.testing.assert_close(got["ddp"], whole.expert_bias, rtol=0, atol=0)
        torch.testing.assert_close(got["group"], whole.expert_bias, rtol=0, atol=0)
        # tokens_per_expert stays this rank's own (ExpertLoad sums the ranks itself): the load of its half under the
        # one-process bias of that step; some experts get no token of a rank's half (the all-reduce still runs)
        probe = _balance_moe().eval()
        for step, (x, bias, load) in enumerate(zip(batches, biases, got["loads"])):
            probe.expert_bias.copy_(bias)
            probe(x[rows])
            assert torch.equal(load, probe.tokens_per_expert), step
        assert any((load == 0).any() for load in got["loads"])
        # balance_group=None: local counts only, as for a pipeline stage without data parallelism
        torch.testing.assert_close(got["local"], alone.expert_bias, rtol=0, atol=0)


def test_balance_group_defaults_to_world_and_rejects_other_values():
    moe = _balance_moe()
    assert moe.balance_group == "world"
    assert set_balance_group(torch.nn.Sequential(moe, torch.nn.Linear(2, 2)), None) == 1
    assert moe.balance_group is None
    with pytest.raises(ValueError, match="set_balance_group"):
        set_balance_group(moe, "data")


def test_aux_free_update_without_torch_distributed_uses_local_counts():
    assert not dist.is_initialized()
    moe = _balance_moe()
    x = _balance_batches()[0]
    moe(x)
    load = moe.tokens_per_expert.double()
    torch.testing.assert_close(moe.expert_bias, (0.05 * torch.sign(load.mean() - load)).float())


@pytest.mark.parametrize("balancing", ["aux_loss", "aux_free"])
def test_balancing_spreads_a_skewed_router(balancing):
    before, after = _train_skewed(balancing)
    _, unbalanced = _train_skewed("none")
    assert before == pytest.approx(4.0)  # all 256 * 2 assignments on 2 of 8 experts
    assert unbalanced > 3.5  # without balancing the collapse stays
    assert after < 2.0, f"{balancing}: max/mean load {before:.2f} -> {after:.2f}"


@pytest.mark.skipif(megablocks_available(), reason="MegaBlocks is installed and CUDA is present")
def test_megablocks_backend_without_megablocks_raises_helpful_error():
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8)
    with pytest.raises(
        (ImportError, RuntimeError), match=r"Do not `pip install megablocks`.*scripts/install_megablocks\.sh"
    ):
        build_moe(cfg, backend="megablocks")
    assert isinstance(build_moe(cfg, backend="auto"), TorchDroplessMoE)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="backend='jax'"):
        build_moe(MoEConfig(hidden_size=8, ffn_hidden_size=8), backend="jax")
    moe = build_moe(MoEConfig(hidden_size=8, ffn_hidden_size=8), backend="torch")
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        moe(torch.randn(3, 7))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"ffn_hidden_size": 2.5}, "ffn_hidden_size"),
        ({"num_experts": 0}, "num_experts"),
        ({"top_k": 9}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"mlp_type": "swiglu"}, "mlp_type"),
        ({"shared_expert_hidden_size": -1}, "shared_expert_hidden_size"),
        ({"balancing": "switch"}, "balancing"),
        ({"aux_loss_weight": -0.1}, "aux_loss_weight"),
        ({"bias_update_rate": float("nan")}, "bias_update_rate"),
        ({"activation": "relu"}, "activation"),
        ({"normalize_expert_weights": 1}, "normalize_expert_weights"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_bad_config_raises_naming_field(overrides, field):
    kwargs = {"hidden_size": 8, "ffn_hidden_size": 8, "num_experts": 8, "top_k": 2, **overrides}
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}=.*pass "):
        MoEConfig(**kwargs)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


@pytest.mark.cuda
@pytest.mark.skipif(not megablocks_available(), reason="needs CUDA and MegaBlocks with grouped_gemm")
@pytest.mark.parametrize("mlp_type", ["mlp", "glu"])
@pytest.mark.parametrize("balancing", ["aux_loss", "aux_free"])
def test_megablocks_matches_torch_backend_on_gpu(mlp_type, balancing):
    torch.manual_seed(0)
    cfg = MoEConfig(
        hidden_size=128,
        ffn_hidden_size=256,
        num_experts=8,
        top_k=2,
        mlp_type=mlp_type,
        shared_expert_hidden_size=128,
        balancing=balancing,
    )
    mb = build_moe(cfg, backend="megablocks", device="cuda", dtype=torch.bfloat16)
    ref = build_moe(cfg, backend="torch", device="cuda", dtype=torch.bfloat16)
    assert type(mb).__name__ == "MegaBlocksMoE" and mb.backend == "megablocks"
    names = {n: tuple(t.shape) for n, t in mb.state_dict().items()}
    assert names == {n: tuple(t.shape) for n, t in ref.state_dict().items()}
    ref.load_state_dict(mb.state_dict(), strict=True)
    x = torch.randn(4, 77, 128, device="cuda", dtype=torch.bfloat16)
    probe = torch.randn_like(x)
    x_mb, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_mb, out_ref = mb(x_mb), ref(x_ref)
    assert torch.equal(mb.tokens_per_expert.cpu(), ref.tokens_per_expert.cpu())
    assert _relative_error(out_mb, out_ref) < 2e-2
    loss_mb, loss_ref = (out_mb.float() * probe).sum(), (out_ref.float() * probe).sum()
    if balancing == "aux_loss":
        assert float(mb.aux_loss) == pytest.approx(float(ref.aux_loss), rel=2e-2)
        loss_mb, loss_ref = loss_mb + moe_aux_loss(mb), loss_ref + moe_aux_loss(ref)
        from megablocks.layers.moe import get_load_balancing_loss

        assert get_load_balancing_loss() == []  # our forward takes its entry out of MegaBlocks' global list
    else:
        torch.testing.assert_close(mb.expert_bias, ref.expert_bias)
    loss_mb.backward()
    loss_ref.backward()
    assert _relative_error(x_mb.grad, x_ref.grad) < 3e-2
    ref_params = dict(ref.named_parameters())
    for name, param in mb.named_parameters():
        assert _relative_error(param.grad, ref_params[name].grad) < 3e-2, name


def test_aux_free_layer_rerun_by_checkpointing_routes_like_its_forward():
    """A forward re-run in backward routes with the bias its original forward used (which has stepped since) and
    records nothing: gradients equal the plain layer's, and the bias stepped once."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    cfg = MoEConfig(
        hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=2, balancing="aux_free", bias_update_rate=0.5
    )
    plain = build_moe(cfg, backend="torch").train()
    checkpointed = copy.deepcopy(plain)
    x = torch.randn(2, 32, 16)
    plain(x).square().sum().backward()
    checkpoint(checkpointed, x, use_reentrant=False).square().sum().backward()
    torch.testing.assert_close(checkpointed.expert_bias, plain.expert_bias, rtol=0, atol=0)
    for (name, a), (_, b) in zip(checkpointed.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7, msg=name)

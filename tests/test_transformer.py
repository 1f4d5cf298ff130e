"""The transformer around memory layers: initialisation, pools, causality, MoE, checkpoint load."""

import math

import pytest
import torch

from memray.model import MemoryConfig, ModelConfig, MoEConfig, Transformer, build_pools


def small_config(**overrides):
    base = dict(
        vocab_size=259,
        dim=32,
        n_layers=4,
        n_heads=2,
        max_seq_len=32,
        memory_layers=[1, 2, 3],
        memory_pools={"shared": [1, 3]},
        memory=MemoryConfig(n_keys=6, heads=2, knn=4, k_dim=8, gate=True, qk_norm=True, query_layernorm=True),
    )
    base.update(overrides)
    return ModelConfig(**base)


@pytest.mark.parametrize("ffn", ["swiglu", "moe"])
def test_meta_device_build_leaves_no_parameter_uninitialised(ffn):
    config = small_config(ffn=ffn)
    with torch.device("meta"):
        model = Transformer(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    with torch.no_grad():  # whatever to_empty left behind must be overwritten
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
    model.init_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{name} left uninitialised"
        else:
            assert (t >= 0).all(), f"{name} left uninitialised"
    reference = Transformer(config)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        # same scheme as an eager build: zero biases stay zero, gains stay one, spreads agree
        if (q == 0).all() or (q == 1).all():
            assert torch.equal(p, q), name
        else:
            assert p.std() > 0, name
    tokens = torch.randint(0, 259, (2, 9))
    assert torch.isfinite(model(tokens)).all()


def test_pools_are_shared_as_configured_and_saved_once():
    model = Transformer(small_config())
    layers = model.memory_layers()
    assert len(layers) == 3
    assert set(model.pools) == {"shared", "layer2"}
    assert layers[0].values is layers[2].values is model.pools["shared"]
    assert layers[1].values is model.pools["layer2"]
    keys = [k for k in model.state_dict() if k.endswith("weight") and "pools" in k]
    assert keys == ["pools.shared.weight", "pools.layer2.weight"]
    assert not any("value_table" in k for k in model.state_dict())
    tokens = torch.randint(0, 259, (2, 9))
    model(tokens).sum().backward()
    assert model.pools["shared"].weight.grad is not None and model.pools["layer2"].weight.grad is not None
    dense_ids = {id(p) for p in model.dense_parameters()}
    assert id(model.pools["shared"].weight) not in dense_ids and id(model.embed.weight) in dense_ids


def test_pools_built_outside_equal_owned_pools_and_stay_unregistered():
    """build_pools then Transformer(pools=...) draws the same numbers as a model that builds its
    own pools (what makes a sharded run start as a single-process one); the pools given are read
    by the layers but are not the model's parameters or state."""
    torch.manual_seed(3)
    owned = Transformer(small_config())
    torch.manual_seed(3)
    pools = build_pools(small_config())
    model = Transformer(small_config(), pools=pools)
    tokens = torch.randint(0, 259, (2, 9))
    torch.testing.assert_close(model(tokens), owned(tokens), rtol=0, atol=0)
    assert model.memory_layers()[0].values is pools["shared"]
    assert not any(k.startswith("pools.") for k in model.state_dict())
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.dense_parameters()}
    model(tokens).sum().backward()
    assert pools["shared"].weight.grad is not None and pools["shared"].weight.grad.is_sparse
    with torch.no_grad():
        pools["layer2"].weight.mul_(2)
    assert not torch.allclose(model(tokens), owned(tokens))
    with pytest.raises(ValueError, match="layer2"):
        Transformer(small_config(), pools={"shared": pools["shared"]})


def test_attention_is_causal():
    model = Transformer(small_config()).eval()
    tokens = torch.randint(0, 259, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 259
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])


def test_moe_routes_top_k_and_reports_balance_loss():
    config = small_config(ffn="moe", memory_layers=[], memory_pools={}, moe=MoEConfig(num_experts=4, top_k=2))
    model = Transformer(config)
    tokens = torch.randint(0, 259, (2, 9))
    logits = model(tokens)
    aux = model.aux_loss()
    assert aux > 0 and torch.isfinite(logits).all()
    (logits.sum() + aux).backward()
    moe = model.blocks[0].ffn
    assert moe.w_gate.grad is not None and moe.router.weight.grad is not None
    # a perfectly balanced router gives the minimum of the Switch loss: 1
    moe.router.weight.data.zero_()
    model(tokens)
    assert math.isclose(moe.aux_loss.item(), 1.0, rel_tol=1e-5)


def test_moe_layer_equals_explicit_expert_mixture():
    from memray.model.moe import MoE

    moe = MoE(8, 12, MoEConfig(num_experts=3, top_k=2))
    x = torch.randn(5, 8)
    probs = torch.softmax(moe.router(x), -1)
    expected = torch.zeros_like(x)
    for t in range(5):
        gate, experts = probs[t].topk(2)
        gate = gate / gate.sum()
        for g, e in zip(gate, experts):
            h = torch.nn.functional.silu(x[t] @ moe.w_gate[e]) * (x[t] @ moe.w_up[e])
            expected[t] += g * (h @ moe.w_down[e])
    torch.testing.assert_close(moe(x), expected)

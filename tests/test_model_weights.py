"""LlamaForCausalLM.load_weights: Hugging Face-named tensors into the model's fused weights (q/k/v, gate/up),
cast to the model's dtype, and a clear error for a checkpoint of another shape."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from forge_batch.models.config import ModelConfig
from forge_batch.models.llama import MATMUL_SOURCES, LlamaForCausalLM

CONFIG = ModelConfig(
    architecture="llama", vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=64,
)


def _checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A float32 state dict by Hugging Face names, of CONFIG's shapes, from a reference model's fused weights."""
    donor = LlamaForCausalLM(CONFIG)
    donor.init_random_weights(seed=seed, std=0.5)
    rows = {"self_attn.q_proj.weight": 48, "self_attn.k_proj.weight": 16, "self_attn.v_proj.weight": 16,
            "mlp.gate_proj.weight": 80, "mlp.up_proj.weight": 80}
    state = {"model.embed_tokens.weight": donor.embed_tokens.clone(), "model.norm.weight": donor.norm.clone() + 1}
    for i, layer in enumerate(donor.layers):
        p = f"model.layers.{i}."
        for name, weight in layer.matmul_weights().items():
            offset = 0
            for part in MATMUL_SOURCES[name]:
                n = rows.get(part, weight.shape[0])
                state[p + part] = weight[offset:offset + n].clone()
                offset += n
        state[p + "input_layernorm.weight"] = torch.full((48,), 1.0 + i)
        state[p + "post_attention_layernorm.weight"] = torch.full((48,), 2.0 + i)
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_weights_fuses_the_parts_in_order_and_casts_them(dtype: torch.dtype) -> None:
    state = _checkpoint()
    model = LlamaForCausalLM(CONFIG, dtype)
    model.load_weights(state)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for name, weight in layer.matmul_weights().items():
            expected = torch.cat([state[p + part] for part in MATMUL_SOURCES[name]]).to(dtype)
            assert weight.dtype == dtype and torch.equal(weight, expected), name
        assert torch.equal(layer.input_norm, state[p + "input_layernorm.weight"].to(dtype))
        assert torch.equal(layer.post_attn_norm, state[p + "post_attention_layernorm.weight"].to(dtype))
    assert torch.equal(model.embed_tokens, state["model.embed_tokens.weight"].to(dtype))
    assert torch.equal(model.norm, state["model.norm.weight"].to(dtype))


def test_a_checkpoint_of_another_shape_is_refused_with_both_shapes() -> None:
    state = _checkpoint()
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(24, 48)
    with pytest.raises(ValueError, match=r"checkpoint \(48, 48\) \+ \(24, 48\) \+ \(16, 48\) vs model \(80, 48\)"):
        LlamaForCausalLM(CONFIG).load_weights(state)
    state = _checkpoint()
    state["model.norm.weight"] = torch.ones(47)
    with pytest.raises(ValueError, match=r"checkpoint \(47,\) vs model \(48,\)"):
        LlamaForCausalLM(CONFIG).load_weights(state)


def test_a_missing_tensor_is_named() -> None:
    state = _checkpoint()
    del state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.0.mlp.up_proj.weight"):
        LlamaForCausalLM(CONFIG).load_weights(state)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("own_head", [True, False])
def test_a_consumed_state_dict_is_emptied_as_the_load_goes_with_the_same_weights(tied: bool, own_head: bool) -> None:
    # the engine's load consumes the loader's tensors so that its buffers go as they are copied
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    state = _checkpoint(seed=1)
    if own_head:
        state["lm_head.weight"] = torch.randn(96, 48)
    kept, consumed = LlamaForCausalLM(config), LlamaForCausalLM(config)
    kept.load_weights(dict(state))
    taken = dict(state)
    consumed.load_weights(taken, consume=True)
    assert taken == ({"lm_head.weight": state["lm_head.weight"]} if own_head and tied else {})
    for (name, a), (_, b) in zip(kept.named_parameters(), consumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    if not tied:
        head = state["lm_head.weight"] if own_head else state["model.embed_tokens.weight"]
        assert torch.equal(consumed.lm_head_weight, head)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_written_into_their_destinations_load_as_copied_ones(tied: bool, dtype: torch.dtype) -> None:
    # a loader that decodes straight into weight_destinations leaves load_weights nothing to copy
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    state = _checkpoint(seed=2)
    if not tied:
        state["lm_head.weight"] = torch.randn(96, 48)
    copied, written = LlamaForCausalLM(config, dtype), LlamaForCausalLM(config, dtype)
    copied.load_weights(dict(state))
    into = written.weight_destinations({name: tuple(t.shape) for name, t in state.items()})
    assert set(into) == set(state)
    params = {p.data_ptr(): (p.data_ptr() + p.numel() * p.element_size()) for p in written.parameters()}
    for name, dst in into.items():  # views of the parameters' rows, in the fused order
        assert dst.dtype == dtype and tuple(dst.shape) == tuple(state[name].shape) and dst.is_contiguous(), name
        assert any(lo <= dst.data_ptr() < hi for lo, hi in params.items()), name
        dst.copy_(state[name])
    layer = written.layers[1]
    assert into["model.layers.1.self_attn.k_proj.weight"].data_ptr() == layer.qkv_weight[48].data_ptr()
    assert into["model.layers.1.mlp.up_proj.weight"].data_ptr() == layer.gate_up_weight[80].data_ptr()

    copies = []
    real_copy = torch.Tensor.copy_
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "copy_", lambda self, src, *a: copies.append(src.shape) or real_copy(self, src, *a))
        written.load_weights(dict(into), consume=True)
    assert copies == []  # every tensor was its destination already
    for (name, a), (_, b) in zip(copied.named_parameters(), written.named_parameters(), strict=True):
        assert torch.equal(a, b), name

    partial = dict(state)  # some written in place, the others copied as before
    fresh = LlamaForCausalLM(config, dtype)
    for name, dst in fresh.weight_destinations({n: tuple(t.shape) for n, t in state.items()}).items():
        if "mlp" in name:
            dst.copy_(state[name])
            partial[name] = dst
    fresh.load_weights(partial)
    for (name, a), (_, b) in zip(copied.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_slot_of_other_shapes_gets_no_destinations() -> None:
    # load_weights, not a half-written parameter, reports a checkpoint of another shape
    shapes = {name: tuple(t.shape) for name, t in _checkpoint().items()}
    shapes["model.layers.0.self_attn.k_proj.weight"] = (24, 48)
    shapes["model.layers.1.mlp.down_proj.weight"] = (48, 81)
    del shapes["model.layers.1.mlp.up_proj.weight"]
    into = LlamaForCausalLM(CONFIG).weight_destinations(shapes)
    for gone in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.gate_proj.weight"):
        assert gone not in into
    assert "model.layers.1.self_attn.q_proj.weight" in into and "model.layers.0.mlp.up_proj.weight" in into

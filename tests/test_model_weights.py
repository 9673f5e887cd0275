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

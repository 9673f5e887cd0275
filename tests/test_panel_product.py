"""The panel product (kernels/cpu/panel_product.py): a few bfloat16 rows times a weight read from its GGUF
blocks, with the bits oneDNN's bfloat16 GEMM gives the same rows inside a batch (float32 rows: the bits of
MKL's packed GEMM); and the batch-invariant engine using it for small steps without changing a bit of any
logit."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_batch_invariance import generate_runs
from test_weight_gemv import _stored, _write_gguf

from forge_batch.engine import cpu_backend
from forge_batch.engine.llm import LLM
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.kernels.cpu import mkl_packed, onednn_packed
from forge_batch.kernels.cpu import panel_product as pp
from forge_batch.kernels.cpu.linear import MklPackedLinear, MklPanelLinear, OneDnnLinear, PanelLinear

needs_bf16 = pytest.mark.skipif(not (pp.available_here() and onednn_packed.available()),
                                reason="no AVX512-BF16 panel product or no oneDNN bfloat16 path on this CPU")
needs_f32 = pytest.mark.skipif(not (pp.available_here(torch.float32) and mkl_packed.available()),
                               reason="no AVX-512 float32 panel product or no MKL packed GEMM here")
needs_f32_onednn = pytest.mark.skipif(not (pp.available_here(torch.float32) and onednn_packed.available(torch.float32)),
                                      reason="no AVX-512 float32 panel product or no oneDNN float32 path here")
# the engine's products with panels, and without (the packed GEMM alone), per dtype: a float32 engine takes
# oneDNN on AMD CPUs, else MKL
PANEL_FORMS = {"bfloat16": (PanelLinear, OneDnnLinear), "float32": (
    (PanelLinear, OneDnnLinear) if onednn_packed.float32_preferred() else (MklPanelLinear, MklPackedLinear))}

FORMATS = ["Q4_1", "Q8_0"]


def _weight(fmt: str, n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    stored, dense = _stored(fmt, w)
    return stored, dense.bfloat16()  # the model's weight: the loader's float32 values rounded to bfloat16


def _heavy_tailed(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=g) * torch.exp(2 * torch.randn(rows, k, generator=g))).bfloat16()


def _built_for_avx512() -> bool:
    # the kernels are compiled with -march=native: AVX-512F picks the AVX-512 panel layout
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and " avx512f" in line for line in f)


def _panels_by_hand(stored, avx512: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The panels' bytes and float16 scales (see csrc/panel_product.c), from the layout's description: per
    group of 16 columns and pair of k, Q4_1 one byte per column (AVX2: k low, k + 1 high) or per two columns
    (AVX-512: column j low, j + 8 high, k then k + 1); Q8_0 the 32 int8 values, columns 0-7 then 8-15 (AVX2: all
    at k, then all at k + 1; AVX-512: k and k + 1 side by side)."""
    n, k = stored.rows, stored.cols
    blocks = stored.values.reshape(n, k // 32, -1)
    if stored.fmt == "Q4_1":  # element e of a block: byte e's low nibble below 16, else byte e - 16's high one
        values = torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, k)
    else:
        values = blocks.reshape(n, k)
    v = values.reshape(n // 16, 2, 8, k // 2, 2)  # [group, column // 8, column % 8, pair, k or k + 1]
    if stored.fmt == "Q4_1":
        if avx512:
            panel = v[:, 0] | (v[:, 1] << 4)  # [group, column % 8, pair, t]
            panel = panel.permute(0, 2, 1, 3)
        else:
            panel = (v[..., 0] | (v[..., 1] << 4)).reshape(n // 16, 16, k // 2).permute(0, 2, 1)
    else:
        panel = v.permute(0, 3, 1, 2, 4) if avx512 else v.permute(0, 3, 1, 4, 2)
    scales = stored.scales.reshape(n // 16, 16, k // 32).permute(0, 2, 1).half()
    return panel.reshape(-1), scales.reshape(-1)


@pytest.mark.skipif(not pp.available_here(torch.float32), reason="no SIMD panel product on this CPU")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (64, 576), (32, 1536)])
def test_repack_lays_the_blocks_out_as_the_layout_says(fmt, shape):
    stored, _ = _weight(fmt, *shape)
    panel = pp.PanelWeight.from_stored(stored, 512)
    values, scales = _panels_by_hand(stored, _built_for_avx512())
    assert torch.equal(panel.values, values)
    assert torch.equal(panel.scales, scales)
    if fmt == "Q4_1":
        mins = stored.mins.reshape(shape[0] // 16, 16, -1).permute(0, 2, 1).half().reshape(-1)
        assert torch.equal(panel.mins, mins)


@needs_bf16
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k_block", [64, 512])
def test_panel_product_equals_the_bfloat16_weight_times_the_rows(fmt, k_block):
    """Layout and decoding: each output within a few float32 roundings of the float64 product of the rows
    and the bfloat16 weight (a wrong column, pair or scale would be far off)."""
    stored, weight = _weight(fmt, 48, 576)
    panel = pp.PanelWeight.from_stored(stored, k_block)
    for rows in range(1, pp.PANEL_MAX_ROWS + 2):  # one more than a call takes: two calls
        x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)).bfloat16()
        expected = x.double() @ weight.double().T
        torch.testing.assert_close(pp.panel_product(x, panel).double(), expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_bf16),
                                   pytest.param(torch.float32, marks=needs_f32_onednn)], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(96, 576), (64, 1536), (48, 96)])
def test_panel_product_gives_onednns_bits_for_rows_inside_a_batch(fmt, shape, dtype):
    """The order found on the probe rows holds on other rows: rows 1..4 at a time, heavy-tailed, equal to
    the same rows inside a 64-row oneDNN product bit for bit (bfloat16, and float32: the float32 engine's
    product where torch has oneDNN's float32 path)."""
    n, k = shape
    stored, weight = _weight(fmt, n, k, seed=n + k)
    if dtype == torch.float32:  # the float32 model's weight: the loader's values, not rounded to bfloat16
        stored, weight = _stored(fmt, torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05)
    packed = onednn_packed.pack(weight)
    panel = pp.match_onednn(stored, packed)
    if panel is None:
        pytest.skip("oneDNN sums in an order none of the candidates reproduces on this CPU (e.g. AMX)")
    x = _heavy_tailed(64, k, seed=7).to(dtype)
    batch = onednn_packed.linear(x, packed)
    for rows in range(1, pp.PANEL_MAX_ROWS + 1):
        for start in range(0, 64 - rows, 9):
            assert torch.equal(pp.panel_product(x[start:start + rows], panel), batch[start:start + rows])


@needs_f32
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(96, 576), (64, 1536), (48, 96)])
def test_float32_panel_product_gives_mkls_bits_for_rows_inside_a_batch(fmt, shape):
    """Float32 rows 1..4 at a time, heavy-tailed, equal to the same rows inside a 64-row product of MKL's packed
    GEMM (the batch-invariant float32 engine's) bit for bit, from the panels of the 4/8-bit blocks."""
    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05
    stored, weight = _stored(fmt, w)  # weight: the loader's float32 values, the float32 model's weight
    packed = mkl_packed.pack(weight)
    panel = pp.match_mkl(stored, packed)
    if panel is None:
        pytest.skip("MKL sums in an order none of the candidates reproduces on this CPU")
    x = _heavy_tailed(64, k, seed=7).float() * torch.exp(torch.randn(64, k, generator=torch.Generator().manual_seed(1)))
    batch = mkl_packed.linear(x, packed)
    for rows in range(1, pp.PANEL_MAX_ROWS + 1):
        for start in range(0, 64 - rows, 9):
            assert torch.equal(pp.panel_product(x[start:start + rows], panel), batch[start:start + rows])
    # a weight that is not the packed one is refused whatever the order
    other, _ = _stored(fmt, torch.randn(n, k, generator=torch.Generator().manual_seed(99)) * 0.05)
    assert pp.match_mkl(other, packed, (panel.k_block,)) is None


@needs_bf16
def test_match_refuses_an_order_that_is_not_onednns():
    """A sequential sum over all of k=1536 differs from oneDNN's blocked one somewhere on the probe rows, so
    the weight keeps oneDNN rather than a product with other bits."""
    stored, weight = _weight("Q4_1", 64, 1536, seed=3)
    packed = onednn_packed.pack(weight)
    found = pp.match_onednn(stored, packed)
    if found is None or found.k_block >= 1536:
        pytest.skip("oneDNN sums k=1536 in one block here: no wrong order to refuse")
    assert pp.match_onednn(stored, packed, (1536 * 2,)) is None
    # and a weight that is not the packed one is refused whatever the order
    other, _ = _weight("Q4_1", 64, 1536, seed=4)
    assert pp.match_onednn(other, packed, (found.k_block,)) is None


def _tiny_q4_model(tmp_path):
    types = {"token_embd.weight": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_1, "attn_v": Q.Q4_1,
             "attn_output": Q.Q4_1, "ffn_gate": Q.Q4_1, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_1,
             "output.weight": Q.Q8_0}
    return str(_write_gguf(tmp_path, types))


PROMPTS = [{"prompt_token_ids": ids} for ids in [
    [258, 104, 101, 108], [258, 5, 6, 7, 8, 9, 10], [258, 40, 41], [258, 77, 78, 79, 80, 81],
    [258, 11, 12, 13, 14, 15, 16, 17, 18], [258, 200]]]


@pytest.mark.parametrize("dtype", [pytest.param("bfloat16", marks=needs_bf16), pytest.param("float32", marks=needs_f32)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_engine_panels_change_no_bit_of_any_logit(tmp_path, monkeypatch, temperature, dtype):
    """A 4-bit GGUF model, batch-invariant: its few-row steps run panel products (decode steps of up to 4 rows
    in one C call), and every position's logits have the same bits as an engine without panels (the packed
    GEMM, oneDNN's or MKL's, and the layer-by-layer path), alone or all together."""
    path = _tiny_q4_model(tmp_path)
    panel_form, packed_form = PANEL_FORMS[dtype]
    with_panels = LLM(path, device="cpu", dtype=dtype, batch_invariant=True)
    layer = with_panels.model.layers[0]
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    if not any(isinstance(getattr(layer, name), panel_form) for name in names):
        pytest.skip(f"the {dtype} GEMM library sums in an order no panel candidate reproduces on this CPU (e.g. AMX)")
    assert all(isinstance(getattr(layer, name), panel_form) for name in names)
    one_call = with_panels.runner.cpu_decode
    assert one_call is not None and one_call.max_rows == pp.PANEL_MAX_ROWS  # decode steps of <= 4 rows: one C call
    steps = []
    real_step = one_call.step
    monkeypatch.setattr(one_call, "step", lambda *a: steps.append(a[0].shape[0]) or real_step(*a))
    calls = []
    real = pp.panel_product
    monkeypatch.setattr(pp, "panel_product", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    together = generate_runs(with_panels, PROMPTS, 12, temperature)
    alone = [r for i, p in enumerate(PROMPTS) for r in generate_runs(with_panels, [p], 12, temperature, first=i)]
    assert calls and max(calls) <= pp.PANEL_MAX_ROWS
    assert steps.count(1) >= 11 * len(PROMPTS) and max(steps) <= pp.PANEL_MAX_ROWS

    monkeypatch.setattr(pp, "available_here", lambda dtype=None: False)
    without = LLM(path, device="cpu", dtype=dtype, batch_invariant=True)
    assert isinstance(without.model.layers[0].qkv_proj, packed_form)
    assert not isinstance(without.model.layers[0].qkv_proj, panel_form) and without.runner.cpu_decode is None
    reference = generate_runs(without, PROMPTS, 12, temperature)
    assert together == reference and alone == reference


@needs_bf16
def test_engine_remembers_each_shapes_order_and_then_checks_weights_on_a_few_rows(tmp_path, monkeypatch):
    """The first load on a machine probes each weight shape's order with hundreds of rows and writes it down;
    the next load checks every weight on PANEL_MAX_ROWS rows only, and its panels are the same."""
    orders = tmp_path / "orders.json"
    monkeypatch.setattr(pp, "_orders_path", lambda: orders)
    probes = []  # rows of each probe that found panels
    real = pp.match_onednn

    def match(stored, packed, k_blocks=pp.K_BLOCKS, probe=None):
        panel = real(stored, packed, k_blocks, probe)
        if panel is not None:
            probes.append(probe or pp.probe_row_count(stored.rows))
        return panel

    monkeypatch.setattr(pp, "match_onednn", match)
    path = _tiny_q4_model(tmp_path)
    first = LLM(path, device="cpu", dtype="bfloat16")
    matmuls = [m for layer in first.model.layers
               for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)] + [first.model.lm_head]
    shapes = {f"{m.panel.n}x{m.panel.k}": m.panel.k_block for m in matmuls if isinstance(m, PanelLinear)}
    assert pp.remembered_k_blocks() == shapes
    assert sum(p > pp.PANEL_MAX_ROWS for p in probes) == len(shapes)  # one full probe per shape
    probes.clear()
    second = LLM(path, device="cpu", dtype="bfloat16")
    assert probes and max(probes) == pp.PANEL_MAX_ROWS
    assert second.model.layers[1].down_proj.panel.k_block == first.model.layers[1].down_proj.panel.k_block


@needs_bf16
def test_a_shape_no_order_reproduces_is_remembered_and_keeps_onednn(tmp_path, monkeypatch):
    """Where oneDNN sums in an order no candidate reproduces (an AMX machine), every weight keeps oneDNN, the
    engine still gives the same bits, and the next load does not probe again."""
    orders = tmp_path / "orders.json"
    monkeypatch.setattr(pp, "_orders_path", lambda: orders)
    monkeypatch.setattr(pp, "K_BLOCKS", (32,))  # tiny models' k <= 96: blocks of 32 are not oneDNN's sums
    real = pp.match_onednn
    calls = []
    monkeypatch.setattr(pp, "match_onednn", lambda s, p, k_blocks=(32,), probe=None: calls.append(1) or real(
        s, p, k_blocks, probe))
    path = _tiny_q4_model(tmp_path)
    llm = LLM(path, device="cpu", dtype="bfloat16")
    assert not any(isinstance(getattr(layer, name), PanelLinear) for layer in llm.model.layers
                   for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    assert llm.runner.cpu_decode is None
    assert set(pp.remembered_k_blocks().values()) == {pp.NO_ORDER}
    calls.clear()
    again = LLM(path, device="cpu", dtype="bfloat16")
    assert calls == []
    assert generate_runs(again, PROMPTS[:2], 6) == generate_runs(llm, PROMPTS[:2], 6)


@needs_f32_onednn
def test_without_batch_invariance_a_cpu_without_simd_weight_gemv_takes_the_panels(tmp_path, monkeypatch):
    """Where weight_gemv has no SIMD path (AVX2 without AVX-512), a float32 engine without batch invariance
    reads its 4/8-bit blocks through the panel products for steps of up to 4 rows, its decode steps in one C
    call, rather than the library's product on the float32 weights: the same greedy tokens."""
    monkeypatch.setattr(cpu_backend, "weight_gemv_fast", lambda: False)
    path = _tiny_q4_model(tmp_path)
    panel_form, packed_form = PANEL_FORMS["float32"]
    if not isinstance(LLM(path, device="cpu", dtype="float32").model.layers[0].qkv_proj, panel_form):
        pytest.skip("the float32 GEMM library sums in an order no panel candidate reproduces on this CPU")
    llm = LLM(path, device="cpu", dtype="float32", batch_invariant=False)
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert all(isinstance(getattr(layer, name), panel_form) for layer in llm.model.layers for name in names)
    assert not llm.model.layers[0].qkv_proj.batch_invariant  # larger steps: the library as it is
    one_call = llm.runner.cpu_decode
    assert one_call is not None
    steps = []
    real_step = one_call.step
    monkeypatch.setattr(one_call, "step", lambda *a: steps.append(a[0].shape[0]) or real_step(*a))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def alone(engine: LLM) -> list[list[int]]:
        return [list(engine.generate([p], params)[0].token_ids) for p in PROMPTS]

    got = alone(llm)
    assert steps.count(1) == 11 * len(PROMPTS)  # every one-row decode step in one C call over the panels

    monkeypatch.setattr(pp, "available_here", lambda dtype=None: False)
    without = LLM(path, device="cpu", dtype="float32", batch_invariant=False)
    assert isinstance(without.model.layers[0].qkv_proj, packed_form) and without.runner.cpu_decode is None
    assert got == alone(without)

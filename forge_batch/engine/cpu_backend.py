"""The CPU's fast paths for a Llama-family model, kept out of the model: weight preparation and the
one-call decode step.

``CpuBackend.prepare_weights`` puts faster forms of the model's matmul weights in place of the plain
``kernels.Linear`` ones (kernels/cpu/linear.py), all computing F.linear's numbers except int8:

- packed for the GEMM library: oneDNN's layout (bfloat16, and float32 on AMD CPUs, where MKL runs AVX2
  code and oneDNN is twice as fast), else MKL's for float32 (10-40% faster products);
- with quantization="int8", the decoder's matmuls as W8A8 int8 (the LM head stays packed float32);
- for steps of a few rows, the checkpoint's own storage format when it is smaller (a 4-bit GGUF,
  bfloat16 safetensors): the same products from a fraction of the bytes (``weight_gemv``).

A packed or int8 form computes from its own copy of the weight, so the plain tensor is freed as soon as the
form exists (``release_plain_weight``; a ``FreedWeight`` keeps its shape and dtype): each weight is held once.

With ``batch_invariant`` (the default) a row's numbers must not depend on how many rows share its step,
so each matmul computes a row's sums one way for every row count: no ``weight_gemv`` stored forms (they sum
in their own order, so a few-row step would differ from a larger one); oneDNN's product (bfloat16, and
float32 on AMD CPUs) pads a single row to two (its one-row kernel sums some rows in another order);
MKL's float32 GEMM (or F.linear) pads the rows up to a multiple of 4 (``INVARIANT_ROW_MULTIPLE``). Where the
checkpoint stores a weight as 4/8-bit blocks, steps of a few rows read those blocks instead with the
library's bits (``PanelLinear`` with oneDNN's, ``MklPanelLinear`` with MKL's: kernels/cpu/panel_product.py
checks the bits per weight), and the one-call decode step runs over those panels. Without batch invariance a
CPU whose ``weight_gemv`` lacks its SIMD path (AVX2 without AVX-512) takes the panels too: they are its fast
few-row product.

``CpuBackend.decode_step`` builds, for one KV cache, the C decode step that runs a whole few-row decode
step in one call (kernels/cpu/decode_step.py); the engine's model runner calls it where the layer-by-layer
model would run, as it replays CUDA graphs on a GPU.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from forge_batch.kernels import KernelBackend, Linear
from forge_batch.kernels.cpu import build, mkl_packed, onednn_packed, panel_product
from forge_batch.kernels.cpu.decode_step import DecodeLayerWeights, DecodeStep
from forge_batch.kernels.cpu.linear import (
    Int8Linear,
    MklPackedLinear,
    MklPanelLinear,
    OneDnnLinear,
    PaddedLinear,
    PanelLinear,
    StoredLinear,
)
from forge_batch.kernels.cpu.panel_decode_step import PanelDecodeStep, PanelLayerWeights
from forge_batch.kernels.cpu.stored import (
    WEIGHT_FORMATS,
    StoredWeight,
    weight_gemv_fast,
)
from forge_batch.kernels.linear import FreedWeight
from forge_batch.models.llama import MATMUL_SOURCES, AttentionMetadata, LlamaForCausalLM, matmul_slots
from forge_batch.models.raw_weights import RawWeight


@dataclass
class PreparedWeights:
    """What ``prepare_weights`` did: whether the matmuls are packed for the GEMM library, how many are
    kept in stored form, whether the decoder's are int8, and which library computes the matmuls ("onednn",
    "mkl", or "torch": F.linear's own choice), as the engine's identity names it."""

    packed: bool = False
    stored: int = 0
    int8: bool = False
    matmul: str = "torch"


def _stored_forms(model: LlamaForCausalLM, raw: dict[str, RawWeight], layers: bool = True,
                  ) -> Iterator[tuple[nn.Module, str, Linear, StoredWeight]]:
    """(owner, attribute, matmul, its weight in the checkpoint's storage format) for each of the model's
    matmuls stored in a format weight_gemv reads; fused weights (Q/K/V, gate/up) where their parts share a
    format. Consumes ``raw``: each tensor's bytes go as soon as they are converted."""

    def stored(name: str) -> StoredWeight | None:
        r = raw.pop(name, None)
        return None if r is None or r.fmt not in WEIGHT_FORMATS else StoredWeight.from_blocks(
            r.fmt, r.data, r.rows, r.cols)

    for owner, name, sources in matmul_slots(model, layers):
        parts = [stored(s) for s in sources]
        if any(p is None for p in parts):
            continue
        s = parts[0] if len(parts) == 1 else StoredWeight.concat(parts)  # type: ignore[arg-type]
        linear = getattr(owner, name)
        if s is not None and (s.rows, s.cols) == tuple(linear.weight.shape):
            yield owner, name, linear, s


def release_plain_weight(model: LlamaForCausalLM, owner: nn.Module, name: str) -> bool:
    """Free the plain tensor of ``owner``'s matmul ``name`` if no product reads it any more
    (``Linear.reads_weight``: its packed or int8 form holds the numbers), which would otherwise sit in memory
    twice. It becomes a ``FreedWeight`` (its shape and dtype) in the model's place and the product's, so a path
    that still read it would fail loudly. The LM head's stays while the embedding shares it. Returns whether it
    freed it; ``prepare_weights`` then asks the C library to hand the memory back."""
    form = getattr(owner, name)
    weight = form.weight
    if form.reads_weight or isinstance(weight, FreedWeight) or weight is model.embed_tokens:
        return False
    freed = FreedWeight(weight.shape, weight.dtype)
    for attribute, param in list(owner.named_parameters(recurse=False)):
        if param is weight:
            delattr(owner, attribute)  # a parameter no more: an attribute holding its description
            setattr(owner, attribute, freed)
    form.weight = freed  # (the stored and panel forms, made later, take it from here)
    return True


def _return_freed_memory() -> None:
    # glibc keeps freed heap memory for reuse, and the weights sit on the heap (below its mmap threshold once
    # the loader's large buffers were freed): without a trim they would stay in the process's RSS
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class CpuBackend:
    """The CPU's fast paths for one engine: float32 or bfloat16 models (other dtypes run as they are)."""

    def __init__(self, kernels: KernelBackend, dtype: torch.dtype, quantization: str | None = None,
                 batch_invariant: bool = True) -> None:
        self.kernels = kernels
        self.dtype = dtype
        self.quantization = quantization
        self.batch_invariant = batch_invariant
        if self.keeps_stored_weights:
            build.build_in_background()  # a first run on a machine compiles while the weights load
        if quantization == "int8" and not build.available():
            raise ValueError("quantization='int8' needs the compiled CPU kernels (a C compiler)")

    @property
    def keeps_stored_weights(self) -> bool:
        """Whether the model's checkpoint formats are worth loading (``prepare_weights(..., raw)``): for the
        few-row products (panel products in batch-invariant mode, see the module docstring)."""
        return self.dtype in (torch.float32, torch.bfloat16)

    @torch.inference_mode()
    def prepare_weights(self, model: LlamaForCausalLM, raw: dict[str, RawWeight] | None = None) -> PreparedWeights:
        """Put the faster forms of the model's matmul weights in place (see the module docstring).
        ``raw``: the checkpoint's weights as stored, from ``load_model_files(..., stored_weights=...)``."""
        int8 = self.quantization == "int8"
        if int8:
            for owner, name, _ in matmul_slots(model)[:-1]:
                setattr(owner, name, Int8Linear(getattr(owner, name)))
                release_plain_weight(model, owner, name)  # one at a time: the model is held about once
        packed = self.pack(model, layers=not int8)
        if raw and not self.batch_invariant and weight_gemv_fast():
            stored = self.keep_stored(model, raw, layers=not int8)
        else:
            # batch-invariant, or weight_gemv without its SIMD path here (slower than the library): the panel
            # products, where this CPU has them, are the fast few-row steps either way
            stored = self.keep_panels(model, raw) if raw and not int8 else 0
        _return_freed_memory()  # pack (and the int8 forms) freed the plain weights as it went
        return PreparedWeights(packed=packed, stored=stored, int8=int8, matmul=self.matmul_library())

    def matmul_library(self) -> str:
        """Which GEMM library computes this engine's matmuls (``pack`` uses the same test): "onednn" (its
        reordered weights), "mkl" (its packed float32 GEMM) or "torch" (F.linear's own choice)."""
        if (self.dtype == torch.bfloat16 and onednn_packed.available()) or (
                self.dtype == torch.float32 and onednn_packed.float32_preferred()):
            return "onednn"
        if self.dtype == torch.float32 and mkl_packed.available():
            return "mkl"
        return "torch"

    def pack(self, model: LlamaForCausalLM, layers: bool = True) -> bool:
        """Pack the matmul weights for the GEMM library (MKL float32, oneDNN bfloat16): the LM head's, and
        the decoder layers' unless ``layers`` is False. Returns whether packing applies here. In
        batch-invariant mode products without MKL's or oneDNN's packed forms become ``PaddedLinear``."""
        form: Callable[[Linear], Linear]
        library = self.matmul_library()
        if library == "onednn":
            def form(base: Linear) -> Linear:
                return OneDnnLinear(base, batch_invariant=self.batch_invariant)
        elif library == "mkl":
            def form(base: Linear) -> Linear:
                return MklPackedLinear(base, batch_invariant=self.batch_invariant)
        elif self.batch_invariant and self.dtype in (torch.float32, torch.bfloat16):
            form = PaddedLinear
        else:
            return False
        for owner, name, _ in matmul_slots(model, layers):
            setattr(owner, name, form(getattr(owner, name)))
            release_plain_weight(model, owner, name)  # the next weight's packed form reuses its memory
        return form is not PaddedLinear

    def keep_stored(self, model: LlamaForCausalLM, raw: dict[str, RawWeight] | None, layers: bool = True) -> int:
        """Keep the matmul weights also in their checkpoint's storage format, for steps of a few rows. Fused
        weights (Q/K/V, gate/up) are kept when their parts share a format; ``layers=False`` keeps only the
        LM head's. Consumes ``raw``; returns how many of the model's matmuls are kept."""
        if not raw or not self.keeps_stored_weights:
            return 0
        kept = 0
        for owner, name, linear, s in _stored_forms(model, raw, layers):
            setattr(owner, name, StoredLinear(linear, s))
            kept += 1
        return kept

    def keep_panels(self, model: LlamaForCausalLM, raw: dict[str, RawWeight]) -> int:
        """Give each packed product whose checkpoint stores 4/8-bit blocks a panel product
        with the GEMM library's bits for steps of a few rows (``PanelLinear`` with oneDNN's, ``MklPanelLinear``
        with MKL's float32 ones). Consumes ``raw``; returns how many products got one."""
        if not panel_product.available_here(self.dtype):
            raw.clear()
            return 0
        kept = 0
        # the library's order is the shape's: found once (or remembered from an earlier load), checked per weight
        k_blocks = panel_product.remembered_k_blocks()
        found: dict[str, int] = {}
        dtype = "" if self.dtype == torch.bfloat16 else "float32:"  # orders are remembered per library and dtype
        for owner, name, linear, s in _stored_forms(model, raw):
            if linear.bias is not None:
                continue
            if isinstance(linear, OneDnnLinear):
                match, form, shape = panel_product.match_onednn, PanelLinear, f"{dtype}{s.rows}x{s.cols}"
            elif isinstance(linear, MklPackedLinear):
                match, form, shape = panel_product.match_mkl, MklPanelLinear, f"mkl-float32:{s.rows}x{s.cols}"
            else:
                continue
            known = k_blocks.get(shape)
            if known == panel_product.NO_ORDER or not panel_product.PanelWeight.supports(s):
                continue  # no candidate reproduces the library for this shape here (e.g. AMX): it keeps it
            panel = None
            if known:
                panel = match(s, linear.packed, (known,), probe=panel_product.PANEL_MAX_ROWS)
            if panel is None:  # a new shape (or a remembered order that no longer holds): the full probe
                panel = match(s, linear.packed)
                k_blocks[shape] = found[shape] = panel_product.NO_ORDER if panel is None else panel.k_block
            if panel is not None:
                setattr(owner, name, form(linear, panel))
                kept += 1
        if found:
            panel_product.remember_k_blocks(found)
        return kept

    def decode_step(self, model: LlamaForCausalLM,
                    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> CpuDecodeStep | None:
        """The one-call decode step over these KV caches, or None where it cannot run: a layer's matmuls not
        all kept in stored form (batch-invariant: not all with panels), a KV cache it does not read, a kernel
        backend other than ``auto``."""
        if not self.kernels.uses_cpu_kernels or not self.keeps_stored_weights:
            return None
        if self.batch_invariant and self.dtype == torch.bfloat16:
            return self._panel_decode_step(model, kv_caches)
        # stored weights (weight_gemv's order), or in a float32 model panels (the library's bits; see prepare_weights)
        form: tuple[type, ...]
        panels = isinstance(model.layers[0].qkv_proj, (PanelLinear, MklPanelLinear))
        form, weight_of = ((PanelLinear, MklPanelLinear), "panel") if panels else ((StoredLinear,), "stored")
        layers = []
        for layer, (k_cache, v_cache) in zip(model.layers, kv_caches):
            matmuls = [getattr(layer, name) for name in MATMUL_SOURCES]
            if not all(isinstance(m, form) for m in matmuls):
                return None
            bias = None if layer.qkv_bias is None else layer.qkv_bias.float()  # copies in a bf16 model
            lw = DecodeLayerWeights(layer.input_norm.float(), layer.post_attn_norm.float(), bias,
                                    *(getattr(m, weight_of) for m in matmuls), k_cache, v_cache)
            if not DecodeStep.supports(lw):
                return None
            layers.append(lw)
        first = model.layers[0]
        step = DecodeStep(layers, model.norm.float(), model.config.rms_norm_eps, model.cos_sin_cache,
                          first.num_heads, first.num_kv_heads, first.head_dim, model.config.intermediate_size,
                          kv_caches[0][0].shape[1], first.scale)
        return CpuDecodeStep(model, step, step.max_rows, torch.float32)

    @staticmethod
    def _panel_decode_step(model: LlamaForCausalLM,
                           kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> CpuDecodeStep | None:
        """The batch-invariant one-call step: every layer's matmuls with panels, bfloat16 throughout."""
        layers = []
        for layer, (k_cache, v_cache) in zip(model.layers, kv_caches):
            matmuls = [getattr(layer, name) for name in MATMUL_SOURCES]
            if not all(isinstance(m, PanelLinear) for m in matmuls):
                return None
            lw = PanelLayerWeights(layer.input_norm, layer.post_attn_norm, *(m.panel for m in matmuls),
                                   k_cache, v_cache)
            if not PanelDecodeStep.supports(lw):
                return None
            layers.append(lw)
        first = model.layers[0]
        step = PanelDecodeStep(layers, model.norm, model.config.rms_norm_eps, model.cos_sin_cache, first.num_heads,
                               first.num_kv_heads, first.head_dim, model.config.intermediate_size,
                               kv_caches[0][0].shape[1], first.scale)
        return CpuDecodeStep(model, step, PanelDecodeStep.max_rows, torch.bfloat16)


class CpuDecodeStep:
    """A decode step of up to ``max_rows`` sequences in one C call, for one model and KV cache: the same
    hidden states and KV-cache writes as the model's layer-by-layer path, bit for bit."""

    def __init__(self, model: LlamaForCausalLM, step: DecodeStep | PanelDecodeStep, max_rows: int,
                 dtype: torch.dtype) -> None:
        self.model = model
        self.step = step
        self.max_rows = max_rows
        self.dtype = dtype  # of the embeddings the step takes and the hidden states it returns

    def can_run(self, num_tokens: int, attn: AttentionMetadata) -> bool:
        """Whether it takes this step: one new token per sequence, few enough sequences."""
        return attn.max_query_len == 1 and num_tokens <= self.max_rows

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [T, hidden] (float32 from the stored-weight step also in a bfloat16 model: its
        LM head casts them)."""
        hidden = self.model.embed(input_ids).to(self.dtype).contiguous()
        return self.step(hidden, positions, attn.slot_mapping, attn.block_tables, attn.context_lens)

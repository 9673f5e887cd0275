"""One tokenizer type for every model source: a ``tokenizers.Tokenizer`` plus the facts around it
(BOS/EOS, chat template) that live in different files for GGUF and Hugging Face directories.

GGUF files carry no ``tokenizer.json``; we rebuild one from the metadata (vocab, merges, token
types, pre-tokenizer name) so the engine, the chat template path and the grammar engine
(llguidance, which reads ``to_json_str()``) all see the same thing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from .chat_template import render_chat_template

logger = logging.getLogger(__name__)

# Token texts that end a turn or a document. llama.cpp treats these as end-of-generation whatever
# the metadata's single eos id says (SmolLM2's GGUF says eos=2 <|im_end|>, but a base-model-style
# <|endoftext|> must stop generation too; Llama 3 chat turns end with <|eot_id|>, not eos).
END_OF_GENERATION_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "</s>",
    "<end_of_turn>", "<|end_of_text|>", "<EOT>",
)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes, keyed by GGUF ``tokenizer.ggml.pre``. These are the regexes of the
# models' original tokenizer.json files (llama.cpp's table in llama-vocab.cpp maps the same names).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

class _PreTokenizer(NamedTuple):
    """How a byte-level vocabulary splits text before BPE (per GGUF ``tokenizer.ggml.pre``)."""

    splits: tuple[str, ...] = ()  # regexes applied (isolated) before the byte-level step
    gpt2_regex: bool = True  # ByteLevel also applies GPT-2's own split
    ignore_merges: bool = False  # a whole pre-token found in the vocab is used as is (Llama 3)
    nfc: bool = False  # NFC-normalise first (Qwen2's tokenizer.json does)
    add_bos: bool = False  # llama.cpp's BOS default when the file has no add_bos_token key


_GPT2 = _PreTokenizer()
_DIGITS_THEN_GPT2 = _PreTokenizer(splits=(r"\p{N}",))  # StarCoder-style: every digit alone
_LLAMA3 = _PreTokenizer(splits=(_LLAMA3_SPLIT,), gpt2_regex=False, ignore_merges=True, add_bos=True)
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion", "exaone4"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer(splits=(_LLAMA3_SPLIT,), gpt2_regex=False)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"),
                    _PreTokenizer(splits=(_QWEN2_SPLIT,), gpt2_regex=False, nfc=True)),
    "tekken": _PreTokenizer(splits=(_TEKKEN_SPLIT,), gpt2_regex=False, ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _PreTokenizer(splits=(_GPT4O_SPLIT,), gpt2_regex=False)),
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    ``encode(text)`` adds BOS/EOS exactly when the model's own tokenizer config says to
    (``add_special_tokens=True``); chat prompts are rendered by the template, which writes its own
    special tokens, and are encoded with ``add_special_tokens=False``.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str | None] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ) -> None:
        self._tk = backend
        self._bos = bos_token_id
        self._pad = pad_token_id
        self.chat_template = chat_template
        self.special_tokens: dict[str, str | None] = dict(special_tokens or {})
        if self.special_tokens.get("bos_token") is None and bos_token_id is not None:
            self.special_tokens["bos_token"] = backend.id_to_token(bos_token_id)
        eos_list = [int(i) for i in eos_token_ids]
        eos = set(eos_list)
        for text in END_OF_GENERATION_TOKENS:
            tid = backend.token_to_id(text)
            if tid is not None:
                eos.add(tid)
        self._eos = frozenset(eos)
        if self.special_tokens.get("eos_token") is None and eos_list:
            self.special_tokens["eos_token"] = backend.id_to_token(eos_list[0])
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Make ``encode(add_special_tokens=True)`` add exactly BOS and/or EOS (as transformers
        does when a tokenizer config states add_bos_token / add_eos_token)."""
        eos_text = self.special_tokens.get("eos_token")
        eos_id = self._tk.token_to_id(eos_text) if eos_text else None
        add_bos = add_bos and self._bos is not None
        add_eos = add_eos and eos_id is not None
        bos_text = self._tk.id_to_token(self._bos) if add_bos else None
        specials = [(t, i) for t, i in ((bos_text, self._bos), (eos_text, eos_id)) if t is not None]

        def template(seq: str, type_id: int) -> list[str]:
            # list form: a token text containing spaces stays one piece
            return ([f"{bos_text}:{type_id}"] if add_bos else []) + [f"{seq}:{type_id}"] + (
                [f"{eos_text}:{type_id}"] if add_eos else [])

        self._tk.post_processor = processors.TemplateProcessing(
            single=template("$A", 0), pair=template("$A", 0) + template("$B", 1), special_tokens=specials
        )

    # -- core API ------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token texts inside it (e.g. ``<|im_start|>``) become single ids."""
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` for many texts at once, parallel in the Rust backend (the batch prepare path)."""
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; control tokens are dropped when ``skip_special_tokens``."""
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for a conversation; raises ``ChatTemplateError`` (a ValueError) when the
        model has no template or the template rejects the messages."""
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Render the chat template and encode it without adding BOS again (the template has it)."""
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(prompt, add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (the model's embedding may be larger, e.g. Qwen2 pads it)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the configured eos ids plus known end-of-turn tokens."""
        return self._eos

    @property
    def pad_token_id(self) -> int | None:
        return self._pad

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode(add_special_tokens=True)`` prepends BOS."""
        if self._bos is None:
            return False
        with_specials = self._tk.encode("a", add_special_tokens=True).ids
        without = self._tk.encode("a", add_special_tokens=False).ids
        return len(with_specials) > len(without) and with_specials[0] == self._bos

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry for ``token_id`` (byte-level spelling, e.g. 'Ġthe'), or None."""
        return self._tk.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (as spelled in the vocabulary), or None."""
        return self._tk.token_to_id(token)

    def to_json_str(self) -> str:
        """The ``tokenizer.json`` text (what llguidance and other grammar engines consume)."""
        return self._tk.to_str()

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tk

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos}, eos={sorted(self._eos)}, "
                f"chat_template={'yes' if self.chat_template else 'no'})")

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF file's ``tokenizer.ggml.*`` metadata ('gpt2' byte-level BPE or 'llama'
        sentencepiece vocabularies)."""
        md = metadata
        model = md.get("tokenizer.ggml.model")
        tokens: list[str] = list(md.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
        types: list[int] = list(md.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        pre = str(md.get("tokenizer.ggml.pre") or "default")

        add_bos_default = False
        if model == "gpt2":
            backend, add_bos_default = _byte_level_bpe(tokens, types, md.get("tokenizer.ggml.merges") or [], pre)
        elif model == "llama":
            backend = _sentencepiece_bpe(tokens, types, md.get("tokenizer.ggml.scores"),
                                         bool(md.get("tokenizer.ggml.add_space_prefix", True)),
                                         md.get("tokenizer.ggml.unknown_token_id"))
            add_bos_default = True  # llama.cpp and transformers: sentencepiece vocabularies add BOS
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {model!r}; supported: 'gpt2' (BPE), 'llama' (SentencePiece)")

        def tok_id(key: str) -> int | None:
            value = md.get(f"tokenizer.ggml.{key}")
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos, eos = tok_id("bos_token_id"), tok_id("eos_token_id")
        eos_ids = [i for i in (eos, tok_id("eot_token_id"), tok_id("eom_token_id")) if i is not None]
        specials = {
            "bos_token": tokens[bos] if bos is not None else None,
            "eos_token": tokens[eos] if eos is not None else None,
            "unk_token": tokens[u] if (u := tok_id("unknown_token_id")) is not None else None,
            "pad_token": tokens[p] if (p := tok_id("padding_token_id")) is not None else None,
        }
        add_bos = md.get("tokenizer.ggml.add_bos_token")
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            pad_token_id=tok_id("padding_token_id"),
            chat_template=md.get("tokenizer.chat_template"),
            special_tokens=specials,
            add_bos_token=add_bos_default if add_bos is None else bool(add_bos),
            add_eos_token=bool(md.get("tokenizer.ggml.add_eos_token", False)),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """Build from a Hugging Face model directory: tokenizer.json, tokenizer_config.json,
        chat_template.jinja / chat_template.json, and eos ids from generation_config.json/config.json."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer.json (a fast tokenizer is required; sentencepiece-only "
                "tokenizer.model files are not supported -- save the tokenizer with transformers first)"
            )
        backend = tokenizers.Tokenizer.from_file(str(tj))
        cfg = _read_json(path / "tokenizer_config.json")
        stm = _read_json(path / "special_tokens_map.json")

        def special(name: str) -> str | None:
            value = cfg.get(name, stm.get(name))
            if isinstance(value, Mapping):
                value = value.get("content")
            return value if isinstance(value, str) else None

        specials = {name: special(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}

        def text_id(text: str | None) -> int | None:
            return backend.token_to_id(text) if text else None

        model_cfg = _read_json(path / "config.json")
        gen_cfg = _read_json(path / "generation_config.json")
        eos_ids: list[int] = []
        eos_ids += [i for i in [text_id(specials["eos_token"])] if i is not None]
        for source in (gen_cfg, model_cfg):
            value = source.get("eos_token_id")
            eos_ids += [value] if isinstance(value, int) else list(value or [])
        eos_ids += list(extra_eos_token_ids)

        bos = text_id(specials["bos_token"])
        if bos is None and isinstance(model_cfg.get("bos_token_id"), int) and specials["bos_token"] is None:
            bos = model_cfg["bos_token_id"]
        explicit = "add_bos_token" in cfg or "add_eos_token" in cfg
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            pad_token_id=text_id(specials["pad_token"]),
            chat_template=_hf_chat_template(path, cfg),
            special_tokens=specials,
            add_bos_token=bool(cfg.get("add_bos_token", False)) if explicit else None,
            add_eos_token=bool(cfg.get("add_eos_token", False)) if explicit else None,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else {}


def _hf_chat_template(path: Path, cfg: Mapping[str, Any]) -> str | None:
    """transformers >= 4.43 saves the template as chat_template.jinja; older files keep it in
    tokenizer_config.json, sometimes as a list of named templates ("default", "tool_use", ...)."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template: Any = cfg.get("chat_template") or _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _byte_level_bpe(
    tokens: list[str], types: list[int], merges: list[str], pre: str
) -> tuple[tokenizers.Tokenizer, bool]:
    """Byte-level BPE as GPT-2 / Llama 3 / Qwen2 / SmolLM ship it; returns the tokenizer and whether
    llama.cpp adds BOS by default for this pre-tokenizer."""
    if pre not in _PRE_TOKENIZERS:
        logger.warning("unknown GGUF pre-tokenizer %r: falling back to GPT-2's split; tokens may differ "
                       "from the original model's tokenizer on some texts", pre)
    spec = _PRE_TOKENIZERS.get(pre, _GPT2)

    alphabet = set(_byte_alphabet().values())
    spell = _byte_alphabet()
    vocab: dict[str, int] = {}
    for i, (text, ttype) in enumerate(zip(tokens, types)):
        # Control / user-defined tokens are stored as raw text and are matched as added tokens; plain
        # entries are already byte-level spelled, except in a few odd files, which we re-spell.
        if ttype == TOKEN_NORMAL and not set(text) <= alphabet:
            text = "".join(spell[b] for b in text.encode("utf-8"))
        vocab.setdefault(text, i)
    if len(vocab) != len(tokens):
        logger.warning("GGUF vocabulary has %d duplicate entries; those ids can be decoded but never produced",
                       len(tokens) - len(vocab))
    merge_pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if sep:
            merge_pairs.append((left, right))

    bpe = models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False,
                     ignore_merges=spec.ignore_merges)
    tk = tokenizers.Tokenizer(bpe)
    if spec.nfc:
        tk.normalizer = normalizers.NFC()
    parts: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits
    ]
    parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.gpt2_regex))
    tk.pre_tokenizer = parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(parts)
    tk.decoder = decoders.ByteLevel()
    _add_special_tokens(tk, tokens, types)
    return tk, spec.add_bos


def _sentencepiece_bpe(
    tokens: list[str], types: list[int], scores: Sequence[float] | None, add_space_prefix: bool,
    unk_id: int | None,
) -> tokenizers.Tokenizer:
    """SentencePiece-BPE (Llama 1/2, Mistral v0.1-v0.3) as a tokenizers BPE with byte fallback.

    The file has scores, not merges: sentencepiece repeatedly joins the adjacent pair whose union
    scores highest, which is BPE with every in-vocabulary split ranked by the union's score.
    """
    scores = list(scores) if scores is not None else [-float(i) for i in range(len(tokens))]
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        vocab.setdefault(text, i)
    mergeable = {t for t, ty in zip(tokens, types) if ty in (TOKEN_NORMAL, TOKEN_USER_DEFINED, TOKEN_BYTE)}
    ranked = []
    for text, ttype, score in zip(tokens, types, scores):
        if ttype != TOKEN_NORMAL or len(text) < 2:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]

    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # llama.cpp prefixes a space to the text and again after every special token; the per-segment
    # normalizer does exactly that (added tokens are split out before normalisation).
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    _add_special_tokens(tk, tokens, types)
    return tk


def _add_special_tokens(tk: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens (matched whole, skipped by decode); user-defined
    ones become plain added tokens (matched whole, kept by decode), as llama.cpp treats them."""
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)

"""Grammar-engine comparison for structured output: llguidance vs xgrammar vs outlines-core.

Run: ``python -m forge_batch.grammar_bench`` (options: ``--help``). Needs the optional packages
``xgrammar``, ``outlines-core`` and ``transformers`` for the alternatives (an engine that is not installed
is reported and skipped); llguidance is a core dependency.

Why this exists: the engine computes a token mask per constrained row per step, so the grammar engine
decides (1) whether a schema can be used at all, (2) what a mask costs, and (3) whether a finished output
is really valid. All three are measured on the same schemas (tests/data/schemas.json) and the same
tokenizer (the default model's), so the choice in BENCHMARKS.md rests on numbers, not on READMEs:

* compile: wall time to turn a JSON schema into a ready matcher, per schema (caches off); schemas an
  engine refuses are listed with its message.
* first mask: compile-to-first-mask, which is where lazy engines (llguidance) pay what eager ones pay
  at compile time.
* mask per token: each schema's example instance is tokenized and followed token by token; the mask is
  computed at every step (the engine's per-step cost). An engine that rejects a token of the valid
  example, or does not allow EOS at its end, is counted under "examples followed".
* soundness: random walks through the grammar (a uniformly random allowed token at every step, ending
  at EOS with probability 1/2 wherever EOS is allowed) are decoded and checked with ``jsonschema``
  (format checking included). A walk that fails means the engine can let invalid output through.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_SCHEMAS = Path(__file__).resolve().parents[1] / "tests" / "data" / "schemas.json"
_BIT = torch.arange(32, dtype=torch.int32)


# ---- validation (the judge every engine is held to) -------------------------------------------------
def _hostname_ok(value: object) -> bool:
    """RFC 1123 host name; jsonschema checks hostnames only when ``fqdn`` is installed."""
    if not isinstance(value, str):
        return True
    label = r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    return len(value) <= 253 and re.fullmatch(rf"{label}(\.{label})*", value) is not None


def schema_validator(schema: dict[str, Any]) -> Any:
    """A jsonschema validator with the draft's own format checker (plus hostname), formats enforced."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    checker = jsonschema.FormatChecker(formats=())
    checker.checkers = dict(cls.FORMAT_CHECKER.checkers)
    if "hostname" not in checker.checkers:
        checker.checks("hostname")(_hostname_ok)
    return cls(schema, format_checker=checker)


# ---- engines ---------------------------------------------------------------------------------------
class EngineUnavailable(RuntimeError):
    """The engine's package (or one it needs) is not installed."""


class GrammarEngine(ABC):
    """One grammar engine behind the few operations the benchmark needs.

    Masks are written into a ``[1, ceil(V/32)]`` int32 tensor, bit ``t % 32`` of word ``t // 32`` (the
    layout all three engines share, and the one forge-batch's sampler applies).
    """

    name: str
    package: str

    def version(self) -> str:
        try:
            return metadata.version(self.package)
        except metadata.PackageNotFoundError:
            return "?"

    @abstractmethod
    def compile(self, schema: dict[str, Any]) -> Any:
        """A compiled grammar for the schema; raises with the engine's message when unsupported."""

    @abstractmethod
    def matcher(self, compiled: Any) -> Any:
        """A fresh matcher state at the start of the grammar."""

    @abstractmethod
    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        """Write the allowed next tokens into ``bitmask[0]``."""

    @abstractmethod
    def advance(self, matcher: Any, token_id: int) -> bool:
        """Consume a token; False when the grammar rejects it."""

    def is_terminated(self, matcher: Any) -> bool:
        """No token may follow (the output is complete without EOS)."""
        return False


class LLGuidanceEngine(GrammarEngine):
    """Exactly what forge-batch's built-in ``json_schema`` constraint compiles (plugins/constraints.py):
    the schema check, the exact date/time patterns and llguidance's matcher."""

    name = "llguidance"
    package = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        from forge_batch.plugin_manager import collect_registry, get_plugin_manager

        # The built-in constraint as the runner gets it: through the plugin manager, by name.
        self.factory = collect_registry(get_plugin_manager([]), "register_constraints")["json_schema"]
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.compile({"type": "string"})  # one-off vocabulary index, outside the per-schema timing

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.factory(schema, self.tokenizer, self.vocab_size)

    def matcher(self, compiled: Any) -> Any:
        return compiled.new_state()

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_bitmask(bitmask, 0)

    def advance(self, matcher: Any, token_id: int) -> bool:
        matcher.advance(token_id)
        return matcher.error() is None

    def is_terminated(self, matcher: Any) -> bool:
        return matcher.is_stopped()




@contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what native code writes to fd 2 (xgrammar prints its "ignoring ..." warnings there)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(ln for ln in tmp.read().decode(errors="replace").splitlines() if ln.strip())


class XGrammarEngine(GrammarEngine):
    """xgrammar with compact JSON (no whitespace, ``","``/``":"`` separators, like our llguidance setting;
    its default separators have spaces) and its cache off, so every schema pays its real compile time.
    Its TokenizerInfo needs a transformers tokenizer."""

    name = "xgrammar"
    package = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        try:
            import tokenizers
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast
        except ImportError as exc:
            raise EngineUnavailable(f"{exc.name} is not installed") from exc
        self._xgr = xgr
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tokenizer.to_json_str()))
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(tokenizer.eos_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False)
        self.warnings: dict[str, list[str]] = {}

    def compile(self, schema: dict[str, Any]) -> Any:
        with _captured_stderr() as warnings:
            compiled = self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                          separators=(",", ":"))
        if warnings:
            self.warnings[json.dumps(schema, sort_keys=True)] = warnings
        return compiled

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def advance(self, matcher: Any, token_id: int) -> bool:
        return bool(matcher.accept_token(token_id))

    def is_terminated(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: how a byte-level BPE spells each byte in its vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class OutlinesCoreEngine(GrammarEngine):
    """outlines-core: JSON schema -> regex (its json_schema helper) -> token-level DFA Index, built eagerly.
    Its Vocabulary is built here from the tokenizers JSON (byte-level BPE), so no transformers needed."""

    name = "outlines-core"
    package = "outlines_core"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        try:
            import outlines_core
            from outlines_core.json_schema import build_regex_from_schema
        except ImportError as exc:
            raise EngineUnavailable(f"{exc.name} is not installed") from exc
        self._oc, self._regex = outlines_core, build_regex_from_schema
        spec = json.loads(tokenizer.to_json_str())
        if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
            raise EngineUnavailable("this benchmark builds outlines-core vocabularies for byte-level BPE only")
        byte_of = _byte_level_decoder()
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        vocab: dict[bytes, list[int]] = {}
        for text, token_id in spec["model"]["vocab"].items():
            if token_id not in special and token_id < vocab_size:
                vocab.setdefault(bytes(byte_of[c] for c in text), []).append(token_id)
        eos = tokenizer.token_to_id("<|im_end|>")
        self.eos = eos if eos is not None else min(tokenizer.eos_token_ids)  # outlines takes a single EOS
        self._vocab = outlines_core.Vocabulary(self.eos, vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self._oc.Index(self._regex(json.dumps(schema), whitespace_pattern=""), self._vocab)

    def matcher(self, compiled: Any) -> Any:
        return self._oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())

    def advance(self, matcher: Any, token_id: int) -> bool:
        try:
            matcher.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        return True


ENGINES: dict[str, type[GrammarEngine]] = {
    "llguidance": LLGuidanceEngine,
    "xgrammar": XGrammarEngine,
    "outlines-core": OutlinesCoreEngine,
}


# ---- measurement -----------------------------------------------------------------------------------
@dataclass
class EngineReport:
    """Everything measured for one engine."""

    name: str
    version: str = ""
    setup_s: float = 0.0
    unavailable: str | None = None
    schemas: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # schema name -> engine message
    compile_ms: list[float] = field(default_factory=list)
    first_mask_ms: list[float] = field(default_factory=list)
    mask_us: list[float] = field(default_factory=list)
    not_followed: dict[str, str] = field(default_factory=dict)  # valid examples the engine rejects
    walks: int = 0
    walks_valid: int = 0
    walks_unfinished: int = 0
    unsound: dict[str, str] = field(default_factory=dict)  # schema name -> an invalid output it allowed
    warnings: list[str] = field(default_factory=list)

    @property
    def compiled(self) -> int:
        return self.schemas - len(self.failed)


def _allowed(bitmask: torch.Tensor, vocab_size: int) -> list[int]:
    bits = ((bitmask[0].unsqueeze(-1) >> _BIT) & 1).view(-1)[:vocab_size]
    return bits.nonzero().flatten().tolist()


def _follow(engine: GrammarEngine, compiled: Any, tokens: list[int], eos: set[int], vocab_size: int,
            report: EngineReport) -> str | None:
    """Step through a valid output, timing the mask at each step; why the engine diverged, else None."""
    m = engine.matcher(compiled)
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    for i, tok in enumerate([*tokens, None]):
        if tok is None and engine.is_terminated(m):
            return None
        t0 = time.perf_counter_ns()
        engine.fill(m, bitmask)
        report.mask_us.append((time.perf_counter_ns() - t0) / 1e3)
        allowed = set(_allowed(bitmask, vocab_size))
        if tok is None:
            return None if allowed & eos else "EOS not allowed after the complete example"
        if tok not in allowed:
            return f"token {i} ({tok}) of the example is masked out"
        if not engine.advance(m, tok):
            return f"token {i} ({tok}) of the example is rejected"
    return None


def _walk(engine: GrammarEngine, compiled: Any, rng: random.Random, eos: set[int], vocab_size: int,
          max_tokens: int) -> list[int] | None:
    """A random path through the grammar; None when it is still open after ``max_tokens``."""
    m = engine.matcher(compiled)
    bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    out: list[int] = []
    for _ in range(max_tokens):
        if engine.is_terminated(m):
            return out
        engine.fill(m, bitmask)
        allowed = _allowed(bitmask, vocab_size)
        ends = [t for t in allowed if t in eos]
        others = [t for t in allowed if t not in eos]
        if ends and (not others or rng.random() < 0.5):
            return out
        if not others:
            return out  # dead end: nothing allowed; judged by validation like any other output
        tok = rng.choice(others)
        if not engine.advance(m, tok):
            return out
        out.append(tok)
    return None


def bench_engine(name: str, cases: list[dict[str, Any]], tokenizer: Any, vocab_size: int, *, walks: int,
                 walk_tokens: int, seed: int) -> EngineReport:
    """Compile, follow and walk every schema with one engine."""
    report = EngineReport(name=name, schemas=len(cases))
    t0 = time.perf_counter()
    try:
        engine = ENGINES[name](tokenizer, vocab_size)
    except EngineUnavailable as exc:
        report.unavailable = str(exc)
        return report
    report.version = engine.version()
    report.setup_s = time.perf_counter() - t0
    engine.compile({"type": "object", "properties": {"a": {"type": "string"}}})  # warm-up (thread pools)
    eos = set(tokenizer.eos_token_ids) | ({engine.eos} if isinstance(engine, OutlinesCoreEngine) else set())
    rng = random.Random(seed)
    for case in cases:
        t0 = time.perf_counter()
        try:
            compiled = engine.compile(case["schema"])
        except Exception as exc:  # the engine's own message is the result
            report.failed[case["name"]] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            continue
        t1 = time.perf_counter()
        report.compile_ms.append((t1 - t0) * 1e3)
        m = engine.matcher(compiled)
        engine.fill(m, torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32))
        report.first_mask_ms.append((time.perf_counter() - t0) * 1e3)

        example = json.dumps(case["example"], separators=(",", ":"), ensure_ascii=False)
        why = _follow(engine, compiled, tokenizer.encode(example, add_special_tokens=False), eos, vocab_size,
                      report)
        if why:
            report.not_followed[case["name"]] = why

        validator = schema_validator(case["schema"])
        for _ in range(walks):
            ids = _walk(engine, compiled, rng, eos, vocab_size, walk_tokens)
            if ids is None:
                report.walks_unfinished += 1
                continue
            report.walks += 1
            text = tokenizer.decode(ids, skip_special_tokens=True)
            try:
                errors = [e.message for e in validator.iter_errors(json.loads(text))]
            except json.JSONDecodeError as exc:
                errors = [f"not JSON: {exc}"]
            if errors:
                report.unsound.setdefault(case["name"], f"{text[:80]!r}: {errors[0][:100]}")
            else:
                report.walks_valid += 1
    if isinstance(engine, XGrammarEngine):
        report.warnings = sorted({w for ws in engine.warnings.values() for w in ws})
    return report


# ---- output ----------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def markdown_table(reports: list[EngineReport]) -> str:
    rows = [
        "| engine | version | schemas compiled | compile ms p50 / p99 | first mask ms p50 | "
        "mask µs/token p50 / p99 | valid examples followed | random walks valid | unsound schemas |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        if r.unavailable:
            rows.append(f"| {r.name} | not installed ({r.unavailable}) | | | | | | | |")
            continue
        rows.append(
            f"| {r.name} | {r.version} | {r.compiled}/{r.schemas} "
            f"| {_pct(r.compile_ms, 50):.1f} / {_pct(r.compile_ms, 99):.1f} "
            f"| {_pct(r.first_mask_ms, 50):.1f} "
            f"| {_pct(r.mask_us, 50):.0f} / {_pct(r.mask_us, 99):.0f} "
            f"| {r.compiled - len(r.not_followed)}/{r.compiled} "
            f"| {r.walks_valid}/{r.walks} | {len(r.unsound)} |"
        )
    return "\n".join(rows)


def details(reports: list[EngineReport]) -> str:
    out: list[str] = []
    for r in reports:
        if r.unavailable:
            continue
        out.append(f"\n### {r.name} {r.version} (tokenizer setup {r.setup_s:.2f} s)")
        for title, items in (("cannot compile", r.failed), ("rejects a valid example", r.not_followed),
                             ("lets invalid output through", r.unsound)):
            if items:
                out.append(f"- {title} ({len(items)}):")
                out.extend(f"  - `{k}`: {v}" for k, v in items.items())
        if r.walks_unfinished:
            out.append(f"- random walks still open after the token limit (not judged): {r.walks_unfinished}")
        for w in r.warnings:
            out.append(f"- warning: {w[:200]}")
    return "\n".join(out)


def recommendation(reports: list[EngineReport]) -> str:
    """Rank by what matters to the engine, in order: never invalid, compiles the most, cheapest mask."""
    ok = [r for r in reports if not r.unavailable and r.compile_ms]
    if not ok:
        return "No engine could be measured."
    ranked = sorted(ok, key=lambda r: (len(r.unsound), -(r.compiled - len(r.not_followed)),
                                       _pct(r.mask_us, 50)))
    best = ranked[0]
    lines = [
        f"Recommendation: **{best.name}**: {len(best.unsound)} schemas with invalid output, "
        f"{best.compiled}/{best.schemas} compiled, mask p50 {_pct(best.mask_us, 50):.0f} µs/token."
    ]
    for r in ranked[1:]:
        lines.append(
            f"- {r.name}: {len(r.unsound)} schemas with invalid output, {r.compiled}/{r.schemas} compiled, "
            f"mask p50 {_pct(r.mask_us, 50):.0f} µs/token, compile p50 {_pct(r.compile_ms, 50):.1f} ms."
        )
    fastest = min(ok, key=lambda r: _pct(r.mask_us, 50))
    if fastest is not best:
        lines.append(
            f"{fastest.name}'s masks are cheaper ({_pct(fastest.mask_us, 50):.0f} vs "
            f"{_pct(best.mask_us, 50):.0f} µs/token), but the engine computes masks on a worker thread while "
            "the forward pass runs (a decode step takes milliseconds on GPU, far more on CPU), so that "
            "difference is hidden; an invalid finished output is not."
        )
    if best.name == "llguidance":
        lines.append("llguidance also runs on the plain `tokenizers` JSON (no transformers) and releases the "
                     "GIL while computing masks, which the engine needs to overlap masks with the forward pass.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forge_batch.grammar_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemas", type=Path, default=DEFAULT_SCHEMAS,
                    help="JSON list of {name, schema, example} (default: tests/data/schemas.json)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model whose tokenizer is used")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {list(ENGINES)}")
    ap.add_argument("--walks", type=int, default=8, help="random walks per schema (soundness check)")
    ap.add_argument("--walk-tokens", type=int, default=256, help="token limit of one random walk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the raw measurements here")
    args = ap.parse_args(argv)

    from forge_batch.models.registry import load_model_files

    if not args.schemas.exists():
        ap.error(f"{args.schemas} not found (it ships with the repository's tests, not the wheel): pass --schemas")
    cases = json.loads(args.schemas.read_text())
    config, _state, tokenizer = load_model_files(args.model)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; known: {list(ENGINES)}")
    reports = []
    for name in names:
        print(f"benchmarking {name} on {len(cases)} schemas ...", file=sys.stderr, flush=True)
        reports.append(bench_engine(name, cases, tokenizer, config.vocab_size, walks=args.walks,
                                    walk_tokens=args.walk_tokens, seed=args.seed))
    print(f"## Grammar engines on {len(cases)} JSON schemas ({args.schemas.name}), tokenizer of {args.model} "
          f"(vocab {config.vocab_size}), {os.cpu_count()} CPU cores\n")
    print(markdown_table(reports))
    print(details(reports))
    print()
    print(recommendation(reports))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in reports], indent=1, default=str))
    return 0


if __name__ == "__main__":
    from forge_batch.checkout_path import drop_checkout_root

    drop_checkout_root()  # before anything imports transformers
    raise SystemExit(main())

"""FakeLLM: a small deterministic stand-in for forge_batch.LLM, for testing the job runner's mechanics
(resume, atomic parts, bad rows, signals, plugins) fast and without a model. Tests only.

It implements what the runner uses: ``generate_stream`` (lazy pulls, at most ``max_in_flight`` unfinished,
results in *finish* order, which differs from input order), ``stats()``, ``tokenizer`` and
``max_model_len``. A sample's text depends only on the prompt tokens and (unless greedy) the request seed and
sample index, like a seeded real engine, so a resumed run must reproduce an uninterrupted one exactly.

Subprocess tests select it with ``FORGE_BATCH_ENGINE_FACTORY=fakes:make_fake_llm`` (tests/ on PYTHONPATH);
``FAKE_STEP_DELAY`` (seconds per engine step) slows it down so a run can be killed mid-way;
``FAKE_LOAD_DELAY`` (seconds) makes building it slow, like loading a model, and ``FAKE_LOAD_STARTED`` names a
file it creates when that begins, so a test can signal a run that is loading; ``FAKE_EXIT_DELAY`` (seconds)
makes the process's exit slow (an atexit sleep), like an engine's teardown.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from forge_batch.engine.outputs import CompletionOutput, RequestOutput
from forge_batch.engine.request import GenerationRequest
from forge_batch.engine.sampling_params import SamplingParams

BOS, EOS, OFFSET = 1, 2, 3
VOCAB = 256 + OFFSET


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


class FakeTokenizer:
    """Bytes as tokens (id = byte + 3), BOS 1, EOS 2, and a ChatML-like chat template."""

    chat_template = "<|{role}|>{content}\n ... <|assistant|>"
    eos_token_ids = (EOS,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + OFFSET for b in text.encode("utf-8")]
        return ([BOS] + ids) if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]


class FakeLLM:
    """See the module docstring. ``fail_on`` maps a prompt substring to an engine error message."""

    def __init__(
        self,
        *,
        max_model_len: int = 512,
        max_num_seqs: int = 8,
        step_delay: float = 0.0,
        samplers: dict[str, Any] | None = None,
        seed: int = 0,
        fail_on: dict[str, str] | None = None,
    ) -> None:
        self.outputs_waiting = 0
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.step_delay = step_delay
        self.samplers = {"default": None, "greedy": None, "multinomial": None, **(samplers or {})}
        self.seed = seed
        self.fail_on = fail_on or {}
        self._running = 0
        self._waiting = 0
        self._prompt_tokens = 0
        self._output_tokens = 0
        self.max_seen_in_flight = 0
        self.requests_seen: list[str] = []

    # -- generation -----------------------------------------------------------------------------------
    def _tokens(self, prompt_ids: list[int], params: SamplingParams, index: int) -> tuple[list[int], str]:
        seed = 0 if params.temperature == 0 else (params.seed if params.seed is not None else self.seed)
        length = 2 + _h(tuple(prompt_ids), "len") % 6
        if params.sampler and self.samplers.get(params.sampler) is not None:
            return self._with_sampler(prompt_ids, params, index, min(length, params.max_tokens))
        words = [WORDS[_h(tuple(prompt_ids), seed, index, t) % len(WORDS)] for t in range(length)]
        words = words[: params.max_tokens]
        text = " ".join(words)
        return [OFFSET + (_h(w) % 250) for w in words], text

    def _with_sampler(self, prompt_ids: list[int], params: SamplingParams, index: int, length: int) -> tuple[list[int], str]:
        import torch

        from forge_batch.engine.sampler import SamplingBatch, uniform_for

        sampler = self.samplers[params.sampler]
        out: list[int] = []
        for t in range(length):
            g = torch.Generator().manual_seed(_h(tuple(prompt_ids), t) % (2**62))
            logits = torch.randn(1, VOCAB, generator=g)
            batch = SamplingBatch(
                params=[params],
                output_token_ids=[list(out)],
                prompt_token_ids=[list(prompt_ids)],
                uniforms=torch.tensor([uniform_for((params.seed or 0) + index, t)], dtype=torch.float64),
                eos_token_ids=frozenset({EOS}),
            )
            out.append(int(sampler(logits, batch)[0]))
        return out, " ".join(f"t{i}" for i in out)

    def _failed(self, req: GenerationRequest, error: str, prompt_ids: list[int] | None = None) -> RequestOutput:
        now = time.monotonic()
        n = req.params.n if isinstance(req.params, SamplingParams) else 1
        return RequestOutput(
            request_id=req.request_id,
            index=0,
            prompt=req.prompt if isinstance(req.prompt, str) else None,
            prompt_token_ids=prompt_ids or [],
            samples=[CompletionOutput(i, "", [], "error", error) for i in range(n)],
            error=error,
            metrics={"arrival_time": now, "first_token_time": now, "finished_time": now},
            metadata=req.metadata,
        )

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            return list(req.prompt_token_ids)
        if isinstance(req.prompt, str):
            return self.tokenizer.encode(req.prompt)
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(req.prompt), add_special_tokens=False)

    def generate_stream(
        self,
        requests: Iterable[GenerationRequest],
        sampling_params: SamplingParams | None = None,
        *,
        max_in_flight: int | None = None,
    ) -> Iterator[RequestOutput]:
        limit = max_in_flight or 2 * self.max_num_seqs
        it = iter(requests)
        exhausted = False
        pending: list[list[Any]] = []  # [steps_left, request, prompt_ids, arrival]
        while True:
            while not exhausted and len(pending) < limit:
                try:
                    req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                self.requests_seen.append(req.request_id)
                if req.error is not None:
                    yield self._failed(req, req.error)
                    continue
                ids = self._prompt_ids(req)
                text = req.prompt if isinstance(req.prompt, str) else str(req.prompt)
                bad = next((msg for key, msg in self.fail_on.items() if key in text or key in self.tokenizer.decode(ids)), None)
                if bad is not None:
                    yield self._failed(req, bad, ids)
                    continue
                if not ids:
                    yield self._failed(req, "empty prompt: it has no tokens")
                    continue
                if len(ids) >= self.max_model_len:
                    yield self._failed(req, f"prompt too long: {len(ids)} tokens > max_model_len {self.max_model_len}", ids)
                    continue
                if req.params.sampler is not None and req.params.sampler not in self.samplers:
                    yield self._failed(req, f"unknown sampler {req.params.sampler!r}")
                    continue
                pending.append([1 + _h(req.request_id) % 3, req, ids, time.monotonic()])
                self.max_seen_in_flight = max(self.max_seen_in_flight, len(pending))
            if not pending:
                if exhausted:
                    return
                continue
            if self.step_delay:
                time.sleep(self.step_delay)
            self._running = min(len(pending), self.max_num_seqs)
            self._waiting = len(pending) - self._running
            done = []
            for p in pending[: self.max_num_seqs]:
                p[0] -= 1
                if p[0] <= 0:
                    done.append(p)
            for k, p in enumerate(done):
                self.outputs_waiting = len(done) - k - 1  # as LLM.generate_stream says it
                pending.remove(p)
                _, req, ids, arrival = p
                samples = []
                for i in range(req.params.n):
                    toks, text = self._tokens(ids, req.params, i)
                    reason = "length" if len(toks) >= req.params.max_tokens else "stop"
                    samples.append(CompletionOutput(i, text, toks, reason))
                    self._output_tokens += len(toks)
                self._prompt_tokens += len(ids)
                now = time.monotonic()
                yield RequestOutput(
                    request_id=req.request_id,
                    index=0,
                    prompt=req.prompt if isinstance(req.prompt, str) else None,
                    prompt_token_ids=ids,
                    samples=samples,
                    metrics={"arrival_time": arrival, "first_token_time": arrival + (now - arrival) / 2, "finished_time": now},
                    metadata=req.metadata,
                )

    def stats(self) -> dict[str, Any]:
        return {
            "running": self._running,
            "waiting": self._waiting,
            "kv_blocks_used": self._running * 2,
            "kv_blocks_total": 1024,
            "prompt_tokens": self._prompt_tokens,
            "output_tokens": self._output_tokens,
        }


def make_fake_llm(job: Any, *, samplers: dict[str, Any] | None = None, constraints: dict[str, Any] | None = None) -> FakeLLM:
    """Engine factory for the runner (also the FORGE_BATCH_ENGINE_FACTORY target in subprocess tests)."""
    started = os.environ.get("FAKE_LOAD_STARTED")
    if started:
        open(started, "w").close()
    time.sleep(float(os.environ.get("FAKE_LOAD_DELAY", "0")))
    if os.environ.get("FAKE_EXIT_DELAY"):
        atexit.register(time.sleep, float(os.environ["FAKE_EXIT_DELAY"]))
    max_len = int(os.environ.get("FAKE_MAX_MODEL_LEN", "0")) or job.engine.max_model_len or 512
    return FakeLLM(
        max_model_len=max_len,
        max_num_seqs=job.engine.max_num_seqs or 8,
        step_delay=float(os.environ.get("FAKE_STEP_DELAY", "0")),
        samplers=samplers,
        seed=job.sampling.seed,
    )

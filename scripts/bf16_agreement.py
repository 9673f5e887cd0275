"""How far bfloat16 greedy tokens agree with transformers' bfloat16 on the default model: our engine batched,
transformers one prompt at a time, each prompt's common prefix of generated tokens. bfloat16 runs part at
near-ties whatever the kernels, so this is a comparison between builds, not a pass/fail (the float32 path is
token-exact: tests/test_default_model.py).

    python scripts/bf16_agreement.py --prompts 32 --max-tokens 48
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers

from forge_batch import LLM, SamplingParams
from forge_batch.bench import SYSTEM_PROMPT, chat_prompts
from forge_batch.models.registry import resolve_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hf_reference import hf_greedy  # noqa: E402  (the tests' greedy loop over a transformers model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32, help="half of them behind W2's system prompt")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    path = resolve_model_path("smollm2-135m-instruct")
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.bfloat16).eval()
    ours = LLM("smollm2-135m-instruct", device="cpu", dtype="bfloat16", max_num_seqs=64)
    n = args.prompts
    chats = chat_prompts(n, SYSTEM_PROMPT)[: n // 2] + chat_prompts(n)[: n - n // 2]
    outs = ours.generate(chats, SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True))
    prefixes = []
    for out in outs:
        expected = hf_greedy(model, out.prompt_token_ids, args.max_tokens)
        k = 0
        while k < args.max_tokens and out.token_ids[k] == expected[k]:
            k += 1
        prefixes.append(k)
    print(json.dumps({"identical": sum(p == args.max_tokens for p in prefixes), "prompts": n,
                      "mean_common_prefix": round(sum(prefixes) / n, 1), "prefixes": prefixes}))


if __name__ == "__main__":
    main()

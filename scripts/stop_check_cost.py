"""What checking stop strings costs a token, as an output grows: ``check_stop`` over one long output (the
default model's tokenizer, docs/jobs.md as the text, stop strings that never match), at this checkout and,
with ``--against REV``, at an earlier commit's ``engine/stopping.py``, in one process.

    python scripts/stop_check_cost.py --against 6484dce
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

from forge_batch.engine import stopping
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.engine.sequence import Sequence
from forge_batch.models.gguf_file import GGUFFile
from forge_batch.models.registry import DEFAULT_MODEL_ALIAS, resolve_model_path
from forge_batch.models.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


def _stopping_at(rev: str, folder: Path) -> ModuleType:
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:forge_batch/engine/stopping.py"],
                            check=True, capture_output=True, text=True).stdout
    path = folder / "stopping_at_rev.py"
    path.write_text(source.replace("from .", "from forge_batch.engine."))
    spec = importlib.util.spec_from_file_location("stopping_at_rev", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _seconds(module: ModuleType, ids: list[int], decode) -> float:
    best = float("inf")
    for _ in range(3 if len(ids) < 4096 else 1):
        seq = Sequence(0, "r", 0, [1], SamplingParams(max_tokens=len(ids) + 1, stop=["<<never>>", "\n\n\n\n"]), 0)
        t = time.perf_counter()
        for tok in ids:
            seq.output_token_ids.append(tok)
            if module.check_stop(seq, tok, frozenset(), 1 << 20, decode):
                raise AssertionError("a stop string matched: the text must not hold one")
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", metavar="REV", help="also time engine/stopping.py at this commit")
    ap.add_argument("--lengths", default="256,1024,4096")
    args = ap.parse_args()
    with GGUFFile(resolve_model_path(DEFAULT_MODEL_ALIAS)) as f:
        tok = Tokenizer.from_gguf_metadata(f.metadata)
    ids_all = tok.encode((REPO / "docs" / "jobs.md").read_text() * 3, add_special_tokens=False)

    def decode(ids: list[int], skip: bool) -> str:
        return tok.decode(ids, skip_special_tokens=skip)

    with tempfile.TemporaryDirectory() as folder:
        old = _stopping_at(args.against, Path(folder)) if args.against else None
        print(f"| output tokens | {args.against + ' ' if old else ''}us / token | this checkout us / token |")
        for n in (int(x) for x in args.lengths.split(",")):
            ids = ids_all[:n]
            now = _seconds(stopping, ids, decode) / n * 1e6
            then = f"{_seconds(old, ids, decode) / n * 1e6:.1f} | " if old else ""
            print(f"| {n} | {then}{now:.1f} |")


if __name__ == "__main__":
    main()

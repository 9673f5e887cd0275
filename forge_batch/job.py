"""The job file: the one place where every option of a batch job is defined.

A job is YAML (or JSON) validated by the pydantic models below. Unknown keys are errors that name the
key's path, so a typo never silently falls back to a default. Loading goes:

1. parse the file (YAML),
2. apply ``--set a.b=c`` overrides (values parsed as YAML scalars, so ``0`` is an int and ``[a, b]`` a list),
3. interpolate ``${VAR}`` / ``${VAR:-default}`` from the environment (``$${`` escapes a literal ``${``),
4. validate with pydantic, collecting *every* problem with its key path,
5. resolve relative paths (input, output, model directory, plugin files) against the job file's folder.

:func:`load_job` raises :class:`JobError` holding the list of problems; :func:`check_job` adds the checks that
need the file system but no plugin (input files exist, templates compile, the model is there) without
running anything. The checks against what plugins register (formats, samplers, constraint kinds) sit a layer
up, in ``forge_batch.runner.checks``, which ``forge-batch validate`` and ``run`` both call.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from forge_batch.engine.sampling_params import (
    BUILTIN_CONSTRAINT_KINDS,
    constraint_of,
    constraint_options,
    constraints_given,
    one_constraint_problem,
)
from forge_batch.io.base import hidden_from_readers

# Output columns the runner always writes; input fields copied with ``keep_fields`` must not collide.
RESERVED_COLUMNS = (
    "row_index",
    "sample_index",
    "prompt",
    "text",
    "finish_reason",
    "valid",
    "prompt_tokens",
    "completion_tokens",
    "error",
    "error_kind",
    "ttft_s",
    "latency_s",
    "finished_at",
    "extra",
    "logprobs",
    "cumulative_logprob",
    "prompt_logprobs",
)


# engine.kernel_backend's values (FORGE_BATCH_KERNELS's too, the default when the job sets none): those of
# forge_batch.kernels.dispatch.BACKENDS, written again here because importing that module imports torch, which
# validate does not.
KERNEL_BACKENDS = ("auto", "reference", "triton")
# The codecs pyarrow writes Parquet with.
PARQUET_CODECS = ("zstd", "snappy", "gzip", "brotli", "lz4", "none")


class _Strict(BaseModel):
    """Unknown keys are errors (with their path), never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputSpec(_Strict):
    """Where rows come from and how a row becomes a prompt.

    The prompt of a row is, in order of precedence: ``template`` rendered over the row's columns (sandboxed
    jinja, undefined columns are row errors); the chat in ``messages_field`` when the row has it; the string
    in ``prompt_field``. Plain prompts go through the model's chat template as one user message when
    ``apply_chat_template`` is true (``null``: when the tokenizer has one), because that is what an instruct
    model expects.
    """

    path: str = Field(description="A .jsonl / .parquet file, a directory of them, or a glob; local or a URL (s3://, gs://, hf://, ...).")
    format: str = Field("auto", description="auto (from the extension), jsonl, parquet, openai-batch or a plugin's.")
    id_field: str | None = Field(
        "id", description="Unique row id (needed for resume). null: the row's position in the input."
    )
    prompt_field: str = "prompt"
    messages_field: str = "messages"
    template: str | None = None
    system_prompt: str | None = Field(None, description="Prepended as a system message to chat prompts.")
    apply_chat_template: bool | None = None
    sampling_field: str | None = Field(
        None, description="Optional column holding per-row sampling overrides (a mapping or a JSON string)."
    )
    batch_size: int = Field(1000, ge=1, description="Rows read at a time (memory stays bounded).")
    limit: int | None = Field(None, ge=0, description="Read at most this many rows (for trials).")


class OutputSpec(_Strict):
    """Where and how results are written: a directory of part files (state in ``.NAME.forge_batch`` next to it)."""

    path: str = Field(description="A local folder (or file:// URL); remote URLs are refused (see forge_batch.io.remote).")
    format: str = "parquet"
    keep_fields: list[str] = Field(default_factory=list)
    include_prompt: bool = Field(False, description="Also write the rendered prompt text.")
    rows_per_file: int = Field(10_000, ge=1)
    flush_seconds: float = Field(
        60.0, gt=0, description="Commit a part at least this often while results are coming in."
    )
    compression: str = Field("zstd", description="Parquet's codec: zstd, snappy, gzip, brotli, lz4 or none.")

    @field_validator("compression")
    @classmethod
    def _parquet_codec(cls, v: str) -> str:
        if v.lower() not in PARQUET_CODECS:
            raise ValueError(f"{v!r} is not a Parquet compression; one of {', '.join(PARQUET_CODECS)}")
        return v.lower()

    @model_validator(mode="after")
    def _compression_is_parquets(self) -> OutputSpec:
        if "compression" in self.model_fields_set and self.format in ("jsonl", "openai-batch"):
            raise ValueError(f"compression applies to Parquet output only; {self.format} parts are plain text")
        return self

    def single_file(self) -> bool:
        """``path`` names one file (``results.jsonl``), not a directory of parts: OpenAI batch output as
        ``vllm run-batch -o results.jsonl`` writes it, in input order once every row is done."""
        return self.format == "openai-batch" and self.path.lower().endswith(".jsonl")

    @field_validator("path")
    @classmethod
    def _local(cls, v: str) -> str:
        from forge_batch.io.remote import output_url_problem

        if not v.strip():  # it would resolve to the job's own folder and put parts among its files
            raise ValueError("output.path is empty: name the folder the output goes to (e.g. out/run1)")
        problem = output_url_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("keep_fields")
    @classmethod
    def _no_reserved(cls, v: list[str]) -> list[str]:
        # the prompt column is written only with include_prompt (see _no_prompt_twice)
        bad = [f for f in v if f in RESERVED_COLUMNS and f != "prompt"]
        if bad:
            raise ValueError(f"{bad} clash with output columns the runner writes ({', '.join(RESERVED_COLUMNS)})")
        if len(set(v)) != len(v):
            raise ValueError("keep_fields lists a field twice")
        return v

    @model_validator(mode="after")
    def _no_prompt_twice(self) -> OutputSpec:
        if self.include_prompt and "prompt" in self.keep_fields:
            raise ValueError("keep_fields ['prompt'] clashes with the prompt column include_prompt writes: keep "
                             "the input's prompt, or write the rendered one")
        return self


# Sampling options added after outputs were first fingerprinted (see JobSpec.fingerprint).
_LATER_SAMPLING_KEYS = frozenset({"include_stop_str_in_output", "logprobs", "prompt_logprobs", "allowed_token_ids",
                                  "bad_words", "truncate_prompt_tokens"})


class SamplingSpec(_Strict):
    """Job-wide sampling options: the fields of :class:`forge_batch.SamplingParams` (vLLM names).

    ``seed`` is the job seed: every row gets its own seed derived from it and the row id, so a resumed run
    writes exactly what an uninterrupted one would.
    """

    n: int = Field(1, ge=1)
    max_tokens: int = Field(256, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_k: int = 0
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = Field(
        None, ge=0, description="Each generated token's logprob and the top k per position: the logprobs and "
                                "cumulative_logprob columns (see docs/jobs.md)."
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, description="The same for every prompt token after the first: the prompt_logprobs column."
    )
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(None, description="Keep the prompt's last k tokens (-1: the context's length).")
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    constraint: dict[str, Any] | None = Field(
        None, description="A plugin-registered constraint kind and its spec, e.g. {lark: '...'}."
    )
    sampler: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _builtin_kinds_out_of_constraint(cls, data: Any) -> Any:
        """``constraint: {json_schema: ...}`` (or regex, choice) is the same as ``json_schema: ...``."""
        if isinstance(data, dict) and isinstance(data.get("constraint"), dict):
            builtin = {k: v for k, v in data["constraint"].items() if k in BUILTIN_CONSTRAINT_KINDS}
            if builtin and not any(data.get(k) is not None for k in builtin):
                rest = {k: v for k, v in data["constraint"].items() if k not in builtin}
                data = {**data, **builtin, "constraint": rest or None}
        return data

    @model_validator(mode="after")
    def _check(self) -> SamplingSpec:
        problem = one_constraint_problem(constraints_given(dict(self)))
        if problem is not None:
            raise ValueError(problem)
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


class ConstraintSpec(BaseModel):
    """Structured output: every written row parses, has its fields, picks from the set.

    Job-wide: one kind with its spec, ``{json_schema: {...}}``, ``{regex: "..."}``, ``{choice: [...]}`` or a
    plugin-registered kind (``{lark: "..."}``). Per row: ``<kind>_field: column`` names a column holding
    the row's own spec (a schema as an object or JSON string, a pattern, a list of options), so one job
    can mix schemas; a row whose column is empty falls back to the job-wide constraint, if any.
    A job-wide constraint that cannot be compiled fails the job before any generation.
    """

    # Extra keys are plugin constraint kinds (or their ``*_field`` forms), checked against the registry.
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_schema_field: str | None = None
    regex_field: str | None = None
    choice_field: str | None = None

    def _items(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def job_level(self) -> tuple[str, Any] | None:
        """(kind, spec) applied to every row, or None."""
        found = [(k, v) for k, v in self._items().items() if not k.endswith("_field")]
        return found[0] if found else None

    def row_field(self) -> tuple[str, str] | None:
        """(kind, column) of the per-row constraint, or None."""
        found = [(k[: -len("_field")], v) for k, v in self._items().items() if k.endswith("_field")]
        return found[0] if found else None

    @model_validator(mode="after")
    def _one_of_each(self) -> ConstraintSpec:
        items = self._items()
        kinds = [k for k in items if not k.endswith("_field")]
        fields = [k for k in items if k.endswith("_field")]
        for given in (kinds, fields):  # one job-wide kind; one column with each row's own
            problem = one_constraint_problem(given)
            if problem is not None:
                raise ValueError(problem)
        for k in fields:
            if not isinstance(items[k], str) or not items[k]:
                raise ValueError(f"{k} must name a column")
        # Whether the spec compiles is asked of the constraint kind itself (check_job): one judge.
        return self


class EngineSpec(_Strict):
    """Engine options, passed to :class:`forge_batch.LLM` (``None`` means the engine's default)."""

    device: str = Field("auto", description="auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N.")
    dtype: str = Field("auto", description="auto (bfloat16 on GPUs and CPUs with native bf16, else float32), "
                                           "float32, bfloat16, float16 (or fp32, bf16, fp16).")
    block_size: int | None = Field(None, ge=1)
    num_blocks: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    enable_prefix_caching: bool | None = None
    kv_cache: Literal["paged", "naive"] | None = None
    # The kernel backends forge_batch.kernels.set_backend accepts (a test keeps the two lists equal).
    kernel_backend: Literal["auto", "reference", "triton"] | None = None
    quantization: Literal["int8"] | None = Field(
        None, description="int8: W8A8 decoder matmuls on the CPU (faster, not bit-identical to float32)."
    )
    batch_invariant: bool | None = Field(
        None, description="A row's tokens do not depend on what else shares its steps (default true; CPU and "
                          "Triton paths); false keeps the faster few-row matmul and dense prefill attention "
                          "paths (on a GPU cuBLAS and split-KV attention), whose numbers depend on the step."
    )
    max_in_flight: int | None = Field(
        None, ge=1, description="Rows admitted but unfinished at once (default: 2 x max_num_seqs)."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="On a GPU: the share of its memory the engine may fill (weights and KV cache)."
    )
    max_logprobs: int | None = Field(None, ge=0, description="The most sampling.logprobs / prompt_logprobs a row may ask (20).")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        from forge_batch.engine.device import device_option_problem

        problem = device_option_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        from forge_batch.engine.device import dtype_option_problem

        problem = dtype_option_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``LLM(...)``: only the options that were set."""
        return {k: v for k, v in self.model_dump(exclude={"max_in_flight"}).items() if v is not None}


# What ``pip install`` adds the Ray executor with (named in the error when Ray is missing).
RAY_EXTRA = 'pip install "forge-batch[ray]"'
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


class ExecutorSpec(_Strict):
    """Where the job's engines run: ``local`` (one engine in this process) or ``ray`` (``replicas`` engines,
    each an actor of a Ray Data actor pool, on one machine's GPUs or a cluster; docs/scale-out.md)."""

    kind: Literal["local", "ray"] = "local"
    replicas: int = Field(1, ge=1, description="ray: engine replicas (actors), each one LLM.")
    num_gpus_per_replica: float = Field(0, ge=0, description="ray: GPUs each replica reserves (1 per engine on a GPU node).")
    num_cpus_per_replica: float = Field(1, gt=0, description="ray: CPUs each replica reserves (its torch threads).")
    address: str | None = Field(
        None, description="ray: auto (the cluster `ray start` made here), ray://host:port (Ray Client), host:port "
                          "(a cluster's GCS address) or null (RAY_ADDRESS, else a cluster `ray start` made here, else a new "
                          "local Ray instance, stopped at the end).")
    batch_rows: int = Field(256, ge=1, description="ray: input rows per shard: one map_batches call and one committed part.")

    @field_validator("address")
    @classmethod
    def _known_address(cls, v: str | None) -> str | None:
        if v is None or v == "auto" or (v.startswith("ray://") and _HOST_PORT.match(v[len("ray://"):])) or _HOST_PORT.match(v):
            return v
        raise ValueError(f"must be auto, ray://host:port, host:port or null, got {v!r}")

    @model_validator(mode="after")
    def _ray_options_need_ray(self) -> ExecutorSpec:
        if self.kind == "local":
            given = sorted(self.model_fields_set - {"kind"})
            if given:
                raise ValueError(f"{', '.join(given)} only apply to kind: ray (this executor is kind: local)")
        return self


def ray_missing_problem() -> str | None:
    """Why the Ray executor cannot run here (Ray Data or the package it needs beyond ours is not installed),
    or None. Found without importing Ray, which takes seconds: the run imports it while Ray starts."""
    missing = None
    ray_spec = _find_spec("ray")
    if ray_spec is None:
        missing = "ray"
    elif ray_spec.submodule_search_locations is None or importlib.machinery.PathFinder.find_spec(
            "ray.data", list(ray_spec.submodule_search_locations)) is None:
        missing = "ray.data"
    elif _find_spec("pandas") is None:  # Ray Data imports it (numpy, pyarrow and fsspec are ours too)
        missing = "pandas"
    if missing is None:
        return None
    return f"executor kind ray needs Ray Data, which is not installed (no module named {missing!r}); install it with {RAY_EXTRA}"


def _find_spec(name: str) -> Any:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a module set to None in sys.modules, or one without a spec
        return None


class MetricsSpec(_Strict):
    """Prometheus metrics of a run (the built-in ``metrics`` plugin): a node_exporter textfile-collector file
    and/or pushes to a Pushgateway, during the run (every ``interval_s``) and at its end."""

    textfile: str | None = Field(None, description="A .prom file in node_exporter's --collector.textfile.directory.")
    pushgateway: str | None = Field(None, description="Pushgateway URL, e.g. http://pushgateway:9091.")
    job: str = Field("forge_batch", min_length=1, description="The Pushgateway job (grouping key).")
    interval_s: float = Field(15.0, ge=0, description="Seconds between updates during the run.")

    @field_validator("textfile")
    @classmethod
    def _prom_file(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".prom"):
            raise ValueError("must end with .prom (node_exporter's textfile collector reads only *.prom files)")
        return v

    @field_validator("pushgateway")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"must be an http:// or https:// URL with a host, got {v!r}")
        return v

    @model_validator(mode="after")
    def _somewhere(self) -> MetricsSpec:
        if self.textfile is None and self.pushgateway is None:
            raise ValueError("say where metrics go: textfile and/or pushgateway")
        return self


class JobSpec(_Strict):
    """A whole job. See ``jobs/`` for runnable examples and ``docs/plugins.md`` for plugin hooks."""

    name: str | None = None
    model: str = Field(
        "smollm2-135m-instruct",
        description="The default model's alias, a .gguf file, a model directory, or a Hugging Face repo id "
                    "(org/name, org/name@revision) from the local cache, downloaded when missing.",
    )
    model_revision: str | None = Field(
        None, description="The Hugging Face revision (branch, tag or commit) of a repo-id model; same as org/name@revision."
    )
    input: InputSpec
    output: OutputSpec
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    constraint: ConstraintSpec | None = None
    engine: EngineSpec = Field(default_factory=EngineSpec)
    plugins: list[str] = Field(default_factory=list)
    max_error_rate: float = Field(0.1, ge=0, le=1)
    metrics: MetricsSpec | None = None
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)

    # Where the job file lives (relative paths were resolved against it); not a job option.
    _base_dir: Path | None = None

    @field_validator("model")
    @classmethod
    def _model_named(cls, v: str) -> str:
        # An empty name would resolve to the job's folder and load whatever .gguf happens to be there.
        if not v.strip():
            raise ValueError("model is empty: name the default model (smollm2-135m-instruct), a .gguf file or a model directory")
        return v

    @model_validator(mode="before")
    @classmethod
    def _row_fields_out_of_sampling(cls, data: Any) -> Any:
        """``sampling.constraint: {regex_field: col}`` (a per-row column, as the README writes it) is the same as
        ``constraint: {regex_field: col}``."""
        sampling = data.get("sampling") if isinstance(data, dict) else None
        inner = sampling.get("constraint") if isinstance(sampling, dict) else None
        top = data.get("constraint") if isinstance(data, dict) else None
        if not isinstance(inner, dict) or not (top is None or isinstance(top, dict)):
            return data
        fields = {k: v for k, v in inner.items() if isinstance(k, str) and k.endswith("_field")}
        if not fields or set(fields) & set(top or {}):
            return data
        rest = {k: v for k, v in inner.items() if k not in fields}
        return {**data, "sampling": {**sampling, "constraint": rest or None}, "constraint": {**(top or {}), **fields}}

    def model_ref(self) -> str:
        """``model`` as the engine takes it: with ``@model_revision`` when a revision is set."""
        return f"{self.model}@{self.model_revision}" if self.model_revision else self.model

    @model_validator(mode="after")
    def _revision_given_once(self) -> JobSpec:
        if self.model_revision is not None:
            from forge_batch.models.registry import split_repo_id

            repo = split_repo_id(self.model)
            if repo is None:
                raise ValueError(f"model_revision is for a Hugging Face repo id (org/name); model is {self.model!r}")
            if repo[1] is not None:
                raise ValueError(f"revision given twice: model {self.model!r} and model_revision {self.model_revision!r}; keep one")
        return self

    def sampling_dict(self) -> dict[str, Any]:
        """The job-wide sampling options as SamplingParams keyword arguments (job-wide constraint folded in)."""
        d = self.sampling.model_dump()
        level = self.constraint.job_level() if self.constraint is not None else None
        if level is not None:
            d.update(constraint_options(*level))
        return d

    def job_constraint(self) -> tuple[str, Any] | None:
        """The constraint every row gets, from ``constraint:`` or ``sampling.*``; None if none."""
        return constraint_of(self.sampling_dict())

    @model_validator(mode="after")
    def _logprobs_within_engine_limit(self) -> JobSpec:
        limit = self.engine.max_logprobs if self.engine.max_logprobs is not None else 20
        for key in ("logprobs", "prompt_logprobs"):
            value = getattr(self.sampling, key)
            if value is not None and value > limit:
                raise ValueError(f"sampling.{key}={value} is more than engine.max_logprobs ({limit}); raise that")
        return self

    @model_validator(mode="after")
    def _constraint_given_once(self) -> JobSpec:
        level = self.constraint.job_level() if self.constraint is not None else None
        if level is not None:
            given = [f"constraint.{level[0]}", *(f"sampling.{k}" for k in constraints_given(dict(self.sampling)))]
            problem = one_constraint_problem(given)
            if problem is not None:
                raise ValueError(f"constraint given twice (top level and in sampling): {problem}")
        return self

    def fingerprint(self) -> str:
        """Hash of the options that change what is written for a row.

        A resumed run must have the same fingerprint as the run that wrote the committed parts, otherwise the
        output would mix two different jobs. Engine options, part sizes and the error budget may change freely.
        """
        d = self.model_dump(mode="json")
        relevant = {
            "model": self.model_ref(),
            "input": {k: v for k, v in d["input"].items() if k not in ("path", "batch_size", "limit")},
            "output": {k: d["output"][k] for k in ("format", "keep_fields", "include_prompt")},
            # options added later count only when set, so that outputs written before them still resume
            "sampling": {k: v for k, v in d["sampling"].items()
                         if not (k in _LATER_SAMPLING_KEYS and v == SamplingSpec.model_fields[k].default)},
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def plugin_search_paths(self) -> list[str]:
        """Where plugins named by module are looked for besides sys.path: the job's folder, the cwd."""
        return [str(p) for p in (self._base_dir, Path.cwd()) if p is not None]

    def display_name(self) -> str:
        return self.name or Path(self.output.path).name


# ---------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file: the dotted key path (``""`` for the whole file) and a message."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class JobError(ValueError):
    """A job file that cannot run; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}{len(self.problems)} problem(s) in the job:\n{lines}")


_ENV_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(
    value: Any, env: Mapping[str, str] | None = None, path: str = "", problems: list[Problem] | None = None
) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed job; ``$${`` is a literal ``${``.

    An unset variable without a default is a problem at that key's path (the value is left as written).
    """
    env = os.environ if env is None else env
    problems = [] if problems is None else problems
    if isinstance(value, str):
        if "$" not in value:
            return value

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name, default = m.group(1), m.group(2)
            if name in env and (env[name] or default is None):  # as the shell's :-, an empty value takes the default
                return env[name]
            if default is not None:
                return default
            problems.append(Problem(path, f"environment variable {name} is not set (write ${{{name}:-default}})"))
            return m.group(0)

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate_env(v, env, _join(path, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"sampling.temperature=0"`` -> (["sampling", "temperature"], 0). The value is parsed as YAML, then
    kept as the text it was where the key's type is text and YAML made it something else
    (``name=2024-06-01`` stays a string, not a date; ``model_revision=1.0`` not a float)."""
    if "=" not in text:
        raise ValueError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set has an empty key in {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        if raw.strip().startswith(("[", "{")):  # meant as a list or a mapping: not the text it happens to be
            raise ValueError(f"--set {key}: {raw.strip()!r} is not a valid YAML list or mapping "
                             f"({getattr(e, 'problem', e)}); quote it to mean the text") from None
        value = raw
    keys = key.split(".")
    return keys, _as_the_keys_type(keys, raw.strip(), value)


def _annotation_at(keys: Sequence[str]) -> Any:
    """The type annotation of the job option at ``keys`` (None when the path is not a declared option)."""
    import types
    import typing

    model: Any = JobSpec
    annotation: Any = None
    for k in keys:
        if model is None or k not in model.model_fields:
            return None
        annotation = model.model_fields[k].annotation
        model = None
        candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                model = c
    return annotation


def _scalar_types(annotation: Any) -> set[type]:
    """The scalar types an annotation accepts (str, int, float, bool, NoneType), unions and Literals unfolded."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in typing.get_args(annotation)))
    if origin is Literal:
        return {type(v) for v in typing.get_args(annotation)}
    return {annotation} if annotation in (str, int, float, bool, type(None)) else set()


def _as_the_keys_type(keys: Sequence[str], raw: str, value: Any) -> Any:
    if isinstance(value, (str, list, dict)) or value is None:
        return value
    accepted = _scalar_types(_annotation_at(keys))
    if str not in accepted:
        return value
    fits = (bool in accepted) if isinstance(value, bool) else (
        int in accepted or float in accepted if isinstance(value, int) else float in accepted if isinstance(value, float) else False
    )
    return value if fits else raw


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> list[Problem]:
    """Apply ``--set`` overrides to a parsed job in place; returns the ones that could not be applied."""
    problems: list[Problem] = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ValueError as e:
            problems.append(Problem("--set", str(e)))
            continue
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[k] = nxt
            if not isinstance(nxt, dict):
                problems.append(Problem(".".join(keys[: i + 1]), f"--set {text!r}: not a mapping"))
                break
            node = nxt
        else:
            node[keys[-1]] = value
    return problems


def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = _join(out, part)
    return out


def _pydantic_problems(err: ValidationError) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in ("str", "int")))]
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a job option)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] in ("literal_error", "enum"):
            msg = f"{msg}; got {e['input']!r}"
        if e["type"] == "string_type" and isinstance(e.get("input"), bool):  # YAML 1.1's yes / no / on / off
            msg = f"{msg}; got {e['input']!r} (YAML reads yes, no, on, off, true and false unquoted as booleans: quote it)"
        problems.append(Problem(_format_loc(loc), msg))
    # Several union members can report the same location; keep the first message for each.
    seen: set[str] = set()
    unique = []
    for p in problems:
        if p.path not in seen:
            seen.add(p.path)
            unique.append(p)
    return unique


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or os.sep in s or s.endswith((".gguf", ".py"))


def _is_repo_id(model: str) -> bool:
    """``org/name`` that is not a path next to the job file: a Hugging Face repo id, resolved by the registry."""
    from forge_batch.models.registry import split_repo_id

    return split_repo_id(model) is not None


def _resolve(base: Path, p: str) -> str:
    from forge_batch.io.remote import file_url_path, is_url

    if is_url(p):
        local = file_url_path(p)
        if local is None:
            return p  # a remote URL: never a folder named after its scheme
        p = local
    expanded = os.path.expanduser(p)
    if os.path.isabs(expanded):
        return expanded
    return str((base / expanded).resolve()) if not glob.has_magic(expanded) else str(base.resolve() / expanded)


def resolve_paths(job: JobSpec, base_dir: Path) -> JobSpec:
    """Make input/output/model/plugin paths absolute, relative to the job file's folder."""
    job.input.path = _resolve(base_dir, job.input.path)
    job.output.path = _resolve(base_dir, job.output.path)
    if (base_dir / os.path.expanduser(job.model)).exists() or (_looks_like_path(job.model) and not _is_repo_id(job.model)):
        job.model = _resolve(base_dir, job.model)
    job.plugins = [_resolve(base_dir, p) if p.endswith(".py") else p for p in job.plugins]
    if job.metrics is not None and job.metrics.textfile is not None:
        job.metrics.textfile = _resolve(base_dir, job.metrics.textfile)
    job._base_dir = base_dir
    return job


def job_from_dict(
    data: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    source: str | None = None,
) -> JobSpec:
    """Validate a parsed job (after overrides and ``${ENV}``), raising :class:`JobError` with every problem."""
    if not isinstance(data, Mapping):
        raise JobError([Problem("", f"a job must be a mapping of options, got {type(data).__name__}")], source)
    raw = json.loads(json.dumps(data, default=str)) if not isinstance(data, dict) else _deepcopy(data)
    problems = apply_overrides(raw, overrides)
    raw = interpolate_env(raw, env, "", problems)
    job: JobSpec | None = None
    try:
        job = JobSpec.model_validate(raw)
    except ValidationError as e:
        problems.extend(_pydantic_problems(e))
    if problems or job is None:
        raise JobError(problems, source)
    return resolve_paths(job, Path(base_dir) if base_dir is not None else Path.cwd())


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def read_job_file(path: str | os.PathLike[str], *, duplicates: list[Problem] | None = None) -> dict[str, Any]:
    """Parse a job file (YAML, which includes JSON) into a dict; raises JobError naming the line. A key given
    twice is one too, unless ``duplicates`` collects those problems (the dict then holds YAML's reading: the
    last value)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise JobError([Problem("", f"cannot read job file: {e}")], str(path)) from None
    except UnicodeDecodeError as e:
        raise JobError(
            [Problem("", f"{path} is not a text file (byte 0x{e.object[e.start]:02x} at offset {e.start} is not UTF-8); "
                         "a job file is YAML or JSON")],
            str(path),
        ) from None
    try:
        found = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        line = text.splitlines()[mark.line] if mark is not None and mark.line < len(text.splitlines()) else ""
        hint = "; quote a ${VAR} inside braces (\"${VAR}\"): YAML reads its { as a mapping" if "${" in line else ""
        raise JobError([Problem("", f"not valid YAML{where}: {getattr(e, 'problem', e)}{hint}")], str(path)) from None
    if found:
        # YAML keeps the last of two equal keys: a second `sampling:` block would silently replace the first.
        if duplicates is None:
            raise JobError(found, str(path))
        duplicates.extend(found)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobError([Problem("", f"a job file must hold a mapping, got {type(data).__name__}")], str(path))
    return data


def _duplicate_keys(node: yaml.Node | None, path: str = "") -> list[Problem]:
    """Keys given twice in one mapping of a composed YAML document, with both lines.

    A key after a ``<<:`` merge is YAML's way to override the merged value, not a duplicate."""
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_line:
                problems.append(Problem(
                    _join(path, key_node.value),
                    f"duplicate key (line {first_line[key]} and line {line}); give each key once",
                ))
            else:
                first_line[key] = line
            problems.extend(_duplicate_keys(value_node, _join(path, key_node.value)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems.extend(_duplicate_keys(item, f"{path}[{i}]"))
    return problems


def load_job(
    path: str | os.PathLike[str], overrides: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> JobSpec:
    """Load, override, interpolate and validate a job file. Raises :class:`JobError` with every problem."""
    data = read_job_file(path)
    return job_from_dict(data, base_dir=Path(path).resolve().parent, overrides=overrides, env=env, source=str(path))


def load_job_for_checks(
    path: str | os.PathLike[str], overrides: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> tuple[JobSpec | None, list[Problem]]:
    """``load_job`` for ``validate``, which reports every problem at once: the job's problems, and the job as if
    the keys they name were not given (their defaults), so that the model, input and output checks still run
    on the rest. The job is None where it cannot be had so (the file itself, a required key, the whole job)."""
    try:
        return load_job(path, overrides, env), []
    except JobError as e:
        problems = e.problems
    duplicates: list[Problem] = []
    try:
        raw = read_job_file(path, duplicates=duplicates)
    except JobError:
        return None, problems
    if apply_overrides(raw, overrides):
        return None, problems
    raw = interpolate_env(raw, env, "", [])
    base = Path(path).resolve().parent
    current = problems
    if duplicates:  # the rest is checked as YAML reads it (the last of two equal keys)
        try:
            return resolve_paths(JobSpec.model_validate(raw), base), problems
        except ValidationError as e:
            current = _pydantic_problems(e)
            problems = problems + current
    for _ in range(8):  # each round drops the keys the last one refused (a dropped key may hide another)
        keys = [_key_of(p.path) for p in current]
        if not keys or not all(keys) or not any([_drop_key(raw, key) for key in keys]):
            return None, problems
        if ["output", "path"] in keys and isinstance(raw.get("output"), dict):
            raw["output"]["path"] = UNCHECKED_OUTPUT  # required: a stand-in, so that the rest is checked
        try:
            return resolve_paths(JobSpec.model_validate(raw), base), problems
        except ValidationError as e:
            current = _pydantic_problems(e)  # (what dropping a key caused: not the user's problems)
    return None, problems


# What load_job_for_checks puts in place of an output.path it refused (validate says nothing of the stand-in).
UNCHECKED_OUTPUT = ".forge-batch-refused-output-path"


def _key_of(path: str) -> list[str]:
    """The key path a problem names, up to its first list index (``output.keep_fields[0]``: output, keep_fields)."""
    keys = []
    for part in path.split(".") if path else ():
        name, bracket, _ = part.partition("[")
        keys.append(name)
        if bracket:
            break
    return keys


def _drop_key(data: Any, keys: list[str]) -> bool:
    for key in keys[:-1]:
        data = data.get(key) if isinstance(data, dict) else None
    if isinstance(data, dict) and keys and keys[-1] in data:
        del data[keys[-1]]
        return True
    return False


# ---------------------------------------------------------------------------------------------------------
# Checks that need the file system but no plugin (the plugin-dependent ones: forge_batch.runner.checks)


INPUT_EXTENSIONS = (".jsonl", ".json", ".ndjson", ".parquet", ".jsonl.gz")


def input_files(pattern: str) -> list[str]:
    """The files an ``input.path`` names: a file, a directory (its .jsonl/.parquet files), or a glob, local or
    behind a URL. Sorted, so row positions are stable between runs. Raises OSError for a URL that cannot be
    listed (its protocol's package missing, no access)."""
    from forge_batch.io.remote import is_url, list_files

    if is_url(pattern):
        return list_files(pattern, INPUT_EXTENSIONS)
    if glob.has_magic(pattern):
        return sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if os.path.isdir(pattern):
        found = []
        for root, dirs, files in os.walk(pattern):
            dirs[:] = sorted(d for d in dirs if not hidden_from_readers(d))
            for f in sorted(files):
                if not hidden_from_readers(f) and f.endswith(INPUT_EXTENSIONS):
                    found.append(os.path.join(root, f))
        return found
    return [pattern] if os.path.isfile(pattern) else []


class PrintedValueError(ValueError):
    """A value a template prints that is no text (a null, bytes that are not UTF-8): that row's problem."""


def _printed(value: Any) -> Any:
    """What a template prints of a value: bytes (a binary column) as their UTF-8 text; a null raises, since
    jinja would print "None" into the prompt (the row fails as a template_error instead)."""
    if value is None:
        raise PrintedValueError("a value the template prints is null (guard it with {% if ... %} or | default('', true))")
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise PrintedValueError("a value the template prints is bytes that are not UTF-8 text") from None
    return value


def compile_template(template: str) -> Any:
    """Compile an input template in jinja's sandbox; undefined columns and printed nulls raise when rendered,
    bytes print as their UTF-8 text."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, finalize=_printed)
    env.filters.setdefault("tojson", lambda v: json.dumps(v, ensure_ascii=False))
    return env.from_string(template)


def sampling_problem(job: JobSpec, *, with_constraint: bool = True) -> Problem | None:
    """Why SamplingParams refuses the job's sampling options, or None. ``with_constraint=False`` leaves the
    constraint out, for a caller that checks it with its kind's own, more precise check."""
    from forge_batch.engine.sampling_params import SamplingParams

    try:
        s = job.sampling_dict()
        s.pop("extra", None)
        if not with_constraint:
            s.update(dict.fromkeys((*BUILTIN_CONSTRAINT_KINDS, "constraint")))
        SamplingParams(**s)
    except (TypeError, ValueError) as e:
        return Problem("sampling", str(e))
    return None


def check_job(job: JobSpec, *, check_model: bool = True) -> list[Problem]:
    """The problems that stop ``job`` from running and need no plugin to find: input files, the template,
    sampling options, the model, the engine options, the output path. Runs nothing.

    ``check_model=False`` skips resolving ``model`` (a custom engine factory decides what the name means).
    What needs the registered readers, writers, samplers and constraint kinds is checked a layer up, with
    the plugin manager (``forge_batch.runner.checks``)."""
    problems: list[Problem] = []
    files: list[str] = []
    try:
        files = input_files(job.input.path)
    except OSError as e:
        problems.append(Problem("input.path", str(e)))
    else:
        if not files:
            problems.append(Problem("input.path", f"no input file matches {job.input.path}"))

    if job.input.template is not None:
        try:
            compile_template(job.input.template)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            line = getattr(e, "lineno", None)
            problems.append(Problem("input.template", f"template does not compile{f' (line {line})' if line else ''}: {e}"))
    if job.input.id_field in RESERVED_COLUMNS:
        problems.append(Problem("input.id_field", f"{job.input.id_field!r} clashes with an output column"))
    if job.input.id_field is None and "id" in job.output.keep_fields:  # (the output's id column without one)
        problems.append(Problem("output.keep_fields", "'id' is the output's id column (the row's position, as "
                                "input.id_field is null): set input.id_field: id to use the input's ids"))

    problem = sampling_problem(job)
    if problem is not None:
        problems.append(problem)

    if check_model:
        problems.extend(_check_model(job.model_ref()))
    if job.executor.kind != "ray":  # under Ray the replicas' nodes have the devices, not this one
        problems.extend(_check_engine(job.engine))
    if job.executor.kind == "ray":
        missing = ray_missing_problem()
        if missing is not None:
            problems.append(Problem("executor.kind", missing))

    out = Path(job.output.path)
    if job.output.single_file():
        problem = (f"{out} is a directory; an openai-batch output ending in .jsonl is one file" if out.is_dir()
                   else _output_among_inputs(out, job.input.path, files))
        if problem is not None:
            problems.append(Problem("output.path", problem))
    elif out.exists() and not out.is_dir():
        problems.append(Problem("output.path", f"{out} exists and is not a directory"))
    else:  # the output folder, and its state folder beside it (in its parent), are created at the start of run
        problem = _cannot_create(out) or _cannot_create(out.parent) or _output_among_inputs(out, job.input.path, files)
        if problem is not None:
            problems.append(Problem("output.path", problem))
    if job.metrics is not None and job.metrics.textfile is not None:
        folder = Path(job.metrics.textfile).parent
        if not folder.is_dir():
            problems.append(Problem("metrics.textfile", f"{folder} is not a folder (node_exporter's textfile folder must exist)"))
        elif not os.access(folder, os.W_OK | os.X_OK):
            problems.append(Problem("metrics.textfile", f"{folder} is not writable"))
    return problems


def _output_among_inputs(out: Path, input_path: str, files: list[str]) -> str | None:
    """Why parts written to ``out`` would mix with the input (the next run would read them as input, or refuse
    it as a "different input"); None when they would not."""
    inside = next((f for f in files if _relative(Path(f), out) is not None), None)
    if inside is not None and not out.is_dir():  # a single-file output
        return f"{out} is this job's input file: the results would replace it; give the output a file of its own"
    if inside is not None:
        return f"{out} holds input files ({inside}): give the output a folder of its own"
    rel = _relative(out, Path(input_path)) if os.path.isdir(input_path) else None
    # a folder named .x or _x is skipped when an input folder is listed: the output may live there
    if rel is not None and not any(hidden_from_readers(part) for part in rel.parts):
        return (f"{out} is inside the input folder {input_path}: its parts would be read as input by the next run; "
                "give the output a folder of its own")
    return None


def _relative(path: Path, folder: Path) -> Path | None:
    """``path`` relative to ``folder`` when it is inside it (or is it), else None."""
    try:
        return path.resolve().relative_to(folder.resolve())
    except (OSError, ValueError):  # not inside, a URL, an unreadable path
        return None


def _cannot_create(path: Path) -> str | None:
    """Why ``path`` could not be written (made, if it is not there): a file where a folder on its way should be,
    or a folder that is not writable (permissions, a read-only file system); None when it can."""
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot create {path}: {ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create {path}: {ancestor} is not writable"
    return None


def _check_model(model: str) -> list[Problem]:
    from forge_batch.models.registry import check_model

    try:
        check_model(model)
    except (OSError, ValueError) as e:  # not found; not GGUF, corrupt or truncated (GGUFError)
        return [Problem("model", str(e))]
    return []


def _check_engine(engine: EngineSpec) -> list[Problem]:
    """What the engine refuses on this machine: a CUDA device torch cannot see, int8 with a device or dtype
    other than CPU float32, the Triton backend without a GPU, a GPU memory share on the CPU. torch is imported
    only when one of those options is set."""
    from_env = os.environ.get("FORGE_BATCH_KERNELS")
    if engine.kernel_backend is None and from_env is not None and from_env not in KERNEL_BACKENDS:
        return [Problem("engine.kernel_backend", f"FORGE_BATCH_KERNELS={from_env!r}: one of {', '.join(KERNEL_BACKENDS)}")]
    if not (engine.device.startswith("cuda") or engine.quantization == "int8" or engine.kernel_backend == "triton"
            or engine.gpu_memory_utilization is not None):
        return []
    from forge_batch.engine.device import (
        gpu_memory_problem,
        int8_problem,
        resolve_device,
        resolve_dtype,
        triton_problem,
    )

    try:
        device = resolve_device(engine.device)
    except ValueError as e:
        return [Problem("engine.device", str(e))]
    problem = gpu_memory_problem(engine.gpu_memory_utilization, device)
    if problem is not None:
        return [Problem("engine.gpu_memory_utilization", problem)]
    problem = triton_problem(engine.kernel_backend or "auto", device)
    if problem is not None:
        return [Problem("engine.kernel_backend", problem)]
    if engine.quantization == "int8":
        problem = int8_problem(engine.device, engine.dtype, device, resolve_dtype(engine.dtype, device), job_options=True)
        if problem is not None:
            return [Problem("engine.quantization", problem)]
    return []

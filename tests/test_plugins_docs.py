"""Every hook in forge_batch/hookspecs.py is documented where declared and in docs/plugins.md with its
exact signature; this test fails when a hook is added without its documentation (or docs go stale)."""

from __future__ import annotations

import re
from pathlib import Path

from forge_batch.plugin_manager import hook_signature, hookspec_functions

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"

EXPECTED_HOOKS = {
    "register_samplers", "register_constraints", "register_readers", "register_writers", "logits_processors",
    "prepare_request", "process_result", "job_start", "job_end",
}


def test_the_contract_has_the_hooks_the_product_needs() -> None:
    assert EXPECTED_HOOKS <= set(hookspec_functions())


def test_every_hook_has_a_docstring_where_declared() -> None:
    for name, fn in hookspec_functions().items():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"hook {name} needs a docstring in hookspecs.py"


def test_every_hook_is_documented_with_its_exact_signature() -> None:
    docs = DOCS.read_text()
    for name, fn in hookspec_functions().items():
        assert f"### `{name}`" in docs, f"docs/plugins.md has no section for hook {name!r}"
        section = docs.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        signature = hook_signature(fn)
        assert signature in section, f"docs/plugins.md section {name!r} must show the signature:\n{signature}"


def test_docs_do_not_document_hooks_that_do_not_exist() -> None:
    documented = set(re.findall(r"^### `(\w+)`", DOCS.read_text(), flags=re.M))
    assert documented == set(hookspec_functions())


def test_docs_list_every_error_kind_and_only_those() -> None:
    from forge_batch.contract import ErrorKind

    jobs_doc = (DOCS.parent / "jobs.md").read_text()
    section = jobs_doc.split("### Error kinds", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M)) - {"error_kind"}  # the header
    assert documented == {k.value for k in ErrorKind}


def test_the_contract_imports_nothing_of_forge_batch() -> None:
    import ast

    import forge_batch.contract as contract

    tree = ast.parse(Path(contract.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("forge_batch"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("forge_batch") for a in node.names)

"""The decision vocabulary table in docs/core.md against the decisions the code records.

Every `record(layer, outcome, ...)` / `Decision(layer, outcome, ...)` call in `nexus_middleware` and
`sample_gateway` is read with `ast`; a layer or outcome given as a string literal, or as a module-level string
constant (`_LAYER = "auth"`), must appear in the table, so the docs cannot drift from the code. Outcomes
computed at run time (`admission`, `outcome`) cannot be read statically; their documented values are checked
in each layer's own tests.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nexus_middleware", "sample_gateway")
# `RequestContext.record` builds the `Decision` from its own arguments: the one call with no layer of its own.
GENERIC = {("nexus_middleware/context.py", "record")}


def _constants(tree: ast.Module) -> dict[str, str]:
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            found.update({t.id: value.value for t in targets if isinstance(t, ast.Name)})
    return found


def _string(node: ast.expr | None, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def _enclosing_functions(tree: ast.Module) -> dict[ast.AST, str]:
    # `ast.walk` is breadth-first: an inner function is visited after its outer one and overwrites it.
    owner: dict[ast.AST, str] = {}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(function):
                owner[node] = function.name
    return owner


def recorded_decisions() -> tuple[set[tuple[str, str]], set[str], list[str]]:
    """Statically known (layer, outcome) pairs, statically known layers, and calls with no known layer."""
    pairs: set[tuple[str, str]] = set()
    layers: set[str] = set()
    unknown: list[str] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
            constants = _constants(tree)
            owners = _enclosing_functions(tree)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name not in ("record", "Decision"):
                    continue
                keywords = {k.arg: k.value for k in node.keywords}
                layer_node = node.args[0] if node.args else keywords.get("layer")
                outcome_node = node.args[1] if len(node.args) > 1 else keywords.get("outcome")
                layer = _string(layer_node, constants)
                if layer is None:
                    if (relative, owners.get(node, "")) not in GENERIC:
                        unknown.append(f"{relative}:{node.lineno}: {ast.unparse(node)}")
                    continue
                layers.add(layer)
                outcome = _string(outcome_node, constants)
                if outcome is not None:
                    pairs.add((layer, outcome))
    return pairs, layers, unknown


def documented_vocabulary() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "core.md").read_text(encoding="utf-8")
    section = text.split("### Decision vocabulary", 1)[1].split("\n#", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.fullmatch(r"`\w+`", cells[0]):
            continue
        table[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", cells[1]))
    return table


def test_the_extractor_sees_literals_and_module_constants() -> None:
    pairs, layers, _ = recorded_decisions()
    assert ("identity", "dropped") in pairs  # literal layer and outcome
    assert ("body_limit", "deny") in pairs  # layer from `_LAYER = "body_limit"`
    assert "breaker" in layers  # literal layer, outcome computed at run time


def test_every_recorded_layer_and_outcome_is_in_the_docs_table() -> None:
    pairs, layers, unknown = recorded_decisions()
    table = documented_vocabulary()
    assert not unknown, f"decisions whose layer is not a literal or module constant: {unknown}"
    missing_layers = sorted(layers - table.keys())
    missing_outcomes = sorted(
        (layer, outcome) for layer, outcome in pairs if outcome not in table.get(layer, ())
    )
    assert not missing_layers, f"add these layers to the table in docs/core.md: {missing_layers}"
    assert not missing_outcomes, f"add these outcomes to the table in docs/core.md: {missing_outcomes}"


def test_every_documented_layer_is_recorded_somewhere() -> None:
    _, layers, _ = recorded_decisions()
    assert sorted(documented_vocabulary().keys() - layers) == []

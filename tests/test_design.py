"""What DESIGN.md fixes about the code's shape, checked against the code itself.

- "The streaming writer knows nothing of the journal: it only copies row groups": nothing the
  writer imports, directly or not, reaches the journal, the states, the merge driver or above.
- `journal/` is the journal's contract, with one copy of the schema: the package loads its
  migrations from there, and the transitions `journal/STATES.md` lists are the ones the code
  accepts.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fgm_consolidator import journal
from fgm_consolidator.errors import IllegalTransitionError
from fgm_consolidator.states import ALLOWED, MergeState, check_transition

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fgm_consolidator"
CONTRACT = ROOT / "journal"

# Everything that knows of merges as journaled steps; the writer must reach none of it.
ABOVE_THE_WRITER = {"journal", "states", "merge", "recovery", "plan", "scan", "service", "cli"}


def package_imports(module: str) -> set[str]:
    """The package's modules that `module` imports, at any depth of the file."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "fgm_consolidator"
        ):
            parts = (node.module or "").split(".")
            found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    return {name for name in found if (PACKAGE / f"{name}.py").exists()}


def reachable(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in package_imports(todo.pop()) - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_the_writer_knows_nothing_of_the_journal() -> None:
    reached = reachable("writer")
    assert {"durable", "clustering", "schemas"} <= reached  # the walk does find imports
    assert reached & ABOVE_THE_WRITER == set()


def test_the_walk_sees_an_import_of_the_journal() -> None:
    """The check above can fail: merge, which drives the journal, is seen to reach it."""
    assert "journal" in reachable("merge")


def test_the_package_loads_the_schema_from_the_journal_folder() -> None:
    shipped = PACKAGE / "migrations"
    assert shipped.resolve() == (CONTRACT / "migrations").resolve()  # one copy, not two
    on_disk = sorted(CONTRACT.glob("migrations/*.sql"))
    assert on_disk
    loaded = journal._migrations()
    assert [text for _, text in loaded] == [p.read_text(encoding="utf-8") for p in on_disk]
    assert [number for number, _ in loaded] == list(range(1, len(on_disk) + 1))


def test_the_transitions_states_md_lists_are_those_the_code_accepts() -> None:
    text = (CONTRACT / "STATES.md").read_text(encoding="utf-8")
    block = text.split("Allowed transitions", 1)[1].split("```")[1]
    documented: dict[MergeState | None, set[MergeState]] = {}
    for line in block.strip().splitlines():
        source, targets = (part.strip() for part in line.split("->"))
        state = None if source == "(start)" else MergeState(source)
        documented[state] = {MergeState(t.strip()) for t in targets.split("|")}
    accepted: dict[MergeState | None, set[MergeState]] = {
        state: set(targets) for state, targets in ALLOWED.items() if targets
    }
    accepted[None] = {
        state
        for state in MergeState
        for adopted in (False, True)
        if _starts(state, adopted=adopted)
    }
    assert documented == accepted


def _starts(state: MergeState, *, adopted: bool) -> bool:
    try:
        check_transition(1, None, state, adopted=adopted)
    except IllegalTransitionError:
        return False
    return True


def test_every_state_of_the_design_table_is_a_state_of_the_code() -> None:
    """DESIGN.md's recovery table names six states; the code adds needs-attention for what
    recovery cannot prove safe. A state renamed in code would break released journals."""
    text = (CONTRACT / "STATES.md").read_text(encoding="utf-8")
    table = text.split("| state |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"^\| `([a-z-]+)` \|", table, flags=re.MULTILINE))
    assert named == {str(state) for state in MergeState}

"""The core library stands alone: kvp_gym/ never imports agents/ or baselines/, and reads traits, not names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kvp_gym import scorers
from kvp_gym.ranking import Protected, ranking_order

PACKAGE = Path(__file__).resolve().parent.parent / "kvp_gym"
PLUG_INS = {"agents", "baselines"}


def imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_core_never_imports_plug_ins(path: Path) -> None:
    assert not imported_roots(ast.parse(path.read_text(), str(path))) & PLUG_INS


def test_trainable_architectures_are_not_ready_policies(monkeypatch) -> None:
    from kvp_gym.eval.leaderboard import default_policies

    class Architecture:
        needs = frozenset()
        trainable = True

        def __init__(self, width: int) -> None:
            self.width = width

    scorers.available()  # loads the entry points first
    monkeypatch.setitem(scorers._registry, "third-party-architecture", Architecture)
    policies = default_policies()
    assert "third-party-architecture" not in policies and "mlp" not in policies
    assert "oracle" in policies and scorers.is_future_only(scorers.get("oracle"))


def test_protected_and_ranking_rules() -> None:
    real = torch.tensor([[False, True, True, True, True, True, True]])
    assert Protected(sink=2, recent=1).mask(real).tolist() == [[False, True, True, False, False, False, True]]
    assert Protected(sink=4, recent=4).ranked(real).sum() == 0  # overlapping sink and recent count once
    scores = torch.tensor([[1.0, 2.0, 2.0, float("nan"), 2.0, float("-inf"), 0.0]])
    ranked = torch.tensor([[True, True, True, True, True, True, False]])
    assert ranking_order(scores, ranked).tolist() == [[1, 2, 4, 0, 3, 5, 6]]  # ties by position

"""The core library stands alone: kvp_gym/ never imports agents/ or baselines/, and reads traits, not names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kvp_gym import scorers
from kvp_gym.ranking import Protected, ranking_order, shared_head_budgets, top_entries

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


def adakv_by_loops(scores: list[list[float]], kept: int, safeguard: float) -> list[int]:
    """AdaKV's allocation written out: each head's top floor(safeguard * kept), then the best of the rest."""
    floor = int(safeguard * kept)
    counts, rest = [], []
    for head, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        counts.append(floor)
        rest += [(-row[i], head, i) for i in order[floor:]]
    for _, head, _ in sorted(rest)[: len(scores) * (kept - floor)]:
        counts[head] += 1
    return counts


@pytest.mark.parametrize("seed", range(6))
def test_shared_head_budgets_match_their_definition(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    heads, entries = 3, 12
    scores = torch.randn(heads, entries, generator=generator) * torch.tensor([[0.1], [1.0], [3.0]])
    scores[0, :3] = scores[1, 5]  # ties across heads
    kept = int(torch.randint(0, entries + 1, (1,), generator=generator))
    for safeguard in (0.0, 0.2, 0.5, 1.0):
        counts = shared_head_budgets(scores, kept, safeguard)
        assert counts.tolist() == adakv_by_loops(scores.tolist(), kept, safeguard)
        assert int(counts.sum()) == heads * kept and bool((counts >= int(safeguard * kept)).all())
        keep = top_entries(scores, counts)
        assert keep.sum(-1).tolist() == counts.tolist()
        for head in range(heads):  # each head keeps its own best
            if 0 < counts[head] < entries:
                assert bool(scores[head][keep[head]].min() >= scores[head][~keep[head]].max())
    assert shared_head_budgets(scores, kept, 1.0).tolist() == [kept] * heads  # the safeguard at 1: equal budgets


def test_shared_head_budgets_reject_a_budget_past_the_entries() -> None:
    with pytest.raises(ValueError, match="kept must lie in"):
        shared_head_budgets(torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match="safeguard in"):
        shared_head_budgets(torch.zeros(2, 4), 2, 1.5)

"""Monte Carlo tree search over chunks of tokens, guided by a judge (``--sampler mcts`` of online
DPO).

One tree per prompt. A node is a partial completion; a child extends its parent by one chunk of
at most ``chunk_tokens`` tokens sampled from the policy. Each simulation, in every tree:

1. **Selection**: from the root, while the node has ``branching`` children and is not finished,
   step to the child of largest UCT score ``Q + c·sqrt(ln N / n)`` (Q: the child's mean score, n
   its visits, N its parent's, c the exploration constant).
2. **Expansion**: sample one chunk after the selected node: a new child (a chunk that repeats an
   existing child's tokens visits that child instead).
3. **Rollout**: sample the rest of the answer after the child, and score the whole answer with the
   judge (each distinct answer is scored once).
4. **Backup**: every node of the path counts one more visit and adds the score.

A finished node (ending with eos, or at ``max_new_tokens``) is a leaf: reaching it scores its own
answer again. The result per prompt is the ``count`` distinct answers with the highest scores (the
best leaves the search found), repeated cyclically if it found fewer. The samplers and the judge
are batched over the trees: one simulation is one sampling call for the chunks, one for the
rollouts and one judge call. Randomness comes only from ``sample``, so a seeded sampler makes the
search deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["mcts_search"]

# sample(trees, prefixes, max_new_tokens): for each tree index and its partial completion, the
# tokens sampled after it (at most max_new_tokens, up to and including an eos).
Sampler = Callable[[list[int], list[list[int]], int], list[list[int]]]
# score(trees, answers): one finite score per (tree index, whole answer), higher is better.
Judge = Callable[[list[int], list[list[int]]], Sequence[float]]


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    finished: bool
    children: list[_Node] = field(default_factory=list)
    visits: int = 0
    total: float = 0.0


def _select(root: _Node, exploration: float, branching: int) -> list[_Node]:
    path = [root]
    node = root
    while not node.finished and len(node.children) >= branching:
        log_visits = math.log(node.visits)
        node = max(node.children, key=lambda child: child.total / child.visits
                   + exploration * math.sqrt(log_visits / child.visits))
        path.append(node)
    return path


def mcts_search(num_trees: int, *, sample: Sampler, score: Judge, count: int, simulations: int,
                chunk_tokens: int, max_new_tokens: int, eos_id: int, exploration: float = 1.0,
                branching: int = 2) -> list[list[list[int]]]:
    """For each of ``num_trees`` prompts, the ``count`` best distinct answers (token lists) that
    ``simulations`` rounds of the search found; see the module docstring."""
    def finished(tokens: tuple[int, ...], chunk: list[int]) -> bool:
        # An empty chunk cannot grow the answer: the node ends there.
        return not chunk or tokens[-1] == eos_id or len(tokens) >= max_new_tokens

    roots = [_Node((), False) for _ in range(num_trees)]
    found: list[dict[tuple[int, ...], float]] = [{} for _ in range(num_trees)]
    for _ in range(simulations):
        paths = [_select(root, exploration, branching) for root in roots]
        grow = [tree for tree, path in enumerate(paths) if not path[-1].finished]
        if grow:
            chunks = sample(grow, [list(paths[tree][-1].tokens) for tree in grow], chunk_tokens)
            for tree, chunk in zip(grow, chunks):
                node = paths[tree][-1]
                chunk = list(chunk)[:max_new_tokens - len(node.tokens)]
                tokens = node.tokens + tuple(chunk)
                child = next((c for c in node.children if c.tokens == tokens), None)
                if child is None:
                    child = _Node(tokens, finished(tokens, chunk))
                    node.children.append(child)
                paths[tree].append(child)
        answers = {tree: path[-1].tokens for tree, path in enumerate(paths)}
        open_leaves = [tree for tree, path in enumerate(paths) if not path[-1].finished]
        if open_leaves:
            longest = max_new_tokens - min(len(answers[tree]) for tree in open_leaves)
            rests = sample(open_leaves, [list(answers[tree]) for tree in open_leaves], longest)
            for tree, rest in zip(open_leaves, rests):
                answers[tree] += tuple(list(rest)[:max_new_tokens - len(answers[tree])])
        new = [tree for tree in range(num_trees) if answers[tree] not in found[tree]]
        if new:
            for tree, value in zip(new, score(new, [list(answers[tree]) for tree in new])):
                if not math.isfinite(value):
                    raise ValueError(f"the MCTS judge gave a score of {value} (need a finite "
                                     f"number)")
                found[tree][answers[tree]] = float(value)
        for tree, path in enumerate(paths):
            value = found[tree][answers[tree]]
            for node in path:
                node.visits += 1
                node.total += value
    best = []
    for answers in found:
        ranked = sorted(answers, key=lambda answer: -answers[answer])  # stable: first found wins
        best.append([list(ranked[i % len(ranked)]) for i in range(count)])
    return best

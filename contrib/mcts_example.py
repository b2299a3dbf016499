"""Example MCTS driver: a UCT search over edits of a source tree, one oppiefs node per step.

Each tree-search state is an oppiefs snapshot. Expanding a state forks it, applies one
candidate edit (a text replacement in a file), runs the scoring command inside the node,
commits the result as the child's snapshot and drops the node. States that fall out of the
search frontier are pruned, so the store only keeps what the search may revisit.

    .venv/bin/python contrib/mcts_example.py --mount /mnt/state --src /path/to/project \\
        --edits edits.json --score "python -m pytest -q" --iterations 50

``edits.json`` is a list of ``{"file": "pkg/mod.py", "old": "...", "new": "..."}``; the
score of a state is 1.0 when the command exits 0, else 0.0.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from oppiefs.client import Client
from oppiefs.errors import NotFound


@dataclass
class State:
    snapshot: str
    edits: tuple[int, ...]
    parent: State | None = None
    children: dict[int, State] = field(default_factory=dict)
    visits: int = 0
    value: float = 0.0  # sum of rewards backpropagated through this state
    score: float = 0.0  # this state's own reward

    def ucb(self, c: float = 1.4) -> float:
        if not self.visits or self.parent is None:
            return math.inf
        return self.value / self.visits + c * math.sqrt(math.log(self.parent.visits) / self.visits)


def score(path: str, command: str, timeout: float) -> float:
    try:
        res = subprocess.run(command, shell=True, cwd=path, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 0.0
    return 1.0 if res.returncode == 0 else 0.0


def apply_edit(path: str, edit: dict[str, str]) -> bool:
    f = Path(path) / edit["file"]
    try:
        text = f.read_text()
    except OSError:
        return False
    if edit["old"] not in text:
        return False
    f.write_text(text.replace(edit["old"], edit["new"], 1))
    return True


def search(client: Client, root: str, edits: list[dict[str, str]], command: str,
           iterations: int, timeout: float, rng: random.Random) -> tuple[State, State]:
    """Run UCT from ``root``; returns (the search tree's top, the best state found)."""
    top = State(root, ())
    best = top
    for _ in range(iterations):
        state = top
        while state.children and len(state.children) == len(edits):  # select
            state = max(state.children.values(), key=State.ucb)
        untried = [i for i in range(len(edits)) if i not in state.children]
        if not untried:
            break
        action = rng.choice(untried)  # expand: fork, edit, score, commit, drop
        node = client.fork(state.snapshot)
        try:
            applied = apply_edit(node.path, edits[action])
            reward = score(node.path, command, timeout) if applied else 0.0
            child = State(client.commit(node.id), (*state.edits, action), state,
                          score=reward)
        finally:
            client.drop(node.id)
        state.children[action] = child
        child.visits, child.value = 1, reward
        if reward > best.score:
            best = child
        walk: State | None = state  # backpropagate
        while walk is not None:
            walk.visits += 1
            walk.value += reward
            walk = walk.parent
    return top, best


def prune_all_but(client: Client, top: State, keep: State) -> int:
    """Release every explored state except ``keep`` (the top, the import, stays too)."""
    pruned, stack = 0, list(top.children.values())
    while stack:
        s = stack.pop()
        stack.extend(s.children.values())
        if s is not keep:
            try:
                client.prune(s.snapshot)
                pruned += 1
            except NotFound:
                pass  # an identical tree reached twice: already released
    return pruned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mount", default="/mnt/state")
    ap.add_argument("--src", required=True, help="project to search over (imported once)")
    ap.add_argument("--edits", required=True, type=Path)
    ap.add_argument("--score", required=True, help="shell command run in each node")
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    edits = json.loads(args.edits.read_text())
    with Client(args.mount) as client:
        root = client.import_(str(Path(args.src).resolve()))
        top, best = search(client, root, edits, args.score, args.iterations, args.timeout,
                           random.Random(args.seed))
        pruned = prune_all_but(client, top, best)  # keep the import and the winner
        print(json.dumps({"root": root, "best": best.snapshot, "edits": best.edits,
                          "score": best.score, "pruned": pruned}))


if __name__ == "__main__":
    main()

"""A chat's messages as a tree, and its active branch.

Every message has a parent: the message it follows (None for a first message). A reply's
parent is the user message it answers; a user message's parent is the leaf it was appended
to, or, for an edit, the parent of the message it edits. Alternatives (edits of one message,
regenerated replies) are siblings: children of one parent. The *active branch* is the path
from a first message to the chat's leaf.

One rule places a user message that was queued behind a message still unanswered (its
recorded parent is that user message): it follows the first reply to that message started
after it was received, once that reply exists. So a chat whose messages waited their turn
reads as one line (question, answer, question, answer), as it did before messages had
parents. The aggregate, the views and the web layer all read the tree with this module.
Pure and synchronous.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: The ``parent_seq`` of a ``MessageReceived`` recorded before messages had parents: it
#: follows the chat's leaf at that point (seq 1 is the chat's ``Started``, never a message).
LINE = 0


@dataclass(frozen=True, slots=True)
class Node:
    seq: int
    role: str
    #: As recorded (see the module's docstring for a user message queued behind another).
    parent: int | None


class Tree:
    """The messages of one chat, read as a tree."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self.nodes = {n.seq: n for n in nodes}
        replies: dict[int, list[int]] = {}
        for n in sorted(self.nodes.values(), key=lambda n: n.seq):
            if n.role == "assistant" and n.parent is not None:
                replies.setdefault(n.parent, []).append(n.seq)
        #: seq -> the seq of the message it follows (placed: see the docstring)
        self.parent = {seq: self._placed(n, replies) for seq, n in self.nodes.items()}
        self.children: dict[int | None, list[int]] = {}
        for seq in sorted(self.nodes):
            self.children.setdefault(self.parent[seq], []).append(seq)

    def _placed(self, node: Node, replies: dict[int, list[int]]) -> int | None:
        waited_for = self.nodes.get(node.parent) if node.parent is not None else None
        if node.role != "user" or waited_for is None or waited_for.role != "user":
            return node.parent
        return next((r for r in replies.get(waited_for.seq, ()) if r > node.seq), node.parent)

    def path(self, leaf: int | None) -> list[int]:
        """The seqs from a first message to ``leaf``, in order (empty for None or unknown)."""
        path: list[int] = []
        seen: set[int] = set()
        seq = leaf
        while seq is not None and seq in self.nodes and seq not in seen:
            path.append(seq)
            seen.add(seq)
            seq = self.parent[seq]
        path.reverse()
        return path

    def siblings(self, seq: int) -> list[int]:
        """The alternatives of message ``seq``, itself included, oldest first."""
        return self.children.get(self.parent.get(seq), [seq])

    def deepest(self, seq: int) -> int:
        """The newest of the deepest descendants of ``seq`` (``seq`` itself if it has none)."""
        best, frontier = seq, [seq]
        while frontier:
            frontier = [c for s in frontier for c in self.children.get(s, ())]
            if frontier:
                best = max(frontier)
        return best

    def last_reply(self, leaf: int | None) -> int | None:
        """The last reply on the branch ending at ``leaf`` (None when it has none)."""
        return next((s for s in reversed(self.path(leaf)) if self.nodes[s].role == "assistant"),
                    None)

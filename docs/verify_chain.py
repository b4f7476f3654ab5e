#!/usr/bin/env python3
"""Checks the audit chains of an eventchat JSON Lines export, with the standard library only.

    python3 verify_chain.py export.jsonl      (or: ... | python3 verify_chain.py -)

Each line is one event: {"chat_id", "seq", "hash", "stored": {"topic", "state"}, ...}, where
"state" is the base64 of the event's bytes as stored. For every chat, the events must run
1, 2, 3, ... and each "hash" must be SHA-256(previous hash || canonical(event)), the first
one's previous hash being 32 zero bytes; canonical(event) is defined in docs/audit.md.
Prints one line per chat (its head, or the first seq that does not hold) and exits 0 when
every chain holds, 1 otherwise.
"""

import base64
import hashlib
import json
import struct
import sys


def canonical(chat_id, seq, topic, state):
    cid, name = chat_id.encode("ascii"), topic.encode("utf-8")
    return (struct.pack(">I", len(cid)) + cid + struct.pack(">Q", seq)
            + struct.pack(">I", len(name)) + name + struct.pack(">I", len(state)) + state)


def main(path):
    chains = {}  # chat id -> (last seq, its hash, first problem or None)
    with (sys.stdin if path == "-" else open(path, encoding="utf-8")) as lines:
        for line in lines:
            if not line.strip():
                continue
            event = json.loads(line)
            chat_id = event["chat_id"]
            seq, problem_at = event["seq"], None
            last, previous, problem = chains.get(chat_id, (0, bytes(32), None))
            if problem is not None:
                continue
            if seq > last + 1:
                problem = f"first invalid seq {last + 1} (missing)"
            elif seq <= last:
                problem = f"first invalid seq {seq} (reordered)"
            else:
                stored = event["stored"]
                state = base64.b64decode(stored["state"])
                digest = hashlib.sha256(
                    previous + canonical(chat_id, seq, stored["topic"], state)).digest()
                if digest.hex() != event["hash"]:
                    problem_at = seq
                previous = digest
            if problem_at is not None:
                problem = f"first invalid seq {problem_at} (modified)"
            chains[chat_id] = (seq, previous, problem)
    for chat_id, (last, previous, problem) in chains.items():
        print(f"{chat_id}: {problem}" if problem else
              f"{chat_id}: valid, head seq {last} hash {previous.hex()}")
    return 1 if any(problem for _, _, problem in chains.values()) else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    sys.exit(main(sys.argv[1]))

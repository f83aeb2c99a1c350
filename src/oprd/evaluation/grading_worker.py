"""The grading child process of `oprd.evaluation.grading`: math-verify, one comparison per line.

Reads JSON `[answer, ground_truth]` lines on stdin and answers "1" or "0" per line on stdout. It is
started as a script, by path, and imports nothing from oprd, so a restart after an overrun costs
only math-verify's own import.
"""

import json
import os
import sys

from math_verify import parse, verify


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from sympy must not reach the reply pipe
    print("ready", file=replies)
    for line in sys.stdin:
        answer, ground_truth = json.loads(line)
        try:
            # Timeouts off: math-verify's are SIGALRM-based; the parent enforces the deadline.
            gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=None)
            ok = verify(gold, parse(f"\\boxed{{{answer}}}", parsing_timeout=None), timeout_seconds=None)
        except Exception:
            ok = False
        print(int(bool(ok)), file=replies)


if __name__ == "__main__":
    main()

"""The grading child process of `oprd.evaluation.grading`: one request per line, under the
parent's deadline.

Reads JSON `[kind, text, ground_truth]` lines on stdin, kind "grade" (a whole response: extract,
then compare) or "match" (an extracted answer), and answers `[answer, correct]` per line on stdout.
It imports only `oprd.evaluation.grading` (the standard library) and math-verify, so a restart
after an overrun is quick.
"""

import json
import os
import sys

from oprd.evaluation.grading import grade_here, match_here


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from sympy must not reach the reply pipe
    import math_verify  # noqa: F401  (loaded before "ready", so the first deadline covers grading only)

    print("ready", file=replies)
    for line in sys.stdin:
        kind, text, ground_truth = json.loads(line)
        reply = grade_here(text, ground_truth) if kind == "grade" else (None, match_here(text, ground_truth))
        print(json.dumps([reply[0], int(reply[1])]), file=replies)


if __name__ == "__main__":
    main()

"""Grading (extraction, equivalence by value, timeouts) and the metric formulas, against direct computation."""

import itertools
import re
import threading
from math import comb

import pytest

from oprd.data import BENCHMARKS, load_problems
from oprd.evaluation import (
    GradedSample,
    answers_match,
    distinct_ngrams,
    extract_answer,
    is_correct,
    majority_correct,
    pass_at_k,
    pass_ks,
    summarize,
)

# --- extraction -------------------------------------------------------------------------------

EXTRACTION = [
    (r"The answer is \boxed{42}.", "42"),
    (r"first \boxed{1}, finally \boxed{2}", "2"),
    (r"\boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),  # nested braces
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped set braces are not grouping
    (r"so \boxed 5.", "5"),
    (r"\fbox{7}", "7"),
    (r"$\boxed{x = 3}$", "x = 3"),
    (r"\boxed{27 \text{ miles}.}", "27"),  # units and trailing punctuation
    (r"\boxed{864 \mbox{ inches}^2}", "864"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{\text{(C)}}", "(C)"),
    (r"\boxed{\text{Evelyn}}", "Evelyn"),
    (r"\boxed{\$18.90}", "18.90"),
    (r"\boxed{\left( 3, \dfrac{\pi}{2} \right)}", r"( 3, \frac{\pi}{2} )"),
    (r"\boxed{5} and then \boxed{", "5"),  # an unclosed box (truncated response) is skipped
    ("Solve it.\nAnswer: $34$", "34"),  # the DAPO format
    ("**Answer:** 113", "113"),
    ("Answer: 1\nwait, no.\nAnswer: 2", "2"),
    (r"\boxed{3}. Answer: 4", "3"),  # a box wins over an answer line
    ("42", "42"),  # a response that is nothing but an answer
    (r"$\frac{3}{4}$", r"\frac{3}{4}"),
    ("I cannot solve this problem.", None),
    ("", None),
    (r"\boxed{}", None),
    (r"the answer is \boxed{12", None),
]


@pytest.mark.parametrize("text, expected", EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# --- equivalence, drawn from the shipped benchmarks' ground truths ----------------------------

RIGHT = [
    ("142.0", ["142", "142.00", r"\frac{284}{2}"]),
    ("70", ["70.0", "070", r"\text{70}"]),
    ("025", ["25", "25.0"]),
    (r"336^\circ", ["336", r"336^{\circ}", r"336 \text{ degrees}"]),
    (r"\frac{14}{3}", ["14/3", r"\dfrac{14}{3}", r"\frac{28}{6}", r"4\frac{2}{3}"]),
    (r"\frac 34", ["0.75", "3/4", r"\dfrac34", r"\tfrac{3}{4}", r"75\%"]),
    (r"\dfrac{17}{50}", ["0.34", "17/50", r"\frac{17}{50}"]),
    (r"\left( 3, \frac{\pi}{2} \right)", [r"(3, \pi/2)", r"(3,\frac{\pi}{2})", r"\left(3, \dfrac{\pi}{2}\right)"]),
    (r"90^\circ", ["90", r"90^{\circ}", r"90 \text{ degrees}"]),
    (r"\text{Evelyn}", ["Evelyn", r"\text{Evelyn}", r"\textbf{Evelyn}"]),
    (r"\text{(C)}", ["C", "(C)", r"\text{C}"]),
    ("x=5", ["5", "x = 5"]),
    ("1,-2", ["-2, 1", "1, -2"]),
    ("(3,4]", ["(3, 4]", r"\left(3, 4\right]"]),
    (r"(-\infty, 0]", [r"(-\infty,0]", r"\left(-\infty, 0\right]"]),
    (r"\{1\pm\sqrt{5},-2\}", [r"-2, 1+\sqrt{5}, 1-\sqrt{5}", r"\{-2, 1-\sqrt5, 1+\sqrt5\}"]),
    (r"(0,9) \cup (9,36)", [r"(0, 9) \cup (9, 36)"]),
    (r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}", [r"\begin{pmatrix}-2\\-14\\-7\end{pmatrix}"]),
    (r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}", [r"\begin{pmatrix} \frac{1}{5} \\ -\frac{18}{5} \end{pmatrix}"]),
    (r"10,\!080", ["10080", "10,080"]),
    (r"\$32,\!348", ["32348", "32,348", r"\$32348"]),
    ("58,500", ["58500"]),
    (r"1\frac{4}{5}", ["9/5", "1.8"]),  # a mixed number
    ("6 - 5i", ["6-5i", "-5i + 6"]),
    (r"3\sqrt{13}", [r"\sqrt{117}", r"3 \sqrt{13}"]),
    (r"864 \mbox{ inches}^2", ["864", r"864 \text{ square inches}"]),
    (r"5.4 \text{ cents}", ["5.4", "5.40"]),
    ("y = 2x + 3", ["y=3+2x", "2x+3"]),
    (r"x \in [-2,7]", ["[-2,7]", r"[-2, 7]"]),
    ("2k+2", ["2(k+1)", "2+2k"]),
    (".0000672", ["0.0000672", r"6.72 \times 10^{-5}"]),
    (r"\frac{\sqrt{3}}{3}", [r"\frac{1}{\sqrt{3}}", r"\sqrt{3}/3"]),
]
WRONG = [
    ("142.0", ["141", "142.5", "1420"]),
    ("70", ["7", "700", "-70"]),
    (r"336^\circ", ["24", "336.5"]),
    (r"\frac{14}{3}", ["3/14", "4.67", "14"]),
    (r"\frac 34", ["4/3", "0.7", "34"]),
    (r"\left( 3, \frac{\pi}{2} \right)", [r"(\frac{\pi}{2}, 3)", r"(3, \pi)", "3"]),
    (r"90^\circ", ["45", "180"]),
    (r"\text{Evelyn}", [r"\text{Navin}", "Bob"]),
    (r"\text{(C)}", ["(D)", "D", r"\text{(B)}"]),
    (r"\text{east}", [r"\text{west}", "north"]),
    ("x=5", ["x=6", "-5"]),
    ("1,-2", ["1, 2", "1", "-2"]),
    ("(3,4]", ["(3,4)", "[3,4]", "[3,4)"]),
    (r"\{1\pm\sqrt{5},-2\}", [r"1+\sqrt{5}, 1-\sqrt{5}", r"-2, 1+\sqrt{5}"]),
    (r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}", [r"\begin{pmatrix} -2 \\ -14 \\ 7 \end{pmatrix}"]),
    (r"10,\!080", ["10", "80", "1008"]),
    ("58,500", ["585", "58"]),
    (r"1\frac{4}{5}", ["4/5", "1"]),
    ("6 - 5i", ["6+5i", "6"]),
    (r"3\sqrt{13}", [r"\sqrt{39}", r"13\sqrt{3}"]),
    ("y = 2x + 3", ["y = 2x - 3", "2x"]),
    ("2k+2", ["2k", "k+2"]),
    (".0000672", ["0.000672", "672"]),
    (r"\pi", ["3.14", "3"]),
]
WRAPPERS = [r"So the answer is $\boxed{{{}}}$.", "Let me think.\nAnswer: {}"]


@pytest.fixture(scope="module")
def ground_truths() -> list[str]:
    return [p.answer for name in BENCHMARKS for p in load_problems(name)]


def test_tables_are_drawn_from_the_shipped_benchmarks(ground_truths):
    assert {gt for gt, _ in RIGHT + WRONG} <= set(ground_truths)


@pytest.mark.parametrize("ground_truth, forms", RIGHT)
def test_right_forms_grade_correct(ground_truth, forms):
    for form in forms:
        for wrapper in WRAPPERS:
            assert is_correct(wrapper.format(form), ground_truth), (form, wrapper)


@pytest.mark.parametrize("ground_truth, forms", WRONG)
def test_wrong_forms_grade_wrong(ground_truth, forms):
    for form in forms:
        for wrapper in WRAPPERS:
            assert not is_correct(wrapper.format(form), ground_truth), (form, wrapper)


def test_every_ground_truth_grades_correct_against_itself(ground_truths):
    assert len(ground_truths) == 683
    wrong = [gt for gt in ground_truths if not is_correct(rf"The answer is $\boxed{{{gt}}}$.", gt)]
    assert wrong == []


def test_integer_answers_by_value_not_by_string(ground_truths):
    integers = [gt for gt in ground_truths if re.fullmatch(r"\d+(\.0)?", gt)]
    assert len(integers) > 400
    for gt in integers:
        value = int(float(gt))
        assert is_correct(rf"\boxed{{{value}.0}}", gt), gt
        assert not is_correct(rf"\boxed{{{value + 1}}}", gt), gt


def test_no_answer_is_never_correct():
    assert not is_correct("I am not sure.", "42")
    assert not is_correct(r"\boxed{}", "42")
    assert not answers_match("", "42")


def test_boxed_ground_truths_are_unwrapped():
    assert is_correct(r"\boxed{0.5}", r"\boxed{\frac12}")


PATHOLOGICAL = [
    (r"\boxed{10^{10^{10}}!}", r"10^{10^{10}}+1"),  # C-level work SIGALRM cannot stop (gigabytes in seconds)
    (r"\boxed{9^{9^{9^{9}}}}", "1"),
    ("\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}", "1"),
    (r"\boxed{\frac{1}{0}}", "0"),
    (r"\boxed{\left( \right. \begin{pmatrix}}", "3"),
    ("\\boxed{\x00\udcff\\\\}", "3"),
]


@pytest.mark.parametrize("response, ground_truth", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_answers_return_instead_of_hanging(response, ground_truth):
    assert is_correct(response, ground_truth, timeout_s=1.0) in (True, False)
    assert is_correct(r"\boxed{0.75}", r"\frac34")  # the grader still works afterwards


def test_grading_works_off_the_main_thread():
    results = {}

    def grade():
        results["right"] = is_correct(r"\boxed{3/4}", "0.75")
        results["wrong"] = is_correct(r"\boxed{3/5}", "0.75")

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join()
    assert results == {"right": True, "wrong": False}


# --- metrics ----------------------------------------------------------------------------------


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the size-k subsets of n samples (the first c correct) holding a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(1000, 3, 500) == pytest.approx(1 - comb(997, 500) / comb(1000, 500))


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_ks():
    assert pass_ks(16) == [1, 2, 4, 8, 16]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(1) == [1]


def test_distinct_ngrams():
    # 4-grams: (a b c d) twice, (b c d e) once: 2 unique of 3
    assert distinct_ngrams(["a b c d", "a b c d e"]) == pytest.approx(2 / 3)
    assert distinct_ngrams(["a b c d e f"]) == 1.0
    assert distinct_ngrams(["z z z z z z"]) == pytest.approx(1 / 3)  # 3 grams, all the same
    assert distinct_ngrams(["a b", "c d"], n=3) == 0.0  # n-grams never span two texts
    assert distinct_ngrams([]) == 0.0
    assert distinct_ngrams(["x  y\nx y"], n=2) == pytest.approx(2 / 3)  # whitespace tokens


def sample(correct, answer, response="", length=1, truncated=False):
    return GradedSample(response=response, answer=answer, correct=correct, length=length, truncated=truncated)


def test_majority_vote():
    two_right = [sample(True, "3"), sample(True, "3.0")]  # right answers are one vote, however written
    assert majority_correct(two_right + [sample(False, "1/2"), sample(False, "7")])
    # wrong answers vote together when their normalised text is the same
    assert not majority_correct(two_right + [sample(False, "1/2"), sample(False, "1 / 2"), sample(False, "1/2")])
    assert majority_correct(two_right + [sample(False, "7"), sample(False, "7")])  # ties: the first seen
    assert not majority_correct([sample(False, "7"), sample(False, "7"), sample(True, "3"), sample(True, "3")])
    assert majority_correct([sample(False, None), sample(False, None), sample(True, "3")])  # no-answers cast no vote
    assert not majority_correct([sample(False, None)])


def test_summarize_against_hand_computed_values():
    problems = [
        [  # half right; 4-grams: (a b c d) three times and (b c d e), "x" has none: 2 unique of 4
            sample(True, "5", "a b c d", 1),
            sample(True, "5.0", "a b c d", 2),
            sample(False, "7", "x", 3, truncated=True),
            sample(False, "7", "a b c d e", 4),
        ],
        [  # all wrong, one format error
            sample(False, None, "1 2 3 4 5 6", 5, truncated=True),
            sample(False, "1/2", "", 6),
            sample(False, "1 / 2", "", 7),
            sample(False, "3", "", 8),
        ],
        [sample(True, "9", "z z z z z", 9 + i, truncated=i == 0) for i in range(4)],  # all right
    ]
    metrics = summarize(problems)
    expected = {
        "avg@4": (0.5 + 0 + 1) / 3,
        "best@4": 2 / 3,
        "maj@4": 2 / 3,  # problem 0: a 2-2 tie won by the first-seen (right) answer
        "pass@1": (0.5 + 0 + 1) / 3,
        "pass@2": ((1 - comb(2, 2) / comb(4, 2)) + 0 + 1) / 3,
        "pass@4": 2 / 3,
        "dist-4g": (2 / 4 + 3 / 3 + 1 / 8) / 3,
        "avg_len": 6.5,
        "format_error_rate": 1 / 12,
        "truncation_rate": 3 / 12,
        "solve_none": 1,
        "solve_all": 1,
        "grading_timeouts": 0,
        "problems": 3,
        "samples": 12,
        "k": 4,
    }
    assert metrics == pytest.approx(expected)
    assert list(metrics) == list(expected)


def test_summarize_needs_samples():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([[sample(True, "1")], []])


# --- extraction is linear, grading is under the deadline ------------------------------------


def _rescanning_last_boxed(text: str):
    """The extraction before it was made linear: for every \\boxed, copy and rescan the rest of the
    text. Quadratic, but the plain definition of what the content of a box is."""
    import re as regex

    from oprd.answers import _BOXED

    for match in reversed(list(_BOXED.finditer(text))):
        rest = text[match.end():].lstrip()
        if not rest.startswith("{"):
            token = regex.match(r"[^\s${}]+", rest)
            content = token.group(0) if token else None
        else:
            depth, i, content = 0, 0, None
            while i < len(rest):
                if rest[i] == "\\":
                    i += 2
                    continue
                depth += {"{": 1, "}": -1}.get(rest[i], 0)
                if depth == 0:
                    content = rest[1:i].strip()
                    break
                i += 1
        if content:
            return content
    return None


def test_linear_extraction_equals_the_rescanning_definition():
    import random

    from oprd.answers import last_boxed

    pieces = ["\\boxed", "\\fbox", "{", "}", "\\{", "\\}", "\\\\", "\\", " ", "x", "5", "\n", "$"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert last_boxed(text) == _rescanning_last_boxed(text), text


def test_adversarial_responses_are_graded_within_the_deadline():
    from oprd.evaluation import grade

    unclosed = "\\boxed{" * 150_000 + "so the answer is \\boxed{7}"  # 1 MB; rescanning took minutes on 60 KB
    assert extract_answer(unclosed) == "7"
    assert grade(unclosed, "7") == (("7", True, False))
    spaces = "5" + " " * 200_000 + "\\text{ cm}"  # a long run for the unit pattern
    assert grade(f"\\boxed{{{spaces}}}", "5").timed_out is False


def test_a_grading_timeout_is_reported_as_such():
    from oprd.evaluation import grade

    answer, correct, timed_out = grade(r"\boxed{10^{10^{10}}!}", r"10^{10^{10}}+1", timeout_s=1.0)
    assert (answer, correct, timed_out) == (None, False, True)
    assert grade(r"\boxed{0.75}", r"\frac34") == ("0.75", True, False)  # the grader works afterwards


def test_each_process_samples_its_share_and_as_many_rounds_as_the_others():
    from oprd.distributed import World
    from oprd.evaluation.harness import share

    assert share(5, World(0, 1)) == ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    assert share(5, World(0, 2)) == ([0, 2, 4], [0, 2, 4])
    assert share(5, World(1, 2)) == ([1, 3], [1, 3, 1])  # a repeat keeps it in step; its result is dropped
    assert share(1, World(1, 2)) == ([], [0])
    mine = [share(30, World(r, 4))[0] for r in range(4)]
    assert sorted(sum(mine, [])) == list(range(30))

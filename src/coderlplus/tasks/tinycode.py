"""TinyCode: a deterministic generator of small stdin→stdout programming problems.

Each problem comes from a *family* (e.g. ``sum_multiples``) and its parameters
(e.g. ``K=3``), which appear as literals in a short statement::

    Read an integer n. Print the sum of the multiples of 3 from 1 to n.

with a reference solution in one short style (module-level variables, ``input()``,
``print()``, 4-space indents, no functions)::

    n = int(input())
    total = 0
    for i in range(1, n + 1):
        if i % 3 == 0:
            total += i
    print(total)

and 4 tests whose expected outputs are computed by a pure-python function of the
family (never by running the solution). Levels: 1 straight-line, 2 one loop or one
branch, 3 loop + branch or a bit more.

Splits are fixed: a problem's split is decided by the sha256 of its canonical key
(family + parameters): 80% train, 10% validation, 10% test. So the splits are
disjoint by construction, whatever ``n`` and ``seed``. Within a split, families are
drawn uniformly among those of the chosen levels and parameters from a seeded
``random.Random``; duplicates and keys of other splits are skipped (a family whose
problems in the split run out is dropped). The output of ``generate_split`` for
``n`` is a prefix of the output for any larger ``n`` (same seed and levels), and
identical across processes. The tests of a problem depend only on its key.

Command line: ``python -m coderlplus.tasks.tinycode --out DIR`` writes
``DIR/train.jsonl``, ``DIR/validation.jsonl`` and ``DIR/test.jsonl`` (readable by the
``jsonl`` source with ``data.path=DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from coderlplus.registry import ConfigError, register_task_source
from coderlplus.tasks.dataset import (
    DEFAULT_TEMPLATE,
    DatasetError,
    TaskSource,
    check_split,
    read_rows,
    template_error,
    write_jsonl,
)
from coderlplus.types import Task

GENERATOR_VERSION = 1
"""Bump when any family's statement, solution or tests change (it names the cache folder)."""

LEVELS = (1, 2, 3)
N_TESTS = 4
_SPLIT_BUCKETS = (("train", 80), ("validation", 90), ("test", 100))  # cumulative percent
_MAX_MISSES = 200  # consecutive rejected draws after which a family counts as used up

WORDS = (
    "cat", "dog", "sun", "map", "egg", "ice", "box", "key", "tree", "fish",
    "apple", "banana", "cherry", "hello", "world", "python", "level", "rocket", "garden", "music",
    "planet", "orange", "summer", "winter", "yellow", "purple", "window", "bottle", "candle", "dragon",
    "forest", "guitar", "island", "jungle", "kitten", "lemon", "mango", "number", "pencil", "queen",
    "river", "silver", "tiger", "violet", "zebra", "cloud", "stone", "bread", "chair", "table",
    "house", "light", "water", "paper", "sugar", "snake", "horse", "train", "puzzle", "coffee",
    "balloon", "chicken", "dolphin", "monster", "pumpkin", "rainbow", "teacher", "blanket", "kitchen",
    "library", "octopus", "penguin", "picture", "volcano", "elephant", "umbrella", "mountain", "sandwich",
    "computer", "keyboard", "notebook", "dinosaur", "butterfly", "chocolate",
)  # fmt: skip
NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy",
    "Mallory", "Oscar", "Peggy", "Trent", "Victor", "Walter", "Zoe", "Liam", "Mia", "Noah",
)  # fmt: skip
WORD_PAIRS = (
    ("yes", "no"), ("YES", "NO"), ("Yes", "No"), ("true", "false"),
    ("big", "small"), ("high", "low"), ("on", "off"), ("good", "bad"),
)  # fmt: skip
FIZZ_WORDS = ("Fizz", "Buzz", "Bang", "Pop", "Boom", "Zap", "Ping", "Hop")
GREETINGS = (
    "Hello", "Hi", "Hey", "Welcome", "Goodbye", "Bye", "Thanks", "Good morning",
    "Good night", "Good luck", "Happy birthday", "Well done", "See you", "Nice to meet you",
)  # fmt: skip
STAR_CHARS = ("*", "#", "+", "@", "o", "=", "x", "$", "%", "&", "-", "~")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ----------------------------------------------------------------------------- helpers


def _code(*lines: str) -> str:
    return "\n".join(lines)


def _q(s: str) -> str:
    """A Python string literal for a word from the lists above (no quotes or backslashes)."""
    return '"' + s + '"'


def _out(*values: Any) -> str:
    return "".join(f"{v}\n" for v in values)


def _line(values: list[int]) -> str:
    return " ".join(str(v) for v in values) + "\n"


def _first(stdin: str) -> str:
    return stdin.split("\n")[0]


def _ints(stdin: str) -> list[int]:
    return [int(x) for x in _first(stdin).split()]


def _distinct(rng: random.Random, make, k: int = N_TESTS) -> list:
    """``k`` distinct values of ``make()`` (a few repeats allowed if the space is tiny)."""
    out: list = []
    for _ in range(50 * k):
        v = make()
        if v not in out:
            out.append(v)
            if len(out) == k:
                return out
    while len(out) < k:
        out.append(make())
    return out


def _word_with(rng: random.Random, c: str) -> str:
    """A word containing letter ``c``."""
    have = [w for w in WORDS if c in w]
    if have and rng.random() < 0.7:
        return rng.choice(have)
    w = rng.choice(WORDS)
    pos = rng.randint(0, len(w))
    return w[:pos] + c + w[pos:]


def _word_without(rng: random.Random, c: str) -> str:
    return rng.choice([w for w in WORDS if c not in w])


def _shuffled(rng: random.Random, values: list) -> list:
    values = list(values)
    rng.shuffle(values)
    return values


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def _sha_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# ----------------------------------------------------------------------------- families


class Family:
    """One kind of problem. Subclasses fill in the five methods; ``p`` is the parameter dict."""

    name: ClassVar[str]
    level: ClassVar[int]

    def params(self, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def question(self, p: dict[str, Any]) -> str:
        raise NotImplementedError

    def solution(self, p: dict[str, Any]) -> str:
        raise NotImplementedError

    def inputs(self, p: dict[str, Any], rng: random.Random) -> list[str]:
        """``N_TESTS`` stdin texts, each ending with a newline, covering the branches."""
        raise NotImplementedError

    def answer(self, p: dict[str, Any], stdin: str) -> str:
        """The expected stdout for ``stdin``, computed in plain python."""
        raise NotImplementedError


FAMILIES: dict[str, Family] = {}
"""All families by name, in level order."""


def _family(cls: type[Family]) -> type[Family]:
    assert cls.name not in FAMILIES, cls.name
    FAMILIES[cls.name] = cls()
    return cls


# ---- level 1: straight-line


@_family
class ArithConst(Family):
    name, level = "arith_const", 1
    _ops: ClassVar[dict[str, str]] = {"plus": "+", "minus": "-", "times": "*"}

    def params(self, rng):
        op = rng.choice(("plus", "minus", "times"))
        return {"op": op, "K": rng.randint(2, 20) if op == "times" else rng.randint(1, 99)}

    def question(self, p):
        return f"Read an integer n. Print n {p['op']} {p['K']}."

    def solution(self, p):
        return _code("n = int(input())", f"print(n {self._ops[p['op']]} {p['K']})")

    def inputs(self, p, rng):
        return [_out(n) for n in _distinct(rng, lambda: rng.randint(-20, 100))]

    def answer(self, p, stdin):
        n, k = int(_first(stdin)), p["K"]
        return _out({"plus": n + k, "minus": n - k, "times": n * k}[p["op"]])


@_family
class Linear(Family):
    name, level = "linear", 1

    def params(self, rng):
        return {"A": rng.randint(2, 9), "B": rng.randint(1, 99)}

    def question(self, p):
        return f"Read an integer n. Print n times {p['A']} plus {p['B']}."

    def solution(self, p):
        return _code("n = int(input())", f"print(n * {p['A']} + {p['B']})")

    def inputs(self, p, rng):
        return [_out(n) for n in _distinct(rng, lambda: rng.randint(-10, 50))]

    def answer(self, p, stdin):
        return _out(int(_first(stdin)) * p["A"] + p["B"])


@_family
class Remainder(Family):
    name, level = "remainder", 1

    def params(self, rng):
        return {"K": rng.randint(2, 99)}

    def question(self, p):
        return f"Read a non-negative integer n. Print the remainder when n is divided by {p['K']}."

    def solution(self, p):
        return _code("n = int(input())", f"print(n % {p['K']})")

    def inputs(self, p, rng):
        k = p["K"]
        vals = _distinct(rng, lambda: rng.randint(0, 300), 3)
        vals.append(rng.choice([k * j for j in range(1, 8) if k * j not in vals]))  # one multiple of K
        return [_out(n) for n in _shuffled(rng, vals)]

    def answer(self, p, stdin):
        return _out(int(_first(stdin)) % p["K"])


@_family
class PairOp(Family):
    name, level = "pair_op", 1

    def params(self, rng):
        agg, op = rng.choice(("sum", "product")), rng.choice(("plus", "times"))
        return {"agg": agg, "op": op, "K": rng.randint(1, 99) if op == "plus" else rng.randint(2, 20)}

    def question(self, p):
        return f"Read two integers a and b on one line. Print their {p['agg']} {p['op']} {p['K']}."

    def solution(self, p):
        expr = {
            ("sum", "plus"): "a + b + {K}",
            ("sum", "times"): "(a + b) * {K}",
            ("product", "plus"): "a * b + {K}",
            ("product", "times"): "a * b * {K}",
        }[p["agg"], p["op"]].format(K=p["K"])
        return _code("a, b = map(int, input().split())", f"print({expr})")

    def inputs(self, p, rng):
        return [_line(ab) for ab in _distinct(rng, lambda: [rng.randint(-9, 20), rng.randint(-9, 20)])]

    def answer(self, p, stdin):
        a, b = _ints(stdin)
        x = a + b if p["agg"] == "sum" else a * b
        return _out(x + p["K"] if p["op"] == "plus" else x * p["K"])


@_family
class Reverse(Family):
    name, level = "reverse", 1

    def params(self, rng):
        return {"K": rng.randint(1, 9)}

    def question(self, p):
        if p["K"] == 1:
            return "Read a string. Print it reversed."
        return f"Read a string. Print it reversed, repeated {p['K']} times."

    def solution(self, p):
        if p["K"] == 1:
            return _code("s = input()", "print(s[::-1])")
        return _code("s = input()", f"print(s[::-1] * {p['K']})")

    def inputs(self, p, rng):
        return [_out(w) for w in _distinct(rng, lambda: rng.choice(WORDS))]

    def answer(self, p, stdin):
        return _out(_first(stdin)[::-1] * p["K"])


@_family
class Slice(Family):
    name, level = "slice", 1

    def params(self, rng):
        return {"end": rng.choice(("first", "last")), "K": rng.randint(1, 6)}

    def question(self, p):
        return f"Read a string. Print its {p['end']} {_plural(p['K'], 'character')}."

    def solution(self, p):
        sl = f"[:{p['K']}]" if p["end"] == "first" else f"[-{p['K']}:]"
        return _code("s = input()", f"print(s{sl})")

    def inputs(self, p, rng):
        return [_out(w) for w in _distinct(rng, lambda: rng.choice(WORDS))]

    def answer(self, p, stdin):
        s, k = _first(stdin), p["K"]
        return _out(s[:k] if p["end"] == "first" else s[-k:])


@_family
class ReplaceChar(Family):
    name, level = "replace_char", 1

    def params(self, rng):
        a = rng.choice(LETTERS)
        return {"A": a, "B": rng.choice(LETTERS.replace(a, ""))}

    def question(self, p):
        return f"Read a string. Print it with every {p['A']} replaced by {p['B']}."

    def solution(self, p):
        return _code("s = input()", f"print(s.replace({_q(p['A'])}, {_q(p['B'])}))")

    def inputs(self, p, rng):
        words = _distinct(rng, lambda: _word_with(rng, p["A"]), 3)
        words.append(_word_without(rng, p["A"]))
        return [_out(w) for w in _shuffled(rng, words)]

    def answer(self, p, stdin):
        return _out(_first(stdin).replace(p["A"], p["B"]))


@_family
class Greet(Family):
    name, level = "greet", 1

    def params(self, rng):
        return {"greeting": rng.choice(GREETINGS), "end": rng.choice(("!", "."))}

    def question(self, p):
        return f'Read a name. Print "{p["greeting"]}, " followed by the name and "{p["end"]}".'

    def solution(self, p):
        return _code("name = input()", f"print({_q(p['greeting'] + ', ')} + name + {_q(p['end'])})")

    def inputs(self, p, rng):
        return [_out(n) for n in _distinct(rng, lambda: rng.choice(NAMES))]

    def answer(self, p, stdin):
        return _out(f"{p['greeting']}, {_first(stdin)}{p['end']}")


# ---- level 2: one loop or one branch


@_family
class SumRange(Family):
    name, level = "sum_range", 2

    def params(self, rng):
        return {"A": rng.randint(0, 99)}

    def question(self, p):
        return f"Read an integer n. Print the sum of the integers from {p['A']} to n."

    def solution(self, p):
        return _code(
            "n = int(input())",
            "total = 0",
            f"for i in range({p['A']}, n + 1):",
            "    total += i",
            "print(total)",
        )

    def inputs(self, p, rng):
        a = p["A"]
        vals = [a, *_distinct(rng, lambda: rng.randint(a + 1, a + 30), 3)]
        return [_out(n) for n in _shuffled(rng, vals)]

    def answer(self, p, stdin):
        return _out(sum(range(p["A"], int(_first(stdin)) + 1)))


@_family
class SumMultiples(Family):
    name, level = "sum_multiples", 2

    def params(self, rng):
        return {"K": rng.randint(2, 50)}

    def question(self, p):
        return f"Read an integer n. Print the sum of the multiples of {p['K']} from 1 to n."

    def solution(self, p):
        return _code(
            "n = int(input())",
            "total = 0",
            "for i in range(1, n + 1):",
            f"    if i % {p['K']} == 0:",
            "        total += i",
            "print(total)",
        )

    def inputs(self, p, rng):
        k = p["K"]
        vals = [rng.randint(1, k - 1), *_distinct(rng, lambda: rng.randint(k, 6 * k), 3)]
        return [_out(n) for n in _shuffled(rng, vals)]

    def answer(self, p, stdin):
        return _out(sum(i for i in range(1, int(_first(stdin)) + 1) if i % p["K"] == 0))


@_family
class ProductRange(Family):
    name, level = "product_range", 2

    def params(self, rng):
        return {"A": rng.randint(1, 5)}

    def question(self, p):
        return f"Read an integer n. Print the product of the integers from {p['A']} to n."

    def solution(self, p):
        return _code(
            "n = int(input())",
            "result = 1",
            f"for i in range({p['A']}, n + 1):",
            "    result *= i",
            "print(result)",
        )

    def inputs(self, p, rng):
        a = p["A"]
        vals = [a, *_distinct(rng, lambda: rng.randint(a + 1, a + 8), 3)]
        return [_out(n) for n in _shuffled(rng, vals)]

    def answer(self, p, stdin):
        result = 1
        for i in range(p["A"], int(_first(stdin)) + 1):
            result *= i
        return _out(result)


@_family
class Threshold(Family):
    name, level = "threshold", 2

    def params(self, rng):
        yes, no = rng.choice(WORD_PAIRS)
        return {"K": rng.randint(0, 99), "yes": yes, "no": no}

    def question(self, p):
        return (
            f"Read an integer n. Print {p['yes']} if n is greater than {p['K']}, otherwise print {p['no']}."
        )

    def solution(self, p):
        return _code(
            "n = int(input())",
            f"if n > {p['K']}:",
            f"    print({_q(p['yes'])})",
            "else:",
            f"    print({_q(p['no'])})",
        )

    def inputs(self, p, rng):
        k = p["K"]
        above = _distinct(rng, lambda: k + rng.randint(1, 30), 2)
        vals = [*above, k, k - rng.randint(1, 30)]
        return [_out(n) for n in _shuffled(rng, vals)]

    def answer(self, p, stdin):
        return _out(p["yes"] if int(_first(stdin)) > p["K"] else p["no"])


@_family
class Parity(Family):
    name, level = "parity", 2

    def params(self, rng):
        yes, no = rng.choice(WORD_PAIRS)
        return {"kind": rng.choice(("even", "odd")), "yes": yes, "no": no}

    def question(self, p):
        return f"Read an integer n. Print {p['yes']} if n is {p['kind']}, otherwise print {p['no']}."

    def solution(self, p):
        return _code(
            "n = int(input())",
            f"if n % 2 == {0 if p['kind'] == 'even' else 1}:",
            f"    print({_q(p['yes'])})",
            "else:",
            f"    print({_q(p['no'])})",
        )

    def inputs(self, p, rng):
        evens = _distinct(rng, lambda: 2 * rng.randint(0, 49), 2)
        odds = _distinct(rng, lambda: 2 * rng.randint(0, 49) + 1, 2)
        return [_out(n) for n in _shuffled(rng, evens + odds)]

    def answer(self, p, stdin):
        hit = int(_first(stdin)) % 2 == (0 if p["kind"] == "even" else 1)
        return _out(p["yes"] if hit else p["no"])


@_family
class CountLetter(Family):
    name, level = "count_letter", 2

    def params(self, rng):
        return {"C": rng.choice(LETTERS)}

    def question(self, p):
        return f"Read a string. Print how many times the letter {p['C']} appears in it."

    def solution(self, p):
        return _code("s = input()", f"print(s.count({_q(p['C'])}))")

    def inputs(self, p, rng):
        c = p["C"]
        words = _distinct(rng, lambda: _word_with(rng, c) + rng.choice(("", c, c + c)), 3)
        words.append(_word_without(rng, c))
        return [_out(w) for w in _shuffled(rng, words)]

    def answer(self, p, stdin):
        return _out(_first(stdin).count(p["C"]))


@_family
class ListExtreme(Family):
    name, level = "list_extreme", 2

    def params(self, rng):
        return {"K": rng.randint(2, 12), "which": rng.choice(("largest", "smallest"))}

    def question(self, p):
        return f"Read {p['K']} integers on one line. Print the {p['which']} of them."

    def solution(self, p):
        fn = "max" if p["which"] == "largest" else "min"
        return _code("nums = list(map(int, input().split()))", f"print({fn}(nums))")

    def inputs(self, p, rng):
        return [_line(v) for v in _distinct(rng, lambda: [rng.randint(-50, 50) for _ in range(p["K"])])]

    def answer(self, p, stdin):
        nums = _ints(stdin)
        return _out(max(nums) if p["which"] == "largest" else min(nums))


@_family
class RepeatLines(Family):
    name, level = "repeat_lines", 2

    def params(self, rng):
        return {"K": rng.randint(2, 20)}

    def question(self, p):
        return f"Read a string. Print it {p['K']} times, one per line."

    def solution(self, p):
        return _code("s = input()", f"for i in range({p['K']}):", "    print(s)")

    def inputs(self, p, rng):
        return [_out(w) for w in _distinct(rng, lambda: rng.choice(WORDS))]

    def answer(self, p, stdin):
        return _out(*[_first(stdin)] * p["K"])


@_family
class MultiplesList(Family):
    name, level = "multiples_list", 2

    def params(self, rng):
        return {"K": rng.randint(2, 50)}

    def question(self, p):
        return f"Read an integer n. Print the multiples of {p['K']} from {p['K']} to n, one per line."

    def solution(self, p):
        return _code("n = int(input())", f"for i in range({p['K']}, n + 1, {p['K']}):", "    print(i)")

    def inputs(self, p, rng):
        k = p["K"]
        return [_out(n) for n in _distinct(rng, lambda: rng.randint(k, 6 * k))]

    def answer(self, p, stdin):
        return _out(*range(p["K"], int(_first(stdin)) + 1, p["K"]))


@_family
class PairThreshold(Family):
    name, level = "pair_threshold", 2

    def params(self, rng):
        yes, no = rng.choice(WORD_PAIRS)
        return {"agg": rng.choice(("sum", "product")), "K": rng.randint(0, 99), "yes": yes, "no": no}

    def question(self, p):
        return (
            f"Read two integers a and b on one line. Print {p['yes']} if their {p['agg']} is greater than "
            f"{p['K']}, otherwise print {p['no']}."
        )

    def solution(self, p):
        return _code(
            "a, b = map(int, input().split())",
            f"if a {'+' if p['agg'] == 'sum' else '*'} b > {p['K']}:",
            f"    print({_q(p['yes'])})",
            "else:",
            f"    print({_q(p['no'])})",
        )

    def inputs(self, p, rng):
        k, agg = p["K"], p["agg"]

        def pair(above: bool) -> tuple[int, int]:
            if agg == "sum":
                x = k + rng.randint(1, 20) if above else k - rng.randint(0, 20)
                a = rng.randint(-5, max(x, 0) + 5)
                return a, x - a
            a = rng.randint(1, 9)
            b = k // a + rng.randint(1, 4) if above else k // a - rng.randint(0, 4)
            return (a, b) if rng.random() < 0.5 else (b, a)

        vals = _distinct(rng, lambda: pair(True), 2) + _distinct(rng, lambda: pair(False), 2)
        return [_line(list(ab)) for ab in _shuffled(rng, vals)]

    def answer(self, p, stdin):
        a, b = _ints(stdin)
        x = a + b if p["agg"] == "sum" else a * b
        return _out(p["yes"] if x > p["K"] else p["no"])


@_family
class Stars(Family):
    name, level = "stars", 2

    def params(self, rng):
        return {"C": rng.choice(STAR_CHARS), "down": rng.choice((False, True))}

    def question(self, p):
        count = "n - i + 1" if p["down"] else "i"
        return f"Read an integer n. Print n lines: line i has {count} copies of {p['C']}."

    def solution(self, p):
        loop = "for i in range(n, 0, -1):" if p["down"] else "for i in range(1, n + 1):"
        return _code("n = int(input())", loop, f"    print({_q(p['C'])} * i)")

    def inputs(self, p, rng):
        return [_out(n) for n in _distinct(rng, lambda: rng.randint(1, 7))]

    def answer(self, p, stdin):
        n = int(_first(stdin))
        counts = range(n, 0, -1) if p["down"] else range(1, n + 1)
        return _out(*[p["C"] * i for i in counts])


# ---- level 3: loop + branch, or a bit more


@_family
class SumDivisibleList(Family):
    name, level = "sum_divisible_list", 3

    def params(self, rng):
        return {"K": rng.randint(2, 12), "neg": rng.choice((False, True))}

    def question(self, p):
        rel = "not divisible" if p["neg"] else "divisible"
        return f"Read integers on one line. Print the sum of those {rel} by {p['K']}."

    def solution(self, p):
        return _code(
            "nums = list(map(int, input().split()))",
            "total = 0",
            "for x in nums:",
            f"    if x % {p['K']} {'!=' if p['neg'] else '=='} 0:",
            "        total += x",
            "print(total)",
        )

    def inputs(self, p, rng):
        k = p["K"]

        def make():
            nums = [rng.randint(0, 60) for _ in range(rng.randint(3, 8))]
            nums[rng.randrange(len(nums))] = k * rng.randint(1, 5)
            return nums

        return [_line(v) for v in _distinct(rng, make)]

    def answer(self, p, stdin):
        k = p["K"]
        return _out(sum(x for x in _ints(stdin) if (x % k != 0) == p["neg"]))


@_family
class CountDivOr(Family):
    name, level = "count_div_or", 3

    def params(self, rng):
        k = rng.randint(2, 11)
        return {"K": k, "L": rng.randint(k + 1, 12)}

    def question(self, p):
        return (
            f"Read an integer n. Print how many integers from 1 to n are divisible by {p['K']} or {p['L']}."
        )

    def solution(self, p):
        return _code(
            "n = int(input())",
            "count = 0",
            "for i in range(1, n + 1):",
            f"    if i % {p['K']} == 0 or i % {p['L']} == 0:",
            "        count += 1",
            "print(count)",
        )

    def inputs(self, p, rng):
        vals = [rng.randint(1, p["K"] - 1) if p["K"] > 2 else 1]
        vals += _distinct(rng, lambda: rng.randint(p["L"], 80), 3)
        return [_out(n) for n in _shuffled(rng, vals)]

    def answer(self, p, stdin):
        n = int(_first(stdin))
        return _out(sum(1 for i in range(1, n + 1) if i % p["K"] == 0 or i % p["L"] == 0))


@_family
class Fizz(Family):
    name, level = "fizz", 3

    def params(self, rng):
        return {"W": rng.choice(FIZZ_WORDS), "K": rng.randint(2, 9)}

    def question(self, p):
        return (
            f"Read an integer n. For each i from 1 to n, print {p['W']} if i is divisible by {p['K']}, "
            f"otherwise print i."
        )

    def solution(self, p):
        return _code(
            "n = int(input())",
            "for i in range(1, n + 1):",
            f"    if i % {p['K']} == 0:",
            f"        print({_q(p['W'])})",
            "    else:",
            "        print(i)",
        )

    def inputs(self, p, rng):
        return [_out(n) for n in _distinct(rng, lambda: rng.randint(p["K"], p["K"] + 10))]

    def answer(self, p, stdin):
        return _out(*[p["W"] if i % p["K"] == 0 else i for i in range(1, int(_first(stdin)) + 1)])


@_family
class FizzBuzz(Family):
    name, level = "fizzbuzz", 3

    def params(self, rng):
        w1, w2 = rng.choice(FIZZ_WORDS), rng.choice(FIZZ_WORDS)
        while w2 == w1:
            w2 = rng.choice(FIZZ_WORDS)
        # neither divides the other, so both words show up
        a, b = rng.choice([(a, b) for a in range(2, 8) for b in range(2, 8) if a % b and b % a])
        return {"A": a, "B": b, "W1": w1, "W2": w2}

    def question(self, p):
        return (
            f"Read an integer n. For each i from 1 to n, print {p['W1']} if i is divisible by {p['A']}, "
            f"else {p['W2']} if i is divisible by {p['B']}, else i."
        )

    def solution(self, p):
        return _code(
            "n = int(input())",
            "for i in range(1, n + 1):",
            f"    if i % {p['A']} == 0:",
            f"        print({_q(p['W1'])})",
            f"    elif i % {p['B']} == 0:",
            f"        print({_q(p['W2'])})",
            "    else:",
            "        print(i)",
        )

    def inputs(self, p, rng):
        top = max(p["A"], p["B"])
        return [_out(n) for n in _distinct(rng, lambda: rng.randint(top, top + 12))]

    def answer(self, p, stdin):
        out = []
        for i in range(1, int(_first(stdin)) + 1):
            out.append(p["W1"] if i % p["A"] == 0 else p["W2"] if i % p["B"] == 0 else i)
        return _out(*out)


@_family
class CountInSet(Family):
    name, level = "count_in_set", 3

    def params(self, rng):
        if rng.random() < 0.1:
            return {"S": "aeiou"}
        letters = list(LETTERS)
        rng.shuffle(letters)
        return {"S": "".join(sorted(letters[: rng.randint(2, 5)]))}

    def question(self, p):
        return f'Read a string. Print how many of its characters are in "{p["S"]}".'

    def solution(self, p):
        return _code(
            "s = input()",
            "count = 0",
            "for c in s:",
            f"    if c in {_q(p['S'])}:",
            "        count += 1",
            "print(count)",
        )

    def inputs(self, p, rng):
        words = _distinct(rng, lambda: _word_with(rng, rng.choice(p["S"])) + rng.choice(WORDS), 3)
        words.append(rng.choice(WORDS))
        return [_out(w) for w in _shuffled(rng, words)]

    def answer(self, p, stdin):
        return _out(sum(1 for c in _first(stdin) if c in p["S"]))


@_family
class DigitSum(Family):
    name, level = "digit_sum", 3

    def params(self, rng):
        cmp = rng.choice(("greater", "less"))
        return {"cmp": cmp, "D": rng.randint(0, 8) if cmp == "greater" else rng.randint(1, 9)}

    def question(self, p):
        return (
            f"Read a non-negative integer n. Print the sum of its digits that are {p['cmp']} than {p['D']}."
        )

    def solution(self, p):
        return _code(
            "n = input()",
            "total = 0",
            "for d in n:",
            f"    if int(d) {'>' if p['cmp'] == 'greater' else '<'} {p['D']}:",
            "        total += int(d)",
            "print(total)",
        )

    def inputs(self, p, rng):
        return [_out(n) for n in _distinct(rng, lambda: rng.randint(0, 10 ** rng.randint(1, 6)))]

    def answer(self, p, stdin):
        digits = [int(c) for c in _first(stdin)]
        keep = (lambda d: d > p["D"]) if p["cmp"] == "greater" else (lambda d: d < p["D"])
        return _out(sum(d for d in digits if keep(d)))


@_family
class CountBetween(Family):
    name, level = "count_between", 3

    def params(self, rng):
        a = rng.randint(0, 40)
        return {"A": a, "B": rng.randint(a + 2, a + 20)}

    def question(self, p):
        return (
            f"Read integers on one line. Print how many of them are between {p['A']} and {p['B']}, inclusive."
        )

    def solution(self, p):
        return _code(
            "nums = list(map(int, input().split()))",
            "count = 0",
            "for x in nums:",
            f"    if {p['A']} <= x <= {p['B']}:",
            "        count += 1",
            "print(count)",
        )

    def inputs(self, p, rng):
        a, b = p["A"], p["B"]

        def make():
            return [rng.randint(a - 10, b + 10) for _ in range(rng.randint(3, 8))]

        return [_line(v) for v in _distinct(rng, make)]

    def answer(self, p, stdin):
        return _out(sum(1 for x in _ints(stdin) if p["A"] <= x <= p["B"]))


@_family
class Second(Family):
    name, level = "second", 3

    def params(self, rng):
        return {"K": rng.randint(3, 10), "which": rng.choice(("largest", "smallest"))}

    def question(self, p):
        return f"Read {p['K']} different integers on one line. Print the second {p['which']} of them."

    def solution(self, p):
        idx = "-2" if p["which"] == "largest" else "1"
        return _code("nums = sorted(map(int, input().split()))", f"print(nums[{idx}])")

    def inputs(self, p, rng):
        return [_line(v) for v in _distinct(rng, lambda: rng.sample(range(-30, 70), p["K"]))]

    def answer(self, p, stdin):
        nums = sorted(_ints(stdin))
        return _out(nums[-2] if p["which"] == "largest" else nums[1])


@_family
class CountLongWords(Family):
    name, level = "count_long_words", 3

    def params(self, rng):
        cmp = rng.choice(("more", "fewer"))
        return {"cmp": cmp, "K": rng.randint(3, 8) if cmp == "more" else rng.randint(4, 9)}

    def question(self, p):
        return f"Read a line of words separated by spaces. Print how many words have {p['cmp']} than {p['K']} letters."

    def solution(self, p):
        return _code(
            "words = input().split()",
            "count = 0",
            "for w in words:",
            f"    if len(w) {'>' if p['cmp'] == 'more' else '<'} {p['K']}:",
            "        count += 1",
            "print(count)",
        )

    def inputs(self, p, rng):
        return [_out(" ".join(ws)) for ws in _distinct(rng, lambda: rng.sample(WORDS, rng.randint(2, 6)))]

    def answer(self, p, stdin):
        lens = [len(w) for w in _first(stdin).split()]
        return _out(sum(1 for n in lens if (n > p["K"] if p["cmp"] == "more" else n < p["K"])))


@_family
class CountGreaterLines(Family):
    name, level = "count_greater_lines", 3

    def params(self, rng):
        return {"K": rng.randint(0, 50)}

    def question(self, p):
        return f"Read an integer n, then n integers, one per line. Print how many of them are greater than {p['K']}."

    def solution(self, p):
        return _code(
            "n = int(input())",
            "count = 0",
            "for i in range(n):",
            f"    if int(input()) > {p['K']}:",
            "        count += 1",
            "print(count)",
        )

    def inputs(self, p, rng):
        k = p["K"]

        def make():
            return tuple(rng.randint(k - 15, k + 15) for _ in range(rng.randint(1, 6)))

        return [_out(len(v), *v) for v in _distinct(rng, make)]

    def answer(self, p, stdin):
        lines = stdin.split("\n")
        n = int(lines[0])
        return _out(sum(1 for x in lines[1 : n + 1] if int(x) > p["K"]))


# ----------------------------------------------------------------------------- problems and splits


def families_by_level(levels=LEVELS) -> dict[int, list[str]]:
    """Family names per level, e.g. ``{1: ["arith_const", ...], 2: [...], 3: [...]}``."""
    return {lv: [f.name for f in FAMILIES.values() if f.level == lv] for lv in levels}


def canonical_key(family: str, params: dict[str, Any]) -> str:
    """The identity of a problem, e.g. ``'sum_multiples:{"K":3}'``."""
    return f"{family}:{json.dumps(params, sort_keys=True, separators=(',', ':'))}"


def split_of_key(key: str) -> str:
    """The fixed split of a problem: sha256 of its key → 80% train / 10% validation / 10% test."""
    bucket = _sha_int(f"tinycode-v{GENERATOR_VERSION}:split:{key}") % 100
    return next(name for name, upper in _SPLIT_BUCKETS if bucket < upper)


def make_problem(family: str, params: dict[str, Any]) -> dict[str, Any]:
    """The row of one problem, without ``id``: question, tests, solution, difficulty, family, key."""
    fam = FAMILIES[family]
    key = canonical_key(family, params)
    rng = random.Random(_sha_int(f"tinycode-v{GENERATOR_VERSION}:tests:{key}"))
    tests = [{"input": x, "output": fam.answer(params, x)} for x in fam.inputs(params, rng)]
    return {
        "question": fam.question(params),
        "tests": tests,
        "solution": fam.solution(params),
        "difficulty": fam.level,
        "family": family,
        "key": key,
    }


def _check_levels(levels) -> tuple[int, ...]:
    lv = tuple(sorted({int(x) for x in levels}))
    if not lv or any(x not in LEVELS for x in lv):
        raise ValueError(f"levels must be a non-empty subset of {list(LEVELS)}, got {list(levels)}")
    return lv


def generate_split(split: str, n: int, seed: int = 0, levels=LEVELS) -> list[dict[str, Any]]:
    """``n`` distinct problems of ``split`` as schema rows (ids ``tinycode-{split}-00000``...).

    Deterministic in (split, n, seed, levels); the rows for ``n`` are a prefix of those
    for a larger ``n``. Raises :class:`DatasetError` if the split holds fewer than ``n``
    problems of these levels.
    """
    check_split(split)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    lv = _check_levels(levels)
    active = [f for f in FAMILIES.values() if f.level in lv]
    misses = dict.fromkeys((f.name for f in active), 0)
    rng = random.Random(_sha_int(f"tinycode-v{GENERATOR_VERSION}:sample:{split}:{seed}"))
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        if not active:
            raise DatasetError(
                f"tinycode: the {split} split has only {len(rows)} distinct problems of levels {list(lv)}; "
                f"ask for at most {len(rows)} (n_{split}) or add levels."
            )
        fam = rng.choice(active)
        params = fam.params(rng)
        key = canonical_key(fam.name, params)
        if key in seen or split_of_key(key) != split:
            misses[fam.name] += 1
            if misses[fam.name] >= _MAX_MISSES:
                active.remove(fam)
            continue
        misses[fam.name] = 0
        seen.add(key)
        rows.append({"id": f"tinycode-{split}-{len(rows):05d}", **make_problem(fam.name, params)})
    return rows


# ----------------------------------------------------------------------------- the task source


def default_cache_dir() -> Path:
    """``$CODERLPLUS_CACHE/tinycode`` (default ``~/.cache/coderlplus/tinycode``)."""
    return Path(os.environ.get("CODERLPLUS_CACHE", "~/.cache/coderlplus")).expanduser() / "tinycode"


@dataclass
class TinyCodeConfig:
    """Options of the ``tinycode`` source (``data=tinycode``)."""

    seed: int = 0
    """Sampling seed; the split of each problem is fixed whatever the seed."""
    n_train: int = 4000
    """Number of train problems."""
    n_validation: int = 100
    """Number of validation problems."""
    n_test: int = 500
    """Number of test problems (500 keeps the standard error of pass@1 near 2 points)."""
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Difficulty levels to draw from: 1 straight-line, 2 one loop or branch, 3 loop + branch."""
    prompt_template: str = DEFAULT_TEMPLATE
    """The user turn; ``{question}`` is replaced by the problem statement."""
    cache_dir: str | None = None
    """Where generated splits are cached (None: ``$CODERLPLUS_CACHE/tinycode``, default ``~/.cache/coderlplus/tinycode``)."""

    def __post_init__(self) -> None:
        try:
            levels = [int(x) for x in self.levels]
        except (TypeError, ValueError):
            raise ConfigError(
                f"levels must be a list of integers from 1 to 3, e.g. [1, 2, 3]; got {self.levels!r}"
            ) from None
        if not levels or any(x not in LEVELS for x in levels):
            raise ConfigError(
                f"levels must be a non-empty subset of [1, 2, 3] (1 straight-line, 2 one loop or branch, "
                f"3 loop + branch); got {list(self.levels)!r}. Set e.g. data.levels=[1,2]."
            )
        self.levels = sorted(set(levels))
        for name in ("n_train", "n_validation", "n_test"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(
                    f"{name} must be an integer >= 1, got {v!r}; set data.{name} to the number of problems."
                )
        err = template_error(self.prompt_template)
        if err:
            raise ConfigError(f"prompt_template: {err}")


# ``python -m coderlplus.tasks.tinycode`` runs this file a second time as ``__main__`` after the
# package import has registered it; registering that copy too would raise DuplicatePluginError.
_register = register_task_source("tinycode") if __name__ != "__main__" else (lambda cls: cls)


@_register
class TinyCodeSource(TaskSource):
    """Generated beginner problems (see the module docstring); cached as JSONL, loaded like any dataset."""

    Config = TinyCodeConfig

    def count(self, split: str) -> int:
        check_split(split)
        return getattr(self.cfg, f"n_{split}")

    def split_path(self, split: str) -> Path:
        """The cache file of ``split``: ``<cache_dir>/v1-seed{seed}-l{levels}/{split}-{n}.jsonl``."""
        base = Path(self.cfg.cache_dir).expanduser() if self.cfg.cache_dir else default_cache_dir()
        levels = "".join(str(x) for x in self.cfg.levels)
        return (
            base
            / f"v{GENERATOR_VERSION}-seed{self.cfg.seed}-l{levels}"
            / f"{split}-{self.count(split)}.jsonl"
        )

    def ensure_split(self, split: str) -> Path:
        """The cache file of ``split``, generated (atomically) if missing."""
        path = self.split_path(split)
        if not path.exists():
            write_jsonl(generate_split(split, self.count(split), self.cfg.seed, self.cfg.levels), path)
        return path

    def located_rows(self, split: str) -> list[tuple[str, dict]]:
        return read_rows(self.ensure_split(split))

    def load(self, split: str) -> list[Task]:
        path = self.ensure_split(split)
        try:
            return super().load(split)
        except DatasetError as e:
            raise DatasetError(f"{e} (a bad TinyCode cache file: delete {path} to regenerate it)") from None


def write_splits(
    out: str | os.PathLike,
    seed: int = 0,
    n_train: int = 4000,
    n_validation: int = 100,
    n_test: int = 200,
    levels=LEVELS,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` under ``out``."""
    counts = {"train": n_train, "validation": n_validation, "test": n_test}
    paths = {}
    for split, n in counts.items():
        paths[split] = Path(out) / f"{split}.jsonl"
        write_jsonl(generate_split(split, n, seed, levels), paths[split])
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m coderlplus.tasks.tinycode",
        description="Write TinyCode train/validation/test JSONL files (the dataset schema of coderlplus.tasks.dataset).",
    )
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-validation", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="e.g. --levels 1 2")
    args = ap.parse_args(argv)
    try:
        paths = write_splits(args.out, args.seed, args.n_train, args.n_validation, args.n_test, args.levels)
    except (DatasetError, ValueError) as e:
        ap.error(str(e))
    for split, p in paths.items():
        print(f"{split}: {p}")
    return 0


__all__ = [
    "FAMILIES",
    "GENERATOR_VERSION",
    "Family",
    "TinyCodeConfig",
    "TinyCodeSource",
    "canonical_key",
    "default_cache_dir",
    "families_by_level",
    "generate_split",
    "make_problem",
    "split_of_key",
    "write_splits",
]

if __name__ == "__main__":
    raise SystemExit(main())

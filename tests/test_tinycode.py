"""TinyCode generator: determinism, fixed disjoint splits, correct references, the task source."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from coderlplus.registry import TASK_SOURCES, ConfigError
from coderlplus.tasks import JsonlSource, load_rows
from coderlplus.tasks.dataset import DEFAULT_TEMPLATE, DatasetError, validate_row
from coderlplus.tasks.tinycode import (
    FAMILIES,
    TinyCodeConfig,
    TinyCodeSource,
    canonical_key,
    default_cache_dir,
    families_by_level,
    generate_split,
    main,
    make_problem,
    split_of_key,
)

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def train2000() -> list[dict]:
    return generate_split("train", 2000, seed=0)


@pytest.fixture(scope="module")
def all_splits(train2000) -> dict[str, list[dict]]:
    return {
        "train": train2000,
        "validation": generate_split("validation", 300, seed=0),
        "test": generate_split("test", 300, seed=0),
    }


def run_in_process(code: str, stdin: str) -> str:
    """Run a reference solution with fake input()/print() (fast; for checking many problems)."""
    lines = iter(stdin.split("\n"))
    out = io.StringIO()
    env = {"input": lambda *a: next(lines), "print": lambda *a, **k: print(*a, **k, file=out)}
    exec(code, env)
    return out.getvalue()


# ----------------------------------------------------------------------------- determinism


def test_same_args_same_output():
    a = generate_split("train", 300, seed=3)
    b = generate_split("train", 300, seed=3)
    assert a == b
    assert json.dumps(a) == json.dumps(b)


def test_different_seeds_differ():
    a = generate_split("train", 200, seed=0)
    b = generate_split("train", 200, seed=1)
    assert [r["key"] for r in a] != [r["key"] for r in b]


def test_prefix_stable():
    small = generate_split("validation", 50, seed=0)
    big = generate_split("validation", 150, seed=0)
    assert big[:50] == small


def test_tests_depend_only_on_the_problem(train2000):
    row = train2000[5]
    fam = row["family"]
    params = json.loads(row["key"].split(":", 1)[1])
    again = make_problem(fam, params)
    assert again["tests"] == row["tests"]
    assert again["question"] == row["question"]
    assert again["solution"] == row["solution"]
    assert canonical_key(fam, params) == row["key"]


# ----------------------------------------------------------------------------- splits


def test_splits_disjoint(all_splits):
    keys = {s: {r["key"] for r in rows} for s, rows in all_splits.items()}
    questions = {s: {r["question"] for r in rows} for s, rows in all_splits.items()}
    for s, rows in all_splits.items():
        assert len(keys[s]) == len(rows), f"duplicate problems in {s}"
        assert len(questions[s]) == len(rows), f"duplicate questions in {s}"
        assert all(split_of_key(k) == s for k in keys[s])
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not keys[a] & keys[b]
        assert not questions[a] & questions[b]


def test_splits_disjoint_large_n_and_other_seeds():
    train = {r["question"] for r in generate_split("train", 4000, seed=1)}
    val = {r["question"] for r in generate_split("validation", 600, seed=2)}
    test = {r["question"] for r in generate_split("test", 600, seed=0)}
    assert len(train) == 4000 and len(val) == 600 and len(test) == 600
    assert not train & val and not train & test and not val & test


def test_split_buckets_roughly_80_10_10():
    keys = [canonical_key("linear", {"A": a, "B": b}) for a in range(2, 10) for b in range(1, 100)]
    counts = Counter(split_of_key(k) for k in keys)
    assert 0.74 < counts["train"] / len(keys) < 0.86
    assert counts["validation"] > 0 and counts["test"] > 0


def test_ids_and_schema(all_splits):
    for split, rows in all_splits.items():
        for i, row in enumerate(rows):
            assert row["id"] == f"tinycode-{split}-{i:05d}"
            validate_row(row, f"{split}:{i}")
            assert row["difficulty"] == FAMILIES[row["family"]].level


def test_too_many_problems_is_a_clear_error():
    with pytest.raises(DatasetError, match="distinct problems"):
        generate_split("validation", 5000, levels=(1,))


def test_bad_arguments():
    with pytest.raises(DatasetError, match="split"):
        generate_split("dev", 10)
    with pytest.raises(ValueError, match="levels"):
        generate_split("train", 10, levels=(4,))
    with pytest.raises(ValueError, match="levels"):
        generate_split("train", 10, levels=())


# ----------------------------------------------------------------------------- families and references


def test_about_25_families_over_three_levels():
    by_level = families_by_level()
    assert set(by_level) == {1, 2, 3}
    assert all(len(names) >= 6 for names in by_level.values())
    assert 20 <= len(FAMILIES) <= 32
    assert all(FAMILIES[n].level == lv for lv, names in by_level.items() for n in names)


def test_every_family_in_train(train2000):
    assert {r["family"] for r in train2000} == set(FAMILIES)


def test_levels_filter():
    rows = generate_split("train", 150, levels=(1,))
    assert {r["difficulty"] for r in rows} == {1}
    rows = generate_split("train", 300, levels=[3, 2])
    assert {r["difficulty"] for r in rows} == {2, 3}
    assert {r["family"] for r in rows} == set(families_by_level()[2] + families_by_level()[3])


def test_solution_style(all_splits):
    for rows in all_splits.values():
        for row in rows:
            code = row["solution"]
            lines = code.split("\n")
            assert 2 <= len(lines) <= 8, code
            assert "def " not in code and "\t" not in code and "import" not in code
            assert "input()" in code and "print(" in code
            for line in lines:
                indent = len(line) - len(line.lstrip(" "))
                assert indent % 4 == 0 and line.strip(), code
            compile(code, row["id"], "exec")


def test_questions_short_and_literal(all_splits):
    for rows in all_splits.values():
        for row in rows:
            q = row["question"]
            assert q.startswith("Read ") and q.endswith(".") and len(q) < 160, q
            assert q.count(". ") <= 2, q  # 1-2 sentences (a trailing '"."' may add one)


def test_tests_shape_and_coverage(train2000):
    for row in train2000:
        tests = row["tests"]
        assert len(tests) == 4
        for t in tests:
            assert t["input"].endswith("\n") and t["output"].endswith("\n")
        outputs = {t["output"] for t in tests}
        if row["family"] in ("threshold", "parity", "pair_threshold"):
            assert len(outputs) == 2, row  # both branches are tested
    varied = Counter(len({t["output"] for t in row["tests"]}) > 1 for row in train2000)
    assert varied[True] / len(train2000) > 0.95


def test_expected_outputs_match_references_in_process(all_splits):
    """Every problem of the fixture splits: the reference program prints the expected output."""
    for rows in all_splits.values():
        for row in rows:
            for t in row["tests"]:
                assert run_in_process(row["solution"], t["input"]) == t["output"], (row["question"], t)


def test_every_family_many_params_in_process():
    """Problems drawn straight from each family (any split): references match the computed outputs."""
    rng = random.Random(0)
    for name, fam in FAMILIES.items():
        for _ in range(40):
            row = make_problem(name, fam.params(rng))
            assert len(row["tests"]) == 4
            for t in row["tests"]:
                assert t["output"].endswith("\n") and t["output"].strip(), row
                assert run_in_process(row["solution"], t["input"]) == t["output"], (row["question"], t)


def test_references_pass_in_subprocess(train2000):
    """60 problems spread over all families, each run as a real program on all its tests."""
    by_family: dict[str, list[dict]] = {}
    for row in train2000:
        by_family.setdefault(row["family"], []).append(row)
    sample = [rows[0] for rows in by_family.values()]
    sample += [rows[-1] for rows in by_family.values() if len(rows) > 1]
    sample = sample[:60]
    assert len(sample) >= len(FAMILIES)
    jobs = [(row, t) for row in sample for t in row["tests"]]

    def run(job):
        row, t = job
        res = subprocess.run(
            [sys.executable, "-S", "-c", row["solution"]],
            input=t["input"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return row, t, res

    with ThreadPoolExecutor(max_workers=4) as pool:
        for row, t, res in pool.map(run, jobs):
            assert res.returncode == 0, (row["solution"], res.stderr)
            assert res.stdout == t["output"], (row["question"], t, res.stdout)


# ----------------------------------------------------------------------------- the task source


def test_registered():
    assert TASK_SOURCES.get("tinycode") is TinyCodeSource
    assert TASK_SOURCES.get("jsonl") is JsonlSource


def test_source_loads_tasks_through_the_cache(tmp_path):
    cfg = TinyCodeConfig(seed=0, n_train=30, n_validation=5, n_test=7, cache_dir=str(tmp_path))
    src = TinyCodeSource(cfg)
    tasks = src.load("validation")
    assert len(tasks) == 5
    path = tmp_path / "v1-seed0-l123" / "validation-5.jsonl"
    assert path.exists()
    assert [r["id"] for r in load_rows(path)] == [t.id for t in tasks]
    t = tasks[0]
    assert t.kind == "codegen" and t.source == "tinycode"
    assert t.id == "tinycode-validation-00000"
    question = load_rows(path)[0]["question"]
    assert t.prompt == [{"role": "user", "content": DEFAULT_TEMPLATE.format(question=question)}]
    assert len(t.payload["tests"]) == 4 and t.payload["reference"]
    assert (
        t.meta["split"] == "validation" and t.meta["family"] in FAMILIES and t.meta["difficulty"] in (1, 2, 3)
    )
    assert t.meta["key"]
    # the cached file is reused, and equals a fresh generation
    mtime = path.stat().st_mtime_ns
    assert [x.id for x in src.load("validation")] == [x.id for x in tasks]
    assert path.stat().st_mtime_ns == mtime
    assert load_rows(path) == generate_split("validation", 5, seed=0)
    assert len(src.load("test")) == 7 and len(src.load("train")) == 30
    assert not list(path.parent.glob(".*tmp"))


def test_source_from_mapping_and_levels(tmp_path):
    src = TinyCodeSource({"n_train": 12, "levels": [2], "cache_dir": str(tmp_path)})
    tasks = src.load("train")
    assert len(tasks) == 12 and {t.meta["difficulty"] for t in tasks} == {2}
    assert (tmp_path / "v1-seed0-l2" / "train-12.jsonl").exists()


def test_cache_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("CODERLPLUS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "tinycode"
    src = TinyCodeSource(TinyCodeConfig(n_test=3))
    assert len(src.load("test")) == 3
    assert (tmp_path / "c" / "tinycode" / "v1-seed0-l123" / "test-3.jsonl").exists()


def test_corrupt_cache_file_says_delete_it(tmp_path):
    src = TinyCodeSource(TinyCodeConfig(n_test=3, cache_dir=str(tmp_path)))
    path = src.split_path("test")
    path.parent.mkdir(parents=True)
    path.write_text('{"id": "x", "question": "q"}\n')
    with pytest.raises(DatasetError, match="delete"):
        src.load("test")


@pytest.mark.parametrize(
    "values, match",
    [
        ({"levels": [4]}, "levels"),
        ({"levels": []}, "levels"),
        ({"n_train": 0}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"prompt_template": "{task}"}, "placeholder"),
        ({"n_tran": 5}, "n_train"),  # unknown key, with a suggestion
    ],
)
def test_config_errors(values, match):
    with pytest.raises(ConfigError, match=match):
        TASK_SOURCES.make_config("tinycode", values)


def test_config_defaults():
    cfg = TASK_SOURCES.make_config("tinycode", {"levels": [3, 1, 1]})
    assert cfg.levels == [1, 3]
    assert TinyCodeConfig().levels == [1, 2, 3] and TinyCodeConfig().levels is not TinyCodeConfig().levels


def test_unknown_split(tmp_path):
    with pytest.raises(DatasetError, match="split"):
        TinyCodeSource(TinyCodeConfig(cache_dir=str(tmp_path))).load("dev")


def test_cli_writes_three_splits_readable_by_jsonl_source(tmp_path, capsys):
    out = tmp_path / "tc"
    assert (
        main(["--out", str(out), "--n-train", "20", "--n-validation", "4", "--n-test", "6", "--seed", "2"])
        == 0
    )
    for split, n in (("train", 20), ("validation", 4), ("test", 6)):
        assert load_rows(out / f"{split}.jsonl") == generate_split(split, n, seed=2)
    tasks = JsonlSource({"path": str(out)}).load("test")
    assert len(tasks) == 6 and tasks[0].source == "jsonl" and tasks[0].meta["split"] == "test"


def test_cli_as_module_identical_across_processes(tmp_path):
    """``python -m coderlplus.tasks.tinycode`` in another interpreter (another PYTHONHASHSEED: no use of
    hash()) writes exactly the rows generated here."""
    args = [
        "--out",
        str(tmp_path),
        "--seed",
        "7",
        "--n-train",
        "100",
        "--n-validation",
        "30",
        "--n-test",
        "30",
    ]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    res = subprocess.run(
        [sys.executable, "-m", "coderlplus.tasks.tinycode", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr, res.stderr
    for split, n in (("train", 100), ("validation", 30), ("test", 30)):
        assert load_rows(tmp_path / f"{split}.jsonl") == generate_split(split, n, seed=7)

"""The dataset schema: loader, validation errors, row -> Task, the jsonl source."""

from __future__ import annotations

import json
import sys

import pytest

from coderlplus.registry import TASK_SOURCES, ConfigError
from coderlplus.tasks.dataset import (
    DEFAULT_TEMPLATE,
    DatasetError,
    JsonlConfig,
    JsonlSource,
    TaskSource,
    load_rows,
    read_rows,
    row_to_task,
    rows_to_tasks,
    validate_row,
    write_jsonl,
)
from coderlplus.types import Task


def make_row(i: int = 0, **extra) -> dict:
    return {
        "id": f"p{i}",
        "question": f"Read an integer n. Print n plus {i}.",
        "tests": [{"input": "1\n", "output": f"{1 + i}\n"}, {"input": "5\n", "output": f"{5 + i}\n"}],
        "solution": f"n = int(input())\nprint(n + {i})",
        "difficulty": 1,
        "family": "arith_const",
        **extra,
    }


def write_lines(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    rows = [make_row(i) for i in range(3)] + [make_row(3, source_url="http://x", tags=["a"])]
    rows[1]["solution"] = None
    rows[1]["difficulty"] = None
    path = tmp_path / "sub" / "train.jsonl"
    write_jsonl(rows, path)
    assert load_rows(path) == rows
    assert [w for w, _ in read_rows(path)] == [f"{path}:{i}" for i in range(1, 5)]
    assert not [p for p in path.parent.iterdir() if p.name != "train.jsonl"]  # no temp file left

    task = row_to_task(load_rows(path)[3], source="mydata", split="train", index=3)
    assert isinstance(task, Task)
    assert task.id == "p3" and task.kind == "codegen" and task.source == "mydata"
    assert task.prompt == [{"role": "user", "content": DEFAULT_TEMPLATE.format(question=rows[3]["question"])}]
    assert task.prompt[0]["content"].startswith("Read an integer n. Print n plus 3.\nWrite a Python program")
    assert task.payload == {"tests": rows[3]["tests"], "reference": rows[3]["solution"]}
    assert task.meta == {
        "split": "train",
        "question": "Read an integer n. Print n plus 3.",
        "difficulty": 1,
        "family": "arith_const",
        "source_url": "http://x",
        "tags": ["a"],
        "index": 3,
    }
    t1 = row_to_task(rows[1], source="mydata", split="validation")
    assert (
        t1.payload["reference"] is None and t1.meta["difficulty"] is None and t1.meta["split"] == "validation"
    )


def test_optional_fields_may_be_absent():
    row = {"id": "a", "question": "Q?", "tests": [{"input": "", "output": "1\n"}]}
    validate_row(row, "x.jsonl:1")
    task = row_to_task(row, "s", "test")
    assert task.payload["reference"] is None and task.meta["family"] is None


def test_write_jsonl_replaces_atomically(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl([make_row(0)], path)
    write_jsonl([make_row(1), make_row(2)], path)
    assert [r["id"] for r in load_rows(path)] == ["p1", "p2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_write_jsonl_failure_leaves_old_file(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl([make_row(0)], path)

    def bad_rows():
        yield make_row(1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_jsonl(bad_rows(), path)
    assert [r["id"] for r in load_rows(path)] == ["p0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_json_list_and_blank_lines(tmp_path):
    jpath = tmp_path / "rows.json"
    jpath.write_text(json.dumps([make_row(0), make_row(1)]))
    assert [r["id"] for r in load_rows(jpath)] == ["p0", "p1"]
    lpath = write_lines(tmp_path / "rows.jsonl", [json.dumps(make_row(0)), "", "  ", json.dumps(make_row(1))])
    assert [w for w, _ in read_rows(lpath)] == [f"{lpath}:1", f"{lpath}:4"]


# ----------------------------------------------------------------------------- errors


def test_bad_json_line_names_file_and_line(tmp_path):
    path = write_lines(
        tmp_path / "train.jsonl", [json.dumps(make_row(0)), json.dumps(make_row(1)), '{"id": "p2", ']
    )
    with pytest.raises(DatasetError, match=r"train\.jsonl:3: invalid JSON") as e:
        load_rows(path)
    assert "fix or remove" in str(e.value)


def test_non_object_line(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ["[1, 2]"])
    with pytest.raises(DatasetError, match=r"t\.jsonl:1: expected a JSON object"):
        load_rows(path)


def test_bad_json_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"a": 1}')
    with pytest.raises(DatasetError, match="list"):
        load_rows(path)
    path.write_text("[1,\n")
    with pytest.raises(DatasetError, match=r"t\.json:\d+: invalid JSON"):
        load_rows(path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"question": None}, "'question' must be a non-empty string"),
        ({"question": ""}, "'question' must be a non-empty string"),
        ({"id": 5}, "'id' must be a non-empty string"),
        ({"tests": "1 -> 2"}, "'tests' must be a list"),
        ({"tests": []}, "'tests' is empty"),
        ({"tests": [{"input": "1\n"}]}, r"tests\[0\] must be an object"),
        ({"tests": [{"input": "1\n", "output": 2}]}, r"tests\[0\]\.output must be a string"),
        ({"tests": [["1\n", "2\n"]]}, r"tests\[0\] must be an object"),
        ({"solution": 3}, "'solution' must be a string"),
        ({"difficulty": "easy"}, "'difficulty' must be an integer"),
        ({"difficulty": True}, "'difficulty' must be an integer"),
        ({"family": 1}, "'family' must be a string"),
    ],
)
def test_validate_row_wrong_types(change, match):
    with pytest.raises(DatasetError, match=match) as e:
        validate_row({**make_row(0), **change}, "data/train.jsonl:17")
    assert str(e.value).startswith("data/train.jsonl:17: ")


def test_validate_row_missing_fields():
    row = make_row(0)
    del row["tests"]
    del row["question"]
    with pytest.raises(DatasetError, match=r"^x\.jsonl:2: missing field\(s\) 'question', 'tests'"):
        validate_row(row, "x.jsonl:2")
    with pytest.raises(DatasetError, match="must be a JSON object"):
        validate_row(["not", "a", "dict"], "x.jsonl:2")


def test_source_reports_file_and_line_of_a_bad_row(tmp_path):
    bad = make_row(1)
    del bad["tests"]
    write_lines(tmp_path / "train.jsonl", [json.dumps(make_row(0)), "", json.dumps(bad)])
    src = JsonlSource(JsonlConfig(path=str(tmp_path / "{split}.jsonl")))
    with pytest.raises(DatasetError, match=r"train\.jsonl:3: missing field\(s\) 'tests'"):
        src.load("train")


def test_duplicate_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl([make_row(0), make_row(1), make_row(0)], path)
    with pytest.raises(DatasetError, match=r"d\.jsonl:3: duplicate id 'p0' \(first at .*d\.jsonl:1\)"):
        rows_to_tasks(read_rows(path), "s", "train")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_rows(tmp_path / "x.csv")
    with pytest.raises(DatasetError, match="is a folder"):
        load_rows(tmp_path)


def test_parquet_without_pyarrow_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="pip install pyarrow"):
        load_rows(path)


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [make_row(0), make_row(1)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_rows(tmp_path / "d.parquet") == rows


def test_hf_folder_without_datasets_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(DatasetError, match="pip install datasets"):
        load_rows(tmp_path)


# ----------------------------------------------------------------------------- templates


def test_custom_template():
    task = row_to_task(make_row(0), "s", "train", template="Problem: {question}\nAnswer in {{python}}.")
    assert task.prompt[0]["content"] == "Problem: Read an integer n. Print n plus 0.\nAnswer in {python}."


@pytest.mark.parametrize(
    "template", ["{question} in {language}", "{0}", "{question.upper}", "no placeholder", "{"]
)
def test_bad_template(template):
    with pytest.raises(DatasetError, match="template"):
        row_to_task(make_row(0), "s", "train", template=template)
    with pytest.raises(ConfigError, match="prompt_template"):
        JsonlConfig(path="d/{split}.jsonl", prompt_template=template)


def test_unknown_placeholder_message_names_it():
    with pytest.raises(DatasetError, match=r"\{language\}.*only \{question\}"):
        row_to_task(make_row(0), "s", "train", template="{question} in {language}")


# ----------------------------------------------------------------------------- the jsonl source


def test_jsonl_source_with_split_pattern(tmp_path):
    write_jsonl([make_row(i) for i in range(5)], tmp_path / "data" / "train.jsonl")
    write_jsonl([make_row(9)], tmp_path / "data" / "validation.jsonl")
    cfg = TASK_SOURCES.make_config("jsonl", {"path": str(tmp_path / "data" / "{split}.jsonl")})
    src = TASK_SOURCES.get("jsonl")(cfg)
    train = src.load("train")
    assert [t.id for t in train] == [f"p{i}" for i in range(5)]
    assert all(t.kind == "codegen" and t.source == "jsonl" and t.meta["split"] == "train" for t in train)
    assert [t.meta["index"] for t in train] == list(range(5))
    assert [t.id for t in src.load("validation")] == ["p9"]
    assert src.rows("train") == [make_row(i) for i in range(5)]
    with pytest.raises(DatasetError, match=r"no test split: .*test\.jsonl does not exist"):
        src.load("test")
    with pytest.raises(DatasetError, match="unknown split"):
        src.load("dev")


def test_jsonl_source_folder_and_max_rows(tmp_path):
    write_jsonl([make_row(i) for i in range(5)], tmp_path / "train.jsonl")
    (tmp_path / "test.json").write_text(json.dumps([make_row(7)]))
    src = JsonlSource({"path": str(tmp_path), "max_rows": 2, "prompt_template": "Q: {question}"})
    tasks = src.load("train")
    assert [t.id for t in tasks] == ["p0", "p1"]
    assert tasks[0].prompt[0]["content"] == "Q: Read an integer n. Print n plus 0."
    assert [t.id for t in src.load("test")] == ["p7"]
    with pytest.raises(DatasetError, match=r"no validation split in .*looked for validation\.jsonl"):
        src.load("validation")


def test_jsonl_source_path_neither_pattern_nor_folder(tmp_path):
    src = JsonlSource({"path": str(tmp_path / "one.jsonl")})
    with pytest.raises(DatasetError, match=r"\{split\}"):
        src.load("train")


@pytest.mark.parametrize(
    "values, match",
    [
        ({}, "path is empty"),
        ({"path": ""}, "path is empty"),
        ({"path": "d/{split}.jsonl", "max_rows": 0}, "max_rows"),
        ({"pth": "x"}, "Did you mean 'path'"),
    ],
)
def test_jsonl_config_errors(values, match):
    with pytest.raises(ConfigError, match=match) as e:
        TASK_SOURCES.make_config("jsonl", values)
    assert str(e.value).startswith("data=jsonl: ")


def test_task_source_subclass_with_rows_only():
    class Mine(TaskSource):
        def rows(self, split):
            return [make_row(0), make_row(1)]

    tasks = Mine().load("test")
    assert [t.id for t in tasks] == ["p0", "p1"] and tasks[0].source == "Mine"

    class Broken(TaskSource):
        def rows(self, split):
            return [{"id": "x", "question": "q"}]

    with pytest.raises(DatasetError, match=r"Broken:test\[row 0\]: missing field"):
        Broken().load("test")

    with pytest.raises(NotImplementedError):
        TaskSource().load("train")

"""load_records: every supported source, and every error naming the file, the line (or row) and the field."""

import json
import re
from pathlib import Path

import pytest

from ksg_ray.common.records import DataError, Record, load_records, write_jsonl

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROW = {"instruction": "Be brief.", "input": "What is 2+2?", "output": "4."}


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_reads_records_with_source_and_ignores_extra_keys_and_blank_lines(tmp_path):
    extra = json.dumps({**ROW, "id": 7, "input": "Q2"})
    path = write_lines(tmp_path / "d.jsonl", json.dumps(ROW), "", "   ", extra)
    assert load_records(path) == [Record("Be brief.", "What is 2+2?", "4.", f"{path}:1"),
                                  Record("Be brief.", "Q2", "4.", f"{path}:4")]


def test_empty_instruction_is_allowed(tmp_path):
    path = write_lines(tmp_path / "d.json", json.dumps({**ROW, "instruction": ""}))
    assert load_records(path)[0].instruction == ""


def test_malformed_json_names_path_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", json.dumps(ROW), "", '{"instruction": "x", "input": ')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: not valid JSON: "):
        load_records(path)


def test_a_bad_line_after_the_limit_still_fails(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", json.dumps(ROW), "not json")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: not valid JSON"):
        load_records(path, limit=1)


@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_missing_field_names_path_line_and_field(tmp_path, field):
    row = {k: v for k, v in ROW.items() if k != field}
    path = write_lines(tmp_path / "d.jsonl", json.dumps(ROW), json.dumps(row))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: field '{field}' is missing"):
        load_records(path)


@pytest.mark.parametrize("value", [None, 3, ["a"]])
def test_non_string_field_names_type(tmp_path, value):
    path = write_lines(tmp_path / "d.jsonl", json.dumps({**ROW, "input": value}))
    message = rf"^{re.escape(str(path))}:1: field 'input' must be a string, got {type(value).__name__}"
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", "[1, 2]")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1: expected a JSON object"):
        load_records(path)


def test_whitespace_output_is_rejected_only_when_required(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", json.dumps(ROW), json.dumps({**ROW, "output": " \n\t"}))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: field 'output' is empty"):
        load_records(path)
    assert load_records(path, require_output=False)[1].output == " \n\t"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: file not found$"):
        load_records(path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no records \(empty file\)$"):
        load_records(path)


def test_unsupported_format(tmp_path):
    path = write_lines(tmp_path / "d.csv", "instruction,input,output")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: unsupported format"):
        load_records(path)


def test_limit_keeps_the_first_records(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", *(json.dumps({**ROW, "input": f"q{i}"}) for i in range(5)))
    assert [r.input for r in load_records(path, limit=3)] == ["q0", "q1", "q2"]
    assert len(load_records(path, limit=50)) == 5
    with pytest.raises(ValueError, match="limit"):
        load_records(path, limit=0)


def test_demo_data_sets():
    medical, financial = load_records("demo:medical"), load_records("demo:financial")
    assert load_records("demo") == medical
    assert len(medical) == len(financial) == 48
    assert {r.instruction for r in medical} == {
        "If you are a doctor, please answer the medical questions based on the patient's description."}
    assert 3 <= len({r.instruction for r in financial}) <= 5
    assert all(r.input.strip() and r.output.strip() for r in medical + financial)
    assert [r.input for r in load_records("demo:financial", limit=4)] == [r.input for r in financial[:4]]
    with pytest.raises(DataError, match="demo:legal: unknown demo data set; use one of demo:medical"):
        load_records("demo:legal")


def test_parquet_round_trip(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{**ROW, "input": f"q{i}", "extra": i} for i in range(3)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    expected = [Record(ROW["instruction"], f"q{i}", ROW["output"], f"{path}:{i + 1}") for i in range(3)]
    assert load_records(path) == expected


def test_parquet_errors_name_row_and_field(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([ROW] * 6 + [{**ROW, "output": None}]), path)
    message = rf"^{re.escape(str(path))}: row 7: field 'output' must be a string, got NoneType"
    with pytest.raises(DataError, match=message):
        load_records(path)
    pq.write_table(pa.Table.from_pylist([{"instruction": "", "input": "q"}]), path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: row 1: field 'output' is missing"):
        load_records(path)
    pq.write_table(pa.Table.from_pylist([ROW]).slice(0, 0), path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no records"):
        load_records(path)
    path.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable Parquet file"):
        load_records(path)


def test_hf_sources_need_datasets(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_records("hf:someone/some-data:train")
        with pytest.raises(ImportError, match="pip install datasets"):
            load_records(tmp_path)
    else:
        ds = datasets.Dataset.from_list([ROW, {**ROW, "input": "q2"}])
        ds.save_to_disk(str(tmp_path / "saved"))
        assert [r.input for r in load_records(tmp_path / "saved")] == [ROW["input"], "q2"]


def test_write_jsonl_round_trip_is_atomic(tmp_path):
    records = [Record("", "q\u00e9", "a\nb", source="x:1"), Record("i", "q2", "a2")]
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(records, path)
    loaded = [(r.instruction, r.input, r.output) for r in load_records(path)]
    assert loaded == [("", "q\u00e9", "a\nb"), ("i", "q2", "a2")]
    assert "source" not in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temp file left behind


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared domain data not present")
def test_shared_domain_data_loads():
    counts = {"medical/train": 3364, "medical/dev": 112, "financial/train": 1693, "financial/dev": 18}
    for name, n in counts.items():
        assert len(load_records(SHARED_DATA / f"{name}.jsonl")) == n

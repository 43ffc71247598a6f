"""docs/RELIABILITY.md cannot drift from the suite: every row names a test that exists and quotes at
least one text (what the test asserts the user sees) that the test's source holds."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<stage>[^|]+) \| (?P<fault>[^|]+) \| (?P<sees>[^|]+) \| (?P<test>[\w.]+::\w+) \|$")


def _rows():
    return [
        m.groupdict()
        for line in (REPO / "docs" / "RELIABILITY.md").read_text().splitlines()
        if (m := ROW.match(line))
    ]


def _test_source(reference: str) -> str:
    file, name = reference.split("::")
    source = (REPO / "tests" / file).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node)
    raise AssertionError(f"docs/RELIABILITY.md names {reference}, which is no test")


def test_every_row_names_a_test_that_asserts_what_the_row_says():
    rows = _rows()
    assert len(rows) >= 30  # the minimum of kinds
    for row in rows:
        source = _test_source(row["test"])
        quotes = re.findall(r"`([^`]+)`", row["sees"])
        # a row that quotes nothing would only check that its test exists
        assert quotes, f"the row for {row['test']} quotes nothing its test asserts"
        for quoted in quotes:
            # a test asserts a message as a literal or a regex: compare without regex escapes
            plain = source.replace("\\\\", "\\").replace("\\", "")
            assert quoted in source or quoted in plain, f"{row['test']} does not check `{quoted}`"


def test_the_checker_notices_a_row_whose_test_does_not_say_it():
    source = _test_source("test_bad_input.py::test_missing_file")
    assert "file not found" in source and "no such thing" not in source

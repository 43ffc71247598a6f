"""Bad input gets a DataError naming the file, column, row and what was expected."""

import numpy as np
import pandas as pd
import pytest

from conftest import study_config, study_files
from engagerec.cli import main
from engagerec.config import FeatureConfig, SyntheticConfig, config_from_dict
from engagerec.data.errors import DataError
from engagerec.data.prepare import prepare
from engagerec.data.synthetic import write_study_tables


def _interactions(changes=None):
    frame = pd.DataFrame(
        {
            "user_id": [0] * 12 + [1] * 12,
            "content_id": [0, 1, 2] * 8,
            "watch_time": [30.0] * 24,
            "timestamp": range(24),
        }
    )
    for (column, row), value in (changes or {}).items():
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    return frame


def _prepare(tmp_path, **tables):
    cfg = study_config(study_files(tmp_path, **tables))
    return prepare(cfg.data, tmp_path / "out")


def test_missing_file(tmp_path):
    files = study_files(tmp_path)
    files["users"] = str(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"file .*nope\.csv: file not found"):
        prepare(study_config(files).data, tmp_path / "out")


def test_missing_column(tmp_path):
    with pytest.raises(DataError, match=r"file .*users\.csv: required column 'gender' is missing"):
        _prepare(tmp_path, users=pd.DataFrame({"user_id": [0, 1], "age": [20, 30]}))


def test_wrong_dtype_names_the_row(tmp_path):
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, interactions=_interactions({("watch_time", 7): "abc"}))
    assert err.value.column == "watch_time" and err.value.row == 7
    message = str(err.value)
    assert "interactions.csv" in message and "line 9" in message
    assert '"abc"' in message and "DOUBLE" in message  # the value, and the number it should be


def test_infinite_value(tmp_path):
    with pytest.raises(DataError, match=r"column 'watch_time', row 3 .*value is infinite"):
        _prepare(tmp_path, interactions=_interactions({("watch_time", 3): np.inf}))


def test_a_numeric_feature_too_large_to_normalise(tmp_path):
    """Its squares would overflow a double: an error naming the column, not a NaN std."""
    users = pd.DataFrame(
        {"user_id": [0, 1, 2, 3], "age": [20, 1e300, 30, 40], "gender": ["F", "M", "F", "M"]}
    )
    with pytest.raises(DataError, match=r"users\.csv, column 'age', row 1 .*numeric feature 'age'.*1e\+?150"):
        _prepare(tmp_path, users=users)


def test_nan_in_a_numeric_feature_without_imputation(tmp_path):
    users = pd.DataFrame(
        {"user_id": [0, 1, 2, 3], "age": [20, np.nan, 30, 40], "gender": ["F", "M", "F", "M"]}
    )
    with pytest.raises(
        DataError, match=r"users\.csv, column 'age', row 1 \(line 3\): numeric feature value is missing"
    ):
        _prepare(tmp_path, users=users)


def test_missing_id(tmp_path):
    with pytest.raises(DataError, match=r"column 'user_id', row 5 .*id is missing"):
        _prepare(tmp_path, interactions=_interactions({("user_id", 5): None}))


def test_duplicate_ids_in_user_and_content_tables(tmp_path):
    users = pd.DataFrame({"user_id": [0, 1, 1], "age": [1, 2, 3], "gender": ["F", "M", "F"]})
    with pytest.raises(DataError, match=r"users\.csv, column 'user_id', row 2 .*duplicate id"):
        _prepare(tmp_path, users=users)
    content = pd.DataFrame(
        {"content_id": [0, 1, 2, 3, 4, 5, 0], "genres": ["1"] * 7, "rating": [1.0] * 7, "duration": [9] * 7}
    )
    with pytest.raises(DataError, match=r"content\.csv, column 'content_id', row 6 .*duplicate id"):
        _prepare(tmp_path, content=content)


def test_ids_that_do_not_join(tmp_path):
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, interactions=_interactions({("content_id", 4): 99}))
    assert err.value.row == 4 and err.value.got == 99 and "does not join" in str(err.value)


def test_empty_after_filtering(tmp_path):
    interactions = _interactions().iloc[:8]  # every user has <= 10 views
    with pytest.raises(DataError, match=r"no rows left after filtering \(8 read; .*user has <= 10 views: 8"):
        _prepare(tmp_path, interactions=interactions)


def test_post_exposure_column_cannot_be_a_feature(tmp_path):
    cfg = study_config(study_files(tmp_path))
    cfg.data.features.append(FeatureConfig(name="watch_time", kind="numeric"))
    with pytest.raises(DataError, match="observed during or after the view"):
        prepare(cfg.data, tmp_path / "out")


def test_feature_column_that_no_table_has(tmp_path):
    cfg = study_config(study_files(tmp_path))
    cfg.data.features.append(FeatureConfig(name="country"))
    with pytest.raises(DataError, match=r"reads column 'country', which no table has"):
        prepare(cfg.data, tmp_path / "out")


def test_tables_that_drifted_from_the_expected_columns(tmp_path):
    """Parquet tables (the synthetic generator's) whose columns drifted: a column of the wrong
    kind, a required column gone. prepare() names the file, the column and the row."""
    raw = write_study_tables(tmp_path / "raw", SyntheticConfig(num_rows=2_000, num_users=50, num_contents=40))
    source = {
        "adapter": "study",
        **{t: str(raw / f"{t}.parquet") for t in ("interactions", "users", "content")},
    }
    features = [{"name": "user_id"}, {"name": "gender"}, {"name": "age", "kind": "numeric"}]
    cfg = config_from_dict({"data": {"source": source, "features": features}})
    assert prepare(cfg.data, tmp_path / "out")["rows_read"] == 2_000
    users = pd.read_parquet(raw / "users.parquet")
    users.assign(age=users["age"].astype(str).where(users.index != 5, "old")).to_parquet(
        raw / "users.parquet"
    )
    with pytest.raises(DataError, match=r"users\.parquet, column 'age', row 5: value is not a number") as err:
        prepare(cfg.data, tmp_path / "out")
    assert (err.value.expected, err.value.got) == ("a number", "old")
    content = pd.read_parquet(raw / "content.parquet")
    content.drop(columns=["duration"]).to_parquet(raw / "content.parquet")
    with pytest.raises(DataError, match=r"content\.parquet: required column 'duration' is missing"):
        prepare(cfg.data, tmp_path / "out")


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "name: bad\ndata:\n"
        "  source: {adapter: study, interactions: missing.csv, users: u.csv, content: c.csv}\n"
    )
    assert main(["prepare", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: file missing.csv: file not found" in err and len(err.splitlines()) == 1  # no traceback

"""The operators' Salesforce report, read offline: checked rows, bad lines reported by number, streamed."""

from __future__ import annotations

import csv
import io
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm_states.crm.export import (
    APP_USER_ID,
    APP_USER_NAME,
    CONTACT_ID,
    EMAIL,
    FIRST_NAME,
    LAST_NAME,
    NATIONBUILDER_ID,
    SUSTAINER,
    ExportFormatError,
    ExportProblem,
    ExportRow,
    open_export,
)
from crm_states.testing.salesforce import salesforce_id

HEADER = [NATIONBUILDER_ID, CONTACT_ID, FIRST_NAME, LAST_NAME, APP_USER_NAME, APP_USER_ID, EMAIL, SUSTAINER]
CONTACT, APP_USER = salesforce_id("003", 1), salesforce_id("a0A", 1)


def write(path: Path, header: list[str], rows: list[list[str]], *, bom: bool = False,
          newline: str = "\r\n") -> Path:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.getvalue().encode("utf-8"))
    return path


def row(nb: str = "123", contact: str = CONTACT, app_user: str = APP_USER, email: str = "ruth@example.org",
        sustainer: str = "Active") -> list[str]:
    return [nb, contact, "Ruth", "O'Brien", "SAU-0001", app_user, email, sustainer]


def read(path: Path, **kwargs) -> list[ExportRow | ExportProblem]:
    with open_export(path, **kwargs) as export:
        return list(export)


def test_a_report_as_salesforce_exports_it(tmp_path):
    path = write(tmp_path / "report.csv", HEADER, [
        row(),
        row("12,345", salesforce_id("003", 2), salesforce_id("a0A", 2), " Dov@Example.org ", "Former"),
        row("678.0", salesforce_id("003", 3)[:15], "", "", ""),
        row("", salesforce_id("003", 4), salesforce_id("a0A", 4), "x@example.org", " active "),
    ], bom=True)
    assert read(path) == [
        ExportRow(2, 123, CONTACT, APP_USER, "ruth@example.org", True),
        ExportRow(3, 12345, salesforce_id("003", 2), salesforce_id("a0A", 2), "Dov@Example.org", False),
        ExportRow(4, 678, salesforce_id("003", 3)[:15], None, None, False),
        ExportRow(5, None, salesforce_id("003", 4), salesforce_id("a0A", 4), "x@example.org", True),
    ]


def test_column_order_case_and_spaces_do_not_matter_and_names_are_optional(tmp_path):
    needed = [SUSTAINER, f"  {EMAIL.upper()} ", APP_USER_ID, CONTACT_ID, NATIONBUILDER_ID.lower()]
    path = write(tmp_path / "r.csv", needed, [["Active", "a@example.org", APP_USER, CONTACT, "9"]], newline="\n")
    assert read(path) == [ExportRow(2, 9, CONTACT, APP_USER, "a@example.org", True)]


def test_a_header_lacking_needed_columns_is_refused_in_one_line(tmp_path):
    path = write(tmp_path / "r.csv", [FIRST_NAME, CONTACT_ID, "Something else"], [["a", CONTACT, "b"]])
    with pytest.raises(ExportFormatError) as caught:
        open_export(path)
    message = str(caught.value)
    assert "\n" not in message
    for name in (NATIONBUILDER_ID, APP_USER_ID, EMAIL, SUSTAINER):
        assert repr(name) in message
    assert repr(CONTACT_ID) not in message
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ExportFormatError, match="empty file"):
        open_export(tmp_path / "empty.csv")
    with pytest.raises(ExportFormatError, match="2 times"):
        open_export(write(tmp_path / "twice.csv", [*HEADER, EMAIL], []))


def test_bad_lines_are_reported_by_number_without_stopping(tmp_path):
    path = tmp_path / "r.csv"
    good = ",".join(row())
    lines = [
        ",".join(HEADER),
        good,                                                                     # 2
        ",".join(row(contact=salesforce_id("001", 9))),                           # 3: an Account id
        ",".join(row(app_user="a0A12")),                                          # 4: not an id
        ",".join(row(email="x" * 1500 + "@example.org")),                         # 5: oversized
        ",".join(row(nb="12 345")),                                               # 6: not a number
        ",".join(row(nb="١٢٣")),                                                  # 7: not ASCII digits
        ",".join(row(nb="0")),                                                    # 8: out of range
        ",".join(row(contact="", app_user="")),                                   # 9: no id at all
        "1,2",                                                                    # 10: too short
        "",                                                                       # 11: blank: skipped
        '"' + "x" * 200_000 + '",1',                                              # 12: past csv's limit
        good.replace("ruth", "ru\udcffth"),                                       # 13: not UTF-8 (below)
        '"Grand Totals (9 records)"',                                             # 14: a report footer
        good.replace("Ruth", '"Ruth\nOn two lines"'),                             # 15-16: one record
        good,                                                                     # 17
    ]
    path.write_bytes("\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n")
    items = read(path)
    assert [type(i).__name__[6] + str(i.line) for i in items] == [
        "R2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10", "P12", "P13", "P14", "R15", "R17"]
    problems = {i.line: i.detail for i in items if isinstance(i, ExportProblem)}
    assert "key prefix is not 003" in problems[3] and "not a Salesforce record id" in problems[4]
    assert "1,512 characters long" in problems[5] and "x" * 50 not in problems[5]
    assert "whole number" in problems[6] and "whole number" in problems[7] and "out of range" in problems[8]
    assert "neither" in problems[9] and "fewer than the header" in problems[10]
    assert "not valid CSV" in problems[12] and "not UTF-8" in problems[13]
    # A refused line still names its NationBuilder id when that cell was readable, so the refusal can be
    # filed under the profile it concerns; never when the id itself is the problem, the line names no record or
    # cannot be read.
    keys = {i.line: i.nationbuilder_id for i in items if isinstance(i, ExportProblem)}
    assert keys == {3: 123, 4: 123, 5: 123, 6: None, 7: None, 8: None, 9: None, 10: None, 12: None, 13: 123, 14: None}
    # ... and its App User id when that cell is a valid id (the problem lies in another column).
    app_users = {i.line for i in items if isinstance(i, ExportProblem) and i.app_user_id == APP_USER}
    assert app_users == {3, 5, 6, 7, 8, 13}
    with open_export(path) as export:
        assert sum(1 for _ in export) == 14 and (export.rows, export.problems) == (3, 11)


def test_restarting_part_way(tmp_path):
    path = write(tmp_path / "r.csv", HEADER, [row(nb=str(n)) for n in range(1, 11)])
    items = read(path, from_line=8)
    assert [(i.line, i.nationbuilder_id) for i in items] == [(8, 7), (9, 8), (10, 9), (11, 10)]


def test_the_app_user_prefix_is_checked_when_known(tmp_path):
    path = write(tmp_path / "r.csv", HEADER, [row(app_user=salesforce_id("a0B", 3))])
    assert isinstance(read(path)[0], ExportRow)
    [problem] = read(path, app_user_key_prefix="a0A")
    assert problem == ExportProblem(2, f"{APP_USER_ID} is not an id of the expected object (its key prefix is not a0A)",
                                    nationbuilder_id=123, app_user_id=None)


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.one_of(st.none(), st.integers(1, 2**63 - 1)), st.integers(1, 10**8),
                               st.one_of(st.none(), st.integers(1, 10**8)), texts, st.booleans(), texts),
                     max_size=15))
def test_what_is_written_is_read_back(tmp_path, rows):
    expected, lines, line = [], [], 2
    for nb, contact, app_user, email, sustainer, name in rows:
        record = [str(nb) if nb else "", salesforce_id("003", contact), name, "", "",
                  salesforce_id("a0A", app_user) if app_user else "", email, "Active" if sustainer else "Former"]
        lines.append(record)
        if any(v.strip() for v in record):
            expected.append(ExportRow(line, nb, salesforce_id("003", contact),
                                      salesforce_id("a0A", app_user) if app_user else None,
                                      email.strip() or None, sustainer))
        line += 1 + sum(v.count("\n") + v.count("\r") - v.count("\r\n") for v in record)
    path = write(tmp_path / "r.csv", HEADER, lines)
    assert read(path) == expected


def test_the_file_is_streamed(tmp_path):
    """Memory stays flat while a file many times its size is read (tracemalloc counts every allocation)."""
    path = write(tmp_path / "big.csv", HEADER, [row(nb=str(n), email=f"user{n}@example.org" + "x" * 300)
                                                  for n in range(1, 20_001)])
    assert path.stat().st_size > 7_000_000
    tracemalloc.start()
    try:
        with open_export(path) as export:
            count = sum(1 for _ in export)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20_000 and peak < 500_000, peak

"""SPEC.md's field table and the code that enforces it (formats/schema.py) say the same thing: every field the
spec lists is accepted with each dtype and shape it allows and refused with any other; every field the code
knows is in the spec; "required" means what the spec says."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from formats.errors import CacheError
from formats.schema import DTYPES, OPTIONAL_FIELDS, REQUIRED_FIELDS, TOPK_FIELDS, FieldSpec, check_field_table, make_fields

SPEC = Path(__file__).parents[2] / "formats" / "SPEC.md"


def spec_rows() -> dict[str, dict]:
    """The rows of SPEC's field table: name -> {per, dtypes, shape, required}."""
    text = SPEC.read_text(encoding="utf-8")
    table = text[text.index("| field | per | dtype | shape | required | meaning |"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0].strip("`")
        rows[name] = {"per": cells[1], "dtypes": re.findall(r"`([A-Z0-9]+)`", cells[2]),
                      "shape": cells[3].strip("`[]"), "required": cells[4]}
    return rows


def a_table_with(name: str, spec: FieldSpec, k: int = 4) -> dict[str, FieldSpec]:
    """The smallest valid field table with k top-k entries and RS-KD samples, `name` set to `spec`."""
    fields = make_fields(k, sample_slots=4, loss_mask=True, position_ids=True, byte_offsets=True,
                         hidden={1: (8, "F16")})
    fields[name] = spec
    if name == "sample_counts":
        fields["sample_ids"] = dataclasses.replace(fields["sample_ids"], shape=spec.shape)
    if name == "topk_logprobs":
        fields["topk_ids"] = dataclasses.replace(fields["topk_ids"], shape=spec.shape)
    return fields


def shape_for(symbol: str) -> tuple[int, ...]:
    return () if symbol == "" else (2,) if symbol == "2" else (4,) if symbol in ("k", "S") else (8,)


def test_every_field_the_code_knows_is_in_the_spec_and_no_other():
    code = set(REQUIRED_FIELDS) | set(TOPK_FIELDS) | set(OPTIONAL_FIELDS) | {"hidden/<L>"}
    assert set(spec_rows()) == code


@pytest.mark.parametrize("name", sorted(spec_rows()))
def test_each_field_is_accepted_with_exactly_the_dtypes_the_spec_lists(name):
    row = spec_rows()[name]
    field_name = "hidden/1" if name == "hidden/<L>" else name
    assert row["dtypes"], f"SPEC lists no dtype for {name}"
    for dtype in DTYPES:
        spec = FieldSpec(row["per"], dtype, shape_for(row["shape"]))
        fields = a_table_with(field_name, spec)
        if dtype in row["dtypes"]:
            check_field_table(fields)
        else:
            with pytest.raises(CacheError):
                check_field_table(fields)
    other = "sequence" if row["per"] == "token" else "token"
    with pytest.raises(CacheError):
        check_field_table(a_table_with(field_name, FieldSpec(other, row["dtypes"][0], shape_for(row["shape"]))))


def test_required_in_the_spec_means_required_in_the_code():
    rows = spec_rows()
    assert {n for n, r in rows.items() if r["required"] == "yes"} == set(REQUIRED_FIELDS)
    assert {n for n, r in rows.items() if r["required"].startswith("yes, unless k = 0")} == set(TOPK_FIELDS)
    for name in REQUIRED_FIELDS + TOPK_FIELDS:
        fields = make_fields(4)
        del fields[name]
        with pytest.raises(CacheError, match="required field"):
            check_field_table(fields)

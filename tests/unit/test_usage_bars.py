"""The percentages and bar cells of ``dsipam pool usage`` (clients/python/dsipam/client/_output.py),
from exact integers: the ends are never rounded onto 0% or 100%, tiny IPv6 shares stay visible."""

from __future__ import annotations

import pytest

from dsipam.client._output import usage_cells, usage_report_doc, used_percent

CAP = 2**64 - 1  # the API's largest count


@pytest.mark.parametrize(("used", "size", "shown"), [
    (0, 254, "0%"), (254, 254, "100%"), (1, 3, "33.3%"), (2, 3, "66.7%"), (23, 62, "37.1%"),
    (9999, 10000, "99.99%"), (999_999, 1_000_000, "99.9999%"), (1, 2000, "0.05%"), (1, 10_000, "0.01%"),
    (1, 100_000, "1.0e-3%"), (20, CAP, "1.1e-16%"), (CAP - 1, CAP, "99.999999%"), (199, 200, "99.5%"), (1999, 2000, "99.95%"), (5, 0, "-"),
])
def test_used_percent(used: int, size: int, shown: str) -> None:
    assert used_percent(used, size) == shown


@pytest.mark.parametrize("counts", [
    [0, 0, 0, 254], [254, 0, 0, 0], [15, 5, 3, 39], [1, 0, 0, CAP - 1], [1, 1, 1, CAP - 3], [10, 10, 10, 10],
    [3, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4],
])
def test_usage_cells_fill_the_width_and_show_every_state(counts: list[int]) -> None:
    cells = usage_cells(counts, 40)
    assert sum(cells) == 40 and all(c >= 0 for c in cells)
    total = sum(counts)
    for count, n in zip(counts, cells, strict=True):
        assert (n > 0) == (count > 0) or total == 0
        if total:
            assert abs(n - count * 40 / total) <= 1 + sum(1 for c in counts if 0 < c * 40 / total < 0.5)


@pytest.mark.parametrize(("used", "size"), [(2**20 - 1, 2**20), (CAP - 1, CAP), (99_999, 100_000), (1, 2**20)])
def test_json_used_percent_is_never_100_or_0_unless_exactly_so(used: int, size: int) -> None:
    # -o json: 4 significant digits, but as the text does, a family with one free address is not
    # reported full (a script's `used_percent >= 100` would call it exhausted).
    from dsipam.client._types import Family, FamilyUsage, Pool

    u = FamilyUsage(Family("ipv4"), size=size, allocated=used, free=size - used)
    (fam,) = usage_report_doc([Pool("p", [], usage=[u])])["pools"][0]["families"]
    assert 0 < fam["used_percent"] < 100, fam
    assert (fam["size"], fam["used"], fam["free"]) == (size, used, size - used)


def test_saturated_counts_are_not_shown_as_a_full_family() -> None:
    # A /48 with a /64 reserved: the server's counters saturate at 2^64-1, so size, reserved and
    # free all read 2^64-1. The family is nearly empty; "100% used" (and used_percent 100.0 in
    # JSON) would send an operator to add ranges. The share is unknown: say so.
    from dsipam.client._output import usage_text
    from dsipam.client._types import Family, FamilyUsage, Pool

    u = FamilyUsage(Family("ipv6"), size=CAP, allocated=3, free=CAP, reserved=CAP)
    pool = Pool("big", [], usage=[u])
    (fam,) = usage_report_doc([pool])["pools"][0]["families"]
    assert fam["used_percent"] is None and fam["saturated"] is True, fam
    line = next(line for line in usage_text([pool], unicode=False).splitlines() if "IPv6" in line)
    assert "100%" not in line and "saturated" in line, line
    # Only the size at the cap: what is used is known, the share is at most what is shown.
    small = FamilyUsage(Family("ipv6"), size=CAP, allocated=20, free=CAP - 20)
    (fam,) = usage_report_doc([Pool("web", [], usage=[small])])["pools"][0]["families"]
    assert fam["used_percent"] == 1.084e-16 and fam["saturated"] is True, fam
    (fam,) = usage_report_doc([Pool("web", [], usage=[FamilyUsage(Family("ipv4"), 254, 1, 253)])])["pools"][0][
        "families"]
    assert fam["saturated"] is False

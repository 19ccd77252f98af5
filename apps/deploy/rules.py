"""Series selection rules of the deploy app, and the same test in plain pydicom for checking inputs up front.

Kept apart from ``app.py`` so that ``__main__`` can reject a folder without a matching series before the SDK
(holoscan, MONAI, torch) is imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["SERIES_RULES", "exact_series_rules", "matching_series", "series_for_first_rule"]

# Rules of DICOMSeriesSelectorOperator, tried in order; the first matching series is segmented.
# CHAOS MR series carry SeriesDescription "T2SPIR" (the shipped weights are trained on it); CHAOS CT series have an
# empty SeriesDescription, so the CT rule must not require one. No ImageOrientationPatient rule: the SDK needs
# PatientPosition for that, and CHAOS headers lack it.
SERIES_RULES: dict = {
    "selections": [
        {"name": "CHAOS MR T2-SPIR", "conditions": {"Modality": "(?i)^MR$", "SeriesDescription": "(?i)t2[ _-]?spir"}},
        {"name": "CHAOS CT", "conditions": {"Modality": "(?i)^CT$"}},
    ]
}


def _matches(value: str, pattern: str) -> bool:
    # DICOMSeriesSelectorOperator's test for string attributes: case-insensitive equality, else a regex search;
    # a missing or empty attribute never matches.
    return bool(value) and (value.casefold() == pattern.casefold() or re.search(pattern, value, re.IGNORECASE))


def matching_series(files: Iterable[str | Path], rules: Mapping = SERIES_RULES) -> list[tuple[str, str]]:
    """(selection name, SeriesInstanceUID) of every series in ``files`` that a rule selects, rules in order.

    Args:
        files: DICOM files (headers are read, pixels are not).
        rules: selection rules in the SDK's JSON structure.

    Example:
        >>> matching_series([])
        []
    """
    import pydicom

    headers: dict[str, pydicom.Dataset] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers.setdefault(str(ds.get("SeriesInstanceUID", "")), ds)
    found = []
    for selection in rules["selections"]:
        for uid, ds in headers.items():
            if all(_matches(str(ds.get(k, "") or ""), v) for k, v in selection["conditions"].items()):
                found.append((selection["name"], uid))
    return found


def series_for_first_rule(files: Iterable[str | Path], rules: Mapping = SERIES_RULES) -> tuple[str, dict]:
    """The first rule, in priority order, that selects any series of the whole input, and the series it selects.

    Args:
        files: DICOM files (headers are read, pixels are not).
        rules: selection rules in the SDK's JSON structure.

    Returns:
        the rule's name and ``{SeriesInstanceUID: (header of one file, [files of the series])}``; ``("", {})`` if
        no rule selects anything.
    """
    import pydicom

    series: dict[str, tuple[pydicom.Dataset, list[Path]]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(ds.get("SeriesInstanceUID", ""))
        series.setdefault(uid, (ds, []))[1].append(Path(path))
    for selection in rules["selections"]:
        chosen = {
            uid: entry
            for uid, entry in series.items()
            if all(_matches(str(entry[0].get(k, "") or ""), v) for k, v in selection["conditions"].items())
        }
        if chosen:
            return selection["name"], chosen
    return "", {}


def exact_series_rules(name: str, series_uid: str) -> dict:
    """Selection rules that select exactly one series (by its SeriesInstanceUID) for the SDK's selector."""
    return {"selections": [{"name": name, "conditions": {"SeriesInstanceUID": f"^{re.escape(series_uid)}$"}}]}

"""Organ names of the bundle's ``channel_def`` and their coded concepts for DICOM SEG.

pydicom's ``pydicom.sr.codedict`` has ``codes.SCT.Liver`` and ``codes.SCT.Spleen`` but no laterality-specific
kidney concepts, so the four organs are spelled out here once (SNOMED CT identifiers as used in DICOM PS3.16
CID 7166 / TotalSegmentator's DICOM mapping: right kidney 9846003, left kidney 18639004). Importing this module
needs neither pydicom nor highdicom; both apps turn the tuples into their frameworks' code objects.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["ORGAN_CODES", "SNOMED_ANATOMICAL_STRUCTURE", "organ_labels", "read_torchscript_metadata"]

# (code value, coding scheme designator, code meaning), keyed by the lower-case channel_def name.
ORGAN_CODES: dict[str, tuple[str, str, str]] = {
    "liver": ("10200004", "SCT", "Liver"),
    "right kidney": ("9846003", "SCT", "Right kidney"),
    "left kidney": ("18639004", "SCT", "Left kidney"),
    "spleen": ("78961009", "SCT", "Spleen"),
}

# DICOM CID 7150 "Segmentation Property Categories": Anatomical Structure.
SNOMED_ANATOMICAL_STRUCTURE: tuple[str, str, str] = ("91723000", "SCT", "Anatomical Structure")


def organ_labels(metadata: Mapping, output_key: str | None = None) -> dict[int, str]:
    """Label value -> organ name from a bundle's ``metadata.json`` (``network_data_format.outputs.*.channel_def``).

    Args:
        metadata: the parsed ``metadata.json``.
        output_key: which output to read; default the first one (MONAI Label and Deploy both use the first).

    Returns:
        ``{1: "liver", 2: "right kidney", ...}`` without the background channel, in label order.

    Raises:
        ValueError: the metadata has no ``channel_def`` for that output, or names an organ without a code here.

    Example:
        >>> meta = {"network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "liver"}}}}}
        >>> organ_labels(meta)
        {1: 'liver'}
    """
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    if not outputs:
        raise ValueError("bundle metadata has no network_data_format.outputs")
    key = output_key or next(iter(outputs))
    channel_def = outputs.get(key, {}).get("channel_def")
    if not channel_def:
        raise ValueError(f"bundle metadata: network_data_format.outputs.{key} has no channel_def")
    labels = {int(k): str(v).lower() for k, v in channel_def.items() if str(v).lower() != "background"}
    unknown = sorted(set(labels.values()) - set(ORGAN_CODES))
    if unknown:
        raise ValueError(f"bundle metadata names organs without a SNOMED code in scse_monai.apps.organs: {unknown}")
    return dict(sorted(labels.items()))


def read_torchscript_metadata(model_ts: str | Path) -> dict:
    """The ``metadata.json`` that ``monai.bundle ckpt_export`` embedded in a TorchScript file.

    Read with ``zipfile`` rather than ``torch.jit.load`` so no model is loaded just to name its outputs. The configs
    must sit where MONAI Deploy reads them, ``<file stem>/extra/`` (the folder ``torch.jit.save`` names after the file
    it writes): for a renamed file the SDK finds ``metadata.json`` elsewhere but runs without ``inference.json``,
    feeding the network the raw image.

    Args:
        model_ts: path of the exported ``model.ts``.

    Raises:
        ValueError: the file is not a TorchScript zip, carries no ``extra/metadata.json``, or carries its configs
            under another folder than its name.

    Example:
        >>> read_torchscript_metadata("bundle/models/model.ts")["version"]  # doctest: +SKIP
        '0.2.0'
    """
    path = Path(model_ts)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            found = [n for n in names if n.endswith("extra/metadata.json")]
            if not found:
                raise ValueError(
                    f"{path}: no extra/metadata.json inside; export it with `python -m monai.bundle ckpt_export "
                    "network_def --filepath model.ts --ckpt_file models/model.pt --meta_file configs/metadata.json "
                    "--config_file configs/inference.json --bundle_root BUNDLE`"
                )
            expected = [f"{path.stem}/extra/{name}" for name in ("metadata.json", "inference.json")]
            if not set(expected) <= set(names):
                held = ", ".join(n for n in names if "/extra/" in n)
                raise ValueError(
                    f"{path}: MONAI Deploy reads {' and '.join(expected)}, it holds {held}; give the file the name it "
                    "was exported under, or export it again with both configs"
                )
            return json.loads(archive.read(expected[0]))
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a TorchScript file (not a zip archive)") from e

"""The writable copy of the bundle that the MONAI Label app serves and fine-tunes.

Training writes checkpoints next to the weights it starts from; the app therefore never serves the source bundle
(for example the repository's ``bundle/``) directly but a copy of its ``configs/`` and ``models/``, made once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

__all__ = ["default_bundle", "prepare_workspace", "read_metadata"]


def default_bundle() -> Path:
    """The repository's ``bundle/`` (this file is ``apps/monailabel/lib/workspace.py`` in the repository)."""
    return Path(__file__).resolve().parents[3] / "bundle"


def read_metadata(bundle_dir: str | Path) -> dict:
    """``configs/metadata.json`` of a bundle."""
    return json.loads((Path(bundle_dir) / "configs" / "metadata.json").read_text())


def prepare_workspace(source: str | Path, workspace: str | Path) -> Path:
    """Copy ``source/configs`` and ``source/models`` to ``workspace`` unless it already holds a copy.

    Args:
        source: a bundle folder with ``configs/inference.json``, ``configs/train.json``, ``configs/metadata.json``
            and ``models/model.pt``.
        workspace: where the served copy lives (created; an existing copy is kept, with its fine-tuned weights).

    Returns:
        the workspace path.

    Raises:
        FileNotFoundError: naming the first required bundle file that is missing.

    Example:
        >>> prepare_workspace("bundle", "studies/.scse_monai/bundle")  # doctest: +SKIP
    """
    source, workspace = Path(source), Path(workspace)
    if (workspace / "configs" / "inference.json").is_file() and (workspace / "models" / "model.pt").is_file():
        return workspace
    for rel in ("configs/inference.json", "configs/train.json", "configs/metadata.json", "models/model.pt"):
        if not (source / rel).is_file():
            raise FileNotFoundError(f"bundle {source}: missing {rel} (pass --conf bundle DIR with a complete bundle)")
    staging = workspace.with_name(workspace.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source / "configs", staging / "configs")
    (staging / "models").mkdir()
    shutil.copy2(source / "models" / "model.pt", staging / "models" / "model.pt")
    workspace.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, workspace)
    return workspace

"""Small functions the bundle configs call: find the dataset, split it by patient-level fold, list inputs.

The bundle's JSON configs stay declarative; what a JSON expression cannot say clearly (error messages that
name the missing file, the synthetic fallback, fold selection) lives here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["class_names", "inference_data", "partition", "resolve_datalist"]


def resolve_datalist(dataset_dir: str, synthetic_if_missing: bool = True) -> str:
    """Returns ``dataset_dir/datalist.json``, generating the synthetic CHAOS-MR set there on first use.

    Args:
        dataset_dir: a folder prepared by ``python -m scse_monai.data prepare ...``.
        synthetic_if_missing: when ``dataset_dir`` is empty or absent, synthesize and prepare a small CHAOS-MR
            phantom set into it (offline). A non-empty folder without ``datalist.json`` is never written to.

    Raises:
        FileNotFoundError: no datalist, and synthesis is off or the folder already holds other files.

    Example::

        >>> resolve_datalist("bundle/data/synthetic_chaos_mr")
        'bundle/data/synthetic_chaos_mr/datalist.json'
    """
    root = Path(dataset_dir)
    datalist = root / "datalist.json"
    if datalist.is_file():
        return str(datalist)
    if not synthetic_if_missing:
        raise FileNotFoundError(
            f"dataset_dir {root}: no datalist.json. Prepare the data first, e.g. "
            f"`python -m scse_monai.data prepare chaos --root Train_Sets --task mr-t2spir --out {root}`."
        )
    if root.is_dir() and any(p.name != ".lock" and not p.name.startswith(".") for p in root.iterdir()):
        raise FileNotFoundError(
            f"dataset_dir {root} holds files but no datalist.json; refusing to write synthetic data into it. "
            "Give an empty folder, or a folder prepared by `python -m scse_monai.data prepare`."
        )
    from scse_monai.data import ensure_synthetic_dataset

    return str(ensure_synthetic_dataset(root))


def _load(datalist_file: str) -> dict:
    path = Path(datalist_file)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"datalist {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from None


def partition(datalist_file: str, part: str = "train", val_folds: Sequence[int] = (0,)) -> list[dict]:
    """Items of a prepared datalist with absolute paths, split by patient-level fold.

    Args:
        datalist_file: ``datalist.json`` written by ``scse_monai.data prepare``.
        part: ``"train"`` (folds not in ``val_folds``), ``"val"`` (folds in ``val_folds``) or ``"all"``.
        val_folds: folds held out for validation.

    Returns:
        ``[{"image": ..., "label": ..., "patient": ..., "fold": ...}, ...]``.

    Raises:
        ValueError: unknown ``part``, or the requested part is empty (e.g. only one fold).

    Example::

        >>> val = partition("prepared/datalist.json", "val", val_folds=[0])
    """
    if part not in ("train", "val", "all"):
        raise ValueError(f"part must be 'train', 'val' or 'all', got {part!r}")
    meta = _load(datalist_file)
    base = Path(datalist_file).resolve().parent
    held_out = {int(f) for f in val_folds}
    entries = meta.get("training", [])
    # a patient split across folds would leak slices of one patient into both sides
    folds_of: dict[str, set[int]] = {}
    for entry in entries:
        folds_of.setdefault(str(entry.get("patient")), set()).add(int(entry.get("fold", 0)))
    leaked = sorted(p for p, f in folds_of.items() if len(f) > 1)
    if leaked:
        raise ValueError(f"datalist {datalist_file}: patients {leaked} appear in several folds")
    items = []
    for entry in entries:
        is_val = int(entry.get("fold", 0)) in held_out
        if part == "all" or (part == "val") == is_val:
            item = dict(entry)
            for key in ("image", "label"):
                if key in item:
                    item[key] = str(base / item[key])
            items.append(item)
    if not items:
        raise ValueError(
            f"datalist {datalist_file}: no cases for part={part!r} with val_folds={sorted(held_out)} "
            f"(folds present: {sorted({int(e.get('fold', 0)) for e in entries})})"
        )
    return items


def class_names(datalist_file: str, include_background: bool = False) -> list[str]:
    """Class names in index order from the datalist's ``labels`` map.

    Example::

        >>> class_names("prepared/datalist.json")
        ['liver', 'right kidney', 'left kidney', 'spleen']
    """
    labels = _load(datalist_file).get("labels", {})
    names = [labels[k] for k in sorted(labels, key=int)]
    return names if include_background else names[1:]


def inference_data(dataset_dir: str) -> list[dict]:
    """``[{"image": path}]`` for every ``imagesTs/*.nii.gz`` in ``dataset_dir``, else every ``imagesTr/*.nii.gz``.

    A single NIfTI file may also be given instead of a folder.

    Raises:
        FileNotFoundError: nothing to segment.

    Example::

        >>> inference_data("prepared")[:1]
        [{'image': 'prepared/imagesTs/case_01.nii.gz'}]
    """
    root = Path(dataset_dir)
    if root.is_file() and root.name.endswith((".nii", ".nii.gz")):
        return [{"image": str(root)}]
    for sub in ("imagesTs", "imagesTr"):
        files = sorted((root / sub).glob("*.nii*"))
        if files:
            return [{"image": str(f)} for f in files]
    raise FileNotFoundError(f"dataset_dir {root}: no imagesTs/*.nii.gz or imagesTr/*.nii.gz to segment")

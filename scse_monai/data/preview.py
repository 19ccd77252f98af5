"""Montage of slices with the label map overlaid in organ colours, to check alignment at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..atomic import write_atomically  # noqa: E402
from .datalist import case_name, read_datalist  # noqa: E402
from .errors import DataPreparationError  # noqa: E402
from .nifti import load_nifti, nifti_voxels  # noqa: E402

__all__ = ["preview_case", "CT_ABDOMEN_WINDOW"]

#: Abdominal soft-tissue window in HU (level 40, width 400): how CT previews are displayed.
CT_ABDOMEN_WINDOW = (-160.0, 240.0)

_COLOURS = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors


def _find_case(doc: dict, case: str, datalist: str | Path) -> dict:
    """The ``training`` item of ``doc`` whose case name (``chaos_mr_t2_01``) or ``patient`` equals ``case``.

    Raises:
        DataPreparationError: no such case (names the datalist and lists its cases).
    """
    for it in doc.get("training", []):
        if case in (case_name(it["image"]), str(it.get("patient"))):
            return it
    names = [case_name(it["image"]) for it in doc.get("training", [])]
    raise DataPreparationError(f"case {case!r} not in datalist (cases: {', '.join(names)})", file=datalist)


def preview_case(datalist: str | Path, case: str, out: str | Path, slices: int = 12, columns: int = 4) -> Path:
    """Write a PNG montage of ``slices`` axial slices of one case with its labels overlaid.

    Slices are spread evenly over the slices that contain labels (all slices if none). Display is radiological:
    patient's right on the image left, anterior at the top (the volume is reoriented to RAS first). The PNG is
    written to a temporary file and renamed, so ``out`` is either complete or absent; an existing ``out`` is replaced
    only if a preview wrote it.

    Args:
        datalist: ``datalist.json`` written by ``prepare``.
        case: case name (``chaos_mr_t2_01``) or patient id.
        out: output PNG path.
        slices: number of slices in the montage (>= 1).
        columns: montage columns (>= 1).

    Returns:
        the PNG path.

    Raises:
        ValueError: ``slices`` or ``columns`` below 1 (checked before anything is read or written).
        DataPreparationError: the datalist, the case or one of its files is missing or unreadable, or ``out`` is a
            folder or a file that an earlier preview did not write (names the file).

    Example:
        >>> preview_case("prepared/datalist.json", "chaos_mr_t2_01", "overlay.png")  # doctest: +SKIP
    """
    if slices < 1:
        raise ValueError(f"--slices must be >= 1, got {slices}")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if not Path(datalist).is_file():
        raise DataPreparationError("datalist does not exist or is not a file", file=datalist)
    if Path(out).is_dir():
        raise DataPreparationError("is a folder; --out takes the PNG file to write", file=out)
    if Path(out).exists() and not _written_by_preview(out):
        raise DataPreparationError("exists and is not a preview PNG; choose another --out or remove it", file=out)
    doc = read_datalist(datalist, absolute=True)
    item = _find_case(doc, case, datalist)
    img, image = _load(item["image"])
    _, label = _load(item["label"])
    if image.ndim == 4:
        image = image[..., 0]  # first channel (T1-DUAL: in-phase)
    if image.shape != label.shape:
        raise DataPreparationError(f"image {image.shape} and label {label.shape} differ in shape", file=item["label"])
    fig = _montage(image, label.astype(np.int64), img.header.get_zooms()[:3], doc, slices, columns)
    try:
        fig.suptitle(f"{case_name(item['image'])}  (patient {item.get('patient')}, fold {item.get('fold')})")
        fig.tight_layout(rect=(0, 0.05, 1, 0.96))
        metadata = {"Software": _SOFTWARE}
        return write_atomically(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png", metadata=metadata))
    finally:
        plt.close(fig)


#: PNG text chunk that marks a montage as written here: only such a file is replaced by a later preview
_SOFTWARE = "scse_monai preview"


def _written_by_preview(path: str | Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)  # the text chunk comes before the image data
    return head.startswith(b"\x89PNG") and _SOFTWARE.encode() in head


def _load(path: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A datalist volume reoriented to RAS, and its voxels as float32 (read once).

    Raises:
        DataPreparationError: the file is missing or not a readable NIfTI volume (names the file).
    """
    img = load_nifti(path)
    img = nib.as_closest_canonical(nib.Nifti1Image(nifti_voxels(img, path).astype(np.float32), img.affine, img.header))
    return img, np.asanyarray(img.dataobj)


def _montage(
    image: np.ndarray, label: np.ndarray, zooms: tuple[float, ...], doc: dict, slices: int, columns: int
) -> plt.Figure:
    """The figure of :func:`preview_case`, without its title: ``slices`` slices through the labelled range."""
    fg = np.flatnonzero(label.reshape(-1, label.shape[2]).any(axis=0))
    lo, hi = (fg[0], fg[-1]) if fg.size else (0, label.shape[2] - 1)
    ks = np.unique(np.linspace(lo, hi, min(slices, hi - lo + 1)).round().astype(int))
    if doc.get("modality", {}).get("0") == "CT":
        vmin, vmax = CT_ABDOMEN_WINDOW
    else:
        vmin, vmax = np.percentile(image, [1, 99.5])
    names = doc.get("labels", {})
    ncls = max(int(k) for k in names) + 1 if names else int(label.max()) + 1
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*_COLOURS[(c - 1) % len(_COLOURS)], 1.0) for c in range(1, ncls)])
    rows = int(np.ceil(len(ks) / columns))
    aspect = zooms[1] / zooms[0]
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows * aspect + 0.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), ks, strict=False):
        sl = image[::-1, ::-1, k].T  # rows: anterior -> posterior, columns: patient right -> left
        lb = label[::-1, ::-1, k].T
        ax.imshow(sl, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        ax.imshow(np.ma.masked_equal(lb, 0), cmap=cmap, vmin=0, vmax=ncls - 1, alpha=0.45, aspect=aspect,
                  interpolation="nearest")  # fmt: skip
        ax.set_title(f"slice {k}", fontsize=8)
        ax.text(2, sl.shape[0] / 2, "R", color="yellow", fontsize=8, va="center")
    present = sorted(int(c) for c in np.unique(label) if c > 0)
    handles = [Patch(color=cmap(c), label=names.get(str(c), str(c))) for c in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, max(1, len(handles))), fontsize=8)
    return fig

"""Figures of a comparison: per-organ Dice box plots (paper Fig. 2/3), training curves, label overlays (Fig. 4)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scse_monai.atomic import write_bytes_atomic

__all__ = ["dice_boxplot", "label_overlay", "load_ras", "training_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    write_bytes_atomic(path, buf.getvalue())


def dice_boxplot(
    per_case: Mapping[str, Mapping[str, Mapping[str, float]]], organs: Sequence[str], title: str, path: Path
) -> Path:
    """Per-organ Dice over cases, one box per variant in each organ's group (as the paper's Fig. 2/3).

    Args:
        per_case: ``{variant: {case: {organ: dice}}}`` of one network.
        organs: organs in display order.
        title: figure title (the network).
        path: PNG to write.

    Example::

        >>> dice_boxplot({"none": {"c1": {"liver": 0.8}}}, ["liver"], "unet", Path("box.png"))  # doctest: +SKIP
    """
    plt = _pyplot()
    variants = list(per_case)
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(organs) * max(1, len(variants) / 3), 3.8))
    colors = plt.get_cmap("tab10").colors
    for j, variant in enumerate(variants):
        data, pos = [], []
        for i, organ in enumerate(organs):
            v = [per_case[variant][c].get(organ, math.nan) for c in per_case[variant]]
            v = [x for x in v if not math.isnan(x)]
            data.append(v if v else [math.nan])
            pos.append(i + (j - (len(variants) - 1) / 2) * width)
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=True)
        for box in bp["boxes"]:
            box.set_facecolor(colors[j % len(colors)])
            box.set_alpha(0.75)
        ax.plot([], [], color=colors[j % len(colors)], linewidth=8, alpha=0.75, label=variant)
    ax.set_xticks(range(len(organs)), [o.replace("_", " ") for o in organs])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize="small", ncol=len(variants), frameon=False)
    _save(fig, path)
    return path


def _read_curves(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            cols.setdefault(k, []).append(float(v) if v not in ("", None) else math.nan)
    return cols


def training_curves(curves: Mapping[str, Mapping[int, Path]], title: str, path: Path, metric: str = "val_mean_dice"):
    """Training loss and validation Dice per epoch of every variant and fold of one network, in one PNG.

    Args:
        curves: ``{variant: {fold: training_curves.csv}}`` (written by the bundle's ``TrainingCurvePlotter``).
        title: figure title (the network).
        path: PNG to write.
        metric: validation column to plot on the right.

    Example::

        >>> training_curves({"none": {0: Path("runs/unet_none/fold0/eval/training_curves.csv")}}, "unet",
        ...                 Path("curves.png"))  # doctest: +SKIP
    """
    plt = _pyplot()
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = plt.get_cmap("tab10").colors
    styles = ["-", "--", ":", "-."]
    for j, (variant, folds) in enumerate(curves.items()):
        for k, (fold, csv_path) in enumerate(sorted(folds.items())):
            cols = _read_curves(csv_path)
            epochs = cols.get("epoch", [])
            kw = {"color": colors[j % len(colors)], "linestyle": styles[k % len(styles)], "marker": "o", "ms": 3}
            label = f"{variant} fold {fold}"
            for ax, key in ((ax_loss, "loss"), (ax_val, metric)):
                # validation runs every val_interval epochs: skip the empty epochs so the points join up
                pts = [(e, v) for e, v in zip(epochs, cols.get(key, []), strict=False) if not math.isnan(v)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=label, **kw)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{title}: training loss")
    ax_val.set(xlabel="epoch", ylabel=metric, title=f"{title}: validation Dice (held-out fold)", ylim=(0, 1))
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize="x-small", ncol=2)
    _save(fig, path)
    return path


def load_ras(path: str | Path) -> np.ndarray:
    """A volume (image or label map) as a numpy array in RAS axes, whatever the file's own orientation.

    Example::

        >>> load_ras("labelsTr/case_01.nii.gz").shape  # doctest: +SKIP
        (256, 256, 36)
    """
    from monai.transforms import LoadImage, Orientation

    return np.asarray(Orientation(axcodes="RAS")(LoadImage(image_only=True, ensure_channel_first=True)(str(path)))[0])


def _radiological(a: np.ndarray) -> np.ndarray:
    # RAS axes (load_ras): axis 0 runs towards the patient's right, axis 1 towards anterior. Radiological
    # display: anterior up, the patient's right on the viewer's left.
    return a.T[::-1, ::-1]


def label_overlay(
    image: np.ndarray,
    label: np.ndarray,
    predictions: Mapping[str, Mapping[str, np.ndarray]],
    organs: Sequence[str],
    case: str,
    path: Path,
) -> Path:
    """Image, ground truth and each variant's prediction on one axial slice (as the paper's Fig. 4).

    Args:
        image: 2D axial slice in RAS array axes (:func:`load_ras`).
        label: 2D ground-truth label slice.
        predictions: ``{network: {variant: 2D label slice}}``; one figure row per network.
        organs: names of labels 1..N (for the legend).
        case: case name (title).
        path: PNG to write.

    Example::

        >>> label_overlay(img, gt, {"unet": {"none": p0, "scse": p1}}, ["liver"], "case_01", Path("o.png"))
        ... # doctest: +SKIP
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = plt.get_cmap("tab10").colors
    cmap = ListedColormap([(0, 0, 0, 0), *[(*colors[i % 10], 0.55) for i in range(len(organs))]])
    variants = list(next(iter(predictions.values())))
    ncols = 2 + len(variants)
    fig, axes = plt.subplots(len(predictions), ncols, figsize=(2.6 * ncols, 2.8 * len(predictions)), squeeze=False)
    img = _radiological(image)
    for r, (network, preds) in enumerate(predictions.items()):
        panels = [("image", None), ("ground truth", label)] + [(v, preds[v]) for v in variants]
        for c, (name, lab) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray")
            if lab is not None:
                ax.imshow(_radiological(lab), cmap=cmap, vmin=0, vmax=len(organs), interpolation="nearest")
            ax.set_title(name if c < 2 else f"{network} {name}", fontsize="small")
            ax.axis("off")
    handles = [Patch(color=colors[i % 10], label=o.replace("_", " ")) for i, o in enumerate(organs)]
    fig.legend(handles=handles, loc="lower center", ncol=len(organs), fontsize="small")
    fig.suptitle(f"{case} (held-out fold)", fontsize="medium")
    _save(fig, path)
    return path

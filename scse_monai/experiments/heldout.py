"""Score a trained fold on its held-out patients, as a user of the bundle would get them.

The prediction is the bundle's own inference (``inference.json``: preprocessing, ``SliceInferer``, ``Invertd``
back to the input grid, largest component per organ), with the fold's **last-epoch** weights. It is scored on
the original grid against the original label file (not a resampled copy): Dice, HD95 in mm (MONAI's
``compute_hausdorff_distance``, percentile 95, the file's voxel spacing) and predicted / true organ volume.
Several runs of one fold (seeds) can be scored as their mean-softmax ensemble, as the shipped bundle predicts.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scse_monai.atomic import write_bytes_atomic, write_text_atomic
from scse_monai.checkpoints import latest_checkpoint
from scse_monai.data.datalist import case_name
from scse_monai.experiments.runs import BundleSettings, Run
from scse_monai.networks import MeanSoftmaxEnsemble

__all__ = ["case_name", "organ_keys", "read_heldout", "score_case", "score_heldout"]


def organ_keys(folded: dict) -> list[str]:
    """Foreground class names of a datalist as column keys (``right kidney`` -> ``right_kidney``)."""
    labels = folded["labels"]
    return [labels[k].replace(" ", "_") for k in sorted(labels, key=int) if int(k) > 0]


def score_case(pred: torch.Tensor, label: torch.Tensor, spacing, organs: list[str]) -> dict[str, float]:
    """Dice, HD95 (mm) and predicted / true volume per organ of one label map pair on the same grid.

    Args:
        pred: predicted label map, shape ``(1, *spatial)``.
        label: true label map, same shape.
        spacing: voxel size in mm per spatial axis.
        organs: names of classes ``1..N``.

    Returns:
        ``{"dice_<organ>", "hd95_<organ>", "volume_ratio_<organ>"}``; NaN where the organ is absent from the
        label (Dice NaN also when absent from both; HD95 NaN when either is empty).

    Example::

        >>> score_case(torch.ones(1, 4, 4, 2), torch.ones(1, 4, 4, 2), (1.0, 1.0, 1.0), ["liver"])["dice_liver"]
        1.0
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    n = len(organs) + 1
    p = one_hot(torch.as_tensor(pred)[None].long(), n)
    y = one_hot(torch.as_tensor(label)[None].long(), n)
    dice = compute_dice(p, y, include_background=False, ignore_empty=True)[0]
    present = (p.sum(dim=tuple(range(2, p.ndim))) > 0)[0, 1:] & (y.sum(dim=tuple(range(2, y.ndim))) > 0)[0, 1:]
    hd = torch.full((n - 1,), math.nan)
    if present.any():
        hd = compute_hausdorff_distance(
            p, y, include_background=False, percentile=95, spacing=[float(s) for s in spacing]
        )[0].float()
        hd[~present] = math.nan
    out = {}
    for i, organ in enumerate(organs):
        true_n, pred_n = float(y[0, i + 1].sum()), float(p[0, i + 1].sum())
        out[f"dice_{organ}"] = float(dice[i]) if true_n else math.nan
        out[f"hd95_{organ}"] = float(hd[i])
        out[f"volume_ratio_{organ}"] = pred_n / true_n if true_n else math.nan
    return out


def _inference(runs: Sequence[Run], settings: BundleSettings):
    """The bundle's inference preprocessing, inferer and postprocessing (without saving), and the runs' networks
    as ``train.json`` built them, with their last-epoch weights (a mean-softmax ensemble of several), on the
    bundle's ``device`` (a GPU when there is one)."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, SaveImaged

    parser = ConfigParser()
    cfg = Path(settings.bundle_root) / "configs"
    parser.read_config([str(cfg / "inference.json"), *(str(cfg / e) for e in settings.extra_configs)])
    overrides = runs[0].overrides(settings)
    overrides.pop("network_def#_target_")  # the networks come from train.json (Run.build_network), not from here
    parser.update(overrides)
    nets = []
    for run in runs:
        ckpt = latest_checkpoint(run.folder / "models")
        if ckpt is None:
            raise FileNotFoundError(f"{run.folder / 'models'}: no checkpoint to evaluate")
        nets.append(run.build_network(settings))
        nets[-1].load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
    net = nets[0] if len(nets) == 1 else MeanSoftmaxEnsemble(nets)
    device = torch.device(parser.get_parsed_content("device"))
    post = parser.get_parsed_content("postprocessing")
    post = Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])
    inferer = parser.get_parsed_content("inferer")
    inferer.sw_device, inferer.device = device, torch.device("cpu")  # windows on the bundle's device, volume on CPU
    return parser.get_parsed_content("preprocessing"), inferer, post, net.to(device).eval()


def _save_label(path: Path, seg: np.ndarray, affine: np.ndarray) -> None:
    import gzip

    import nibabel as nib

    write_bytes_atomic(path, gzip.compress(nib.Nifti1Image(seg.astype(np.uint8), affine).to_bytes(), 6))


def score_heldout(
    run: Run, settings: BundleSettings, folded: dict, progress: bool = False, members: Sequence[Run] = ()
) -> Path:
    """Predicts and scores every held-out patient of ``run``'s fold; writes ``eval/heldout.csv`` last.

    The predictions are kept as ``eval/pred/<case>.nii.gz`` (uint8, the label file's grid) for figures.

    Args:
        run: the fold's run; its folder receives ``eval/``.
        settings: the experiment's bundle settings.
        folded: the experiment's datalist (patients and folds).
        progress: show a progress bar over patients.
        members: runs of the same fold whose mean-softmax ensemble predicts instead of ``run``'s own network.

    Returns:
        the CSV's path.
    """
    from monai.transforms import LoadImage

    organs = organ_keys(folded)
    pre, inferer, post, net = _inference(list(members) or [run], settings)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    items = sorted((i for i in folded["training"] if int(i["fold"]) == run.fold), key=lambda i: i["image"])
    rows = []
    for item in tqdm(items, desc=f"score fold {run.fold}", disable=not progress):
        data = pre({"image": item["image"]})
        with torch.no_grad():
            data["pred"] = inferer(data["image"][None], net)[0]
        pred = post(data)["pred"]
        label = load(item["label"])
        spacing = np.sqrt((np.asarray(label.affine)[:3, :3] ** 2).sum(0))
        case = case_name(item["image"])
        _save_label(run.folder / "eval" / "pred" / f"{case}.nii.gz", np.asarray(pred[0]), np.asarray(label.affine))
        scores = score_case(torch.as_tensor(pred), torch.as_tensor(label), spacing, organs)
        rows.append({"case": case, "patient": item.get("patient", case), "seed": run.seed, "fold": run.fold, **scores})
    header = [
        "case",
        "patient",
        "seed",
        "fold",
        *[f"{m}_{o}" for m in ("dice", "hd95", "volume_ratio") for o in organs],
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows)
    return write_text_atomic(run.heldout_csv, buf.getvalue())


def read_heldout(path: str | Path) -> list[dict]:
    """Rows of a ``heldout.csv`` with numbers as floats (NaN for empty cells)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def value(k: str, v: str):
        if k in ("case", "patient"):
            return v
        if k in ("seed", "fold"):
            return int(v)
        return float(v) if v != "" else math.nan

    return [{k: value(k, v) for k, v in r.items()} for r in rows]

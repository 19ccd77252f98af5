"""Synthetic abdominal phantoms written in the native CHAOS (DICOM + PNG) and VISCERAL (NIfTI) layouts.

Each case is a smooth, randomly deformed anatomy: an elliptical body with subcutaneous fat and a muscle wall,
liver on the patient's right (with a left lobe), spleen on the left, both kidneys posterior beside the spine,
aorta, vertebrae, psoas muscles, pancreas, gallbladder, stomach, lung bases and urinary bladder. Intensities are
plausible per modality (CT in HU; MR T2-SPIR with fat suppression; T1 in/opposed phase with chemical-shift dark
boundaries), partial-volume blurred, with a multiplicative bias field (MR) and Rician (MR) / Gaussian (CT) noise.
Sizes, pixel spacing and slice counts vary per case. Odd-numbered cases are written with the files running against
the slice normal (file 1 is the most superior slice), as some real series do.

Geometry: the phantom is generated on a grid whose index axes are (patient left, posterior, superior), i.e.
standard axial DICOM slices (ImageOrientationPatient 1\\0\\0\\0\\1\\0).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage
from tqdm.auto import tqdm

from ..atomic import work_folder
from .errors import DataPreparationError
from .radlex import RADLEX_IDS

__all__ = ["synthesize", "make_phantom", "write_dicom_series", "Phantom", "LAYOUTS"]

LAYOUTS = ("chaos-ct", "chaos-mr", "visceral")

# structure name -> RadLex id (VISCERAL Anatomy3), as prepare_visceral reads them; the phantoms have no trachea.
# "body", "fat", "muscle", "stomach", "bone" are unlabelled tissue.
RADLEX = {name: rid for name, rid in RADLEX_IDS.items() if name != "trachea"}

# Tissues painted in this order (later ones overwrite earlier). Ellipsoid centre (u, v, w): u, v in units of the
# body half-width / half-depth (+u = patient left, +v = posterior), w in units of the scanned z-extent (+ superior,
# 0 = centre); radii in mm. kind "cyl" = cylinder along z limited to [w0, w1].
_TISSUES: list[tuple[str, str, tuple[float, float, float], tuple[float, float, float]]] = [
    ("stomach", "ell", (0.30, -0.25, 0.20), (45, 38, 40)),
    ("right lung", "ell", (-0.42, 0.25, 0.62), (70, 85, 70)),
    ("left lung", "ell", (0.42, 0.25, 0.62), (65, 85, 62)),
    ("liver", "ell", (-0.42, -0.05, 0.20), (85, 78, 75)),
    ("liver", "ell", (-0.02, -0.40, 0.26), (55, 32, 35)),
    ("gallbladder", "ell", (-0.30, -0.45, 0.02), (15, 14, 28)),
    ("pancreas", "ell", (0.12, 0.18, 0.04), (62, 12, 16)),
    ("spleen", "ell", (0.62, 0.35, 0.20), (32, 48, 55)),
    ("right kidney", "ell", (-0.33, 0.52, -0.10), (31, 33, 55)),
    ("left kidney", "ell", (0.33, 0.52, -0.04), (30, 33, 55)),
    ("right adrenal gland", "ell", (-0.25, 0.45, 0.16), (8, 12, 15)),
    ("left adrenal gland", "ell", (0.25, 0.45, 0.18), (8, 12, 15)),
    ("aorta", "cyl", (0.07, 0.45, 0.0), (11, 11, 0)),
    ("paraspinal", "cyl", (-0.20, 0.92, 0.0), (28, 20, 0)),
    ("paraspinal", "cyl", (0.20, 0.92, 0.0), (28, 20, 0)),
    ("bone", "cyl", (0.0, 0.66, 0.0), (22, 19, 0)),
    ("canal", "cyl", (0.0, 0.86, 0.0), (8, 7, 0)),
    ("bone", "cyl", (0.0, 0.98, 0.0), (5, 13, 0)),
    ("right psoas major", "ell", (-0.20, 0.68, -0.40), (20, 22, 80)),
    ("left psoas major", "ell", (0.20, 0.68, -0.40), (20, 22, 80)),
    ("urinary bladder", "ell", (0.0, -0.30, -0.55), (40, 35, 32)),
]

# Intensity per tissue: CT in HU; MR as scanner units (0..~1500)
_INTENSITY = {
    #                    CT     T2SPIR  T1in  T1out
    "air": (-1000, 0, 0, 0),
    "gas": (-950, 10, 10, 10),
    "bowel": (25, 380, 330, 310),
    "canal": (10, 1000, 150, 150),
    "paraspinal": (50, 170, 340, 320),
    "body": (30, 260, 420, 400),
    "fat": (-100, 110, 900, 820),
    "muscle": (50, 170, 340, 320),
    "stomach": (15, 700, 240, 230),
    "right lung": (-850, 30, 40, 40),
    "left lung": (-850, 30, 40, 40),
    "liver": (95, 330, 600, 560),
    "gallbladder": (5, 1100, 150, 150),
    "pancreas": (85, 420, 560, 520),
    "spleen": (110, 560, 450, 430),
    "right kidney": (165, 620, 420, 400),
    "left kidney": (165, 620, 420, 400),
    "right adrenal gland": (60, 300, 420, 300),
    "left adrenal gland": (60, 300, 420, 300),
    "aorta": (175, 80, 200, 200),
    "bone": (450, 150, 520, 480),
    "first lumbar vertebra": (450, 150, 520, 480),
    "right psoas major": (50, 170, 340, 320),
    "left psoas major": (50, 170, 340, 320),
    "urinary bladder": (8, 1200, 120, 120),
}
_CONTRAST = {"ct": 0, "t2spir": 1, "t1in": 2, "t1out": 3}
# texture inside organs (labels unchanged): 1 liver vessels, 2 renal medulla; CT additive HU, MR multiplicative
_SUB = {1: (60.0, 1.35, 0.55, 0.55), 2: (-60.0, 1.2, 0.8, 0.8)}
# structures that lie outside the abdominal cavity (spine, back muscles)
_OUTSIDE_CAVITY = ("bone", "canal", "paraspinal")


@dataclass
class Phantom:
    """One synthetic case on an LPS-aligned grid ``[left, posterior, superior]``.

    Attributes:
        tissue: int16 tissue-index map (index into :attr:`names`, 0 = air).
        names: tissue names, ``names[0] == "air"``.
        spacing: voxel size in mm (x, y, z).
        origin: LPS position (mm) of voxel (0, 0, 0).
        rng: generator used for intensities (noise, bias field, texture).
        sub: uint8 texture map inside organs (1 liver vessels, 2 renal medulla), labels unaffected.
    """

    tissue: np.ndarray
    names: list[str]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    rng: np.random.Generator
    sub: np.ndarray | None = None

    def mask(self, name: str) -> np.ndarray:
        """Binary mask of one structure (all entries of that name)."""
        idx = [k for k, n in enumerate(self.names) if n == name]
        return np.isin(self.tissue, idx)

    def image(self, contrast: str) -> np.ndarray:
        """Render intensities: ``contrast`` in ``{"ct", "t2spir", "t1in", "t1out"}`` (float32)."""
        col = _CONTRAST[contrast]
        rng = np.random.default_rng(self.rng.integers(2**32))
        lut = np.array([_INTENSITY[n][col] for n in self.names], dtype=np.float32)
        img = lut[self.tissue]
        if self.sub is not None:
            for code, mods in _SUB.items():
                m = self.sub == code
                img[m] = img[m] + mods[0] if contrast == "ct" else img[m] * mods[col]
        # organ texture: smooth multiplicative (MR) / additive (CT) variation
        tex = _smooth_noise(rng, self.tissue.shape, 6.0)
        if contrast == "ct":
            img = img + 12.0 * tex * (self.tissue > 0)
        else:
            img = img * (1.0 + 0.06 * tex)
        if contrast == "t1out":  # opposed phase: dark line at fat-water interfaces ("India ink")
            fat = (self.tissue == self.names.index("fat")).astype(np.float32)
            soft = ndimage.gaussian_filter(fat, (0.8, 0.8, 0.0))
            img = img * (1.0 - 0.8 * ((soft > 0.15) & (soft < 0.85)))
        img = ndimage.gaussian_filter(img, (0.6, 0.6, 0.3))  # partial volume
        if contrast == "ct":
            img = img + rng.normal(0.0, 12.0, img.shape)
            return np.clip(img, -1024, 3071).astype(np.float32)
        ramp = np.linspace(-1, 1, img.shape[1])[None, :, None]  # coil sensitivity falls off posteriorly
        bias = np.exp(0.25 * _smooth_noise(rng, img.shape, 40.0) + 0.15 * ramp)
        img = img * bias
        sigma = 0.03 * float(_INTENSITY["liver"][col])
        img = np.hypot(img + rng.normal(0, sigma, img.shape), rng.normal(0, sigma, img.shape))  # Rician
        return np.clip(img, 0, 4095).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], scale: float) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field with correlation length ``scale`` voxels (in-plane)."""
    coarse = [max(3, int(np.ceil(s / scale)) + 2) for s in shape[:2]] + [max(3, int(np.ceil(shape[2] / 4)) + 2)]
    field = ndimage.zoom(rng.standard_normal(coarse), [s / c for s, c in zip(shape, coarse, strict=True)], order=3)
    field = field[: shape[0], : shape[1], : shape[2]]
    pad = [(0, s - f) for s, f in zip(shape, field.shape, strict=True)]
    field = np.pad(field, pad, mode="edge")
    return (field / (field.std() + 1e-6)).astype(np.float32)


def make_phantom(rng: np.random.Generator, size: int = 128, slices: int = 30, fov_mm: float | None = None) -> Phantom:
    """Generate one phantom anatomy.

    Args:
        rng: random generator (all randomness comes from it).
        size: in-plane matrix (rows = columns = size).
        slices: number of axial slices; the slice spacing is chosen so the abdomen (liver dome to bladder) fits.
        fov_mm: in-plane field of view; default random 360-420 mm.

    Returns:
        the phantom.

    Example:
        >>> ph = make_phantom(np.random.default_rng(0), size=64, slices=12)
        >>> bool(ph.mask("liver").any())
        True
    """
    fov = float(fov_mm or rng.uniform(360, 420))
    dxy = fov / size
    extent_z = float(rng.uniform(230, 290))
    dz = extent_z / slices
    nx = ny = size
    nz = slices
    x = (np.arange(nx) - (nx - 1) / 2) * dxy
    y = (np.arange(ny) - (ny - 1) / 2) * dxy + rng.uniform(-8, 8)
    z = (np.arange(nz) - (nz - 1) / 2) * dz
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    W = Z / extent_z  # -0.5 .. 0.5

    a = rng.uniform(140, 175) * (1 + 0.05 * W)  # body half-width (mm), slightly wider superiorly
    b = rng.uniform(100, 128) * (1 + 0.04 * W)
    fields = [_smooth_noise(rng, X.shape, size / 6) for _ in range(3)]

    def deform(amp: float) -> np.ndarray:
        w = rng.normal(0, 1, 3)
        return amp * (w[0] * fields[0] + w[1] * fields[1] + w[2] * fields[2]) / np.sqrt(3)

    body_f = (X / a) ** 2 + (Y / b) ** 2 + deform(0.04)
    tissue, names, cavity = _body_wall(rng, body_f, size)

    grow = rng.uniform(0.85, 1.15)
    for name, kind, (u, v, w), (rx, ry, rz) in _TISSUES:
        if name not in names:
            names.append(name)
        cx = u * np.mean(a) + rng.normal(0, 6)
        cy = v * np.mean(b) + rng.normal(0, 5)
        s = grow * rng.uniform(0.9, 1.1)
        if kind == "cyl":
            f = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + deform(0.05)
        else:
            cz = w * extent_z + rng.normal(0, 8)
            f = ((X - cx) / (rx * s)) ** 2 + ((Y - cy) / (ry * s)) ** 2 + ((Z - cz) / (rz * s)) ** 2 + deform(0.25)
        region = (f < 1.0) & ((body_f < 0.97) if name in _OUTSIDE_CAVITY else cavity)
        tissue[region] = names.index(name)
    # first lumbar vertebra: the vertebral body at the level of the kidney hila
    l1_z = np.mean([w for n, _, (_, _, w), _ in _TISSUES if n.endswith("kidney")]) * extent_z + 25
    names.append("first lumbar vertebra")
    bone = tissue == names.index("bone")
    tissue[bone & (np.abs(Z - l1_z) < 15)] = names.index("first lumbar vertebra")
    sub = _organ_texture(rng, tissue, names, size)
    origin = np.array([x[0], y[0], z[0]])
    return Phantom(tissue=tissue, names=names, spacing=(dxy, dxy, dz), origin=origin, rng=rng, sub=sub)


def _body_wall(rng: np.random.Generator, body_f: np.ndarray, size: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Tissue map of the body without organs: subcutaneous fat, muscle wall, and a cavity of bowel loops (some gas)
    and mesenteric fat; ``body_f < 1`` is the body. Returns (tissue, names, cavity mask)."""
    names = ["air", "body", "fat", "muscle"]
    tissue = np.zeros(body_f.shape, np.int16)
    tissue[body_f < 1.0] = names.index("fat")
    inner = body_f < rng.uniform(0.78, 0.88) ** 2
    tissue[inner] = names.index("muscle")
    cavity = body_f < rng.uniform(0.70, 0.76) ** 2
    tissue[cavity] = names.index("body")
    names += ["bowel", "gas"]
    loops = _smooth_noise(rng, body_f.shape, size / 18)
    tissue[(loops > 0.2) & cavity] = names.index("bowel")
    tissue[(loops > 2.0) & cavity] = names.index("gas")
    fat_blobs = (_smooth_noise(rng, body_f.shape, size / 14) > 1.7) & cavity
    tissue[fat_blobs] = names.index("fat")
    return tissue, names, cavity


def _organ_texture(rng: np.random.Generator, tissue: np.ndarray, names: list[str], size: int) -> np.ndarray:
    """:attr:`Phantom.sub`: 1 = vessels in the liver, 2 = renal medulla (inside the kidneys' rim)."""
    sub = np.zeros(tissue.shape, np.uint8)
    vessels = np.abs(_smooth_noise(rng, tissue.shape, size / 10)) < 0.07
    sub[vessels & (tissue == names.index("liver"))] = 1
    kidneys = np.isin(tissue, [names.index("right kidney"), names.index("left kidney")])
    inner = ndimage.binary_erosion(kidneys, np.ones((5, 5, 1), bool))
    sub[inner & (_smooth_noise(rng, tissue.shape, size / 30) > -0.2)] = 2
    return sub


def write_dicom_series(
    volume: np.ndarray,
    directory: str | Path,
    file_names: Sequence[str],
    *,
    origin: Sequence[float],
    row_dir: Sequence[float] = (1, 0, 0),
    col_dir: Sequence[float] = (0, 1, 0),
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    slice_step: Sequence[float] = (0, 0, 1),
    modality: str = "MR",
    patient_id: str = "SYNTH",
    series_description: str = "",
    series_number: int = 1,
    seed: int = 0,
    rescale_intercept: float | None = None,
) -> list[Path]:
    """Write ``volume[i, j, k]`` (column, row, slice) as a DICOM series, slice ``k`` to ``file_names[k]``.

    Slice ``k`` is at LPS ``origin + k * slice_step``; ``file_names`` decides the file order, so writing a series
    "against the normal" or shuffled is a matter of the names passed.

    Args:
        volume: integer-valued voxel array (MR: stored values; CT: Hounsfield units).
        directory: output folder (created).
        file_names: one file name per slice.
        origin: LPS position of voxel (0, 0, 0).
        row_dir: direction cosine along a row (increasing column index).
        col_dir: direction cosine along a column (increasing row index).
        pixel_spacing: DICOM PixelSpacing (row spacing, column spacing).
        slice_step: LPS vector from one slice to the next.
        modality: ``"MR"`` or ``"CT"``.
        patient_id: PatientID.
        series_description: SeriesDescription.
        series_number: SeriesNumber.
        seed: makes UIDs reproducible.
        rescale_intercept: CT only; stored value = HU - intercept (default -1024).

    Returns:
        the written paths, ``paths[k]`` holds slice ``k``.

    Example:
        >>> vol = np.zeros((4, 3, 2), np.uint16)
        >>> write_dicom_series(vol, tmp, ["a.dcm", "b.dcm"], origin=(0, 0, 0))  # doctest: +SKIP
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    step = np.asarray(slice_step, float)
    intercept = None
    if modality == "CT":
        intercept = -1024.0 if rescale_intercept is None else rescale_intercept
    key = f"{patient_id}/{series_description}/{series_number}/{seed}"
    series = {
        "SOPClassUID": CTImageStorage if modality == "CT" else MRImageStorage,
        "Modality": modality,
        "SeriesDescription": series_description,
        "PatientName": "Synthetic^Phantom",
        "PatientID": patient_id,
        "StudyInstanceUID": generate_uid(entropy_srcs=[key, "study"]),
        "SeriesInstanceUID": generate_uid(entropy_srcs=[key, "series"]),
        "FrameOfReferenceUID": generate_uid(entropy_srcs=[key, "frame"]),
        "SeriesNumber": series_number,
        "ImageOrientationPatient": [f"{v:.6f}" for v in (*row_dir, *col_dir)],
        "SliceThickness": f"{float(np.linalg.norm(step)):.4f}",
        "PixelSpacing": [f"{pixel_spacing[0]:.6f}", f"{pixel_spacing[1]:.6f}"],
        **_pixel_format(intercept),
    }
    paths = []
    for k, name in enumerate(file_names):
        pos = np.asarray(origin, float) + k * step
        sl = volume[:, :, k].T
        pix = np.clip(np.round(sl if intercept is None else sl - intercept), 0, 65535).astype(np.uint16)
        ds = _slice_dataset(series, generate_uid(entropy_srcs=[key, name]), k + 1, pos, normal, pix)
        path = directory / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _pixel_format(intercept: float | None) -> dict:
    """Attributes of unsigned 16-bit grey pixels; with ``intercept`` (CT), stored value = HU - intercept."""
    attrs = {
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 0,
    }
    if intercept is not None:
        attrs.update(RescaleIntercept=f"{intercept:.1f}", RescaleSlope="1", RescaleType="HU")
    return attrs


def _slice_dataset(
    series: dict, sop_uid: str, number: int, pos: np.ndarray, normal: np.ndarray, pix: np.ndarray
) -> Dataset:
    """One file of a series: the attributes all its files share (``series``, by keyword) and this slice's own."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = series["SOPClassUID"]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in series.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.SliceLocation = f"{float(pos @ normal):.4f}"
    ds.Rows, ds.Columns = pix.shape
    ds.PixelData = pix.tobytes()
    return ds


_MR_GRAY = {"liver": 63, "right kidney": 126, "left kidney": 189, "spleen": 252}


def _write_png(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.T.astype(np.uint8)).save(path)  # mask[i, j] -> PNG rows j, columns i


def _chaos_case(ph: Phantom, root: Path, layout: str, pid: str, reverse: bool, seed: int, kw: dict) -> None:
    nz = ph.tissue.shape[2]
    dx, dy, dz = ph.spacing
    # reverse: slice 0 of the written series is the most superior one, so the series runs against the normal
    flip = (slice(None), slice(None), slice(None, None, -1)) if reverse else (slice(None),) * 3
    origin = ph.origin + (np.array([0, 0, (nz - 1) * dz]) if reverse else 0)
    step = (0, 0, -dz if reverse else dz)
    geo = dict(origin=origin, pixel_spacing=(dy, dx), slice_step=step, patient_id=f"CHAOS-SYN-{pid}", seed=seed)
    if layout == "chaos-ct":
        base = root / "CT" / pid
        names = [f"i{k:04d},0000b.dcm" for k in range(nz)]
        write_dicom_series(ph.image("ct")[flip], base / "DICOM_anon", names, modality="CT", series_number=1, **geo)
        (base / "Ground").mkdir(parents=True, exist_ok=True)
        liver = ph.mask("liver")[flip]
        for k in range(nz):
            _write_png(liver[:, :, k] * 255, base / "Ground" / f"liver_GT_{k:03d}.png")
        return
    gray = np.zeros(ph.tissue.shape, np.uint8)
    for name, value in _MR_GRAY.items():
        gray[ph.mask(name)] = value
    gray = gray[flip]
    if kw.get("mr_sequence", "t2spir") in ("t2spir", "both"):
        base = root / "MR" / pid / "T2SPIR"
        names = [f"IMG-0002-{k + 1:05d}" for k in range(nz)]
        write_dicom_series(
            ph.image("t2spir")[flip], base / "DICOM_anon", [n + ".dcm" for n in names], modality="MR",
            series_description="T2SPIR", series_number=2, **geo,
        )  # fmt: skip
        (base / "Ground").mkdir(parents=True, exist_ok=True)
        for k, n in enumerate(names):
            _write_png(gray[:, :, k], base / "Ground" / f"{n}.png")
    if kw.get("mr_sequence", "t2spir") in ("t1dual", "both"):
        # CHAOS T1-DUAL: both echoes of one acquisition share series 4; in-phase files carry the even numbers,
        # opposed-phase the odd ones; the Ground masks carry the in-phase names.
        base = root / "MR" / pid / "T1DUAL"
        in_names = [f"IMG-0004-{2 * k + 2:05d}" for k in range(nz)]
        out_names = [f"IMG-0004-{2 * k + 1:05d}" for k in range(nz)]
        for contrast, sub, names in (("t1in", "InPhase", in_names), ("t1out", "OutPhase", out_names)):
            write_dicom_series(
                ph.image(contrast)[flip], base / "DICOM_anon" / sub, [n + ".dcm" for n in names], modality="MR",
                series_description=f"T1DUAL {sub}", series_number=4, **geo,
            )  # fmt: skip
        (base / "Ground").mkdir(parents=True, exist_ok=True)
        for k, n in enumerate(in_names):
            _write_png(gray[:, :, k], base / "Ground" / f"{n}.png")


_ANNOTATION_SPILL = ("gallbladder", "pancreas")


def _visceral_case(ph: Phantom, root: Path, stem: str) -> None:
    (root / "Volumes").mkdir(parents=True, exist_ok=True)
    (root / "Segmentations").mkdir(parents=True, exist_ok=True)
    # grid axes are LPS (left, posterior, superior); VISCERAL volumes are stored RAS-ish: flip x and y
    lps = np.diag([*ph.spacing, 1.0])
    lps[:3, 3] = ph.origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    ct = np.round(ph.image("ct")).astype(np.int16)
    img = nib.Nifti1Image(ct, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, root / "Volumes" / f"{stem}.nii.gz")
    for name, rid in RADLEX.items():
        m = ph.mask(name)
        if not m.any():
            continue
        if name in _ANNOTATION_SPILL:  # annotators disagree at borders: these masks overlap their neighbours
            m = ndimage.binary_dilation(m, np.ones((3, 3, 1), bool))
        seg = nib.Nifti1Image(m.astype(np.uint8), affine)
        seg.set_qform(affine, code=1)
        seg.set_sform(affine, code=1)
        nib.save(seg, root / "Segmentations" / f"{stem}_{rid}_1.nii.gz")


def synthesize(layout: str, out: str | Path, cases: int, seed: int = 0, **kw) -> Path:
    """Write ``cases`` synthetic patients in a dataset's native layout.

    The cases are written into a temporary folder inside ``out`` and moved into place at the end, so a failure half
    way (a full disk) leaves ``out`` as it was.

    Args:
        layout: ``"chaos-ct"`` (writes ``OUT/CT/<id>/...``), ``"chaos-mr"`` (``OUT/MR/<id>/T2SPIR``; pass
            ``mr_sequence="t1dual"`` or ``"both"`` for T1-DUAL) or ``"visceral"`` (``OUT/Volumes``,
            ``OUT/Segmentations``).
        out: output root, i.e. what ``prepare --root`` expects (CHAOS ``Train_Sets`` / VISCERAL root).
        cases: number of patients.
        seed: random seed; the same seed gives the same files.
        kw: ``size`` (in-plane matrix, default 128), ``slices`` ((min, max) slice counts, default (24, 36)),
            ``mr_sequence`` (``"t2spir"``, ``"t1dual"``, ``"both"``), ``progress`` (bool, default True).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: a bad ``layout``, ``cases``, ``seed``, ``size`` or ``slices``, named as the command line spells
            it; raised before anything is written.
        DataPreparationError: a patient folder / volume it would write already exists (nothing is overwritten).

    Example:
        >>> synthesize("chaos-mr", tmp_path / "Train_Sets", cases=2, size=64, slices=(10, 12))  # doctest: +SKIP
    """
    size = int(kw.get("size", 128))
    smin, smax = kw.get("slices", (24, 36))
    _check_arguments(layout, cases, seed, size, (smin, smax))
    out = Path(out)
    # never overwrite: refuse if any target patient folder / volume / mask already exists
    for target in _targets(layout, out, cases):
        if target.exists():
            raise DataPreparationError("already exists; not overwriting (choose an empty --out)", file=target)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # every case is written into a temporary folder inside out, then moved into place: a failure half-way (a full
    # disk) leaves out as it was
    work = work_folder(out, ".synthesize.tmp-")
    try:
        case_seeds = np.random.default_rng(seed).integers(0, 2**31, size=cases)
        for c in tqdm(range(cases), desc=f"synthesize {layout}", disable=not kw.get("progress", True)):
            rng = np.random.default_rng(case_seeds[c])
            ph = make_phantom(rng, size=size, slices=int(rng.integers(smin, smax + 1)))
            if layout == "visceral":
                _visceral_case(ph, work, f"{10000001 + c}_1_CTce_ThAb")
            else:
                _chaos_case(ph, work, layout, str(c + 1), reverse=(c % 2 == 1), seed=seed, kw=kw)
        for written in sorted(work.glob("*/*")):  # CT/<id>, MR/<id>, Volumes/<file>, Segmentations/<file>
            (out / written.parent.name).mkdir(exist_ok=True)
            written.rename(out / written.parent.name / written.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made and not any(out.iterdir()):
            out.rmdir()
    return out


def _targets(layout: str, out: Path, cases: int) -> list[Path]:
    """Every patient folder (CHAOS) or volume and mask file (VISCERAL) that :func:`synthesize` may write."""
    if layout != "visceral":
        return [out / ("CT" if layout == "chaos-ct" else "MR") / str(c + 1) for c in range(cases)]
    stems = [f"{10000001 + c}_1_CTce_ThAb" for c in range(cases)]
    volumes = [out / "Volumes" / f"{stem}.nii.gz" for stem in stems]
    return volumes + [out / "Segmentations" / f"{stem}_{rid}_1.nii.gz" for stem in stems for rid in RADLEX.values()]


def _check_arguments(layout: str, cases: int, seed: int, size: int, slices: tuple[int, int]) -> None:
    """Refuse values :func:`synthesize` cannot use, naming the command-line option.

    Raises:
        ValueError: one line, e.g. ``--size must be >= 1, got 0``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    for option, value in (("--cases", cases), ("--size", size)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if not 1 <= slices[0] <= slices[1]:
        raise ValueError(f"--slices MIN MAX needs 1 <= MIN <= MAX, got {slices[0]} {slices[1]}")

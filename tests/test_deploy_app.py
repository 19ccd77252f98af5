"""Integration tests of the MONAI Deploy application (``python apps/deploy``) on a synthetic series.

The app runs in ``.venv-deploy`` (MONAI Deploy App SDK 4.0.0, highdicom, pydicom 3), driven from the core
environment by subprocess. Its DICOM SEG is read back with pydicom here and with highdicom in ``.venv-deploy``,
and compared with the bundle's own ``monai.bundle run`` inference on the same series (converted to NIfTI by ITK),
voxel by voxel through the DICOM geometry of each frame.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
DEPLOY_PY = REPO / ".venv-deploy" / "bin" / "python"
APP = REPO / "apps" / "deploy"
ORGANS = {
    1: ("liver", "10200004"),
    2: ("right kidney", "9846003"),
    3: ("left kidney", "18639004"),
    4: ("spleen", "78961009"),
}

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.slow,
    pytest.mark.skipif(not DEPLOY_PY.exists(), reason="needs .venv-deploy: run `make deploy-setup` (make test does)"),
    pytest.mark.skipif(not (BUNDLE / "configs" / "inference.json").exists(), reason="bundle/configs not present"),
]

# Runs in .venv-deploy: read the SEG with highdicom and write what it sees as JSON + a label map per source slice.
HIGHDICOM_READER = r"""
import json, sys
import numpy as np
import highdicom as hd
seg = hd.seg.segread(sys.argv[1])
refs = [r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence]
labels = seg.get_pixels_by_source_instance(
    source_sop_instance_uids=refs, combine_segments=True, assert_missing_frames_are_empty=True
)
np.savez(sys.argv[2], uids=np.array(refs), labels=labels)
print(json.dumps({
    "segments": [[int(d.segment_number), d.segment_label, d.segmented_property_type.value]
                 for d in seg.SegmentSequence],
    "series": [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence],
    "n_referenced": len(refs),
}))
"""


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO, timeout=600, **kw)


class IntensityBands(torch.nn.Module):
    """A stand-in 2D "network" whose label follows the normalised intensity (five bands over [0, 1]).

    Random weights predict one class everywhere, which would hide any geometry error; this model's output has the
    phantom's asymmetric anatomy in it, so a flipped or shifted SEG cannot match the reference.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        middle = x.shape[1] // 2  # the slice itself; its neighbours are the other channels (2.5D)
        centres = torch.linspace(0.1, 0.9, 5, device=x.device).view(1, 5, 1, 1)
        return -50.0 * (x[:, middle : middle + 1] - centres) ** 2


class PositionStripes(torch.nn.Module):
    """A stand-in "network" whose label depends only on the pixel's position in its input grid (stripes 8 px wide).

    The bundle resamples to its own spacing first, so a wrong voxel size in the app's affine moves the stripes
    against the reference, which intensity-based labels would not show.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = torch.arange(x.shape[-2], device=x.device).view(1, 1, -1, 1).float()
        label = torch.remainder(torch.floor(i / 8), 4) + 1
        classes = torch.arange(5, device=x.device).view(1, 5, 1, 1).float()
        return (-50.0 * (label - classes) ** 2).expand(x.shape[0], 5, x.shape[-2], x.shape[-1]).contiguous()


class Failing(torch.nn.Module):
    """A model that fails inside the SDK graph, after the input checks have passed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("model failure on purpose")


def _torchscript_bundle(tmp: Path, which: str) -> Path:
    """A TorchScript file with the bundle's metadata.json and inference.json embedded, as ckpt_export writes it.

    ``which="bands"`` scripts :class:`IntensityBands`; ``which="bundle"`` is the shipped ``model.ts`` or, without it,
    one exported now by ``monai.bundle ckpt_export`` from the committed ``model.pt``.
    """
    configs = BUNDLE / "configs"
    stand_ins = {"bands": IntensityBands, "stripes": PositionStripes, "failing": Failing}
    if which in stand_ins:
        path = tmp / which / "model.ts"
        path.parent.mkdir()
        extra = {name: (configs / name).read_text() for name in ("metadata.json", "inference.json")}
        model = stand_ins[which]()
        torch.jit.save(torch.jit.script(model), str(path), _extra_files=extra)
        return path
    if (BUNDLE / "models" / "model.ts").exists():
        return BUNDLE / "models" / "model.ts"
    if not (BUNDLE / "models" / "model.pt").exists():
        pytest.skip("bundle/models/model.pt is not committed yet")
    path = tmp / "bundle" / "model.ts"
    path.parent.mkdir()
    done = _run([
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", path,
        "--ckpt_file", BUNDLE / "models" / "model.pt", "--meta_file", configs / "metadata.json",
        "--config_file", configs / "inference.json", "--bundle_root", BUNDLE,
    ])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """A synthetic CHAOS-layout MR T2-SPIR series whose files run against the slice normal."""
    from scse_monai.data import synthesize

    root = synthesize(
        "chaos-mr", tmp_path_factory.mktemp("chaos") / "Train_Sets", cases=2, seed=3, size=64, slices=(10, 12),
        progress=False,
    )  # fmt: skip
    return root / "MR" / "2" / "T2SPIR"  # synthesize writes every second case against the normal


def _non_square_copy(series: Path, tmp: Path) -> Path:
    """``series`` with pixels 1.5 mm between rows and 3 mm between columns (the SDK swapped the two)."""
    copy = tmp / "T2SPIR"
    (copy / "DICOM_anon").mkdir(parents=True)
    for path in sorted((series / "DICOM_anon").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [1.5, 3.0]
        ds.save_as(copy / "DICOM_anon" / path.name)
    return copy


@pytest.fixture(scope="module", params=["bands", "bundle", "stripes, non-square pixels"])
def deploy_case(request, series, tmp_path_factory):
    """One deploy run on ``series`` with a stand-in model ("bands"), the bundle's weights ("bundle"), and one with
    position-dependent labels on a copy of ``series`` with non-square pixels."""
    tmp = tmp_path_factory.mktemp(f"deploy_{request.param.split(',')[0]}")
    model = _torchscript_bundle(tmp, request.param.split(",")[0])
    if request.param.startswith("stripes"):
        series = _non_square_copy(series, tmp)
    out = tmp / "out"
    run = _run([DEPLOY_PY, APP, "-i", series, "-o", out, "-m", model])
    return {"tmp": tmp, "series": series, "model": model, "out": out, "run": run}


def _source_slices(series_dir: Path) -> dict[str, pydicom.Dataset]:
    return {
        str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, sorted((series_dir / "DICOM_anon").glob("*.dcm")))
    }


def _seg_file(case) -> Path:
    run = case["run"]
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr[-5000:]}"
    files = sorted(case["out"].glob("*.dcm"))
    assert len(files) == 1, files
    assert [p.name for p in case["out"].iterdir()] == [files[0].name], "staging folder left behind"
    return files[0]


def test_seg_is_a_valid_segmentation_of_the_input_series(deploy_case):
    seg_path = _seg_file(deploy_case)
    seg = pydicom.dcmread(seg_path)
    sources = _source_slices(deploy_case["series"])
    src0 = next(iter(sources.values()))

    assert seg.Modality == "SEG"
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == src0.StudyInstanceUID
    assert seg.FrameOfReferenceUID == src0.FrameOfReferenceUID
    ref_series = seg.ReferencedSeriesSequence
    assert [s.SeriesInstanceUID for s in ref_series] == [src0.SeriesInstanceUID]
    assert {r.ReferencedSOPInstanceUID for r in ref_series[0].ReferencedInstanceSequence} == set(sources)

    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(segments) == sorted(ORGANS)
    for number, (name, code) in ORGANS.items():
        assert segments[number].SegmentLabel.lower() == name
        assert segments[number].SegmentedPropertyTypeCodeSequence[0].CodeValue == code
        assert segments[number].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"

    # Geometry: every frame lies exactly on the source slice it references (the LPS/RAS pitfall shows up here).
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in src0.ImageOrientationPatient],
        atol=1e-4,
    )
    np.testing.assert_allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [float(v) for v in src0.PixelSpacing]
    )
    assert (seg.Rows, seg.Columns) == (src0.Rows, src0.Columns)
    assert len(seg.PerFrameFunctionalGroupsSequence) == int(seg.NumberOfFrames) > 0
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, [float(v) for v in sources[src_uid].ImagePositionPatient], atol=1e-3)


def test_seg_reads_back_with_highdicom(deploy_case):
    seg_path = _seg_file(deploy_case)
    done = _run([DEPLOY_PY, "-c", HIGHDICOM_READER, seg_path, deploy_case["tmp"] / "hd.npz"])
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(n, code) for n, _, code in info["segments"]] == [(n, c) for n, (_, c) in ORGANS.items()]
    assert info["n_referenced"] == len(_source_slices(deploy_case["series"]))
    # highdicom's label map equals the one rebuilt from the raw frames with pydicom alone
    hd_maps = np.load(deploy_case["tmp"] / "hd.npz")
    ours = _labels_by_source(pydicom.dcmread(seg_path), list(_source_slices(deploy_case["series"])))
    for uid, labels in zip(hd_maps["uids"], hd_maps["labels"], strict=True):
        np.testing.assert_array_equal(labels, ours[str(uid)])


def _labels_by_source(seg: pydicom.Dataset, uids: list[str]) -> dict[str, np.ndarray]:
    """Label map per source slice from the SEG frames (pydicom only; BINARY segments, no overlaps expected)."""
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    maps = {uid: np.zeros((seg.Rows, seg.Columns), np.uint8) for uid in uids}
    for frame, pixels in zip(seg.PerFrameFunctionalGroupsSequence, frames, strict=True):
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert not np.any(maps[uid][pixels > 0]), f"overlapping segments on {uid}"
        maps[uid][pixels > 0] = number
    return maps


def _bundle_reference(case) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's own inference config on the same series, read from NIfTI (ITK's DICOM reader): labels, affine.

    preprocessing -> inferer -> postprocessing of ``bundle/configs/inference.json`` with the same TorchScript
    network the app ran; only the route into the model differs (ITK/NIfTI here, the SDK's DICOM operators there).
    """
    import itk
    from monai.bundle import ConfigParser

    nifti = case["tmp"] / "series.nii.gz"
    itk.imwrite(itk.imread(str(case["series"] / "DICOM_anon"), itk.F), str(nifti))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "output_dir": str(case["tmp"] / "ref_out"), "device": "cpu"})
    parser["postprocessing"]["transforms"] = [
        t for t in parser["postprocessing"]["transforms"] if "SaveImage" not in str(t.get("_target_", ""))
    ]
    data = parser.get_parsed_content("preprocessing")({"image": str(nifti)})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], torch.jit.load(case["model"]))[0]
    pred = parser.get_parsed_content("postprocessing")(data)["pred"]
    return np.asarray(pred).astype(np.uint8).squeeze(), np.asarray(pred.affine)


def test_seg_masks_match_bundle_inference(deploy_case):
    seg = pydicom.dcmread(_seg_file(deploy_case))
    sources = _source_slices(deploy_case["series"])
    ours = _labels_by_source(seg, list(sources))
    ref, affine = _bundle_reference(deploy_case)
    inv = np.linalg.inv(affine)

    # For every source pixel: LPS position from the slice's own IPP/IOP/PixelSpacing -> RAS -> reference voxel.
    seg_all, ref_all = [], []
    for uid, ds in sources.items():
        ipp = np.array(ds.ImagePositionPatient, float)
        iop = np.array(ds.ImageOrientationPatient, float)
        d_row, d_col = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        lps = ipp + c[..., None] * d_col * iop[:3] + r[..., None] * d_row * iop[3:]
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        assert np.all(ijk >= 0) and np.all(ijk < np.array(ref.shape)), "series and reference grids disagree"
        ref_all.append(ref[ijk[..., 0], ijk[..., 1], ijk[..., 2]])
        seg_all.append(ours[uid])
    seg_all, ref_all = np.stack(seg_all), np.stack(ref_all)

    present = [k for k in ORGANS if (ref_all == k).any() or (seg_all == k).any()]
    assert present, "no organ predicted at all: nothing to compare"
    dice = {}
    for k in present:
        a, b = seg_all == k, ref_all == k
        dice[ORGANS[k][0]] = (2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()), int(a.sum()), int(b.sum()))
    print("Dice (SEG vs bundle inference), SEG voxels, reference voxels:", dice)
    assert all(d >= 0.99 for d, _, _ in dice.values()), dice


def _bad_run(tmp: Path, input_path: Path, model: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / "bad_out"
    out.mkdir(exist_ok=True)
    run = _run([DEPLOY_PY, APP, "-i", input_path, "-o", out, "-m", model])
    return run, out


@pytest.fixture(scope="module")
def bands_model(tmp_path_factory) -> Path:
    return _torchscript_bundle(tmp_path_factory.mktemp("bands_model"), "bands")


def _broken_copy(series: Path, tmp: Path, case: str) -> Path:
    """A copy of ``series`` with one slice, a truncated slice or a non-finite RescaleSlope."""
    copy = tmp / "broken"
    files = sorted((series / "DICOM_anon").glob("*.dcm"))
    copy.mkdir()
    for path in files[:1] if case == "single slice" else files:
        shutil.copy(path, copy / path.name)
    third = copy / files[2].name
    if case == "truncated slice":
        third.write_bytes(third.read_bytes()[:-2000])
    elif case == "NaN rescale slope":
        ds = pydicom.dcmread(third)
        ds.RescaleSlope, ds.RescaleIntercept = "NaN", "0"
        ds.save_as(third)
    return copy


@pytest.mark.parametrize(
    "case",
    [
        "empty folder",
        "non-DICOM file",
        "folder without DICOM",
        "no matching series",
        "single slice",
        "truncated slice",
        "NaN rescale slope",
    ],
)
def test_bad_inputs_fail_cleanly(series, bands_model, tmp_path, case):
    if case in ("single slice", "truncated slice", "NaN rescale slope"):
        bad = _broken_copy(series, tmp_path, case)
        expected = {
            "single slice": "has one slice",
            "truncated slice": "cannot decode pixel data",
            "NaN rescale slope": "RescaleSlope NaN is not a finite number",
        }[case]
    elif case == "empty folder":
        bad = tmp_path / "empty"
        bad.mkdir()
        expected = "empty"
    elif case == "non-DICOM file":
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        expected = "not a DICOM file"
    elif case == "folder without DICOM":
        bad = tmp_path / "pngs"
        shutil.copytree(series / "Ground", bad)
        expected = "no DICOM files"
    else:  # a real MR series whose description the rules do not accept
        from scse_monai.data import synthesize

        root = synthesize(
            "chaos-mr", tmp_path / "t1", cases=1, seed=0, size=32, slices=(4, 4), mr_sequence="t1dual", progress=False
        )
        bad = root
        expected = "no series matches the selection rules"
    run, out = _bad_run(tmp_path, bad, bands_model)
    assert run.returncode != 0
    assert expected in run.stderr and str(bad) in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert list(out.iterdir()) == [], "no partial output may be left"


def test_renamed_model_file_is_refused_before_the_graph_runs(series, bands_model, tmp_path):
    # the SDK would find metadata.json under the old folder name but run without the inference config (raw image in)
    renamed = tmp_path / "organs.ts"
    shutil.copy(bands_model, renamed)
    run, out = _bad_run(tmp_path, series, renamed)
    assert run.returncode == 2, run.stderr[-3000:]
    reads = "organs/extra/metadata.json and organs/extra/inference.json, it holds"
    assert f"model {renamed}: MONAI Deploy reads {reads}" in run.stderr, run.stderr[-2000:]
    assert "model/extra/inference.json" in run.stderr
    assert "Traceback" not in run.stderr and list(out.iterdir()) == []


def test_failure_inside_the_graph_exits_1_without_partial_output(series, tmp_path):
    model = _torchscript_bundle(tmp_path, "failing")
    # a run killed by SIGTERM (holoscan exits without Python's clean-up) left its staging folder: removed now
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "bad_out" / f".seg-partial-{gone.pid}-x").mkdir(parents=True)
    run, out = _bad_run(tmp_path, series, model)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "error: segmentation failed" in run.stderr and "model failure on purpose" in run.stderr
    assert list(out.iterdir()) == [], "no partial output may be left"
    new_out = tmp_path / "made" / "by_the_run"
    run = _run([DEPLOY_PY, APP, "-i", series, "-o", new_out, "-m", model])
    assert run.returncode == 1 and not new_out.parent.exists(), "a failed run leaves no folder it made"


def _mixed_input(tmp: Path, series: Path, extra: str) -> Path:
    """An input folder holding ``series`` (MR T2-SPIR) and another patient's CT or T2-SPIR series."""
    from scse_monai.data import synthesize

    root = tmp / "input"
    shutil.copytree(series / "DICOM_anon", root / "a_mr" / "DICOM_anon")
    layout = "chaos-ct" if extra == "ct" else "chaos-mr"
    other = synthesize(layout, tmp / "other", cases=1, seed=11, size=32, slices=(6, 6), progress=False)
    src = other / "CT" / "1" / "DICOM_anon" if extra == "ct" else other / "MR" / "1" / "T2SPIR" / "DICOM_anon"
    shutil.copytree(src, root / "0_first" / "DICOM_anon")  # sorts first, as the wrong series did
    return root


def test_series_rules_apply_in_priority_order_across_the_whole_input(series, bands_model, tmp_path):
    """Issue 16 item 4: with a T2-SPIR and a CT series in one input, the T2-SPIR series is segmented."""
    run, out = _bad_run(tmp_path, _mixed_input(tmp_path, series, "ct"), bands_model)
    assert run.returncode == 0, run.stderr[-3000:]
    (seg_path,) = sorted(out.glob("*.dcm"))
    seg = pydicom.dcmread(seg_path)
    src0 = next(iter(_source_slices(series).values()))
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [src0.SeriesInstanceUID]


def test_several_matching_patients_are_rejected_not_dropped(series, bands_model, tmp_path):
    """Issue 16 item 4: two patients' T2-SPIR series: a clear error naming both, not one silently dropped."""
    run, out = _bad_run(tmp_path, _mixed_input(tmp_path, series, "mr"), bands_model)
    assert run.returncode == 2 and "2 series match the rule 'CHAOS MR T2-SPIR'" in run.stderr, run.stderr[-2000:]
    assert "a_mr" in run.stderr and "0_first" in run.stderr and "Traceback" not in run.stderr
    assert list(out.iterdir()) == []


def test_series_with_a_missing_slice_is_rejected(series, bands_model, tmp_path):
    """Issue 16 item 4: a gap in the slice positions is refused, as `prepare` refuses it."""
    bad = tmp_path / "gap"
    shutil.copytree(series / "DICOM_anon", bad)
    files = sorted(bad.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    files[len(files) // 2].unlink()
    run, out = _bad_run(tmp_path, bad, bands_model)
    assert run.returncode == 2 and "non-uniform slice spacing" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and list(out.iterdir()) == []


def test_unwritable_output_is_one_line_exit_2(series, bands_model, tmp_path):
    """Issue 16 item 9: an output folder that cannot be created is a clear error, not a traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run = _run([DEPLOY_PY, APP, "-i", series, "-o", blocker / "out", "-m", bands_model])
    assert run.returncode == 2 and f"output {blocker / 'out'}" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr

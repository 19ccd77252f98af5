"""Bad arguments and missing inputs of ``synthesize`` and ``preview``: one line naming the option or file, exit
code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from scse_monai.data import prepare_chaos, synthesize
from scse_monai.data import preview as preview_module
from scse_monai.data.cli import main


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    """Datalist of one prepared MR case."""
    base = tmp_path_factory.mktemp("prepared")
    raw = synthesize("chaos-mr", base / "raw", cases=1, seed=3, size=32, slices=(6, 6), progress=False)
    return prepare_chaos(raw, "mr-t2spir", base / "out", folds=1, workers=1, progress=False)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--size", "0"], "--size"),
        (["--cases", "0"], "--cases"),
        (["--seed", "-1"], "--seed"),
        (["--slices", "0", "3"], "--slices"),
        (["--slices", "5", "2"], "--slices"),
    ],
)
def test_synthesize_bad_number_is_one_line_naming_the_option(tmp_path, capsys, args, named):
    out = tmp_path / "raw"
    assert main(["synthesize", "--layout", "chaos-mr", "--out", str(out), *args]) == 2
    assert named in _one_error_line(capsys)
    assert not out.exists()


def test_synthesize_smallest_values_work(tmp_path):
    out = synthesize("chaos-ct", tmp_path / "raw", cases=1, seed=0, size=1, slices=(1, 1), progress=False)
    assert len(list((out / "CT" / "1" / "DICOM_anon").iterdir())) == 1


@pytest.mark.parametrize("slices", ["0", "-3"])
def test_preview_bad_slices_named_and_nothing_written(datalist, tmp_path, capsys, slices):
    out = tmp_path / "previews" / "p.png"
    code = main(["preview", "--datalist", str(datalist), "--case", "1", "--out", str(out),
                 "--slices", slices])  # fmt: skip
    assert code == 2
    assert "--slices" in _one_error_line(capsys)
    assert not out.parent.exists()


def test_preview_missing_image_is_bad_input_naming_the_file(datalist, tmp_path, capsys):
    doc = datalist.read_text().replace("imagesTr/chaos_mr_t2_01", "imagesTr/gone")
    edited = tmp_path / "datalist.json"
    edited.write_text(doc)
    out = tmp_path / "previews" / "p.png"
    assert main(["preview", "--datalist", str(edited), "--case", "1", "--out", str(out)]) == 2
    assert str(tmp_path / "imagesTr" / "gone.nii.gz") in _one_error_line(capsys)
    assert not out.parent.exists()


def test_preview_unreadable_image_is_bad_input_naming_the_file(datalist, tmp_path, capsys):
    doc = datalist.read_text().replace("imagesTr/chaos_mr_t2_01.nii.gz", "junk.nii.gz")
    edited = tmp_path / "datalist.json"
    edited.write_text(doc)
    (tmp_path / "junk.nii.gz").write_bytes(b"not a volume")
    assert main(["preview", "--datalist", str(edited), "--case", "1", "--out", str(tmp_path / "p.png")]) == 2
    assert "junk.nii.gz" in _one_error_line(capsys)
    assert not (tmp_path / "p.png").exists()


def test_preview_missing_datalist_or_folder_out_is_bad_input(datalist, tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["preview", "--datalist", str(missing), "--case", "1", "--out", str(tmp_path / "p.png")]) == 2
    assert str(missing) in _one_error_line(capsys)
    assert main(["preview", "--datalist", str(datalist), "--case", "1", "--out", str(tmp_path)]) == 2
    assert "--out" in _one_error_line(capsys)
    assert sorted(tmp_path.iterdir()) == []


def test_preview_replaces_only_its_own_png(datalist, tmp_path, capsys):
    """An existing --out is replaced only if a preview wrote it: never the datalist, a volume or a user file."""
    listed = datalist.parent / "imagesTr" / "chaos_mr_t2_01.nii.gz"
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG user's own picture")
    for target in (datalist, listed, mine):
        before = target.read_bytes()
        assert main(["preview", "--datalist", str(datalist), "--case", "1", "--out", str(target)]) == 2
        assert str(target) in _one_error_line(capsys) and target.read_bytes() == before
    out = tmp_path / "p.png"
    for _ in range(2):  # a rerun replaces its own PNG
        assert main(["preview", "--datalist", str(datalist), "--case", "1", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_preview_ct_is_shown_in_the_package_ct_window(monkeypatch):
    image = np.linspace(-1000.0, 1000.0, 8 * 8 * 3).reshape(8, 8, 3)
    label = np.zeros((8, 8, 3), np.int64)
    label[2:5, 2:5, 1] = 1

    def clim(modality: str) -> tuple[float, float]:
        fig = preview_module._montage(image, label, (1.0, 1.0, 1.0), {"modality": {"0": modality}}, 2, 2)
        plt.close(fig)
        return tuple(float(v) for v in fig.axes[0].images[0].get_clim())

    assert clim("CT") == preview_module.CT_ABDOMEN_WINDOW == (-160.0, 240.0)
    monkeypatch.setattr(preview_module, "CT_ABDOMEN_WINDOW", (-1000.0, 3000.0))
    assert clim("CT") == (-1000.0, 3000.0)
    assert clim("MR") == pytest.approx(tuple(np.percentile(image, [1, 99.5])))  # MR: per-image percentiles


@pytest.mark.parametrize("layout", ["chaos-mr", "visceral"])
def test_synthesize_failing_half_way_leaves_out_as_it_was(tmp_path: Path, monkeypatch, layout: str) -> None:
    from scse_monai.data import synthetic

    name = "_visceral_case" if layout == "visceral" else "_chaos_case"
    original, calls = getattr(synthetic, name), []

    def full_disk_on_the_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic, name, full_disk_on_the_second_case)
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (fresh, kept):
        calls.clear()
        with pytest.raises(OSError, match="No space left"):
            synthetic.synthesize(layout, out, cases=3, seed=0, size=16, slices=(2, 2), progress=False)
    assert not fresh.exists()
    assert sorted(p.name for p in kept.rglob("*")) == ["notes.txt"]
    monkeypatch.setattr(synthetic, name, original)
    out = synthetic.synthesize(layout, kept, cases=2, seed=0, size=16, slices=(2, 2), progress=False)
    expected = ["Segmentations", "Volumes"] if layout == "visceral" else ["MR"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "notes.txt"])
    assert len(list((out / expected[-1]).iterdir())) == 2  # Volumes/<case>.nii.gz or MR/<case>, two cases

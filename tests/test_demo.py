"""``python -m scse_monai.demo``: the end-to-end run, and the folders it refuses to clear."""

from __future__ import annotations

from pathlib import Path

import pytest

from scse_monai.demo import MARKER, main

TINY = ["--cases", "4", "--epochs", "1", "--features", "4"]


def test_a_folder_the_demo_did_not_make_is_left_untouched(tmp_path: Path, capsys) -> None:
    user = tmp_path / "mine"
    (user / "models").mkdir(parents=True)
    (user / "models" / "keep.pt").write_bytes(b"weights")
    assert main(["--out", str(user), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {user}" in err and "not empty" in err
    assert sorted(str(p.relative_to(user)) for p in user.rglob("*")) == ["models", "models/keep.pt"]


@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--cases", "1"], ["--features", "0"]])
def test_bad_numbers_exit_2_naming_the_argument_before_any_output(tmp_path: Path, capsys, bad) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "out"), *TINY, *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_replaces_only_its_own_earlier_outputs(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    (out / "models").mkdir(parents=True)
    (out / MARKER).touch()
    (out / "models" / "stale.pt").write_bytes(b"an earlier run's")
    assert main(["--out", str(out), *TINY]) == 0
    assert not (out / "models" / "stale.pt").exists() and (out / "models" / "model.pt").stat().st_size > 1000
    assert (out / "eval" / "training_curves.csv").is_file()
    assert len(list((out / "pred").glob("*_seg.nii.gz"))) == 4  # one per synthetic patient

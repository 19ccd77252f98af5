"""The bundle as a model-zoo user gets it: the built wheel (not editable) in a fresh venv, the bundle folder alone.

Model-zoo's shape (Project-MONAI/model-zoo ``ci/verify_bundle.py`` and ``ci/unit_tests``), with our own code:

1. ``python -m build`` makes the wheel; a new venv (no system site packages) gets torch first (the local CPU
   wheel), then the wheel and the requirements ``configs/metadata.json`` declares, written as model-zoo's
   ``ci/get_bundle_requirements.py`` writes them with ``ALLOW_MONAI_RC=true`` (both premerge scripts set it):
   ``monai>=Xrc1,<next patch``, every other package ``==``, installed with ``pip install --pre``. pip's cache is
   reused.
2. ``bundle/`` is copied alone to ``<tmp>/models/<name>/`` with its schema at ``eval/schema.json`` and an empty
   ``models/model_info.json``, the layout ``verify_bundle.py -b <name>`` (default ``-p models``) expects.
3. In that venv, from ``<tmp>`` with relative paths (``models/<name>``) and the bundle folder first on
   ``sys.path``, as ``verify_bundle.py`` runs: the directory and changelog checks, ``verify_metadata``, the
   inference workflow's properties (created without data; model-zoo checks them once an app's properties file is
   present), ``verify_net_in_out``, ``ckpt_export`` of ``models/model.pt``; a one-epoch tiny training and
   evaluation on a plain decathlon ``dataset.json`` (``check_properties()`` of the train workflow first);
   ``python -m monai.bundle run --config_file configs/inference.json --dataset_dir D --output_dir O`` from inside
   the bundle's folder with the shipped weights; the TorchScript config without ``scse_monai``.

Minutes of work (mostly pip): marked ``modelzoo``; ``pytest -m "not modelzoo"`` skips it locally, ``make test`` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.modelzoo, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
NAME = "se_unet_abdominal_mr"


def _sh(cmd: list[str], cwd: Path, timeout: int = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def declared_requirements(meta: dict) -> list[str]:
    """Every package the metadata declares, as model-zoo's ``get_bundle_requirements.py`` with ALLOW_MONAI_RC."""
    major, minor, patch = (int(p) for p in meta["monai_version"].split(".")[:3])
    monai = f"monai>={meta['monai_version']}rc1,<{major}.{minor}.{patch + 1}"
    reqs = [monai, f"torch=={meta['pytorch_version']}", f"numpy=={meta['numpy_version']}"]
    for key in ("optional_packages_version", "required_packages_version"):
        reqs += [f"{name}=={version}" for name, version in meta.get(key, {}).items()]
    return reqs


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> SimpleNamespace:
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("modelzoo")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _sh([sys.executable, "-m", "build", "--wheel", "--outdir", work / "dist", REPO], cwd=work)
    (wheel,) = (work / "dist").glob("scse_monai-*.whl")
    _sh([sys.executable, "-m", "venv", work / "venv"], cwd=work)
    py = work / "venv" / "bin" / "python"
    pip = ["bash", REPO / "mk" / "pip-install", py, "-q"]
    _sh([*pip, f"torch=={torch.__version__}"], cwd=work, env=env)  # the local CPU wheel, before anything else
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    _sh([*pip, "--pre", wheel, *declared_requirements(meta)], cwd=work, env=env)  # --pre as model-zoo's CI

    models = work / "models"
    bundle = models / NAME
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "data", "__pycache__", ".*"))
    (models / "model_info.json").write_text("{}")
    schema = BUNDLE / "schema" / Path(meta["schema"]).name
    (bundle / "eval").mkdir()
    shutil.copyfile(schema, bundle / "eval" / "schema.json")
    data = work / "data"
    _sh([py, "-c", WRITE_DATA, data], cwd=work, env=env)
    print(f"model-zoo environment ready in {time.monotonic() - t0:.0f} s")
    return SimpleNamespace(work=work, py=py, env=env, bundle=bundle, data=data, meta=meta)


# tiny volumes: a plain decathlon task (dataset.json, imagesTr/labelsTr, 4 patients) and one test volume
WRITE_DATA = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import nibabel as nib, numpy as np
    root = Path(sys.argv[1]); rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 6.0, 1.0])
    training = []
    for i in range(4):
        label = np.zeros((48, 40, 5), np.uint8)
        for organ, (x, y) in enumerate([(8, 8), (28, 8), (8, 24), (28, 24)], start=1):
            label[x : x + 10, y : y + 8, 1:4] = organ
        image = (label * 40 + rng.normal(0, 5, label.shape)).astype(np.float32)
        name = f"toy_{i}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        if i == 0:
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTs" / name)
    labels = {"0": "background", "1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}
    (root / "dataset.json").write_text(json.dumps({"name": "toy", "labels": labels, "training": training}))
    """
)

VERIFY = textwrap.dedent(
    """
    import json, os, sys
    import scse_monai, torch
    from monai.bundle import ckpt_export, create_workflow, verify_metadata, verify_net_in_out
    models, name = sys.argv[1], sys.argv[2]
    b = os.path.join(models, name)
    sys.path.insert(0, b)  # as verify_bundle.py does, for bundles with their own code
    assert "site-packages" in scse_monai.__file__, scse_monai.__file__  # the wheel, not the repository
    for f in ("LICENSE", "configs/metadata.json", "models/model.pt", "configs/inference.json"):
        assert os.path.exists(os.path.join(b, f)), f
    meta = json.load(open(os.path.join(b, "configs/metadata.json")))
    assert meta["version"] in meta["changelog"], "version not in changelog"
    assert f"{name}_v{meta['version']}" not in json.load(open(os.path.join(models, "model_info.json")))
    verify_metadata(meta_file=os.path.join(b, "configs/metadata.json"), filepath=os.path.join(b, "eval/schema.json"))
    print("metadata verified")
    wf = create_workflow(
        workflow_type="inference", bundle_root=b, config_file=os.path.join(b, "configs/inference.json"),
        logging_file=os.path.join(b, "configs/logging.conf"), meta_file=os.path.join(b, "configs/metadata.json"),
    )
    assert wf.check_properties() == [], wf.check_properties()
    print("inference properties verified without data")
    common = dict(net_id="network_def", meta_file=os.path.join(b, "configs/metadata.json"),
                  config_file=os.path.join(b, "configs/inference.json"), bundle_root=b)
    verify_net_in_out(**common)
    ts, pt = os.path.join(b, "models/verify_model.ts"), os.path.join(b, "models/model.pt")
    ckpt_export(filepath=ts, ckpt_file=pt, **common)
    torch.jit.load(os.path.join(b, "models/model.ts"))
    print("verify_bundle full: ok")
    """
)

TRAIN = textwrap.dedent(
    """
    import os, sys
    from monai.bundle import ConfigWorkflow
    b, data, out = sys.argv[1:4]
    cfg = lambda n: os.path.join(b, "configs", n)
    overrides = dict(bundle_root=b, dataset_dir=data, ckpt_dir=os.path.join(out, "models"),
                     output_dir=os.path.join(out, "eval"), epochs=1, features=4, roi_size=[48, 48],
                     pixdim=[-1.0, -1.0, -1.0], cache_rate=0.0, slices_per_volume=2, val_interval=1)
    for configs, kind in (([cfg("train.json")], "train"), ([cfg("train.json"), cfg("evaluate.json")], "train")):
        wf = ConfigWorkflow(workflow_type=kind, config_file=configs, meta_file=cfg("metadata.json"),
                            logging_file=cfg("logging.conf"), **overrides)
        wf.initialize()
        assert wf.check_properties() == [], wf.check_properties()
        wf.run()
        wf.finalize()
    assert os.path.isfile(os.path.join(out, "models", "model.pt"))
    print("train + evaluate: ok")
    """
)


def test_verify_bundle_full_in_a_fresh_venv(zoo: SimpleNamespace) -> None:
    res = _sh([zoo.py, "-c", VERIFY, "models", NAME], cwd=zoo.work, env=zoo.env)  # relative, as model-zoo's CI
    assert "verify_bundle full: ok" in res.stdout


def test_one_tiny_epoch_on_a_plain_decathlon_datalist(zoo: SimpleNamespace) -> None:
    out = zoo.work / "train_out"
    res = _sh([zoo.py, "-c", TRAIN, zoo.bundle, zoo.data, out], cwd=zoo.work, env=zoo.env)
    assert "train + evaluate: ok" in res.stdout
    assert list((out / "eval").glob("*per_case.csv"))


def test_inference_from_the_bundle_folder_with_the_shipped_weights(zoo: SimpleNamespace) -> None:
    import nibabel as nib
    import numpy as np

    out = zoo.work / "pred"
    cmd = [zoo.py, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    _sh([*cmd, "--dataset_dir", zoo.data, "--output_dir", out], cwd=zoo.bundle, env=zoo.env)
    (pred,) = out.glob("*.nii.gz")
    image = nib.load(zoo.data / "imagesTs" / "toy_0.nii.gz")
    seg = nib.load(pred)
    assert seg.shape[:3] == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= set(range(5))
    # without data: one line, no traceback, nothing written into the bundle
    before = sorted(p.relative_to(zoo.bundle) for p in zoo.bundle.rglob("*"))
    res = subprocess.run(
        [*map(str, cmd), "--dataset_dir", str(zoo.work / "absent")],
        cwd=zoo.bundle,
        env=zoo.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: dataset_dir ")
    assert sorted(p.relative_to(zoo.bundle) for p in zoo.bundle.rglob("*")) == before


def _torchscript_inference_without_scse_monai(zoo: SimpleNamespace, data: Path, out: Path) -> list[str]:
    configs = "['configs/inference.json','configs/inference_ts.json']"
    argv = ["monai.bundle", "run", "--config_file", configs, "--dataset_dir", str(data), "--output_dir", str(out)]
    code = (
        "import runpy, sys; sys.modules['scse_monai'] = None; "  # any import of scse_monai now fails
        f"sys.argv = {argv!r}; runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)"
    )
    return [str(zoo.py), "-c", code]


def test_torchscript_inference_needs_no_scse_monai(zoo: SimpleNamespace) -> None:
    out = zoo.work / "pred_ts"
    _sh(_torchscript_inference_without_scse_monai(zoo, zoo.data, out), cwd=zoo.bundle, env=zoo.env)
    assert len(list(out.glob("*.nii.gz"))) == 1


def test_torchscript_inference_refuses_non_finite_input(zoo: SimpleNamespace) -> None:
    """The MONAI-only input check of inference_ts.json: a NaN voxel fails naming the file, and nothing is written."""
    import nibabel as nib
    import numpy as np

    image = nib.load(zoo.data / "imagesTs" / "toy_0.nii.gz")
    voxels = np.asarray(image.dataobj, dtype=np.float32)
    voxels[1, 2, 3] = np.nan
    bad = zoo.work / "nan_data" / "imagesTs" / "toy_0.nii.gz"
    bad.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(voxels, image.affine), bad)
    out = zoo.work / "pred_ts_nan"
    cmd = _torchscript_inference_without_scse_monai(zoo, bad.parents[1], out)
    res = subprocess.run(cmd, cwd=zoo.bundle, env=zoo.env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert f"AssertionError: {bad}: expected a 3D image with 1 channel(s) and finite voxels" in res.stderr
    assert not out.exists() or not any(out.iterdir())

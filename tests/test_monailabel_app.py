"""Integration tests of the MONAI Label app against a live ``monailabel start_server`` on a loopback port.

The server runs in ``.venv-label`` (MONAI Label 0.8.5, pydicom 2, numpy 1) and is driven over HTTP from the core
environment. Studies are synthetic CHAOS-MR volumes prepared to NIfTI; two of three carry final labels for training.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scse_monai.networks import ensemble_size

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
LABEL_PY = REPO / ".venv-label" / "bin" / "python"
APP = REPO / "apps" / "monailabel"
MODEL = "scse_unet"
ORGANS = {"liver": 1, "right kidney": 2, "left kidney": 3, "spleen": 4}  # bundle metadata channel_def, written out
CHAOS_SAMPLE = REPO.parent / "shared" / "data" / "CHAOS_sample" / "Train_Sets"  # real data, optional
REAL_PATIENT = "3"
UPLOAD_MB = 1  # the server's upload limit in these tests
TRAIN_OPTIONS = {"max_epochs", "val_split", "device", "pretrained"}  # all a train request may set (lib/security.py)
DOCS = REPO / "docs" / "apps.md"
TRAINED = (BUNDLE / "models" / "model.pt").exists()

pytestmark = [
    pytest.mark.label,
    pytest.mark.slow,
    pytest.mark.skipif(not LABEL_PY.exists(), reason="needs .venv-label: run `make label-setup` (make test does)"),
    pytest.mark.skipif(not (BUNDLE / "configs" / "train.json").exists(), reason="bundle/configs not present"),
]


def _network(bundle_dir: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_dir)
    return parser


def _bundle_copy(dst: Path) -> Path:
    """The committed bundle's configs and weights; seeded random weights while no model.pt is committed."""
    shutil.copytree(BUNDLE / "configs", dst / "configs")
    (dst / "models").mkdir()
    if (BUNDLE / "models" / "model.pt").exists():
        shutil.copy(BUNDLE / "models" / "model.pt", dst / "models" / "model.pt")
    else:
        torch.manual_seed(0)
        net = _network(dst).get_parsed_content("network_def")
        torch.save(net.state_dict(), dst / "models" / "model.pt")
    return dst


def _real_case(tmp: Path) -> tuple[Path, Path] | None:
    """One real CHAOS T2-SPIR patient prepared to NIfTI (image, label), when the sample and trained weights exist."""
    from scse_monai.data import prepare_chaos

    patient = CHAOS_SAMPLE / "MR" / REAL_PATIENT
    if not (TRAINED and patient.is_dir()):
        return None
    (tmp / "real" / "MR").mkdir(parents=True)
    (tmp / "real" / "MR" / REAL_PATIENT).symlink_to(patient.resolve())
    prepare_chaos(tmp / "real", "mr-t2spir", tmp / "real_prepared", folds=1, workers=1, progress=False)
    (image,) = sorted((tmp / "real_prepared" / "imagesTr").glob("*.nii.gz"))
    return image, tmp / "real_prepared" / "labelsTr" / image.name


def _studies(tmp: Path) -> Path:
    from scse_monai.data import prepare_chaos, synthesize

    raw = synthesize("chaos-mr", tmp / "raw" / "Train_Sets", cases=3, seed=7, size=48, slices=(6, 6), progress=False)
    prepare_chaos(raw, "mr-t2spir", tmp / "prepared", folds=2, workers=1, progress=False)
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, image in enumerate(sorted((tmp / "prepared" / "imagesTr").glob("*.nii.gz"))):
        shutil.copy(image, studies / image.name)
        if i < 2:  # two labelled studies to train on, one without a label
            shutil.copy(tmp / "prepared" / "labelsTr" / image.name, studies / "labels" / "final" / image.name)
    real = _real_case(tmp)
    if real:  # unlabelled in the studies folder: only inferred, never trained on
        shutil.copy(real[0], studies / ("real_" + real[0].name))
    return studies


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(
    url: str, method: str = "GET", body: dict | list | None = None, timeout: float = 300, headers: dict | None = None
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    return _open(req, headers, timeout)[:2]


def _open(req: urllib.request.Request, headers: dict | None, timeout: float = 300) -> tuple[int, bytes, dict]:
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _upload(
    url: str,
    files: dict[str, tuple[str, bytes]],
    fields: dict[str, str] | None = None,
    method: str = "PUT",
    headers: dict | None = None,
) -> tuple[int, bytes]:
    """A multipart/form-data request, as MONAI Label clients send uploads."""
    boundary = "scse-test-boundary"
    parts = []
    for name, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, content) in files.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    return _open(req, headers)[:2]


def _declared_upload(url: str, length: int) -> tuple[int, bytes]:
    """A PUT that declares a ``length``-byte body and waits for the server's go-ahead (``Expect: 100-continue``),
    as curl does for large uploads. Sending the body regardless races the server's early 413 (the client can get
    a broken pipe instead of the answer); a server that said "continue" would leave this waiting until timeout."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("PUT", f"{parts.path}?{parts.query}")
        conn.putheader("Content-Type", "multipart/form-data; boundary=scse-test-boundary")
        conn.putheader("Content-Length", str(length))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _start_server(studies: Path, log: Path, conf: dict) -> tuple[subprocess.Popen, str]:
    """``monailabel start_server`` on a free loopback port with ``--conf`` pairs ``conf``; output goes to ``log``."""
    port = _free_port()
    cmd = [
        LABEL_PY, "-m", "monailabel.main", "start_server", "--app", APP,
        "--studies", studies, "--host", "127.0.0.1", "--port", port,
    ]  # fmt: skip
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    with log.open("w") as out:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _ready(proc: subprocess.Popen, url: str, log: Path) -> bool:
    """Poll ``/info/`` until the server answers (True) or its process exits (False); fail after 180 s."""
    deadline = time.monotonic() + 180
    while proc.poll() is None:
        try:
            if _request(f"{url}/info/", timeout=5)[0] == 200:
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server neither ready nor ended after 180 s:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # by PID: only the server this test started
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monailabel")
    bundle = _bundle_copy(tmp / "bundle")
    studies = _studies(tmp)
    workspace = tmp / "workspace"
    log = tmp / "server.log"
    proc, url = _start_server(studies, log, {"bundle": bundle, "workspace": workspace, "max_upload_mb": UPLOAD_MB})
    try:
        if not _ready(proc, url, log):
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        yield {
            "url": url, "studies": studies, "bundle": bundle, "workspace": workspace, "log": log,
            "real_label": tmp / "real_prepared" / "labelsTr",
        }  # fmt: skip
    finally:
        _stop(proc)


def test_info_lists_model_and_organ_labels(server):
    status, body = _request(f"{server['url']}/info/")
    assert status == 200
    info = json.loads(body)
    model = info["models"][MODEL]
    assert model["type"] == "segmentation"
    assert model["dimension"] == 3  # a 2D network served on volumes
    assert model["labels"] == ORGANS
    assert info["labels"] == ORGANS
    assert set(info["trainers"][MODEL]["config"]) == TRAIN_OPTIONS  # clients are shown what they may send
    documented = json.loads(_documented_output("$ curl -s http://127.0.0.1:8732/info/"))
    assert documented == {key: model[key] for key in documented}  # docs/apps.md shows what the server answers


def _documented_output(command: str) -> str:
    """The line that a console transcript in docs/apps.md shows right after ``command``."""
    lines = DOCS.read_text().splitlines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith(command)) + 1]


def _bundle_reference(server, image: Path) -> np.ndarray:
    """The bundle's own inference config on ``image`` in the core environment (same weights), as a label map."""
    parser = _network(server["bundle"])
    parser["postprocessing"]["transforms"] = [
        t for t in parser["postprocessing"]["transforms"] if "SaveImage" not in str(t.get("_target_", ""))
    ]
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(server["bundle"] / "models" / "model.pt", weights_only=True))
    data = parser.get_parsed_content("preprocessing")({"image": str(image)})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], net.eval())[0]
    return np.asarray(parser.get_parsed_content("postprocessing")(data)["pred"]).squeeze().astype(np.uint8)


def test_infer_returns_label_volume_on_the_image_grid(server, tmp_path):
    image = sorted(server["studies"].glob("chaos_*.nii.gz"))[-1]
    image_id = image.name[: -len(".nii.gz")]
    status, body = _request(f"{server['url']}/infer/{MODEL}?image={image_id}&output=image", method="POST")
    assert status == 200, body[-2000:]
    (tmp_path / "pred.nii.gz").write_bytes(body)
    pred, src = nib.load(tmp_path / "pred.nii.gz"), nib.load(image)
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
    labels = np.asarray(pred.dataobj)
    assert np.array_equal(labels, np.rint(labels)) and set(np.unique(labels)) <= {0, 1, 2, 3, 4}

    ref = _bundle_reference(server, image)
    agree = float(np.mean(labels.astype(np.uint8) == ref))
    assert agree >= 0.99, f"server and bundle inference agree on {agree:.4f} of the voxels"


@pytest.mark.skipif(not (TRAINED and CHAOS_SAMPLE.is_dir()), reason="needs committed weights and ../shared/data")
def test_trained_model_finds_the_organs_of_a_real_chaos_patient(server, tmp_path):
    (image,) = sorted(server["studies"].glob("real_*.nii.gz"))
    status, body = _request(f"{server['url']}/infer/{MODEL}?image={image.name[:-7]}&output=image", method="POST")
    assert status == 200, body[-2000:]
    (tmp_path / "pred.nii.gz").write_bytes(body)
    pred = np.asarray(nib.load(tmp_path / "pred.nii.gz").dataobj).astype(np.uint8)
    truth = np.asarray(nib.load(server["real_label"] / image.name[len("real_") :]).dataobj).astype(np.uint8)
    dice = {}
    for name, k in ORGANS.items():
        a, b = pred == k, truth == k
        dice[name] = 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
    print("served model vs CHAOS ground truth, Dice:", dice)
    assert min(dice.values()) >= 0.5, dice  # a loose floor: the bundle's own evaluation reports the real numbers


def test_unknown_model_or_image_is_404_and_server_keeps_serving(server):
    image_id = sorted(server["studies"].glob("*.nii.gz"))[0].name[: -len(".nii.gz")]
    status, body = _request(f"{server['url']}/infer/no_such_model?image={image_id}&output=image", method="POST")
    assert status == 404 and b"no_such_model" in body
    status, body = _request(f"{server['url']}/infer/{MODEL}?image=no_such_image&output=image", method="POST")
    assert status == 404 and b"no_such_image" in body
    assert _request(f"{server['url']}/info/")[0] == 200


def _finished_training(server) -> dict:
    """Polls ``/train/`` until the running training task is DONE or ERROR; returns the task."""
    deadline = time.monotonic() + 600
    while True:
        status, body = _request(f"{server['url']}/train/")
        task = json.loads(body)
        if status == 200 and task.get("status") in ("DONE", "ERROR"):
            return task
        assert time.monotonic() < deadline, f"training still running after 600 s: {task}"
        time.sleep(2)


def test_train_refuses_a_label_with_values_outside_the_classes(server):
    label = sorted((server["studies"] / "labels" / "final").glob("*.nii.gz"))[0]
    original, models = label.read_bytes(), server["workspace"] / "models"
    before = {p.name: p.stat().st_mtime_ns for p in models.glob("*.pt")}
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data.flat[0] = 9  # five classes: 0..4
    try:
        nib.save(nib.Nifti1Image(data, img.affine), label)
        status, body = _request(f"{server['url']}/train/{MODEL}", method="POST", body={"max_epochs": 1})
        assert status == 200, body[-2000:]
        task = _finished_training(server)
    finally:
        label.write_bytes(original)
    details = "\n".join(task.get("details", []))
    assert task["status"] == "ERROR" and f"label {label}: values outside 0..4" in details, details[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in models.glob("*.pt")} == before  # the served weights untouched
    # refused before the task wrote anything, even the ensemble member it would fine-tune
    assert not (server["workspace"] / "monailabel_train" / "pretrained_network_0.pt").exists()


def test_train_one_epoch_writes_a_checkpoint(server):
    models = server["workspace"] / "models"
    before = {p.name: p.stat().st_mtime_ns for p in models.glob("*.pt")}
    # asynchronous, as MONAI Label clients do: the server trains in a subprocess and keeps serving meanwhile
    status, body = _request(
        f"{server['url']}/train/{MODEL}", method="POST", body={"max_epochs": 1, "device": "cpu", "val_split": 0.5}
    )
    assert status == 200, body[-2000:]
    assert _request(f"{server['url']}/info/")[0] == 200
    task = _finished_training(server)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))

    epoch_ckpt = models / "checkpoint_epoch=1.pt"
    assert epoch_ckpt.exists(), sorted(p.name for p in models.iterdir())
    assert (models / "model.pt").stat().st_mtime_ns != before["model.pt"], "best-metric model.pt not rewritten"
    expected = set(_network(server["bundle"]).get_parsed_content("member_def").state_dict())
    state = torch.load(models / "model.pt", weights_only=True)
    state = state.get("model", state)
    assert set(state) == expected  # one network, fine-tuned from the first of the shipped ensemble
    assert not any(p.name.endswith(".partial") for p in models.iterdir())
    log = server["log"].read_text()
    assert "Fine-tuning on 1 labelled images" in log
    datalist = json.loads((server["workspace"] / "monailabel_train" / "datalist.json").read_text())
    assert set(datalist) == {"name", "labels", "training"}  # what train.json reads: no class counts it never uses
    metadata = json.loads((server["bundle"] / "configs" / "metadata.json").read_text())
    assert datalist["labels"] == metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    if ensemble_size(server["bundle"] / "models" / "model.pt") > 1:
        assert "holds an ensemble: fine-tuning its first network" in log
        assert "Add Checkpoint Loader for Path:" in log and "pretrained_network_0.pt" in log  # not from scratch

    # the server now serves the fine-tuned network: network_def is rebuilt for a model.pt of one network
    image_id = sorted(server["studies"].glob("chaos_*.nii.gz"))[-1].name[: -len(".nii.gz")]
    status, body = _request(f"{server['url']}/infer/{MODEL}?image={image_id}&output=image", method="POST")
    assert status == 200, body[-2000:]


def _nifti_bytes(tmp: Path, array: np.ndarray) -> bytes:
    path = tmp / "upload.nii.gz"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path.read_bytes()


def _outside_files(server) -> set[Path]:
    root = server["studies"].parent
    return {p for p in root.rglob("*") if p.is_file() and server["studies"] not in p.parents}


def test_datastore_ids_are_ids_not_paths(server, tmp_path):
    """Issue 16 item 1: nothing is written outside STUDIES, and the served weights cannot be replaced."""
    url, studies = server["url"], server["studies"]
    image_id = sorted(studies.glob("chaos_*.nii.gz"))[0].name[: -len(".nii.gz")]
    volume = _nifti_bytes(tmp_path, np.zeros((8, 8, 4), np.float32))
    model = server["workspace"] / "models" / "model.pt"
    before, model_bytes = _outside_files(server), model.read_bytes()
    for query in ("image=../escaped", "image=%2Ftmp%2Fescaped", "image=.scse_monai/bundle/models/model", "image=.x"):
        status, body = _upload(f"{url}/datastore/image?{query}", {"file": ("v.nii.gz", volume)})
        assert status == 400, (query, status, body)
    for tag in ("../../escaped", "final/../../x", ".hidden"):
        status, body = _upload(f"{url}/datastore/label?image={image_id}&tag={tag}", {"label": ("l.nii.gz", volume)})
        assert status == 400, (tag, status, body)
    status, body = _upload(f"{url}/datastore/label?image=../{image_id}", {"label": ("l.nii.gz", volume)})
    assert status == 400, body
    assert _request(f"{url}/datastore/image?image=../studies/{image_id}")[0] == 400
    assert _request(f"{url}/datastore/image?id=..", method="DELETE")[0] == 400
    assert _outside_files(server) - before == set()
    assert model.read_bytes() == model_bytes
    assert not list(studies.parent.glob("escaped*")) and not (studies / ".x.nii.gz").exists()


def test_cors_is_off_unless_allowed(server):
    """Issue 16 item 1: a web page on another origin can neither read nor drive the server."""
    url = server["url"]
    evil = {"Origin": "http://evil.example"}
    preflight = {**evil, "Access-Control-Request-Method": "PUT"}
    status, _, headers = _open(urllib.request.Request(f"{url}/datastore/image", method="OPTIONS"), preflight)
    assert status == 403 and "access-control-allow-origin" not in {k.lower() for k in headers}
    status, body = _request(f"{url}/info/", headers=evil)
    assert status == 403 and b"evil.example" in body
    image_id = sorted(server["studies"].glob("chaos_*.nii.gz"))[0].name[: -len(".nii.gz")]
    status, _ = _request(f"{url}/infer/{MODEL}?image={image_id}", method="POST", headers=evil)
    assert status == 403  # a "simple" cross-site POST is refused before it runs
    assert _request(f"{url}/info/", headers={"Origin": url})[0] == 200  # the server's own pages


def test_infer_accepts_only_datastore_ids(server, tmp_path):
    """Issue 16 item 2: no file outside the datastore is segmented, and existence of paths is not revealed."""
    url = server["url"]
    secret = tmp_path / "secret.nii.gz"
    secret.write_bytes(_nifti_bytes(tmp_path, np.ones((8, 8, 4), np.float32)))
    for image in (str(secret), "../studies/" + sorted(server["studies"].glob("chaos_*"))[0].name, "/no/such/file"):
        status, body = _request(f"{url}/infer/{MODEL}?image={urllib.parse.quote(image)}&output=image", method="POST")
        assert status == 400, (image, status, body[:300])
    image_id = sorted(server["studies"].glob("chaos_*.nii.gz"))[0].name[: -len(".nii.gz")]
    params = json.dumps({"image": str(secret)})
    status, body = _upload(f"{url}/infer/{MODEL}?image={image_id}&output=image", {}, {"params": params}, method="POST")
    assert status == 400, body[:300]
    status, body = _upload(
        f"{url}/infer/{MODEL}?output=image", {"file": ("x.nii.gz", secret.read_bytes())}, method="POST"
    )
    assert status == 400, body[:300]


def test_uploads_are_checked_and_errors_are_4xx(server, tmp_path):
    """Issue 16 item 11: unreadable or oversized uploads are refused, bad params are 400, never a bare 500."""
    url = server["url"]
    uploads_tmp = server["workspace"] / ".uploads-tmp"  # the server's temporary folder
    before = set(uploads_tmp.iterdir())
    junk = b"\x00not an image" * 1000
    status, body = _upload(f"{url}/datastore/image?image=junk", {"file": ("junk.nii.gz", junk)})
    assert status == 422 and b"junk" in body, (status, body)
    status, body = _declared_upload(f"{url}/datastore/image?image=big", UPLOAD_MB << 21)
    assert status == 413 and b"upload limit" in body, (status, body[:300])
    status, body = _upload(f"{url}/datastore/image?image=exe", {"file": ("x.exe", junk)})
    assert status == 415, (status, body)
    nan = np.zeros((8, 8, 4), np.float32)
    nan[0, 0, 0] = np.nan
    status, body = _upload(f"{url}/datastore/image?image=nan", {"file": ("nan.nii.gz", _nifti_bytes(tmp_path, nan))})
    assert status == 422 and b"non-finite" in body, (status, body)
    assert set(uploads_tmp.iterdir()) == before  # a refused upload's temporary file is removed
    ok = _nifti_bytes(tmp_path, np.zeros((8, 8, 4), np.float32))
    status, body = _upload(f"{url}/datastore/image?image=p", {"file": ("p.nii.gz", ok)}, {"params": "{not json"})
    assert status == 400 and b"JSON" in body, (status, body)
    status, body = _upload(f"{url}/datastore/label?image=no_such_image", {"label": ("l.nii.gz", ok)})
    assert status == 404, (status, body)
    # a known limitation, not a requirement: MONAI Label parses params after writing the upload, so that one file
    # stays (in the workspace, not the system's temp folder) until the next start
    assert len(set(uploads_tmp.iterdir()) - before) == 1
    image_id = sorted(server["studies"].glob("chaos_*.nii.gz"))[0].name[: -len(".nii.gz")]
    status, body = _upload(f"{url}/infer/{MODEL}?image={image_id}", {}, {"params": "{not json"}, method="POST")
    assert status == 400 and b"JSON" in body, (status, body)
    listed = json.loads(_request(f"{url}/datastore/?output=all")[1])
    assert not {"junk", "big", "exe", "nan", "p"} & set(listed.get("objects", listed))
    assert not list(server["studies"].glob("junk*")) and not list(server["studies"].glob("nan*"))
    assert _request(f"{url}/info/")[0] == 200


def _train_tasks(url: str) -> int:
    """How many train tasks the server has run or is running (MONAI Label answers 404 while there are none)."""
    status, body = _request(f"{url}/train/?all=true")
    return len(json.loads(body)) if status == 200 else 0


def test_train_takes_only_the_documented_options(server, tmp_path):
    """A train request sets max_epochs, val_split, device and pretrained, with valid values: no weights path,
    no tracking target, no bundle run id; a refused request never reaches the train task."""
    url = server["url"]
    secret = tmp_path / "secret.pt"
    torch.save({}, secret)
    refused = [
        ({"model_filename": str(secret)}, "model_filename"),
        ({"max_epochs": 1, "tracking": "mlflow", "tracking_uri": (tmp_path / "mlruns").as_uri()}, "tracking"),
        ({"run_id": "initialize"}, "run_id"),
        ({"max_epochs": "1"}, "max_epochs"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"val_split": 1.5}, "val_split"),
        ({"device": str(secret)}, "device"),
        ({"pretrained": "yes"}, "pretrained"),
    ]
    tasks_before = _train_tasks(url)
    for body, key in refused:
        status, answer = _request(f"{url}/train/{MODEL}", method="POST", body=body)
        assert status == 400 and f"train option '{key}'".encode() in answer, (body, status, answer)
    status, answer = _request(f"{url}/train/", method="POST", body={MODEL: {"model_filename": str(secret)}})
    assert status == 400 and MODEL.encode() in answer, (status, answer)
    assert _request(f"{url}/train/{MODEL}", method="POST", body=[1])[0] == 400
    assert str(secret) not in server["log"].read_text()
    assert _train_tasks(url) == tasks_before  # no refused request started a training


def test_the_trainer_passes_on_client_options_only_with_defaults_and_can_train_from_scratch(tmp_path):
    """Behind the HTTP guard, the train task itself drops keys that are not train options, fills in the defaults
    ``/info/`` shows, and ``pretrained: false`` adds no checkpoint loader (MONAI Label 0.8.5 fails there)."""
    bundle = _bundle_copy(tmp_path / "bundle")
    code = f"""
import json, sys
sys.path.insert(0, {str(APP)!r})
from monailabel.tasks.train.bundle import BundleTrainTask
from lib.trainers import BundleSegmentationTrainTask
seen = {{}}
BundleTrainTask.__call__ = lambda self, request, datastore: seen.update(request) or {{}}
task = BundleSegmentationTrainTask({str(bundle)!r}, {{}})
task({{"model": "{MODEL}", "max_epochs": 2, "model_filename": "/x.pt", "tracking_uri": "/y", "run_id": "r"}}, None)
scratch, pretrained = [], []
task._load_checkpoint({str(bundle / "models" / "model.pt")!r}, False, scratch)
task._load_checkpoint({str(bundle / "models" / "model.pt")!r}, True, pretrained)
print("RESULT " + json.dumps({{"request": seen, "scratch": scratch, "pretrained": pretrained}}))
"""
    res = subprocess.run([str(LABEL_PY), "-c", code], capture_output=True, text=True, timeout=300, cwd=APP)
    assert res.returncode == 0 and "RESULT " in res.stdout, res.stderr[-3000:]
    result = json.loads(res.stdout.rsplit("RESULT ", 1)[1])
    assert result["request"] == {"model": MODEL, "max_epochs": 2, "val_split": 0.2, "multi_gpu": False}
    assert result["scratch"] == []
    assert [h["_target_"] for h in result["pretrained"]] == ["CheckpointLoader"]


def test_weights_and_sessions_are_out_of_reach(server, tmp_path):
    """Nobody replaces, deletes or downloads the served weights, and no upload lands outside STUDIES."""
    url = server["url"]
    model = server["workspace"] / "models" / "model.pt"
    weights, before = model.read_bytes(), _outside_files(server)
    status, body = _upload(f"{url}/model/{MODEL}", {"file": ("model.pt", b"small: sent before the answer")})
    assert status == 403 and b"weights" in body, (status, body[:300])
    status, body = _request(f"{url}/model/{MODEL}")
    assert status == 403 and b"weights" in body, (status, body[:300])
    assert _request(f"{url}/model/{MODEL}", method="DELETE")[0] == 403
    assert model.read_bytes() == weights and not list(model.parent.glob("*.deleted"))
    volume = _nifti_bytes(tmp_path, np.zeros((8, 8, 4), np.float32))
    status, body = _upload(f"{url}/session/", {"files": ("v.nii.gz", volume)})
    assert status == 403 and b"session" in body, (status, body[:300])
    assert _request(f"{url}/session/some_id")[0] == 403
    assert _request(f"{url}/session/some_id", method="DELETE")[0] == 403
    assert _outside_files(server) - before == set()


@pytest.mark.parametrize("route", ["/logs/", "/logs/?text=true&lines=5", "/logs/gpu", "/proxy/dicom/wado/studies"])
def test_log_and_proxy_routes_are_refused(server, route):
    """The server's log (paths, request details) is not served, nor nvidia-smi run, nor a DICOMweb proxy."""
    status, body = _request(f"{server['url']}{route}")
    assert status == 403 and json.loads(body)["detail"].startswith(f"GET {route.split('?')[0]}:"), (status, body[:300])


def test_refused_routes_are_not_in_the_api_schema(server):
    status, body = _request(f"{server['url']}/openapi.json")
    firsts = {path.split("/")[1] for path in json.loads(body)["paths"]}
    assert status == 200 and "infer" in firsts and "datastore" in firsts, firsts
    assert not firsts & {"model", "session", "logs", "proxy"}, firsts


@pytest.mark.parametrize("value", ["abc", "-1"])
def test_bad_max_upload_mb_stops_the_server_naming_the_key(tmp_path, value):
    """``max_upload_mb`` must be a finite number > 0: else the app does not start, names the key and writes nothing."""
    (tmp_path / "studies").mkdir()
    workspace, log = tmp_path / "workspace", tmp_path / "server.log"
    conf = {"bundle": BUNDLE, "workspace": workspace, "max_upload_mb": value}
    proc, url = _start_server(tmp_path / "studies", log, conf)
    try:
        assert not _ready(proc, url, log), f"the server started with max_upload_mb {value}"
    finally:
        _stop(proc)
    assert proc.returncode != 0
    message = f"ValueError: --conf max_upload_mb '{value}': must be a finite number of MiB greater than 0"
    assert message in log.read_text().splitlines(), log.read_text()[-3000:]
    assert not workspace.exists()

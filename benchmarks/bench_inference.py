"""Benchmark: bundle inference latency for one 256 x 256 x 40 MR volume (issue 6, §3 d).

The bundle's ``inference.json`` is parsed as shipped (features 32, 3x3, scSE, 2 mm in-plane resampling, 160 x 160
``SliceInferer``), with random weights (latency does not depend on the weights) and one network: the shipped
``model.pt`` is an ensemble of two, whose network stage takes twice as long, at the same SE ratio. The volume is
a synthetic T2-like NIfTI of 256 x 256 x 40 voxels at 1.25 x 1.25 x 7.7 mm (CHAOS T2-SPIR geometry). Stages timed,
interleaved:

- ``preprocessing``: load NIfTI, orientation, spacing, intensity normalisation;
- ``network_<se>``: ``SliceInferer`` + network on the preprocessed volume, for the shipped ``scse`` and
  for ``se=None`` (same weights in the shared layers), so the SE cost shows as a ratio;
- ``postprocessing``: softmax, inversion to the original grid, argmax, NIfTI writing.

``end_to_end_s`` = preprocessing + network_scse + postprocessing (medians), what ``monai.bundle run`` spends per
volume after start-up (a separate end-to-end candidate would only add another long measurement per repetition).

On a GPU (when one is present) the network runs under AMP in ``channels_last`` memory format; on CPU in float32.
Both can be asked for on CPU too (``run(amp=True, channels_last=True)``: bfloat16 autocast), which is how the
tests exercise that path on a machine without a GPU.

Run: ``python -m benchmarks.run --only inference [--quick]``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

from benchmarks.timing import compare_times

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SHAPE = (256, 256, 40)
SPACING = (1.25, 1.25, 7.7)  # CHAOS T2-SPIR: 256 x 256 at 1.25 mm, 7.7 mm slices


def synthetic_volume(path: Path, shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> Path:
    """Writes a smooth T2-like volume (an ellipse body with brighter blobs and noise) as NIfTI."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = ((x / 0.85) ** 2 + (y / 0.65) ** 2 < 1).astype(np.float32) * 300
    vol = np.repeat(body[..., None], shape[2], axis=2)
    for _ in range(6):
        cx, cy, r = rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.4), rng.uniform(0.08, 0.25)
        vol[((x - cx) ** 2 + (y - cy) ** 2 < r**2)] += rng.uniform(100, 600)
    vol += rng.normal(0, 20, vol.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([*SPACING, 1.0])), str(path))
    return path


def _parser(output_dir: str, se: str, features: int) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update(
        {"bundle_root": str(BUNDLE), "output_dir": output_dir, "se": se, "features": features, "ensemble_size": 1}
    )
    return parser


def run(quick: bool = False, amp: bool | None = None, channels_last: bool | None = None) -> dict:
    """Times the bundle's inference stages on one synthetic 256 x 256 x 40 volume.

    Args:
        quick: 8 slices, features 8, 1 repetition (a smoke run, not a measurement); otherwise 40 slices, the
            shipped features 32, 3 repetitions.
        amp: run the network under autocast (float16 on CUDA, bfloat16 on CPU); default: on a GPU only.
        channels_last: convert the networks to ``channels_last``; default: on a GPU only.
    """
    features = 8 if quick else 32
    repeats = 1 if quick else 3
    shape = (*SHAPE[:2], 8) if quick else SHAPE
    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    amp = cuda if amp is None else amp
    channels_last = cuda if channels_last is None else channels_last
    with tempfile.TemporaryDirectory() as tmp:
        image = synthetic_volume(Path(tmp) / "mr_t2.nii.gz", shape)
        parsers = {se: _parser(str(Path(tmp) / "out"), se, features) for se in ("scse", "none")}
        p = parsers["scse"]
        pre = p.get_parsed_content("preprocessing")
        post = p.get_parsed_content("postprocessing")
        inferer = p.get_parsed_content("inferer")
        nets = {}
        torch.manual_seed(0)
        for se, parser in parsers.items():
            net = parser.get_parsed_content("network_def").to(device).eval()
            if nets:
                net.load_state_dict(next(iter(nets.values())).state_dict(), strict=False)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)
            nets[se] = net
        sample = pre({"image": str(image)})
        x = sample["image"][None].to(device)

        def infer(net: torch.nn.Module, volume: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device.type, enabled=amp):
                out = inferer(volume, net)
            if cuda:
                torch.cuda.synchronize()
            return out

        # what the network actually ran with: the dtype of its own outputs (the inferer's buffer is float32) and
        # the memory format of a kxk convolution weight with several input channels
        dtypes: set[str] = set()
        hook = nets["scse"].register_forward_hook(lambda mod, args, out: dtypes.add(str(out.dtype)))
        pred = infer(nets["scse"], x)
        hook.remove()
        output_dtype = ", ".join(sorted(d.removeprefix("torch.") for d in dtypes))
        conv_weight = next(p for p in nets["scse"].parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        weights_channels_last = conv_weight.is_contiguous(memory_format=torch.channels_last)

        def postprocess() -> None:
            post({**sample, "pred": pred[0].float().cpu()})

        cands = {
            "preprocessing": lambda: pre({"image": str(image)}),
            "network_scse": lambda: infer(nets["scse"], x),
            "network_none": lambda: infer(nets["none"], x),
            "postprocessing": postprocess,
        }
        # the scSE network ran once above; one more untimed pass of each stage would double a full run's time
        times = compare_times(cands, repeats=repeats, warmup=0)
        written = sorted((Path(tmp) / "out").glob("*.nii.gz"))
        assert written, "postprocessing wrote no segmentation"
        out_shape = tuple(nib.load(written[0]).shape[:3])
    rows = [
        {"stage": name, "median_s": round(t["median_s"], 3), "min_s": round(t["min_s"], 3)} for name, t in times.items()
    ]
    for row in rows:
        print(f"  inference {row['stage']:15s} median {row['median_s']:8.3f} s")
    return {
        "benchmark": "inference",
        "quick": quick,
        "device": str(device),
        "amp": amp,
        "channels_last": channels_last,
        "weights_channels_last": weights_channels_last,
        "network_output_dtype": output_dtype,
        "volume": f"{shape[0]}x{shape[1]}x{shape[2]} @ {SPACING} mm",
        "network_input": "x".join(str(v) for v in x.shape[1:]),
        "output_shape": "x".join(map(str, out_shape)),
        "features": features,
        "repetitions": repeats,
        "end_to_end_s": round(
            sum(times[k]["median_s"] for k in ("preprocessing", "network_scse", "postprocessing")), 3
        ),
        "torch_threads": torch.get_num_threads(),
        "scse_over_none_network": round(times["network_scse"]["median_s"] / times["network_none"]["median_s"], 3),
        "rows": rows,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=2, default=str))

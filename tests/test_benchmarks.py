"""The benchmarks' code paths that the default test machine would otherwise never take (no timing is asserted)."""

from __future__ import annotations

import pytest

from benchmarks import bench_inference


@pytest.mark.slow
def test_inference_benchmark_gpu_settings_run_on_cpu():
    # AMP and channels_last are what the benchmark uses on a GPU; on CPU they mean bfloat16 autocast, so the path
    # (channels_last networks with in-place SE blocks, autocast inference, float post-processing) is exercised here
    result = bench_inference.run(quick=True, amp=True, channels_last=True)
    assert result["weights_channels_last"] is True
    assert result["network_output_dtype"] == "bfloat16"  # the network ran under autocast
    assert result["output_shape"] == "256x256x8"  # the segmentation was written on the original grid

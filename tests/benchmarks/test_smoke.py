"""The data-throughput benchmark runs end to end on a few samples (no timing is checked)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "data_throughput.py"


def test_data_throughput_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("data_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--samples", "16", "--repeats", "1", "--workers", "0", "--out-dir", str(tmp_path)])
    for name in ("ours_samples_per_s", "open_clip_samples_per_s", "naive_samples_per_s", "speedup"):
        assert result[name] > 0
    assert len(list(tmp_path.glob("photos-*.tar"))) == result["shards"]

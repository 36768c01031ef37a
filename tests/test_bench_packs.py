"""bench/packs.py on a tiny config: the result structure and its checks."""


import packs  # bench/packs.py; bench/ is on pytest's pythonpath.


def test_tiny_packs_bench_measures_size_switch_and_latency(tmp_path):
    config = packs.Config(alpha=0.35, image_size=32, classes=3,
                          presets=("float32", "int8"), batchnorm=("train",),
                          hidden_units=8, calibration_samples=4, repeats=1,
                          latency_runs=2, latency_rounds=1)
    results = packs.measure(config, tmp_path)
    assert list(results["presets"]) == ["float32", "int8"]
    for preset, entry in results["presets"].items():
        assert entry["template_bytes"] > 0 and entry["plan_bytes"] > 0
        assert [row["batchnorm"] for row in entry["rows"]] == ["train"]
        for row in entry["rows"]:
            assert row["batchnorm_in_pack"], preset
            assert 0 < row["pack_bytes"] < row["task_tflite_bytes"]
            assert 0 < row["pack_to_tflite"] < 1
            assert row["applied_equals_conversion"] is True, preset
            assert all(row["switch"][key] > 0 for key in
                       ("apply_ms", "interpreter_ms", "switch_ms"))
            assert row["latency"]["ratio"] > 0
    markdown = packs.markdown(results)
    assert markdown.count("| yes |") == 2
    assert "| int8 | train |" in markdown

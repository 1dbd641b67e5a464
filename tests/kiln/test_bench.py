import json

import pytest
from click.testing import CliRunner

from kiln.cli import cli


def test_bench_json_and_plot(engine_dir, tmp_path):
    import matplotlib.image

    engines = [str(engine_dir("tiny-gpt2")), str(engine_dir("tiny-llama"))]
    args = ["bench", *engines, "--reference", "--compiled-reference", "--prompt-lengths", "8,300", "--batches", "1,2", "--new-tokens", "4",
            "--rounds", "2", "--plot", str(tmp_path / "bench.png"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [e["label"] for e in report["engines"]] == ["pytorch eager", "torch.compile", "tiny-gpt2 (cpu/fp32)",
                                                        "tiny-llama (cpu/fp32)"]
    assert report["read_bandwidth_gb_s"] > 0 and report["machine"]["cores"] >= 1
    for entry in report["engines"]:
        assert entry["decode_tok_s"]["1"]["runs"] == 2 and entry["decode_tok_s"]["2"]["median"] > 0
        assert set(entry["prefill_ms"]) == {"8"}  # 300 is past the presets' 256 positions: skipped
        assert entry["first_token_ms"]["median"] > 0
    onnx_entry = report["engines"][2]
    assert onnx_entry["size_bytes"] > onnx_entry["weight_bytes"] > 0
    rounds = report["read_bandwidth_gb_s_rounds"]
    assert len(rounds) == 2 and report["read_bandwidth_gb_s"] == pytest.approx(sum(rounds) / 2, rel=1e-9)
    assert onnx_entry["floor_tok_s"] == pytest.approx(report["read_bandwidth_gb_s"] * 1e9 / onnx_entry["weight_bytes"], rel=1e-9)
    # The share of the floor is taken round by round, so it lies between the extremes of rate over floor.
    decode, weights = onnx_entry["decode_tok_s"]["1"], onnx_entry["weight_bytes"]
    assert decode["min"] * weights / (max(rounds) * 1e9) <= onnx_entry["floor_share_b1"] <= decode["max"] * weights / (min(rounds) * 1e9)
    assert report["engines"][0]["floor_share_b1"] is None  # the reference reads no engine weights
    assert report["engines"][0]["vs_first"]["decode_b1"] == 1.0
    image = matplotlib.image.imread(tmp_path / "bench.png")
    assert image.shape[0] > 200 and image.shape[1] > 400


def test_bench_rejects_bad_lists(engine_dir):
    result = CliRunner().invoke(cli, ["bench", str(engine_dir("tiny-gpt2")), "--batches", "1,x"])
    assert result.exit_code == 2 and "--batches: expected comma-separated integers, got '1,x'" in result.output

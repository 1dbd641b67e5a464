"""`kiln convert tiny-sd` builds a verified engine in Optimum's layout; `kiln generate` writes its image as PNG."""
import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

import kiln
from kiln.cli import cli
from kiln.images import png_bytes

pytest.importorskip("diffusers")
KILN = [sys.executable, "-c", "from kiln.cli import main; main()"]


def test_the_engine_is_in_optimum_s_layout_with_the_kind_s_manifest(sd_engine):
    manifest = json.loads((sd_engine / "manifest.json").read_text())
    assert manifest["kind"] == "diffusion" and manifest["tokenizer"] == "tokenizer"
    assert {role: graph["file"] for role, graph in manifest["graphs"].items()} == {
        "text_encoder": "text_encoder/model.onnx", "unet": "unet/model.onnx", "vae_decoder": "vae_decoder/model.onnx"}
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "text_encoder/config.json", "unet/config.json", "vae_decoder/config.json"):
        assert name in manifest["files"], name
    assert json.loads((sd_engine / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert json.loads((sd_engine / "vae_decoder" / "config.json").read_text())["scaling_factor"] == 0.18215
    pipeline = manifest["pipeline"]
    assert (pipeline["vae_scaling_factor"], pipeline["latent_multiple"], pipeline["default_size"]) == (0.18215, 2, 32)
    # Each graph optimized by the recipe: the UNet's and CLIP's attention fused.
    fused = [p["fused"] for p in manifest["passes"] if p["name"] == "fusion"]
    assert any(f.get("com.microsoft::MultiHeadAttention") for f in fused) and any(f.get("com.microsoft::Attention") for f in fused)


def test_verification_checks_every_graph_at_two_shapes_and_the_image_against_diffusers(sd_engine):
    report = json.loads((sd_engine / "manifest.json").read_text())["verification"]
    assert report["passed"] is True and report["precision"] == "fp32"
    assert [s["batch"] for s in report["shapes"]] == [2, 1]  # the guidance batch, then one non-square image
    assert report["shapes"][1]["latent_height"] != report["shapes"][1]["latent_width"]
    for role, outputs in report["components"].items():
        assert all(e["relative"] <= 1e-4 for e in outputs.values()), role
    end_to_end = report["end_to_end"]
    assert (end_to_end["scheduler"], end_to_end["steps"], end_to_end["guidance"]) == ("ddim", 4, 7.5)
    assert end_to_end["max_pixel_error"] <= 1 and end_to_end["max_abs"] < 1e-4


def test_generate_writes_the_engine_s_image_as_png(sd_engine, tmp_path):
    done = CliRunner().invoke(cli, ["generate", str(sd_engine), "--prompt", "a red square", "-o", str(tmp_path / "x.png"),
                                    "--steps", "3", "--seed", "4", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["image"] == str(tmp_path / "x.png")
    with kiln.load(sd_engine) as engine:
        want = engine.generate_image("a red square", steps=3, seed=4)[0]
    assert read_png(tmp_path / "x.png").tolist() == want.tolist()


def test_the_png_writer_without_pillow_gives_the_same_pixels():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert read_png_bytes(png_bytes(image)).tolist() == image.tolist()


def test_a_bad_size_exits_2_with_one_line(sd_engine, tmp_path):
    done = subprocess.run([*KILN, "generate", str(sd_engine), "--prompt", "a cat", "-o", str(tmp_path / "x.png"),
                           "--height", "30"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0
    assert "error: height 30: expected a multiple of 4 pixels from 4 to 1024" in done.stderr
    assert not (tmp_path / "x.png").exists()
    done = CliRunner().invoke(cli, ["generate", str(sd_engine), "--prompt", "a cat", "-o", str(tmp_path / "x.png"),
                                    "--scheduler", "lms"])
    assert done.exit_code == 2 and "error: scheduler 'lms': expected one of ddim, euler, dpm++2m" in done.output


def test_a_precision_without_a_gate_is_refused(tmp_path):
    done = CliRunner().invoke(cli, ["convert", "tiny-sd", "--precision", "int4", "-o", str(tmp_path / "e")])
    assert done.exit_code == 2
    assert "a diffusion engine at precision 'int4' has no verification gate yet (supported: fp32, int8)" in done.output
    assert not (tmp_path / "e").exists()


def test_int8_is_gated_on_psnr_and_ssim_against_diffusers(sd_engine, sd_source, tmp_path):
    """The engine's UNet quantized by the cpu/int8 recipe's last pass, verified as convert verifies int8."""
    import onnx_ir as ir

    from kiln.verify_diffusion import verify
    from optimizers import PASSES, PassContext, save
    from runtimes.onnxruntime_adapter import OnnxRuntimePredictor
    from runtimes.text_to_image import DiffusionPredictor

    fp32 = kiln.load(sd_engine)
    context = PassContext(target="cpu", recipe="cpu", precision="int8")
    unet, report = PASSES["int8_dynamic"](ir.load(str(sd_engine / "unet" / "model.onnx")), context)
    assert report.quantized["MatMulInteger"] > 0
    save(unet, tmp_path / "unet.onnx")
    int8 = DiffusionPredictor({**fp32.components, "unet": OnnxRuntimePredictor(tmp_path / "unet.onnx")}, fp32.facts,
                              fp32.scheduler_config, fp32.tokenizer)
    report = verify(int8, sd_source, "int8")
    e2e = report["end_to_end"]
    assert report["passed"] is True and 35 <= e2e["psnr"] < 80 and 0.98 <= e2e["ssim"] < 1
    assert report["components"]["unet"]["out_sample"]["relative"] > 1e-4  # reported, not gated
    # The same engine held to fp32's gates fails them: the gates tell int8 from fp32.
    assert verify(int8, sd_source, "fp32")["passed"] is False


def test_inspect_and_verify_read_the_kind_s_report(sd_engine, tmp_path):
    shown = CliRunner().invoke(cli, ["inspect", str(sd_engine), "--report", str(tmp_path / "report.md")])
    assert shown.exit_code == 0, shown.output
    assert "verified    passed; graphs within" in shown.output and "file        unet/model.onnx" in shown.output
    page = (tmp_path / "report.md").read_text()
    assert "| unet.out_sample |" in page and "end to end (ddim, 4 steps, guidance 7.5)" in page
    checked = CliRunner().invoke(cli, ["verify", str(sd_engine), "--json"])
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["verification"]["end_to_end"]["max_pixel_error"] <= 1


def test_bench_measures_unet_steps_and_images_beside_diffusers(sd_engine):
    done = CliRunner().invoke(cli, ["bench", str(sd_engine), "--reference", "--rounds", "1", "--steps", "2", "--size", "24",
                                    "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert [e["label"] for e in report["engines"]] == ["diffusers eager", f"{sd_engine.name} (cpu/fp32)"]
    assert report["image"] == {"height": 24, "width": 24, "unet_batch": 2}
    for entry in report["engines"]:
        # Timed apart from the images: on a loaded machine a step's time can exceed an image's, so no order between them.
        assert entry["unet_step_ms"]["runs"] == 1 and entry["unet_step_ms"]["median"] > 0 and entry["image_s"]["median"] > 0


def read_png(path) -> np.ndarray:
    return read_png_bytes(path.read_bytes())


def read_png_bytes(data: bytes) -> np.ndarray:
    """The pixels of an 8-bit RGB PNG, each row's filter undone (Pillow picks among the five)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, idat = 8, {}, b""
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        chunks[kind] = body
        idat += body if kind == b"IDAT" else b""
        position += 12 + length
    width, height = int.from_bytes(chunks[b"IHDR"][:4], "big"), int.from_bytes(chunks[b"IHDR"][4:8], "big")
    assert chunks[b"IHDR"][8:10] == bytes([8, 2])
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * 3)
    rows = np.zeros((height, width * 3), np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        previous = rows[y - 1] if y else np.zeros(width * 3, np.int32)
        out = np.zeros(width * 3, np.int32)
        for x in range(width * 3):
            left = out[x - 3] if x >= 3 else 0
            up, corner = previous[x], (previous[x - 3] if x >= 3 else 0)
            if kind == 0:
                predicted = 0
            elif kind == 1:
                predicted = left
            elif kind == 2:
                predicted = up
            elif kind == 3:
                predicted = (left + up) // 2
            else:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predicted = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            out[x] = (line[x] + predicted) % 256
        rows[y] = out
    return rows.reshape(height, width, 3).astype(np.uint8)

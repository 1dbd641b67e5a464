"""A Stable Diffusion 1.5-shaped pipeline with random weights, and seconds per UNet step of its engines.

    PYTHONPATH=. /usr/bin/time -v .venv/bin/kiln convert benchmarks.sd15_unet:pipeline --no-verify -o build/sd15-cpu-fp32
    PYTHONPATH=. .venv/bin/kiln convert benchmarks.sd15_unet:pipeline --no-verify --precision int8 -o build/sd15-cpu-int8
    .venv/bin/python benchmarks/sd15_unet.py build/sd15-cpu-fp32 build/sd15-cpu-int8 [--rounds 2]

`pipeline()` builds SD 1.5's component configs (CLIP ViT-L/14 text encoder, the 860M-parameter UNet, the
VAE) from configs alone, seeded; its tokenizer is the small hand-built CLIP tokenizer of the tiny preset (the
text encoder keeps SD's 49408-token vocabulary). The benchmark runs one UNet step at 512 px with guidance
(batch 2, latents [2, 4, 64, 64], text [2, 77, 768]) in eager PyTorch and in each engine's UNet graph, the
variants interleaved round by round after a warm-up; medians. Each engine's output is compared with eager's
(max difference over eager's output range: fp32's verification allows 1e-4). Full-pipeline verification at
this size takes tens of minutes on two cores, hence `--no-verify` here (recorded in the manifest); tiny-sd
verifies in CI.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SD15 = dict(
    text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=512, layers_per_block=2),
    scheduler=dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1),
    tokenizer=dict(words=["red", "green", "blue", "square", "circle", "photo", "cat"], model_max_length=77),
)


def pipeline():
    from exporter.diffusion import build_preset
    from exporter.presets import Preset

    preset = Preset("stable-diffusion", SD15, "Stable Diffusion 1.5-shaped, random weights", kind="diffusion")
    pipe = build_preset("sd15", preset)
    return pipe


def main() -> None:
    import torch

    import runtimes
    from kiln.backends import backend_named
    from runtimes.engine_dir import read_manifest

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engines", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
             "timestep": np.array(500.0, dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}
    unet = pipeline().unet.eval()
    variants = {"pytorch eager": lambda: unet(torch.from_numpy(feeds["sample"]), torch.tensor(500.0),
                                              torch.from_numpy(feeds["encoder_hidden_states"])).sample.numpy()}
    for engine in args.engines:  # each engine's UNet through its own adapter (ONNX Runtime, AOTInductor)
        backend = backend_named(read_manifest(engine)["backend"])
        predictor = runtimes.load(engine, trust_native_code=True, **backend.bench_options(args.threads))
        unet_graph = predictor.components["unet"]
        variants[engine.name] = lambda graph=unet_graph: graph.forward(feeds)["out_sample"]
    times = {name: [] for name in variants}
    outputs = {}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):
            for name, run in variants.items():
                start = time.perf_counter()
                output = run()
                if round_:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
                else:
                    outputs[name] = output
                print(f"round {round_} {name}: {time.perf_counter() - start:.1f} s", flush=True)
    eager = statistics.median(times["pytorch eager"])
    reference = outputs.pop("pytorch eager")  # each engine's max difference from it, over its range:
    errors = {name: np.abs(output - reference).max() / np.ptp(reference) for name, output in outputs.items()}
    print("\n| variant | s per UNet step (512 px, batch 2) | x eager | max error / output range |\n"
          "| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        error = f"{errors[name]:.1e}" if name in errors else "(reference)"
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / eager:.2f} | {error} |")


if __name__ == "__main__":
    main()

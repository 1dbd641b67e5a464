"""Verification from the source's recorded steps (what a conversion does, to let the source go before the engine
is opened) reads as verification with the source at hand; the logits figures taken in chunks equal whole ones."""
from dataclasses import replace

import numpy as np


def test_recorded_steps_verify_as_the_live_source(engine_dir):
    import runtimes
    from exporter import load_model
    from kiln.verify import record_decoder, verify_decoder

    loaded = load_model("tiny-llama")
    with runtimes.load(engine_dir("tiny-llama")) as engine:
        live = verify_decoder(engine, loaded, "fp32")
        recorded = record_decoder(loaded, {role: g.signature for role, g in engine.graphs.items()})
        from_record = verify_decoder(engine, replace(loaded, module=None), "fp32", recorded=recorded)
    assert live["passed"] and from_record == live


def test_logits_figures_taken_in_chunks_equal_the_whole():
    from kiln.verify import logits_fidelity

    rng = np.random.default_rng(3)
    want = rng.normal(size=(37, 500)).astype(np.float32)  # 37 positions: two chunks of 16 and a rest
    got = want + rng.normal(scale=0.05, size=want.shape).astype(np.float32)
    want[5, :2], got[5] = (10.0, 9.0), want[5]  # one decisive position (margin 1, error 0.6) whose top-1 differs
    got[5, :2] = (9.4, 9.6)
    figures = logits_fidelity(got, want)

    g, w = got.astype(np.float64), want.astype(np.float64)
    error = np.abs(g - w).max(axis=-1)
    top2 = np.sort(w, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > error
    agree = g.argmax(-1) == w.argmax(-1)
    log_p = w - w.max(-1, keepdims=True) - np.log(np.exp(w - w.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_q = g - g.max(-1, keepdims=True) - np.log(np.exp(g - g.max(-1, keepdims=True)).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    assert figures["decisive_positions"] == int(decisive.sum()) and figures["near_ties"] == int((~decisive).sum())
    assert figures["top1_agreement"] == float(agree[decisive].mean()) < 1.0
    assert np.isclose(figures["kl_mean"], kl.mean()) and np.isclose(figures["kl_max"], kl.max())


def test_convert_keeps_a_factorys_model_and_lets_its_own_loads_go(tmp_path):
    """A factory's model may be its caller's own: convert leaves its weights; a preset it loaded itself it frees
    after the export (recorded steps verify the engine)."""
    import kiln
    from tests.factories import shared_tiny_gpt2

    model = shared_tiny_gpt2()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = kiln.convert("tests.factories:shared_tiny_gpt2", output=tmp_path / "engine")
    assert result.manifest["verification"]["passed"]
    assert all(not p.is_meta and p.equal(before[name]) for name, p in model.named_parameters())
    assert [s["name"] for s in result.steps][2] == "reference"

"""The verification inputs fit the model's context."""
from kiln.verify import VerificationInputs


def test_inputs_shrink_to_a_short_context_keeping_decode_steps():
    inputs = VerificationInputs()
    assert inputs.within(None) == inputs and inputs.within(4096) == inputs
    short = inputs.within(20)
    assert short.prompt + short.decode_steps == 20 and short.decode_steps >= 1
    assert (short.batch, short.seed) == (inputs.batch, inputs.seed)
    assert VerificationInputs(prompt=32, decode_steps=8).within(2) == VerificationInputs(prompt=1, decode_steps=1)


def test_inputs_fit_the_engines_profile():
    """`--profile batch=1` (TensorRT, ONNX Runtime's TensorRT provider): verification feeds what the engine takes."""
    from types import SimpleNamespace

    from kiln.verify import verification_inputs
    from kiln.tensorrt_profile import parse_profile

    loaded = SimpleNamespace(family=SimpleNamespace(max_positions_of=lambda config: 256), config=None)
    inputs = verification_inputs(loaded, parse_profile("batch=1", max_positions=256).to_json())
    assert (inputs.batch, inputs.prompt, inputs.decode_steps) == (1, 32, 8)
    tight = verification_inputs(loaded, parse_profile("batch=2:2:3,sequence=1:8:16,past=0:16:20", 256).to_json())
    assert (tight.batch, tight.prompt, tight.decode_steps) == (3, 16, 5)  # the last step's past is 20
    assert verification_inputs(loaded, None) == VerificationInputs()


def test_a_profile_without_prefill_cannot_be_verified():
    import pytest

    from kiln.errors import KilnError
    from kiln.tensorrt_profile import parse_profile

    with pytest.raises(KilnError, match="starts past_sequence at 4: a prefill"):
        VerificationInputs().within_profile(parse_profile("past=4:8:16").to_json())

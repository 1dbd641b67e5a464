"""The verification inputs fit the model's context."""
from kiln.verify import VerificationInputs


def test_inputs_shrink_to_a_short_context_keeping_decode_steps():
    inputs = VerificationInputs()
    assert inputs.within(None) == inputs and inputs.within(4096) == inputs
    short = inputs.within(20)
    assert short.prompt + short.decode_steps == 20 and short.decode_steps >= 1
    assert (short.batch, short.seed) == (inputs.batch, inputs.seed)
    assert VerificationInputs(prompt=32, decode_steps=8).within(2) == VerificationInputs(prompt=1, decode_steps=1)

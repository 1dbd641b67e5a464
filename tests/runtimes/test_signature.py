import numpy as np
import pytest

from runtimes import FeedError, Signature, TensorSpec

SIGNATURE = Signature(
    inputs=(
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
        TensorSpec("past_key_values.0.key", "float32", ("batch", 2, "past_sequence", 16)),
    ),
    outputs=(TensorSpec("logits", "float32", ("batch", "sequence", 1024)),),
)


def feeds(**changes):
    base = {
        "input_ids": np.zeros((3, 4), np.int64),
        "attention_mask": np.ones((3, 9), np.int64),
        "past_key_values.0.key": np.zeros((3, 2, 5, 16), np.float32),
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_valid_feeds_pass():
    SIGNATURE.validate(feeds())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"attention_mask": None}, "missing input 'attention_mask'"),
        ({"token_type_ids": np.zeros((3, 4), np.int64)}, "unknown input 'token_type_ids'"),
        ({"input_ids": np.zeros((3, 4), np.float32)}, "input 'input_ids': expected dtype int64, got float32"),
        ({"input_ids": np.zeros((3, 4, 1), np.int64)}, r"input 'input_ids': expected rank 2 \['batch', 'sequence'\], got rank 3"),
        ({"attention_mask": np.ones((2, 9), np.int64)}, r"input 'attention_mask': axis 0 \(batch\) is 2, but 'input_ids' has batch = 3"),
        ({"past_key_values.0.key": np.zeros((3, 4, 5, 16), np.float32)}, "input 'past_key_values.0.key': axis 1 must be 2, got 4"),
        ({"input_ids": [[1, 2]]}, "input 'input_ids': expected a numpy array, got list"),
        ({"past_key_values.0.key": np.full((3, 2, 5, 16), np.nan, np.float32)},
         "input 'past_key_values.0.key': contains NaN or infinite values"),
    ],
    ids=["missing", "extra", "float-ids", "rank-3", "batch-mismatch", "fixed-dim", "not-array", "nan"],
)
def test_wrong_feeds_name_the_input(changes, message):
    with pytest.raises(FeedError, match=message):
        SIGNATURE.validate(feeds(**changes))


def test_signature_round_trips_through_json():
    assert Signature.from_json(SIGNATURE.to_json()) == SIGNATURE

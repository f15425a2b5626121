"""The collator: right padding, -100 label padding, attention masks, packed position ids."""

from __future__ import annotations

import pytest
import torch
from datahelpers import build_chat_tokenizer

from peftkit.data import DataCollator, DataError, block_causal_mask, make_collator


def test_causal_padding_to_longest():
    collate = DataCollator(pad_token_id=9)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch


def test_pad_to_multiple_of():
    batch = DataCollator(0, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5]}])
    assert batch["input_ids"].shape == (1, 8) and batch["labels"][0, 5:].tolist() == [-100] * 3


def test_pad_equal_to_eos_keeps_the_eos_label():
    tokenizer = build_chat_tokenizer(pad=None)
    tokenizer.pad_token = tokenizer.eos_token
    collate = make_collator(tokenizer)
    eos = tokenizer.eos_token_id
    batch = collate(
        [{"input_ids": [0, 5, eos], "labels": [-100, 5, eos]}, {"input_ids": [0, eos], "labels": [-100, eos]}]
    )
    assert batch["input_ids"].tolist() == [[0, 5, eos], [0, eos, eos]]
    assert batch["labels"].tolist() == [[-100, 5, eos], [-100, eos, -100]]


def test_packed_batch_gets_position_ids_and_block_mask():
    features = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7], "labels": [-100, 7], "position_ids": [0, 1]},
    ]
    batch = DataCollator(0)(features)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.float32
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert allowed[1][2:] == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]  # padding is its own block
    assert mask.min().item() == torch.finfo(torch.float32).min
    torch.testing.assert_close(block_causal_mask(batch["position_ids"]), mask)


def test_classification_and_seq2seq_labels():
    cls = DataCollator(0, task="seq-cls")(
        [{"input_ids": [101, 5, 102], "labels": 2}, {"input_ids": [101, 102], "labels": 0}]
    )
    assert cls["labels"].tolist() == [2, 0] and cls["labels"].dtype == torch.long
    assert cls["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    s2s = DataCollator(0, task="seq2seq")(
        [{"input_ids": [5, 6], "labels": [7, 8, 1]}, {"input_ids": [5], "labels": [1]}]
    )
    assert s2s["input_ids"].tolist() == [[5, 6], [5, 0]]
    assert s2s["labels"].tolist() == [[7, 8, 1], [1, -100, -100]]


def test_bad_settings_and_mixed_batches_are_errors():
    with pytest.raises(DataError, match="task 'lm' is not accepted.*packed_attention 'flash' is not accepted"):
        DataCollator(0, task="lm", packed_attention="flash")
    with pytest.raises(DataError, match="cannot collate packed examples"):
        DataCollator(0)([{"input_ids": [1], "labels": [1], "position_ids": [0]}, {"input_ids": [1], "labels": [1]}])


def test_the_loops_default_collate_is_this_collator():
    from peftkit.train import make_collate

    collate = make_collate(7, "token-cls")
    assert isinstance(collate, DataCollator) and collate.pad_token_id == 7 and collate.task == "token-cls"


def test_rows_may_carry_their_own_masks_token_types_and_positions():
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0], "token_type_ids": [0, 0, 1], "label": 1},
            {"input_ids": [4], "token_type_ids": [1], "position_ids": None, "labels": 0}]
    batch = DataCollator(0, task="seq-cls")(rows)
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [1, 0, 0]] and batch["labels"].tolist() == [1, 0]
    # Outside causal LM, position_ids are the model's business: passed through, padded with 0.
    cls = DataCollator(0, task="token-cls")([{"input_ids": [1, 2], "labels": [0, 1], "position_ids": [3, 4]},
                                             {"input_ids": [5], "labels": [1], "position_ids": [3]}])
    assert cls["position_ids"].tolist() == [[3, 4], [3, 0]] and cls["attention_mask"].dim() == 2
    with pytest.raises(DataError, match="token_type_ids is given for some rows"):
        DataCollator(0)([{"input_ids": [1], "token_type_ids": [0]}, {"input_ids": [2]}])
    with pytest.raises(DataError, match="row 0: labels=1.5: sequence classification expects one int class"):
        DataCollator(0, task="seq-cls")([{"input_ids": [1], "labels": 1.5}])


def test_a_packed_rows_own_attention_mask_still_hides_its_keys():
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "position_ids": [0, 1, 0], "attention_mask": [1, 0, 1]}]
    allowed = (DataCollator(0)(rows)["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0], [1, 0, 0], [0, 0, 1]]
    with pytest.raises(DataError, match="packed_attention='position_ids' sends no attention_mask"):
        DataCollator(0, packed_attention="position_ids")(rows)

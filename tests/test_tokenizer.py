"""The bundled tokenizer is bert-base-uncased's WordPiece, loaded offline (DATA.md traps)."""

import pytest

from cached_mslt.tokenizer import TokenizerError, check_vocab, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_bundled_tokenizer_is_bert_base_uncased(tokenizer):
    # BertTokenizerFast(vocab_file=...) would give a 5-token vocabulary and map "the" to [UNK].
    assert tokenizer("The", add_special_tokens=False)["input_ids"] == [1996]
    assert len(tokenizer) == 30522
    ids = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id)
    assert ids == (0, 100, 101)
    assert (tokenizer.sep_token_id, tokenizer.mask_token_id) == (102, 103)


def test_long_text_is_not_truncated(tokenizer):
    # The raw tokenizer.json pins truncation at 128; packing needs every token.
    assert len(tokenizer("word " * 1000, add_special_tokens=False)["input_ids"]) == 1000


def test_check_vocab_refuses_a_model_with_another_vocab_size(tokenizer):
    check_vocab(tokenizer, 30522)
    with pytest.raises(TokenizerError, match="30522 tokens but the model expects vocab_size=30000"):
        check_vocab(tokenizer, 30000)


def test_missing_tokenizer_dir_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))

"""Tokenizers: the bundled bert-base-uncased WordPiece, loaded offline, and WordPiece
vocabularies trained on the corpus (docs/levers.md)."""

import pytest

from cached_mslt.data.tokenizer import (
    TokenizerError,
    check_vocab,
    load_tokenizer,
    train_wordpiece,
)


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


# A WordPiece vocabulary fitted to the corpus (--tokenizer train).


@pytest.fixture(scope="module")
def corpus_texts():
    from tests.conftest import WORDS

    rng = __import__("random").Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(60)) + "." for _ in range(200)]


def test_trained_vocabulary_is_deterministic_given_the_corpus(corpus_texts):
    # Pseudo-English of 60 words repeated: many equally frequent merges, which tokenizers
    # breaks in hash-map order (without the fix, 3 in 4 pairs of trainings differed).
    first = train_wordpiece(corpus_texts, vocab_size=300)
    for _ in range(8):
        assert train_wordpiece(corpus_texts, vocab_size=300).get_vocab() == first.get_vocab()
    assert train_wordpiece(corpus_texts, vocab_size=150).get_vocab() != first.get_vocab()


def test_trained_tokenizer_round_trips_through_save_pretrained_and_auto(corpus_texts, tmp_path):
    from transformers import AutoTokenizer

    trained = train_wordpiece(corpus_texts, vocab_size=300)
    trained.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == trained.get_vocab()
    text = "The river and the CHURCH were new."
    ids = loaded(text)["input_ids"]
    assert ids == trained(text)["input_ids"]
    # BERT's framing and special tokens, like the bundled tokenizer; lowercased.
    assert ids[0] == loaded.cls_token_id and ids[-1] == loaded.sep_token_id
    assert loaded.convert_ids_to_tokens(ids[1:3]) == ["the", "river"]
    specials = [loaded.pad_token_id, loaded.unk_token_id, loaded.cls_token_id]
    assert specials + [loaded.sep_token_id, loaded.mask_token_id] == [0, 1, 2, 3, 4]


def test_too_small_a_vocabulary_is_refused(corpus_texts):
    with pytest.raises(TokenizerError, match="too small"):
        train_wordpiece(corpus_texts, vocab_size=10)


def test_vocabulary_streamed_in_batches_is_the_one_fitted_to_the_list(corpus_texts):
    # prepare_dataset streams the training split from disk in batches, read twice.
    batches = lambda: (corpus_texts[i : i + 7] for i in range(0, len(corpus_texts), 7))  # noqa: E731
    streamed = train_wordpiece(batches, vocab_size=300)
    assert streamed.get_vocab() == train_wordpiece(corpus_texts, vocab_size=300).get_vocab()

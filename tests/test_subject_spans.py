import pytest
from transformers import AutoTokenizer

from patchmap.builtin import word_tokenizer
from patchmap.encoding import subject_token_span


def span(tokenizer, prompt, subject):
    enc = tokenizer(prompt, return_offsets_mapping=True)
    found = subject_token_span(prompt, subject, enc["offset_mapping"])
    return None if found is None else tokenizer.convert_ids_to_tokens(enc["input_ids"][found[0]:found[1]])


@pytest.fixture(scope="module")
def words():
    vocab = ["<pad>", "<unk>", "<bos>", "<eos>"] + "Abel Bran Cato lives in the city of Paris Parisian is a visited".split()
    return word_tokenizer(vocab)


def test_subject_at_start(words):
    assert span(words, "Abel Bran Cato lives in the city of", "Abel Bran Cato") == ["Abel", "Bran", "Cato"]


def test_subject_in_the_middle(words):
    assert span(words, "the city of Abel Bran is a", "Abel Bran") == ["Abel", "Bran"]


def test_repeated_word_takes_first_whole_word_occurrence(words):
    assert span(words, "Parisian Paris visited Paris", "Paris") == ["Paris"]
    enc = words("Parisian Paris visited Paris", return_offsets_mapping=True)
    assert subject_token_span("Parisian Paris visited Paris", "Paris", enc["offset_mapping"]) == (2, 3)


def test_subject_missing_gives_none(words):
    assert span(words, "Abel lives in the city of", "Cato") is None


def test_bpe_subject_spans(tmp_path):
    """Byte-level BPE: subword pieces that straddle the subject are included, the leading space is not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    text = ["Danielle Darrieux was born in Paris", "The mother tongue of Danielle Darrieux is French"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    bpe = AutoTokenizer.from_pretrained(tmp_path)
    prompt = "The mother tongue of Danielle Darrieux is"
    pieces = span(bpe, prompt, "Danielle Darrieux")
    assert bpe.convert_tokens_to_string(pieces).strip() == "Danielle Darrieux"

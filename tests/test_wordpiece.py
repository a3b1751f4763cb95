"""WordPiece: likelihood-score training, greedy longest-match-first encoding, ids equal to Hugging
Face tokenizers' WordPiece model on texts the vocabulary was not trained on."""

from collections import Counter

import pytest

from journey_dist.data import load_text
from journey_dist.tokenizer import WordPieceTokenizer, bert_pre_tokenize, hf_wordpiece, train_wordpiece

TRICKY = [
    "naïve café — “quoted” ‘x’ «y» 日本語 😀 €100 $5 a+b<c>=d ^_^ `code` |pipe| ~tilde",
    "x\x1cy\x1dz\u00a0w\u2003v\u3000u\tt\r\nq",  # separators Python calls space and Rust does not
    "a" * 101 + " " + "b" * 100,  # longer than max_input_chars_per_word: [UNK]; exactly 100: not
    "İstanbul ΣΊΣΥΦΟΣ Straße ǅemal don't e-mail A.B.C. 3.14 1,000 ...!?",
]


@pytest.fixture(scope="module")
def handbook() -> str:
    return load_text("handbook")


@pytest.mark.parametrize("lowercase", [True, False], ids=["lowercase", "cased"])
def test_ids_equal_hugging_face_wordpiece_on_unseen_text(handbook, lowercase):
    tok = WordPieceTokenizer.train(handbook[:20_000], 500, lowercase=lowercase)
    assert tok.vocab_size == 500 and tok.vocab[0] == "[UNK]"
    hf = hf_wordpiece(tok)
    for text in [load_text("dialogues"), handbook[20_000:], *TRICKY]:  # none of it trained on
        assert tok.encode(text) == hf.encode(text).ids
    assert "[UNK]" in tok.tokens(TRICKY[0])  # 日本語 and 😀 are not in a vocabulary learned from English


def test_merge_score_is_likelihood_not_frequency():
    # Hugging Face course's example: ##u##g is the most frequent pair (20), but every pair with
    # ##u has a frequent part; ##g ##s scores 5 / (20 * 5) = 1/20, the best, and is merged first
    counts = Counter({"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5})
    alphabet = ["b", "h", "p", "##g", "##n", "##s", "##u"]
    vocab = train_wordpiece(counts, 1 + len(alphabet) + 1)
    assert sorted(vocab[1:-1]) == sorted(alphabet) and vocab[-1] == "##gs"
    full = train_wordpiece(counts, 1000)  # runs until no pair is left: every word one token
    assert set(counts) <= set(full) and len(full) < 1000


def test_greedy_longest_match_first():
    vocab = ["[UNK]", "un", "u", "##n", "##aff", "##a", "##able", "##ab", "##le", "a"]
    tok = WordPieceTokenizer(vocab, max_input_chars_per_word=12)
    assert tok.split_word("unaffable") == ["un", "##aff", "##able"]
    assert tok.split_word("unaxe") == ["[UNK]"]  # ##x cannot be covered: the whole word is unknown
    assert tok.split_word("u" * 13) == ["[UNK]"] and tok.split_word("a") == ["a"]
    assert tok.tokens("Unaffable, un!") == ["un", "##aff", "##able", "[UNK]", "un", "[UNK]"]  # , ! unknown
    assert tok.decode(tok.encode("unaffable un")) == "unaffable un"


def test_pre_tokenizer_isolates_punctuation_and_drops_space():
    assert bert_pre_tokenize("Hello,  world!\t(a+b)") == ["Hello", ",", "world", "!", "(", "a", "+", "b", ")"]

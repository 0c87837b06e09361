"""captioning/text.py: the tokenizers, CJK detection, decoding, the tokenizer record, and the CJK figure font."""
import json

import pytest
from PIL import ImageFont

from captioning import text


def test_words_keeps_accents_and_other_scripts():
    assert text.tokenize('Café au lait, NAÏVE façade!') == ['café', 'au', 'lait', 'naïve', 'façade']
    assert text.tokenize('Собака бежит по траве.') == ['собака', 'бежит', 'по', 'траве']
    assert text.tokenize('Ο σκύλος τρέχει') == ['ο', 'σκύλος', 'τρέχει']
    # decomposed accents (e + U+0301) are composed, not split off
    assert text.tokenize('cafe\u0301') == ['café']
    # ASCII behaves as the tutorial's [a-z0-9]+ did: compatible with existing prepared data
    assert text.tokenize("A dog's toy, 2 balls_x.") == ['a', 'dog', 's', 'toy', '2', 'balls', 'x']


def test_words_drops_full_width_punctuation():
    assert text.tokenize('「你好」,世界!(测试)。') == ['你好', '世界', '测试']
    assert text.tokenize('。,!?') == []


def test_jieba_segmentation_and_round_trip():
    sentence = '一个男人在骑马。'
    tokens = text.tokenize(sentence, 'jieba')
    assert tokens == ['一个', '男人', '在', '骑马']                  # punctuation dropped
    assert text.join_words(tokens, 'jieba') == '一个男人在骑马'        # joined without spaces
    # decoding then segmenting again gives the same words (what 03 scores)
    assert text.tokenize(text.join_words(tokens, 'jieba'), 'jieba') == tokens
    assert text.join_words(tokens, 'words') == '一个 男人 在 骑马'
    # deterministic across calls
    assert [text.tokenize(sentence, 'jieba') for _ in range(3)] == [tokens] * 3


def test_chars_and_mixed_script_joining():
    assert text.tokenize('一个T恤 logo', 'chars') == ['一', '个', 't', '恤', 'logo']
    assert text.join_words(['一个', 'red', 'ball', '在', '桌子'], 'jieba') == '一个red ball在桌子'
    assert text.join_words([], 'jieba') == ''


def test_detect_mostly_cjk():
    assert text.detect_tokenizer(['一个男人在骑马', '两只狗在雪地里玩']) == 'jieba'
    assert text.detect_tokenizer(['a man rides a horse', 'Собака бежит']) == 'words'
    assert text.detect_tokenizer(['一只 dog', 'a man riding a brown horse on the beach']) == 'words'
    assert text.resolve_tokenizer('auto', ['一个男人']) == 'jieba'
    assert text.resolve_tokenizer('chars', ['a man']) == 'chars'
    with pytest.raises(ValueError, match='unknown tokenizer'):
        text.resolve_tokenizer('spaces', ['a'])


def test_tokenizer_record_defaults_to_words(tmp_path):
    assert text.read_tokenizer(str(tmp_path), 'x') == 'words'       # folders prepared before the record
    (tmp_path / 'TOKENIZER_x.json').write_text(json.dumps(text.tokenizer_record('jieba')))
    assert text.read_tokenizer(str(tmp_path), 'x') == 'jieba'
    (tmp_path / 'TOKENIZER_x.json').write_text('{"tokenizer": "klingon"}')
    with pytest.raises(ValueError, match="TOKENIZER_x.json: field 'tokenizer'"):
        text.read_tokenizer(str(tmp_path), 'x')
    assert text.checkpoint_tokenizer({}) == 'words' and text.checkpoint_tokenizer({'tokenizer': 'jieba'}) == 'jieba'


def test_glyph_check_detects_boxes():
    """The check itself can fail: Pillow's default font has Latin glyphs but no Chinese ones."""
    default = ImageFont.load_default(size=20)
    assert text.has_glyphs(default, 'abc')
    assert not text.has_glyphs(default, '中文')


def test_cjk_font_has_the_glyphs():
    path = text.find_cjk_font()
    if path is None:
        pytest.skip('no CJK font on this system (Debian: apt-get install fonts-wqy-microhei); '
                    'attention figures fall back to boxes')
    font = text.label_font(['一个', '男人'], 24)
    assert font.path == path
    assert text.has_glyphs(font, '一个男人在骑马' + text.GLYPH_PROBE)
    # Latin-only labels keep Pillow's default font
    assert getattr(text.label_font(['a', 'dog'], 24), 'path', None) != path

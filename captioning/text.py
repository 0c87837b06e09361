"""Caption text: tokenizers, detection of mostly-CJK captions, decoding, and the tokenizer record.

Tokenizers (one per prepared dataset, recorded next to its word map and in the checkpoint):
    words  Unicode-aware words: lower-cased runs of letters, digits and combining marks in any
           script (accents, Cyrillic, Greek ...); punctuation, full-width included, is dropped.
           "Café, Москва!" -> ['café', 'москва']. ASCII text gives what the tutorial's [a-z0-9]+ gave.
    jieba  Chinese word segmentation (jieba, the seed's segmenter), each segment then cleaned like
           `words`: "一个男人在骑马。" -> ['一个', '男人', '在', '骑马'].
    chars  one token per CJK character, other runs as `words`: "一个T恤" -> ['一', '个', 't', '恤'].
Decoding joins `words` tokens with spaces, jieba/chars tokens without (a space stays between two
non-CJK tokens, e.g. 'T' 'shirt').

The record: TOKENIZER_{base}.json ({"tokenizer": name}) next to WORDMAP_{base}.json, so the word map
stays the tutorial's plain word -> id dict. A prepared folder or checkpoint without it means `words`.
jieba is imported on first use, silenced, and always uses its bundled dictionary (deterministic).
"""
import json
import os
import unicodedata

TOKENIZERS = ('words', 'jieba', 'chars')
DEFAULT_TOKENIZER = 'words'
CJK_SHARE = 0.5             # captions are "mostly CJK" when more than this share of their letters are CJK
DETECT_SAMPLE = 2000        # captions looked at by detect_tokenizer

# Han ideographs (with extensions and compatibility forms), kana, Hangul: written without spaces.
_CJK_RANGES = ((0x2E80, 0x2FDF), (0x3040, 0x30FF), (0x3100, 0x312F), (0x31A0, 0x31FF), (0x3400, 0x4DBF),
               (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0x20000, 0x3134F))
_jieba = None


def is_cjk(ch):
    """True for a Han, kana or Hangul character."""
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _CJK_RANGES)


def _word_char(ch):
    # letters (L*), digits/numbers (N*) and combining marks (M*, e.g. Devanagari vowel signs)
    return unicodedata.category(ch)[0] in 'LNM'


def words(text):
    """Unicode-aware words of a sentence, lower-cased, punctuation dropped."""
    text = unicodedata.normalize('NFC', str(text)).lower()
    out, cur = [], []
    for ch in text:
        if _word_char(ch):
            cur.append(ch)
        elif cur:
            out.append(''.join(cur))
            cur = []
    if cur:
        out.append(''.join(cur))
    return out


def _split_cjk(token):
    """'t恤衫' -> ['t', '恤', '衫']: CJK characters alone, other runs kept together."""
    out, cur = [], ''
    for ch in token:
        if is_cjk(ch):
            if cur:
                out.append(cur)
                cur = ''
            out.append(ch)
        else:
            cur += ch
    return out + ([cur] if cur else [])


def chars(text):
    return [c for w in words(text) for c in _split_cjk(w)]


def _jieba_tokenizer():
    """A private jieba.Tokenizer on the bundled dictionary, its log messages silenced."""
    global _jieba
    if _jieba is None:
        import logging
        try:
            import jieba
        except ImportError:
            raise ImportError('the jieba tokenizer needs the jieba package: pip install -r requirements.txt') from None
        logging.getLogger('jieba').setLevel(logging.ERROR)
        jieba.setLogLevel(logging.ERROR)
        tk = jieba.Tokenizer()
        tk.initialize()
        _jieba = tk
    return _jieba


def jieba_words(text):
    tk = _jieba_tokenizer()
    return [w for seg in tk.cut(unicodedata.normalize('NFC', str(text)), cut_all=False, HMM=True)
            for w in words(seg)]


def tokenize(text, tokenizer=DEFAULT_TOKENIZER):
    """Sentence -> list of tokens with the named tokenizer (see the module docstring)."""
    if tokenizer == 'words':
        return words(text)
    if tokenizer == 'jieba':
        return jieba_words(text)
    if tokenizer == 'chars':
        return chars(text)
    raise ValueError(f"unknown tokenizer {tokenizer!r}; choose from {', '.join(TOKENIZERS)}")


def join_words(tokens, tokenizer=DEFAULT_TOKENIZER):
    """Tokens -> a sentence: spaces for `words`; none for jieba/chars except between non-CJK tokens."""
    tokens = [str(t) for t in tokens]
    if tokenizer == 'words' or not tokens:
        return ' '.join(tokens)
    out = tokens[0]
    for prev, tok in zip(tokens, tokens[1:]):
        if not is_cjk(prev[-1]) and not is_cjk(tok[0]):
            out += ' '
        out += tok
    return out


def cjk_share(sentences):
    """Share of the letters of `sentences` that are CJK (0.0 when there are no letters)."""
    cjk = letters = 0
    for s in sentences:
        for ch in str(s):
            if unicodedata.category(ch)[0] == 'L':
                letters += 1
                cjk += is_cjk(ch)
    return cjk / letters if letters else 0.0


def detect_tokenizer(sentences):
    """'jieba' when the captions are mostly CJK, else 'words' (looks at an even sample of them)."""
    sentences = list(sentences)
    step = max(1, len(sentences) // DETECT_SAMPLE)
    return 'jieba' if cjk_share(sentences[::step]) > CJK_SHARE else 'words'


def resolve_tokenizer(name, sentences):
    """'auto' -> detect_tokenizer(sentences); a known name -> itself; else ValueError."""
    if name in (None, '', 'auto'):
        return detect_tokenizer(sentences)
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose from auto, {', '.join(TOKENIZERS)}")
    return name


# ----------------------------------------------------------------------------------------------
# The record next to the word map

def tokenizer_path(data_folder, data_name):
    return os.path.join(data_folder, f'TOKENIZER_{data_name}.json')


def tokenizer_record(tokenizer):
    """What TOKENIZER_{base}.json holds."""
    return {'tokenizer': tokenizer}


def read_tokenizer(data_folder, data_name):
    """The tokenizer a prepared dataset was built with ('words' for folders prepared before it was recorded)."""
    path = tokenizer_path(data_folder, data_name)
    try:
        with open(path, encoding='utf-8') as f:
            name = json.load(f).get('tokenizer')
    except FileNotFoundError:
        return DEFAULT_TOKENIZER
    except (ValueError, AttributeError):
        raise ValueError(f"{path}: expected a JSON object like {{\"tokenizer\": \"jieba\"}}") from None
    if name not in TOKENIZERS:
        raise ValueError(f"{path}: field 'tokenizer' is {name!r}; expected one of {', '.join(TOKENIZERS)}")
    return name


def checkpoint_tokenizer(config):
    """The tokenizer recorded in a checkpoint's config ('words' for checkpoints from before it was)."""
    name = (config or {}).get('tokenizer') or DEFAULT_TOKENIZER
    if name not in TOKENIZERS:
        raise ValueError(f"the checkpoint's tokenizer {name!r} is not one of {', '.join(TOKENIZERS)}")
    return name


# ----------------------------------------------------------------------------------------------
# A font that can draw CJK labels on attention figures

# Tried in order after fontconfig's fonts for Chinese (fc-list :lang=zh); the first that really has
# CJK glyphs wins. Debian/Ubuntu: apt-get install fonts-wqy-microhei (or fonts-noto-cjk).
CJK_FONT_PATHS = (
    '/usr/share/fonts/truetype/wqy/wqy-microhei.ttc', '/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc',
    '/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc', '/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc',
    '/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf', '/usr/share/fonts/truetype/arphic/uming.ttc',
    '/System/Library/Fonts/PingFang.ttc', '/System/Library/Fonts/STHeiti Medium.ttc',
    '/Library/Fonts/Arial Unicode.ttf', 'C:/Windows/Fonts/msyh.ttc', 'C:/Windows/Fonts/simhei.ttf',
)
GLYPH_PROBE = '中文图像描述'            # characters a usable CJK font must draw
_MISSING = '\U000F0000'                # a code point no font draws: what a missing glyph looks like
_cjk_font_path = False                 # cache: False = not looked for yet, None = none found
_warned = False


def _render(font, ch):
    from PIL import Image, ImageDraw
    size = int(getattr(font, 'size', 16) or 16)
    img = Image.new('L', (3 * size, 3 * size), 0)
    ImageDraw.Draw(img).text((size // 2, size // 2), ch, font=font, fill=255)
    return img


def has_glyphs(font, chars):
    """True when `font` draws every character of `chars` as itself: not blank, and not the box (or
    nothing) it draws for a character it lacks."""
    missing = _render(font, _MISSING).tobytes()
    for ch in chars:
        img = _render(font, ch)
        if img.getbbox() is None or img.tobytes() == missing:
            return False
    return True


def _fontconfig_candidates():
    import shutil
    import subprocess
    if not shutil.which('fc-list'):
        return []
    try:
        out = subprocess.run(['fc-list', ':lang=zh', 'file'], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(line.strip().rstrip(':') for line in out.splitlines() if line.strip())


def find_cjk_font():
    """Path of a font file with CJK glyphs (fontconfig's fonts for Chinese, then CJK_FONT_PATHS), or None."""
    global _cjk_font_path
    if _cjk_font_path is False:
        from PIL import ImageFont
        _cjk_font_path = None
        for path in _fontconfig_candidates() + list(CJK_FONT_PATHS):
            if not os.path.isfile(path):
                continue
            try:
                font = ImageFont.truetype(path, 20)
            except OSError:
                continue
            if has_glyphs(font, GLYPH_PROBE):
                _cjk_font_path = path
                break
    return _cjk_font_path


def label_font(labels, size):
    """The font for figure labels: Pillow's default, or a CJK font when a label has CJK characters.
    Without a CJK font it falls back to the default (boxes) and says once how to get one."""
    global _warned
    from PIL import ImageFont
    if any(is_cjk(ch) for label in labels for ch in str(label)):
        path = find_cjk_font()
        if path:
            return ImageFont.truetype(path, size)
        if not _warned:
            import sys
            print('warning: no CJK font found: Chinese labels on attention figures will show as boxes '
                  '(install one, e.g. apt-get install fonts-wqy-microhei)', file=sys.stderr)
            _warned = True
    return ImageFont.load_default(size=size)

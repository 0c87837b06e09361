"""The embedded default dataset: captioned scenes of coloured shapes, drawn with PIL.

Each image holds one object, two different objects in a spatial relation (left/right/above/below),
or a group of two or three identical objects; each gets five paraphrased captions that name
colours, shapes, sizes, counts and relations, so a caption cannot be guessed without looking.
`generate()` writes a Karpathy-format JSON plus an image folder, deterministically from a seed;
00_create_input_files.py then prepares it like any other dataset. language='zh' writes Chinese captions
(same scenes; 'raw' only, unsegmented, like real Chinese data) for an offline Chinese end-to-end run.
"""
import json
import os
import random

from PIL import Image, ImageDraw

from utils import atomic_path

COLOURS = {'red': (214, 39, 40), 'green': (44, 160, 44), 'blue': (31, 90, 220), 'yellow': (240, 200, 30),
           'purple': (148, 70, 189), 'orange': (255, 127, 14)}
SHAPES = ('circle', 'square', 'triangle', 'star')
SIZES = {'small': ('small', 'little'), 'big': ('big', 'large')}
NUMBERS = {2: 'two', 3: 'three'}

ONE_TEMPLATES = ('a {o}', 'there is a {o}', 'a picture of a {o}', 'one {o} on a plain background',
                 'a {o} alone in the picture', 'a single {o}')
H_TEMPLATES = ('a {a} to the left of a {b}', 'a {b} to the right of a {a}', 'a {a} left of a {b}',
               'there is a {a} on the left and a {b} on the right', 'a {b} on the right of a {a}',
               'a {a} next to a {b}')
V_TEMPLATES = ('a {a} above a {b}', 'a {b} below a {a}', 'a {a} on top of a {b}', 'a {b} under a {a}',
               'there is a {a} at the top and a {b} at the bottom', 'a {a} over a {b}')
GROUP_TEMPLATES = ('{n} {o}s', 'there are {n} {o}s', 'a group of {n} {o}s', '{n} identical {o}s',
                   '{n} {o}s on a plain background', 'a picture of {n} {o}s')

LANGUAGES = ('en', 'zh')
# Chinese: the same scenes and choices (so the same random draws), other words and templates.
ZH = {
    'colours': {'red': '红色', 'green': '绿色', 'blue': '蓝色', 'yellow': '黄色', 'purple': '紫色', 'orange': '橙色'},
    'shapes': {'circle': '圆形', 'square': '正方形', 'triangle': '三角形', 'star': '星形'},
    'sizes': {'small': ('小', '小小的'), 'big': ('大', '大大的')},
    'numbers': {2: '两', 3: '三'},
    'one': ('一个{o}', '有一个{o}', '一张{o}的图片', '纯色背景上的一个{o}', '图中只有一个{o}', '单独一个{o}'),
    'h': ('{a}在{b}的左边', '{b}在{a}的右边', '{a}在{b}左侧', '左边是{a},右边是{b}', '{b}位于{a}的右边',
          '{a}挨着{b}'),
    'v': ('{a}在{b}的上面', '{b}在{a}的下面', '{a}在{b}上方', '{b}在{a}下方', '上面是{a},下面是{b}',
          '{a}位于{b}之上'),
    'group': ('{n}个{o}', '有{n}个{o}', '一组{n}个{o}', '{n}个一样的{o}', '纯色背景上的{n}个{o}', '一张{n}个{o}的图片'),
}


def _phrase(obj, rng, language='en'):
    """'big red circle' (zh: '大红色圆形') with a random size synonym."""
    if language == 'zh':
        return f"{rng.choice(ZH['sizes'][obj['size']])}{ZH['colours'][obj['colour']]}{ZH['shapes'][obj['shape']]}"
    return f"{rng.choice(SIZES[obj['size']])} {obj['colour']} {obj['shape']}"


def _random_object(rng):
    return {'colour': rng.choice(list(COLOURS)), 'shape': rng.choice(SHAPES), 'size': rng.choice(list(SIZES))}


def _draw(draw, obj, cx, cy, radius):
    fill = COLOURS[obj['colour']]
    if obj['shape'] == 'circle':
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif obj['shape'] == 'square':
        r = radius * 0.85
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj['shape'] == 'triangle':
        draw.polygon([(cx, cy - radius), (cx + radius * 0.95, cy + radius * 0.75),
                      (cx - radius * 0.95, cy + radius * 0.75)], fill=fill)
    else:  # star: 5 points, alternating outer and inner radius
        import math
        pts = [(cx + (radius if k % 2 == 0 else radius * 0.45) * math.sin(k * math.pi / 5),
                cy - (radius if k % 2 == 0 else radius * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=fill)


def make_scene(rng, size=128, language='en'):
    """One random scene -> (PIL image, five caption strings in `language`)."""
    zh = language == 'zh'
    scale = 2                                                # draw at 2x, then downsample (smooth edges)
    w = size * scale
    bg = tuple(rng.randint(215, 250) for _ in range(3))
    img = Image.new('RGB', (w, w), bg)
    draw = ImageDraw.Draw(img)
    radius = {'small': 0.085 * w, 'big': 0.17 * w}
    jitter = lambda: rng.uniform(-0.04, 0.04) * w              # noqa: E731
    kind = rng.choices(('one', 'pair', 'group'), weights=(3, 5, 3))[0]
    if kind == 'one':
        obj = _random_object(rng)
        _draw(draw, obj, rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * w, radius[obj['size']])
        captions = [t.format(o=_phrase(obj, rng, language)) for t in rng.sample(ZH['one'] if zh else ONE_TEMPLATES, 5)]
    elif kind == 'pair':
        a = _random_object(rng)
        b = _random_object(rng)
        while (b['colour'], b['shape']) == (a['colour'], a['shape']):
            b = _random_object(rng)
        horizontal = rng.random() < 0.5
        along, across = (0.27 * w, 0.73 * w), rng.uniform(0.35, 0.65) * w
        for obj, pos in ((a, along[0]), (b, along[1])):
            x, y = (pos + jitter(), across + jitter()) if horizontal else (across + jitter(), pos + jitter())
            _draw(draw, obj, x, y, radius[obj['size']])
        templates = (ZH['h'] if zh else H_TEMPLATES) if horizontal else (ZH['v'] if zh else V_TEMPLATES)
        captions = [t.format(a=_phrase(a, rng, language), b=_phrase(b, rng, language)) for t in rng.sample(templates, 5)]
    else:
        obj = _random_object(rng)
        n = rng.choice((2, 3))
        r = radius[obj['size']] * (0.75 if n == 3 else 1.0)
        horizontal = rng.random() < 0.5
        across = rng.uniform(0.35, 0.65) * w
        spots = (0.19, 0.5, 0.81) if n == 3 else (0.27, 0.73)
        for s in spots:
            along = s * w + jitter() / 4
            x, y = (along, across + jitter()) if horizontal else (across + jitter(), along)
            _draw(draw, obj, x, y, r)
        captions = [t.format(n=(ZH['numbers'] if zh else NUMBERS)[n], o=_phrase(obj, rng, language))
                    for t in rng.sample(ZH['group'] if zh else GROUP_TEMPLATES, 5)]
    return img.resize((size, size), Image.LANCZOS), captions


def generate(folder, n_train=2000, n_val=250, n_test=250, image_size=128, seed=0, language='en'):
    """Write `folder`/images/*.png and `folder`/dataset_synthetic.json (Karpathy format; Chinese
    sentences carry 'raw' only, with empty 'tokens', to be segmented by 00_create_input_files.py).

    Returns (json path, image folder). The same seed always gives the same files.
    """
    if language not in LANGUAGES:
        raise ValueError(f"unknown synthetic language {language!r}; choose from {', '.join(LANGUAGES)}")
    rng = random.Random(seed)
    image_folder = os.path.join(folder, 'images')
    os.makedirs(image_folder, exist_ok=True)
    images, sentid = [], 0
    splits = ['train'] * n_train + ['val'] * n_val + ['test'] * n_test
    for i, split in enumerate(splits):
        img, captions = make_scene(rng, image_size, language)
        name = f'synthetic_{i:05d}.png'
        with atomic_path(os.path.join(image_folder, name)) as tmp:
            img.save(tmp, format='PNG')
        sentences = [{'tokens': c.split() if language == 'en' else [], 'raw': c, 'imgid': i, 'sentid': sentid + k} for k, c in enumerate(captions)]
        images.append({'filename': name, 'imgid': i, 'split': split, 'sentences': sentences,
                       'sentids': [s['sentid'] for s in sentences]})
        sentid += len(sentences)
    json_path = os.path.join(folder, 'dataset_synthetic.json')
    with atomic_path(json_path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump({'dataset': 'synthetic', 'images': images}, f, ensure_ascii=False)
    return json_path, image_folder

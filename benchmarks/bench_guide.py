"""Tag guidance (--guide) on a captioned split: the caption scores with and without it, for a grid of
thresholds and margins, with how many captions each setting changed.

    python benchmarks/bench_guide.py --karpathy-json ../shared/datasets/flickr8k/dataset_flickr8k.json \
        --image-folder ../shared/datasets/flickr8k/images --split VAL
    python benchmarks/bench_guide.py ... --thresholds 0.3 0.5 0.7 --margins 0.5 1 2 inf --json

The images are captioned in 03_evaluate.py's batches (its defaults: the provided pair, beam 3, int8
under --precision auto, length normalisation 0.5, no-repeat 3, bad endings avoided), so the unguided
column is 03's own captions; each setting then re-searches, batch by batch as 03 would, only the
images whose caption misses a confident tag (search.decode's guides). Scores: the COCO toolkit when
installed (03's --metrics auto), against every reference of the split.

Object recall: over the images whose references name an object guidance can name (a word of the
class -> words mapping, other than 'dog', in 3 or more of its references), the share of captions
that name it too (any of its forms). It asks whether the caption names what people saw; it cannot
tell a right mention from a lucky one, and Flickr8k's objects are few (it is not an out-of-domain set).
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import environment, report, setup  # noqa: E402

import datasets  # noqa: E402
from captioning import text  # noqa: E402
from captioning.decoding import loading, quantize, search, tags  # noqa: E402
from captioning.preparation import formats  # noqa: E402
from captioning.scoring import metrics  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', nargs='+', default=loading.DEFAULT_CHECKPOINTS)
    p.add_argument('--karpathy-json', required=True)
    p.add_argument('--image-folder', required=True)
    p.add_argument('--split', default='VAL')
    p.add_argument('--max-images', type=int, default=0, help='the first N images of the split (0 = all)')
    p.add_argument('--thresholds', type=float, nargs='+', default=[0.3, 0.5, 0.7])
    p.add_argument('--margins', type=float, nargs='+', default=[0.5, 1.0, 2.0, 3.0, float('inf')])
    p.add_argument('--beam-size', type=int, default=3)
    p.add_argument('--batch-size', type=int, default=32, help="03's default (int8 captions depend on it)")
    p.add_argument('--precision', default='auto')
    p.add_argument('--threads', type=int, default=0)
    p.add_argument('--json', action='store_true')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = setup('cpu', args.threads)
    records = [r for r in formats.read_karpathy(args.karpathy_json, args.image_folder) if r.split == args.split]
    records = records[:args.max_images or len(records)]
    encoder, decoder, word_map, config = loading.load_captioner(args.checkpoint, device)
    decoder, precision = quantize.apply_precision(decoder, args.precision, device)
    tokenizer = text.checkpoint_tokenizer(config)
    no_end_after, _ = loading.bad_endings_setting('avoid', decoder, word_map, config)
    tag_words = tags.tag_words_file(word_map, loading.checkpoint_paths(args.checkpoint)[0])
    rev = {v: k for k, v in word_map.items()}
    kw = dict(beam_size=args.beam_size, max_len=50, length_norm=search.DEFAULT_LENGTH_NORM,
              no_repeat_ngram_size=search.DEFAULT_NO_REPEAT_NGRAM, min_len=1, no_end_after=no_end_after)
    settings = [(t, m) for t in args.thresholds for m in args.margins]
    guides = {t: tags.Guide(tag_words, word_map, threshold=t) for t in args.thresholds}
    captions = {None: []} | {s: [] for s in settings}
    fired = {t: 0 for t in args.thresholds}
    transform = datasets.image_transform(encoder)
    start = time.time()
    for b in range(0, len(records), args.batch_size):
        batch = records[b:b + args.batch_size]
        images = torch.stack([transform(datasets.load_image(r.path, transform.size)) for r in batch])
        with torch.inference_mode():
            enc, probs = tags.encode(encoder, images)
            plain = search.decode(decoder, enc, word_map, **kw)
            captions[None] += plain
            for t in args.thresholds:
                constraints = [c for c, _ in guides[t].constraints(probs)]
                fired[t] += sum(bool(c) for c in constraints)
                for m in args.margins:
                    captions[(t, m)] += search.decode(decoder, enc, word_map, guides=constraints, guide_margin=m,
                                                      **kw) if any(constraints) else plain
        print(f'{b + len(batch)}/{len(records)} images, {time.time() - start:.0f} s', file=sys.stderr, flush=True)
    gts = {i: r.raws for i, r in enumerate(records)}

    def score(hyps):
        res = {i: [text.join_words(decoder.words(h['tokens'], rev), tokenizer)] for i, h in enumerate(hyps)}
        scores, _ = metrics.score_captions(gts, res, coco='auto', tokenizer=tokenizer)
        return res, scores

    objects = named_objects(records, tag_words, tokenizer)

    def recall(hyps):
        hits = [bool(forms & set(decoder.words(hyps[i]['tokens'], rev))) for i, forms in objects]
        return round(sum(hits) / max(len(hits), 1), 4)

    base_res, base = score(captions[None])
    rows = [{'setting': 'off', 'BLEU-4': round(base['Bleu_4'], 4), 'CIDEr': round(base['CIDEr'], 4), 'changed': 0,
             'object_recall': recall(captions[None])}]
    for t, m in settings:
        res, s = score(captions[(t, m)])
        changed = sum(res[i] != base_res[i] for i in res)
        rows.append({'setting': f'threshold {t} margin {m}', 'BLEU-4': round(s['Bleu_4'], 4),
                     'CIDEr': round(s['CIDEr'], 4), 'CIDEr_change': round(s['CIDEr'] - base['CIDEr'], 4),
                     'changed': changed, 'images_with_a_confident_tag': fired[t],
                     'object_recall': recall(captions[(t, m)])})
    examples = [(records[i].path, ' '.join(decoder.words(captions[None][i]['tokens'], rev)),
                 ' '.join(decoder.words(h['tokens'], rev)))
                for i, h in enumerate(captions[settings[0]]) if h.get('guided')][:8]
    report({'images': len(records), 'split': args.split, 'checkpoint': loading.checkpoint_label(args.checkpoint, True),
            'precision': precision, 'object_recall_pairs': len(objects), 'rows': rows, 'examples (first setting)': examples,
            'seconds': round(time.time() - start, 1), **environment(device)}, args.json)
    return 0


def named_objects(records, tag_words, tokenizer):
    """[(image index, the forms of a word)] for each image and mapped word (not 'dog') that 3 or more
    of the image's references name."""
    words = {w for ws in tag_words.values() for w in ws if w != 'dog'}
    base = {w: {w, w + 's'} for w in words if not (w.endswith('s') and w[:-1] in words)}
    out = []
    for i, r in enumerate(records):
        refs = [set(text.tokenize(raw, tokenizer)) for raw in r.raws]
        for w, forms in base.items():
            if sum(bool(forms & ref) for ref in refs) >= 3:
                out.append((i, forms))
    return out


if __name__ == '__main__':
    sys.exit(main())

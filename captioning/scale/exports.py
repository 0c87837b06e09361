"""Files the next tool reads, written from the captions: a NAME.txt sidecar beside each NAME.jpg (the
caption datasets of diffusion fine-tuning read them: kohya-ss, diffusers), and the COCO results
format, [{"image_id": int, "caption": str}] (the COCO evaluation server, pycocotools' loadRes and
every paper's scripts). Every file is written atomically; memory stays flat in the number of images.
"""
import json
import os

import utils

RESULTS_NAME = 'captions_results.json'      # 02's COCO results file, in --out
IDS_SUFFIX = '.ids.json'                     # beside a results file whose ids are made here: id -> image


class Sidecars:
    """NAME.txt for NAME.jpg: beside the image, or under `out_dir` in the same tree below `root` (for
    read-only photo collections). An existing file is never replaced unless `overwrite`; one that
    already holds these very lines (an earlier, interrupted run's) counts as done."""

    def __init__(self, root, out_dir=None, overwrite=False):
        self.root, self.out_dir, self.overwrite = os.path.abspath(root), out_dir, overwrite
        self.written, self.kept = 0, set()

    def path_for(self, image):
        stem = os.path.splitext(os.path.abspath(image))[0] + '.txt'
        if not self.out_dir:
            return stem
        return os.path.join(self.out_dir, os.path.relpath(stem, self.root))

    def write(self, image, lines):
        """Write `lines` (one caption a line) as `image`'s sidecar -> 'written', 'same' or 'kept'."""
        path = self.path_for(image)
        content = ''.join(line.replace('\n', ' ').strip() + '\n' for line in lines)
        if os.path.exists(path):
            with open(path, encoding='utf-8', errors='replace') as f:
                if f.read() == content:
                    return 'same'
            if not self.overwrite:
                self.kept.add(path)
                return 'kept'
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with utils.atomic_path(path) as tmp:
            with open(tmp, 'w', encoding='utf-8') as f:
                f.write(content)
        self.written += 1
        return 'written'


def sidecar_root(paths):
    """The folder the images' tree starts at (their deepest common folder)."""
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    return os.path.commonpath(folders) if folders else os.getcwd()


def sidecar_lines(record):
    """A captions.jsonl record -> its sidecar's lines: every caption (--num-captions), or the caption."""
    return [c['caption'] for c in record['captions']] if record.get('captions') else [record['caption']]


def stable_ids(paths):
    """{path: id} for images that carry no dataset id: their position in the list, from 0."""
    return {p: i for i, p in enumerate(paths)}


def write_results(path, items, ids_file=None):
    """Write the COCO results format, [{"image_id": int, "caption": str}], from (image_id, caption)
    pairs (streamed), and with `ids_file` ({id: image path}) the mapping of made-up ids beside it
    (PATH + .ids.json). -> the number of results."""
    count = 0
    with utils.atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write('[')
            for image_id, caption in items:
                f.write((',\n ' if count else '\n ') +
                        json.dumps({'image_id': int(image_id), 'caption': caption}, ensure_ascii=False))
                count += 1
            f.write('\n]\n' if count else ']\n')
    if ids_file is not None:
        utils.write_json(path + IDS_SUFFIX, {str(k): v for k, v in ids_file.items()}, indent=1)
    return count

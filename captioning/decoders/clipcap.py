"""ClipCap (Mokady et al., 2021): an image embedding -> a mapping network -> `prefix_length` prefix
embeddings that a GPT-2 continues into a caption, behind the decoder interface of captioning/decoders/interface.py.

    mapping 'mlp'          Linear(C, kE/2) - tanh - Linear(kE/2, kE), the paper's MLP (GPT-2 fine-tuned)
    mapping 'transformer'  Linear(C, cE) -> c positions, then k learned constant positions; a pre-norm
                           transformer (ReLU MLP of 2E, no dropout) over both; the last k are the
                           prefix (the paper's, with the LM frozen: --freeze-lm)
    lm 'scratch'           GPT-2 blocks (GPT2Config: lm_layers, lm_dim, lm_heads) randomly initialised
                           over the prepared word vocabulary (its output layer tied to the input
                           embedding, plus a bias): trains and is scored anywhere, offline included
    lm NAME or FOLDER      a pretrained GPT-2 (Hugging Face name, or a save_pretrained folder with
                           config, weights and tokenizer) over its own BPE vocabulary

The image embedding is the encoder grid mean-pooled ([B, P, C] -> [B, C]): any encoder of models.py,
or clip_vit_b32 whose grid is CLIP's one projected embedding. Every caption is fed as
    prefix (k embeddings), <start>, tokens ..., and must end with <end>
where, for a pretrained GPT-2, <start> and <end> are both its end-of-text token (GPT-2 has one token
for both) and the tokens are the BPE pieces of the caption. The prepared captions are word ids; a
table maps each word w of the word map to the fixed BPE pieces of " w" (GPT-2's pre-tokenizer splits
at spaces, so the pieces of " w1 w2 ..." are those of " w1", " w2", ...; tests check it) and
forward() converts a batch with it. <unk> maps to no piece (the word is left out: prepare with a
lower --min-word-freq to keep more words). Captions are only ever cut by their lengths, never by a
token id (GPT-2's token 0 is "!").

Chinese (jieba/chars) captions are joined without spaces and GPT-2's English BPE does not split
them at word boundaries: a pretrained LM is refused for them; `--lm scratch` over the word
vocabulary works for every language.

The search state is the KV cache as plain tensors (keys and values of each layer, [N, heads, T,
head_dim]), so selecting beams reorders the cache with the interface's default select.
Checkpoints: with --freeze-lm and a pretrained LM, the decoder's state_dict() leaves the LM out and
keeps `lm_digest` (SHA-256 of the LM's weights); loading rebuilds the LM from its name and refuses
weights whose digest differs. transformers is imported only when a ClipCap is built.
"""
import dataclasses
import hashlib
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioning import text
from captioning.decoders import interface

EXTRAS_HINT = 'pip install -r requirements-extras.txt'
SCRATCH = 'scratch'
MAPPINGS = ('mlp', 'transformer')
DIGEST_BYTES = 32                           # SHA-256
LM_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                   'pytorch_model.bin.index.json')


def import_transformers():
    """transformers, or ImportError saying how to install it (an optional extra)."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f'the clipcap decoder and the clip encoders need transformers: {EXTRAS_HINT}') from None
    transformers.logging.set_verbosity_error()   # no load reports or progress bars; failures still raise
    transformers.logging.disable_progress_bar()
    return transformers


@dataclasses.dataclass
class ClipCapConfig:
    vocab_size: int               # the prepared word map's size (the LM's own vocabulary when pretrained)
    encoder_dim: int
    lm: str = SCRATCH             # scratch | a Hugging Face GPT-2 name | a save_pretrained folder
    mapping: str = 'mlp'          # mlp | transformer
    prefix_length: int = 10       # k prefix embeddings (the paper: 10 for the MLP, 40 for the transformer)
    clip_length: int = 10         # transformer mapping: positions made from the image embedding
    mapping_layers: int = 8       # transformer mapping: layers
    mapping_heads: int = 8        # transformer mapping: attention heads (the paper's 8)
    freeze_lm: bool = False       # train only the mapping network (the paper's transformer variant)
    lm_layers: int = 4            # scratch LM: GPT-2 blocks,
    lm_dim: int = 256             # its width,
    lm_heads: int = 4             # its attention heads,
    lm_positions: int = 128       # and its positions (prefix + <start> + caption tokens)
    dropout: float = 0.1          # the LM's dropouts (GPT-2's own is 0.1)


class MLPMapping(nn.Module):
    """[B, C] -> [B, k, E] through Linear(C, kE/2), tanh, Linear(kE/2, kE) (the paper's MLP)."""

    def __init__(self, C, E, k):
        super().__init__()
        self.k = k
        self.model = nn.Sequential(nn.Linear(C, k * E // 2), nn.Tanh(), nn.Linear(k * E // 2, k * E))

    def forward(self, x):
        return self.model(x).view(x.size(0), self.k, -1)


class TransformerMapping(nn.Module):
    """[B, C] -> [B, k, E]: the embedding as c positions, k learned constant positions after them, a
    pre-norm transformer over all c + k, the last k out (the paper's mapper: 8 heads, ReLU MLP of
    2E, no dropout, no biases on queries/keys/values there, zero here after conversion)."""

    def __init__(self, C, E, k, clip_length, layers, heads):
        super().__init__()
        self.clip_length = clip_length
        self.linear = nn.Linear(C, clip_length * E)
        self.prefix_const = nn.Parameter(torch.randn(k, E))
        layer = nn.TransformerEncoderLayer(E, heads, 2 * E, dropout=0.0, activation='relu', batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):
        B = x.size(0)
        x = self.linear(x).view(B, self.clip_length, -1)                       # [B, c, E]
        x = torch.cat([x, self.prefix_const.expand(B, -1, -1)], dim=1)        # [B, c + k, E]
        return self.transformer(x)[:, self.clip_length:]                      # [B, k, E]


def _describe(error):
    """First line of an exception's message."""
    return (str(error).strip().splitlines() or [error.__class__.__name__])[0]


def is_local(name, flag):
    """True for an existing folder, False for a Hugging Face name; a missing folder given as a path
    ('./x', '../x', '/x', '~/x') is a ValueError rather than a hub lookup."""
    if os.path.isdir(os.path.expanduser(name)):
        return True
    if name.startswith(('.', '/', '~')) or os.path.exists(name):
        raise ValueError(f'{flag} {name}: no such folder')
    return False


def check_lm_folder(folder):
    """ValueError naming what a save_pretrained GPT-2 folder lacks (config, weights, tokenizer)."""
    files = set(os.listdir(folder))
    missing = []
    if 'config.json' not in files:
        missing.append('config.json')
    if not files & set(LM_WEIGHT_FILES):
        missing.append('weights (model.safetensors or pytorch_model.bin)')
    if 'tokenizer.json' not in files and not {'vocab.json', 'merges.txt'} <= files:
        missing.append('a tokenizer (tokenizer.json, or vocab.json + merges.txt)')
    if missing:
        raise ValueError(f'--lm {folder}: the folder lacks {", ".join(missing)} (save_pretrained of the model '
                         'and of its tokenizer writes them)')


def load_pretrained_lm(name, dropout):
    """(GPT2LMHeadModel, tokenizer) from a local folder (local files only) or a Hugging Face name (the
    local cache when offline); ValueError in one line when it cannot be found or is not a GPT-2."""
    transformers = import_transformers()
    local = is_local(name, '--lm')
    if local:
        name = os.path.expanduser(name)
        check_lm_folder(name)
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=local)
        if config.model_type != 'gpt2':
            raise ValueError(f'--lm {name}: a {config.model_type} model; ClipCap here continues a GPT-2 '
                             '(model_type gpt2)')
        model = transformers.GPT2LMHeadModel.from_pretrained(
            name, local_files_only=local, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=local)
    except ValueError as e:
        if str(e).startswith('--lm '):
            raise
        raise ValueError(f'--lm {name}: {_describe(e)}') from None
    except OSError as e:   # no such folder or hub name, no network, a missing file
        where = 'the folder' if local else 'not a local folder, and the Hugging Face hub (or its offline cache)'
        raise ValueError(f'--lm {name}: {where} could not give a GPT-2 ({_describe(e)}); pass a folder written by '
                         "save_pretrained (config, weights, tokenizer) or 'scratch'") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f'--lm {name}: its tokenizer has no end-of-text token')
    return model, tokenizer


def weights_digest(module):
    """SHA-256 (32 bytes as a uint8 tensor) of a module's weights: names and values, in name order."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return torch.tensor(list(h.digest()), dtype=torch.uint8)


class ClipCap(interface.Decoder):
    """See the module docstring. `gpt` is a transformers GPT2LMHeadModel (its parameter names, so the
    original ClipCap's state_dicts map onto it: convert_clipcap_state below)."""
    Config = ClipCapConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.mapping not in MAPPINGS:
            raise ValueError(f"--mapping must be one of {', '.join(MAPPINGS)}, got {cfg.mapping!r}")
        self.scratch = cfg.lm == SCRATCH
        if self.scratch:
            self.gpt, self.tokenizer = self._scratch_lm(cfg), None
        else:
            self.gpt, self.tokenizer = load_pretrained_lm(cfg.lm, cfg.dropout)
        self.vocab_size = self.gpt.config.vocab_size             # what step() scores
        E, C, k = self.gpt.config.n_embd, cfg.encoder_dim, cfg.prefix_length
        if cfg.mapping == 'mlp':
            self.mapping = MLPMapping(C, E, k)
        else:
            if E % cfg.mapping_heads:
                raise ValueError(f'the LM width {E} must be a multiple of the mapping heads {cfg.mapping_heads}')
            self.mapping = TransformerMapping(C, E, k, cfg.clip_length, cfg.mapping_layers, cfg.mapping_heads)
        self.register_buffer('lm_digest', torch.zeros(DIGEST_BYTES, dtype=torch.uint8))
        self.register_buffer('word_pieces', None, persistent=False)          # [V_words, K] (pretrained LM)
        self.register_buffer('word_piece_counts', None, persistent=False)    # [V_words]
        if cfg.freeze_lm:
            self.gpt.requires_grad_(False)
            if not self.scratch:   # named weights: checkpoints hold their digest instead of them
                self.lm_digest.copy_(weights_digest(self.gpt))
        self.register_state_dict_post_hook(ClipCap._drop_reference_lm)
        self.register_load_state_dict_pre_hook(ClipCap._restore_reference_lm)

    @staticmethod
    def _scratch_lm(cfg):
        transformers = import_transformers()
        if cfg.lm_dim % cfg.lm_heads:
            raise ValueError(f'--lm-dim {cfg.lm_dim} must be a multiple of --lm-heads {cfg.lm_heads}')
        config = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.lm_positions, n_embd=cfg.lm_dim, n_layer=cfg.lm_layers,
            n_head=cfg.lm_heads, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            bos_token_id=None, eos_token_id=None)
        gpt = transformers.GPT2LMHeadModel(config)
        # like the other decoders' output layer, with a bias; its weight stays the input embedding's
        gpt.lm_head = nn.Linear(cfg.lm_dim, cfg.vocab_size, bias=True)
        gpt.lm_head.weight = gpt.transformer.wte.weight
        nn.init.zeros_(gpt.lm_head.bias)
        return gpt

    @property
    def fc(self):
        """The output layer (hidden -> LM vocabulary scores)."""
        return self.gpt.lm_head

    @property
    def reference_lm(self):
        """True when checkpoints name the LM (pretrained and frozen) instead of holding it."""
        return self.cfg.freeze_lm and not self.scratch

    def train(self, mode=True):
        super().train(mode)
        if self.cfg.freeze_lm:   # a frozen LM runs without dropout, as the paper's
            self.gpt.eval()
        return self

    # -- checkpoints: a frozen pretrained LM is named and digested, not stored ------------------

    def _drop_reference_lm(self, state_dict, prefix, local_metadata):
        if self.reference_lm:
            for key in [k for k in state_dict if k.startswith(prefix + 'gpt.')]:
                del state_dict[key]

    def _restore_reference_lm(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A state without the LM gets the LM built here, once its digest matches the stored one."""
        if not self.reference_lm or any(k.startswith(prefix + 'gpt.') for k in state_dict):
            return
        stored = state_dict.get(prefix + 'lm_digest')
        if stored is None or not torch.equal(stored.to(torch.uint8).cpu(), self.lm_digest.cpu()):
            raise ValueError(f'the LM {self.cfg.lm} loaded here differs from the one this checkpoint was trained '
                             'with (LM weights digest mismatch): use the same GPT-2 weights, or a checkpoint that '
                             'holds its LM (trained without --freeze-lm)')
        state_dict.update(self.gpt.state_dict(prefix=prefix + 'gpt.', keep_vars=True))

    # -- vocabulary -------------------------------------------------------------------------

    def use_word_map(self, word_map, tokenizer=text.DEFAULT_TOKENIZER):
        """Build the word -> LM pieces table forward() converts prepared captions with (a pretrained
        LM; the scratch LM's vocabulary is the word map itself)."""
        if self.scratch:
            return
        if tokenizer != 'words':
            raise ValueError(f"a pretrained GPT-2 (--lm {self.cfg.lm}) needs captions of space-separated words; "
                             f"these were prepared with the {tokenizer} tokenizer (joined without spaces): "
                             'use --lm scratch')
        if sorted(word_map.values()) != list(range(len(word_map))):
            raise ValueError('the word map ids must be 0 .. len - 1')
        eos = self.tokenizer.eos_token_id
        words = [w for w in word_map if w not in ('<start>', '<end>', '<pad>', '<unk>')]
        encoded = self.tokenizer([' ' + w for w in words], add_special_tokens=False)['input_ids'] if words else []
        pieces = [[] for _ in word_map]                      # <pad> and <unk>: no pieces
        for w, ids in zip(words, encoded):
            pieces[word_map[w]] = ids
        pieces[word_map['<start>']] = pieces[word_map['<end>']] = [eos]
        K = max(len(p) for p in pieces)
        table = torch.full((len(pieces), K), eos, dtype=torch.long)
        for i, p in enumerate(pieces):
            table[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        device = self.lm_digest.device
        self.word_pieces = table.to(device)
        self.word_piece_counts = torch.tensor([len(p) for p in pieces], device=device)

    def lm_captions(self, captions, lengths):
        """Prepared captions [N, L] (word ids: <start> w ... <end> <pad>...) with lengths [N] -> the LM's
        tokens [N, L'] and lengths [N]. Only positions before a caption's length count; what lies
        after it (any id) is never read."""
        lengths = lengths.view(-1)
        if self.scratch:
            return captions, lengths
        if self.word_pieces is None:
            raise RuntimeError('ClipCap.use_word_map(word_map) must be called before training a pretrained LM')
        N, L = captions.shape
        K = self.word_pieces.size(1)
        inside = torch.arange(L, device=captions.device) < lengths.unsqueeze(1)             # [N, L]
        counts = self.word_piece_counts[captions] * inside                                  # [N, L]
        keep = (torch.arange(K, device=captions.device) < counts.unsqueeze(2)).view(N, L * K)   # [N, L*K]
        pieces = self.word_pieces[captions].view(N, L * K)                                  # [N, L*K]
        new_lengths = keep.sum(1)                                                           # [N]
        out = captions.new_full((N, int(new_lengths.max())), self.tokenizer.eos_token_id)  # filler, never read
        rows = torch.arange(N, device=captions.device).unsqueeze(1).expand(N, L * K)
        out[rows[keep], (keep.cumsum(1) - 1)[keep]] = pieces[keep]
        return out, new_lengths

    def special_tokens(self, word_map, allow_unk=False):
        if self.scratch:
            return super().special_tokens(word_map, allow_unk)
        eos = self.tokenizer.eos_token_id
        return eos, eos, []

    def words(self, tokens, rev_word_map):
        if self.scratch:
            return super().words(tokens, rev_word_map)
        eos = self.tokenizer.eos_token_id
        return text.words(self.tokenizer.decode([t for t in tokens if t != eos]))

    # -- the decoder interface ------------------------------------------------------------------

    def prefix(self, features):
        """Encoder grid [B, g, g, C] or [B, P, C] -> prefix embeddings [B, k, E] (from the mean feature)."""
        return self.mapping(features.flatten(1, -2).mean(dim=1))

    def _check_positions(self, n):
        limit = self.gpt.config.n_positions
        if n > limit:
            raise ValueError(f'ClipCap: {n} positions (prefix {self.cfg.prefix_length} + <start> + tokens) exceed '
                             f"the LM's {limit}; lower --max-len (or train a scratch LM with more --lm-positions)")

    def prepare(self, features, k=None):
        return (self.prefix(features),)                                       # [B, k, E]

    def init_state(self, memory, k):
        """The LM run once over each image's prefix; its cache copied for the k beams."""
        out = self.gpt.transformer(inputs_embeds=memory[0], use_cache=True)
        return tuple(t.repeat_interleave(k, dim=0) for t in _cache_tensors(out.past_key_values))

    def step(self, tokens, state, memory):
        """tokens [N] -> logp [N, V]; state: the keys and values of every layer [N, H, T, Dh]."""
        self._check_positions(state[0].size(2) + 1)
        cache = import_transformers().DynamicCache(ddp_cache_data=list(zip(state[0::2], state[1::2])))
        out = self.gpt.transformer(inputs_embeds=self.gpt.transformer.wte(tokens).unsqueeze(1),
                                   past_key_values=cache, use_cache=True)
        logp = F.log_softmax(self.fc(out.last_hidden_state[:, 0]).float(), dim=1)      # [N, V]
        return logp, _cache_tensors(out.past_key_values), None

    def forward(self, features, captions, lengths, image_index=None):
        """Teacher forcing: the prefix once per image, the LM once over [prefix, <start>, tokens]
        per caption, the output layer once over the packed positions."""
        captions, lengths = self.lm_captions(captions, lengths)
        captions, decode_lengths, rows, sort_ind, targets = interface.sort_captions(captions, lengths, image_index)
        k, T = self.cfg.prefix_length, decode_lengths[0]
        self._check_positions(k + T)
        prefix = self.prefix(features).index_select(0, rows)                  # [N, k, E]; see ShowAttendTell
        x = torch.cat([prefix, self.gpt.transformer.wte(captions[:, :T])], dim=1)   # [N, k + T, E]
        hidden = self.gpt.transformer(inputs_embeds=x, use_cache=False).last_hidden_state[:, k:]   # [N, T, E]
        scores = self.fc(pack_padded_sequence(hidden, decode_lengths, batch_first=True).data)     # [M, V]
        return interface.DecoderOutput(scores, targets, decode_lengths, None, sort_ind)


def _cache_tensors(cache):
    """A transformers cache -> (keys 0, values 0, keys 1, ...) each [N, H, T, Dh]."""
    return tuple(t for layer in cache.layers for t in (layer.keys, layer.values))


# ----------------------------------------------------------------------------------------------
# The original ClipCap's checkpoints (github rmokady/CLIP_prefix_caption): plain state_dicts of its
# ClipCaptionModel / ClipCaptionPrefix, with 'gpt.*' (GPT2LMHeadModel, as clipcap.ClipCap's) and
# 'clip_project.*' (its MLP, or its TransformerMapper).

# its transformer mapper's layer names -> nn.TransformerEncoderLayer's (queries/keys/values apart)
_MAPPER_LAYER_NAMES = {'norm1': 'norm1', 'norm2': 'norm2', 'attn.project': 'self_attn.out_proj',
                       'mlp.fc1': 'linear1', 'mlp.fc2': 'linear2'}


def is_old_gpt2_buffer(key):
    """The causal-mask buffers older transformers saved in GPT-2 state_dicts ('...attn.bias' and
    '...attn.masked_bias'; not the parameters 'attn.c_attn.bias' / 'attn.c_proj.bias'), which newer
    GPT2LMHeadModels lack and reject."""
    return key.endswith(('.attn.bias', '.attn.masked_bias'))


def convert_clipcap_state(state):
    """An original ClipCap state_dict -> (clipcap.ClipCap state_dict without 'lm_digest', the settings
    it implies: mapping, prefix_length and, for the transformer, clip_length and mapping_layers).

    The GPT-2 mask buffers are dropped; 'clip_project.*' becomes 'mapping.*': the MLP keeps its
    names, the transformer mapper's layers take nn.TransformerEncoderLayer's, its separate query and
    key/value projections joined into one (biases zero where it had none). ValueError names a key
    it does not know."""
    out, layers = {}, {}
    for key, value in state.items():
        if key.startswith('gpt.'):
            if not is_old_gpt2_buffer(key):
                out[key] = value
        elif key.startswith('clip_project.model.') or key in ('clip_project.linear.weight', 'clip_project.linear.bias',
                                                               'clip_project.prefix_const'):
            out['mapping.' + key[len('clip_project.'):]] = value
        elif key.startswith('clip_project.transformer.layers.'):
            n, rest = key[len('clip_project.transformer.layers.'):].split('.', 1)
            layers.setdefault(int(n), {})[rest] = value
        else:
            raise ValueError(f'not a ClipCap state_dict this converter knows: unexpected key {key!r}')
    if 'gpt.transformer.wte.weight' not in out:
        raise ValueError("not a ClipCap state_dict: no 'gpt.transformer.wte.weight'")
    E = out['gpt.transformer.wte.weight'].size(1)
    for n, parts in sorted(layers.items()):
        prefix = f'mapping.transformer.layers.{n}.'
        q, kv = parts.pop('attn.to_queries.weight'), parts.pop('attn.to_keys_values.weight')   # [E, E], [2E, E]
        q_bias, kv_bias = parts.pop('attn.to_queries.bias', None), parts.pop('attn.to_keys_values.bias', None)
        out[prefix + 'self_attn.in_proj_weight'] = torch.cat([q, kv])                           # [3E, E]: q, k, v
        out[prefix + 'self_attn.in_proj_bias'] = torch.cat([
            q_bias if q_bias is not None else q.new_zeros(E), kv_bias if kv_bias is not None else kv.new_zeros(2 * E)])
        for rest, value in parts.items():
            name, _, kind = rest.rpartition('.')
            if name not in _MAPPER_LAYER_NAMES:
                raise ValueError(f'not a ClipCap state_dict this converter knows: unexpected key '
                                 f'clip_project.transformer.layers.{n}.{rest}')
            out[prefix + _MAPPER_LAYER_NAMES[name] + '.' + kind] = value
    if 'mapping.model.2.weight' in out:
        settings = {'mapping': 'mlp', 'prefix_length': out['mapping.model.2.weight'].size(0) // E}
    elif 'mapping.prefix_const' in out:
        settings = {'mapping': 'transformer', 'prefix_length': out['mapping.prefix_const'].size(0),
                    'clip_length': out['mapping.linear.weight'].size(0) // E, 'mapping_layers': len(layers)}
    else:
        raise ValueError('not a ClipCap state_dict this converter knows: no MLP or transformer mapper '
                         '(clip_project.model.* / clip_project.prefix_const)')
    return out, settings

"""Captioning models as ONNX files for deployment: export a checkpoint's encoder and one decoder step
(tools/export_onnx.py), and caption with them through onnxruntime behind the same Decoder interface as
the PyTorch decoders, so the one beam search (search.beam_search) runs over either.

An export folder holds
    encoder.onnx          images [B, 3, S, S] (normalised as transform says) -> features [B, g, g, C]
    decoder_prepare.onnx  features [B, P, C] -> the per-image memory (decoder.prepare)
    decoder_step.onnx     tokens [N], state..., the memory the step reads -> logp [N, V], state...,
                          (alpha [N, P] for decoders with attention): decoder.step for N = B * k rows
    captioner.json        what runs them: decoder name and Config, the word map, the image transform,
                          the graphs' input and output names
The beam search, the image transform and the rest of the decoder interface (init_state, select,
select_memory: indexing) stay in Python; the networks run in onnxruntime. sat, dot_attention,
show_tell and repeat_bilstm export; ClipCap (a GPT-2 with a growing key/value cache) does not yet.
Exported with torch.onnx.export(dynamo=True), which needs the onnx and onnxscript packages.
"""
import contextlib
import io
import json
import os
import warnings

import numpy as np
import torch
from torch import nn

import utils
from captioning.decoders import interface, registry

META_FILE = 'captioner.json'
META_FORMAT = 1
OPSET = 18
EXTRAS = {'onnxruntime': 'onnxruntime==1.32.0', 'onnx': 'onnx==1.23.2', 'onnxscript': 'onnxscript==0.7.2'}

# How each exportable decoder's interface maps onto graphs: the names of its memory (prepare's
# outputs, per image) and state (per beam row), and which memory entries step() reads.
GRAPHS = {
    'sat': {'memory': ['values', 'keys', 'h0', 'c0'], 'state': ['h', 'c'], 'step_memory': [0, 1]},
    'dot_attention': {'memory': ['values', 'keys', 'h0', 'c0'], 'state': ['h', 'c'], 'step_memory': [0, 1]},
    'show_tell': {'memory': ['h0', 'c0'], 'state': ['h', 'c'], 'step_memory': []},
    'repeat_bilstm': {'memory': ['position_logp'], 'state': ['position'], 'step_memory': [0]},
}


def missing(*packages):
    """The one line that says which of `packages` are not installed and how to get them, or None."""
    import importlib
    absent = []
    for p in packages:
        try:
            importlib.import_module(p)
        except ImportError:
            absent.append(p)
    if not absent:
        return None
    return (f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed: pip install "
            f"{' '.join(EXTRAS[p] for p in absent)} (requirements-extras.txt)")


# ----------------------------------------------------------------------------------------------
# Export: graph wrappers around the PyTorch modules' own methods (the same code the beam search runs)

class PrepareGraph(nn.Module):
    """features [B, P, C] -> decoder.prepare's memory (no search workspace)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, features):
        return tuple(self.decoder.prepare(features))


class StepGraph(nn.Module):
    """(tokens, *state, *the memory step reads) -> (logp, *state[, alpha]): decoder.step."""

    def __init__(self, decoder, spec):
        super().__init__()
        self.decoder, self.n_state = decoder, len(spec['state'])
        self.n_memory, self.step_memory = len(spec['memory']), list(spec['step_memory'])

    def forward(self, tokens, *tensors):
        state = tuple(tensors[:self.n_state])
        memory = [None] * self.n_memory
        for i, t in zip(self.step_memory, tensors[self.n_state:]):
            memory[i] = t
        logp, state, alpha = self.decoder.step(tokens, state, tuple(memory))
        return (logp, *state) + ((alpha,) if alpha is not None else ())


class RepeatBiLSTMStepGraph(nn.Module):
    """RepeatBiLSTM.step as tensor operations: its step reads the position as a Python number, which a
    graph cannot; this reads it as a tensor (the same values: the position's row of the precomputed
    log-probabilities, the last one past max_len, for each of the k rows of an image)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, tokens, position, position_logp):
        n, T, V = position_logp.shape
        t = position[:1].clamp(max=T - 1)                                      # rows move in lockstep
        row = position_logp.index_select(1, t).squeeze(1)                      # [n, V]
        k = tokens.shape[0] // n
        return row.unsqueeze(1).expand(n, k, V).reshape(n * k, V), position + 1


def _export(module, args, path, input_names, output_names, dynamic_shapes):
    """torch.onnx.export (dynamo) of one graph into one file (atomically), its progress lines kept quiet
    unless it fails."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(), utils.atomic_path(path) as tmp:
            warnings.simplefilter('ignore')    # notes on dynamic axis names and deprecations, not problems
            torch.onnx.export(module.eval(), args, tmp, input_names=input_names, output_names=output_names,
                              dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False, opset_version=OPSET)
    except Exception:
        print(out.getvalue())
        raise


def exportable(name):
    """ValueError (one line) unless decoder `name` can be exported."""
    if name not in GRAPHS:
        raise ValueError(f"the {name} decoder does not export to ONNX yet; these do: {', '.join(GRAPHS)}")


@torch.no_grad()
def export(encoder, decoder, config, word_map, out_dir, source=''):
    """Write encoder.onnx, decoder_prepare.onnx, decoder_step.onnx and captioner.json into out_dir
    (models in eval mode, fp32, on CPU). Returns the metadata written."""
    name = config['decoder']
    exportable(name)
    problem = missing('onnx', 'onnxscript')
    if problem:
        raise ImportError(f'exporting to ONNX needs torch.onnx\'s exporter packages: {problem}')
    encoder, decoder = encoder.float().cpu().eval(), decoder.float().cpu().eval()
    spec = GRAPHS[name]
    os.makedirs(out_dir, exist_ok=True)
    B, N = torch.export.Dim('images', min=1), torch.export.Dim('rows', min=1)
    S = encoder.image_size

    # Example inputs of 2 images x 3 beams (sizes of 1 would be taken for constants).
    images = torch.randn(2, 3, S, S)
    _export(encoder, (images,), os.path.join(out_dir, 'encoder.onnx'), ['images'], ['features'], ({0: B},))
    features = encoder(images)
    features = features.reshape(2, -1, features.size(-1))                     # [2, P, C]
    _export(PrepareGraph(decoder), (features,), os.path.join(out_dir, 'decoder_prepare.onnx'), ['features'],
            spec['memory'], ({0: B},))

    k = 3
    memory = decoder.prepare(features)
    state = decoder.init_state(memory, k)
    tokens = torch.full((2 * k,), word_map['<start>'], dtype=torch.long)
    step_memory = [memory[i] for i in spec['step_memory']]
    step = RepeatBiLSTMStepGraph(decoder) if name == 'repeat_bilstm' else StepGraph(decoder, spec)
    inputs = ['tokens'] + spec['state'] + [spec['memory'][i] for i in spec['step_memory']]
    outputs = ['logp'] + [f'{s}_out' for s in spec['state']] + (['alpha'] if decoder.has_attention else [])
    rest = tuple({0: N} for _ in state) + tuple({0: B} for _ in step_memory)
    dynamic = ({0: N}, *rest) if name == 'repeat_bilstm' else ({0: N}, rest)   # StepGraph: (tokens, *tensors)
    _export(step, (tokens, *state, *step_memory), os.path.join(out_dir, 'decoder_step.onnx'), inputs, outputs,
            dynamic)

    meta = {'format': META_FORMAT, 'source': os.path.basename(source), 'decoder': name,
            'decoder_args': decoder.args(), 'encoder': encoder.name, 'transform': encoder.transform_config(),
            'encoded_image_size': encoder.encoded_image_size, 'encoder_dim': encoder.encoder_dim,
            'tokenizer': config.get('tokenizer') or 'words', 'word_map': word_map, 'opset': OPSET,
            'torch': torch.__version__, 'prepare_outputs': spec['memory'], 'step_inputs': inputs,
            'step_outputs': outputs, **{k: spec[k] for k in ('memory', 'state', 'step_memory')}}
    with utils.atomic_path(os.path.join(out_dir, META_FILE)) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(meta, f, ensure_ascii=False)
    return meta


# ----------------------------------------------------------------------------------------------
# Runtime: onnxruntime sessions behind the encoder call and the Decoder interface

def _session(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])


def _run(session, names, tensors):
    """Run an onnxruntime session on torch tensors (CPU) -> torch tensors."""
    feed = {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(names, tensors)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


class OnnxEncoder:
    """encoder.onnx as the encoder call of captioning: images [B, 3, S, S] -> [B, g, g, C] (torch, CPU)."""

    def __init__(self, folder, meta, threads=None):
        self.session = _session(os.path.join(folder, 'encoder.onnx'), threads)
        self.name, self.meta = meta['encoder'], meta
        self.image_size, self.encoded_image_size = meta['transform']['size'], meta['encoded_image_size']
        self.encoder_dim = meta['encoder_dim']

    def transform_config(self):
        return dict(self.meta['transform'])

    def __call__(self, images):
        return _run(self.session, ['images'], [images.float()])[0]

    def eval(self):
        return self


class OnnxDecoder(interface.Decoder):
    """decoder_prepare.onnx and decoder_step.onnx behind the Decoder interface (decoders/interface.py). What is
    not a network (init_state, select_memory, step_limit: repeats and indexing) is the PyTorch
    decoder class's own code, run on this object."""

    def __init__(self, folder, meta, threads=None):
        cls = registry.decoder_class(meta['decoder'])
        super().__init__(cls.Config(**meta['decoder_args']))
        self.reference, self.meta, self.has_attention = cls, meta, cls.has_attention
        self.prepare_session = _session(os.path.join(folder, 'decoder_prepare.onnx'), threads)
        self.step_session = _session(os.path.join(folder, 'decoder_step.onnx'), threads)
        self.n_state = len(meta['state'])

    def prepare(self, features, k=None):
        features = features.reshape(features.size(0), -1, features.size(-1))
        return tuple(_run(self.prepare_session, ['features'], [features.float()]))

    def init_state(self, memory, k):
        return self.reference.init_state(self, memory, k)

    def select_memory(self, memory, keep):
        return self.reference.select_memory(self, memory, keep)

    def step_limit(self):
        return self.reference.step_limit(self)

    def step(self, tokens, state, memory):
        outs = _run(self.step_session, self.meta['step_inputs'],
                    [tokens.long(), *state, *(memory[i] for i in self.meta['step_memory'])])
        alpha = outs[1 + self.n_state] if self.has_attention else None
        return outs[0], tuple(outs[1:1 + self.n_state]), alpha


def read_meta(folder):
    """captioner.json of an export folder (ValueError, one line, when it is not one)."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        raise ValueError(f'{folder}: not an ONNX export folder (no {META_FILE}; write one with tools/export_onnx.py)')
    with open(path, encoding='utf-8') as f:
        meta = json.load(f)
    if meta.get('format') != META_FORMAT:
        raise ValueError(f"{path}: export format {meta.get('format')!r}, this code reads {META_FORMAT}")
    for name in ('encoder.onnx', 'decoder_prepare.onnx', 'decoder_step.onnx'):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f'{folder}: {name} is missing (re-run tools/export_onnx.py)')
    return meta


def load_onnx_captioner(folder, threads=None):
    """-> (encoder, decoder, word_map, config) from an export folder, as loading.load_captioner gives
    from a checkpoint: search.beam_search and files.caption_paths take them as they are.
    `threads`: onnxruntime's intra-op threads (None: its default, one per core)."""
    problem = missing('onnxruntime')
    if problem:
        raise ImportError(f'running ONNX exports needs onnxruntime: {problem}')
    meta = read_meta(folder)
    config = {'decoder': meta['decoder'], 'decoder_args': meta['decoder_args'], 'encoder': meta['encoder'],
              'tokenizer': meta['tokenizer'], 'image_size': meta['transform']['size'],
              'encoded_image_size': meta['encoded_image_size']}
    return (OnnxEncoder(folder, meta, threads), OnnxDecoder(folder, meta, threads), meta['word_map'], config)


def caption_files(captioner, paths, beam_size=3, **beam_kw):
    """Caption image files one by one with (encoder, decoder, word_map, config) from load_captioner or
    load_onnx_captioner, with the inference defaults of 02_inference.py unless beam_kw says otherwise.
    -> one word list per path (None for a file that could not be read)."""
    from captioning.decoding import files, search
    encoder, decoder, word_map, _ = captioner
    beam_kw = {'length_norm': search.DEFAULT_LENGTH_NORM, 'no_repeat_ngram_size': search.DEFAULT_NO_REPEAT_NGRAM,
               **beam_kw}
    results, _ = files.caption_paths(encoder, decoder, word_map, paths, beam_sizes=(beam_size,), batch_size=1,
                                       progress=False, **beam_kw)
    return [r[beam_size]['words'] if r else None for r in results]

"""The suite's internals, one folder per concern; the numbered scripts at the root drive them.

    decoders/     the Decoder interface, the LSTM decoders, the Transformer, ClipCap, and the registry
    preparation/  dataset-format readers, the pipeline 00_create_input_files.py runs, the synthetic set
    decoding/     the beam search and sampler, loading a model or an ensemble, captioning files,
                  attention figures, the shared flags of 02/03/04, int8, ONNX
    training/     the objective, self-critical training, validation, the run folder, curves (01_train.py)
    scoring/      caption metrics and CIDEr-D
    scale/        streaming captions.jsonl, work shared over torchrun processes
    serving/      the server's model thread, loaded model, upload checks, memory allocator (04_serve.py)
    tutorial/     reading the tutorial's pickled checkpoints without running their code
    captioning/checkpoint.py the checkpoint format;  captioning/text.py  caption text and tokenizers

The design card's modules stay at the root: models.py (encoders, building a model), datasets.py
(images, prepared data, feature caches) and utils.py (small shared helpers).
"""

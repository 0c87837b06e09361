# Two commands from a fresh clone:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

# Create the virtual environment and install the pinned requirements (once; again when they change).
$(STAMP): requirements.txt requirements-extras.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-extras.txt -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

# Build the synthetic set, train on CPU, caption held-out images, score them, draw attention maps.
demo: $(STAMP)
	$(PY) demo.py

# -rs: every skip says why (a missing extra, Java, Chromium, TUTORIAL_REPO)
test: $(STAMP)
	$(PY) -m pytest -q -rs tests

clean:
	rm -rf outputs/demo

# Every CUDA path in one table (AMP bf16/fp16 per decoder, --compile, NCCL DDP, caching, inference, server),
# the rows that matter most first, within GPU_CHECK_BUDGET seconds (8 minutes by its own estimate on one
# H100); the table is rewritten in GPU_CHECK_OUT after every row, so a run cut off still reports. Exits 2
# without CUDA. Not part of `make test` (its dry run on the simulated CUDA device is: docs/gpu.md).
GPU_CHECK_OUT ?= outputs/gpu_check.md
GPU_CHECK_BUDGET ?= 480
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) --budget $(GPU_CHECK_BUDGET)

# Reproduce the provided checkpoints and their ensemble, the scripts' default (recipe and ablations in
# checkpoints/README.md): `make flickr8k-checkpoint` trains both members, then scores the pair on VAL.
# One member: `make flickr8k-member FLICKR8K_ENCODER=efficientnet_lite0` (or efficientnet_lite2), two
# training stages of about an hour each on 2 CPU cores, exported as checkpoints/flickr8k_<encoder>_fp16.pt.
# Flickr8k in Karpathy format: the split JSON and the image folder (defaults: this workplace's copy of train+val).
# Stage 1: cross-entropy on frozen, cached encoder features, selected by VAL BLEU-4; its best is exported.
# Stage 2: self-critical training (CIDEr-D reward) from that export, selected by VAL CIDEr; exported as the
# provided checkpoint and scored on VAL. Both stages validate without the no-repeat constraint, as they did
# when the provided checkpoints were trained.
FLICKR8K_JSON ?= ../shared/datasets/flickr8k/dataset_flickr8k.json
FLICKR8K_IMAGES ?= ../shared/datasets/flickr8k/images
FLICKR8K_ENCODER ?= efficientnet_lite0
FLICKR8K_SCST_EPOCHS ?= 6
FLICKR8K_NAME := flickr8k_5_cap_per_img_5_min_word_freq
FLICKR8K_RUN = runs/flickr8k_$(FLICKR8K_ENCODER)
FLICKR8K_SCST_RUN = runs/flickr8k_$(FLICKR8K_ENCODER)_scst
FLICKR8K_MEMBER = checkpoints/flickr8k_$(FLICKR8K_ENCODER)_fp16.pt
PROVIDED_PAIR := checkpoints/flickr8k_efficientnet_lite0_fp16.pt checkpoints/flickr8k_efficientnet_lite2_fp16.pt

.PHONY: flickr8k-checkpoint flickr8k-member
flickr8k-checkpoint: $(STAMP)
	$(MAKE) flickr8k-member FLICKR8K_ENCODER=efficientnet_lite0
	$(MAKE) flickr8k-member FLICKR8K_ENCODER=efficientnet_lite2
	$(PY) 03_evaluate.py --checkpoint $(PROVIDED_PAIR) --data-folder data/flickr8k --split VAL \
	    --beam-sizes 1 3 5 --out runs/flickr8k_ensemble_val_metrics.json

flickr8k-member: $(STAMP)
	$(MAKE) flickr8k-data
	$(PY) 01_train.py --data-folder data/flickr8k --encoder $(FLICKR8K_ENCODER) --encoder-weights imagenet \
	    --epochs 12 --workers 0 --val-beam-size 3 --val-no-repeat-ngram 0 --ema-decay 0.999 \
	    --label-smoothing 0.1 --lr-patience 2 --early-stop 4 --out-dir $(FLICKR8K_RUN)
	$(PY) tools/export_checkpoint.py $(FLICKR8K_RUN)/BEST_checkpoint_$(FLICKR8K_NAME).pt $(FLICKR8K_RUN)/xe_fp16.pt
	$(PY) 01_train.py --objective scst --init-from $(FLICKR8K_RUN)/xe_fp16.pt --data-folder data/flickr8k \
	    --epochs $(FLICKR8K_SCST_EPOCHS) --workers 0 --val-beam-size 3 --val-no-repeat-ngram 0 \
	    --out-dir $(FLICKR8K_SCST_RUN)
	$(PY) tools/export_checkpoint.py $(FLICKR8K_SCST_RUN)/BEST_checkpoint_$(FLICKR8K_NAME).pt $(FLICKR8K_MEMBER)
	$(PY) 03_evaluate.py --checkpoint $(FLICKR8K_MEMBER) --data-folder data/flickr8k --split VAL \
	    --beam-sizes 1 3 5 --out $(FLICKR8K_SCST_RUN)/val_metrics.json

# Prepare Flickr8k-CN (Chinese captions by native speakers for the Flickr8k train+val images; see
# ../shared/datasets/flickr8k-cn/README.md) for training: jieba segmentation (chosen automatically,
# recorded in data/flickr8k_cn/TOKENIZER_*.json), the official train/val lists; the test split is held out.
FLICKR8K_CN_CAPTIONS ?= ../shared/datasets/flickr8k-cn/flickr8kzhc.caption.txt
FLICKR8K_CN_TRAIN ?= ../shared/datasets/flickr8k-cn/flickr8ktrain.txt
FLICKR8K_CN_VAL ?= ../shared/datasets/flickr8k-cn/flickr8kval.txt
FLICKR8K_CN_IMAGES ?= $(FLICKR8K_IMAGES)
FLICKR8K_CN_DATA ?= data/flickr8k_cn

.PHONY: flickr8k-cn-data
flickr8k-cn-data: $(STAMP)
	$(PY) 00_create_input_files.py --dataset flickr8k_cn --captions-file $(FLICKR8K_CN_CAPTIONS) \
	    --train-list $(FLICKR8K_CN_TRAIN) --val-list $(FLICKR8K_CN_VAL) --tokenizer jieba \
	    --image-folder $(FLICKR8K_CN_IMAGES) --output-folder $(FLICKR8K_CN_DATA)

# The provided Chinese checkpoints: `sat` (the best decoder by Flickr8k VAL in the model zoo) on frozen
# EfficientNet-Lite0 and Lite2 features, each trained on Flickr8k-CN TRAIN with the English members' recipe
# (cross-entropy selected by VAL BLEU-4, then a self-critical stage with the end-aware CIDEr-D reward on
# jieba words, 6 epochs, selected by VAL CIDEr), exported as checkpoints/flickr8k_cn_<encoder>_fp16.pt;
# their ensemble (the Chinese default) is scored on VAL. On 2 CPU cores: Lite0 about 75 + 22 min, Lite2
# about 10 (feature caching) + 27 + 16 min. One member:
#     make flickr8k-cn-member FLICKR8K_CN_ENCODER=efficientnet_lite2
# Lite0's cross-entropy stage is kept as $(PROVIDED_CN_XE); the others' stay in their run folders.
FLICKR8K_CN_NAME := flickr8k_cn_5_cap_per_img_5_min_word_freq
FLICKR8K_CN_ENCODER ?= efficientnet_lite0
FLICKR8K_CN_RUN = runs/flickr8k_cn_$(FLICKR8K_CN_ENCODER)
FLICKR8K_CN_SCST_RUN = runs/flickr8k_cn_$(FLICKR8K_CN_ENCODER)_scst
FLICKR8K_CN_MEMBER = checkpoints/flickr8k_cn_$(FLICKR8K_CN_ENCODER)_fp16.pt
PROVIDED_CN_XE := checkpoints/flickr8k_cn_efficientnet_lite0_xe_fp16.pt
FLICKR8K_CN_XE = $(if $(filter efficientnet_lite0,$(FLICKR8K_CN_ENCODER)),$(PROVIDED_CN_XE),$(FLICKR8K_CN_RUN)/xe_fp16.pt)
PROVIDED_CN_PAIR := checkpoints/flickr8k_cn_efficientnet_lite0_fp16.pt checkpoints/flickr8k_cn_efficientnet_lite2_fp16.pt

.PHONY: flickr8k-cn-checkpoint flickr8k-cn-member flickr8k-cn-scst
flickr8k-cn-checkpoint: $(STAMP)
	$(MAKE) flickr8k-cn-member FLICKR8K_CN_ENCODER=efficientnet_lite0
	$(MAKE) flickr8k-cn-member FLICKR8K_CN_ENCODER=efficientnet_lite2
	$(PY) 03_evaluate.py --checkpoint $(PROVIDED_CN_PAIR) --data-folder $(FLICKR8K_CN_DATA) --split VAL \
	    --beam-sizes 1 3 5 --out runs/flickr8k_cn_ensemble_val_metrics.json

flickr8k-cn-member: $(STAMP)
	test -f $(FLICKR8K_CN_DATA)/WORDMAP_$(FLICKR8K_CN_NAME).json || $(MAKE) flickr8k-cn-data
	$(PY) 01_train.py --data-folder $(FLICKR8K_CN_DATA) --encoder $(FLICKR8K_CN_ENCODER) --encoder-weights imagenet \
	    --epochs 12 --workers 0 --val-beam-size 3 --ema-decay 0.999 --label-smoothing 0.1 \
	    --lr-patience 2 --early-stop 4 --out-dir $(FLICKR8K_CN_RUN)
	$(PY) tools/export_checkpoint.py $(FLICKR8K_CN_RUN)/BEST_checkpoint_$(FLICKR8K_CN_NAME).pt $(FLICKR8K_CN_XE)
	$(MAKE) flickr8k-cn-scst

# The self-critical stage alone, from the member's cross-entropy export ($(PROVIDED_CN_XE) for Lite0):
#     make flickr8k-cn-scst [FLICKR8K_CN_ENCODER=efficientnet_lite2]
flickr8k-cn-scst: $(STAMP)
	test -f $(FLICKR8K_CN_DATA)/WORDMAP_$(FLICKR8K_CN_NAME).json || $(MAKE) flickr8k-cn-data
	$(PY) 01_train.py --objective scst --init-from $(FLICKR8K_CN_XE) --data-folder $(FLICKR8K_CN_DATA) \
	    --epochs $(FLICKR8K_SCST_EPOCHS) --workers 0 --val-beam-size 3 --out-dir $(FLICKR8K_CN_SCST_RUN)
	$(PY) tools/export_checkpoint.py $(FLICKR8K_CN_SCST_RUN)/BEST_checkpoint_$(FLICKR8K_CN_NAME).pt $(FLICKR8K_CN_MEMBER)
	$(PY) 03_evaluate.py --checkpoint $(FLICKR8K_CN_MEMBER) --data-folder $(FLICKR8K_CN_DATA) --split VAL \
	    --beam-sizes 1 3 5 --out $(FLICKR8K_CN_SCST_RUN)/val_metrics.json

# The model zoo (README table): decoder $(DECODER) trained with the provided checkpoint's recipe on
# frozen EfficientNet-Lite0 features of Flickr8k TRAIN, selected on VAL, scored on VAL at beam 3 with the
# model's own endings (--bad-endings allow: the bad-ending column measures the model, not the decoding):
#     make flickr8k-zoo DECODER=show_tell      (sat | dot_attention | show_tell | repeat_bilstm | clipcap)
# clipcap's default is its CPU-sized GPT-2 trained from scratch over the word map (--lm scratch);
# ZOO_FLAGS adds decoder flags, e.g. ZOO_FLAGS='--lm-layers 2'. The Chinese rows (Flickr8k-CN, jieba
# words) use the same recipe: make flickr8k-cn-zoo DECODER=transformer (runs/zoo_cn_$(DECODER)).
DECODER ?= sat
ZOO_FLAGS ?=
ZOO_DATA = data/flickr8k
ZOO_NAME = $(FLICKR8K_NAME)
ZOO_PREP = flickr8k-data
ZOO_RUN = runs/zoo_$(DECODER)

.PHONY: flickr8k-data flickr8k-zoo
flickr8k-data: $(STAMP)
	test -f data/flickr8k/WORDMAP_$(FLICKR8K_NAME).json || $(PY) 00_create_input_files.py --dataset flickr8k \
	    --karpathy-json $(FLICKR8K_JSON) --image-folder $(FLICKR8K_IMAGES) --output-folder data/flickr8k

flickr8k-zoo: $(STAMP)
	test -f $(ZOO_DATA)/WORDMAP_$(ZOO_NAME).json || $(MAKE) $(ZOO_PREP)
	$(PY) 01_train.py --data-folder $(ZOO_DATA) --decoder $(DECODER) --encoder efficientnet_lite0 \
	    --encoder-weights imagenet --epochs 12 --workers 0 --val-beam-size 3 --ema-decay 0.999 \
	    --label-smoothing 0.1 --lr-patience 2 --early-stop 4 --out-dir $(ZOO_RUN) $(ZOO_FLAGS)
	$(PY) 03_evaluate.py --checkpoint $(ZOO_RUN)/BEST_checkpoint_$(ZOO_NAME).pt --data-folder $(ZOO_DATA) \
	    --split VAL --beam-sizes 3 --bad-endings allow --out $(ZOO_RUN)/val_metrics.json

# The self-critical stage of a zoo row (end-aware CIDEr-D reward, the default of new runs: docs/zoo.md),
# from that row's cross-entropy BEST (make flickr8k-zoo DECODER=...), scored on VAL at beam 3:
#     make flickr8k-zoo-scst DECODER=transformer
# and the transformer's two rows in one command (cross-entropy, then self-critical):
#     make flickr8k-zoo-transformer
ZOO_SCST_RUN = $(ZOO_RUN)_scst

.PHONY: flickr8k-zoo-scst flickr8k-zoo-transformer
flickr8k-zoo-scst: $(STAMP)
	$(PY) tools/export_checkpoint.py $(ZOO_RUN)/BEST_checkpoint_$(ZOO_NAME).pt $(ZOO_RUN)/xe_fp16.pt
	$(PY) 01_train.py --objective scst --init-from $(ZOO_RUN)/xe_fp16.pt --data-folder $(ZOO_DATA) \
	    --epochs $(FLICKR8K_SCST_EPOCHS) --workers 0 --val-beam-size 3 --out-dir $(ZOO_SCST_RUN)
	$(PY) 03_evaluate.py --checkpoint $(ZOO_SCST_RUN)/BEST_checkpoint_$(ZOO_NAME).pt --data-folder $(ZOO_DATA) \
	    --split VAL --beam-sizes 3 --bad-endings allow --out $(ZOO_SCST_RUN)/val_metrics.json

flickr8k-zoo-transformer: $(STAMP)
	$(MAKE) flickr8k-zoo DECODER=transformer
	$(MAKE) flickr8k-zoo-scst DECODER=transformer

# The Chinese zoo rows: the same two stages on Flickr8k-CN (prepared by flickr8k-cn-data when missing),
# in runs/zoo_cn_$(DECODER) and runs/zoo_cn_$(DECODER)_scst:
#     make flickr8k-cn-zoo DECODER=transformer  |  make flickr8k-cn-zoo-scst DECODER=transformer
CN_ZOO = ZOO_DATA=$(FLICKR8K_CN_DATA) ZOO_NAME=$(FLICKR8K_CN_NAME) ZOO_PREP=flickr8k-cn-data ZOO_RUN=runs/zoo_cn_$(DECODER)

.PHONY: flickr8k-cn-zoo flickr8k-cn-zoo-scst
flickr8k-cn-zoo: $(STAMP)
	$(MAKE) flickr8k-zoo $(CN_ZOO)

flickr8k-cn-zoo-scst: $(STAMP)
	$(MAKE) flickr8k-zoo-scst $(CN_ZOO)

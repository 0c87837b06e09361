"""The training objective of 01_train.py's Trainer: cross-entropy (teacher forcing) or self-critical
(captioning/training/scst.py), and the encoder call both share.

Trainer inherits these methods; they use its attributes (config, device, world, rank, cpi, state,
encoder, train_model, objective, amp_dtype, use_cache, fine_tuning, train_set, log, and for
train_step the optimizer, scaler, params and ema).
"""
import time

import numpy as np
import torch

import utils
from captioning import text
from captioning.decoders.interface import caption_loss
from captioning.training.scst import reward_corpus

SCST_SUMS = ('reward', 'baseline', 'words', 'samples')   # what scst_loss sums over a batch, in this order


class Objective:
    """Trainer's losses: xe_loss, scst_loss (with its per-step sample generator and TRAIN reward), and
    train_step, the optimisation step on either."""

    def _train_reward(self):
        """CIDEr-D against the TRAIN references (df from them), tokenised like the data (captioning/text.py), each
        ending with the word <end> when the reward is end-aware (scst.reward_corpus)."""
        start, tokenizer = time.time(), self.config['tokenizer']
        refs = [[text.tokenize(r, tokenizer) for r in image_refs] for image_refs in self.train_set.refs()]
        if len(refs) != self.train_set.num_images:
            raise ValueError(f'{self.train_set.refs_path}: references of {len(refs)} images, the TRAIN split has '
                             f'{self.train_set.num_images}: re-run 00_create_input_files.py')
        reward = reward_corpus(refs, self.config['scst_end_token'])
        self.log(f"self-critical reward: {'end-aware ' if self.config['scst_end_token'] else ''}CIDEr-D against the "
                 f"references of {len(refs)} TRAIN images ({len(reward.ids)} n-grams, {time.time() - start:.1f} s)")
        return reward

    def amp_note(self):
        """', mixed precision: bf16' (or fp16 with its GradScaler) when autocast is on, else ''."""
        if self.amp_dtype is None:
            return ''
        return f", mixed precision: {'bf16' if self.amp_dtype == torch.bfloat16 else 'fp16 with a GradScaler'}"

    def encode(self, encoder, x):
        """Encoder input -> [b, g, g, C]: pooled cached features, or the encoder run on images."""
        x = x.to(self.device, non_blocking=True)
        if self.use_cache:
            return self.encoder.pool(x)
        with torch.set_grad_enabled(self.fine_tuning and torch.is_grad_enabled()):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                return encoder(x).float()

    def xe_loss(self, x, caps, caplens):
        """Cross-entropy on a batch of images with all their captions: x [b, 3, S, S] images or
        [b, C, h, w] cached features, caps [b, cpi, L], caplens [b, cpi].
        Returns (loss, decoder output, images in the global batch)."""
        config, device, cpi, world = self.config, self.device, self.cpi, self.world
        b = caps.size(0)
        caps = caps.to(device, non_blocking=True).view(b * cpi, -1)              # [b*cpi, L]
        caplens = caplens.to(device, non_blocking=True).view(-1)                 # [b*cpi]
        image_index = torch.arange(b, device=device).repeat_interleave(cpi)      # caption -> image row
        enc = self.encode(self.train_encoder, x)                                 # [b, g, g, C]
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.train_model(enc, caps, caplens, image_index)
        # Normalise by the global batch's token and caption counts: averaging gradients over
        # processes then gives exactly the gradient of the whole global batch.
        counts = utils.all_reduce_sum(torch.tensor([out.targets.numel(), b * cpi], dtype=torch.float64,
                                                   device=device)).tolist()
        loss = caption_loss(out, config['label_smoothing'],
                            num_tokens=counts[0] / world, num_captions=counts[1] / world)
        return loss, out, int(counts[1]) // cpi

    def scst_loss(self, idx, x):
        """Self-critical loss (scst.py) on a batch of images: idx [b] TRAIN image indices, x as xe_loss.
        The uniforms behind the samples are drawn for the whole global batch from this step's generator
        and each process takes its images' rows, so the samples do not depend on the process count.
        Returns (loss, sums float64 [4] of this process: reward, baseline, words, samples; images in the
        global batch)."""
        device, world, n, b = self.device, self.world, self.config['scst_samples'], len(idx)
        sizes = torch.zeros(world, dtype=torch.float64, device=device)
        sizes[self.rank] = b
        sizes = [int(v) for v in utils.all_reduce_sum(sizes).tolist()]               # images per process
        total, first = sum(sizes), sum(sizes[:self.rank])
        uniforms = torch.rand(total * n, self.objective.max_len, generator=self.sample_generator(),
                              dtype=torch.float64)[first * n:(first + b) * n]           # [b*n, max_len]
        enc = self.encode(self.train_encoder, x)                                     # [b, g, g, C]
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, sums = self.train_model(enc, idx.to(device), uniforms, total * n / world)
        return loss, sums, total

    def sample_generator(self):
        """This step's sampling generator, seeded from the run's seed and the step number: a resumed
        run draws the same numbers (its state is the checkpoint's step: nothing more to save)."""
        entropy = [self.config['seed'] % 2 ** 63, self.state['step']]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))

    def step_figures(self, loss, stop_requested, at_limit, sums):
        """One all-reduce per step -> {name: value} of the global batch: its loss (the mean of the
        processes' parts), the stop flags (so that every process stops at the same step: 'interrupt',
        'at_limit') and, for self-critical training, the SCST_SUMS."""
        names = ('loss', 'interrupt', 'at_limit')
        shared = torch.tensor([loss.item() / self.world, float(stop_requested), float(at_limit)],
                              dtype=torch.float64, device=self.device)
        if sums is not None:
            names += SCST_SUMS
            shared = torch.cat([shared, sums.to(self.device, torch.float64)])
        return dict(zip(names, utils.all_reduce_sum(shared).tolist()))

    def train_step(self, idx, x, caps, caplens):
        """One optimisation step on a batch of images (idx [b] their indices; see xe_loss).
        Returns (loss, decoder output (xe) or None, images in the global batch, sums (scst) or None)."""
        out = sums = None
        if self.scst:
            loss, sums, images = self.scst_loss(idx, x)
        else:
            loss, out, images = self.xe_loss(x, caps, caplens)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config['grad_clip']:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_value_(self.params, self.config['grad_clip'])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.decoder)
        return loss, out, images, sums

"""Validation and model selection of 01_train.py's Trainer: VAL scores of generated captions each
epoch, then the schedule, early stopping, the BEST checkpoint and the metrics log.

Trainer inherits these methods; they use its attributes (config, state, encoder, decoder, ema,
word_map, val_loader, val_refs, cpi, device, scheduler, optimizer, paths, log, save, encode).
"""
import os

import torch
from tqdm import tqdm

import utils
from captioning import checkpoint, text
from captioning.decoders.interface import caption_loss
from captioning.decoding.search import beam_search
from captioning.scoring.cider import CiderD
from captioning.scoring.metrics import NltkBleu, bad_ending_rate, diversity_scores, ending_counts
from captioning.training import curves

SELECT_KEYS = {'BLEU-4': 'bleu4', 'CIDEr': 'cider'}   # --select-by -> the VAL metric's key


class Validation:
    """Trainer's validate (VAL scores) and end_epoch (what the scores select)."""

    def end_epoch(self, stats, val):
        """Schedule, early-stopping count, checkpoints and the metrics log after validation."""
        key = SELECT_KEYS[self.config['select_by']]
        state, score = self.state, val[key]
        self.scheduler.step(score)
        improved = score > state['best_score']
        state['epoch'] += 1
        state.update(images_done=0, epoch_loss_sum=0.0, epoch_loss_steps=0, epoch_scst_sums=[0.0] * 4)
        if improved:
            state.update(best_score=score, best_epoch=state['epoch'] - 1, epochs_since_improvement=0)
        else:
            state['epochs_since_improvement'] += 1
        self.save(self.ckpt_path, val)
        if improved and self.main:
            checkpoint.save_checkpoint(self.best_path, checkpoint.load_checkpoint(self.ckpt_path))
        record = {'epoch': state['epoch'] - 1, 'step': state['step'], **stats, **val,
                  'lr': self.optimizer.param_groups[0]['lr'], 'select_by': self.config['select_by'],
                  f'best_{key}': state['best_score']}
        if self.main:
            utils.append_jsonl(os.path.join(self.out_dir, 'metrics.jsonl'), record)
            curves.after_epoch(self.out_dir, self.config.get('tensorboard'), self.log)
        if self.scst:
            train = (f"train reward {stats['train_reward']:.3f} (baseline {stats['train_baseline']:.3f}, "
                     f"{stats['sample_len']:.1f} words per sample)")
        else:
            train = f"train loss {stats['train_loss']:.3f} top-5 {stats['train_top5']:.1f}%"
        best = {k: ' (best)' if improved and k == key else '' for k in SELECT_KEYS.values()}
        self.log(f"epoch {record['epoch']}: {train} ({stats['captions_per_s']:.0f} captions/s) | VAL teacher-forced "
                 f"loss {val['val_tf_loss']:.3f} top-5 {val['val_tf_top5']:.1f}% | VAL generated (beam "
                 f"{self.config['val_beam_size']}) BLEU-4 {val['bleu4']:.4f}{best['bleu4']} "
                 f"CIDEr {val['cider']:.4f}{best['cider']}, {val['val_repeated_trigrams']:.1%} repeat a "
                 f"trigram, {val['val_distinct_words']} words, {val['val_unique_captions']:.1%} unique, "
                 f"{val['val_bad_endings']:.1%} bad endings")
        for sample in val['samples'][:2]:
            self.log(f"   e.g. {sample['caption']!r}  (a reference: {sample['ref']!r})")

    def endings(self):
        """The TRAIN references' ending statistics (metrics.ending_counts), counted once: the bad-ending
        measure of validation, and stored in every checkpoint (so 02/03/04 can avoid bad endings)."""
        if self.train_endings is None:
            self.train_endings = ending_counts(self.train_set.refs(), self.config.get('tokenizer', 'words'))
        return self.train_endings

    @torch.inference_mode()
    def validate(self):
        """Teacher-forced loss/top-5 and, for model selection, BLEU-4 and CIDEr-D (df from the scored VAL
        references, as the COCO toolkit) of generated VAL captions (with their repetition and diversity,
        metrics.diversity_scores, and the share of bad endings, metrics.bad_ending_rate against the TRAIN
        references, as val_* entries)."""
        decoder = self.ema.module if self.ema is not None else self.decoder
        self.encoder.eval()
        decoder.eval()
        rev = {v: k for k, v in self.word_map.items()}
        cpi, device, tokenizer = self.cpi, self.device, self.config.get('tokenizer', 'words')
        if self.val_ref_tokens is None:
            self.val_ref_tokens = [[text.tokenize(r, tokenizer) for r in refs] for refs in self.val_refs]
        self.endings()
        tf_loss, tf_top5 = utils.AverageMeter(), utils.AverageMeter()
        res, gts, hyp_words, samples, i = {}, {}, [], [], 0
        for x, caps, caplens in tqdm(self.val_loader, desc='validating', unit='batch', leave=False,
                                     dynamic_ncols=True, disable=None):
            b = caps.size(0)
            enc = self.encode(self.encoder, x)
            out = decoder(enc, caps.to(device).view(b * cpi, -1), caplens.to(device).view(-1),
                          torch.arange(b, device=device).repeat_interleave(cpi))
            tf_loss.update(caption_loss(out).item(), out.targets.numel())
            tf_top5.update(utils.topk_accuracy(out.scores.float(), out.targets, 5), out.targets.numel())
            # runs from before the setting validated without it, and keep doing so when resumed
            for hyp in beam_search(decoder, enc, self.word_map, beam_size=self.config['val_beam_size'],
                                   no_repeat_ngram_size=self.config.get('val_no_repeat_ngram', 0),
                                   min_len=self.config['min_len']):
                hyp_words.append(decoder.words(hyp['tokens'], rev))
                res[i] = [' '.join(hyp_words[-1])]
                gts[i] = self.val_refs[i]
                if len(samples) < 3:
                    samples.append({'caption': res[i][0], 'ref': self.val_refs[i][0]})
                i += 1
        bleu, _ = NltkBleu(tokenizer).compute_score(gts, res)
        diversity = diversity_scores([res[j][0] for j in sorted(res)], tokenizer)
        diversity['bad_endings'] = bad_ending_rate([res[j][0] for j in sorted(res)], self.train_endings, tokenizer)
        cider = float(CiderD(self.val_ref_tokens[:i]).scores(range(i), hyp_words).mean())
        return {'val_tf_loss': tf_loss.avg, 'val_tf_top5': tf_top5.avg, 'bleu4': bleu[3], 'val_bleu': bleu,
                'cider': cider, **{f'val_{k}': v for k, v in diversity.items()}, 'samples': samples}

"""lm-evaluation-harness adapter: our native `LM` behind lm-eval's three request types.

    from hyperloop_lm.eval.harness import HyperloopLM
    lm = HyperloopLM.from_checkpoint("runs/demo-hyperloop")
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])          # or model="hyperloop",
                                                                    # model_args="checkpoint=DIR"
A direct `lm_eval.api.model.LM` subclass (not `HFLM`), so it needs nothing but the checkpoint:

- loglikelihood(context, continuation) -> (sum log p(continuation | context), is_greedy).
  Tokenization follows HFLM for causal models exactly, so numbers are comparable with published
  lm-eval results: trailing spaces of the context move to the continuation, then the *whole string*
  is encoded and split at len(encode(context)) (not two separate encodes: those would force a
  token boundary at the split the model never sees in running text). An empty context is
  replaced by EOS, which our shards put between documents, i.e. "start of a document".
  Inputs are (context + continuation)[-(max_length + 1):][:-1]: contexts are left-truncated (a
  continuation longer than max_length is scored in several windows, see `score_tokens`).
- Scoring is batched and cache-free: sequences sorted by length (longest first, so the first batch
  shows memory trouble at once), right-padded, one forward per batch. Right padding needs no
  attention mask: a causal model's logits at real positions never see the pads after them.
- loglikelihood_rolling: lm-eval's disjoint rolling windows (EOS prefix), scored the same way.
- generate_until: batched greedy decoding with left padding and the KV cache, stopping at EOS,
  any `until` string or `max_gen_toks`.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM as LMEvalBase
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from hyperloop_lm.utils import UserError

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval's HFLM splits them for a causal model."""
    if context == "":
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Answer: " + "Paris" is scored as "Answer:" + " Paris", the natural tokenization
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    return whole[:n_context], whole[n_context:]


@register_model("hyperloop")
class HyperloopLM(LMEvalBase):
    """Our checkpoint as an lm-eval model. `model_args`: checkpoint=DIR[,batch_size=16,device=cpu,
    max_length=N,loops=L]; or pass `model=` and `tokenizer=` objects from Python."""

    def __init__(self, checkpoint: str | Path | None = None, *, model: torch.nn.Module | None = None,
                 tokenizer=None, batch_size: int | str | None = 16, device: str | None = None,
                 max_length: int | None = None, loops: int | None = None, progress: bool = True,
                 **unused: Any):
        super().__init__()
        if unused:
            log.debug("HyperloopLM ignores %s", sorted(unused))
        self.meta: dict[str, Any] = {}
        if model is None:
            if checkpoint is None:
                raise UserError("HyperloopLM needs checkpoint=DIR (or model= and tokenizer= objects)")
            from hyperloop_lm.train.checkpoint import load_model, resolve
            from hyperloop_lm.train.trainer import pick_device

            checkpoint = resolve(checkpoint)
            model, tokenizer, self.meta = load_model(checkpoint, pick_device(device or "auto"))
            if tokenizer is None:
                raise UserError(f"{checkpoint} has no tokenizer.json; zero-shot tasks need the model's tokenizer")
            if max_length is None:  # the context the model was trained at (RoPE beyond it is extrapolation)
                max_length = self.meta.get("train", {}).get("seq_len")
        elif tokenizer is None:
            raise UserError("HyperloopLM(model=...) also needs tokenizer=")
        self.checkpoint = str(checkpoint) if checkpoint is not None else None
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = min(int(max_length or model.cfg.max_seq_len), model.cfg.max_seq_len)
        self.batch_size = 16 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.loops = None if loops is None else int(loops)
        self.progress = progress
        self._device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, **kwargs: Any) -> "HyperloopLM":
        return cls(checkpoint, **kwargs)

    @property
    def tokenizer_name(self) -> str:  # keys lm-eval's request cache
        return self.tokenizer.name

    # ------------------------------------------------------------------ forward
    def _logits(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) fp32 logits; bf16 autocast on CUDA like the perplexity eval."""
        self.model.check_tokens(idx)
        on_cuda = self._device.type == "cuda"
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            logits = self.model(idx, attention_mask=attention_mask, cache=cache, loops=self.loops)
        return logits.float()

    # ------------------------------------------------------------------ scoring
    def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], desc: str = "scoring"
                     ) -> list[tuple[float, bool]]:
        """[(context ids, continuation ids)] -> [(sum log p(continuation), every token greedy)], in order.

        S = context + continuation is scored in windows of max_length inputs: the last one is
        S[-(L + 1):][:-1] (HFLM's single window, all there is when the continuation fits); a
        continuation longer than L is covered by further windows towards the start, each predicting up
        to L tokens with the longest left context that fits, so every token is scored exactly once.
        """
        L = self.max_length
        rows = []  # (input ids, target ids = the last len(target) positions' next tokens, request)
        for k, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise UserError("loglikelihood needs a non-empty context (use EOS) and continuation")
            seq, start, end = [*ctx, *cont], len(ctx), len(ctx) + len(cont)
            while end > start:  # predict seq[a:end] from inputs seq[..end-1]
                a = max(start, end - L)
                rows.append((seq[max(0, end - 1 - L):end - 1], seq[a:end], k))
                end = a
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        ll, greedy = [0.0] * len(pairs), [True] * len(pairs)
        bar = tqdm(total=len(rows), desc=desc, disable=not self.progress, leave=False)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            T = len(rows[batch[0]][0])
            idx = torch.full((len(batch), T), self.tokenizer.eos_id, dtype=torch.long)  # right padding
            for r, i in enumerate(batch):
                idx[r, :len(rows[i][0])] = torch.tensor(rows[i][0])
            logits = self._logits(idx.to(self._device))
            for r, i in enumerate(batch):
                inp, target, k = rows[i]
                logp = F.log_softmax(logits[r, len(inp) - len(target):len(inp)], dim=-1)  # (n, V)
                tgt = torch.tensor(target, device=logp.device)
                ll[k] += logp.gather(-1, tgt[:, None]).sum().item()
                greedy[k] &= bool((logp.argmax(-1) == tgt).all())
            bar.update(len(batch))
        bar.close()
        return list(zip(ll, greedy))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *req.args) for req in requests]
        results = self.score_tokens(pairs, desc="loglikelihood")
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for k, req in enumerate(requests):
            tokens = self.tokenizer.encode(req.args[0])
            for w in get_rolling_token_windows(tokens, self.tokenizer.eos_id, self.max_length, 1):
                windows.append(make_disjoint_window(w))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self.score_tokens(windows, desc="loglikelihood_rolling")):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy completions. gen_kwargs: until (str or list), max_gen_toks; sampling is refused
        rather than silently ignored."""
        groups: dict[str, list[int]] = defaultdict(list)  # requests with the same settings share batches
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=not self.progress, leave=False)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
                raise UserError("HyperloopLM generates greedily; this task asks for sampling (do_sample=True)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts = self.greedy([requests[i].args[0] for i in batch], until, max_new)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def greedy(self, contexts: Sequence[str], until: Iterable[str] = (), max_new: int = DEFAULT_MAX_GEN_TOKS
               ) -> list[str]:
        """Greedy continuations of `contexts` (a batch), each cut at its first `until` string or EOS."""
        from hyperloop_lm.infer.cache import KVCache

        until = [u for u in until if u]
        max_new = max(1, min(max_new, self.max_length - 1))  # leave room for >= 1 context token
        prompts = [(self.tokenizer.encode(c) or [self.tokenizer.eos_id])[-(self.max_length - max_new):]
                   for c in contexts]
        B, P = len(prompts), max(map(len, prompts))
        idx = torch.full((B, P), self.tokenizer.eos_id, dtype=torch.long)
        mask = torch.zeros(B, P + max_new, dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row's next token is at column P
            idx[r, P - len(p):] = torch.tensor(p)
            mask[r, P - len(p):] = 1
        idx, mask = idx.to(self._device), mask.to(self._device)
        cache = KVCache.for_model(self.model, B, max_len=P + max_new, loops=self.loops)
        generated: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        logits = self._logits(idx, attention_mask=mask[:, :P], cache=cache)
        for step in range(max_new):
            nxt = logits[:, -1].argmax(-1)  # (B,)
            for r in range(B):
                if done[r]:
                    continue
                if int(nxt[r]) == self.tokenizer.eos_id:
                    done[r] = True
                    continue
                generated[r].append(int(nxt[r]))
                done[r] = any(u in self.tokenizer.decode(generated[r]) for u in until)
            if all(done) or step == max_new - 1:
                break
            mask[:, P + step] = 1
            logits = self._logits(nxt[:, None], attention_mask=mask[:, :P + step + 1], cache=cache)
        texts = []
        for ids in generated:
            text = self.tokenizer.decode(ids)
            for u in until:
                text = text.split(u)[0]
            texts.append(text)
        return texts

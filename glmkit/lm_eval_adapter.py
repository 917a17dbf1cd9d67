"""lm-evaluation-harness adapter: a glmkit checkpoint as the `lm_eval` model "glmkit".

    glmkit lm-eval --model glmkit --model_args model=ft/ --tasks lambada_openai --limit 100
    # (= the lm_eval CLI with this module imported, so "glmkit" is registered)
    from glmkit.lm_eval_adapter import GLMkitLM
    lm_eval.simple_evaluate(model=GLMkitLM(model="ft/"), tasks=[...])

Needs `pip install lm_eval` (imported here, nowhere else). How a GLM answers the harness's three
requests in mode "blank" (GLM-objective models: 2D positions):
  loglikelihood(context, continuation): Part A = context [gMASK], Part B = <sop> continuation;
      summed log p of the continuation tokens, without <eop> (a continuation need not end the
      text); is_greedy when every one of them is the argmax.
  loglikelihood_rolling(text): the text in chunks of max_length/2 tokens, each the [gMASK] blank
      after up to max_length/2 - 2 preceding tokens (the first after nothing), log p summed.
  generate_until(context, {until, max_gen_toks}): greedy fill of the [gMASK] after the context,
      cut at the first stop string. Sampling arguments are ignored (greedy only).
Mode "causal" (the default for causal checkpoints, GLM-4's rope_partial): `[gMASK] <sop> context
continuation` scored left to right, and generation continues the text, as GLM-4 is used.
Context and continuation are tokenized separately (they sit in different parts of a GLM example);
over-long inputs lose context from the left.
"""

from __future__ import annotations

import sys

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(f"the lm-evaluation-harness adapter needs `pip install lm_eval` ({e})") from None

import torch

from .finetune import blank_example, causal_example, sequence_logprobs
from .infill import special_ids


@register_model("glmkit")
class GLMkitLM(LM):
    def __init__(self, model=None, pretrained=None, tokenizer=None, device="auto", dtype="auto", batch_size=8,
                 max_length=None, mode="auto", max_batch_size=None, **kwargs):
        """model (or pretrained): a checkpoint directory, or a GLM instance (then pass tokenizer, a
        Tokenizer). mode: blank | causal | auto (blank for 2D-position models)."""
        super().__init__()
        from .convert import load
        from .devices import resolve_device, resolve_dtype
        from .tokenizer import load_tokenizer

        src = model if model is not None else pretrained
        if src is None:
            raise ValueError("GLMkitLM needs model=PATH (a glmkit-readable checkpoint directory)")
        if isinstance(src, torch.nn.Module):
            self.model, self.tok = src, tokenizer
            if tokenizer is None:
                raise ValueError("pass tokenizer= with a model instance")
        else:
            dev = resolve_device(device)
            self.model = load(src, device=dev, dtype=resolve_dtype(dtype, dev))
            self.tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else load_tokenizer(tokenizer or src)
        self.model.eval()
        self._device = next(self.model.parameters()).device
        self.special = special_ids(self.tok)
        if mode == "auto":
            mode = "blank" if self.model.cfg.prefix_lm else "causal"
        if mode not in ("blank", "causal"):
            raise ValueError(f"mode={mode!r}: choose blank, causal or auto")
        self.mode = mode
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else min(self.model.cfg.max_seq_len, 2048)

    # ---- building examples ----------------------------------------------------------------------
    def _example(self, context: list[int], continuation: list[int]):
        L = self.max_length - 2  # [gMASK] <sop> (blank) or the [gMASK] <sop> prefix (causal)
        continuation = continuation[-L:]
        room = L - len(continuation)
        context = context[max(0, len(context) - room) :] if room > 0 else []
        if self.mode == "blank":
            return blank_example(context, continuation, [], self.special, mask=self.special.gmask, eop=False)
        return causal_example([self.special.gmask, self.special.sop] + context, continuation)

    @torch.no_grad()
    def _score(self, examples) -> list[tuple[float, bool]]:
        out: list = [None] * len(examples)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding per batch
        for k in range(0, len(order), self.batch_size):
            idx = order[k : k + self.batch_size]
            logp, _, greedy = sequence_logprobs(self.model, [examples[i] for i in idx], self.special.pad)
            for i, lp, g in zip(idx, logp.tolist(), greedy.tolist()):
                out[i] = (lp, g)
        return out

    # ---- the harness's interface ------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        examples = []
        for r in requests:
            context, continuation = r.args[0], r.args[1]
            cont = self.tok.encode(continuation)
            if not cont:
                raise ValueError(f"empty continuation {continuation!r} for context {context[-50:]!r}")
            examples.append(self._example(self.tok.encode(context), cont))
        return [(float(lp), bool(g)) for lp, g in self._score(examples)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        chunk = max(1, self.max_length // 2)
        examples, owner = [], []
        for n, r in enumerate(requests):
            ids = self.tok.encode(r.args[0])
            for s in range(0, len(ids), chunk):
                examples.append(self._example(ids[max(0, s - (self.max_length - chunk - 2)) : s], ids[s : s + chunk]))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self._score(examples)):
            totals[n] += lp
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy, through generate.py: `infill` of a [gMASK] after the context (blank), or
        `generate` continuing `[gMASK] <sop> context` (causal)."""
        from .generate import generate, infill
        from .sampling import SamplingParams

        out = []
        for r in requests:
            context, kw = r.args[0], dict(r.args[1] or {})
            stops = kw.get("until") or []
            stops = tuple(s for s in ([stops] if isinstance(stops, str) else stops) if s)
            max_new = int(kw.get("max_gen_toks", 256))
            params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=stops)
            ctx = self.tok.encode(context)
            ctx = ctx[max(0, len(ctx) - max(0, self.max_length - max_new - 3)) :]
            if self.mode == "blank":
                text = infill(self.model, self.tok, self.tok.decode(ctx), "", params, mask="[gMASK]").spans[0].text
            else:
                (c,) = generate(self.model, [[self.special.gmask, self.special.sop] + ctx], params, self.tok)
                text = c.text
            for s in stops:  # generate.py cuts at stop strings already; kept for safety across versions
                text = text.split(s)[0]
            out.append(text)
        return out


def main(argv=None) -> int:
    """`glmkit lm-eval ARGS`: the lm_eval command line with the "glmkit" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0

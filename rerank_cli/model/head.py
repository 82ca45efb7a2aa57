"""The last step of every score in fp32, whatever dtype the body ran in.

In bf16 a score that is the head's bf16 output has 8 bits of mantissa: on 500 pairs of the bench
models 434 cross-encoder and 111 LLM scores tied with another, and near-ties reorder. The body's
work stays in its dtype; what turns its last hidden state into a score runs in fp32 on the upcast
state, which costs next to nothing:

- cross-encoder: the classification head (BERT's pooler and classifier, RoBERTa's dense and out_proj,
  whatever modules the family puts after its base model);
- LLM: the final norm, then the one or two lm_head rows the template reads (`LeanHead`). Where the
  template takes the yes-no difference, the two rows are folded into one fp32 row (vLLM does the same):
  one dot product, no cancellation of two rounded logits. Not with a final logit softcap (it applies
  to each logit) and not in fp32 runs, which compute exactly what they computed before.

In an fp32 model every cast here is a no-op, so fp32 scores are unchanged bit for bit.
"""

from __future__ import annotations

CROSS = "cross-encoder"


def fp32_head(model, kind: str) -> list:
    """Cast the modules after the body to fp32, each upcasting what it is given; returns them."""
    modules = _head_modules(model, kind)
    for module in modules:
        module.float()
        module.register_forward_pre_hook(_upcast_inputs, with_kwargs=True)
    return modules


def _head_modules(model, kind: str) -> list:
    base = model.base_model
    if kind != CROSS:
        body = model.get_decoder() if hasattr(model, "get_decoder") else base
        norm = getattr(body, "norm", None)
        return [norm] if norm is not None else []
    # lm_head is never cast whole: it may be tied to the embeddings, and only its rows are needed.
    modules = [child for child in model.children() if child is not base]
    pooler = getattr(base, "pooler", None)
    return ([pooler] if pooler is not None else []) + [m for m in modules if any(True for _ in m.parameters())]


def _upcast_inputs(module, args, kwargs):
    return tuple(_up(a) for a in args), {k: _up(v) for k, v in kwargs.items()}


def _up(x):
    return x.float() if hasattr(x, "is_floating_point") and x.is_floating_point() else x


class LeanHead:
    """Last hidden state ([B, H]) -> score ([B], fp32): the needed lm_head rows only, in fp32."""

    def __init__(self, model, template, fold: bool):
        self.template = template
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.fold = fold and not self.softcap
        self.head = model.get_output_embeddings()
        self.ids = list(template.head_ids)

    def __call__(self, hidden):
        import torch

        rows = self.head.weight[self.ids].float()
        bias = getattr(self.head, "bias", None)
        bias = bias[self.ids].float() if bias is not None else None
        hidden = hidden.float()
        if self.fold:  # combine() is linear in the logits: applied to the rows, it gives one row
            row = self.template.combine(rows.T)
            score = hidden @ row
            return score + self.template.combine(bias[None])[0] if bias is not None else score
        logits = hidden @ rows.T
        if bias is not None:
            logits = logits + bias
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return self.template.combine(logits)

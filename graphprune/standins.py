"""Traceable stand-ins that Dynamo uses in place of calls it cannot trace, registered when graphprune is imported.

A stand-in changes only what Dynamo *traces*: the original function object is left as it is, so eager code (and any
code that does not run under ``torch.compile``) behaves exactly as before. Each stand-in computes the same thing as
the original, in a form Dynamo can put in a graph. They matter to every backend, not only graphprune's: without them
the frame holding the call is split or skipped, and the attention inside never reaches a graph.

* ``torch.backends.cuda.sdp_kernel(...)`` (deprecated, still how Stability's ``sgm`` runs every attention:
  ``with sdp_kernel(**BACKEND_MAP[backend]): F.scaled_dot_product_attention(...)``). Dynamo classifies it as a
  function to put in the graph, which fails ("torch.* op returned non-Tensor") and then skips the whole attention
  frame. The stand-in returns ``torch.nn.attention.sdpa_kernel`` over the same backend list, which Dynamo traces
  (the backend choice lands in the graph as it would in eager mode).

Registration uses ``torch.compiler.substitute_in_graph``; for ``sdp_kernel`` it first removes Dynamo's own rule for
that one function (Dynamo refuses a second rule), and only if the rule is the in-graph rule this module expects.
Anything unexpected (another torch version, a rule already changed) leaves Dynamo untouched and :data:`STATUS` says
why; graphprune then reports the graph break instead (:mod:`graphprune.passes.coverage`).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

#: stand-in name -> "registered" or the reason it is not
STATUS: dict[str, str] = {}


def _sdp_kernel_standin():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdp_kernel(enable_flash: bool = True, enable_math: bool = True, enable_mem_efficient: bool = True,
                   enable_cudnn: bool = True):
        """torch.backends.cuda.sdp_kernel as Dynamo traces it: sdpa_kernel over the enabled backends (same order)."""
        backends = [b for b, on in ((SDPBackend.FLASH_ATTENTION, enable_flash),
                                    (SDPBackend.EFFICIENT_ATTENTION, enable_mem_efficient),
                                    (SDPBackend.MATH, enable_math), (SDPBackend.CUDNN_ATTENTION, enable_cudnn)) if on]
        return sdpa_kernel(backends)

    return sdp_kernel


def _register_sdp_kernel() -> str:
    original = getattr(torch.backends.cuda, "sdp_kernel", None)
    substitute = getattr(getattr(torch, "compiler", None), "substitute_in_graph", None)
    if original is None or substitute is None:
        return "not available in this torch"
    try:
        from torch._dynamo import trace_rules
        from torch._dynamo.variables import TorchInGraphFunctionVariable

        rules = trace_rules.get_torch_obj_rule_map()
        rule = rules.get(original)
        if rule is not TorchInGraphFunctionVariable:
            return f"Dynamo's rule for it is {getattr(rule, '__name__', rule)}, not the in-graph rule (left alone)"
        del rules[original]
        try:
            substitute(original)(_sdp_kernel_standin())
        except Exception:
            rules[original] = rule
            raise
    except Exception as exc:  # an unknown torch: leave Dynamo as it is, and say so
        return f"not registered ({type(exc).__name__}: {exc})"
    return "registered"


def register() -> dict[str, str]:
    """Register every stand-in once per process; returns :data:`STATUS`."""
    if not STATUS:
        STATUS["torch.backends.cuda.sdp_kernel"] = _register_sdp_kernel()
        log.debug("graphprune stand-ins: %s", STATUS)
    return STATUS


register()

__all__ = ["STATUS", "register"]

"""Model FLOPs of a JAX function, counted from its jaxpr: 2 * multiply-accumulates of every matrix product and
convolution (elementwise work is ignored, as in the usual MFU convention).

XLA's own cost_analysis is not used: on GPU it leaves out convolutions that run as library calls.
"""
from __future__ import annotations

import math

import jax
from jax.extend import core


def count_flops(fn, *args) -> int:
    """2 * MACs of all dot_general and conv_general_dilated ops that ``fn(*args)`` executes (scan bodies
    multiplied by their length)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            out_feat = rhs[dn.rhs_spec[0]]
            # Each output element sums over kernel spatial taps x (input features per group).
            macs_per_out = math.prod(rhs) // out_feat
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * macs_per_out
        for sub in _subjaxprs(eqn):
            total += _jaxpr_flops(sub) * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(v, core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, core.Jaxpr):
                yield v

"""Tracing user models without giving up (:mod:`legofx.fx.tracing`) and the method-agnostic
rewrite driver (:mod:`legofx.fx.rewrite`): trace, choose layers, swap, inline. Knows no method."""

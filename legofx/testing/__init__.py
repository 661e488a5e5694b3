"""Property-test your own rewrites the way legofx tests its own (needs ``legofx[testing]``).

Hypothesis strategies that draw ``Conv2d`` configurations (every attribute: kernel sizes,
stride, string and tuple padding, padding modes, dilation, bias, odd input sizes) and small
networks (sequences, residual and concat branches, BN, ReLU, pooling, a conv called twice,
blocks fx cannot trace), and :func:`assert_equivalent`, which compares two callables on the
same input by relative error over the whole output::

    from hypothesis import given
    import legofx
    from legofx.testing import assert_equivalent, networks, randomize_lego

    @given(networks(data_dependent=False))
    def test_fold_keeps_the_function(net_x):
        net, x = net_x
        gm = legofx.transform(net, o=2, m=0.5)
        randomize_lego(gm)
        assert_equivalent(legofx.fold(gm.eval()), gm, x)

Tolerances (:func:`tolerance`): 1e-12 in float64 (exact up to summation order), 1e-5 in
float32 (rounding amplified through deep random networks), 1e-2 in half precision.
"""

from legofx.testing.equivalence import (TOL16, TOL32, TOL64, assert_equivalent, randomize_lego,
                                        relative_error, tolerance)

try:
    from legofx.testing.strategies import (PADDING_MODES, ConvCase, conv_cases, networks)
except ImportError as error:  # pragma: no cover - hypothesis is the testing extra
    if "hypothesis" not in str(error):
        raise
    raise ImportError("legofx.testing's strategies need Hypothesis: "
                      "pip install 'legofx[testing]'") from error

__all__ = [
    "PADDING_MODES",
    "TOL16",
    "TOL32",
    "TOL64",
    "ConvCase",
    "assert_equivalent",
    "conv_cases",
    "networks",
    "randomize_lego",
    "relative_error",
    "tolerance",
]

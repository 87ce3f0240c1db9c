"""Hold an implementation of an op to the reference: test cases, tolerances and the check.

``fmkernels check`` and the test suite share these rules (DESIGN.md, "Correctness rules"):

* attention, decode_attention: the truth is the reference run on the inputs upcast to
  float64. An implementation may err twice as much as plain PyTorch doing the same
  computation in the input dtype (``plain_attention``, ``plain_decode_attention``), plus
  1e-5 (``attention_tolerance``). The log-sum-exp, where returned, is held to the same rule.
* append_kv: exact. The cache holds random history and NaN in every free slot before the
  call, and every element of it, untouched ones included, must equal the reference's bit
  for bit afterwards.
* filter_logits: the kept tokens (those not -inf) are the reference's exactly, and kept
  values are within ``value_tolerance`` of the reference's. The one exception is a token on
  the top-p boundary: the probability mass before it (float64) within
  ``top_p_boundary_width(vocab)`` of top_p (1e-5, wider past ~1.8k tokens, as an fp32 running
  sum's rounding grows with its length), or p splitting a run of tied tokens exactly, so that
  rounding, not the rule, decides; it may be kept or removed.
* linear: attention's rule. The truth is the reference run on float64 inputs, and an
  implementation may err twice as much as ``torch.nn.functional.linear`` in the input dtype
  (``plain_linear``), plus 1e-5. Against a ``QuantizedWeight``, each output is within
  ``quantized_linear_tolerance`` of x @ the dequantized weight in float64 (DESIGN.md,
  "Quantized weights": the error of int8 activations, fp32 sums and the output's rounding).
* sample: tokens equal the reference's for the same seeds and steps. A different token is
  accepted only when its Gumbel score and the reference token's are within 1e-5 of each
  other, relatively (a near tie the two computations may break differently). The
  log-probabilities are within 1e-4 (relative above 1). A row with a token on the top-p
  boundary is held to whichever of the two filtered distributions (with the token or
  without) its token and log-probabilities are nearer.

Outputs go into ``out=`` buffers poisoned beforehand (NaN, or -1 for token ids), so an
element an implementation leaves unwritten fails. Inputs are random, never zeros, and their
sizes are odd on purpose.

The package's modules: ``tolerances`` (the errors measured and what each may be), ``plain``
(attention and linear as plain PyTorch computes them in the input dtype), ``inputs`` (``Case``
and ``cases``), ``checks`` (``check_impl``, ``run_checks`` and the comparisons), ``checkpoint``
(where the real checkpoint is installed).

Check your own kernel from Python::

    import fmkernels
    from fmkernels import testing

    impl = fmkernels.register_impl("attention", "mine", my_attention)
    for case in testing.cases("attention", device="cuda"):
        print(case.name, testing.check_impl(impl, case))
"""

from .checkpoint import SMOLLM2_FILE, SMOLLM2_PACKAGE, smollm2_gguf
from .checks import (
    CheckResult,
    CheckRow,
    check_impl,
    compare_attention,
    compare_linear,
    run_checks,
    skip_reason,
    top_p_boundary,
)
from .inputs import DTYPES, Case, Device, Kwargs, cases, random_allowed
from .plain import plain_attention, plain_decode_attention, plain_linear
from .tolerances import (
    ATTENTION_ATOL,
    LOGPROB_TOLERANCE,
    NEAR_TIE,
    TOP_P_BOUNDARY,
    attention_tolerance,
    max_error,
    quantized_linear_tolerance,
    top_p_boundary_width,
    value_tolerance,
)

# Private helpers the test suite calls as testing._name to build its own cases and checks.
from .checks import _as_tuple, _bits, _filtered_and_gumbel, _upcast  # noqa: F401
from .inputs import (  # noqa: F401
    _append_case,
    _AppendShape,
    _attention_case,
    _AttentionShape,
    _decode_case,
    _DecodeShape,
    _linear_case,
    _LinearShape,
    _sampling_case,
    _SamplingShape,
)

__all__ = [
    "ATTENTION_ATOL", "LOGPROB_TOLERANCE", "NEAR_TIE", "TOP_P_BOUNDARY", "attention_tolerance", "max_error",
    "quantized_linear_tolerance", "top_p_boundary_width", "value_tolerance",
    "plain_attention", "plain_decode_attention", "plain_linear",
    "DTYPES", "Case", "Device", "Kwargs", "cases", "random_allowed",
    "CheckResult", "CheckRow", "check_impl", "compare_attention", "compare_linear", "run_checks", "skip_reason",
    "top_p_boundary",
    "SMOLLM2_FILE", "SMOLLM2_PACKAGE", "smollm2_gguf",
]

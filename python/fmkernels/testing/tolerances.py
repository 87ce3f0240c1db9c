"""How far an output may be from the truth: the errors measured, and what each is allowed to be."""

from __future__ import annotations

import math

import torch

#: Added to twice plain PyTorch's error to make the attention tolerance.
ATTENTION_ATOL = 1e-5

#: Two sampled tokens whose Gumbel scores are this close (relatively) are a near tie.
NEAR_TIE = 1e-5

#: Largest accepted error of a log-probability, relative to max(1, |log-probability|).
LOGPROB_TOLERANCE = 1e-4

#: A token on the top-p boundary: the probability mass before it (in float64) is at least this
#: close to top_p, so fp32 rounding, not the rule, decides whether it is kept (p splitting a run
#: of tied tokens exactly is one such case). Either answer is accepted for such a token.
TOP_P_BOUNDARY = 1e-5


def top_p_boundary_width(vocab: int) -> float:
    """How close to top_p the mass before a token is on the top-p boundary, for a row of
    ``vocab`` tokens: ``TOP_P_BOUNDARY``, or four times sqrt(vocab) fp32 half-ulps of 1 where
    that is wider. An fp32 softmax and running sum over the row round once per term, and the
    roundings add up like a random walk (measured: 2.0e-5 off the float64 sum at 128256 tokens
    on one CPU, under 1e-5 on another), so the width grows with the row."""
    return max(TOP_P_BOUNDARY, 4.0 * math.sqrt(vocab) * 2.0 ** -24)


def max_error(actual: torch.Tensor, truth: torch.Tensor, *, relative: bool = False) -> float:
    """Largest elementwise error of ``actual`` against ``truth``, in float64.

    Parameters
    ----------
    actual, truth : Tensor
        Same shape; any floating dtypes.
    relative : bool
        Divide each difference by max(1, |truth|): absolute near zero, relative above one.

    Returns
    -------
    float
        0.0 for empty tensors. Equal infinities count as no error; NaN, or an infinity
        against anything else, counts as ``inf``.
    """
    a, t = actual.double(), truth.double()
    diff = (a - t).abs()
    if relative:
        diff = diff / t.abs().clamp_min(1.0)
    diff = torch.where(a == t, torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)
    return float(diff.max()) if diff.numel() else 0.0


#: The unit roundoff of each output dtype: the rounding of a result computed in fp32 to it.
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}

#: The block of x quantized to int8 together (llama.cpp's q8_0 activations).
ACTIVATION_BLOCK = 32


def quantized_linear_tolerance(x: torch.Tensor, weight: torch.Tensor, truth: torch.Tensor,
                               out_dtype: torch.dtype) -> torch.Tensor:
    """The error each output of a linear against a quantized weight may make (DESIGN.md,
    "Quantized weights"), elementwise, shaped like ``truth``.

    x (..., K) as the call got it, ``weight`` the dequantized weight (N, K), ``truth`` the
    float64 x @ weight^T. An implementation may quantize each block of 32 of a row of x to
    int8 with scale d = max|x| / 127 (x's error at most d / 2 per element) and accumulate in
    fp32, then round once to ``out_dtype``::

        |out - truth| <= 1/2 sum_b d_b sum_{j in b} |w_nj|        (x rounded to int8)
                         + (K + 2) 2^-24 sum_j |w_nj x_j|          (fp32 products and sums)
                         + u_out |truth| + 2^-24 [u_out > 0]        (the output's rounding)

    The first term is zero for a kernel that reads x as it is (triton, cuda, the reference);
    the second is the worst case of an fp32 dot product of K terms with a weight dequantized
    to within one fp32 rounding.
    """
    k = x.shape[-1]
    xs = x.double().reshape(-1, k)  # [rows, K]
    w = weight.double().abs()  # [N, K]
    blocks = -(-k // ACTIVATION_BLOCK)
    padded = torch.nn.functional.pad(xs.abs(), (0, blocks * ACTIVATION_BLOCK - k))
    step = padded.view(-1, blocks, ACTIVATION_BLOCK).amax(dim=-1) / 127  # [rows, blocks]
    per_element = step.repeat_interleave(ACTIVATION_BLOCK, dim=1)[:, :k]  # [rows, K]
    bound = 0.5 * per_element @ w.T + (k + 2) * 2.0 ** -24 * (xs.abs() @ w.T)
    rounding = OUTPUT_ROUNDING[out_dtype]
    bound = bound.view(truth.shape) + rounding * truth.double().abs() + (2.0 ** -24 if rounding else 0.0)
    return bound


def attention_tolerance(plain: torch.Tensor, truth: torch.Tensor) -> float:
    """The error an attention implementation may make: 2 x plain PyTorch's error + 1e-5.

    Parameters
    ----------
    plain : Tensor
        The output (or log-sum-exp) of ``plain_attention`` / ``plain_decode_attention``,
        computed in the implementation's input dtype.
    truth : Tensor
        The same output from the reference run on float64 inputs.

    Returns
    -------
    float
        ``2 * max_error(plain, truth) + ATTENTION_ATOL``.
    """
    return 2.0 * max_error(plain, truth) + ATTENTION_ATOL


def value_tolerance(dtype: torch.dtype) -> float:
    """Tolerance for values an op only scales and passes through (filter_logits' kept logits).

    Two units in the last place of float16 and bfloat16 (rounding the same fp32 number may
    land one unit apart); 1e-5 for float32. Applied to errors relative to max(1, |reference|).

    Parameters
    ----------
    dtype : torch.dtype
        The output's dtype.

    Returns
    -------
    float
    """
    return max(2.0 * torch.finfo(dtype).eps, 1e-5)

"""Float comparisons whose tolerance scales with the size of the numbers compared.

Two computations of the same float32 tensor by different kernels (Intel or AMD, AVX-512, AVX2 or
ATen's default kernels, MKL or oneDNN, eager or compiled) sum in different orders. The rounding
errors are relative to the magnitude of the partial sums, so an entry that ends near zero can be
off by ~1e-7 of the tensor's largest entries: an element-wise `atol=1e-5, rtol=1e-5` then fails on
an embedding gradient that reaches 261 (AMD EPYC CI: error 3e-5, 1.2e-7 of the largest entry).
A tolerance relative to the reference's largest entry does not depend on where zero happens to be.

`make test-numerics-default` runs the tests that compare floats a second time on other CPU kernels
than the machine's own, so a tolerance that only holds for one machine's kernels fails in CI.
With NUMERICS_LOG=<file>, every comparison appends its worst error / scale as a JSON line: how
much room each tolerance leaves, on this machine and under the other kernels.
"""

from __future__ import annotations

import json
import math
import os

import torch


def assert_close_scaled(actual, expected, *, rel: float, floor: float = 0.0, scale: float | None = None,
                        msg: str = "") -> None:
    """Assert |actual - expected| <= rel * max|expected| + floor, element-wise.

    rel: the allowed error as a fraction of the reference's largest magnitude (of `scale` when
    given). fp32 rounding is 6e-8 per operation: 1e-5 leaves room for any summation order and
    still fails on a real difference (a wrong mask, a missing term, another activation).
    For a scalar (a loss) this is a plain relative tolerance.
    floor: an absolute term, for a reference that may legitimately be all zeros.
    Shapes must match; both sides are compared in float64; non-finite entries must be identical.
    The message names the worst element, both values and the error as a fraction of the scale.
    """
    actual = torch.as_tensor(actual).detach().cpu()
    expected = torch.as_tensor(expected).detach().cpu()
    prefix = f"{msg}: " if msg else ""
    assert actual.shape == expected.shape, f"{prefix}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    same = torch.where(finite, torch.isfinite(a), (a == e) | (a.isnan() & e.isnan()))
    assert bool(same.all()), f"{prefix}non-finite entries differ at {same.logical_not().nonzero()[:5].tolist()}"
    if scale is None:
        scale = float(e[finite].abs().max()) if bool(finite.any()) else 0.0
    tolerance = rel * scale + floor
    error = torch.where(finite, (a - e).abs(), torch.zeros_like(e)).flatten()
    if error.numel() == 0:
        return
    worst = int(error.argmax())
    worst_error = float(error[worst])
    ratio = worst_error / scale if scale > 0 else (0.0 if worst_error == 0 else math.inf)
    if os.environ.get("NUMERICS_LOG"):
        with open(os.environ["NUMERICS_LOG"], "a") as log:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            log.write(json.dumps({"test": test, "msg": msg, "rel": rel, "ratio": ratio, "scale": scale}) + "\n")
    if worst_error <= tolerance:
        return
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
    raise AssertionError(
        f"{prefix}{int((error > tolerance).sum())} of {error.numel()} elements differ by more than "
        f"{rel:g} * {scale:.6g}{f' + {floor:g}' if floor else ''} = {tolerance:.3g}; worst at {index}: "
        f"actual {float(a.flatten()[worst]):.9g}, expected {float(e.flatten()[worst]):.9g}, "
        f"error {worst_error:.3g} = {ratio:.3g} of the scale"
    )

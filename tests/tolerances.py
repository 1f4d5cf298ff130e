"""One table of comparison tolerances for every numerical test (house rule 2)."""

import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # bf16 tables: values are rounded to 8 bits of mantissa before an fp32 accumulation, so
    # results are compared against the reference run on the same bf16-rounded inputs.
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close(actual, expected, dtype=None, msg=""):
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol, msg=msg or None)

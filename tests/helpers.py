"""Shared test helpers: comparisons that print the numbers when they fail."""

import torch


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str = "tensors") -> float:
    """Assert max |got - want| <= atol; on failure show max/mean difference and values side by side."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs()
    mx = diff.max().item() if diff.numel() else 0.0
    if mx > atol:
        i = diff.flatten().argmax().item()
        g, w = got.flatten().double(), want.flatten().double()
        lo = max(0, i - 2)
        rows = "\n".join(f"  [{j}] got {g[j].item(): .8f}  want {w[j].item(): .8f}" for j in range(lo, min(lo + 5, g.numel())))
        raise AssertionError(
            f"{what}: max abs diff {mx:.3e} > {atol:.1e} (mean {diff.mean().item():.3e}) at flat index {i}\n{rows}"
        )
    return mx

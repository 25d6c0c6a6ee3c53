"""The maths of each adapter kind (adapters/kinds/): weight changes, ranks, scales, refusals."""

import pytest
import torch
import torch.nn.functional as F

from sdlora.adapters import kinds
from sdlora.errors import UserError


def lora_parts(down, up, alpha=None):
    parts = {"lora_down.weight": down, "lora_up.weight": up}
    if alpha is not None:
        parts["alpha"] = torch.tensor(float(alpha))
    return parts


def test_linear_delta_and_scale():
    torch.manual_seed(0)
    down, up = torch.randn(4, 10), torch.randn(6, 4)
    parts = lora_parts(down, up, alpha=2)
    assert kinds.module_kind(parts) == "lora" and kinds.module_rank(parts) == 4
    assert kinds.module_scale(parts) == 0.5
    torch.testing.assert_close(kinds.module_delta(parts, (6, 10)), 0.5 * up @ down)
    # No alpha: loads as alpha = rank, scale 1.
    torch.testing.assert_close(kinds.module_delta(lora_parts(down, up), (6, 10)), up @ down)


def test_conv_deltas_act_like_the_two_convolutions():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 7, 7)
    for k in (1, 3):
        down, up = torch.randn(3, 5, k, k), torch.randn(8, 3, 1, 1)
        delta = kinds.module_delta(lora_parts(down, up, alpha=6), (8, 5, k, k))
        assert delta.shape == (8, 5, k, k)
        # Kohya applies down (the base conv's kernel/padding) then a 1x1 up, times alpha / rank.
        expected = 2.0 * F.conv2d(F.conv2d(x, down, padding=k // 2), up)
        torch.testing.assert_close(F.conv2d(x, delta, padding=k // 2), expected, rtol=1e-4, atol=1e-4)
    explicit = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    torch.testing.assert_close(kinds.module_delta(lora_parts(down, up), (8, 5, 3, 3)), explicit)


def test_loha_delta_is_the_scaled_hadamard_product():
    torch.manual_seed(0)
    r, out, fan_in = 4, 6, 5 * 3 * 3
    w1a, w1b, w2a, w2b = torch.randn(out, r), torch.randn(r, fan_in), torch.randn(out, r), torch.randn(r, fan_in)
    parts = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(2.0)}
    assert kinds.module_kind(parts) == "loha" and kinds.module_rank(parts) == r
    delta = kinds.module_delta(parts, (out, 5, 3, 3))
    expected = ((w1a @ w1b) * (w2a @ w2b) * (2.0 / r)).reshape(out, 5, 3, 3)
    torch.testing.assert_close(delta, expected)
    # Element by element, to pin the orientation: delta[o, i] = sum_r w1a[o,r] w1b[r,i] * sum_r w2a w2b.
    o, i = 3, 17
    value = (w1a[o] @ w1b[:, i]) * (w2a[o] @ w2b[:, i]) * 0.5
    torch.testing.assert_close(delta.reshape(out, -1)[o, i], value)


def test_loha_tucker_delta():
    torch.manual_seed(0)
    r, out, cin = 2, 4, 3
    t1, t2 = torch.randn(r, r, 3, 3), torch.randn(r, r, 3, 3)
    w1a, w1b, w2a, w2b = torch.randn(r, out), torch.randn(r, cin), torch.randn(r, out), torch.randn(r, cin)
    parts = {"hada_t1": t1, "hada_t2": t2, "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    delta = kinds.module_delta(parts, (out, cin, 3, 3))
    # Tucker: W1[p, q, k, l] = sum_ij w1a[i, p] t1[i, j, k, l] w1b[j, q]
    w1 = torch.zeros(out, cin, 3, 3)
    w2 = torch.zeros(out, cin, 3, 3)
    for p in range(out):
        for q in range(cin):
            w1[p, q] = sum(w1a[i, p] * t1[i, j] * w1b[j, q] for i in range(r) for j in range(r))
            w2[p, q] = sum(w2a[i, p] * t2[i, j] * w2b[j, q] for i in range(r) for j in range(r))
    torch.testing.assert_close(delta, w1 * w2, rtol=1e-4, atol=1e-5)


def test_a_module_for_another_base_is_refused():
    parts = lora_parts(torch.zeros(2, 10), torch.zeros(6, 2))
    with pytest.raises(UserError, match="different base model"):
        kinds.module_delta(parts, (6, 12))
    with pytest.raises(UserError, match="different base model"):
        kinds.module_delta(parts, (10, 6))


def test_unknown_module_kinds_are_named():
    for parts, name in (({"weight": torch.zeros(1), "on_input": torch.zeros(1)}, "IA"),
                        ({"a1.weight": torch.zeros(1), "b1.weight": torch.zeros(1)}, "GLoRA"),
                        ({"oft_blocks": torch.zeros(1)}, "OFT"), ({"diff": torch.zeros(1)}, "full"),
                        ({"lora_A.weight": torch.zeros(1)}, "diffusers")):
        with pytest.raises(UserError, match=name):
            kinds.module_kind(parts)
    with pytest.raises(UserError, match="lora_down.weight"):
        kinds.module_kind({"something.weight": torch.zeros(1)})

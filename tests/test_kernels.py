"""Our linear kernel against torch in every weight format, its batch invariance, the torch
fallback, the prefill attention, the scans of the logits, and the load-time conversion (the fused
decode step: test_step.py)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt2engine.formats import decode, encode
from gpt2engine.kernels import (
    MAX_ROWS,
    compiled,
    convert,
    gelu_tanh,
    linear,
    native_bf16,
    prefill_attention,
    rows_argmax,
    rows_finite,
)


def test_the_kernel_builds_here():
    assert compiled() is not None  # a C compiler is part of this machine's set-up


@pytest.mark.parametrize(("rows", "n_in", "n_out", "bias"), [
    (1, 768, 2304, True), (3, 77, 101, True), (16, 3072, 768, True), (MAX_ROWS, 40, 50257, False),
    (5, 1, 7, True), (2, 13, 1, False),
])
@torch.inference_mode()
def test_matches_f_linear(rows, n_in, n_out, bias):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, n_in), torch.randn(n_out, n_in) / n_in**0.5
    b = torch.randn(n_out) if bias else None
    expected = F.linear(x.double(), w.double(), None if b is None else b.double()).float()
    ours = linear(x, w, b)
    assert ours.shape == expected.shape and (ours - expected).abs().max() <= 1e-5


@torch.inference_mode()
def test_a_row_is_bit_identical_alone_and_in_any_batch():
    torch.manual_seed(0)
    w, b = torch.randn(2305, 768) * 0.02, torch.randn(2305)
    batch = torch.randn(MAX_ROWS, 768)
    together = linear(batch, w, b)
    for rows in (1, 2, 3, 5, 6, 7, 16, MAX_ROWS):  # blocks of 4 rows, then 1, 2 or 3
        part = linear(batch[:rows], w, b)
        assert torch.equal(part, together[:rows])
    assert torch.equal(linear(batch[7:8], w, b), together[7:8])


def test_shapes_and_dtypes_it_does_not_take_go_to_torch():
    x, w = torch.randn(MAX_ROWS + 1, 8), torch.randn(4, 8)
    with torch.inference_mode():
        assert torch.equal(linear(x, w, None), F.linear(x, w))  # a prefill-sized input
        assert torch.equal(linear(x[:2].double(), w.double(), None), F.linear(x[:2].double(), w.double()))
    weight = w.clone().requires_grad_()
    assert linear(x[:2], weight, None).requires_grad  # autograd keeps working


@pytest.mark.slow
def test_disabled_by_environment_is_torch_exactly():
    code = ("import torch, torch.nn.functional as F\n"
            "from gpt2engine.kernels import compiled, linear\n"
            "assert compiled() is None\n"
            "x, w = torch.randn(3, 64), torch.randn(9, 64)\n"
            "with torch.inference_mode(): assert torch.equal(linear(x, w, None), F.linear(x, w))")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "GPT2ENGINE_KERNELS": "0"})


def reference_int8(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    """What int8 weights compute, in float64: against int8 activations quantized per row, as our
    kernels do on every instruction set."""
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    x = torch.round(x / x_scale) * x_scale
    y = F.linear(x.double(), decode(q, scale).double())
    return (y if b is None else y + b.double()).float()


@pytest.mark.parametrize("rows", [1, 3, 16, MAX_ROWS, MAX_ROWS + 1, 300])  # the kernel, then the GEMM
@pytest.mark.parametrize(("n_in", "n_out"), [(768, 2304), (77, 101), (3072, 5)])
@torch.inference_mode()
def test_smaller_formats_compute_what_their_weights_stand_for(rows, n_in, n_out):
    torch.manual_seed(rows + n_in)
    x, w, b = torch.randn(rows, n_in), torch.randn(n_out, n_in) / n_in**0.5, torch.randn(n_out)
    q, scale = encode(w, "int8")
    expected = reference_int8(x, q, scale, b)
    assert (linear(x, q, b, scale) - expected).abs().max() <= 1e-4
    stored, _ = encode(w, "bfloat16")
    expected = F.linear(x.double(), stored.double(), b.double()).float()
    tolerance = 1e-4 if rows <= MAX_ROWS or not native_bf16() else 0.05  # a bfloat16 GEMM rounds x too
    assert (linear(x, stored, b) - expected).abs().max() <= tolerance


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
@torch.inference_mode()
def test_every_format_is_bit_identical_alone_and_in_any_batch(fmt):
    torch.manual_seed(1)
    w, b = encode(torch.randn(2305, 768) * 0.02, fmt), torch.randn(2305)
    batch = torch.randn(MAX_ROWS, 768)
    together = linear(batch, w[0], b, w[1])
    for rows in (1, 2, 3, 5, 6, 7, 16):
        assert torch.equal(linear(batch[:rows], w[0], b, w[1]), together[:rows])
    assert torch.equal(linear(batch[9:10], w[0], b, w[1]), together[9:10])


@pytest.mark.parametrize("rows", [4, 300])  # the decode kernel, the GEMM
@pytest.mark.parametrize("n_in", [768, 77])  # whole vectors; a tail
@torch.inference_mode()
def test_int8_a_row_with_nan_or_inf_gives_nan_and_leaves_the_others(rows, n_in):
    torch.manual_seed(rows)
    x, w = torch.randn(rows, n_in), torch.randn(64, n_in)
    q, scale = encode(w, "int8")
    clean = linear(x, q, None, scale)
    x[1, n_in - 1], x[2, 3] = float("inf"), float("nan")
    y = linear(x, q, None, scale)
    assert bool(y[1:3].isnan().all())
    assert torch.equal(y[[0, *range(3, rows)]], clean[[0, *range(3, rows)]])


@pytest.mark.slow
def test_formats_without_the_kernels_still_compute_through_torch():
    code = ("import torch, torch.nn.functional as F\n"
            "from gpt2engine.formats import decode, encode\n"
            "from gpt2engine.kernels import compiled, linear\n"
            "assert compiled() is None\n"
            "x, w = torch.randn(3, 64), torch.randn(9, 64)\n"
            "q, s = encode(w, 'int8')\n"
            "with torch.inference_mode():\n"
            "    assert torch.equal(linear(x, q, None, s), F.linear(x, decode(q, s)))")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "GPT2ENGINE_KERNELS": "0"})


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("shape", [(768, 2304), (77, 101), (13, 1), (40, 5000)])
@pytest.mark.parametrize("transpose", [False, True])
def test_convert_gives_the_bits_of_encode_and_finds_non_finite_values(fmt, shape, transpose):
    torch.manual_seed(shape[0])
    source = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # columns of very different size
    stored, scale, finite = convert(source, fmt, transpose)
    expected, expected_scale = encode(source.t() if transpose else source, fmt)
    assert finite and torch.equal(stored, expected)
    assert (scale is None and expected_scale is None) or torch.equal(scale, expected_scale)
    for bad in (float("nan"), float("inf")):
        broken = source.clone()
        broken[-1, -1] = bad
        assert not convert(broken, fmt, transpose)[2]


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("transpose", [False, True])
def test_convert_reads_a_file_as_it_reads_memory(tmp_path, fmt, transpose):
    """The loader's path: the values read from the file at an offset (pread), not through a map."""
    torch.manual_seed(7)
    source = torch.randn(301, 77) * torch.logspace(-2, 1, 77)
    path = tmp_path / "weights"
    path.write_bytes(b"header" + source.numpy().tobytes())
    shape_only = torch.empty(0).new_empty(source.shape)
    with open(path, "rb") as handle:
        stored, scale, finite = convert(shape_only, fmt, transpose, file=(handle.fileno(), 6))
    expected, expected_scale, _ = convert(source, fmt, transpose)
    assert finite and torch.equal(stored, expected)
    assert (scale is None and expected_scale is None) or torch.equal(scale, expected_scale)
    with open(path, "rb") as handle, pytest.raises(OSError, match="could not be read"):
        convert(shape_only, fmt, transpose, file=(handle.fileno(), 12))  # 6 bytes past the end


@pytest.mark.parametrize("V", [1, 63, 64, 65, 50257])
def test_row_scans_match_torch(V):
    torch.manual_seed(V)
    logits = torch.randn(6, V)
    logits[1] = 0.0  # all tied: the first
    logits[2, V // 2 :] = logits[2].max() + 1  # a tie at the largest value: the first of it
    logits[3, -1] = float("inf")
    logits[4, 0] = float("-inf")
    logits[5] = float("-inf")
    assert torch.equal(rows_argmax(logits), logits.argmax(dim=-1))
    assert rows_finite(logits, V).tolist() == [True, True, True, False, False, False]
    logits[0, -1] = float("nan")
    assert not rows_finite(logits, V)[0] and rows_finite(logits, V - 1)[0]  # only the first n count


@pytest.mark.parametrize("fmt", ["float32", "int8"])
@torch.inference_mode()
def test_a_prefill_gemm_row_equals_the_decode_kernels(fmt):
    torch.manual_seed(4)
    w, b = encode(torch.randn(301, 3072) * 0.02, fmt), torch.randn(301)
    x = torch.randn(MAX_ROWS + 72, 3072)  # past MAX_ROWS: the GEMM path
    many, one = linear(x, w[0], b, w[1]), linear(x[150:151], w[0], b, w[1])
    if fmt == "int8":  # the same int8 activations and exact int32 sums
        assert torch.equal(many[150:151], one)
    else:  # float sums added in another order
        assert (many[150:151] - one).abs().max() <= 1e-4


@pytest.mark.parametrize(("T", "start", "H", "D", "S"), [
    (256, 0, 12, 64, 600), (256, 256, 12, 64, 600),  # the 124M model's two chunks of a 512 prompt
    (5, 3, 3, 14, 20), (17, 0, 1, 16, 17), (9, 30, 5, 8, 64), (2, 0, 2, 7, 4),  # odd sizes, tails
])
@torch.inference_mode()
def test_prefill_attention_matches_masked_sdpa(T, start, H, D, S):
    torch.manual_seed(T + start)
    qkv, k_cache, v_cache = torch.randn(1, T, 3 * H * D), torch.randn(1, H, S, D), torch.randn(1, H, S, D)
    q, k, v = (t.view(1, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    k_cache[:, :, start : start + T], v_cache[:, :, start : start + T] = k, v  # the chunk, written
    L = start + T
    hidden = torch.arange(L) > torch.arange(start, L)[:, None]  # query t sees slots 0..start + t
    expected = F.scaled_dot_product_attention(q, k_cache[:, :, :L], v_cache[:, :, :L], scale=0.3,
                                              attn_mask=torch.zeros(T, L).masked_fill_(hidden, float("-inf")))
    ours = prefill_attention(qkv, k_cache, v_cache, start, H, 0.3)
    assert (ours - expected.transpose(1, 2).reshape(1, T, H * D)).abs().max() <= 1e-5


@torch.inference_mode()
def test_gelu_tanh_matches_torchs_in_place_and_at_the_extremes():
    x = torch.cat([torch.randn(70_001) * 3, torch.tensor([0.0, -0.0, 1e-30, -200.0, 200.0, -9.0, 9.0, 40.0])])
    expected = F.gelu(x.double(), approximate="tanh").float()
    ours = gelu_tanh(x.clone())
    assert torch.allclose(ours, expected, rtol=1e-6, atol=1e-6) and torch.isfinite(ours).all()
    y = x.clone()
    assert gelu_tanh(y) is y  # in place: the MLP's hidden state is its own
    assert torch.allclose(gelu_tanh(x.clone().requires_grad_()), expected, rtol=1e-6, atol=1e-6)  # torch's

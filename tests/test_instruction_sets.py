"""Every instruction-set level our kernels are built for, tested on whatever machine runs the tests:
the kernel, decode-step, engine, format and model tests run again against an AVX2 (x86-64-v3)
build and a plain-C one, so a developer on an AVX-512 machine sees an AVX2 failure; and int8
gives the same bits on every level, since its sums are exact integers (linear_int8.h)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # each test builds the kernels for another level

# AVX2 + FMA, and plain C (one lane)
OLDER_LEVELS = ["x86-64-v3", "x86-64"] if platform.machine() == "x86_64" else ["armv8-a"]
TESTS = Path(__file__).parent
AT_EVERY_LEVEL = ["test_kernels.py", "test_step.py", "test_engine.py", "test_formats.py", "test_model.py",
                  "test_activations.py"]

INT8_PRODUCTS = """
import sys, torch
from gpt2engine.formats import encode
from gpt2engine.kernels import linear
torch.manual_seed(0)
x, w = torch.randn(300, 771), torch.randn(203, 771) * 0.1
q, scale = encode(w, "int8")
x[1, 7] = float("inf")
with torch.inference_mode():
    torch.save([linear(x[:rows], q, None, scale) for rows in (1, 2, 5, 300)], sys.argv[1])
"""


def level_env(march: str, cache: Path) -> dict[str, str]:
    return {**os.environ, "GPT2ENGINE_MARCH": march, "GPT2ENGINE_CACHE": str(cache)}


@pytest.mark.parametrize("march", OLDER_LEVELS)
def test_the_kernel_and_engine_tests_pass_on_the_build_for(march, tmp_path):
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                            *(str(TESTS / name) for name in AT_EVERY_LEVEL)],
                           capture_output=True, text=True, env=level_env(march, tmp_path), cwd=TESTS.parent)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert len(list(tmp_path.glob("gpt2engine/kernels-*.so"))) == 1  # built for that level, apart


@pytest.mark.parametrize("march", OLDER_LEVELS)
def test_int8_gives_the_same_bits_on_every_level(march, tmp_path):
    # the batch-1 and batched kernels and the GEMM (300 rows), a tail of 771 % 64, a row with inf
    theirs = tmp_path / "theirs.pt"
    subprocess.run([sys.executable, "-c", INT8_PRODUCTS, str(theirs)], check=True,
                   env=level_env(march, tmp_path))
    mine = tmp_path / "mine.pt"
    subprocess.run([sys.executable, "-c", INT8_PRODUCTS, str(mine)], check=True)
    for ours, other in zip(torch.load(mine), torch.load(theirs), strict=True):
        assert len(ours) == 1 or bool(ours[1].isnan().all())  # the row with an infinity is NaN, ...
        torch.testing.assert_close(other, ours, rtol=0, atol=0, equal_nan=True)  # ... the rest the same bits


def test_torch_held_to_avx2_takes_the_float32_gemm_for_bfloat16_weights():
    # the AVX2 machine emulated on an AVX-512 one (docs/kernels.md): torch's bfloat16 GEMM is slow there
    code = "from gpt2engine.kernels import native_bf16; assert not native_bf16()"
    held = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    subprocess.run([sys.executable, "-c", code], check=True, env=held)


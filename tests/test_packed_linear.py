"""Packed linear kernels under the transformers engine: MKL's gives the same numbers and answers as plain
`nn.Linear`, fbgemm's fp16 one exactly `nn.Linear` with fp16-rounded weights, and both leave prefill and training
on the plain path."""

import pytest
import torch
import torch.nn.functional as F
from conftest import save_varied_model
from torch import nn
from transformers import AutoModelForCausalLM

from ksg_ray.engines import SamplingParams, packed_linear
from ksg_ray.engines.packed_linear import (
    DEFAULT_KERNEL,
    KERNELS,
    MAX_PACKED_ROWS,
    PackedLinear,
    kernel_available,
    pack_linears,
    packed_gemm_available,
)
from ksg_ray.engines.transformers_engine import TransformersEngine

pytestmark = pytest.mark.skipif(not packed_gemm_available(), reason="this torch has no MKL packed GEMM")

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are a careful doctor who explains every step."},
     {"role": "user", "content": "What should I do about a mild fever that has lasted two days?"}],
    [{"role": "user", "content": "I have had heartburn every night for two weeks. What could it be?"}],
]


@pytest.fixture(autouse=True)
def packed_path_on_any_thread_count(monkeypatch):
    """The packed path whatever this CPU and thread count (off on several threads outside AMD: slower there)."""
    monkeypatch.setattr(packed_linear, "PACK_ON_SEVERAL_THREADS", True)


def _rounded_to_fp16(linear: nn.Linear) -> nn.Linear:
    rounded = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        rounded.weight.copy_(linear.weight.half().float())
        if linear.bias is not None:
            rounded.bias.copy_(linear.bias)
    return rounded


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_nn_linear_on_both_paths(bias, kernel):
    if not kernel_available(kernel):
        pytest.skip(f"this torch has no {kernel} kernel")
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    packed = PackedLinear(linear, kernel=kernel)
    few_rows = _rounded_to_fp16(linear) if kernel == "fp16" else linear  # fp16: exactly the rounded weights
    with torch.inference_mode():
        for shape in [(1, 96), (7, 96), (1, 1, 96), (5, 1, 96), (2, 32, 96), (MAX_PACKED_ROWS, 96),
                      (MAX_PACKED_ROWS, 1, 96), (MAX_PACKED_ROWS + 1, 96), (MAX_PACKED_ROWS + 1, 1, 96), (3, 100, 96)]:
            x = torch.randn(shape)
            got = packed(x)
            decode = x.dim() == 3 and x.shape[1] == 1
            packs = x.numel() // 96 <= MAX_PACKED_ROWS and (kernel == "mkl" or decode)  # fp16: decode steps only
            want = (few_rows if packs else linear)(x)  # prefill-sized calls: plain fp32
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if kernel == "fp16" and packs:
                assert not torch.allclose(got, linear(x), rtol=1e-6, atol=1e-6)  # it did read rounded weights
    x = torch.randn(4, 96)
    packed(x).sum().backward()  # with autograd on it takes the plain path, so gradients reach the weight
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pays", [True, False])
def test_several_threads_pack_only_where_packing_pays(pays, monkeypatch):
    monkeypatch.setattr(packed_linear, "PACK_ON_SEVERAL_THREADS", pays)
    plain_calls = []
    linear_fn = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: plain_calls.append(1) or linear_fn(*a))
    packed = PackedLinear(nn.Linear(96, 200), kernel="mkl")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode():
                packed(torch.randn(8, 96))
    finally:
        torch.set_num_threads(threads)
    assert len(plain_calls) == (0 if pays else 1)  # one thread packs 8 rows; two pack them only where it pays


@pytest.mark.parametrize("kernel", KERNELS)
def test_pack_linears_keeps_every_parameter_and_the_logits(tiny_model_path, tmp_path, kernel):
    if not kernel_available(kernel):
        pytest.skip(f"this torch has no {kernel} kernel")
    save_varied_model(tiny_model_path, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.inference_mode():
        before_logits = model(ids).logits
    before = dict(model.named_parameters())
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the layers are packed on a thread each: each must get its own weight
    try:
        assert pack_linears(model, kernel=kernel) == n_linear > 0
    finally:
        torch.set_num_threads(threads)
    assert not any(type(m) is nn.Linear for m in model.modules())
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # shared, tied stay tied
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids[:1, :5]).logits, before_logits[:1, :5], rtol=1e-4, atol=1e-4)
        for layer in (m for m in model.modules() if isinstance(m, PackedLinear)):  # a decode step's rows
            x = torch.randn(3, 1, layer.in_features)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=2e-3, atol=2e-3)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert pack_linears(half) == 0  # only fp32 layers are packed


def test_engine_packs_with_the_kernel_it_is_given(tiny_model_path):
    assert DEFAULT_KERNEL in KERNELS
    kernels = {m.kernel for m in TransformersEngine(tiny_model_path).model.modules() if isinstance(m, PackedLinear)}
    assert kernels == ({DEFAULT_KERNEL} if kernel_available(DEFAULT_KERNEL) else set())
    for kernel in (k for k in KERNELS if kernel_available(k)):
        engine = TransformersEngine(tiny_model_path, packed_linear=kernel)
        assert {m.kernel for m in engine.model.modules() if isinstance(m, PackedLinear)} == {kernel}
    with pytest.raises(ValueError, match="packed_linear must be one of"):
        TransformersEngine(tiny_model_path, packed_linear="int8")


def test_smollm2_answers_the_same_with_and_without_packing(smollm2_path):
    params = SamplingParams(max_new_tokens=24)
    packed = TransformersEngine(smollm2_path, packed_linear="mkl")
    assert any(isinstance(m, PackedLinear) for m in packed.model.modules())
    plain = TransformersEngine(smollm2_path, packed_linear=None)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert packed.generate(PROMPTS, params) == plain.generate(PROMPTS, params)
    assert packed.score(PROMPTS, ["Drink water and rest."] * 3) == pytest.approx(
        plain.score(PROMPTS, ["Drink water and rest."] * 3), abs=1e-5)


@pytest.mark.skipif(not kernel_available("fp16"), reason="this torch has no fbgemm fp16 kernel")
def test_smollm2_fp16_weights_round_only_the_decode_steps(smollm2_path, monkeypatch):
    """fp16-read weights: prefill and scoring stay exact fp32; the greedy answers start the same."""
    plain = TransformersEngine(smollm2_path, packed_linear=None)
    half = TransformersEngine(smollm2_path, packed_linear="fp16")
    replies = ["Drink water and rest."] * 3
    assert half.score(PROMPTS, replies) == pytest.approx(plain.score(PROMPTS, replies), abs=1e-5)
    calls = []
    fp16_op = torch.ops.quantized.linear_dynamic_fp16
    monkeypatch.setattr(torch.ops.quantized, "linear_dynamic_fp16", lambda *a: calls.append(1) or fp16_op(*a))
    params = SamplingParams(max_new_tokens=24)
    got, want = half.generate(PROMPTS, params), plain.generate(PROMPTS, params)
    assert calls  # the decode steps ran on the fp16 kernel
    for g, w in zip(got, want, strict=True):  # a rounding of the weights: the first tokens are the same
        assert g[0].text.split()[:5] == w[0].text.split()[:5] and g[0].num_tokens > 5


@pytest.mark.parametrize(("cpuinfo", "family", "amd"), [
    ("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n", 25, True),
    ("vendor_id\t: AuthenticAMD\ncpu family\t: 26\n", 26, True),
    ("vendor_id\t: GenuineIntel\ncpu family\t: 6\n", 6, False),
    ("", None, False),
])
def test_cpu_family_and_vendor_from_cpuinfo(monkeypatch, cpuinfo, family, amd):
    """The kernel rule reads these two: mkl by default only on the AMD family where it was measured to win."""
    from ksg_ray.common import hardware

    monkeypatch.setattr(hardware, "_cpuinfo", lambda: cpuinfo)
    assert hardware.cpu_family() == family and hardware.amd_cpu() is amd

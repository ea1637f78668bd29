"""Training FLOPs counted from shapes, the same way for every method.

Forward, per token, one encoder layer (hidden H, intermediate I, sequence length T):

    2 * (4 H^2 + 2 H I)   the matmuls: Q, K, V, output projection, FFN in and out
                          (2 FLOPs per multiply-add)
  + 4 T H                 attention scores Q K^T and context P V (T*H multiply-adds each)

MLM head, per masked token (the head runs on masked positions only):

    2 H^2 + 2 H V         transform dense + decoder (V = vocab size)

Embedding lookups, biases, LayerNorms, softmax and activations are left out (lower
order: O(H) per token against O(H^2)), so the count sits a few percent under a profiler's.

A training step costs, per token, forward 1x and backward 2x (one matmul for the input
gradient, one for the weight gradient) for each layer that trains; 1x for a frozen layer
run live (forward only, nothing trainable below it); 0 for layers whose output is read
from the activation cache, and 0 for layers PLD drops. The head trains in every method,
but when the decoder weight is tied to frozen word embeddings (MSLT after stage 1) its
weight gradient is never computed: the decoder's backward is then 1x, not 2x.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig


def layer_forward_flops(config: PretrainedConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one encoder layer at sequence length `seq_len`."""
    h, i = config.hidden_size, config.intermediate_size
    return 2.0 * (4 * h * h + 2 * h * i) + 4.0 * seq_len * h


def head_forward_flops(config: PretrainedConfig) -> float:
    """Forward FLOPs of the MLM head per masked token: transform dense + decoder."""
    h, v = config.hidden_size, config.vocab_size
    return 2.0 * h * h + 2.0 * h * v


def step_flops(
    config: PretrainedConfig,
    *,
    tokens: int,
    masked_tokens: int,
    trained_layers: int,
    frozen_live_layers: int,
    seq_len: int,
    head_trains: bool = True,
    decoder_weight_trains: bool | None = None,
) -> float:
    """FLOPs of one training step (forward + backward) over `tokens` tokens.

    `tokens` counts every position in the batch (padding included: it is computed),
    `masked_tokens` the positions with a label, `seq_len` the padded length each sequence
    attends over (required: `max_position_embeddings` is usually not it). Layers read from
    a cache or dropped by PLD are simply not counted in either layer number.
    `head_trains=False` counts the head forward only (evaluation, cache build).
    `decoder_weight_trains` defaults to `head_trains`; set it False when the tied word
    embeddings are frozen.
    """
    layer = layer_forward_flops(config, seq_len)
    encoder = tokens * layer * (3 * trained_layers + frozen_live_layers)
    if decoder_weight_trains is None:
        decoder_weight_trains = head_trains
    h = config.hidden_size
    transform, decoder = 2.0 * h * h, 2.0 * h * config.vocab_size
    head = transform + decoder  # forward
    if head_trains:
        head += 2 * transform + (2 if decoder_weight_trains else 1) * decoder
    return encoder + masked_tokens * head


# --- The peak a speed is measured against (MFU) -------------------------------------------
#
# MFU = model FLOPs per second (counted above, never measured) / a peak FLOP/s. On a GPU the
# peak is the vendor's dense tensor-core figure (what nanoGPT and torchtitan divide by); on
# a CPU there is no trustworthy datasheet figure for a shared or throttled machine, so the
# peak is measured in the same run: a plain matmul at a large square shape (the machine's
# attainable rate) and at the model's own FFN shape (what the model's largest matmul could
# reach at best).

# Dense (no structured sparsity) peak TFLOP/s per device: (bf16/fp16 tensor cores with fp32
# accumulation, fp32 without TF32). Matched by substring of torch.cuda.get_device_name(),
# first match wins, so longer names come before their prefixes (A100 before A10, L40S
# before L4, H100 PCIe before H100). Sources: NVIDIA datasheets (A100 40/80GB; H100 SXM5
# and PCIe; L4; L40S; A10 (A10G taken equal: AWS publishes no separate figure); V100 SXM2;
# T4; Ada Lovelace whitepaper appendix for the RTX 4090; Ampere GA102 whitepaper for the
# RTX 3090). V100 and T4 have no bf16: their fp16 figure stands in for it.
GPU_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("A10G", 125.0, 31.2),
    ("A10", 125.0, 31.2),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
)
SQUARE = 2048  # the large square matmul's side: big enough to reach a CPU's attainable rate


@dataclass(frozen=True)
class Peak:
    """The FLOP/s MFU divides by, and where it came from."""

    flops_per_s: float
    source: str  # "measured: ...", "table: <device> <dtype>", "--peak_tflops"

    def mfu(self, flops: float, seconds: float) -> float | None:
        if seconds <= 0 or self.flops_per_s <= 0:
            return None
        return flops / seconds / self.flops_per_s

    def to_dict(self) -> dict[str, float | str]:
        return {"peak_flops_per_s": self.flops_per_s, "peak_source": self.source}


def gpu_peak(device_name: str, half: bool) -> Peak | None:
    """The table's dense peak of a GPU (bf16/fp16 when `half`, else fp32); None if unknown."""
    for pattern, half_tflops, fp32_tflops in GPU_PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            tflops = half_tflops if half else fp32_tflops
            kind = "bf16" if half else "fp32"
            return Peak(tflops * 1e12, f"table: {device_name} dense {kind}")
    return None


def matmul_flops_per_s(m: int, k: int, n: int, min_time: float = 0.2) -> float:
    """FLOP/s of an fp32 [m, k] x [k, n] matmul on this CPU, with torch's current threads."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # first call allocates and picks a kernel
    calls, began = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - began) < min_time or calls < 2:
        a @ b
        calls += 1
    return 2.0 * m * k * n * calls / elapsed


def ffn_shape(config: PretrainedConfig, tokens: int) -> tuple[int, int, int]:
    """The model's largest matmul: the FFN's [tokens, H] x [H, I]."""
    return tokens, config.hidden_size, config.intermediate_size


def peak_for(
    device: torch.device | str, *, half: bool = False, peak_tflops: float | None = None
) -> Peak:
    """The run's peak: the override, else the GPU table, else a measured square matmul."""
    if peak_tflops:
        return Peak(peak_tflops * 1e12, "--peak_tflops")
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak(name, half)
        if found is None:
            raise ValueError(f"no peak FLOP/s known for {name!r}: pass --peak_tflops")
        return found
    rate = matmul_flops_per_s(SQUARE, SQUARE, SQUARE)
    threads = torch.get_num_threads()
    return Peak(rate, f"measured: fp32 matmul {SQUARE}^3, {threads} threads")


def run_peak(
    config: PretrainedConfig,
    tokens: int,
    device: torch.device | str,
    *,
    half: bool = False,
    peak_tflops: float | None = None,
) -> dict[str, float | str | None]:
    """What a run records in `peak.json` for its MFU: the peak (as `peak_for`) and, on a
    CPU, the rate of the model's FFN matmul for a batch of `tokens` tokens."""
    try:
        out = peak_for(device, half=half, peak_tflops=peak_tflops).to_dict()
    except ValueError as e:  # an unknown GPU: the run goes on, its summary shows no MFU
        return {"peak_flops_per_s": None, "peak_source": str(e)}
    if torch.device(device).type == "cpu":
        out["ffn_matmul_flops_per_s"] = matmul_flops_per_s(*ffn_shape(config, tokens))
        out["threads"] = torch.get_num_threads()
    return out

"""The DiffusionGemma text model: one stack of weights run two ways.

`encode` is the causal encoder: it appends the K/V of new tokens (prompt, or a committed canvas) to the cache.
`decode` is the bidirectional decoder: it denoises a canvas that reads the cached prefix, and returns logits.
The only weights that differ between the two are the per-layer `layer_scalar`s; the decoder alone has the
self-conditioning block. `encode_and_decode_hidden` runs both in one pass: a committed canvas's encoding and the
next canvas's first denoising step share one read of the weights.

Parameter names equal the checkpoint's `model.decoder.*` names (minus that prefix), so loading is a rename-free
assignment; the encoder's own scalars live in `encoder_layer_scalars`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dgemma.config import FULL, SLIDING, ModelConfig
from dgemma.model.attention import Attention, AttentionBatch
from dgemma.model.kv_cache import KVCache
from dgemma.model.layers import GatedMLP, RMSNorm, Rotation, linear, rms_norm, rope_inv_freq
from dgemma.model.moe import Experts, Router
from dgemma.model.side_stream import SideStream


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.index = index
        self.kind = config.layer_types[index]
        self.self_attn = Attention(h, config.num_attention_heads, config.attention(index), eps)
        self.mlp = GatedMLP(h, config.intermediate_size)
        self.router = Router(h, config.num_experts, config.top_k_experts, eps)
        self.experts = Experts(config.num_experts, h, config.moe_intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))  # the decoder's; the encoder's is kept by the model
        # Device types that may run the fused residual norms (see `DiffusionGemma.set_kernel_devices`).
        self.kernel_devices: tuple[str, ...] = ("cuda",)
        # Where the dense MLP runs beside the router and experts (inference on a GPU; `set_side_stream`).
        self.side_stream: SideStream | None = None

    def _apply(self, fn, recurse=True):
        self.side_stream = None  # the stream belongs to the device the layer leaves
        return super()._apply(fn, recurse)

    def forward(self, x, rotation: Rotation, batch: AttentionBatch, cache: KVCache, scalar: torch.Tensor,
                x_normed: torch.Tensor | None = None, next_norm: RMSNorm | None = None):
        """x [B, T, H] -> (out [B, T, H], next_norm(out) or None); scalar: [1], or [T, 1] when encoder and decoder
        tokens share the forward. x_normed: this layer's input norm of x, where the layer before wrote it
        (`FOLD_NEXT_NORM`); next_norm: the norm the layer after applies to out, which this one may apply for it."""
        attn = self.self_attn(x_normed if x_normed is not None else self.input_layernorm(x), rotation, batch,
                              self.kind, cache, self.index)
        return self.feed_forward(x, attn, scalar, next_norm)

    def feed_forward(self, x: torch.Tensor, attn: torch.Tensor, scalar: torch.Tensor,
                     next_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything after attention: the residual norms, the dense MLP, routing and experts; (out, next_norm(out)
        where the output kernel computes it, else None). It reads no layer index or cache, so one torch.compile of
        it serves every layer in training (`compile_feed_forward`)."""
        h, dense_in, router_in, experts_in = self.attention_residual(x, attn)  # [B, T, H] each
        side = SideStream.active(self.side_stream)
        dense = side.fork(self.mlp, dense_in) if side else self.mlp(dense_in)  # [B, T, H]
        weights, experts = self.router(router_in.reshape(-1, h.shape[-1]))  # routed on the raw residual
        flat_in = experts_in.reshape(-1, h.shape[-1])  # [N, H]
        # The fused MoE's rows unsummed [N * K, H]: the output kernel sums them (one kernel fewer a layer).
        rows = self.experts.rows(flat_in, weights, experts) if self.fold_combine(h) else None
        if rows is None:
            routed, route_weights = self.experts(flat_in, weights, experts).view_as(h), None
        else:
            routed, route_weights = rows, weights
        if side:
            side.join()
        if next_norm is not None and self.fold_next_norm(h, next_norm):
            return self.layer_output(h, dense, routed, scalar, route_weights, next_norm.weight)
        return self.layer_output(h, dense, routed, scalar, route_weights), None

    def fold_combine(self, h: torch.Tensor) -> bool:
        """Whether the output kernel sums the experts' rows itself (`FOLD_MOE_COMBINE`, and the fused norms run)."""
        return FOLD_MOE_COMBINE and use_fused_norms(h, self.kernel_devices)

    def fold_next_norm(self, h: torch.Tensor, norm: RMSNorm) -> bool:
        """Whether the output kernel also applies the next norm of the residual stream (`FOLD_NEXT_NORM`, the fused
        norms run, and that norm is a weighted one with this layer's eps)."""
        return (FOLD_NEXT_NORM and use_fused_norms(h, self.kernel_devices) and norm.weight is not None
                and norm.eps == self.input_layernorm.eps)

    def attention_residual(self, x: torch.Tensor, attn: torch.Tensor):
        """h = x + norm(attn), and h normalised for the dense MLP, the router and the experts: 4 x [B, T, H]."""
        if use_fused_norms(x, self.kernel_devices):
            from dgemma.kernels.residual_norms import attention_residual_triton  # 1 kernel instead of 7

            return attention_residual_triton(
                x, attn, self.post_attention_layernorm.weight, self.pre_feedforward_layernorm.weight,
                self.pre_feedforward_layernorm_2.weight, self.router.scale, self.router.inv_sqrt_hidden,
                self.input_layernorm.eps)
        h = x + self.post_attention_layernorm(attn)
        return h, self.pre_feedforward_layernorm(h), self.router.normalize(h), self.pre_feedforward_layernorm_2(h)

    def layer_output(self, h: torch.Tensor, dense: torch.Tensor, routed: torch.Tensor, scalar: torch.Tensor,
                     route_weights: torch.Tensor | None = None, w_next: torch.Tensor | None = None):
        """out = (h + norm(norm(dense) + norm(routed))) * scalar: [B, T, H]. With route_weights [N, K]
        (`fold_combine`), routed is the experts' unsummed rows [N * K, H]; with w_next [H] (`fold_next_norm`),
        (out, norm(out; w_next))."""
        if use_fused_norms(h, self.kernel_devices):
            from dgemma.kernels.residual_norms import layer_output_triton  # 1 kernel instead of 7

            return layer_output_triton(
                h, dense, routed, self.post_feedforward_layernorm_1.weight, self.post_feedforward_layernorm_2.weight,
                self.post_feedforward_layernorm.weight, scalar, self.input_layernorm.eps, route_weights, w_next)
        if route_weights is not None or w_next is not None:
            raise ValueError("folds into the layer's output need its fused kernel (see Layer.fold_combine)")
        mixed = self.post_feedforward_layernorm_1(dense) + self.post_feedforward_layernorm_2(routed)
        return (h + self.post_feedforward_layernorm(mixed)) * scalar


# Whether a layer's output kernel also sums the routed experts' K rows per token (in place of the MoE's combine
# kernel), and also applies the next norm of the residual stream (in place of the next layer's input norm, or the
# final norm): one launch fewer a layer each, the same arithmetic (bit-identical logits, cache and engine tokens on
# an H100). `python scripts/flags_ab.py`, one H100, 2026-12-07: step b1 22.83 -> 22.51 ms, b8 54.87 -> 54.58 ms,
# AR 225.8 -> 230.6 tok/s with both (each alone gives about half).
FOLD_MOE_COMBINE = True
FOLD_NEXT_NORM = True


def use_fused_norms(x: torch.Tensor, kernel_devices: tuple[str, ...]) -> bool:
    """Whether a layer's residual norms run as `dgemma.kernels.residual_norms` (inference on a kernel device; the
    kernels have no backward). Devices, dtypes and the grad mode only: a captured CUDA graph keeps the choice."""
    return (x.device.type in kernel_devices and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and not torch.is_grad_enabled())


class SelfConditioning(nn.Module):
    """Mixes the previous step's soft prediction into the canvas embeddings."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.pre_norm = RMSNorm(config.hidden_size, self.eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, embeds: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:  # both [B, C, H]
        normed = self.pre_norm(soft)
        signal = self.down_proj(nn.functional.gelu(self.gate_proj(normed), approximate="tanh") * self.up_proj(normed))
        return rms_norm(embeds + signal, None, self.eps)


class DiffusionGemma(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.encoder_layer_scalars = nn.Parameter(torch.ones(config.num_layers))
        self.embed_scale = math.sqrt(config.hidden_size)
        self.kernel_devices: tuple[str, ...] = ("cuda",)  # where the LM head of a few rows runs `linear`'s kernel
        self.reset_buffers(None)

    def reset_buffers(self, device: torch.device | None) -> None:
        """(Re)compute the RoPE tables: needed after building on the meta device and loading weights."""
        self.register_buffer("inv_freq_sliding", rope_inv_freq(self.config.sliding).to(device), persistent=False)
        self.register_buffer("inv_freq_full", rope_inv_freq(self.config.full).to(device), persistent=False)
        # sqrt(H) rounded to the weight dtype (53.0 in bf16, as the reference does), kept on the device so that
        # no host tensor is created inside a captured step.
        dtype = self.embed_tokens.weight.dtype
        self.register_buffer("embed_scale_t", torch.tensor(self.embed_scale, dtype=dtype, device=device),
                             persistent=False)

    def set_kernel_devices(self, devices: tuple[str, ...]) -> None:
        """Device types on which attention and experts may run their fused kernels (() = eager ops only): the
        Triton MoE and q/k norm+RoPE kernels, and flash attention without a mask for decoder canvases.

        The kernels serve inference on CUDA by default; training turns them off, and tests compare both paths
        (adding "cpu" runs them under TRITON_INTERPRET=1).
        """
        for module in self.modules():
            if hasattr(module, "kernel_devices"):
                module.kernel_devices = tuple(devices)

    def prepare_inference(self) -> None:
        """What an inference engine runs once its weights are in place: `pack_projections`, and on a GPU
        `set_side_stream`."""
        self.pack_projections()
        self.set_side_stream(self.device.type == "cuda")

    def set_side_stream(self, on: bool, priority: int = 0, attention: bool = True) -> None:
        """Run every layer's dense MLP on a second CUDA stream, beside its router and experts, and (`attention`) the
        normalisation of its new keys and values into the cache beside the queries' (`dgemma.model.side_stream`;
        one stream shared by the layers, which run in turn). Off: one stream."""
        if on and self.device.type != "cuda":
            raise ValueError(f"a side stream needs a CUDA model, this one is on {self.device}")
        side = SideStream(self.device, priority) if on else None
        for layer in self.layers:
            layer.side_stream = side
            layer.self_attn.side_stream = side if attention else None

    def pack_projections(self) -> None:
        """Inference: every layer's q/k/v projections and its dense MLP's gate/up become one GEMM each, over weights
        concatenated once (the separate parameters become views: no second copy, and new Parameter objects, so an
        optimizer built before would hold the old ones). With gradients on the layers run their projections one by
        one (no gradient reaches a packed weight), and moving or casting the model ends the packing."""
        for layer in self.layers:
            layer.self_attn.pack()
            layer.mlp.pack()

    # ------------------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, T] -> [B, T, H]. The sqrt(H) scale is rounded to the weight dtype first (53.0 in bf16)."""
        return self.embed_tokens(ids) * self.embed_scale_t

    def _layer_scalar(self, i: int, encoder_tokens: int, tokens: int) -> torch.Tensor:
        """Layer i's output scale when the first `encoder_tokens` of `tokens` are the encoder's: [1] when one side
        has every token (the plain encoder or decoder), else one per token, [T, 1]."""
        encoder = self.encoder_layer_scalars[i : i + 1]  # [1]
        decoder = self.layers[i].layer_scalar  # [1]
        if encoder_tokens == tokens:
            return encoder
        if encoder_tokens == 0:
            return decoder
        return torch.cat([encoder.expand(encoder_tokens), decoder.expand(tokens - encoder_tokens)])[:, None]

    def _run_layers(self, x: torch.Tensor, batch: AttentionBatch, cache: KVCache, encoder_tokens: int,
                    keep_from: int = 0) -> torch.Tensor:
        """The layers over x [B, T, H] whose first `encoder_tokens` tokens are the encoder's (T: `encode`, 0: the
        decoder, between: `encode_and_decode_hidden`), then the final norm of tokens [keep_from, T): [B, T', H].
        The batch's bounds say what each token attends to."""
        rotations = {SLIDING: Rotation(batch.positions, self.inv_freq_sliding, x.dtype),
                     FULL: Rotation(batch.positions, self.inv_freq_full, x.dtype)}
        normed = None  # the next layer's input norm of x, where the layer before computed it
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x, normed = layer(x, rotations[layer.kind], batch, cache,
                              self._layer_scalar(i, encoder_tokens, x.shape[1]), normed, next_norm)
        return normed[:, keep_from:] if normed is not None else self.norm(x[:, keep_from:])

    def encode(self, ids: torch.Tensor, batch: AttentionBatch, cache: KVCache) -> torch.Tensor:
        """Causal encoder over ids [B, T]: writes their K/V into the cache; returns final hidden states [B, T, H]."""
        return self._run_layers(self.embed(ids), batch, cache, encoder_tokens=ids.shape[1])

    def decode(
        self,
        canvas: torch.Tensor,  # [B, C] token ids
        batch: AttentionBatch,
        cache: KVCache,
        soft: torch.Tensor | None = None,  # [B, C, H] self-conditioning input from `soft_embedding`; None = zeros
    ) -> torch.Tensor:
        """One denoising forward: returns softcapped float32 logits [B, C, V]."""
        return self.logits(self.decode_hidden(canvas, batch, cache, soft))

    def decode_hidden(
        self, canvas: torch.Tensor, batch: AttentionBatch, cache: KVCache, soft: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The decoder up to its final norm: [B, C] ids -> [B, C, H] (the fused GPU sampler applies the head)."""
        return self._run_layers(self._canvas_input(canvas, soft), batch, cache, encoder_tokens=0)

    def encode_and_decode_hidden(
        self,
        committed: torch.Tensor,  # [B, C] ids of the canvas just committed, at positions [P, P + C)
        canvas: torch.Tensor,  # [B, C] ids of the next canvas, at [P + C, P + 2C)
        batch: AttentionBatch,  # `AttentionBatch.for_encode_and_decode`
        cache: KVCache,
        soft: torch.Tensor | None = None,  # [B, C, H] as in `decode`; None = zeros
    ) -> torch.Tensor:
        """`encode(committed)` then `decode_hidden(canvas)` in one pass over the layers: returns the canvas's
        [B, C, H] and writes the committed tokens' K/V as `encode` does (and the canvas's, as the decoder does).

        The two passes share every weight but the layer scalars, and at small batches a forward costs one read of
        all the weights: one pass over 2C tokens saves the encoder's read. Per token, the arithmetic is that of the
        two separate passes (the batch's bounds keep the committed tokens causal and blind to the canvas)."""
        n = committed.shape[1]
        x = torch.cat([self.embed(committed), self._canvas_input(canvas, soft)], dim=1)  # [B, 2C, H]
        return self._run_layers(x, batch, cache, encoder_tokens=n, keep_from=n)

    def _canvas_input(self, canvas: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """The decoder's input: canvas embeddings mixed with the self-conditioning signal. [B, C] -> [B, C, H]."""
        embeds = self.embed(canvas)  # [B, C, H]
        return self.self_conditioning(embeds, torch.zeros_like(embeds) if soft is None else soft)

    def soft_embedding(self, scaled_logits: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input for the next step: softmax(z) @ E * sqrt(H). [..., C, V] -> [..., C, H].

        Computed once when the step ends and kept instead of the logits: H floats per position, not V.
        The logits are rounded to the weight dtype first, as the reference does.
        """
        probs = torch.softmax(scaled_logits.to(self.dtype), dim=-1, dtype=torch.float32).to(self.dtype)
        return (probs @ self.embed_tokens.weight) * self.embed_scale_t

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head with final softcapping: hidden [..., H] -> float32 logits [..., V]."""
        logits = linear(hidden, self.embed_tokens.weight, self.kernel_devices).float()
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

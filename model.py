"""
The GPT used at every scale of this project, written out by hand (Llama-style).

Reads: nothing by itself; train.py, finetune.py, attack.py and probe.py build it from a GPTConfig.
Writes: nothing. Test: `python -m pytest tests/test_model.py`. Benchmark: `python gpu_check.py --bench=all`.

One architecture from the 50k-parameter smoke model to the SmolLM2-1.7B shape:
token embedding tied to the output head, RMSNorm before each sub-layer, rotary position embeddings (RoPE),
causal self-attention, a SwiGLU MLP, no biases anywhere. Attention has three interchangeable backends:
  triton  the fused FlashAttention-2 kernel in safety/flash_attention.py (default on CUDA)
  sdpa    torch.nn.functional.scaled_dot_product_attention (default on CPU)
  manual  softmax(QK^T/sqrt(d)) V written out: the teaching reference the other two are tested against
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # the kernel needs triton; a CPU-only install without it still runs the sdpa and manual backends
    from safety.flash_attention import flash_attention
except ImportError as _e:  # pragma: no cover - depends on the install
    _triton_error = _e

    def flash_attention(q, k, v, sm_scale=None):
        raise RuntimeError(f"attention='triton' needs triton ({_triton_error}); use attention='sdpa'")


@dataclass
class GPTConfig:
    block_size: int = 256        # longest sequence (RoPE tables and the KV cache are sized by it)
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: int = 0          # SwiGLU hidden size; 0 = about 8/3 * n_embd rounded up to a multiple of 64
    rope_base: float = 10000.0
    attention: str = "auto"      # auto | triton | sdpa | manual (auto: triton on CUDA, sdpa on CPU)
    dropout: float = 0.0         # on the residual branches (never inside attention, so backends agree exactly)
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.attention not in ("auto", "triton", "sdpa", "manual"):
            raise ValueError(f"attention must be auto, triton, sdpa or manual, not {self.attention!r}")
        if self.mlp_hidden == 0:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)


def manual_attention(q, k, v):
    """Causal attention written out, (B, H, T, D) in and out. Softmax in fp32 (fp64 for fp64 inputs)."""
    T, S = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32)) * (1.0 / math.sqrt(q.size(-1)))
    # query i sits at absolute position S - T + i (S > T when a KV cache holds earlier keys)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return att.to(v.dtype) @ v


def rope_tables(block_size, head_dim, base, device=None):
    """The rotations e^(i * pos * base^(-2j/d)) as complex numbers, shape (block_size, head_dim/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32, device=device), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x, rot):
    """Rotate the feature pairs of each head by the angle of its position: x (..., T, heads, D) with the two
    features of a pair side by side (2j, 2j + 1), rot (T, 1, D/2) complex. One complex multiplication, no
    concatenation (on a CPU the concatenations of the rotate-half form cost more than the rotation itself)."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)


def pair_order(n_heads, head_dim):
    """Row order that puts each head's RoPE pairs side by side. The weights keep Llama's rotate-half layout (pair j
    is features j and j + D/2, as in Hugging Face's LlamaForCausalLM); q and k are computed with their rows read
    in the order (0, D/2, 1, D/2 + 1, ...), which changes no attention score, since q and k are permuted alike."""
    pair = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)
    return (torch.arange(n_heads)[:, None] * head_dim + pair).reshape(-1)


class RMSNorm(nn.Module):
    # x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean and the bias
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.is_cuda:  # a fused kernel there (and torch.compile fuses it further)
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return _RMSNormCPU.apply(x, self.weight, self.eps)


class _RMSNormCPU(torch.autograd.Function):
    """RMSNorm with its gradient written out: on a CPU F.rms_norm runs as a chain of elementwise ops, and this
    form (one norm, then x * r * w; the backward in four passes) trains the toy model ~4% faster."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.size(-1)).add_(eps).rsqrt_()
        xn = x * r
        ctx.save_for_backward(xn, weight, r)
        return xn * weight

    @staticmethod
    def backward(ctx, grad):
        xn, weight, r = ctx.saved_tensors
        gw = grad * weight
        # d/dx of x * r: r * (gw - xn * mean(gw * xn)), the mean taken over the features
        dot = torch.linalg.vecdot(gw, xn, dim=-1).unsqueeze(-1).div_(-xn.size(-1))
        return torch.addcmul(gw, xn, dot).mul_(r), (grad * xn).flatten(0, -2).sum(0), None


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj.RESIDUAL = True  # init scaled by 1/sqrt(2 n_layer), see GPT._init_weights
        self.backend = config.attention
        self.register_buffer("qk_rows", pair_order(2 * self.n_head, self.head_dim), persistent=False)

    def forward(self, x, rot, cache=None):
        B, T, C = x.size()
        H, D = self.n_head, self.head_dim
        w = self.c_attn.weight   # rows: q, k, v
        qk = apply_rope(F.linear(x, w[:2 * C][self.qk_rows]).view(B, T, 2 * H, D), rot)   # q and k in one go
        q, k = qk.view(B, T, 2, H, D).permute(2, 0, 3, 1, 4)
        v = F.linear(x, w[2 * C:]).view(B, T, H, D).transpose(1, 2)
        if cache is not None:
            # generation: append this step's keys/values and attend over everything cached so far
            k, v, mask = cache.update(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif self.backend == "triton":
            y = flash_attention(q, k, v)
        elif self.backend == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = manual_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    # SwiGLU: down(silu(gate(x)) * up(x)); gate and up are the two halves of one weight
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.c_proj.RESIDUAL = True

    def forward(self, x):
        # two matmuls on the weight's halves give contiguous gate and up (no strided halves, no concatenated grad)
        gate, up = self.c_fc.weight.chunk(2, dim=0)
        return self.c_proj(F.silu(F.linear(x, gate)) * F.linear(x, up))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rot, cache=None):
        x = x + self.drop(self.attn(self.ln_1(x), rot, cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class KVCache:
    """Keys and values of every layer for batched generation, preallocated to the longest sequence.
    Rows may be left-padded (prompts of different lengths): `valid` marks the real key positions."""

    def __init__(self, config, batch_size, max_len, valid, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.valid = valid    # (B, max_len) bool: False on the left padding
        self.pos = 0          # how many positions are filled
        self.layer = 0        # which layer calls update() next

    def select(self, rows):
        """Keep these rows (a LongTensor of row indices, repeats allowed), in this order: safe beam search reorders
        its beams this way after every step."""
        self.k = [x[rows] for x in self.k]
        self.v = [x[rows] for x in self.v]
        self.valid = self.valid[rows]

    def update(self, k, v):
        T, start, layer = k.size(2), self.pos, self.layer
        S = start + T
        self.k[layer][:, :, start:S] = k
        self.v[layer][:, :, start:S] = v
        q_pos = torch.arange(start, S, device=k.device)[:, None]
        k_pos = torch.arange(S, device=k.device)[None, :]
        # causal over real keys; a padding query sees itself only, so no row is all -inf (which would give NaN)
        mask = ((k_pos <= q_pos)[None, None] & self.valid[:, None, None, :S]) | (k_pos == q_pos)[None, None]
        self.layer = (layer + 1) % len(self.k)
        if self.layer == 0:
            self.pos = S
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S], mask


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.attention == "auto":
            config.attention = "triton" if torch.cuda.is_available() else "sdpa"
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads tokens in and writes them out
        rot = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("rope", rot, persistent=False)  # derived from the config, not saved
        self.apply(self._init_weights)

    @classmethod
    def from_args(cls, model_args):
        """A model of a checkpoint's model_args (GPTConfig's fields): how safety.common.load_run builds one."""
        return cls(GPTConfig(**model_args))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if getattr(module, "RESIDUAL", False):
                # each block adds two residual branches: keep the residual stream's variance from growing with depth
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied matrix counts once

    def new_cache(self, lens, T, max_new_tokens):
        """An empty KV cache for generating after left-padded prompts (lens (B,): each prompt's length, T: their
        padded width); the padding is masked out of every key. -> (cache, positions (B, T) of the prompts' tokens,
        0 at a row's first real token)."""
        pad = T - lens                                                   # left padding of each row
        valid = torch.arange(T + max_new_tokens, device=lens.device)[None, :] >= pad[:, None]
        positions = (torch.arange(T, device=lens.device)[None, :] - pad[:, None]).clamp(min=0)
        cache = KVCache(self.config, len(lens), T + max_new_tokens, valid, valid.device, self.wte.weight.dtype)
        return cache, positions

    def set_attention(self, backend):
        for block in self.h:
            block.attn.backend = backend
        self.config.attention = backend

    def forward(self, idx, targets=None, return_hidden=False, positions=None, cache=None, embeds=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None[, hidden]).
        targets: (B, T) next-token ids, -1 where the loss is masked (e.g. prompts in finetuning).
        return_hidden: also return the residual stream, a list of n_layer + 1 tensors (B, T, n_embd):
            [0] the token embeddings, [i] the stream after block i (what probe.py reads).
        positions: (B, T) absolute positions for RoPE (generation with left padding); default 0..T-1.
        embeds: (B, T, n_embd) input embeddings used instead of wte(idx) (idx may be None): attack.py's GCG takes
            the gradient of a loss w.r.t. one-hot suffix tokens through them."""
        B, T = idx.size() if embeds is None else embeds.shape[:2]
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
            rot = self.rope[:T, None]                 # (T, 1, D/2): the same for every row and head
        else:
            rot = self.rope[positions][:, :, None]    # (B, T, 1, D/2)
        x = self.drop(self.wte(idx) if embeds is None else embeds)
        hidden = [x] if return_hidden else None
        for block in self.h:
            x = block(x, rot, cache)
            if return_hidden:
                hidden.append(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, logits_processors=(),
                 prompt_lens=None, stop_token=None, generator=None):
        """Batched sampling with a KV cache.
        idx: (B, T) prompts, left-padded when prompt_lens (B,) gives their real lengths.
        temperature: 0 means greedy. top_k: keep the k most likely tokens before sampling.
        logits_processors: callables f(tokens (B, t), logits (B, vocab)) -> logits, applied in order before
            temperature/top-k (attack.py bans reflection tokens this way; safe decoders penalise tokens).
        stop_token: a row that emits it is finished; it is padded with stop_token from then on.
        Returns (B, T + n) with n <= max_new_tokens (fewer when every row stopped)."""
        B, T = idx.size()
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                             f"{self.config.block_size}")
        device = idx.device
        if prompt_lens is None:
            lens = torch.full((B,), T, device=device)
        else:
            lens = torch.as_tensor(prompt_lens, device=device)
        cache, positions = self.new_cache(lens, T, max_new_tokens)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, step_input = idx, idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_input, positions=positions, cache=cache)
            logits = logits[:, -1, :].float()
            for process in logits_processors:
                logits = process(tokens, logits)
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            if stop_token is not None:
                next_token = next_token.masked_fill(done[:, None], stop_token)
                done |= next_token[:, 0] == stop_token
            tokens = torch.cat([tokens, next_token], dim=1)
            step_input, positions = next_token, positions[:, -1:] + 1
            if stop_token is not None and bool(done.all()):
                break
        return tokens

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        # weight decay on matrices (embeddings, linears) only; norms' gains are not decayed
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda"  # one kernel for the whole update on GPU
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, T=None):
        """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12 * L * d * T
        (the PaLM appendix B count, which nanoGPT uses too)."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_sec, device=None):
        """Model FLOPs utilisation: achieved FLOP/s over the device's bf16 peak; None where the peak is unknown."""
        peak = peak_flops(device)
        return None if peak is None else self.flops_per_token() * tokens_per_sec / peak


# dense bf16 peak FLOP/s per device (no sparsity), matched against torch.cuda.get_device_name()
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device=None):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type != "cuda":
        return None  # CPUs vary too much for a table: MFU is reported as unknown
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)

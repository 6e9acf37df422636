"""model.py against references: backends against each other, cached generation against plain forwards."""
import math
import os

import pytest
import torch

import model as M
from safety.configurator import ConfigError, configure
from model import GPT, GPTConfig


def tiny(**kw):
    cfg = dict(vocab_size=61, block_size=48, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def test_the_three_attention_backends_give_the_same_loss_and_gradients():
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    m = tiny(n_embd=64)  # head dim 32
    idx = torch.randint(0, 61, (2, 37))  # 37: not a multiple of the kernel's block
    results = {}
    for backend in ("manual", "sdpa", "triton"):
        m.set_attention(backend)
        m.zero_grad()
        _, loss = m(idx, idx.roll(-1, 1))
        loss.backward()
        results[backend] = (loss.item(), [p.grad.clone() for p in m.parameters()])
    ref_loss, ref_grads = results["manual"]
    for backend in ("sdpa", "triton"):
        loss, grads = results[backend]
        assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss), (backend, loss, ref_loss, seed)
        for g, r in zip(grads, ref_grads):
            assert (g - r).norm() <= 1e-4 * r.norm() + 1e-8, (backend, (g - r).norm().item(), r.norm().item(), seed)


def test_manual_attention_matches_a_float64_reference_and_is_causal():
    q, k, v = (torch.randn(2, 3, 9, 16, dtype=torch.float64) for _ in range(3))
    att = (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(9, 9).triu(1).bool(), float("-inf"))
    assert torch.allclose(M.manual_attention(q, k, v), att.softmax(-1) @ v)
    k2 = k.clone()
    k2[:, :, 5:] += 1.0
    assert torch.equal(M.manual_attention(q, k, v)[:, :, :5], M.manual_attention(q, k2, v)[:, :, :5])


def test_generate_with_kv_cache_equals_step_by_step_forward():
    torch.manual_seed(0)
    m = tiny().eval()
    idx = torch.randint(0, 61, (3, 7))
    out = m.generate(idx, 10, temperature=0)
    ref = idx
    for _ in range(10):  # no cache: the whole sequence again at every step
        logits, _ = m(ref)
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_left_padded_prompts_generate_as_if_alone():
    torch.manual_seed(1)
    m = tiny().eval()
    a, b = torch.randint(1, 61, (1, 4)), torch.randint(1, 61, (1, 8))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    out = m.generate(batch, 6, temperature=0, prompt_lens=[4, 8])
    assert torch.equal(out[0, 4:], m.generate(a, 6, temperature=0)[0])
    assert torch.equal(out[1], m.generate(b, 6, temperature=0)[0])


def test_sampling_respects_top_k_processors_and_stop_token():
    torch.manual_seed(2)
    m = tiny().eval()
    idx = torch.randint(0, 61, (4, 3))
    logits, _ = m(idx)
    allowed = logits[:, -1].topk(3).indices
    first = m.generate(idx, 1, temperature=1.0, top_k=3)[:, -1]
    assert all(first[i] in allowed[i] for i in range(4))

    def ban(tokens, logits):  # what attack.py does to reflection tokens
        logits[:, 5] = float("-inf")
        return logits
    greedy_token = int(m(idx)[0][0, -1].argmax())
    out = m.generate(idx, 20, temperature=1.0, logits_processors=[lambda t, l: ban(t, l)])
    assert not (out[:, 3:] == 5).any()
    # a stop token ends a row; finished rows are padded with it
    out = m.generate(idx, 5, temperature=0, stop_token=greedy_token)
    assert out[0, 3] == greedy_token and (out[0, 3:] == greedy_token).all()


def test_hidden_states_are_the_residual_stream_after_every_layer():
    torch.manual_seed(3)
    m = tiny().eval()
    idx = torch.randint(0, 61, (2, 11))
    logits, _, hidden = m(idx, return_hidden=True)
    assert len(hidden) == m.config.n_layer + 1
    assert torch.equal(hidden[0], m.wte(idx))
    assert torch.allclose(logits, m.lm_head(m.ln_f(hidden[-1])))
    assert torch.allclose(hidden[1], m.h[0](hidden[0], m.rope[:11, None]))


def test_architecture_tied_embeddings_no_biases_and_scaled_residual_init():
    torch.manual_seed(4)
    m = tiny(n_layer=8, n_embd=256, n_head=4, vocab_size=500)
    assert m.lm_head.weight is m.wte.weight
    assert not any(name.endswith("bias") for name, _ in m.named_parameters())
    for block in m.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert abs(proj.weight.std().item() - 0.02 / math.sqrt(16)) < 1e-3
        assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 1e-3
    assert m.config.mlp_hidden == 704  # 8/3 * 256 rounded up to a multiple of 64


def test_rope_rotates_relative_positions_only():
    # <rope(q, i), rope(k, j)> depends on i - j only: shifting both positions leaves the score unchanged
    rot = M.rope_tables(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    def score(i, j):
        return (M.apply_rope(q[None], rot[i]) * M.apply_rope(k[None], rot[j])).sum()
    assert torch.allclose(score(3, 1), score(13, 11), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_mfu_uses_a_device_table_and_is_unknown_on_cpu(monkeypatch):
    m = tiny()
    assert m.estimate_mfu(1e6, "cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert M.peak_flops("cuda") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    assert M.peak_flops("cuda") == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert M.peak_flops("cuda") is None
    assert m.flops_per_token(48) == 6 * m.num_params() + 12 * 2 * 32 * 48


def test_bad_model_config_raises_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="attention must be"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="longer than block_size"):
        tiny()(torch.zeros(1, 49, dtype=torch.long))


def test_configurator_checks_keys_and_types(tmp_path):
    defaults = {"learning_rate": 0.1, "max_iters": 10, "out_dir": "out", "compile": None, "flag": False}
    c = configure(defaults, ["--learning_rate=1", "--out_dir=out/x", "--compile=True", "--flag=true"])
    assert c == {"learning_rate": 1.0, "max_iters": 10, "out_dir": "out/x", "compile": True, "flag": True}
    with pytest.raises(ConfigError, match="closest valid keys: learning_rate"):
        configure(defaults, ["--learnig_rate=1"])
    with pytest.raises(ConfigError, match="expects int"):
        configure(defaults, ["--max_iters=1.5"])
    with pytest.raises(ConfigError, match="expects bool"):
        configure(defaults, ["--flag=3"])
    profile = tmp_path / "p.py"
    profile.write_text("max_iters = 5\nmax_iter = 6\n")
    with pytest.raises(ConfigError, match="unknown key 'max_iter'"):
        configure(defaults, [str(profile)])


def reference_forward(m, idx):
    """The model as it was written before the CPU speed-up (2026-11-30): rotate-half RoPE with concatenations, one
    c_fc matmul chunked into gate and up, F.rms_norm; the same weights. model.py must give the same numbers."""
    import torch.nn.functional as F
    cfg = m.config
    D = cfg.n_embd // cfg.n_head
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.outer(torch.arange(idx.size(1), dtype=torch.float32), inv)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def norm(x, ln):
        return F.rms_norm(x, (x.size(-1),), ln.weight, ln.eps)
    B, T = idx.shape
    x = m.wte(idx)
    for blk in m.h:
        q, k, v = blk.attn.c_attn(norm(x, blk.ln_1)).view(B, T, 3, cfg.n_head, D).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + blk.attn.c_proj(y.transpose(1, 2).reshape(B, T, cfg.n_embd))
        gate, up = blk.mlp.c_fc(norm(x, blk.ln_2)).chunk(2, dim=-1)
        x = x + blk.mlp.c_proj(F.silu(gate) * up)
    return m.lm_head(norm(x, m.ln_f))


@pytest.mark.parametrize("shape", [dict(n_layer=2, n_head=2, n_embd=32), dict(n_layer=3, n_head=4, n_embd=128)])
def test_model_equals_the_previous_implementation_in_logits_and_gradients(shape):
    # the speed-up (RoPE on complex pairs with q/k rows read in pair order, gate and up as two matmuls, RMSNorm's
    # gradient written out) must change nothing but fp32 rounding: relative error <= 1e-5 in logits and gradients
    torch.manual_seed(5)
    m = tiny(**shape)
    with torch.no_grad():   # sharper attention than at init, so that a wrong rotation shows in the logits
        for blk in m.h:
            blk.attn.c_attn.weight.mul_(8)
    idx = torch.randint(0, 61, (3, 29))
    logits, loss = m(idx, idx.roll(-1, 1))
    ref = reference_forward(m, idx)
    assert (logits - ref).norm() <= 1e-5 * ref.norm()
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref_loss = torch.nn.functional.cross_entropy(ref.view(-1, ref.size(-1)), idx.roll(-1, 1).reshape(-1))
    ref_grads = torch.autograd.grad(ref_loss, list(m.parameters()))
    for (name, _), g, r in zip(m.named_parameters(), grads, ref_grads):
        assert (g - r).norm() <= 1e-5 * r.norm() + 1e-12, name
    # and a change the test must catch: an unpermuted q/k row order is a different model
    m.h[0].attn.qk_rows.copy_(torch.arange(m.h[0].attn.qk_rows.numel()))
    assert (m(idx)[0] - ref).norm() > 1e-3 * ref.norm()

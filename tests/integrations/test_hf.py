"""fastalign.hf against the materialising path through ``model(...).logits``.

Tiny random-weight models built from configs (nothing is downloaded): Llama (also with a head
bias), Qwen2, Mistral, Gemma 2 (final-logit softcap that matters), GPT-2 (tied embeddings),
Cohere (× logit_scale) and Granite (÷ logits_scaling).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from fastalign import hf

V, H, B, T = 97, 32, 3, 9
SMALL = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64)


def _config(name: str):
    if name in ("llama", "llama_bias"):
        return transformers.LlamaConfig(**SMALL)
    if name == "qwen2":
        return transformers.Qwen2Config(**SMALL)
    if name == "mistral":
        return transformers.MistralConfig(**SMALL, head_dim=8)
    if name == "gemma2":
        return transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=30.0)
    if name == "gpt2":
        return transformers.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=32,
                                       bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0)  # train mode is exact
    if name == "cohere":
        return transformers.CohereConfig(**SMALL, logit_scale=0.25, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=2)
    if name == "granite":
        return transformers.GraniteConfig(**SMALL, logits_scaling=0.25)
    raise KeyError(name)


# Head weights are scaled so that the logits span tens of units: with Gemma 2's softcap of 30
# the tanh is far from linear, and every scale or temperature mistake shows.
HEAD_SCALE = {"gemma2": 80.0, "cohere": 40.0, "gpt2": 5.0}
MODELS = ("llama", "llama_bias", "qwen2", "mistral", "gemma2", "gpt2", "cohere", "granite")


def make_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(name),
                                                          attn_implementation="eager")
    with torch.no_grad():
        if name == "llama_bias":
            model.lm_head = nn.Linear(H, V, bias=True)
            model.lm_head.bias.normal_(0, 1.0)
        head = model.get_output_embeddings()
        head.weight.mul_(HEAD_SCALE.get(name, 20.0))
    return model.eval()


def make_batch(padding: str = "right", seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=gen)
    lengths = torch.tensor([T, 6, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    if padding == "left":
        mask = mask.flip(-1)
    input_ids = torch.where(mask.bool(), input_ids, 0)
    return input_ids, mask


def params_grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())  # a tied weight appears once
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {name: g for name, g in zip(params, grads)}


def assert_grads_close(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Every parameter's gradient, to float32 accuracy relative to that gradient's size: the two
    paths sum the same terms in different orders, and these gradients reach the hundreds."""
    assert got.keys() == want.keys()
    for name in want:
        assert want[name] is not None and got[name] is not None, name
        atol = rel * float(want[name].abs().max()) + 1e-7
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=10 * rel,
                                   msg=lambda m, n=name: f"{n}: {m}")


def materialised_kl(model, ref_model, input_ids, mask, temperature=1.0, reverse=False):
    logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float()
                             / temperature, -1)[:, :-1]
    with torch.no_grad():
        logq = torch.log_softmax(ref_model(input_ids=input_ids, attention_mask=mask).logits
                                 .float() / temperature, -1)[:, :-1]
    if reverse:
        logp, logq = logq, logp
    kl = (logp.exp() * (logp - logq)).sum(-1)
    scored = mask[:, 1:].bool() & mask[:, :-1].bool()
    return torch.where(scored, kl, torch.zeros_like(kl))


# ----------------------------------------------------------------------------------------------
# Head description
# ----------------------------------------------------------------------------------------------


def test_lm_head_reads_config():
    gpt2 = make_model("gpt2")
    head = hf.lm_head(gpt2)
    assert head.weight is gpt2.transformer.wte.weight  # tied: the same Parameter
    assert (head.softcap, head.logit_scale) == (None, 1.0)
    assert hf.lm_head(make_model("gemma2")).softcap == 30.0
    cohere, granite = hf.lm_head(make_model("cohere")), hf.lm_head(make_model("granite"))
    assert cohere.logit_scale == 0.25 and granite.logit_scale == 4.0  # × 0.25, ÷ 0.25
    assert cohere.options(0.5) == {"temperature": 2.0, "softcap": None}
    assert hf.lm_head(make_model("llama_bias")).bias is not None
    assert isinstance(hf.backbone(gpt2), transformers.GPT2Model)
    with pytest.raises(NotImplementedError, match="softcap"):
        hf.LMHead(head.weight, None, softcap=30.0, logit_scale=2.0).options()


# ----------------------------------------------------------------------------------------------
# Values and gradients against model(...).logits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", MODELS)
def test_logprobs_entropy_and_grads_match_eager(name, padding):
    model = make_model(name)
    input_ids, mask = make_batch(padding)
    logps, entropy = hf.token_logprobs(model, input_ids, attention_mask=mask, temperature=0.7,
                                       return_entropy=True)
    want_logps, want_entropy = hf.eager_token_logprobs(model, input_ids, attention_mask=mask,
                                                       temperature=0.7, return_entropy=True)
    assert logps.shape == (B, T - 1) and logps.dtype == torch.float32
    torch.testing.assert_close(logps, want_logps, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=2e-5, rtol=1e-5)
    scored = mask[:, 1:].bool() & mask[:, :-1].bool()
    assert bool((logps[~scored] == 0).all()) and bool((entropy[~scored] == 0).all())
    assert float(want_logps.detach()[scored].min()) < -5  # the distributions are far from uniform

    w_logp, w_ent = torch.randn(B, T - 1), torch.randn(B, T - 1)
    got = params_grads(model, (w_logp * logps).sum() + (w_ent * entropy).sum())
    want = params_grads(model, (w_logp * want_logps).sum() + (w_ent * want_entropy).sum())
    assert_grads_close(got, want)


def test_left_and_right_padding_agree_given_positions_from_the_mask():
    # GPT-2 with position_ids from the mask: left and right padding score the same tokens alike.
    model = make_model("gpt2")
    ids_r, mask_r = make_batch("right")
    ids_l, mask_l = make_batch("left")
    shift = (1 - mask_l).sum(-1)
    ids_l = torch.stack([row.roll(int(s)) for row, s in zip(ids_r, shift)])
    pos = lambda m: (m.cumsum(-1) - 1).clamp(min=0)  # noqa: E731
    right = hf.token_logprobs(model, ids_r, attention_mask=mask_r, position_ids=pos(mask_r))
    left = hf.token_logprobs(model, ids_l, attention_mask=mask_l, position_ids=pos(mask_l))
    for row in range(B):
        n = int(mask_r[row].sum()) - 1
        torch.testing.assert_close(left[row, T - 1 - n:], right[row, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2", "cohere", "granite"])
@pytest.mark.parametrize("reverse", [False, True])
def test_token_kl_matches_materialised(name, reverse):
    model, ref_model = make_model(name, seed=0), make_model(name, seed=1)
    input_ids, mask = make_batch("left")
    kl = hf.token_kl(model, ref_model, input_ids, attention_mask=mask, temperature=1.3,
                     reverse=reverse)
    want = materialised_kl(model, ref_model, input_ids, mask, temperature=1.3, reverse=reverse)
    assert kl.shape == (B, T - 1) and kl.dtype == torch.float32
    torch.testing.assert_close(kl, want, atol=2e-5, rtol=1e-4)
    assert float(want.detach().max()) > 0.5
    weights = torch.randn(B, T - 1)
    got = params_grads(model, (weights * kl).sum())
    assert_grads_close(got, params_grads(model, (weights * want).sum()))
    assert all(p.grad is None for p in ref_model.parameters())


def test_token_kl_folds_different_logit_scales():
    model, ref_model = make_model("cohere", seed=0), make_model("cohere", seed=1)
    ref_model.config.logit_scale = ref_model.logit_scale = 0.5
    input_ids, mask = make_batch("right")
    kl = hf.token_kl(model, ref_model, input_ids, attention_mask=mask)
    torch.testing.assert_close(kl, materialised_kl(model, ref_model, input_ids, mask),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2"])
def test_sequence_logprobs_match_eager_sums(name):
    model = make_model(name)
    input_ids, mask = make_batch("right")
    labels = torch.where(mask.bool(), input_ids, -100)
    labels[:, :3] = -100  # the prompt
    result = hf.sequence_logprobs(model, input_ids, labels=labels, attention_mask=mask,
                                  temperature=0.9, return_entropy=True)
    eager = hf.eager_token_logprobs(model, input_ids, attention_mask=mask, temperature=0.9)
    want = torch.where(labels[:, 1:] != -100, eager, torch.zeros_like(eager))
    torch.testing.assert_close(result.token_logps, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(result.sum_logps, want.sum(-1), atol=1e-4, rtol=1e-5)
    assert result.lengths.tolist() == (labels[:, 1:] != -100).sum(-1).tolist()
    assert result.token_entropy is not None
    got = params_grads(model, result.sum_logps.sum())
    assert_grads_close(got, params_grads(model, want.sum()))


def test_lm_head_is_never_run_on_the_sequence():
    model, ref_model = make_model("gpt2"), make_model("gpt2", seed=1)

    def refuse(module, args, output):
        raise AssertionError("the LM head ran on the whole sequence")

    for m in (model, ref_model):
        m.get_output_embeddings().register_forward_hook(refuse)
    input_ids, mask = make_batch("right")
    labels = torch.where(mask.bool(), input_ids, -100)
    logps, _ = hf.token_logprobs(model, input_ids, attention_mask=mask, return_entropy=True)
    logps.sum().backward()
    hf.token_kl(model, ref_model, input_ids, attention_mask=mask)
    hf.sequence_logprobs(model, input_ids, labels=labels, attention_mask=mask)
    with pytest.raises(AssertionError, match="LM head ran"):
        hf.eager_token_logprobs(model, input_ids, attention_mask=mask)


def _enable_checkpointing(model: nn.Module) -> list[int]:
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is None:
        enable = model.gradient_checkpointing_enable
    enable()
    calls = [0]
    for module in model.modules():  # count the checkpointed calls: proof that it is in effect
        func = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and func is not None:
            def counted(*args, _func=func, **kwargs):
                calls[0] += 1
                return _func(*args, **kwargs)
            module._gradient_checkpointing_func = counted
    return calls


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = make_model(name)
    input_ids, mask = make_batch("left")
    weights = torch.randn(B, T - 1)
    eager = hf.eager_token_logprobs(model, input_ids, attention_mask=mask)
    want = params_grads(model, (weights * eager).sum())
    calls = _enable_checkpointing(model)
    model.train()
    fused = hf.token_logprobs(model, input_ids, attention_mask=mask)
    got = params_grads(model, (weights * fused).sum())
    assert calls[0] > 0
    assert_grads_close(got, want)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_bf16_autocast_close_to_eager_autocast(name):
    model = make_model(name)
    input_ids, mask = make_batch("right")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, entropy = hf.token_logprobs(model, input_ids, attention_mask=mask,
                                           return_entropy=True)
        want, want_entropy = hf.eager_token_logprobs(model, input_ids, attention_mask=mask,
                                                     return_entropy=True)
        kl = hf.token_kl(model, make_model(name, seed=1), input_ids, attention_mask=mask)
    assert logps.dtype == torch.float32 and kl.dtype == torch.float32
    scale = want.abs().max().item()
    torch.testing.assert_close(logps, want, atol=0.01 * scale, rtol=0.01)  # bf16: 2^-8 relative
    torch.testing.assert_close(entropy, want_entropy, atol=0.05, rtol=0.05)
    assert torch.isfinite(kl).all()
    logps.sum().backward()
    head = hf.lm_head(model)
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32


def test_head_inputs_follow_autocast():
    model = make_model("llama_bias")
    head = hf.lm_head(model)
    input_ids, mask = make_batch()
    hidden = hf.final_hidden_states(model, input_ids, attention_mask=mask)
    assert hidden.shape == (B, T, H)
    assert {t.dtype for t in hf.head_inputs(hidden.bfloat16(), head)} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = hf.head_inputs(hidden, head)
    assert {t.dtype for t in cast} == {torch.bfloat16}
    sum(t.float().sum() for t in cast).backward()  # .to keeps the fp32 Parameters in the graph
    assert head.weight.grad.dtype == torch.float32 and head.bias.grad is not None


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_arguments_after_input_ids_are_keyword_only():
    """A mask passed where labels were expected (or the reverse) would silently score the mask's
    0/1 values as token ids: every argument after input_ids must be named."""
    model = make_model("llama")
    input_ids, mask = make_batch()
    labels = torch.where(mask.bool(), input_ids, -100)
    calls = {
        "final_hidden_states": lambda: hf.final_hidden_states(model, input_ids, mask),
        "token_logprobs": lambda: hf.token_logprobs(model, input_ids, mask),
        "eager_token_logprobs": lambda: hf.eager_token_logprobs(model, input_ids, mask),
        "token_kl": lambda: hf.token_kl(model, None, input_ids, mask),
        "sequence_logprobs": lambda: hf.sequence_logprobs(model, input_ids, labels, mask),
        "sequence_logprobs labels": lambda: hf.sequence_logprobs(model, input_ids, labels),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="positional argument"):
            call()
            pytest.fail(f"{name} took a positional argument after input_ids")


def test_errors():
    model = make_model("llama")
    input_ids, mask = make_batch()
    with pytest.raises(TypeError, match="integer"):
        hf.token_logprobs(model, input_ids.float(), attention_mask=mask)
    with pytest.raises(ValueError, match="2-D"):
        hf.token_logprobs(model, input_ids[0], attention_mask=mask[0])
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        hf.token_logprobs(model, input_ids + V, attention_mask=mask)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        hf.eager_token_logprobs(model, input_ids - V, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        hf.token_logprobs(model, input_ids, attention_mask=mask[:, :-1])
    with pytest.raises(TypeError, match="attention_mask"):
        hf.token_logprobs(model, input_ids, attention_mask=mask.float())
    with pytest.raises(ValueError, match="labels"):
        hf.sequence_logprobs(model, input_ids, labels=input_ids[:, 1:],
                             attention_mask=mask)
    with pytest.raises(ValueError, match="temperature"):
        hf.token_logprobs(model, input_ids, attention_mask=mask, temperature=0.0)
    other = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**{**SMALL, "vocab_size": V + 1}), attn_implementation="eager")
    with pytest.raises(ValueError, match="vocabulary"):
        hf.token_kl(model, other, input_ids, attention_mask=mask)
    with pytest.raises(ValueError, match="not a PEFT model"):
        with hf.adapters_disabled(model):
            pass
    assert not hf.is_peft_model(model)
    model.lm_head = nn.Sequential(nn.Linear(H, V))
    with pytest.raises(TypeError, match="nn.Linear"):
        hf.lm_head(model)


# ----------------------------------------------------------------------------------------------
# PEFT
# ----------------------------------------------------------------------------------------------


PEFT_WARNINGS = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")


@PEFT_WARNINGS
def test_peft_lora_adapters_and_disabling():
    peft = pytest.importorskip("peft")
    input_ids, mask = make_batch("right")
    base_logps = hf.token_logprobs(make_model("llama"), input_ids, attention_mask=mask)
    model = peft.get_peft_model(make_model("llama"),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert hf.is_peft_model(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # LoRA starts as the identity: make it change something
    input_ids, mask = make_batch("right")
    logps = hf.token_logprobs(model, input_ids, attention_mask=mask)
    torch.testing.assert_close(
        logps, hf.eager_token_logprobs(model, input_ids, attention_mask=mask), atol=2e-5, rtol=1e-5)
    assert (logps - base_logps).abs().max() > 1e-2
    with hf.adapters_disabled(model) as same:
        assert same is model
        torch.testing.assert_close(hf.token_logprobs(model, input_ids, attention_mask=mask),
                                   base_logps)
    # the reference: the adapters disabled
    kl = hf.token_kl(model, None, input_ids, attention_mask=mask)
    assert float(kl.detach().max()) > 0
    kl.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)


@PEFT_WARNINGS
def test_peft_lora_on_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama"),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(TypeError, match="LoRA"):
        input_ids, mask = make_batch("right")
        hf.token_logprobs(model, input_ids, attention_mask=mask)

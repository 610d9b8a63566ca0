"""``fastalign.patch_model``: a transformers model's ``labels=`` loss through the fused op.

Against the same model unpatched (its own logits and ``ForCausalLMLoss``): the loss and every
parameter's gradient, on tiny random models of each supported family (nothing is downloaded),
with padding, ``num_items_in_batch`` and ``shift_labels``; under ``transformers.Trainer`` with
gradient accumulation; with PEFT; and the peak memory of a step at a 128k-token head.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import impl_is_available
from torch import nn

import fastalign
from fastalign.bench.memory import cpu_peak_supported, measure_peak_memory
from fastalign.integrations import is_patched, patch_model, unpatch_model

V, H, B, T = 97, 32, 3, 10
SMALL = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, head_dim=8)


def _config(name: str, vocab: int = V):
    small = SMALL | {"vocab_size": vocab}
    if name == "llama":
        return transformers.LlamaConfig(**small)
    if name == "qwen2":
        return transformers.Qwen2Config(**small)
    if name == "qwen3":
        return transformers.Qwen3Config(**small)
    if name == "mistral":
        return transformers.MistralConfig(**small)
    if name == "gemma2":
        return transformers.Gemma2Config(**small, final_logit_softcapping=30.0)
    if name == "gemma3":
        return transformers.Gemma3TextConfig(**small, final_logit_softcapping=30.0)
    if name == "phi3":
        return transformers.Phi3Config(**{k: v for k, v in small.items() if k != "head_dim"},
                                       pad_token_id=0)
    if name == "gpt2":  # tied head; dropout off so that train mode is deterministic
        return transformers.GPT2Config(vocab_size=vocab, n_embd=H, n_layer=2, n_head=4,
                                       n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0)
    raise KeyError(name)


MODELS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2")


def make_model(name: str, seed: int = 0, vocab: int = V) -> nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(name, vocab),
                                                          attn_implementation="eager")
    with torch.no_grad():  # logits of tens of units: the softcap's tanh is far from linear
        model.get_output_embeddings().weight.mul_(60.0 if name.startswith("gemma") else 10.0)
    return model.train()


def make_batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.arange(T)[None, :] < torch.tensor([T, 7, 4])[:, None]).long()
    labels = torch.where(mask.bool(), input_ids, -100)
    labels[:, :3] = -100  # a prompt that is not scored
    return input_ids, mask, labels


def loss_and_grads(model, *args, **call):
    model.zero_grad()
    out = model(*args, **call)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same(got, want, rel=2e-5):
    (out, grads), (ref_out, ref_grads) = got, want
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=rel, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        scale = grad.abs().max().item() + 1e-12
        assert (grads[name] - grad).abs().max().item() <= 10 * rel * scale, name


@pytest.mark.parametrize("name", MODELS)
def test_loss_and_every_gradient_equal_the_unpatched_model(name):
    model = make_model(name)
    input_ids, mask, labels = make_batch()
    call = dict(input_ids=input_ids, attention_mask=mask, labels=labels)
    want = loss_and_grads(model, **call)
    assert want[0].logits is not None

    assert patch_model(model) is model and is_patched(model)
    got = loss_and_grads(model, **call)
    assert got[0].logits is None  # never formed
    assert_same(got, want)

    # num_items_in_batch (transformers.Trainer under gradient accumulation): sum / count
    unpatch_model(model)
    want = loss_and_grads(model, **call, num_items_in_batch=torch.tensor(37))
    patch_model(model)
    assert_same(loss_and_grads(model, **call, num_items_in_batch=torch.tensor(37)), want)


def test_the_loss_forms_its_gradients_in_forward(monkeypatch):
    """The labels= loss goes through linear_nll: backward scales the gradients formed in forward
    and never recomputes the head's logits (linear_logprobs' backward)."""
    from fastalign.ops.linear_logprobs import LinearLogprobsFunction

    def recompute(*args):
        raise AssertionError("the head's logits were recomputed in backward")

    monkeypatch.setattr(LinearLogprobsFunction, "backward", staticmethod(recompute))
    model = patch_model(make_model("qwen2"))
    input_ids, mask, labels = make_batch()
    out, grads = loss_and_grads(model, input_ids=input_ids, attention_mask=mask, labels=labels)
    assert out.logits is None and all(grad.isfinite().all() for grad in grads.values())


def test_positional_ids_shift_labels_and_an_unchanged_forward_without_labels():
    model = make_model("gpt2")  # GPT-2's second positional parameter is past_key_values
    input_ids, mask, labels = make_batch()
    want = loss_and_grads(model, input_ids=input_ids, labels=labels)
    # shift_labels (sequence parallelism: labels shifted before the sequence is split) wins
    # over labels, as in transformers' ForCausalLMLoss
    shifted = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].flip(0)
    want_shifted = loss_and_grads(model, input_ids=input_ids, labels=labels,
                                  shift_labels=shifted)
    logits = model(input_ids, attention_mask=mask).logits
    patch_model(model)
    assert_same(loss_and_grads(model, input_ids, labels=labels), want)  # ids positionally
    assert_same(loss_and_grads(model, input_ids=input_ids, labels=labels, shift_labels=shifted),
                want_shifted)
    torch.testing.assert_close(model(input_ids, attention_mask=mask).logits, logits)
    model.eval()  # evaluation keeps the model's own path (its logits feed eval metrics)
    assert model(input_ids=input_ids, labels=labels).logits is not None
    unpatch_model(model)
    assert not is_patched(model) and "forward" not in vars(model)


def test_patching_twice_is_a_no_op_and_an_unsupported_head_is_refused_at_once():
    model = make_model("llama")
    patch_model(model)
    patch_model(model)
    unpatch_model(model)
    assert "forward" not in vars(model)
    model.lm_head = nn.Sequential(nn.Linear(H, V))
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        patch_model(model)
    with pytest.raises(ValueError, match="impl must be one of"):
        patch_model(make_model("llama"), impl="cuda")


def test_under_transformers_trainer_with_gradient_accumulation(tmp_path):
    """Two optimizer steps of 2 micro-batches each: the patched model's weights and logged
    losses equal the unpatched model's (the Trainer passes num_items_in_batch to both)."""
    rows = []
    for seed in range(8):
        input_ids, mask, labels = make_batch(seed)
        rows += [{"input_ids": i, "attention_mask": m, "labels": lab}
                 for i, m, lab in zip(input_ids, mask, labels)]

    def train(patched: bool):
        model = make_model("qwen2")
        if patched:
            patch_model(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=3,
            gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, logging_steps=1,
            report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
            dataloader_drop_last=True, optim="sgd")  # Adam would blow float noise up to lr-sized
            # steps in k_proj.bias, whose exact gradient is 0 (softmax ignores a shift of all keys)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        return model, losses

    unpatched, want = train(False)
    patched, got = train(True)
    assert len(got) == 2 and got == pytest.approx(want, rel=1e-4)
    for (name, p), q in zip(unpatched.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_with_peft_lora():
    peft = pytest.importorskip("peft")
    input_ids, mask, labels = make_batch()

    def lora():
        config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)
        return peft.get_peft_model(make_model("llama"), config)

    model = lora()
    want = loss_and_grads(model, input_ids=input_ids, attention_mask=mask, labels=labels)
    patch_model(model)
    got = loss_and_grads(model, input_ids=input_ids, attention_mask=mask, labels=labels)
    assert got[0].logits is None
    assert got[1] and all("lora_" in name for name in got[1])  # only the adapters train
    assert_same(got, want)


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
def test_a_step_at_a_128k_head_holds_no_logits():
    """A Llama with a 128,256-token head, 2 x 1024 tokens: the unpatched step holds fp32 logits
    (1 GiB) and their gradient; the patched one must stay far below one copy of them."""
    vocab, rows, length = 128256, 2, 1024
    model = make_model("llama", vocab=vocab)
    input_ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    logits_bytes = rows * length * vocab * 4

    def step():
        model.zero_grad(set_to_none=False)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach()

    model.zero_grad(set_to_none=False)
    model(input_ids=input_ids[:, :8], labels=input_ids[:, :8]).loss.backward()  # grads exist
    eager_loss, eager_peak = measure_peak_memory(step, "cpu")
    patch_model(model)
    fused_loss, fused_peak = measure_peak_memory(step, "cpu")
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-4, atol=1e-4)
    assert eager_peak > logits_bytes, f"eager peak {eager_peak / 2**20:.0f} MiB"
    assert fused_peak < logits_bytes / 4, (
        f"patched peak {fused_peak / 2**20:.0f} MiB, unpatched {eager_peak / 2**20:.0f} MiB, "
        f"fp32 logits {logits_bytes / 2**20:.0f} MiB")


def test_patch_model_is_exported_at_the_top():
    assert fastalign.patch_model is patch_model and fastalign.unpatch_model is unpatch_model

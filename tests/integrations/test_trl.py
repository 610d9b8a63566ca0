"""fastalign.integrations.trl: TRL 1.16's trainers with fastalign's fused LM head.

For each trainer, a few steps with the same seed, model and data through stock TRL and through
ours must log the same losses and metrics (float32: TRL's configs default to bf16 autocast on
CPU, where two different roundings of the head would be compared), while TRL's own chunked
log-prob function is never called in our run. Options that need the logits are refused at
construction. One step at a 128k-token head holds at least 3x less memory than stock TRL's.
"""

import json
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

import trl.trainer.utils as trl_utils  # noqa: E402
from helpers import impl_is_available  # noqa: E402

from fastalign import assets  # noqa: E402
from fastalign.bench.memory import cpu_peak_supported, measure_peak_memory  # noqa: E402
from fastalign.integrations import trl as fa_trl  # noqa: E402

pytestmark = pytest.mark.skipif(trl.__version__.split(".")[:2] != ["1", "16"],
                                reason=f"written against TRL 1.16, found {trl.__version__}")

# Keys of TRL's log history that measure time, not training.
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time"}


@pytest.fixture(scope="module")
def tokenizer():
    return assets.load_default_tokenizer()


def _records(kind: str, count: int):
    with open(assets.default_data_path(kind)) as file:
        return datasets.Dataset.from_list([json.loads(line) for line in file][:count])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The shipped tiny Llama with seeded random weights, saved: TRL loads its reference model
    (DPO, KTO, GRPO with beta > 0) from the policy's path."""
    return _save_model(tmp_path_factory.mktemp("tiny-llama"), None)


@pytest.fixture(scope="module")
def big_head_model_dir(tmp_path_factory):
    return _save_model(tmp_path_factory.mktemp("tiny-llama-128k"), 128256)


def _save_model(path, vocab_size):
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(assets.default_model_dir())
    if vocab_size is not None:
        config.vocab_size = vocab_size
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def _model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def _common(tmp_path, name: str) -> dict:
    return dict(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0,
                learning_rate=1e-3, save_strategy="no", disable_tqdm=True)


def _no_stock_head(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("TRL's chunked log-prob function ran inside a fastalign trainer")

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", refuse)


def _train(trainer) -> list[dict]:
    trainer.train()
    return [{k: v for k, v in entry.items() if k not in TIMING}
            for entry in trainer.state.log_history]


def _assert_same_logs(ours: list[dict], stock: list[dict], rel: float = 1e-4):
    assert len(ours) == len(stock) > 1
    for step, (got, want) in enumerate(zip(ours, stock)):
        assert got.keys() == want.keys(), step
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-5), (step, key, got[key])


def _parity(monkeypatch, make_trainer, ours_cls, stock_cls) -> list[dict]:
    stock = _train(make_trainer(stock_cls, "stock"))
    _no_stock_head(monkeypatch)
    trainer = make_trainer(ours_cls, "ours")
    assert fa_trl._uses_fastalign_head(trainer.model)
    ours = _train(trainer)
    _assert_same_logs(ours, stock)
    return ours


@pytest.mark.parametrize("options", [
    {},
    {"loss_type": "dft", "packing": True, "padding_free": True},
], ids=["nll", "dft-packed"])
def test_sft_logs_equal_stock_trl(tmp_path, model_dir, tokenizer, monkeypatch, options):
    data = _records("sft", 16)

    def make(cls, name):
        args = trl.SFTConfig(**_common(tmp_path, name), max_length=64, **options)
        return cls(model=_model(model_dir), args=args, train_dataset=data,
                   processing_class=tokenizer)

    logs = _parity(monkeypatch, make, fa_trl.SFTTrainer, trl.SFTTrainer)
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens"} <= logs[0].keys()


@pytest.mark.parametrize("options", [
    {"loss_type": ["sigmoid"]},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [1.0, 0.5, 0.1]},
    {"loss_type": ["ipo"], "use_weighting": True, "ld_alpha": 0.5},
    {"loss_type": ["sigmoid"], "precompute_ref_log_probs": True},
], ids=["sigmoid", "mixture", "ipo-wpo-ld", "precomputed-ref"])
def test_dpo_logs_equal_stock_trl(tmp_path, model_dir, tokenizer, monkeypatch, options):
    data = _records("dpo", 12)

    def make(cls, name):
        args = trl.DPOConfig(**_common(tmp_path, name), max_length=48, **options)
        return cls(model=_model(model_dir), args=args, train_dataset=data,
                   processing_class=tokenizer)

    logs = _parity(monkeypatch, make, fa_trl.DPOTrainer, trl.DPOTrainer)
    assert {"rewards/chosen", "logits/chosen", "logps/rejected", "entropy"} <= logs[0].keys()


def test_dpo_with_a_peft_adapter_logs_equal_stock_trl(tmp_path, model_dir, tokenizer,
                                                       monkeypatch):
    """LoRA on the attention: the reference is the policy with its adapter disabled."""
    peft = pytest.importorskip("peft")
    data = _records("dpo", 12)

    def make(cls, name):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               task_type="CAUSAL_LM")
        args = trl.DPOConfig(**_common(tmp_path, name), max_length=48)
        return cls(model=_model(model_dir), args=args, train_dataset=data,
                   processing_class=tokenizer, peft_config=lora)

    _parity(monkeypatch, make, fa_trl.DPOTrainer, trl.DPOTrainer)


def test_kto_logs_equal_stock_trl(tmp_path, model_dir, tokenizer, monkeypatch):
    data = _records("kto", 16)

    def make(cls, name):
        args = trl.KTOConfig(**_common(tmp_path, name), max_length=48)
        return cls(model=_model(model_dir), args=args, train_dataset=data,
                   processing_class=tokenizer)

    _parity(monkeypatch, make, fa_trl.KTOTrainer, trl.KTOTrainer)


def _length_reward(completions, **kwargs):
    return [float(len(completion)) / 10 for completion in completions]


GRPO_OPTIONS = {
    "grpo-kl": {"beta": 0.04},
    "gspo-entropy": {"importance_sampling_level": "sequence", "loss_type": "grpo",
                     "top_entropy_quantile": 0.5, "entropy_coef": 0.01, "temperature": 0.7,
                     "num_iterations": 2},
    "rloo": {},
}


@pytest.mark.parametrize("case", list(GRPO_OPTIONS))
def test_grpo_and_rloo_logs_equal_stock_trl(tmp_path, model_dir, tokenizer, monkeypatch, case):
    """Sampled generations: the same seed and the same weights draw the same completions."""
    data = _records("grpo", 8)
    config_cls, ours, stock = {
        "grpo": (trl.GRPOConfig, fa_trl.GRPOTrainer, trl.GRPOTrainer),
        "rloo": (trl.RLOOConfig, fa_trl.RLOOTrainer, trl.RLOOTrainer),
    }["rloo" if case == "rloo" else "grpo"]
    extra = GRPO_OPTIONS[case]

    def make(cls, name):
        args = config_cls(**_common(tmp_path, name), num_generations=4,
                          max_completion_length=8, **extra)
        return cls(model=_model(model_dir), reward_funcs=_length_reward, args=args,
                   train_dataset=data,
                   processing_class=tokenizer)

    logs = _parity(monkeypatch, make, ours, stock)
    assert "entropy" in logs[0]


def test_options_that_need_the_logits_are_refused_at_construction(tmp_path, model_dir,
                                                                  tokenizer):
    data = _records("sft", 4)
    model = _model(model_dir)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        fa_trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data,
                          args=trl.SFTConfig(**_common(tmp_path, "smooth"),
                                             label_smoothing_factor=0.1))
    with pytest.raises(ValueError, match="compute_metrics receives the model's logits"):
        fa_trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data,
                          args=trl.SFTConfig(**_common(tmp_path, "metrics")),
                          compute_metrics=lambda prediction: {})


def test_the_head_matches_trls_for_every_output(model_dir):
    """Every field of TRL's FusedCausalLMOutput, with shift_labels, temperature and
    num_items_in_batch, against TRL's own function on the same model."""
    ids = torch.randint(3, 616, (3, 17), generator=torch.Generator().manual_seed(1))
    model = _model(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
        greedy = model(input_ids=ids).logits.argmax(-1)
    labels = ids.clone()
    labels[:, 1::2] = greedy[:, :-1:2]  # every other label is the top-1 token
    labels[:, :4] = -100
    labels[1, 9:] = -100
    call = dict(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=21)
    results = []
    for add in (trl_utils.add_fused_lm_head, fa_trl.add_fused_lm_head):
        model = _model(model_dir).train()
        with torch.no_grad():  # logits of a few units: the statistics are not all ~uniform
            model.lm_head.weight.mul_(40.0)
        add(model, temperature=0.7, outputs=fa_trl.OUTPUTS)
        out = model(**call)
        (out.loss + out.entropy.sum()).backward()
        shifted = model(input_ids=ids, shift_labels=labels, fused_lm_head=True)
        results.append((out, shifted, {n: p.grad for n, p in model.named_parameters()}))
    (ours, ours_shifted, our_grads), (stock, stock_shifted, stock_grads) = results
    for field in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(ours, field), getattr(stock, field),
                                   rtol=1e-5, atol=1e-5, msg=field)
    assert torch.equal(ours.is_top1, stock.is_top1)
    assert ours.is_top1.any() and not ours.is_top1.all()
    assert torch.equal(ours.label_mask, stock.label_mask)
    torch.testing.assert_close(ours_shifted.log_probs, stock_shifted.log_probs)
    for name, grad in stock_grads.items():  # judged against each gradient's own scale
        error = (our_grads[name] - grad).abs().max().item()
        assert error <= 2e-4 * grad.abs().max().item(), (name, error)


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")
@pytest.mark.skipif(not impl_is_available("cpp"), reason="C++ extension not built")
def test_a_dpo_step_at_a_128k_head_holds_3x_less_than_stock_trl(tmp_path, big_head_model_dir,
                                                                tokenizer):
    """One DPO training step (policy and reference) of the tiny Llama given a Llama-3-sized
    vocabulary (128,256 tokens): 8 pairs x 128 tokens, 2,048 rows through each head."""
    ids = torch.randint(3, 616, (16, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "completion_mask": torch.cat([torch.zeros(16, 32), torch.ones(16, 96)], 1).long()}
    data = _records("dpo", 8)
    peaks = {}
    for name, cls in (("stock", trl.DPOTrainer), ("ours", fa_trl.DPOTrainer)):
        args = trl.DPOConfig(**_common(tmp_path, name), gradient_checkpointing=False)
        trainer = cls(model=_model(big_head_model_dir), args=args, train_dataset=data,
                      processing_class=tokenizer)
        model = trainer.model.train()

        def step(inputs):
            trainer.compute_loss(model, dict(inputs)).backward()

        step({k: v[:2, :40] for k, v in batch.items()})  # the gradients exist
        _, peaks[name] = measure_peak_memory(lambda: step(batch), "cpu")
    mib = {name: round(peak / 2**20) for name, peak in peaks.items()}
    print(f"peak memory of a DPO step, MiB: {mib}")
    assert peaks["stock"] >= 3 * peaks["ours"], mib


def test_import_fastalign_never_imports_trl():
    code = "import sys, fastalign, fastalign.integrations; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_under_bf16_autocast_the_head_is_as_close_to_float32_as_trls(model_dir):
    """TRL's configs default to bf16 autocast on CPU: both heads then see bf16 hidden states and
    weights. Judged against float32 log-probs of the same model, ours (fp32 accumulation and
    logits) must be at least as close as TRL's (whose tiles of logits are rounded to bf16)."""
    ids = torch.randint(3, 616, (4, 33), generator=torch.Generator().manual_seed(2))
    call = dict(input_ids=ids, labels=ids, fused_lm_head=True)
    errors = {}
    truth = None
    heads = {"fp32": trl_utils.add_fused_lm_head, "stock": trl_utils.add_fused_lm_head,
             "ours": fa_trl.add_fused_lm_head}
    for name, add in heads.items():
        model = _model(model_dir).train()
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)
        add(model, outputs=("log_probs", "entropy"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32"):
            out = model(**call)
        if truth is None:
            truth = out
            continue
        errors[name] = max((out.log_probs - truth.log_probs).abs().max().item(),
                           (out.entropy - truth.entropy).abs().max().item())
    assert errors["ours"] <= errors["stock"], errors

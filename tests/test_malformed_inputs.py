"""A catalogue of malformed inputs across the public API, the trainers and the CLI.

Two tables:

* ``BAD_INPUTS``: a call that must fail with the given exception type and a message naming what
  is wrong (the argument, the field, ``FILE:LINE`` or the ``--option``) — matched by a regex;
* ``DOCUMENTED`` / ``OP_DOCUMENTED``: inputs that look degenerate but are not errors (an empty
  batch, an all-masked batch, a zero-length response, NaN in one token's hidden state) and give
  exactly the result that the docstrings and the README promise.

``tests/test_errors.py`` and the loss modules' own tables keep the cases they already had; none is
repeated here.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import impl_device, impl_is_available

from fastalign import (
    FusedDPOLoss,
    FusedKTOLoss,
    FusedPPOLoss,
    FusedSimPOLoss,
    dpo_loss,
    gae,
    hf,
    kto_loss,
    linear_kl,
    linear_logprobs,
    ppo_policy_loss,
    sequence_logprobs,
    sequence_logprobs_from_labels,
)
from fastalign.assets import build_default_model, default_data_path, load_default_tokenizer
from fastalign.cli import main as cli_main
from fastalign.data import (
    DataError,
    KTOCollator,
    PreferenceCollator,
    SFTCollator,
    encode_preference,
    load_jsonl,
)
from fastalign.losses import grpo_loss, ppo_value_loss
from fastalign.ops.sequence import next_token_targets
from fastalign.trainers import DPOConfig, GRPOConfig, PPOConfig, TrainingConfig

N, H, V = 6, 8, 20
_gen = torch.Generator().manual_seed(0)
HIDDEN = torch.randn(N, H, generator=_gen)
WEIGHT = torch.randn(V, H, generator=_gen) / math.sqrt(H)
TARGETS = torch.randint(0, V, (N,), generator=_gen)
NAN, INF = float("nan"), float("inf")


def _with(tensor: torch.Tensor, index, value) -> torch.Tensor:
    out = tensor.clone()
    out[index] = value
    return out


def _lp(**overrides):
    args = dict(hidden=HIDDEN, weight=WEIGHT, targets=TARGETS)
    args.update(overrides)
    return linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def _kl(**overrides):
    args = dict(hidden=HIDDEN, weight=WEIGHT, ref_hidden=HIDDEN, ref_weight=WEIGHT)
    args.update(overrides)
    return linear_kl(args.pop("hidden"), args.pop("weight"), args.pop("ref_hidden"),
                     args.pop("ref_weight"), **args)


# Sequences: B = 2 of T = 5 tokens (chosen stacked on rejected for the pair losses).
B, T, VS = 2, 5, 11
SEQ_HIDDEN = torch.randn(B, T, H, generator=_gen)
SEQ_WEIGHT = torch.randn(VS, H, generator=_gen)
SEQ_IDS = torch.randint(0, VS, (B, T), generator=_gen)
SEQ_LABELS = _with(SEQ_IDS, (slice(None), slice(0, 2)), -100)
TOKENS = torch.randn(B, T - 1, generator=_gen)  # per-token inputs [B, T - 1]


def _seq(**overrides):
    args = dict(hidden=SEQ_HIDDEN, weight=SEQ_WEIGHT, input_ids=SEQ_IDS)
    args.update(overrides)
    return sequence_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("input_ids"), **args)


def _packed(cu_seqlens):
    return sequence_logprobs(SEQ_HIDDEN.reshape(B * T, H), SEQ_WEIGHT, SEQ_IDS.reshape(-1),
                             cu_seqlens=cu_seqlens)


def _gae(**overrides):
    args = dict(rewards=TOKENS, values=TOKENS, mask=torch.ones(B, T - 1, dtype=torch.bool))
    args.update(overrides)
    return gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


def _logps(batch: int = 3) -> list[torch.Tensor]:
    return [torch.randn(batch, generator=_gen) for _ in range(4)]


def _fused_dpo(module=None, **kwargs):
    kwargs.setdefault("ref_hidden", SEQ_HIDDEN)
    kwargs.setdefault("ref_weight", SEQ_WEIGHT)
    hidden = kwargs.pop("hidden", SEQ_HIDDEN)
    labels = kwargs.pop("labels", SEQ_LABELS)
    return (module or FusedDPOLoss())(hidden, SEQ_WEIGHT, labels, **kwargs)


def _fused_ppo(module=None, **kwargs):
    old_logps = kwargs.pop("old_logps", TOKENS)
    advantages = kwargs.pop("advantages", TOKENS)
    return (module or FusedPPOLoss())(SEQ_HIDDEN, SEQ_WEIGHT, SEQ_LABELS, old_logps, advantages,
                                      **kwargs)


# The shipped tiny Llama (context 512 tokens) and tokenizer, built once.
@functools.cache
def _model():
    return build_default_model(seed=0).eval()


@functools.cache
def _tokenizer():
    return load_default_tokenizer()


def _ids(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 600, (batch, length), generator=torch.Generator().manual_seed(1))


def _jsonl(tmp: Path, content, name: str = "bad.jsonl") -> Path:
    """Write ``content`` (bytes, or a list of lines: dicts as JSON, strings as they are)."""
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n"
                                for line in content), encoding="utf-8")
    return path


PREF = {"prompt": "Q", "chosen": " A", "rejected": " B"}
PREF_LINE = json.dumps(PREF) + "\n"


class CLIError(Exception):
    """A ``fastalign train`` run that exited with status 2; the message is what it printed to
    stderr. Raised by :func:`_cli` so that CLI cases fit the same table as the others."""


def _cli(tmp: Path, *argv: str):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = cli_main(["train", *argv, "--output", str(tmp / "run"), "--no-progress"])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    if status != 2:
        raise AssertionError(f"expected exit status 2 (a usage error), got {status}: "
                             f"{err.getvalue()}")
    raise CLIError(err.getvalue())


def case(name, call, error, message):
    """One row of BAD_INPUTS."""
    return pytest.param(call, error, message, id=name)


BAD_INPUTS = [
    # ------------------------------------------------------------------ linear_logprobs
    case("lp-hidden-0d", lambda tmp: _lp(hidden=torch.tensor(1.0)), ValueError,
         r"hidden must have at least one dimension"),
    case("lp-hidden-size-0", lambda tmp: _lp(hidden=torch.randn(N, 0), weight=torch.randn(V, 0)),
         ValueError, r"hidden size H must be at least 1"),
    case("lp-weight-transposed", lambda tmp: _lp(weight=WEIGHT.T.contiguous()), ValueError,
         r"hidden's last dimension \(8\) must equal weight\.shape\[1\] \(20\)"),
    case("lp-weight-numpy", lambda tmp: _lp(weight=WEIGHT.numpy()), TypeError,
         r"weight must be a torch\.Tensor, got ndarray"),
    case("lp-weight-bf16-hidden-fp32", lambda tmp: _lp(weight=WEIGHT.bfloat16()), TypeError,
         r"hidden and weight must have the same dtype, got torch\.float32 and torch\.bfloat16"),
    case("lp-hidden-complex", lambda tmp: _lp(hidden=HIDDEN.to(torch.complex64),
                                              weight=WEIGHT.to(torch.complex64)),
         TypeError, r"hidden must be float32, bfloat16, float16 or float64"),
    case("lp-bias-int", lambda tmp: _lp(bias=torch.zeros(V, dtype=torch.long)), TypeError,
         r"bias must be float32, bfloat16, float16 or float64, got torch\.int64"),
    case("lp-targets-flattened", lambda tmp: _lp(hidden=HIDDEN.reshape(2, 3, H)), ValueError,
         r"targets must have the leading shape of hidden \(2, 3\), got \(6,\)"),
    case("lp-targets-complex", lambda tmp: _lp(targets=TARGETS.to(torch.complex64)), TypeError,
         r"targets must be an integer tensor"),
    case("lp-targets-list", lambda tmp: _lp(targets=TARGETS.tolist()), TypeError,
         r"targets must be a torch\.Tensor, got list"),
    case("lp-targets-on-meta", lambda tmp: _lp(targets=TARGETS.to("meta")), ValueError,
         r"same device.*targets on meta"),
    case("lp-bias-on-meta", lambda tmp: _lp(bias=torch.zeros(V, device="meta")), ValueError,
         r"same device.*bias on meta"),
    case("lp-target-int32-equal-to-V", lambda tmp: _lp(targets=torch.full((N,), V,
                                                                          dtype=torch.int32)),
         ValueError, r"targets must lie in \[0, V\) = \[0, 20\).*found \[20"),
    case("lp-target-2**40", lambda tmp: _lp(targets=_with(TARGETS, 3, 2**40)), ValueError,
         r"targets must lie in \[0, V\).*found \[1099511627776\]"),
    case("lp-default-ignore-index-with-custom-one",
         lambda tmp: _lp(targets=_with(TARGETS, 0, -100), ignore_index=-1), ValueError,
         r"targets must lie in \[0, V\) .* or equal ignore_index \(-1\); found \[-100\]"),
    case("lp-temperature-inf", lambda tmp: _lp(temperature=INF), ValueError,
         r"temperature must be a finite number > 0, got inf"),
    case("lp-temperature-bool", lambda tmp: _lp(temperature=True), TypeError,
         r"temperature must be a float, got bool"),
    case("lp-temperature-tensor", lambda tmp: _lp(temperature=torch.tensor(1.0)), TypeError,
         r"temperature must be a float, got Tensor"),
    case("lp-softcap-nan", lambda tmp: _lp(softcap=NAN), ValueError,
         r"softcap must be None or a finite number > 0, got nan"),
    case("lp-softcap-inf", lambda tmp: _lp(softcap=INF), ValueError,
         r"softcap must be None or a finite number > 0, got inf"),
    case("lp-softcap-string", lambda tmp: _lp(softcap="30"), TypeError,
         r"softcap must be a float or None, got str"),
    case("lp-ignore-index-bool", lambda tmp: _lp(ignore_index=True), TypeError,
         r"ignore_index must be an int, got bool"),
    case("lp-impl-none", lambda tmp: _lp(impl=None), ValueError, r"impl must be one of .*None"),
    case("lp-return-entropy-string", lambda tmp: _lp(return_entropy="no"), TypeError,
         r"return_entropy must be a bool"),
    case("lp-vocab-start-index-without-process-group", lambda tmp: _lp(vocab_start_index=3),
         ValueError, r"vocab_start_index=3 needs a process_group"),
    case("lp-check-finite-string", lambda tmp: _lp(check_finite="yes"), TypeError,
         r"check_finite must be a bool, got str"),
    case("lp-check-finite-nan-hidden",
         lambda tmp: _lp(hidden=_with(HIDDEN, (2, 3), NAN), check_finite=True), ValueError,
         r"hidden contains NaN \(1 of 48 values, first at index \(2, 3\)\)"),
    case("lp-check-finite-inf-weight",
         lambda tmp: _lp(weight=_with(WEIGHT, (5, 0), -INF), check_finite=True), ValueError,
         r"weight contains inf \(1 of 160 values, first at index \(5, 0\)\)"),
    case("lp-check-finite-nan-bias",
         lambda tmp: _lp(bias=_with(torch.zeros(V), 7, NAN), check_finite=True), ValueError,
         r"bias contains NaN"),
    # ------------------------------------------------------------------ linear_kl
    case("kl-hidden-int", lambda tmp: _kl(hidden=HIDDEN.long()), TypeError,
         r"hidden must be float32"),
    case("kl-ref-weight-1d", lambda tmp: _kl(ref_weight=WEIGHT.reshape(-1)), ValueError,
         r"ref_weight must be 2-D \[V, H\]"),
    case("kl-ref-weight-dtype", lambda tmp: _kl(ref_weight=WEIGHT.double()), TypeError,
         r"ref_hidden and ref_weight must have the same dtype"),
    case("kl-ref-hidden-on-meta", lambda tmp: _kl(ref_hidden=HIDDEN.to("meta")), ValueError,
         r"same device.*ref_hidden on meta"),
    case("kl-mask-on-meta", lambda tmp: _kl(mask=torch.ones(N, dtype=torch.bool, device="meta")),
         ValueError, r"same device.*mask on meta"),
    case("kl-temperature-string", lambda tmp: _kl(temperature="1"), TypeError,
         r"temperature must be a float, got str"),
    case("kl-softcap-nan", lambda tmp: _kl(softcap=NAN), ValueError, r"softcap must be None or"),
    case("kl-reverse-int", lambda tmp: _kl(reverse=1), TypeError, r"reverse must be a bool"),
    case("kl-check-finite-nan-ref-hidden",
         lambda tmp: _kl(ref_hidden=_with(HIDDEN, (1, 1), NAN), check_finite=True), ValueError,
         r"ref_hidden contains NaN"),
    # ------------------------------------------------------------------ gae
    case("gae-gamma-string", lambda tmp: _gae(gamma="0.9"), TypeError,
         r"gamma must be a float, got str"),
    case("gae-lam-above-1", lambda tmp: _gae(lam=1.01), ValueError, r"lam must lie in \[0, 1\]"),
    case("gae-values-int", lambda tmp: _gae(values=TOKENS.long()), TypeError,
         r"values must be float32"),
    case("gae-mask-shape", lambda tmp: _gae(mask=torch.ones(B, T, dtype=torch.bool)), ValueError,
         r"rewards, values and mask must have the same shape.*\(2, 5\)"),
    case("gae-values-on-meta", lambda tmp: _gae(values=TOKENS.to("meta")), ValueError,
         r"same device.*values on meta"),
    # ------------------------------------------------------------------ sequence log-probs
    case("seq-hidden-2d-without-cu-seqlens", lambda tmp: _seq(hidden=SEQ_HIDDEN[0],
                                                              input_ids=SEQ_IDS[0]),
         ValueError, r"hidden must be \[B, T, H\].*pass cu_seqlens"),
    case("seq-input-ids-list", lambda tmp: _seq(input_ids=SEQ_IDS.tolist()), TypeError,
         r"input_ids must be a torch\.Tensor"),
    case("seq-input-ids-out-of-vocabulary", lambda tmp: _seq(input_ids=SEQ_IDS + VS), ValueError,
         r"input_ids\) must lie in \[0, V\) = \[0, 11\)"),
    case("seq-input-ids-negative", lambda tmp: _seq(input_ids=_with(SEQ_IDS, (1, 3), -7)),
         ValueError, r"input_ids\) must lie in \[0, V\).*found \[-7\]"),
    case("seq-response-mask-float", lambda tmp: _seq(response_mask=torch.ones(B, T)), TypeError,
         r"response_mask must be a bool"),
    case("seq-response-mask-on-meta",
         lambda tmp: _seq(response_mask=torch.ones(B, T, dtype=torch.bool, device="meta")),
         ValueError, r"response_mask must be on input_ids' device cpu, got meta"),
    case("seq-hidden-one-token-short", lambda tmp: _seq(hidden=SEQ_HIDDEN[:, :-1]), ValueError,
         r"hidden's leading shape \(2, 4\) must equal the labels' \(or input_ids'\) shape"),
    case("seq-labels-float", lambda tmp: sequence_logprobs_from_labels(
        SEQ_HIDDEN, SEQ_WEIGHT, SEQ_LABELS.float()), TypeError,
         r"labels must be an integer tensor, got torch\.float32"),
    case("seq-labels-bool", lambda tmp: sequence_logprobs_from_labels(
        SEQ_HIDDEN, SEQ_WEIGHT, SEQ_LABELS > 0), TypeError, r"labels must be an integer tensor"),
    case("seq-labels-out-of-vocabulary", lambda tmp: sequence_logprobs_from_labels(
        SEQ_HIDDEN, SEQ_WEIGHT, _with(SEQ_LABELS, (0, 4), VS)), ValueError,
         r"labels \(or input_ids\) must lie in \[0, V\) = \[0, 11\).*found \[11\]"),
    case("seq-next-token-targets-float", lambda tmp: next_token_targets(torch.zeros(3)),
         TypeError, r"labels must be an integer tensor"),
    case("seq-cu-seqlens-float", lambda tmp: _packed(torch.tensor([0.0, 5.0, 10.0])), TypeError,
         r"cu_seqlens must be an integer tensor"),
    case("seq-cu-seqlens-2d", lambda tmp: _packed(torch.tensor([[0, 5, 10]])), ValueError,
         r"cu_seqlens must be 1-D \[S \+ 1\]"),
    case("seq-cu-seqlens-no-sequence", lambda tmp: _packed(torch.tensor([0])), ValueError,
         r"cu_seqlens must be 1-D \[S \+ 1\] with S >= 1"),
    case("seq-cu-seqlens-decreasing", lambda tmp: _packed(torch.tensor([0, 7, 5, 10])),
         ValueError, r"cu_seqlens must start at 0, never decrease"),
    # ------------------------------------------------------------------ losses
    case("dpo-loss-type-int", lambda tmp: dpo_loss(*_logps(), loss_type=3), TypeError,
         r"loss_type must be a string or a non-empty list of strings, got 3"),
    case("dpo-inputs-on-two-devices", lambda tmp: dpo_loss(*_logps()[:3],
                                                           torch.zeros(3, device="meta")),
         ValueError, r"all tensors must be on the same device"),
    case("kto-kl-logps-batch-mismatch", lambda tmp: kto_loss(
        *_logps()[:2], torch.zeros(3), torch.zeros(2), torch.tensor([True, False, True])),
         ValueError, r"mismatched batch sizes: policy_kl_logps has B=3 but ref_kl_logps has B=2"),
    case("ppo-loss-agg-unknown", lambda tmp: ppo_policy_loss(
        TOKENS, TOKENS, TOKENS, torch.ones(B, T - 1, dtype=torch.bool), loss_agg="sum"),
         ValueError, r"loss_agg: unknown mode 'sum'"),
    case("ppo-value-loss-agg-int", lambda tmp: ppo_value_loss(
        TOKENS, TOKENS, TOKENS, torch.ones(B, T - 1, dtype=torch.bool), loss_agg=1),
         TypeError, r"loss_agg must be a string, got int"),
    case("grpo-loss-type-unknown", lambda tmp: grpo_loss(
        TOKENS, TOKENS, TOKENS, torch.zeros(B), torch.ones(B, T - 1, dtype=torch.bool),
        loss_type="sum"), ValueError, r"loss_type: unknown mode 'sum'"),
    case("ppo-mask-on-meta", lambda tmp: ppo_policy_loss(
        TOKENS, TOKENS, TOKENS, torch.ones(B, T - 1, dtype=torch.bool, device="meta")),
         ValueError, r"mask must be on the same device as logps"),
    # ------------------------------------------------------------------ fused loss modules
    case("fused-dpo-both-references", lambda tmp: _fused_dpo(
        ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1)), ValueError,
         r"pass either ref_hidden and ref_weight or ref_chosen_logps and ref_rejected_logps"),
    case("fused-dpo-ref-weight-other-vocabulary", lambda tmp: _fused_dpo(
        ref_weight=torch.randn(VS + 1, H)), ValueError,
         r"weight and ref_weight must cover the same vocabulary, got V = 11 and 12"),
    case("fused-dpo-ref-hidden-other-length", lambda tmp: _fused_dpo(
        ref_hidden=SEQ_HIDDEN[:, :-1]), ValueError,
         r"ref_hidden's leading shape \(2, 4\) must equal the labels' shape \(2, 5\)"),
    case("fused-dpo-ref-weight-list", lambda tmp: _fused_dpo(ref_weight=SEQ_WEIGHT.tolist()),
         TypeError, r"ref_weight must be a torch\.Tensor"),
    case("fused-dpo-empty-batch", lambda tmp: _fused_dpo(
        hidden=SEQ_HIDDEN[:0], labels=SEQ_LABELS[:0], ref_hidden=SEQ_HIDDEN[:0]), ValueError,
         r"hidden is an empty batch"),
    case("fused-dpo-beta-at-construction", lambda tmp: FusedDPOLoss(beta=-1.0), ValueError,
         r"beta must be a finite number > 0, got -1\.0"),
    case("fused-dpo-loss-type-at-construction", lambda tmp: FusedDPOLoss(loss_type="dpo"),
         ValueError, r"unknown loss_type 'dpo'"),
    case("fused-dpo-unknown-option", lambda tmp: FusedDPOLoss(bogus=1), TypeError, r"bogus"),
    case("fused-dpo-temperature-at-construction", lambda tmp: FusedDPOLoss(temperature=0.0),
         ValueError, r"temperature must be a finite number > 0"),
    case("fused-dpo-impl-at-construction", lambda tmp: FusedDPOLoss(impl="cuda"), ValueError,
         r"impl must be one of .*'cuda'"),
    case("fused-simpo-gamma-nan-at-construction",
         lambda tmp: FusedSimPOLoss(beta=2.0, gamma=NAN), ValueError,
         r"gamma must be a finite number"),
    case("fused-kto-beta-at-construction", lambda tmp: FusedKTOLoss(beta=0.0), ValueError,
         r"beta must be a finite number > 0"),
    case("fused-kto-kl-hidden-without-kl-labels", lambda tmp: FusedKTOLoss()(
        SEQ_HIDDEN, SEQ_WEIGHT, SEQ_LABELS, torch.tensor([True, False]), kl_hidden=SEQ_HIDDEN,
        ref_logps=torch.zeros(B)), ValueError, r"kl_hidden and kl_labels must be given together"),
    case("fused-kto-desirable-int", lambda tmp: FusedKTOLoss()(
        SEQ_HIDDEN, SEQ_WEIGHT, SEQ_LABELS, torch.tensor([1, 0]), ref_logps=torch.zeros(B)),
         TypeError, r"desirable must be a bool tensor"),
    case("fused-ppo-clip-at-construction", lambda tmp: FusedPPOLoss(clip=2.0), ValueError,
         r"clip must lie in \(0, 1\)"),
    case("fused-ppo-vf-clip-at-construction", lambda tmp: FusedPPOLoss(vf_clip=-0.2), ValueError,
         r"vf_clip must be a finite number > 0"),
    case("fused-ppo-kl-coef-nan", lambda tmp: FusedPPOLoss(kl_coef=NAN), ValueError,
         r"kl_coef must be a number >= 0, got nan"),
    case("fused-ppo-advantages-wrong-batch", lambda tmp: _fused_ppo(advantages=torch.zeros(3)),
         ValueError, r"advantages must be \[B, T - 1\] = \(2, 4\) or one per sequence \[B\] = "
                     r"\[2\], got \(3,\)"),
    case("fused-ppo-old-logps-shape", lambda tmp: _fused_ppo(old_logps=TOKENS[:, :-1]),
         ValueError, r"old_logps must have the shape of logps \(2, 4\), got \(2, 3\)"),
    case("fused-ppo-values-without-returns", lambda tmp: _fused_ppo(values=TOKENS), ValueError,
         r"values need old_values and returns"),
    # ------------------------------------------------------------------ fastalign.hf
    case("hf-input-ids-list", lambda tmp: hf.token_logprobs(_model(), _ids().tolist()),
         TypeError, r"input_ids must be a torch\.Tensor, got list"),
    case("hf-input-ids-3d", lambda tmp: hf.token_logprobs(_model(), _ids()[None]), ValueError,
         r"input_ids must be 2-D \[B, T\], got shape \(1, 2, 6\)"),
    case("hf-empty-batch", lambda tmp: hf.token_logprobs(_model(), _ids()[:0]), ValueError,
         r"input_ids must hold at least one sequence.*\(0, 6\)"),
    case("hf-zero-length-sequences", lambda tmp: hf.token_logprobs(_model(), _ids()[:, :0]),
         ValueError, r"input_ids must hold at least one sequence of at least one token.*\(2, 0\)"),
    case("hf-attention-mask-on-meta", lambda tmp: hf.token_logprobs(
        _model(), _ids(), attention_mask=torch.ones(2, 6, dtype=torch.long, device="meta")),
         ValueError,
         r"attention_mask is on meta, input_ids on cpu"),
    case("hf-attention-mask-1d", lambda tmp: hf.token_logprobs(
        _model(), _ids(), attention_mask=torch.ones(6, dtype=torch.long)),
         ValueError, r"attention_mask must have input_ids' shape \(2, 6\), got \(6,\)"),
    case("hf-longer-than-context", lambda tmp: hf.token_logprobs(_model(), _ids(1, 513)),
         ValueError, r"input_ids has length 513.*max_position_embeddings = 512"),
    case("hf-eager-longer-than-context", lambda tmp: hf.eager_token_logprobs(_model(),
                                                                             _ids(1, 600)),
         ValueError, r"input_ids has length 600.*max_position_embeddings = 512"),
    case("hf-kl-longer-than-context", lambda tmp: hf.token_kl(_model(), _model(), _ids(1, 520)),
         ValueError, r"input_ids has length 520.*max_position_embeddings = 512"),
    case("hf-position-ids-past-context", lambda tmp: hf.token_logprobs(
        _model(), _ids(1, 4), position_ids=torch.tensor([[0, 1, 2, 900]])), ValueError,
         r"position_ids reach position 901.*max_position_embeddings = 512"),
    case("hf-temperature-string", lambda tmp: hf.token_logprobs(_model(), _ids(),
                                                                temperature="1"),
         TypeError, r"temperature must be a float, got str"),
    case("hf-impl-unknown", lambda tmp: hf.token_logprobs(_model(), _ids(), impl="gpu"),
         ValueError, r"impl must be one of .*'gpu'"),
    case("hf-sequence-labels-float", lambda tmp: hf.sequence_logprobs(
        _model(), _ids(), labels=_ids().float()), TypeError, r"labels must be an integer tensor"),
    case("hf-sequence-labels-out-of-vocabulary", lambda tmp: hf.sequence_logprobs(
        _model(), _ids(), labels=_with(_ids(), (0, 3), 5000)), ValueError,
         r"labels \(or input_ids\) must lie in \[0, V\) = \[0, 616\).*found \[5000\]"),
    case("hf-token-kl-reverse-string", lambda tmp: hf.token_kl(_model(), _model(), _ids(),
                                                               reverse="yes"),
         TypeError, r"reverse must be a bool"),
    # ------------------------------------------------------------------ fastalign.data
    case("jsonl-trailing-comma", lambda tmp: load_jsonl(_jsonl(tmp, [PREF, '{"prompt": "Q",}\n']),
                                                        "preference"),
         DataError, r"bad\.jsonl:2: invalid JSON \(Expecting property name"),
    case("jsonl-truncated-last-line", lambda tmp: load_jsonl(
        _jsonl(tmp, [PREF, '{"prompt": "Q", "cho']), "preference"), DataError,
         r"bad\.jsonl:2: invalid JSON \(Unterminated string"),
    case("jsonl-two-objects-on-one-line", lambda tmp: load_jsonl(
        _jsonl(tmp, [PREF_LINE.strip() + PREF_LINE]), "preference"), DataError,
         r"bad\.jsonl:1: invalid JSON \(Extra data"),
    case("jsonl-whole-file-is-an-array", lambda tmp: load_jsonl(
        _jsonl(tmp, ["[" + PREF_LINE.strip() + "]\n"]), "preference"), DataError,
         r"bad\.jsonl:1: expected a JSON object, got list"),
    case("jsonl-null-line", lambda tmp: load_jsonl(_jsonl(tmp, [PREF, "null\n"]), "preference"),
         DataError, r"bad\.jsonl:2: expected a JSON object, got NoneType"),
    case("jsonl-prompt-null", lambda tmp: load_jsonl(_jsonl(tmp, [{**PREF, "prompt": None}]),
                                                     "preference"),
         DataError, r"bad\.jsonl:1: 'prompt' must be a non-empty string .*got NoneType"),
    case("jsonl-prompt-NaN-literal", lambda tmp: load_jsonl(
        _jsonl(tmp, ['{"prompt": NaN, "chosen": " A", "rejected": " B"}\n']), "preference"),
         DataError, r"bad\.jsonl:1: 'prompt' must be a non-empty string .*got float"),
    case("jsonl-rejected-object", lambda tmp: load_jsonl(
        _jsonl(tmp, [{**PREF, "rejected": {"text": "B"}}]), "preference"), DataError,
         r"bad\.jsonl:1: 'rejected' must be a non-empty string .*got dict"),
    case("jsonl-kto-label-string", lambda tmp: load_jsonl(
        _jsonl(tmp, [{"prompt": "Q", "completion": " A", "label": "true"}]), "kto"),
         DataError, r"bad\.jsonl:1: 'label' must be a JSON bool"),
    case("jsonl-kto-label-missing", lambda tmp: load_jsonl(
        _jsonl(tmp, [{"prompt": "Q", "completion": " A"}]), "kto"), DataError,
         r"bad\.jsonl:1: missing key 'label'"),
    case("jsonl-prompt-missing", lambda tmp: load_jsonl(_jsonl(tmp, [{"text": "Q"}]), "prompt"),
         DataError, r"bad\.jsonl:1: missing key 'prompt'"),
    case("jsonl-sft-messages-string", lambda tmp: load_jsonl(_jsonl(tmp, [{"messages": "hi"}]),
                                                             "sft"),
         DataError, r"bad\.jsonl:1: 'messages' must be a list of .*messages, got a string"),
    case("jsonl-sft-text-messages-list", lambda tmp: load_jsonl(
        _jsonl(tmp, [{"text": [{"role": "user", "content": "hi"}]}]), "sft"), DataError,
         r"bad\.jsonl:1: 'text' must be a non-empty string, got a list"),
    case("jsonl-message-content-int", lambda tmp: load_jsonl(
        _jsonl(tmp, [{"messages": [{"role": "user", "content": 5}]}]), "sft"), DataError,
         r"bad\.jsonl:1: 'messages'\[0\] must be a message"),
    case("jsonl-latin-1", lambda tmp: load_jsonl(
        _jsonl(tmp, PREF_LINE.replace("Q", "caf\xe9").encode("latin-1")), "preference"),
         DataError, r"bad\.jsonl:1: not valid UTF-8 \(byte 15 of the line\)"),
    case("jsonl-utf-16", lambda tmp: load_jsonl(_jsonl(tmp, PREF_LINE.encode("utf-16")),
                                                "preference"),
         DataError, r"bad\.jsonl:1: not valid UTF-8"),
    case("jsonl-nul-bytes", lambda tmp: load_jsonl(_jsonl(tmp, PREF_LINE.encode() + b"\0\0\n"),
                                                   "preference"),
         DataError, r"bad\.jsonl:2: invalid JSON"),
    case("jsonl-lone-surrogate-escape", lambda tmp: load_jsonl(
        _jsonl(tmp, ['{"prompt": "a\\ud800b", "chosen": " A", "rejected": " B"}\n']),
        "preference"), DataError,
         r"bad\.jsonl:1: 'prompt' is not valid Unicode: a lone surrogate '\\ud800' at "
         r"character 1"),
    case("jsonl-whitespace-lines-only", lambda tmp: load_jsonl(_jsonl(tmp, b"\r\n\t\r\n \n"),
                                                               "kto"),
         DataError, r"bad\.jsonl: no records \(the file is empty\); expected kto JSONL"),
    case("jsonl-missing-file", lambda tmp: load_jsonl(tmp / "missing.jsonl", "sft"),
         FileNotFoundError, r"missing\.jsonl"),
    case("jsonl-a-directory", lambda tmp: load_jsonl(tmp, "sft"), IsADirectoryError,
         r"Is a directory"),
    case("encode-max-length-string", lambda tmp: encode_preference([PREF], _tokenizer(),
                                                                   max_length="512"),
         ValueError, r"max_length must be a positive int or None, got '512'"),
    case("collate-empty-batch", lambda tmp: PreferenceCollator(0)([]), ValueError,
         r"cannot collate an empty batch"),
    case("collate-pad-to-negative-multiple", lambda tmp: SFTCollator(0, pad_to_multiple_of=-8),
         ValueError, r"SFTCollator: pad_to_multiple_of must be a positive int or None, got -8"),
    case("collate-kto-single-example", lambda tmp: KTOCollator(0)(
        [{"prompt_ids": [1], "completion_ids": [2], "desirable": True}]), ValueError,
         r"KTOCollator needs >= 2 examples"),
    # ------------------------------------------------------------------ trainer configs
    case("config-grad-accum-steps-0", lambda tmp: TrainingConfig(grad_accum_steps=0), ValueError,
         r"grad_accum_steps must be an integer >= 1, got 0"),
    case("config-seed-negative", lambda tmp: TrainingConfig(seed=-1), ValueError,
         r"seed must be an integer >= 0"),
    case("config-lr-nan", lambda tmp: TrainingConfig(lr=NAN), ValueError,
         r"lr must be a finite number > 0, got nan"),
    case("config-max-grad-norm-0", lambda tmp: TrainingConfig(max_grad_norm=0.0), ValueError,
         r"max_grad_norm must be a finite number > 0"),
    case("config-save-total-limit-0", lambda tmp: TrainingConfig(save_total_limit=0),
         ValueError, r"save_total_limit must be an integer >= 1"),
    case("config-weight-decay-negative", lambda tmp: TrainingConfig(weight_decay=-0.1),
         ValueError, r"weight_decay must be a finite number >= 0"),
    case("config-impl-unknown", lambda tmp: TrainingConfig(impl="gpu"), ValueError,
         r"impl must be one of"),
    case("config-bf16-string", lambda tmp: TrainingConfig(bf16="no"), ValueError, r"bf16"),
    case("config-dpo-beta-negative", lambda tmp: DPOConfig(beta=-1.0), ValueError,
         r"beta must be a finite number > 0, got -1\.0"),
    case("config-dpo-no-loss-type", lambda tmp: DPOConfig(loss_type=()), ValueError,
         r"loss_type must be one or more of"),
    case("config-dpo-label-smoothing-0.7", lambda tmp: DPOConfig(label_smoothing=0.7),
         ValueError, r"label_smoothing"),
    case("config-dpo-loss-weights-length", lambda tmp: DPOConfig(
        loss_type=("sigmoid", "sft"), loss_weights=(1.0,)), ValueError, r"loss_weights"),
    case("config-dpo-loss-weights-nan", lambda tmp: DPOConfig(loss_weights=(NAN,)), ValueError,
         r"loss_weights"),
    case("config-dpo-exo-pair-without-smoothing", lambda tmp: DPOConfig(loss_type="exo_pair"),
         ValueError, r"label_smoothing"),
    case("config-ppo-mode-unknown", lambda tmp: PPOConfig(mode="a2c"), ValueError,
         r"mode must be one of 'ppo', 'grpo', 'rloo', 'trpo', got 'a2c'"),
    case("config-ppo-gamma-2", lambda tmp: PPOConfig(gamma=2.0), ValueError,
         r"gamma must be a finite number in \[0\.0, 1\.0\], got 2\.0"),
    case("config-ppo-clip-1", lambda tmp: PPOConfig(clip=1.0), ValueError,
         r"clip must be a finite number in \(0\.0, 1\.0\)"),
    case("config-ppo-kl-estimator-unknown", lambda tmp: PPOConfig(kl_estimator="k9"), ValueError,
         r"kl_estimator must be one of"),
    case("config-ppo-max-new-tokens-0", lambda tmp: PPOConfig(max_new_tokens=0), ValueError,
         r"max_new_tokens must be an integer >= 1"),
    case("config-ppo-prompt-fills-max-length", lambda tmp: PPOConfig(max_length=64,
                                                                     max_prompt_length=64),
         ValueError, r"max_prompt_length \(64\) must be smaller than max_length \(64\)"),
    case("config-grpo-one-generation", lambda tmp: GRPOConfig(num_generations=1), ValueError,
         r"num_generations must be >= 2"),
    # ------------------------------------------------------------------ the CLI
    case("cli-beta-nonsense", lambda tmp: _cli(tmp, "dpo", "--beta", "nonsense"), CLIError,
         r"argument --beta: expected float, got 'nonsense'"),
    case("cli-max-steps-0", lambda tmp: _cli(tmp, "dpo", "--max-steps", "0"), CLIError,
         r"fastalign train dpo: error: max_steps must be an integer >= 1, got 0"),
    case("cli-loss-type-typo", lambda tmp: _cli(tmp, "dpo", "--loss-type", "sigmod"), CLIError,
         r"loss_type must be one or more of .*got \('sigmod',\)"),
    case("cli-adam-betas-one-value", lambda tmp: _cli(tmp, "sft", "--adam-betas", "0.9"),
         CLIError, r"adam_betas must be two numbers in \[0, 1\), got \(0\.9,\)"),
    case("cli-device-tpu", lambda tmp: _cli(tmp, "sft", "--device", "tpu"), CLIError,
         r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    case("cli-max-grad-norm-nan", lambda tmp: _cli(tmp, "rm", "--max-grad-norm", "nan"),
         CLIError, r"max_grad_norm must be a finite number > 0, got nan"),
    case("cli-grpo-one-generation", lambda tmp: _cli(tmp, "grpo", "--num-generations", "1"),
         CLIError, r"fastalign train grpo: error: num_generations must be >= 2"),
    case("cli-grpo-loss-type-unknown",
         lambda tmp: _cli(tmp, "grpo", "--loss-type", "gspo"), CLIError,
         r"fastalign train grpo: error: loss_type must be one of .*'vespo', got 'gspo'"),
    case("cli-reward-fn-unknown", lambda tmp: _cli(tmp, "ppo", "--reward-fn", "kindness"),
         CLIError, r"reward_fn must be a builtin .*got 'kindness'"),
    case("cli-unknown-kind", lambda tmp: _cli(tmp, "a2c"), CLIError,
         r"invalid choice: 'a2c'"),
    case("cli-option-of-another-trainer", lambda tmp: _cli(tmp, "dpo", "--kl-coef", "1"),
         CLIError, r"unrecognized arguments: --kl-coef 1"),
    case("cli-bool-flag-with-a-value", lambda tmp: _cli(tmp, "dpo", "--bf16", "yes"), CLIError,
         r"unrecognized arguments: yes"),
    case("cli-invalid-json-data", lambda tmp: _cli(
        tmp, "ppo", "--data", str(_jsonl(tmp, ['{"prompt": "Q"}\n', '{"prompt": \n']))),
         CLIError, r"fastalign train ppo: error: .*bad\.jsonl:2: invalid JSON"),
    case("cli-empty-data-file", lambda tmp: _cli(tmp, "sft", "--data", str(_jsonl(tmp, b""))),
         CLIError, r"bad\.jsonl: no records \(the file is empty\); expected sft JSONL"),
    case("cli-non-utf8-data", lambda tmp: _cli(tmp, "kto", "--data", str(_jsonl(
        tmp, b'{"prompt": "caf\xe9", "completion": " A", "label": true}\n'))), CLIError,
         r"bad\.jsonl:1: not valid UTF-8"),
    case("cli-missing-data-file", lambda tmp: _cli(tmp, "kto", "--data",
                                                   str(tmp / "missing.jsonl")),
         CLIError, r"No such file or directory: .*missing\.jsonl"),
    case("cli-malformed-eval-data", lambda tmp: _cli(
        tmp, "dpo", "--data", str(default_data_path("dpo")),
        "--eval-data", str(_jsonl(tmp, [PREF, {"prompt": "Q", "chosen": " A"}], "eval.jsonl"))),
         CLIError, r"eval\.jsonl:2: missing key 'rejected'"),
    case("cli-prompt-fills-max-length", lambda tmp: _cli(
        tmp, "dpo", "--max-length", "64", "--max-prompt-length", "64"), CLIError,
         r"max_prompt_length \(64\) must be smaller than max_length \(64\)"),
    case("cli-lora-rank-0", lambda tmp: _cli(tmp, "sft", "--lora-r", "0"), CLIError,
         r"lora_r must be an integer >= 1, got 0"),
    case("cli-model-directory-missing", lambda tmp: _cli(
        tmp, "sft", "--model", str(tmp / "no-such-dir")), CLIError,
         r"--model.*no-such-dir.*(not found|does not exist|no such)"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS)
def test_malformed_input_is_named(call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_the_catalogue_is_big_enough():
    assert len(BAD_INPUTS) + len(DOCUMENTED) + len(OP_DOCUMENTED) >= 60


# ----------------------------------------------------------------------------------------------
# Degenerate but valid: the documented result, exactly
# ----------------------------------------------------------------------------------------------


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _op_inputs(impl):
    device = impl_device(impl)
    return (HIDDEN.to(device), WEIGHT.to(device), TARGETS.to(device))


def _empty_batch(impl):
    """README: "An empty batch gives empty outputs (and zero gradients)"."""
    hidden, weight, _ = _op_inputs(impl)
    hidden, weight = _leaves(hidden[:0], weight)
    logp, entropy = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long,
                                                                device=hidden.device),
                                    return_entropy=True, impl=impl)
    assert logp.shape == entropy.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == (0, H) and torch.equal(weight.grad, torch.zeros_like(weight))


def _all_ignored(impl):
    """ignore_index: "log-prob 0, entropy 0 and no gradient"."""
    hidden, weight, targets = _op_inputs(impl)
    hidden, weight = _leaves(hidden, weight)
    logp, entropy = linear_logprobs(hidden, weight, torch.full_like(targets, -100),
                                    return_entropy=True, impl=impl)
    assert torch.equal(logp, torch.zeros_like(logp))
    assert torch.equal(entropy, torch.zeros_like(entropy))
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def _kl_all_masked(impl):
    """linear_kl: "tokens where [mask] is false give 0 and no gradient"."""
    hidden, weight, _ = _op_inputs(impl)
    hidden, weight = _leaves(hidden, weight)
    mask = torch.zeros(N, dtype=torch.bool, device=hidden.device)
    kl = linear_kl(hidden, weight, hidden.detach(), 1.1 * weight.detach(), mask=mask, impl=impl)
    assert torch.equal(kl, torch.zeros(N, device=hidden.device))
    kl.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def _nan_in_one_scored_token(impl):
    """NaN in one token's hidden state stays in that token: its log-prob and entropy are NaN,
    every other token's are those of the clean input."""
    hidden, weight, targets = _op_inputs(impl)
    clean = linear_logprobs(hidden, weight, targets, return_entropy=True, impl=impl)
    dirty = linear_logprobs(_with(hidden, (2, 3), NAN), weight, targets, return_entropy=True,
                            impl=impl)
    for got, want in zip(dirty, clean):
        assert torch.isnan(got[2])
        keep = torch.arange(N, device=hidden.device) != 2
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-6, atol=1e-6)


def _nan_in_an_ignored_token(impl):
    """An ignored token gets "no gradient": a NaN in its hidden state (padding) changes nothing,
    neither the other tokens' values nor any gradient."""
    hidden, weight, targets = _op_inputs(impl)
    targets = _with(targets, 4, -100)
    results = []
    for h in (hidden, _with(hidden, (4, 1), NAN)):
        h, w = _leaves(h, weight)
        logp, entropy = linear_logprobs(h, w, targets, return_entropy=True, impl=impl)
        (logp * torch.arange(1.0, N + 1, device=h.device) + entropy).sum().backward()
        results.append((logp, entropy, h.grad, w.grad))
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(results[1][2]).all() and (results[1][0][4] == 0)


def _nan_in_the_weight(impl):
    """A NaN in the head reaches every scored token's log-sum-exp (so each is NaN), never an
    ignored token (0)."""
    hidden, weight, targets = _op_inputs(impl)
    targets = _with(targets, 4, -100)
    logp = linear_logprobs(hidden, _with(weight, (3, 1), NAN), targets, impl=impl)
    assert logp[4] == 0 and torch.isnan(logp[targets != -100]).all()


_OP_CASES = {"empty-batch": _empty_batch, "all-targets-ignored": _all_ignored,
             "kl-all-masked": _kl_all_masked, "nan-in-one-scored-token": _nan_in_one_scored_token,
             "nan-in-an-ignored-token": _nan_in_an_ignored_token,
             "nan-in-the-weight": _nan_in_the_weight}


def _op_param(name, impl):
    return pytest.param(_OP_CASES[name], impl, id=f"{name}-{impl}")


OP_DOCUMENTED = [_op_param(name, impl) for name in _OP_CASES
                 for impl in ("cpp", "triton", "reference")]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN, on purpose
@pytest.mark.parametrize("check, impl", OP_DOCUMENTED)
def test_degenerate_op_input_gives_the_documented_result(check, impl):
    if not impl_is_available(impl):
        pytest.skip(f"{impl} is not available here")
    check(impl)


def _sequence_without_next_token(tmp):
    """T = 1: nothing is scored; sums 0, means 0 ("a sequence without response tokens gives 0,
    never NaN"), lengths 0."""
    result = sequence_logprobs(SEQ_HIDDEN[:, :1], SEQ_WEIGHT, SEQ_IDS[:, :1])
    assert result.token_logps.shape == (B, 0)
    assert result.sum_logps.tolist() == result.mean_logps.tolist() == [0.0, 0.0]
    assert result.lengths.tolist() == [0, 0]


def _packed_zero_length_sequence(tmp):
    """A zero-length sequence inside a packed batch (cu_seqlens repeats 0) scores nothing."""
    result = _packed(torch.tensor([0, 0, B * T]))
    assert result.lengths.tolist() == [0, B * T - 1]
    assert result.sum_logps[0] == 0 and result.mean_logps[0] == 0
    assert torch.isfinite(result.mean_logps).all()


def _response_mask_all_false(tmp):
    """An all-masked sequence: log-prob 0, length 0, and zero gradient to its hidden states."""
    hidden, weight = _leaves(SEQ_HIDDEN, SEQ_WEIGHT)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1] = False
    result = sequence_logprobs(hidden, weight, SEQ_IDS, mask)
    assert result.lengths.tolist() == [T - 1, 0]
    assert result.sum_logps[1] == 0 and result.mean_logps[1] == 0
    result.mean_logps.sum().backward()
    assert torch.equal(hidden.grad[1], torch.zeros(T, H))


def _empty_sequence_batch(tmp):
    result = sequence_logprobs(SEQ_HIDDEN[:0], SEQ_WEIGHT, SEQ_IDS[:0])
    assert result.sum_logps.shape == result.lengths.shape == (0,)


def _gae_degenerate(tmp):
    """gae: "Tokens outside the mask get advantage 0 and return 0"; an empty batch is empty."""
    advantages, returns = _gae(mask=torch.zeros(B, T - 1, dtype=torch.bool))
    assert torch.equal(advantages, torch.zeros(B, T - 1))
    assert torch.equal(returns, torch.zeros(B, T - 1))
    empty = torch.zeros(0, T - 1)
    advantages, returns = gae(empty, empty, empty.bool())
    assert advantages.shape == returns.shape == (0, T - 1)


def _kto_without_undesirable(tmp):
    """kto_loss: "A group absent from the batch has mean 0 (not NaN) and count 0"."""
    logps = _logps()
    loss, metrics = kto_loss(logps[0], logps[1], None, None, torch.ones(3, dtype=torch.bool))
    assert torch.isfinite(loss)
    assert metrics["count/rejected"] == 0 and metrics["rewards/rejected"] == 0
    assert metrics["logps/rejected"] == 0


def _ppo_all_masked(tmp):
    """aggregate_token_loss: "All-masked input gives 0" (and so does its gradient)."""
    logps = TOKENS.clone().requires_grad_()
    loss, metrics = ppo_policy_loss(logps, TOKENS + 1.0, TOKENS,
                                    torch.zeros(B, T - 1, dtype=torch.bool))
    assert loss == 0 and all(torch.isfinite(v) for v in metrics.values())
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros_like(logps))


def _hf_single_token_and_all_padding(tmp):
    """fastalign.hf: results are [B, T - 1], "0 at positions not scored"."""
    model = _model()
    assert hf.token_logprobs(model, _ids(2, 1)).shape == (2, 0)
    logps, entropy = hf.token_logprobs(model, _ids(),
                                       attention_mask=torch.zeros(2, 6, dtype=torch.long),
                                       return_entropy=True)
    assert torch.equal(logps, torch.zeros(2, 5)) and torch.equal(entropy, torch.zeros(2, 5))
    assert hf.token_logprobs(model, _ids(1, 512)).shape == (1, 511)  # exactly the context


def _hf_zero_length_response(tmp):
    """hf.sequence_logprobs: a row whose labels are all -100 scores 0 over 0 tokens."""
    ids = _ids()
    labels = _with(ids, (1, slice(None)), -100)
    result = hf.sequence_logprobs(_model(), ids, labels=labels)
    assert result.lengths.tolist() == [5, 0]
    assert result.sum_logps[1] == 0 and result.mean_logps[1] == 0


def _jsonl_bom_crlf_blank_lines(tmp):
    """load_jsonl: a UTF-8 byte-order mark, CRLF line ends and blank lines are fine."""
    path = _jsonl(tmp, b"\xef\xbb\xbf" + PREF_LINE.encode().replace(b"\n", b"\r\n") + b"\r\n\n"
                  + PREF_LINE.encode())
    assert load_jsonl(path, "preference") == [PREF, PREF]


def _collator_zero_length_completion(tmp):
    """A zero-length completion collates to a sequence with no scored token (labels all -100)."""
    batch = SFTCollator(0)([{"prompt_ids": [1, 5], "completion_ids": []},
                            {"prompt_ids": [1], "completion_ids": [7, 2]}])
    assert batch["labels"].tolist() == [[-100, -100, -100], [-100, 7, 2]]


DOCUMENTED = [
    pytest.param(_sequence_without_next_token, id="sequence-of-one-token"),
    pytest.param(_packed_zero_length_sequence, id="packed-zero-length-sequence"),
    pytest.param(_response_mask_all_false, id="all-masked-sequence"),
    pytest.param(_empty_sequence_batch, id="sequence-empty-batch"),
    pytest.param(_gae_degenerate, id="gae-all-masked-and-empty"),
    pytest.param(_kto_without_undesirable, id="kto-no-undesirable-example"),
    pytest.param(_ppo_all_masked, id="ppo-all-masked"),
    pytest.param(_hf_single_token_and_all_padding, id="hf-one-token-and-all-padding"),
    pytest.param(_hf_zero_length_response, id="hf-zero-length-response"),
    pytest.param(_jsonl_bom_crlf_blank_lines, id="jsonl-bom-crlf-blank-lines"),
    pytest.param(_collator_zero_length_completion, id="collate-zero-length-completion"),
]


@pytest.mark.parametrize("check", DOCUMENTED)
def test_degenerate_input_gives_the_documented_result(check, tmp_path):
    check(tmp_path)

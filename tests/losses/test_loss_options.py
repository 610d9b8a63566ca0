"""The loss options objects: validated once when built, the same result as the keywords, passed
whole by the fused modules and the trainers' configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastalign import FusedDPOLoss, FusedKTOLoss, FusedPPOLoss, FusedSimPOLoss
from fastalign.losses import cpo_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from fastalign.losses import options as opt
from fastalign.trainers import DPOConfig, KTOConfig, PPOConfig


def _pairs(batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(batch, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]
    lengths = torch.randint(1, 9, (batch,), generator=g)
    return logps, lengths


@pytest.mark.parametrize("keywords", [
    dict(beta=0.3),
    dict(loss_type="ipo", beta=0.2),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.25]),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="discopop", discopop_tau=0.2),
    dict(loss_type="bco_pair", bco_delta=0.3),
])
def test_dpo_options_give_the_keywords_result(keywords):
    (pc, pr, rc, rr), lengths = _pairs()
    common = dict(chosen_lengths=lengths, rejected_lengths=lengths + 1)
    by_keywords = dpo_loss(pc, pr, rc, rr, **common, **keywords)
    by_options = dpo_loss(pc, pr, rc, rr, **common, options=opt.DPOOptions(**keywords))
    assert torch.equal(by_keywords[0], by_options[0])
    assert by_keywords[1].keys() == by_options[1].keys()
    for name in by_keywords[1]:
        assert torch.equal(by_keywords[1][name], by_options[1][name]), name


@pytest.mark.parametrize("loss_fn, options", [
    (simpo_loss, opt.SimPOOptions(beta=1.5, gamma=0.3, alpha=0.1)),
    (cpo_loss, opt.CPOOptions(beta=0.2, label_smoothing=0.1, alpha=0.5)),
    (orpo_loss, opt.ORPOOptions(beta=0.25)),
])
def test_reference_free_options_give_the_keywords_result(loss_fn, options):
    (pc, pr, _, _), _ = _pairs()
    pc, pr = pc / 30, pr / 30  # length-averaged log-probs
    by_keywords = loss_fn(pc, pr, **dataclasses.asdict(options))
    by_options = loss_fn(pc, pr, options=options)
    assert torch.equal(by_keywords[0], by_options[0])


def test_kto_options_give_the_keywords_result():
    (policy, ref, policy_kl, ref_kl), _ = _pairs(batch=6)
    desirable = torch.tensor([True, False, True, True, False, False])
    keywords = dict(beta=0.2, desirable_weight=1.5, undesirable_weight=0.5)
    by_keywords = kto_loss(policy, ref, policy_kl, ref_kl, desirable, **keywords)
    by_options = kto_loss(policy, ref, policy_kl, ref_kl, desirable,
                          options=opt.KTOOptions(**keywords))
    assert torch.equal(by_keywords[0], by_options[0])


@pytest.mark.parametrize("build, error, message", [
    (lambda: opt.DPOOptions(beta=0.0), ValueError, r"beta must be a finite number > 0, got 0\.0"),
    (lambda: opt.DPOOptions(loss_type="dpo"), ValueError, r"unknown loss_type 'dpo'"),
    (lambda: opt.DPOOptions(loss_type="hinge", label_smoothing=0.1), ValueError,
     r"label_smoothing=0\.1 has no effect with loss_type=\['hinge'\]"),
    (lambda: opt.DPOOptions(loss_type="exo_pair"), ValueError, r"'exo_pair' needs label_smoothing"),
    (lambda: opt.DPOOptions(loss_weights=[1.0, 2.0]), ValueError,
     r"loss_weights must have one weight per loss type"),
    (lambda: opt.KTOOptions(undesirable_weight=-1.0), ValueError,
     r"undesirable_weight must be a finite number >= 0"),
    (lambda: opt.SimPOOptions(gamma=float("nan")), ValueError, r"gamma must be a finite number"),
    (lambda: opt.PPOOptions(clip=1.5), ValueError, r"clip must lie in \(0, 1\)"),
    (lambda: opt.PPOOptions(kl_estimator="k9"), ValueError, r"kl_estimator must be one of"),
    (lambda: opt.PPOOptions(loss_agg="sum"), ValueError, r"loss_agg must be one of"),
])
def test_bad_options_are_refused_when_built(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_options_are_frozen_and_normalised():
    options = opt.DPOOptions(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5])
    assert options.loss_type == ("sigmoid", "sft") and options.loss_weights == (1.0, 0.5)
    assert options.weights == (1.0, 0.5) and opt.DPOOptions().weights == (1.0,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.beta = 0.5
    assert hash(options) == hash(opt.DPOOptions(loss_type=("sigmoid", "sft"), loss_weights=(1, .5)))


def test_options_and_differing_keywords_together_are_refused():
    (pc, pr, rc, rr), _ = _pairs()
    with pytest.raises(TypeError, match=r"either as options= or one by one.*also given: beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.5, options=opt.DPOOptions())
    with pytest.raises(TypeError, match=r"options must be a DPOOptions or None, got KTOOptions"):
        dpo_loss(pc, pr, rc, rr, options=opt.KTOOptions())
    with pytest.raises(TypeError, match=r"also given: clip"):
        FusedPPOLoss(clip=0.3, options=opt.PPOOptions())


def test_fused_modules_hold_the_options_they_were_given():
    options = opt.DPOOptions(beta=0.2, loss_type=("sigmoid", "sft"))
    assert FusedDPOLoss(options=options).options is options
    assert FusedDPOLoss(beta=0.2, loss_type=["sigmoid", "sft"]).options == options
    assert FusedKTOLoss(beta=0.3).options == opt.KTOOptions(beta=0.3)
    assert FusedSimPOLoss(beta=2.5).options == opt.SimPOOptions(beta=2.5)
    assert FusedPPOLoss(clip=0.1, kl_coef=0.02).options == opt.PPOOptions(clip=0.1, kl_coef=0.02)


def test_trainer_configs_build_their_loss_options_once(tmp_path):
    dpo = DPOConfig(output_dir=str(tmp_path), beta=0.2, loss_type=("sigmoid", "sft"),
                    loss_weights=(1.0, 0.3))
    assert dpo.loss_options == opt.DPOOptions(beta=0.2, loss_type=("sigmoid", "sft"),
                                          loss_weights=(1.0, 0.3))
    kto = KTOConfig(output_dir=str(tmp_path), beta=0.3, desirable_weight=1.2)
    assert kto.loss_options == opt.KTOOptions(beta=0.3, desirable_weight=1.2)
    ppo = PPOConfig(output_dir=str(tmp_path), clip=0.1, kl_estimator="k3", loss_agg="grpo")
    assert ppo.loss_options == opt.PPOOptions(clip=0.1, kl_coef=ppo.kl_coef, kl_estimator="k3",
                                          vf_coef=ppo.vf_coef, vf_clip=ppo.vf_clip,
                                          loss_agg="grpo")
    # The options are not config fields: checkpoints and --help are unchanged.
    assert "loss_options" not in {field.name for field in dataclasses.fields(DPOConfig)}
    with pytest.raises(ValueError, match=r"'exo_pair' needs label_smoothing"):
        DPOConfig(output_dir=str(tmp_path), loss_type=("exo_pair",))


@pytest.mark.parametrize("function, options_class", [
    (dpo_loss, opt.DPOOptions), (simpo_loss, opt.SimPOOptions), (cpo_loss, opt.CPOOptions),
    (orpo_loss, opt.ORPOOptions), (kto_loss, opt.KTOOptions),
    (FusedDPOLoss.__init__, opt.DPOOptions), (FusedKTOLoss.__init__, opt.KTOOptions),
    (FusedPPOLoss.__init__, opt.PPOOptions),
])
def test_each_loss_keyword_defaults_to_its_options_default(function, options_class):
    """The keywords and the options object spell the same defaults: a call with neither set
    builds the default options, and options= alone never looks like a conflict."""
    import inspect

    parameters = inspect.signature(function).parameters
    takes_more = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for field in dataclasses.fields(options_class):
        if field.name not in parameters:  # FusedDPOLoss takes the rarer ones through **options
            assert takes_more, field.name
            continue
        assert parameters[field.name].default == field.default, field.name

"""Each strategy's plans (strategies/plan.py): what its clients run before, in and after the
rounds, in order. Pure: no MPI, no model."""

import pytest

from fdlora_cluster.config import load_config
from fdlora_cluster.state import FUSED, GLOBAL, PERSONAL
from fdlora_cluster.strategies import (STRATEGIES, Copy, Evaluate, Fuse, JoinFederation, SendUpdate, Train,
                                       make_strategy)

from conftest import write_config

pytestmark = pytest.mark.unit

K = 7


def strategy(name, tmp_path, **sets):
    return make_strategy(load_config(write_config(tmp_path, f"{name}.yaml" if name != "fdlora" else "demo.yaml", **sets)))


def test_fdlora_personal_stage_then_global_rounds_then_fusion(tmp_path):
    s = strategy("fdlora", tmp_path, **{"train.personal_steps": 30})
    assert s.federated
    assert s.before_rounds(K) == [Train(PERSONAL, 30), JoinFederation()]
    assert s.round_plan(1, K, first=True) == [Train(GLOBAL, K), SendUpdate()]
    assert s.after_rounds(K) == [Fuse("search"), Evaluate((PERSONAL, GLOBAL, FUSED))]


def test_fdlora_fold_back_trains_personal_on_its_fewshot_rows_then_fuses_again_with_the_chosen_weights(tmp_path):
    s = strategy("fdlora", tmp_path, **{"fusion.fold_back_steps": 5})
    assert s.after_rounds(K) == [Fuse("search"), Train(PERSONAL, 5, fewshot=True), Fuse("chosen"),
                                 Evaluate((PERSONAL, GLOBAL, FUSED))]
    residual = strategy("fdlora", tmp_path, **{"fusion.fold_back_steps": 5, "personal.steps_per_round": 2,
                                               "personal.residual": True})
    assert residual.after_rounds(K)[1] == Train(PERSONAL, 5, frozen={GLOBAL: 1.0}, fewshot=True)


def test_fdlora_sync_every_h_copies_the_trained_global_into_personal_after_sending(tmp_path):
    s = strategy("fdlora", tmp_path, **{"personal.sync_every": 2})
    sync = Copy(GLOBAL, PERSONAL, "personal_sync")
    assert s.round_plan(1, K, first=True) == [Train(GLOBAL, K), SendUpdate()]
    assert s.round_plan(2, K, first=False) == [Train(GLOBAL, K), SendUpdate(), sync]
    assert s.round_plan(4, K, first=False)[-1] == sync


def test_fdlora_stage_2_trains_personal_each_round_before_the_global_steps(tmp_path):
    """personal.steps_per_round > 0: the personal adapter keeps learning in the rounds; first, so
    that (residual) the active global adapter is the server's aggregate just received."""
    s = strategy("fdlora", tmp_path, **{"train.personal_steps": 30, "personal.steps_per_round": 4})
    assert s.before_rounds(K) == [Train(PERSONAL, 30), JoinFederation()]
    assert s.round_plan(1, K, first=True) == [Train(PERSONAL, 4), Train(GLOBAL, K), SendUpdate()]
    assert s.after_rounds(K) == [Fuse("search"), Evaluate((PERSONAL, GLOBAL, FUSED))]


def test_fdlora_residual_trains_personal_with_the_global_active_and_frozen(tmp_path):
    s = strategy("fdlora", tmp_path, **{"personal.steps_per_round": 4, "personal.residual": True})
    assert s.round_plan(3, K, first=False) == [Train(PERSONAL, 4, frozen={GLOBAL: 1.0}), Train(GLOBAL, K), SendUpdate()]


def test_fdlora_stage_2_with_sync_copies_after_the_personal_and_global_steps(tmp_path):
    s = strategy("fdlora", tmp_path, **{"personal.steps_per_round": 4, "personal.sync_every": 1})
    assert s.round_plan(2, K, first=False) == [Train(PERSONAL, 4), Train(GLOBAL, K), SendUpdate(),
                                               Copy(GLOBAL, PERSONAL, "personal_sync")]


def test_no_personal_stage_without_personal_steps(tmp_path):
    assert strategy("fdlora", tmp_path, **{"train.personal_steps": 0}).before_rounds(K) == [JoinFederation()]


@pytest.mark.parametrize("name", ["fedavg", "diloco"])
def test_global_only_strategies_train_send_and_evaluate_the_global(tmp_path, name):
    s = strategy(name, tmp_path)
    assert s.before_rounds(K) == [JoinFederation()]
    assert s.round_plan(3, K, first=False) == [Train(GLOBAL, K), SendUpdate()]
    assert s.after_rounds(K) == [Evaluate((GLOBAL,))]


def test_fedprox_pulls_the_global_to_the_round_start(tmp_path):
    s = strategy("fedprox", tmp_path, **{"fedprox_mu": 0.25})
    assert s.round_plan(1, K, first=True) == [Train(GLOBAL, K, prox_mu=0.25), SendUpdate()]


def test_local_trains_personal_alone_and_never_communicates(tmp_path):
    s = strategy("local", tmp_path, **{"train.personal_steps": 12, "personal.steps_per_round": 4})
    assert not s.federated
    assert s.before_rounds(K) == [Train(PERSONAL, 12)]
    assert s.round_plan(1, K, first=True) == [Train(PERSONAL, 4)]
    assert s.after_rounds(K) == [Evaluate((PERSONAL,))]
    assert not any(isinstance(step, (SendUpdate, JoinFederation)) for t in range(1, 5)
                   for step in s.round_plan(t, K, first=t == 1) + s.before_rounds(K))


def test_feddpa_T_trains_local_from_round_2_before_the_global_steps_with_global_active(tmp_path):
    s = strategy("feddpa", tmp_path, **{"feddpa.local_weight": 0.3, "train.rounds": 4})
    assert s.before_rounds(K) == [JoinFederation()]  # no personal stage
    assert s.round_plan(1, K, first=True) == [Train(GLOBAL, K), SendUpdate()]  # the first global is untrained
    local, *rest = s.round_plan(2, K, first=False)
    assert rest == [Train(GLOBAL, K), SendUpdate()]
    assert local.adapter == PERSONAL and local.steps == K and local.prox_mu == 0
    assert local.frozen == {GLOBAL: pytest.approx(0.7)} and local.weight == pytest.approx(0.3)
    # dynamic weighting: no one fused adapter; the instance-weighted pair is reported as "fused"
    assert s.after_rounds(K) == [Evaluate((PERSONAL, GLOBAL), instance_weighted=True)]


def test_feddpa_F_trains_local_once_after_the_rounds_with_global_active(tmp_path):
    s = strategy("feddpa_f", tmp_path, **{"train.rounds": 4})
    assert all(s.round_plan(t, 5, first=t == 1) == [Train(GLOBAL, 5), SendUpdate()] for t in range(1, 5))
    local, evaluate = s.after_rounds(5)
    assert local == Train(PERSONAL, 3 * 5, frozen={GLOBAL: 0.5}, weight=0.5)
    assert evaluate.instance_weighted
    s.cfg.feddpa.finetune_steps = 11
    assert s.after_rounds(5)[0].steps == 11


def test_feddpa_fixed_weighting_fuses_with_the_fixed_weights(tmp_path):
    s = strategy("feddpa", tmp_path, **{"feddpa.weighting": "fixed"})
    assert s.after_rounds(K) == [Fuse("fixed"), Evaluate((PERSONAL, GLOBAL, FUSED))]


def test_ditto_starts_personal_as_the_first_global_and_pulls_it_to_the_round_start(tmp_path):
    s = strategy("ditto", tmp_path, **{"ditto.lambda": 2.5, "personal.steps_per_round": 4})
    personal = Train(PERSONAL, 4, prox_mu=2.5)
    assert s.round_plan(1, 9, first=True) == [Copy(GLOBAL, PERSONAL, "personal_init"), Train(GLOBAL, 9), SendUpdate(),
                                              personal]
    assert s.round_plan(2, 9, first=False) == [Train(GLOBAL, 9), SendUpdate(), personal]  # the global trains as FedAvg
    assert s.after_rounds(9) == [Evaluate((PERSONAL, GLOBAL))]


def test_every_federated_plan_sends_exactly_once_after_training_the_global(tmp_path):
    for name in STRATEGIES:
        s = strategy(name if name not in ("fdlora",) else "fdlora", tmp_path)
        for t in (1, 2, 3):
            plan = s.round_plan(t, K, first=t == 1)
            sends = [i for i, step in enumerate(plan) if isinstance(step, SendUpdate)]
            if not s.federated:
                assert sends == [], name
                continue
            trains = [i for i, step in enumerate(plan) if isinstance(step, Train) and step.adapter == GLOBAL]
            assert len(sends) == 1 and trains == [sends[0] - 1], (name, plan)


def test_the_evaluated_adapters_are_those_of_the_last_plan(tmp_path):
    """What export serves: the adapters a strategy evaluates (fedavg's personal adapter is its
    untrained start, so it is not one of them)."""
    assert strategy("fdlora", tmp_path).evaluated() == {PERSONAL, GLOBAL, FUSED}
    assert strategy("fedavg", tmp_path).evaluated() == {GLOBAL}
    assert strategy("local", tmp_path).evaluated() == {PERSONAL}
    assert strategy("feddpa", tmp_path).evaluated() == {PERSONAL, GLOBAL}  # the instance-weighted pair is not saved


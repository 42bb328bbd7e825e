"""Tests of the experiment harness: models, methods, RED/CI, the training
loop, the controls, tuning, reports, the gate study and benchmark output.

Nothing here downloads anything; the Cora smoke run uses
``../shared/data/planetoid`` and is skipped when that folder is absent.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cgalr_jax.flax import apply_with_activations
from experiments import (benchmark, data, gate_study, methods, models, report,
                         stats, train, tuning)

REAL_PLANETOID = (Path(__file__).resolve().parents[1].parent / "shared" /
                  "data" / "planetoid")


# ----------------------------------------------------------------------------
# RED and its interval, against values computed by hand.


def test_red_per_seed_hand_values():
  # errors: cgalr (0.1, 0.2, 0.05), baseline (0.2, 0.2, 0.1)
  red = stats.red_per_seed([0.9, 0.8, 0.95], [0.8, 0.8, 0.9])
  np.testing.assert_allclose(red, [-0.5, 0.0, -0.5], atol=1e-12)


def test_red_mean_and_t_interval_hand_values():
  # per-seed RED (-0.5, 0, -0.5): mean -1/3, sd sqrt(1/12), se 1/6,
  # t_{0.975, 2} = 4.302652730, half-width 0.717108788.
  out = stats.red([0.9, 0.8, 0.95], [0.8, 0.8, 0.9])
  assert out["mean"] == pytest.approx(-1 / 3, abs=1e-12)
  assert out["ci_low"] == pytest.approx(-1 / 3 - 0.717108788, abs=1e-8)
  assert out["ci_high"] == pytest.approx(-1 / 3 + 0.717108788, abs=1e-8)


def test_mean_ci_two_values_and_one_value():
  # (1, 3): mean 2, sd sqrt(2), se 1, t_{0.975, 1} = 12.70620474.
  mean, low, high = stats.mean_ci([1.0, 3.0])
  assert (mean, low, high) == pytest.approx((2.0, 2 - 12.70620474,
                                             2 + 12.70620474))
  assert stats.mean_ci([0.5]) == (0.5, None, None)


def test_red_floor_keeps_a_perfect_baseline_finite():
  red = stats.red_per_seed([0.99], [1.0], floor=0.01)
  np.testing.assert_allclose(red, [1.0])
  with pytest.raises(ValueError, match="paired"):
    stats.red_per_seed([0.9, 0.8], [0.9])


# ----------------------------------------------------------------------------
# Models.


def _init_and_apply(model, *args):
  """Jitted init and tapped apply (compiles faster than eager Linen ops)."""
  variables = jax.jit(model.init)(jax.random.key(0), *args)
  return jax.jit(lambda v, *a: apply_with_activations(model, v, *a))(
      variables, *args)


def test_models_tap_the_documented_signals():
  mlp = models.MLP(hidden=(8, 4), num_classes=3)
  logits, acts = _init_and_apply(mlp, jnp.ones((5, 6)))
  assert logits.shape == (5, 3)
  assert [a.shape for a in jax.tree.leaves(acts)] == [(5, 8), (5, 4)]

  cnn = models.CNN(channels=(2, 3), num_classes=4, side=8)
  logits, acts = _init_and_apply(cnn, jnp.ones((2, 64)))
  assert logits.shape == (2, 4)
  assert [a.shape for a in jax.tree.leaves(acts)] == [(2, 8, 8, 2),
                                                       (2, 4, 4, 3)]

  gcn = models.GCN(hidden=6, num_classes=3)
  logits, acts = _init_and_apply(gcn, jnp.ones((7, 5)), jnp.eye(7))
  assert logits.shape == (7, 3)
  assert [a.shape for a in jax.tree.leaves(acts)] == [(7, 6)]


# ----------------------------------------------------------------------------
# Every registered method.

_REQUIRED = ("cgalr_top", "cgalr_wd", "cgalr_batch", "cgalr_shuffled",
             "cgalr_replay", "rm_envelope", "sgd_const", "sgd_step",
             "sgd_exp", "sgd_cosine", "adam_const", "adam_cosine", "dog",
             "prodigy", "plateau")


def test_registry_has_every_method_of_the_protocol():
  assert set(_REQUIRED) <= set(methods.METHODS)
  assert set(_REQUIRED) <= set(methods.DEFAULT_METHODS)
  for m in methods.METHODS.values():
    assert m.family in methods.FAMILIES, m.name
  fam = {n: m.family for n, m in methods.METHODS.items()}
  assert fam["cgalr_top"] == fam["cgalr_wd"] == fam["cgalr_batch"] == "cgalr"
  assert fam["cgalr_shuffled"] == fam["cgalr_replay"] == "control"
  assert fam["rm_envelope"] == "envelope" and fam["dog"] == "free"
  assert fam["sgd_cosine"] == fam["plateau"] == "sgd"
  assert fam["adam_cosine"] == "adam"
  assert not methods.METHODS["dog"].tuned
  assert not methods.METHODS["prodigy"].tuned
  assert methods.METHODS["cgalr_top"].source == "probe"
  assert not methods.METHODS["cgalr_top"].uses_activations
  assert methods.METHODS["cgalr_batch"].uses_activations
  assert methods.METHODS["cgalr_wd"].lr_from is None  # tunes its own rate
  assert methods.METHODS["cgalr_shuffled"].lr_from == "cgalr_top"
  assert methods.METHODS["plateau"].uses_value
  with pytest.raises(ValueError, match="unknown method"):
    methods.build("nope", 0.1, 10)


def test_grid_same_size_for_every_tuned_method():
  sizes = {len(tuning.grid(n)) for n, m in methods.METHODS.items() if m.tuned}
  assert sizes == {tuning.GRID_SIZE}
  assert tuning.grid("sgd_const") == [0.0316, 0.1, 0.316, 1.0]
  assert tuning.grid("adam_cosine") == [0.001, 0.00316, 0.01, 0.0316]


def _tiny_problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 32), jnp.int32)
  model = models.MLP(hidden=(8, 4), num_classes=3)
  params = model.init(jax.random.key(0), x)["params"]
  return model, params, x, y


def _options(name, model, x, steps):
  spec = methods.METHODS[name]
  opts = {"every": 1}
  if spec.source == "probe":
    opts["probe"] = lambda p: apply_with_activations(model, {"params": p},
                                                      x)[1]
  if spec.source == "pool":
    opts["max_nodes"] = 12
  if spec.needs == "z_sequence":
    opts["z_sequence"] = jnp.asarray([0.0, 3.0, -3.0, 0.0])
  if spec.needs == "scale_trajectory":
    opts["scale_trajectory"] = jnp.linspace(0.5, 2.0, steps)
  return opts


def _train(name, lr, steps=4):
  """A few jitted steps; returns (losses, final params)."""
  model, params, x, y = _tiny_problem()
  spec = methods.METHODS[name]
  opt = methods.build(name, lr, total_steps=steps, steps_per_epoch=2,
                      **_options(name, model, x, steps))

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits, acts = apply_with_activations(model, {"params": p}, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, acts
    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    extra = {}
    if spec.uses_activations:
      extra["activations"] = acts
    if spec.uses_value:
      extra["value"] = loss
    updates, state = opt.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  state = opt.init(params)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses, params


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_trains_without_nan(name):
  lr = methods.METHODS[name].centre
  losses, params = _train(name, lr)
  assert all(math.isfinite(v) for v in losses)
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["cgalr_top",
                                  "cgalr_shuffled", "cgalr_replay",
                                  "sgd_step", "adam_cosine", "plateau"])
def test_tuned_methods_are_linear_in_lr(name):
  """build(lr) == build(1) followed by x lr: what the training loop uses."""
  model, params, x, y = _tiny_problem()
  spec = methods.METHODS[name]
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  acts = {"h": jax.random.normal(jax.random.key(1), (16, 5))}
  extra = {"activations": acts} if spec.uses_activations else {}
  if spec.uses_value:
    extra["value"] = jnp.float32(1.0)
  opts = _options(name, model, x, 8)
  lr = 0.37
  a, b = methods.build(name, lr, 8, **opts), methods.build(name, 1.0, 8,
                                                           **opts)

  @jax.jit
  def both(sa, sb):
    ua, sa = a.update(grads, sa, params, **extra)
    ub, sb = b.update(grads, sb, params, **extra)
    return ua, ub, sa, sb

  sa, sb = a.init(params), b.init(params)
  for _ in range(3):
    ua, ub, sa, sb = both(sa, sb)
    for u1, u2 in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
      np.testing.assert_allclose(u1, lr * u2, rtol=1e-5, atol=1e-8)


def test_replay_gate_moves_the_scale_like_the_gate():
  cfg = methods.gate_config({"boost": 1.1, "brake": 0.5, "max_scale": 1.2})
  opt = methods.replay_gate(jnp.asarray([0.0, 5.0, 0.0, -5.0, -5.0]),
                            every=2, config=cfg)
  state = opt.init(None)
  scales = []
  for _ in range(12):
    u, state = opt.update(jnp.ones(()), state)
    scales.append(float(u))
  # Measuring updates 2, 4, 6...: z 0 (hold), 5 (brake), 0 (brake->hold),
  # then boost until the cap, and z = 0 past the sequence's end (hold:
  # z >= -exit_z).
  np.testing.assert_allclose(
      scales, [1, 1, 1, .5, .5, .5, .5, .55, .55, .605, .605, .605],
      rtol=1e-6)


# ----------------------------------------------------------------------------
# Tuned learning rates.


def test_tuned_file_roundtrip_and_fallback(tmp_path):
  path = tmp_path / "tuned.json"
  tuning.store_tuned("digits", {"sgd_const": 0.1}, path)
  tuning.store_tuned("digits", {"adam_const": 0.003}, path)
  assert json.loads(path.read_text()) == {
      "digits": {"adam_const": 0.003, "sgd_const": 0.1}}
  assert tuning.stored_lr("digits", "sgd_const", path) == 0.1
  with pytest.warns(UserWarning, match="grid centre"):
    lr = tuning.stored_lr("cora", "adam_const", path)
  assert lr == methods.ADAM_CENTRE
  assert tuning.tuning_seeds(2) == [1000, 1001]


def test_committed_tuned_file_is_well_formed():
  tuned = tuning.read_tuned()
  for dataset, rates in tuned.items():
    # Keys are the training configurations (mnist5k_cnn is mnist5k's CNN).
    assert dataset in train.CONFIGS
    assert (train.CONFIGS[dataset].data or dataset) in data.DATASETS
    for name, lr in rates.items():
      assert name in methods.METHODS and methods.METHODS[name].tuned
      assert lr > 0


# ----------------------------------------------------------------------------
# The training loop.


def _small_digits():
  full = data.load("digits")
  return data.Dataset(name="digits", num_classes=10,
                      x_train=full.x_train[:256], y_train=full.y_train[:256],
                      x_val=full.x_val[:64], y_val=full.y_val[:64],
                      x_test=full.x_test[:100], y_test=full.y_test[:100])


def test_seeds_are_one_program_and_reproducible():
  task = train.make_task("digits", epochs=1, dataset_obj=_small_digits())
  a = train.train_runs(task, "sgd_const", [0.1, 0.1], [0, 1])
  b = train.train_runs(task, "sgd_const", [0.1], [1])
  # Run 1 of the vmapped pair equals seed 1 alone (same init, same batches).
  np.testing.assert_allclose(a["train_loss"][1], b["train_loss"][0],
                             rtol=1e-5)
  assert a["train_loss"][0, 0] != a["train_loss"][1, 0]


@pytest.mark.parametrize("method", ["cgalr_top", "sgd_const"])
def test_unrolled_epochs_match_the_scanned_loop(method):
  # Convolutional models train with unrolled epochs (and, for CG-ALR, one
  # jitted call per run): the same arithmetic as the scanned loop.
  task = train.make_task("digits", epochs=2, dataset_obj=_small_digits())
  scanned = train.train_runs(task, method, [0.1, 0.05], [0, 1], every=3,
                             unroll=False)
  unrolled = train.train_runs(task, method, [0.1, 0.05], [0, 1], every=3,
                              unroll=True)
  assert scanned.keys() == unrolled.keys()
  for key in scanned:
    np.testing.assert_allclose(unrolled[key], scanned[key], rtol=1e-4,
                               atol=1e-5, err_msg=key)
  if method == "cgalr_top":
    assert unrolled["measured"][:, -1].min() >= 2  # it did measure


def test_probe_set_is_fixed_per_seed():
  task = train.make_task("digits", epochs=1, dataset_obj=_small_digits())
  a, b = train.probe_indices(task, 0), train.probe_indices(task, 1)
  assert len(a) == 256 and len(np.unique(a)) == 256  # capped at n_train
  full = train.make_task("digits", epochs=1)
  p0 = train.probe_indices(full, 0)
  assert len(p0) == train.PROBE_SIZE == 512
  np.testing.assert_array_equal(p0, train.probe_indices(full, 0))
  assert not np.array_equal(p0, train.probe_indices(full, 1))
  del a, b


def test_controls_replay_the_gate_exactly_without_measuring():
  """Unshuffled z through cgalr_shuffled, or the recorded scale through
  cgalr_replay, retrace cgalr_top's run: same updates, same losses."""
  task = train.make_task("digits", epochs=3, dataset_obj=_small_digits())
  gate = {"score": "trailing", "enter_z": 0.5, "exit_z": 0.1,
          "min_history": 2, "window": 4}
  ref = train.train_runs(task, "cgalr_top", [0.3, 0.3], [0, 1], gate=gate,
                         every=1, noise=True)
  assert ref["scale"].shape == (2, task.total_steps)
  assert np.any(ref["gate"] != 0) and np.ptp(ref["scale"]) > 0
  ms = train.measurements(ref)
  assert len(ms[0]["distance"]) == task.total_steps - 1  # minus the reference
  assert np.all(ms[0]["noise"] > 0) and np.all(ms[0]["even_distance"] > 0)
  z = train.z_at_measuring_steps(ref, 1)
  shuffled = train.train_runs(task, "cgalr_shuffled", [0.3, 0.3], [0, 1],
                              gate=gate, every=1, z_sequences=z)
  replay = train.train_runs(task, "cgalr_replay", [0.3, 0.3], [0, 1],
                            scale_trajectories=ref["scale"])
  for other in (shuffled, replay):
    np.testing.assert_allclose(other["train_loss"], ref["train_loss"],
                               rtol=2e-4)
  perm = train.shuffle_z(z[0], seed=0, start=3)
  np.testing.assert_array_equal(perm[:3], z[0, :3])
  np.testing.assert_allclose(np.sort(perm), np.sort(z[0]))


@pytest.mark.skipif(not (REAL_PLANETOID / "ind.cora.graph").exists(),
                    reason="../shared/data/planetoid not present")
def test_cora_smoke_run_on_real_files():
  task = train.make_task("cora", epochs=2, data_dir=str(REAL_PLANETOID))
  assert task.is_graph and task.n_test == 1000
  res = train.train_runs(task, "cgalr_top", [1.0, 1.0], [0, 1], every=2)
  assert res["test_acc"].shape == (2, 2)
  assert np.all(np.isfinite(res["train_loss"]))
  assert np.all(np.isfinite(res["scale"]))
  assert res["scale"].shape == (2, 2 * task.steps_per_epoch)
  assert res["measured"][0, -1] == task.total_steps // 2


# ----------------------------------------------------------------------------
# Reports, the gate study and the benchmark's summary.json contract.


def test_report_imports_no_jax():
  code = ("import sys, experiments.report; "
          "assert not any(m == 'jax' or m.startswith('jax.') "
          "for m in sys.modules), 'jax imported'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=Path(__file__).resolve().parents[1])


def test_noise_health_and_lag1():
  t = np.arange(40.0)
  d = np.exp(-t / 10)
  ms = [{"distance": d, "noise": d / 2, "even_distance": d * 1.1,
         "odd_distance": d * 0.9}]
  h = report.noise_health(ms)
  assert h["distance_over_noise"] == pytest.approx(2.0)
  assert h["halves_agreement"] == pytest.approx(1.0)
  assert h["lag1_autocorr_log_distance"] == pytest.approx(1.0)
  alternating = np.tile([1.0, -1.0], 10)
  assert report.lag1(alternating) == pytest.approx(-1.0)


def test_gate_study_criteria():
  def rec(ac, pin, diff):
    return {"autocorr": [ac], "pinned": [pin], "val_diff": [diff]}
  names = [v["name"] for v in gate_study.VARIANTS[:3]]
  runs = {"a": {names[0]: rec(0.9, 0.9, 0.05), names[1]: rec(0.9, 0.1, 0.01),
                names[2]: rec(0.2, 0.0, 0.09)},
          "b": {names[0]: rec(0.9, 0.0, 0.05), names[1]: rec(0.8, 0.2, 0.0),
                names[2]: rec(0.9, 0.0, 0.09)}}
  choice = gate_study.choose(runs, ["a", "b"])
  # names[0] is pinned (b), names[2] fails the autocorrelation (a).
  assert choice["chosen"] == names[1]
  assert choice["passed_a_and_b"] == [names[1]]


def test_methods_use_the_gate_study_choice():
  path = (Path(__file__).resolve().parents[1] / "experiments" / "results" /
          "gate_study" / "choice.json")
  choice = json.loads(path.read_text())
  expect = {k: v for k, v in methods.STUDY_GATE.items() if k != "min_history"}
  assert choice["gate"] == pytest.approx(expect)
  assert choice["every"] == methods.STUDY_EVERY
  assert methods.measuring_period(None, 16) == 16


def test_summary_schema_from_a_tiny_run(tmp_path, capsys):
  tuned = tmp_path / "tuned.json"
  tuning.store_tuned("digits", {"cgalr_top": 0.1}, tuned)
  names = ["cgalr_top", "dog", "cgalr_shuffled", "cgalr_replay"]
  summary = benchmark.run("digits", 2, tmp_path / "out", names, epochs=2,
                          tune_seeds=1, tuned_path=tuned,
                          dataset_obj=_small_digits(), quiet=True)
  on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert on_disk["dataset"] == "digits" and on_disk["seeds"] == 2
  assert set(on_disk["methods"]) == set(names)
  for name, m in on_disk["methods"].items():
    assert len(m["test_acc"]) == 2 and len(m["final_train_loss"]) == 2
    assert all(0.0 <= a <= 1.0 for a in m["test_acc"])
    assert isinstance(m["wall_s"], float)
    assert m["lr"] is None if name == "dog" else m["lr"] == 0.1
    assert m["family"] == methods.METHODS[name].family
    assert len(m["curve_test_acc"]) == 2
  assert set(on_disk["red"]) == {"dog", "cgalr_shuffled", "cgalr_replay"}
  for r in on_disk["red"].values():
    assert set(r) == {"mean", "ci_low", "ci_high"}
    assert r["ci_low"] <= r["mean"] <= r["ci_high"]
  # RED is the paired computation on the stored accuracies.
  expect = stats.red(on_disk["methods"]["cgalr_top"]["test_acc"],
                     on_disk["methods"]["dog"]["test_acc"], floor=1 / 100)
  assert on_disk["red"]["dog"]["mean"] == pytest.approx(expect["mean"])
  ref = on_disk["methods"]["cgalr_top"]
  assert len(ref["trace"]["scale"]) == 2 * (256 // 64)
  assert set(ref["noise_health"]) == {"distance_over_noise",
                                      "halves_agreement",
                                      "lag1_autocorr_log_distance"}
  assert summary["methods"]["dog"]["lr"] is None
  for png in ("curves.png", "cgalr_scale.png"):
    assert (tmp_path / "out" / png).stat().st_size > 0
  assert "| cgalr_top |" in (tmp_path / "out" / "summary.md").read_text()
  text = benchmark.explain(summary, tmp_path / "out")
  for needle in ("distance/noise", "agree", "summary.json", "RED =",
                 "BRAKE", "verdict:"):
    assert needle in text
  # Resume: finished methods are read back from OUT/runs, not retrained.
  assert (tmp_path / "out" / "runs" / "cgalr_top.pkl").exists()
  again = benchmark.run("digits", 2, tmp_path / "out", names, epochs=2,
                        tune_seeds=1, tuned_path=tuned,
                        dataset_obj=_small_digits(), quiet=True)
  for name in names:
    assert again["methods"][name]["test_acc"] == (
        summary["methods"][name]["test_acc"])
    assert again["methods"][name]["wall_s"] == (
        summary["methods"][name]["wall_s"])


def _fake_summary(dataset, ref_acc, others):
  methods_ = {"cgalr_top": {"family": "cgalr", "test_acc": ref_acc}}
  for name, (family, acc, val) in others.items():
    methods_[name] = {"family": family, "test_acc": acc, "val_acc": val,
                      "test_acc_mean": float(np.mean(acc)),
                      "curve_val_acc": [0.5] + [0.9] * 9}
  methods_["cgalr_top"].update(val_acc=[0.9] * 3, test_acc_mean=float(
      np.mean(ref_acc)), test_acc_ci=[0.0, 1.0],
                               curve_val_acc=[0.5] * 10)
  red = {n: stats.red(ref_acc, m["test_acc"]) for n, m in methods_.items()
         if n != "cgalr_top"}
  return {"dataset": dataset, "seeds": 3, "methods": methods_, "red": red,
          "config": {"epochs": 10, "steps_per_epoch": 2}}


def test_win_tie_loss_and_convergence_tables():
  s = _fake_summary("digits", [0.9, 0.91, 0.92], {
      "sgd_const": ("sgd", [0.8, 0.8, 0.8], [0.8] * 3),      # cgalr wins
      "sgd_cosine": ("sgd", [0.95, 0.95, 0.95], [0.7] * 3),  # lower val
      "adam_const": ("adam", [0.95, 0.96, 0.95], [0.9] * 3),  # cgalr loses
      "dog": ("free", [0.9, 0.915, 0.91], [0.9] * 3)})        # tie
  text = report.win_tie_loss([s])
  rows = {line.split(" | ")[0].strip("| "): line for line in
          text.splitlines()[2:]}
  # "best SGD" is picked by validation accuracy, not test accuracy.
  assert "win" in rows["best SGD"] and "(sgd_const)" in rows["best SGD"]
  assert rows["best SGD"].endswith("| 1/0/0 |")
  assert rows["best Adam"].endswith("| 0/0/1 |")
  assert rows["DoG"].endswith("| 0/1/0 |")
  assert "not run" in rows["Prodigy"]
  conv = report.convergence(s)
  assert conv["best baseline"]["method"] in ("adam_const", "dog")
  assert conv["best baseline"]["flat"]
  assert "| digits | 10 x 2 = 20 updates |" in report.convergence_table([s])


def test_report_draws_the_gate_thresholds_of_the_library():
  from experiments import report  # pylint: disable=import-outside-toplevel
  import cgalr_jax  # pylint: disable=import-outside-toplevel
  gate = cgalr_jax.GateConfig()
  assert report.GATE_THRESHOLDS == (gate.enter_z, gate.exit_z)

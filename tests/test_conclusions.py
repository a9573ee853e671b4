"""What the results issue asks of a conclusion: a validation split drawn apart from the run's seed, the number a
difference is tested on never selected on the test set, pairing by seed that is real, Holm's correction, effect size,
equivalence and power, and McNemar's test over the test images, each checked against an independent computation."""
from __future__ import annotations

import base64
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats

from normsweep import files, stats
from normsweep.collect import main
from normsweep.config import Config, DataConfig, NormConfig, RegConfig
from normsweep.data import DataError, load_data, split
from normsweep.train import Member, drain, training
from test_collect import make_job


def test_the_split_holds_out_the_same_images_whatever_the_run_and_keeps_every_class():
    data = load_data("fake", ".")
    one, again = split(data, 300, 0, 64), split(data, 300, 0, 32)
    assert len(one.val_labels) == 300 and len(one.train_labels) == len(data.train_labels) - 300
    assert torch.equal(one.val_images, again.val_images)  # the split seed alone decides, not the batch or the run
    assert not torch.equal(split(data, 300, 1, 64).val_images, one.val_images)
    assert set(one.val_labels.tolist()) == set(range(10))
    assert split(data, 0, 0, 64) is data


@pytest.mark.parametrize("val_size, message", [
    (1990, "leaves 10 of the 2000 training images, fewer than a batch of 64"),
    (5, "holds out no image of class"),
])
def test_a_split_that_cannot_work_is_one_line(val_size, message):
    with pytest.raises(DataError, match=message) as raised:
        split(load_data("fake", "."), val_size, 0, 64)
    assert "\n" not in str(raised.value)


def test_the_test_accuracy_reported_is_the_one_validation_picks():
    history = [{"epoch": 1, "val_acc": 90.0, "val_loss": 0.3, "test_acc": 91.0},
               {"epoch": 2, "val_acc": 95.0, "val_loss": 0.2, "test_acc": 93.0},
               {"epoch": 3, "val_acc": 95.0, "val_loss": 0.1, "test_acc": 92.0},  # the tie goes to the lower loss
               {"epoch": 4, "val_acc": 94.0, "val_loss": 0.1, "test_acc": 99.0}]  # best on test, not picked
    summary = files.summarize(history)
    assert summary["test_acc_at_best_val"] == 92.0 and summary["best_test_acc"] == 99.0
    assert files.summarize([{"epoch": 1, "test_acc": 91.0}])["test_acc_at_best_val"] is None


def test_a_seed_draws_the_same_order_and_augmentation_whatever_the_norm_or_regularizer(tmp_path):
    """The pairing by seed number is real: after each job's set-up and one epoch, its generator (every shuffle,
    augmentation and dropout draw) is where every other norm's and regularizer's is."""
    states = []
    for norm, reg in (("bn", RegConfig()), ("gn", RegConfig(name="l1", l1=0.001)), ("ln", RegConfig(name="l2", l2=0.01))):
        cfg = Config(norm=NormConfig(name=norm), reg=reg, epochs=1, threads=1, seed=5,
                     data=DataConfig(name="fake", train_limit=128, test_limit=50))
        seen = {}

        def keep(*end, seen=seen):
            seen["end"] = end

        job_dir = tmp_path / norm
        job_dir.mkdir()
        steps = training([Member(cfg, job_dir, keep)], load_data("fake", ".", 128, 50), torch.device("cpu"))
        drain(steps)
        assert seen["end"][0] == files.STATUS_COMPLETED
        states.append(torch.load(job_dir / files.CHECKPOINT, weights_only=True)["rng"]["cpu"])
        assert json.loads((job_dir / files.TEST_CORRECT).read_text())["images"] == 50
    assert all(torch.equal(state, states[0]) for state in states)


def test_holm_is_statsmodels_holm_worked_by_hand():
    # sorted 0.01, 0.03, 0.04: 3 x 0.01 = 0.03, max(0.03, 2 x 0.03) = 0.06, max(0.06, 1 x 0.04) = 0.06
    assert stats.holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)


def test_tost_mcnemar_and_power_against_independent_computations():
    # two rows 0.05 apart with a spread of 0.02: equivalent within ±0.2, not within ±0.01
    assert stats.tost(99.05, 0.02, 5, 99.0, 0.02, 5, 0.2) < 0.001
    assert stats.tost(99.05, 0.02, 5, 99.0, 0.02, 5, 0.01) > 0.5
    assert stats.mcnemar(30, 12) == pytest.approx(scipy_stats.binomtest(30, 42, 0.5).pvalue)
    assert stats.mcnemar(0, 0) == 1.0
    # seeds for a difference of one pooled sd at 80 % power, two-sided 5 %: the textbook 17 per group
    assert stats.seeds_for(0.2, 0.2, 3, 3, 0.2) == 17


def write_correct(job, correct: np.ndarray) -> None:
    bits = base64.b64encode(np.packbits(correct.astype(np.uint8)).tobytes()).decode()
    (job / files.TEST_CORRECT).write_text(json.dumps({"images": len(correct), "correct": int(correct.sum()),
                                                      "bits": bits}))


def test_mcnemar_pairs_images_by_seed_and_verdicts_follow_holm(tmp_path):
    """Three seeds a side: the discordant images are counted seed against seed; a row clearly worse on every seed is
    'worse' after Holm, a row within a hair of the baseline with a tiny spread is equivalent within ±0.2."""
    rng = np.random.default_rng(0)
    base_correct = {seed: rng.random(1000) < 0.99 for seed in (1, 2, 3)}
    for seed, acc in zip((1, 2, 3), (99.41, 99.52, 99.47)):
        write_correct(make_job(tmp_path, f"bn{seed}", [(0.3, 97.0, 0.02, acc)], seed=seed), base_correct[seed])
    b = c = 0
    for seed, acc in zip((1, 2, 3), (97.20, 97.33, 97.26)):
        correct = base_correct[seed].copy()
        correct[seed * 10: seed * 10 + 5] = ~correct[seed * 10: seed * 10 + 5]
        b += int((correct & ~base_correct[seed]).sum())
        c += int((base_correct[seed] & ~correct).sum())
        write_correct(make_job(tmp_path, f"ln{seed}", [(0.3, 97.0, 0.03, acc)], seed=seed, norm__name="ln"), correct)
    for seed, acc in zip((1, 2, 3), (99.46, 99.47, 99.48)):
        make_job(tmp_path, f"gn{seed}", [(0.3, 97.0, 0.02, acc)], seed=seed, norm__name="gn")
    assert main([str(tmp_path), "--no-plots"]) == 0
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in (tmp_path / files.RESULTS_MD).read_text().split("## Differences")[1].splitlines()
             if line.startswith("| ") and not line.startswith("| Row")}
    assert lines["LayerNorm"][5].startswith(f"{b} / {c}, ")
    assert lines["LayerNorm"][6] == "worse" and lines["GroupNorm"][6] == "equivalent within ±0.2"
    assert lines["GroupNorm"][5] == "n/a"  # no test_correct.json: no paired test


def test_a_margin_that_is_not_positive_and_rows_of_other_splits_are_one_line(tmp_path, capsys):
    for seed in (1, 2):
        make_job(tmp_path, f"a{seed}", [(0.3, 97.0, 0.02, 99.0)], seed=seed)
    make_job(tmp_path, "b", [(0.3, 97.0, 0.02, 99.0)], norm__name="gn")
    assert main([str(tmp_path), "--margin", "0"]) == 2
    assert capsys.readouterr().err.strip() == "ERROR: margin=0.0 must be > 0 (accuracy points)"
    assert not (tmp_path / files.RESULTS_MD).exists()
    make_job(tmp_path, "c", [(0.3, 97.0, 0.02, 99.0)], norm__name="ln", data__val_size=100)
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hold out different validation splits" in err[0]
    assert main([str(tmp_path), "--select", "val"]) == 2  # no row has a split here


def test_without_a_split_the_differences_use_the_final_epoch_never_the_best_test_value(tmp_path):
    for seed, (best, final) in enumerate(((99.6, 99.1), (99.5, 99.2), (99.7, 99.0)), start=1):
        make_job(tmp_path, f"a{seed}", [(0.3, 97.0, 0.02, best), (0.3, 97.0, 0.02, final)], seed=seed)
        make_job(tmp_path, f"b{seed}", [(0.3, 97.0, 0.02, best - 1), (0.3, 97.0, 0.02, final)], seed=seed,
                 norm__name="gn")
    assert main([str(tmp_path), "--no-plots"]) == 0
    markdown = (tmp_path / files.RESULTS_MD).read_text()
    assert "Δ final test acc" in markdown and "| GroupNorm | 3 / 3 | +0.00" in markdown
    assert pd.read_csv(tmp_path / files.RESULTS_CSV)["final_test_acc_mean"].tolist() == pytest.approx([99.1, 99.1])

"""When a rerun counts as the same job: settings compared, runtime keys and schema changes aside."""
from normsweep.job import same_job

OLD = {"norm": {"name": "bn"}, "reg": {"name": "none"}, "optim": {"lr": 0.015, "max_lr": 0.015}, "threads": 1,
       "seed": 1, "batch_size": 64, "epochs": 20}


def test_a_changed_setting_is_another_job():
    assert not same_job(OLD, {**OLD, "seed": 2})
    assert not same_job(OLD, {**OLD, "optim": {"lr": 0.015, "max_lr": 0.03}})
    assert not same_job(None, OLD)


def test_runtime_keys_and_keys_the_schema_gained_or_lost_do_not_count():
    assert same_job(OLD, {**OLD, "threads": 2})
    upgraded = {**OLD, "optim": {"max_lr": 0.015}, "cuda_graphs": True}
    assert same_job(OLD, upgraded)  # optim.lr removed, cuda_graphs added since the job ran


def test_a_config_that_is_not_a_jobs_is_never_the_same_job():
    """A config.yaml of the user's own shares no key with the schema: nothing to compare is not a match."""
    assert not same_job({"my": "own config"}, OLD)
    assert not same_job({}, OLD)
    assert not same_job({"seed": 1}, OLD)


def test_a_key_the_schema_gained_counts_as_its_default_in_an_older_jobs_config():
    """A job that ran before norm.after_pool existed ran with the post-pool norm: the same job as after_pool=true,
    another one than after_pool=false (whose rerun must be refused there, not skipped as completed)."""
    assert same_job(OLD, {**OLD, "norm": {"name": "bn", "after_pool": True}})
    assert not same_job(OLD, {**OLD, "norm": {"name": "bn", "after_pool": False}})

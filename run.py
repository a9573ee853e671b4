"""Hydra entry point: `python run.py norm=gn reg=l2` for one run, `python run.py -m norm=bn,gn,ln reg=l1,l2` for a sweep."""
import hydra
from omegaconf import DictConfig

from normsweep import app, cli
from normsweep.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@app.task
def main(cfg: DictConfig) -> float | str:
    return app.main(cfg)


if __name__ == "__main__":
    app.let_job_processes_import_normsweep()
    cli.cli(main)

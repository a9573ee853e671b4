"""`python run.py --help`: the app's own help, with its groups and choices, options and defaults, and examples."""
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_help_lists_groups_options_and_examples(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    for group in ("norm: bn, gn, ln", "reg: l1, l1l2, l2, none", "data: fake, fashion_mnist, mnist",
                  "logger: mlflow, none, tensorboard"):
        assert group in lines
    assert any(line.startswith("experiment: ") and "reference_bn_l1" in line for line in lines)
    for option in ("epochs: 20", "batch_size: 64", "dropout: 0.03", "tracking_uri: null", "root: data"):
        assert option in lines
    for example in ("python run.py norm=gn reg=l2", "python run.py -m norm=bn,gn,ln reg=l1,l2",
                    "python run.py -m 'experiment=glob(reference_*)' seed=1,2,3"):
        assert any(line.startswith(example + " ") for line in lines), example
    assert "slurm" in proc.stdout and "Powered by Hydra" not in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no output folder

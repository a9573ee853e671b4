"""Hydra's own test suites for launchers (they ship with hydra-core), against hydra/launcher=gpu: with a task that is
not normsweep's (no prepare and finish halves) it runs each job plainly, one after another, as Hydra's basic
launcher does. Nothing is excluded."""
import pytest
from hydra import version
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

pytestmark = pytest.mark.slow  # the integration suite starts Hydra apps in subprocesses


@pytest.fixture(autouse=True)
def hydras_default_version_base():
    """The suites' apps expect Hydra's defaults without a version_base (a job changes into its folder), but an earlier
    test's compose(version_base="1.3") leaves that base in Hydra's process-wide VersionBase, which
    hydra_restore_singletons does not reset: reset it here, and put it back after."""
    base = version.VersionBase.instance()
    saved = base.version_base
    base.version_base = version._UNSPECIFIED_
    yield
    base.version_base = saved


@pytest.mark.parametrize("launcher_name, overrides", [("gpu", [])])
class TestGpuLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/launcher=gpu"])])
class TestGpuLauncherIntegration(IntegrationTestSuite):
    pass


def test_hydras_plugin_scan_imports_neither_torch_nor_the_app(tmp_path):
    """Any Hydra app in this environment scans normsweep's plugins; the scan must stay cheap: no torch, no normsweep
    (python -X importtime lists every module a process imports)."""
    import subprocess
    import sys

    (tmp_path / "app.py").write_text("import hydra\n\n@hydra.main(version_base=None, config_path=None)\n"
                                     "def main(cfg):\n    print('ran')\n\nmain()\n")
    proc = subprocess.run([sys.executable, "-X", "importtime", "app.py", "--info", "plugins"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hydra_plugins.normsweep_launcher.gpu_launcher" in proc.stdout  # it was scanned
    assert proc.stdout.count("GpuLauncher") == 1  # listed once: no base class imported by name
    imported = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert not [name for name in imported if name.split(".")[0] in ("torch", "normsweep")]

"""Hydra finds launchers only in the hydra_plugins package: hydra/launcher=gpu names this class, and the launcher
itself lives in normsweep.launcher."""
from normsweep.launcher import GpuLauncher as _GpuLauncher


class GpuLauncher(_GpuLauncher):
    pass

"""normsweep's Hydra plugins: hydra/launcher=gpu (gpu_launcher.py) and hydra/sweeper=normsweep (checked_sweeper.py).
Hydra imports every module here when it scans for plugins, in any Hydra app of this environment, so they import
Hydra alone: the work they do is imported when it is called."""

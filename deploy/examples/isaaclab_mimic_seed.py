#!/usr/bin/env python3
"""Runs IsaacLab Mimic's generate_dataset.py with the round's seed.

    ./isaaclab.sh -p isaaclab_mimic_seed.py \\
        scripts/imitation_learning/isaaclab_mimic/generate_dataset.py --headless ...

generate_dataset.py (IsaacLab main, 013db29efeb75e9eaee9cae5ce4a60553a010a7b) has no seed flag:
it seeds random, numpy and torch from env.cfg.datagen_config.seed, which the task's config
fixes (the same in every run). Run once per Quarry round, it would generate the same demos
every round. This launcher runs the script unchanged, except that the env config
isaaclab_mimic.datagen.generation.setup_env_config returns gets datagen_config.seed and seed
set to QUARRY_SEED (the seed Quarry gives every round), or to --seed N given before the
script's path.

The patch is applied when generate_dataset.py imports isaaclab_mimic.datagen.generation
(after it has started the simulator, which that module needs), through an import hook.
"""

import builtins
import os
import runpy
import sys

MODULE = "isaaclab_mimic.datagen.generation"


def seeded(setup_env_config, seed):
    def setup(*args, **kwargs):
        env_cfg, success_term = setup_env_config(*args, **kwargs)
        env_cfg.datagen_config.seed = seed
        env_cfg.seed = seed
        return env_cfg, success_term

    return setup


def main():
    argv = sys.argv[1:]
    seed = os.environ.get("QUARRY_SEED")
    if argv[:1] == ["--seed"] and len(argv) > 1:
        seed, argv = argv[1], argv[2:]
    if not argv:
        sys.exit("usage: isaaclab_mimic_seed.py [--seed N] generate_dataset.py [its flags]")
    if seed is None:
        sys.exit("isaaclab_mimic_seed.py: no seed: set QUARRY_SEED (Quarry does) or pass --seed N")
    seed = int(seed)
    original_import = builtins.__import__

    def hook(name, globals=None, locals=None, fromlist=(), level=0):
        module = original_import(name, globals, locals, fromlist, level)
        target = sys.modules.get(MODULE)
        # Imports made while the module itself is being executed find it without the
        # function yet; the first import after it is defined patches it.
        if hasattr(target, "setup_env_config") and not getattr(target, "_quarry_seeded", False):
            target.setup_env_config = seeded(target.setup_env_config, seed)
            target._quarry_seeded = True
        return module

    builtins.__import__ = hook
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()

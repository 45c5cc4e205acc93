"""Framework-free building blocks: state, configs, registry, distributions, schedules, RNG."""

"""The shared basics every layer builds on: the model contract, errors, names and vocabulary, weights and
atomic files, determinism, random draws, work sizes and the pre-flight checks of a job."""

"""Tools beside the pipeline: the CI gate (check), the study of the open questions, the benchmarks."""

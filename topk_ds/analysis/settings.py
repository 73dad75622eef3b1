"""Defaults shared by the analysis modules and the CLI's --help (a light module: no torch import)."""

PERCENTILE, THRESHOLD_RATIO, BINS = 99.0, 0.7, 100  # semantic entropy: the paper's settings
TOP, BEFORE, AFTER = 20, 16, 4  # top contexts per neuron; tokens shown before / after the activating one
PROMPT = "Once upon a time,"  # the paper's steering prompt
TRACE_TOKENS = 50_000  # tokens per checkpoint when tracing
HISTOGRAM = (-4, 4, 8)  # activation histogram: log-spaced bins from 1e-4 to 1e4, 8 a decade (fixed, so it streams)
LOGIT_TOKENS = 10  # promoted and suppressed tokens kept per unit (direct logit effect)
EXPORT_FORMATS = ("neuronpedia", "sparsify", "saelens")  # `analyze export --format`
